"""quantize-weights and quantize-dynamic on models with external data: lazy until saved, streamed out,
memory-bounded."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt import api
from onnxopt.model_io import load_model, save_model
from onnxopt.model_stats import model_stats
from onnxopt.passes.quantize import math as qm
from onnxopt.passes.quantize import weights_lazy as lazy
from onnxopt.passes.quantize.dynamic import QuantizeDynamicPass
from onnxopt.passes.quantize.weights import QuantizeWeightsPass
from onnxopt.verify import structural_problems


def write_external_model(directory: Path, d: int, layers: int, seed: int = 0) -> Path:
    """x[4, d] -> layers x (LayerNorm, MatMul [d, 2d], Relu, MatMul [2d, d]); weights written one at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []
    with open(directory / "model.onnx.data", "wb") as data:

        def weight(name, shape, array=None):
            if array is None:
                array = rng.standard_normal(shape, dtype=np.float32) / np.float32(math.sqrt(shape[0]))
            tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=shape,
                                      data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", "model.onnx.data"), ("offset", str(data.tell())),
                               ("length", str(array.nbytes))):
                tensor.external_data.add(key=key, value=value)
            array.tofile(data)
            initializers.append(tensor)
            return name

        x = "x"
        for i in range(layers):
            ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
            nodes.append(onnx.helper.make_node("LayerNormalization", [x, weight(f"g{i}", (d,), ones),
                                                                      weight(f"b{i}", (d,), zeros)], [f"n{i}"]))
            nodes.append(onnx.helper.make_node("MatMul", [f"n{i}", weight(f"up{i}", (d, 2 * d))], [f"u{i}"]))
            nodes.append(onnx.helper.make_node("Relu", [f"u{i}"], [f"r{i}"]))
            nodes.append(onnx.helper.make_node("MatMul", [f"r{i}", weight(f"down{i}", (2 * d, d))], [f"y{i}"]))
            x = f"y{i}"
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, d])],
        [onnx.helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, [4, d])], initializers)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    path = directory / "model.onnx"
    onnx.save_model(model, path)
    return path


def ort_all_outputs(path: Path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def ort_outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return ort_all_outputs(path, x)[0]


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Names of the source weights read (materialized) so far."""
    seen: list[str] = []
    apply = lazy.WeightSource.apply

    def counting(self, fn):
        seen.append(self.tensor.name)
        return apply(self, fn)

    monkeypatch.setattr(lazy.WeightSource, "apply", counting)
    return seen


@pytest.mark.parametrize("spec,bound", [("quantize-weights:bits=4,granularity=blocked", 0.25),
                                        ("quantize-weights:bits=8", 0.03)])
def test_external_model_through_optimize_validates_and_streams_external_data(tmp_path, monkeypatch, spec, bound):
    source = write_external_model(tmp_path / "in", d=128, layers=3)
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # external data is found through the model's directory, not the cwd
    out = tmp_path / "out" / "q.onnx"
    result = api.optimize(source, out, [spec], validate="each", budget="cosine=0.95")
    step = result.run.steps[0]
    assert result.ok, (step.status, step.reason, result.run.notes)
    assert step.stats["weights_quantized"] == 6 and step.fidelity_metrics is not None
    assert step.stats["quantized_nodes"] == [f"MatMul_{i}" for i in range(6)]
    # the input's external data no longer trips the structural check (it did from any other cwd)
    assert not any("structural" in note for note in result.run.notes)
    assert (out.parent / "q.onnx.data").stat().st_size > 0
    proto = onnx.load(out, load_external_data=False)
    quantized = [t for t in proto.graph.initializer if t.name.endswith("_quantized")]
    assert len(quantized) == 6 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in quantized)
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    want, got = ort_outputs(source, x), ort_outputs(out, x)
    assert np.abs(want - got).max() / np.abs(want).max() < bound


def test_quantized_initializers_stay_lazy_until_saved_and_match_eager_numbers(tmp_path, reads):
    source = write_external_model(tmp_path / "in", d=64, layers=2)
    model = load_model(source)
    result = QuantizeWeightsPass(bits=4, granularity="blocked", block_size=32)(model)
    assert result.stats["weights_quantized"] == 4 and reads == []
    lazy_values = [v for v in model.graph.initializers.values() if isinstance(v.const_value, ir.LazyTensor)]
    assert sorted(v.name for v in lazy_values) == sorted(
        f"{w}{i}_{part}" for w in ("up", "down") for i in range(2) for part in ("quantized", "scale"))
    up = model.graph.initializers["up0_quantized"].const_value
    assert up.dtype == ir.DataType.INT4 and up.shape.numpy() == (64, 128) and up.nbytes == 64 * 128 // 2
    assert model.graph.initializers["up0_scale"].const_value.shape.numpy() == (2, 128)
    stats = model_stats(model)  # sizes come from dtype and shape
    assert structural_problems(model) == [] and reads == []  # the structural check reads no tensor data
    assert stats.initializer_bytes == sum(v.const_value.nbytes for v in model.graph.initializers.values())
    out = tmp_path / "out" / "q.onnx"
    save_model(model, out)
    assert len(reads) == len(lazy_values)  # each lazy tensor computed once, while being written
    assert (out.parent / "q.onnx.data").exists()
    assert isinstance(model.graph.initializers["up0_quantized"].const_value, ir.LazyTensor)
    saved = load_model(out)
    w = load_model(source).graph.initializers["up0"].const_value.numpy()
    q, scale, _, _ = qm.quantize_weight(w, qm.QuantType(4), 0, 32)
    np.testing.assert_array_equal(saved.graph.initializers["up0_quantized"].const_value.numpy(), q)
    np.testing.assert_array_equal(saved.graph.initializers["up0_scale"].const_value.numpy(), scale)


def test_lazy_weight_refuses_a_source_file_replaced_after_the_pass(tmp_path):
    source = write_external_model(tmp_path / "in", d=64, layers=1)
    model = load_model(source)
    QuantizeWeightsPass(bits=8)(model)
    data = source.parent / "model.onnx.data"
    shutil.copyfile(data, tmp_path / "copy")
    os.replace(tmp_path / "copy", data)  # same bytes, another file: the layout read earlier may not hold
    with pytest.raises(RuntimeError, match="changed after quantize-weights read its layout"):
        save_model(model, tmp_path / "out" / "q.onnx")


_CHILD = textwrap.dedent("""
    import json, sys

    def hwm():  # this process image's peak RSS (getrusage's ru_maxrss would include the forking parent's)
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

    from onnxopt import api
    from onnxopt.registry import default_registry

    default_registry()  # imports every pass module (onnxscript too): part of the baseline, not of the run
    baseline = hwm()
    result = api.optimize(sys.argv[1], sys.argv[2], [sys.argv[3]], validate=sys.argv[4])
    print(json.dumps({"ok": result.ok, "baseline": baseline, "peak": hwm()}))
""")


def peak_growth_of_optimize(source: Path, out: Path, spec: str, validate: str = "off") -> int:
    """Bytes the peak RSS of a fresh process grows by while ``api.optimize`` runs ``spec``."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(source), str(out), spec, validate],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["ok"]
    return report["peak"] - report["baseline"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc for the peak RSS")
@pytest.mark.parametrize("spec", ["quantize-weights:bits=4,granularity=blocked", "quantize-weights:bits=8",
                                  "quantize-dynamic:weight_type=int8"])
def test_quantizing_a_200mb_model_keeps_peak_memory_far_below_the_model_size(tmp_path, spec):
    source = write_external_model(tmp_path / "in", d=1024, layers=12)  # 12 x 2 x 8 MB weights
    model_bytes = (source.parent / "model.onnx.data").stat().st_size
    assert model_bytes > 190e6
    out = tmp_path / "out" / "q.onnx"
    growth = peak_growth_of_optimize(source, out, spec)
    assert growth < 0.5 * model_bytes, f"peak grew by {growth / 1e6:.0f} MB for a {model_bytes / 1e6:.0f} MB model"
    assert (out.parent / "q.onnx.data").stat().st_size < model_bytes / 3


@pytest.mark.parametrize("options", [
    {"bits": 8, "granularity": "per-tensor"},
    {"bits": 4, "signed": False, "symmetric": False, "granularity": "blocked", "block_size": 16},
    {"bits": 2, "granularity": "per-channel", "pow2": True},
    {"bits": 4, "granularity": "blocked", "block_size": 8, "clip": "percentile:99"},
    {"bits": 1},
])
def test_deferred_and_immediate_quantization_write_the_same_model(tmp_path, options):
    proto = onnx.parser.parse_model("""<ir_version: 11, opset_import: ["" : 25]>
        g (float[2,64] x, float[1,8,6,6] img) => (float[2,48] y, float[1,16,4,4] z) {
            y = MatMul(x, w)
            z = Conv(img, wc)
        }""")
    rng = np.random.default_rng(4)
    for name, shape in (("w", (64, 48)), ("wc", (16, 8, 3, 3))):
        proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    ir.save(ir.from_proto(proto), path, external_data="m.onnx.data", size_threshold_bytes=0)
    deferred, immediate = load_model(path), ir.external_data.load_to_model(load_model(path))
    stats = [QuantizeWeightsPass(min_elements=0, **options)(m).stats for m in (deferred, immediate)]
    assert stats[0] == stats[1] and stats[0]["weights_quantized"] == 2
    kinds = [{type(v.const_value) for v in m.graph.initializers.values()} for m in (deferred, immediate)]
    assert ir.LazyTensor in kinds[0] and ir.LazyTensor not in kinds[1]
    saved = []
    for label, model in (("deferred", deferred), ("immediate", immediate)):
        save_model(model, tmp_path / label / "q.onnx", external_data=True)
        saved.append(load_model(tmp_path / label / "q.onnx").graph.initializers)
    assert list(saved[0]) == list(saved[1])
    for name in saved[0]:
        a, b = saved[0][name].const_value, saved[1][name].const_value
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), name


# -- quantize-dynamic ----------------------------------------------------------------------
DYNAMIC = """<ir_version: 10, opset_import: ["" : 21]>
g (float[N,96] x) => (float[N,48] y, float[N,48] z) {
    h = MatMul(x, w1)
    g = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(h, w2, b2)
    y = Relu(g)
    a = MatMul(x, w3)
    c = MatMul(x, w3)
    z = Add(a, c)
}"""


def write_dynamic_model(directory: Path) -> Path:
    """MatMul [96, 64], Gemm (transB, alpha, beta) [48, 64] + bias, a [96, 48] weight shared by two MatMuls.

    Every initializer, the bias too, is written as external data.
    """
    proto = onnx.parser.parse_model(DYNAMIC)
    rng = np.random.default_rng(5)
    for name, shape in (("w1", (96, 64)), ("w2", (48, 64)), ("b2", (48,)), ("w3", (96, 48))):
        array = rng.standard_normal(shape).astype(np.float32)
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    path = directory / "m.onnx"
    directory.mkdir(parents=True)
    ir.save(ir.from_proto(proto), path, external_data="m.onnx.data", size_threshold_bytes=0)
    return path


def graph_layout(model: ir.Model) -> tuple[list, list]:
    """Nodes (op, name, input names) and initializers (name, dtype, shape): the graph without its numbers."""
    nodes = [(n.op_type, n.name, [v.name if v is not None else None for v in n.inputs]) for n in model.graph]
    inits = [(v.name, v.const_value.dtype, v.const_value.shape.numpy()) for v in model.graph.initializers.values()]
    return nodes, inits


# int8 weights run through ORT's u8s8 kernels, which saturate int16 sums on x86 without VNNI (see weight_type)
@pytest.mark.parametrize("options,bound", [({}, 0.03), ({"weight_type": "int8"}, 0.2),
                                           ({"per_channel": False, "pow2": True}, 0.03)])
def test_dynamic_external_weights_stay_lazy_until_saved_and_save_the_eager_model(tmp_path, reads, options, bound):
    source = write_dynamic_model(tmp_path / "in")
    deferred = load_model(source)
    result = QuantizeDynamicPass(min_reduction=0, **options)(deferred)
    assert result.stats["ops_quantized"] == {"Gemm": 1, "MatMul": 3} and result.stats["weights_quantized"] == 3
    assert reads == []  # the pass read no weight
    lazy_names = sorted(n for n, v in deferred.graph.initializers.items() if isinstance(v.const_value, ir.LazyTensor))
    assert lazy_names == ["a_weight_scale", "c_weight_scale", "g_bias", "g_weight_scale", "h_weight_scale",
                          "w1_quantized", "w2_quantized", "w3_quantized"]
    save_model(deferred, tmp_path / "deferred" / "q.onnx", external_data=True)
    assert sorted(reads) == sorted(["w1", "w2", "b2"] + ["w1", "w2", "w3", "w3", "w3"])  # one read per lazy tensor
    immediate = ir.external_data.load_to_model(load_model(source))
    assert QuantizeDynamicPass(min_reduction=0, **options)(immediate).stats == result.stats
    assert graph_layout(deferred) == graph_layout(immediate)
    assert not any(isinstance(v.const_value, ir.LazyTensor) for v in immediate.graph.initializers.values())
    save_model(immediate, tmp_path / "immediate" / "q.onnx", external_data=True)
    saved = [load_model(tmp_path / label / "q.onnx") for label in ("deferred", "immediate")]
    assert graph_layout(saved[0]) == graph_layout(saved[1])
    for name, value in saved[0].graph.initializers.items():
        assert value.const_value.tobytes() == saved[1].graph.initializers[name].const_value.tobytes(), name
    x = np.random.default_rng(2).standard_normal((5, 96)).astype(np.float32)
    want = ort_all_outputs(source, x)
    got = [ort_all_outputs(tmp_path / label / "q.onnx", x) for label in ("deferred", "immediate")]
    for lazy_out, eager_out, float_out in zip(*got, want):
        np.testing.assert_array_equal(lazy_out, eager_out)
        assert np.abs(lazy_out - float_out).max() < bound * np.abs(float_out).max()


def test_dynamic_external_weights_are_quant_math_numbers_with_alpha_and_beta_applied(tmp_path):
    source = write_dynamic_model(tmp_path / "in")
    model = load_model(source)
    QuantizeDynamicPass(min_reduction=0)(model)
    inits = model.graph.initializers
    floats = {name: v.const_value.numpy() for name, v in load_model(source).graph.initializers.items()}
    uint8 = qm.QuantType(8, False)
    q1, s1, z1, _ = qm.quantize_weight(floats["w1"], uint8, 1)
    q2, s2, _, _ = qm.quantize_weight(floats["w2"].T, uint8, 1)  # Gemm transB: the integer op reads [K, N]
    np.testing.assert_array_equal(inits["w1_quantized"].const_value.numpy(), q1)
    np.testing.assert_array_equal(inits["w1_zero_point"].const_value.numpy(), z1)
    np.testing.assert_array_equal(inits["h_weight_scale"].const_value.numpy(), s1)
    np.testing.assert_array_equal(inits["w2_quantized"].const_value.numpy(), q2)
    np.testing.assert_array_equal(inits["g_weight_scale"].const_value.numpy(), s2 * np.float32(0.5))
    np.testing.assert_array_equal(inits["g_bias"].const_value.numpy(), floats["b2"] * np.float32(2.0))
    assert isinstance(inits["w2_quantized"].const_value, ir.LazyTensor)  # read above, still not cached


def test_dynamic_external_model_through_optimize_validates_and_writes_external_int8(tmp_path):
    source = write_external_model(tmp_path / "in", d=128, layers=3)
    out = tmp_path / "out" / "q.onnx"
    result = api.optimize(source, out, ["quantize-dynamic:weight_type=int8"], validate="each", budget="cosine=0.99")
    step = result.run.steps[0]
    assert result.ok, (step.status, step.reason, result.run.notes)
    assert step.stats["weights_quantized"] == 6 and step.fidelity_metrics is not None
    proto = onnx.load(out, load_external_data=False)
    quantized = [t for t in proto.graph.initializer if t.name.endswith("_quantized")]
    assert len(quantized) == 6 and all(t.data_location == onnx.TensorProto.EXTERNAL for t in quantized)
    assert {t.data_type for t in quantized} == {onnx.TensorProto.INT8}
    assert [n.op_type for n in proto.graph.node].count("MatMulInteger") == 6
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    want, got = ort_outputs(source, x), ort_outputs(out, x)
    assert np.abs(want - got).max() / np.abs(want).max() < 0.15
