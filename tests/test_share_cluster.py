"""cluster-weights: codebook + packed indices rebuilt by DequantizeLinear/Cast/Gather, small after cleanup."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import model_from_text, op_types, run_ort
from onnx import numpy_helper

import onnxopt
from onnxopt.errors import UsageError
from onnxopt.models import sample_feeds, zoo
from onnxopt.opset import default_opset
from onnxopt.passes.share import ClusterWeightsPass
from onnxopt.passes.share.kmeans import kmeans_1d
from onnxopt.passes.share.scope import stored_weights
from onnxopt.spec import parse_pipeline

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((64, 48)).astype(np.float32)
W2 = RNG.standard_normal((48, 32)).astype(np.float32)
TWO_LAYERS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4,64] x) => (float[4,32] y) { [first] h = MatMul(x, w1)  r = Relu(h)  [second] y = MatMul(r, w2) }"""


def with_arrays(text: str, **arrays: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return ir.from_proto(proto)


def two_layers() -> ir.Model:
    return with_arrays(TWO_LAYERS, w1=W1, w2=W2)


def cluster(model: ir.Model, **options):
    options.setdefault("min_elements", 0)
    return ClusterWeightsPass(**options)(model)


def rebuilt(model: ir.Model, value: ir.Value, feeds) -> np.ndarray:
    """The weight as ORT rebuilds it: the pass's output value made a graph output."""
    probe = ir.from_proto(ir.to_proto(model))
    probe.graph.outputs.append(next(o for n in probe.graph for o in n.outputs if o.name == value.name))
    return run_ort(probe, feeds)[-1]


def gather_of(model: ir.Model, reader: str) -> ir.Node:
    node = next(n for n in onnxopt.all_nodes(model) if n.name == reader)
    return node.inputs[1].producer()


def saved_size(model: ir.Model, path: Path) -> int:
    ir.save(model, path)
    return path.stat().st_size


def feeds():
    return {"x": RNG.standard_normal((4, 64)).astype(np.float32)}


def test_4bit_weights_are_gathered_from_a_16_entry_codebook_and_each_value_is_the_nearest():
    model = two_layers()
    result = cluster(model, bits=4)
    assert result.modified and result.stats["weights_clustered"] == 2
    assert result.stats["codebooks"] == {"w1": 16, "w2": 16}
    assert op_types(model).count("Gather") == 2 and op_types(model).count("DequantizeLinear") == 2
    assert default_opset(model) == 21  # uint4 indices
    gather = gather_of(model, "first")
    codebook = gather.inputs[0].const_value.numpy()
    indices = gather.inputs[1].producer().inputs[0].producer().inputs[0].const_value
    assert indices.dtype == ir.DataType.UINT4 and codebook.shape == (16,)
    weights = rebuilt(model, gather.outputs[0], feeds())
    assert np.isin(weights, codebook).all()
    distance = np.abs(W1[..., None] - codebook).min(axis=-1)
    np.testing.assert_array_equal(np.abs(W1 - weights), distance)
    assert np.corrcoef(weights.reshape(-1), W1.reshape(-1))[0, 1] > 0.99


def test_clustered_file_shrinks_and_stays_small_after_cleanup(tmp_path):
    model = two_layers()
    float_size = saved_size(model, tmp_path / "float.onnx")
    cluster(model, bits=4)
    size = saved_size(model, tmp_path / "clustered.onnx")
    float_bytes = W1.nbytes + W2.nbytes
    assert size <= float_bytes * 4 / 32 + 2 * 16 * 4 + 1500  # plus names and nodes
    assert size < 0.25 * float_size
    for spec in ("cleanup", "fold-constants:input_size_limit=100000000,output_size_limit=0"):
        cleaned = ir.from_proto(ir.to_proto(model))
        for step in parse_pipeline([spec]):
            step.make_pass()(cleaned)
        assert saved_size(cleaned, tmp_path / "cleaned.onnx") < 0.25 * float_size, spec  # shapes annotated, not folded
        big_floats = [w.value.name for w in stored_weights(cleaned) if w.tensor.dtype == ir.DataType.FLOAT and w.tensor.size > 16]
        assert big_floats == [], spec
        assert op_types(cleaned).count("Gather") == 2
        x = feeds()
        np.testing.assert_allclose(run_ort(cleaned, x)[0], run_ort(model, x)[0], rtol=1e-5, atol=1e-5)


def test_few_distinct_values_round_trip_losslessly():
    levels = np.array([-0.5, 0.0, 0.25, 1.0], np.float32)
    w1, w2 = levels[RNG.integers(0, 4, W1.shape)], levels[RNG.integers(0, 4, W2.shape)]
    model, before = with_arrays(TWO_LAYERS, w1=w1, w2=w2), with_arrays(TWO_LAYERS, w1=w1, w2=w2)
    cluster(model, bits=2)
    assert default_opset(model) == 25  # uint2 indices
    x = feeds()
    np.testing.assert_array_equal(run_ort(model, x)[0], run_ort(before, x)[0])


def test_shared_weight_is_clustered_once():
    model = with_arrays("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[4,64] x) => (float[4,48] y) { a = MatMul(x, w1)  b = MatMul(x, w1)  y = Add(a, b) }""", w1=W1)
    result = cluster(model, bits=3)
    assert result.stats["weights_clustered"] == 1 and op_types(model).count("Gather") == 1
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert matmuls[0].inputs[1] is matmuls[1].inputs[1]
    assert result.stats["quantized_nodes"] == ["MatMul_0", "MatMul_1"]


def literal(array: np.ndarray) -> str:
    return "{" + ",".join(f"{v:.6g}" for v in array.reshape(-1)) + "}"


SMALL = RNG.standard_normal((8, 6)).astype(np.float32)
IF_MODEL = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[2,8] x, bool flag) => (float[2,6] y) {{
    y = If(flag) <
        then_branch = t () => (float[2,6] ty) {{ tw = Constant<value = float[8,6] {literal(SMALL)}>()  ty = MatMul(x, tw) }},
        else_branch = e () => (float[2,6] ey) {{ ey = MatMul(x, outer) }}>
}}"""


def test_constant_in_an_if_body_is_rebuilt_inside_the_body_and_outer_weight_outside():
    model = with_arrays(IF_MODEL, outer=SMALL * 2)
    before = with_arrays(IF_MODEL, outer=SMALL * 2)
    result = cluster(model, bits=5)  # uint8 indices: no opset upgrade
    assert result.stats["weights_clustered"] == 2 and default_opset(model) == 17
    then_branch, else_branch = model.graph[-1].attributes["then_branch"].as_graph(), model.graph[-1].attributes["else_branch"].as_graph()
    assert [n.op_type for n in then_branch].count("Gather") == 1 and "Constant" in [n.op_type for n in then_branch]
    assert [n.op_type for n in else_branch] == ["MatMul"]
    assert [n.op_type for n in model.graph].count("Gather") == 1
    for flag in (True, False):
        x = {"x": RNG.standard_normal((2, 8)).astype(np.float32), "flag": np.array(flag)}
        want, got = run_ort(before, x)[0], run_ort(model, x)[0]
        assert np.abs(want - got).max() < 0.05 * np.abs(want).max()
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_per_channel_groups_read_their_own_codebook():
    model = two_layers()
    cluster(model, bits=2, granularity="per-channel-group", group_size=16, nodes=("^first$",))
    gather = gather_of(model, "first")
    codebook = gather.inputs[0].const_value.numpy()
    assert codebook.shape == (3 * 4,)  # 48 output channels (MatMul axis 1) / 16 per group, 4 entries each
    weights = rebuilt(model, gather.outputs[0], feeds())
    for group in range(3):
        columns = weights[:, group * 16:(group + 1) * 16]
        assert np.isin(columns, codebook[group * 4:(group + 1) * 4]).all()
    assert model.graph.initializers["w2"].const_value is not None  # not selected: still float


def test_small_weights_are_a_no_op_and_a_second_run_changes_nothing():
    model = two_layers()
    assert not ClusterWeightsPass(min_elements=10_000)(model).modified
    cluster(model, bits=4)
    again = cluster(model, bits=4)
    assert not again.modified and set(again.stats["skipped"].values()) == {"already a codebook", "a quantization parameter"}


def test_refusals_are_usage_errors():
    with pytest.raises(UsageError, match="bits must be 1 to 8"):
        ClusterWeightsPass(bits=9)
    with pytest.raises(UsageError, match="needs opset 21|need opset 21"):
        cluster(two_layers(), bits=4, upgrade_opset=False)
    model = two_layers()
    result = cluster(model, bits=4, nodes=("^first$",), exclude_nodes=("^second$",))
    assert result.stats["weights_clustered"] == 1


def test_promoted_readers_get_the_next_rung_of_the_ladder():
    assert [label for _, label in ClusterWeightsPass(bits=2).promotion_ladder()] == ["4-bit codebook", "8-bit codebook"]
    model = two_layers()
    result = cluster(model, bits=2, promote_nodes=("^second$",))
    assert result.stats["promoted_nodes"] == ["second"]
    assert gather_of(model, "second").inputs[0].const_value.numpy().shape == (16,)
    assert gather_of(model, "first").inputs[0].const_value.numpy().shape == (4,)


def test_kmeans_is_deterministic_and_matches_lloyds_fixed_point():
    values = RNG.standard_normal(5000).astype(np.float32)
    book, index = kmeans_1d(values, 8, iterations=2000)
    again, _ = kmeans_1d(values.copy(), 8, iterations=2000)
    np.testing.assert_array_equal(book, again)
    for j in range(8):  # each entry is the mean of the values nearest to it
        assert abs(values[index == j].mean() - book[j]) < 1e-4


def _smooth_images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    low = rng.uniform(-1, 1, (count, 1, 3, 6, 24)).astype(np.float32)
    return [np.repeat(np.repeat(x, 8, axis=2), 8, axis=3) for x in low]


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_bundled_classifier_weights_in_constant_nodes_cluster_to_4_bits(cls_path, tmp_path):
    model, reference = ir.load(cls_path), ir.load(cls_path)
    result = ClusterWeightsPass(bits=4)(model)
    assert result.stats["weights_clustered"] >= 20
    assert saved_size(model, tmp_path / "c.onnx") < 0.45 * cls_path.stat().st_size  # 15% is in weights < 1024
    for x in _smooth_images(2):
        want, got = run_ort(reference, {"x": x})[0], run_ort(model, {"x": x})[0]
        assert want.argmax() == got.argmax() and cosine(want, got) > 0.99


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name,options,ratio,min_cosine", [
    # The recognizer is the sensitive one: 4-bit codebooks give cosine 0.6-0.7 on its softmax (and
    # linear int8 needs int16 for most of its weights, see the quantization results).
    ("ppocr_rec_v4", {"bits": 4}, 0.17, 0.5),
    ("ppocr_det_v4", {"bits": 4, "granularity": "per-channel-group"}, 0.2, 0.9),
    ("silero_vad", {"bits": 4}, 0.25, 0.999)])
def test_zoo_models_cluster_small(name, options, ratio, min_cosine, tmp_path):
    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    model, reference = ir.load(path), ir.load(path)
    result = ClusterWeightsPass(**options)(model)
    assert result.modified
    assert saved_size(model, tmp_path / "c.onnx") <= ratio * path.stat().st_size
    for feed in sample_feeds(name, 2, seed=1):
        want, got = run_ort(reference, feed)[0], run_ort(model, feed)[0]
        assert cosine(want, got) >= min_cosine
