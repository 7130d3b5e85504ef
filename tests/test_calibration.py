"""Calibration: streamed statistics through ORT, range methods, subgraph tensors, per-tensor SQNR."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import onnx_ir as ir
import pytest
from helpers import model_from_text
from onnx import numpy_helper

from onnxopt import calibration as cal
from onnxopt.errors import InputError, UsageError
from onnxopt.models import builders, sample_feeds

ELEMENTWISE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N, M] x) => (float[N, M] y) {
    r = Relu(x)
    two = Constant<value = float {2.0}>()
    d = Mul(x, two)
    y = Add(r, d)
}"""


def feeds_of(arrays, name="x"):
    return [{name: np.asarray(a, dtype=np.float32)} for a in arrays]


def heavy_tailed(seed=0, n=200_000):
    rng = np.random.default_rng(seed)
    return rng.standard_t(df=2, size=n).astype(np.float32)


def hist_of(data, bins=cal.DEFAULT_BINS, pieces=1):
    h = cal.HistogramStats(bins)
    for part in np.array_split(np.asarray(data), pieces):
        h.update(part)
    return h


def test_minmax_is_exact_over_samples_of_varying_shapes():
    model = model_from_text(ELEMENTWISE)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((n, m)) * (i + 1) for i, (n, m) in enumerate([(1, 3), (4, 7), (2, 5)])]
    ranges = cal.activation_ranges(model, feeds_of(arrays), "minmax")
    assert set(ranges) == {"x", "r", "d", "y"}  # the Constant output is a weight, not an activation
    xs = [np.asarray(a, np.float32) for a in arrays]
    expect = {"x": xs, "r": [np.maximum(a, 0) for a in xs], "d": [a * 2 for a in xs],
              "y": [np.maximum(a, 0) + a * 2 for a in xs]}
    for name, values in expect.items():
        assert ranges[name] == (min(float(v.min()) for v in values), max(float(v.max()) for v in values))


def test_histogram_rebinning_is_exact_and_matches_one_shot():
    data = heavy_tailed()
    streamed, one_shot = hist_of(data, pieces=50), hist_of(data)
    assert streamed.exponent == one_shot.exponent and streamed.k0 == one_shot.k0
    np.testing.assert_array_equal(streamed.counts, one_shot.counts)
    assert streamed.counts.sum() == data.size
    edges = streamed.edges()
    direct, _ = np.histogram(data.astype(np.float64), bins=edges)
    assert np.abs(direct - streamed.counts).sum() <= 2  # np.histogram closes its last bin


def test_statistics_hold_fixed_size_state_whatever_the_sample_count():
    rng = np.random.default_rng(1)
    few, many = cal.HistogramStats(1024), cal.HistogramStats(1024)
    few.update(rng.standard_normal(1000))
    for i in range(300):
        many.update(rng.standard_normal(1000) * (1 + i))  # keeps widening: forces merges
    assert many.counts.shape == few.counts.shape == (1024,)
    assert not hasattr(many, "__dict__")  # slots only: no per-sample lists can hide anywhere
    assert many.count == 300_000


def _peak_bytes(model, feeds) -> int:
    tracemalloc.start()
    cal.collect_statistics(model, feeds, histogram=True, bins=512)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_calibration_memory_does_not_grow_with_the_number_of_samples():
    model = model_from_text(ELEMENTWISE)
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal((64, 256)) for _ in range(40)]  # 64 KiB per tensor and sample
    small, large = _peak_bytes(model, feeds_of(arrays[:4])), _peak_bytes(model, feeds_of(arrays))
    stored = 36 * 4 * 64 * 256 * 4  # what keeping the 36 extra samples' four activations would cost
    assert large - small < stored / 8


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_clipping_methods_differ_from_minmax_on_heavy_tailed_data(method):
    h = hist_of(heavy_tailed(), pieces=8)
    lo, hi = cal.tensor_range(h, method, percentile=99.9)
    assert h.min < lo < 0 < hi < h.max
    assert hi - lo < 0.8 * (h.max - h.min)
    if method != "mse":  # mse keeps more of t(2)'s tail: clipping it costs more than coarser steps
        assert hi < 0.5 * h.max and lo > 0.5 * h.min


def test_entropy_clips_the_long_tail_of_skewed_positive_data():
    rng = np.random.default_rng(3)
    data = rng.lognormal(0.0, 1.0, 200_000)  # like a ReLU output with a long tail
    h = hist_of(data, pieces=4)
    lo, hi = cal.tensor_range(h, "entropy", levels=256)
    assert lo == h.min and hi < 0.6 * h.max
    assert np.mean(data <= hi) > 0.99


def test_percentile_keeps_the_requested_mass():
    data = heavy_tailed(seed=4)
    lo, hi = cal.tensor_range(hist_of(data), "percentile", percentile=99.0)
    inside = np.mean((data >= lo) & (data <= hi))
    assert 0.985 < inside < 0.995


def test_mse_range_has_lower_quantization_error_than_minmax():
    data = heavy_tailed(seed=5)
    h = hist_of(data)

    def mse(lo, hi):
        step = (hi - lo) / 255
        q = np.clip(np.rint((data - lo) / step), 0, 255) * step + lo
        return float(np.mean((q - data) ** 2))

    assert mse(*cal.tensor_range(h, "mse")) < 0.8 * mse(h.min, h.max)


def test_symmetric_ranges_are_symmetric_and_minmax_needs_no_histogram():
    half = np.abs(heavy_tailed(seed=6))
    mirrored = hist_of(np.concatenate([half, -half]))
    for method in ("percentile", "entropy", "mse"):
        lo, hi = cal.tensor_range(mirrored, method, symmetric=True)
        assert -lo == hi < mirrored.max
    skewed = hist_of(np.concatenate([half, -0.001 * half]))  # magnitudes from both sides, clipped to the data
    lo, hi = cal.tensor_range(skewed, "percentile", symmetric=True, percentile=99.0)
    assert lo == skewed.min and 0 < hi < skewed.max
    stats = cal.MinMaxStats()
    stats.update(np.array([-1.0, 3.0]))
    assert cal.tensor_range(stats, "minmax") == (-1.0, 3.0)
    with pytest.raises(UsageError, match="histogram"):
        cal.tensor_range(stats, "entropy")


def test_if_and_loop_body_tensors_are_calibrated_exactly():
    proto = builders.build_control_flow()
    model = ir.from_proto(proto)
    feeds = sample_feeds("control_flow", 6)
    ranges = cal.activation_ranges(model, feeds, "minmax")
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    t_mm = [f["x"] @ weights["proj_weight"] for f in feeds if f["flag"]]
    assert ranges["t_mm"] == pytest.approx((min(a.min() for a in t_mm), max(a.max() for a in t_mm)), rel=1e-6)
    assert {"e_mm", "e_scaled", "s_mm", "s_act", "state"} <= set(ranges)  # else branch and Loop body


def test_a_branch_no_sample_takes_is_absent_not_zero():
    model = ir.from_proto(builders.build_control_flow())
    feeds = [f for f in sample_feeds("control_flow", 6) if f["flag"]]
    stats = cal.collect_statistics(model, feeds, histogram=False)
    assert "t_mm" in stats and "e_mm" not in stats


LOOP_GROWS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] x) => (float[N] y) {
    n = Constant<value = int64 {3}>()
    c = Constant<value = bool {1}>()
    y = Loop(n, c, x) <body = b (int64 i, bool cin, float[K] s) => (bool cout, float[M] sout) {
        cout = Identity(cin)
        doubled = Mul(s, s)
        sout = Concat<axis = 0>(s, doubled)
    }>
}"""


def test_a_body_tensor_that_cannot_be_exposed_is_skipped_without_losing_the_rest():
    model = model_from_text(LOOP_GROWS)
    feeds = feeds_of([[1.0, -2.0], [0.5, 3.0]])
    names = cal.activation_names(model)
    states, failed = cal.stream_tensors([model], feeds, names, cal.MinMaxStats,
                                        lambda s, arrays: s.update(arrays[0]), first_chunk=len(names))
    assert {"doubled", "sout"} <= failed  # their shape changes from one iteration to the next
    finals = []
    for x in ([1.0, -2.0], [0.5, 3.0]):
        s = np.array(x)
        for _ in range(3):
            s = np.concatenate([s, s * s])
        finals.append(s)
    assert states["y"].range() == (min(f.min() for f in finals), max(f.max() for f in finals))
    assert states["x"].range() == (-2.0, 3.0)


def test_small_chunks_give_the_same_statistics_as_one_session():
    model = ir.from_proto(builders.build_cnn())
    feeds = sample_feeds("cnn", 3)
    names = cal.activation_names(model)
    runs = [cal.stream_tensors([model], feeds, names, lambda: cal.HistogramStats(256),
                               lambda s, arrays: s.update(arrays[0]), memory_budget_mb=budget, first_chunk=first)[0]
            for budget, first in ((1e-9, 1), (256, 64))]
    assert runs[0].keys() == runs[1].keys() == set(names)
    for name in names:
        np.testing.assert_array_equal(runs[0][name].counts, runs[1][name].counts)


def test_missing_inputs_and_empty_data_are_refused():
    model = model_from_text(ELEMENTWISE)
    with pytest.raises(InputError, match="no array for model input"):
        cal.collect_statistics(model, [{"z": np.zeros((1, 1), np.float32)}])
    with pytest.raises(UsageError, match="at least one sample"):
        cal.collect_statistics(model, [])
    with pytest.raises(UsageError, match="no tensor named 'nope'"):
        cal.collect_statistics(model, feeds_of([np.ones((1, 1))]), ["nope"])
    with pytest.raises(UsageError, match="unknown calibration method"):
        cal.activation_ranges(model, feeds_of([np.ones((1, 1))]), "median")


def test_sqnr_is_infinite_for_identical_models_and_orders_worst_first():
    model = ir.from_proto(builders.build_mlp())
    feeds = sample_feeds("mlp", 3)
    same = cal.tensor_sqnr(model, model.clone(), feeds)
    assert same and all(v == math.inf for v in same.values())
    noisy = model.clone()
    weight = noisy.graph.initializers["fc2_weight"]
    array = weight.const_value.numpy()
    weight.const_value = ir.tensor(array + np.random.default_rng(0).normal(0, 0.05, array.shape).astype(np.float32),
                                   name="fc2_weight")
    sqnr = cal.tensor_sqnr(model, noisy, feeds)
    values = list(sqnr.values())
    assert values == sorted(values)
    assert sqnr["h1"] == math.inf and math.isfinite(sqnr["h2_mm"]) and 0 < sqnr["h2_mm"] < 60
    assert cal.producer_names(model, ["h2_mm"]) == {}  # the text-built model has unnamed nodes


def test_producer_names_walks_up_to_the_quantized_op():
    proto = builders.build_cnn()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}_{node.op_type}"
    model = ir.from_proto(proto)
    assert cal.producer_names(model, ["a", "res"]) == {"a": "n2_Relu", "res": "n7_Relu"}
    assert cal.producer_names(model, ["a", "stem_bn", "res"], ops=("Conv",)) == {"a": "n0_Conv", "stem_bn": "n0_Conv"}


def test_quietest_sample_sqnr_flags_a_range_too_wide_for_it():
    stats = cal.MinMaxStats()
    stats.update(np.full(100, 0.003))  # a near-silent chunk
    stats.update(np.linspace(-0.4, 0.4, 100))  # a loud one sets the range
    assert stats.worst_sqnr_db(*stats.range(), 256) < 20
    assert stats.worst_sqnr_db(*stats.range(), 65536) > 40


SCAN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2] init, float[3,2] xs) => (float[2] final, float[3,2] ys) {
    final, ys = Scan<num_scan_inputs = 1, scan_output_axes = [0],
                     body = b (float[2] s, float[2] x) => (float[2] s_out, float[2] y) {
        t = Mul(s, x)
        s_out = Add(t, x)
        y = Identity(s_out)
    }>(init, xs)
}"""


def test_scan_body_tensors_are_calibrated_over_every_iteration():
    model = model_from_text(SCAN)
    xs = np.arange(6, dtype=np.float32).reshape(3, 2)
    ranges = cal.activation_ranges(model, [{"init": np.array([1.0, 2.0], np.float32), "xs": xs}])
    state, products = np.array([1.0, 2.0]), []
    for x in xs:
        products.append(state * x)
        state = products[-1] + x
    assert ranges["t"] == (min(p.min() for p in products), max(p.max() for p in products))
    assert ranges["s"] == (0.0, 12.0)


def test_type_inference_leaves_big_initializers_out_of_the_proto(monkeypatch):
    import onnx

    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 512] x, float[512, 512] w) => (float[2, 512] y) {
            h = MatMul(x, w)
            y = Relu(h)
        }""")
    w = model.graph.inputs.pop()
    w.const_value = ir.tensor(np.ones((512, 512), np.float32), name="w")
    model.graph.register_initializer(w)
    sizes = []
    real = onnx.shape_inference.infer_shapes

    def spy(proto, **kwargs):
        sizes.append(proto.ByteSize())
        return real(proto, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", spy)
    dtypes = cal._value_dtypes(model)
    assert sizes and sizes[0] < 100_000  # the 1 MB weight went in as a typed input, not as data
    assert dtypes["h"] == dtypes["y"] == ir.DataType.FLOAT
    assert model.graph.initializers["w"].const_value.numpy().sum() == 512 * 512  # restored
