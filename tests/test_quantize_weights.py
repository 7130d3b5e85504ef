"""quantize-weights: before/after op lists, stats, ORT numerics per bit width, refusals, packing."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, random_feeds, run_ort
from onnx import numpy_helper

from onnxopt.errors import UsageError
from onnxopt.opset import default_opset, ensure_opset
from onnxopt.options import build_options
from onnxopt.passes.quantize import math as qm
from onnxopt.passes.quantize import weights_lazy as lazy
from onnxopt.passes.quantize.weights import QuantizeWeightsOptions, QuantizeWeightsPass

MLP = """<ir_version: 8, opset_import: ["" : OPSET]>
g (float[4,64] x) => (float[4,32] y) {
    h = MatMul(x, w1)
    r = Relu(h)
    y = Gemm<transB=1>(r, w2)
}"""


def with_weights(text: str, opset: int = 17, seed: int = 0, **shapes) -> ir.Model:
    """Parse ONNX text and add seeded float initializers of the given shapes."""
    proto = onnx.parser.parse_model(text.replace("OPSET", str(opset)))
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return ir.from_proto(proto)


def mlp(opset: int = 17) -> ir.Model:
    return with_weights(MLP, opset, w1=(64, 48), w2=(32, 48))


def relative_error(before: ir.Model, after: ir.Model, feeds=None) -> float:
    feeds = feeds or random_feeds(before)
    want, got = run_ort(before, feeds)[0], run_ort(after, feeds)[0]
    return float(np.abs(want - got).max() / np.abs(want).max())


def quantize(model: ir.Model, **options):
    options.setdefault("min_elements", 0)
    return QuantizeWeightsPass(**options)(model)


def test_int8_per_channel_puts_dequantize_before_matmul_and_gemm():
    model = mlp()
    before = model.clone()
    result = quantize(model)
    assert result.modified
    assert op_types(model) == ["DequantizeLinear", "DequantizeLinear", "MatMul", "Relu", "Gemm"]
    assert result.stats["weights_quantized"] == 2
    assert result.stats["bytes_before"] == (64 * 48 + 32 * 48) * 4
    assert result.stats["bytes_after"] == 64 * 48 + 32 * 48 + (48 + 32) * 4  # int8 + one scale per channel
    inits = model.graph.initializers
    assert inits["w1_quantized"].dtype == ir.DataType.INT8 and inits["w1_scale"].shape.numpy() == (48,)
    assert inits["w2_scale"].shape.numpy() == (32,)  # transB=1: output channels are rows of w2
    assert "w1" not in inits and "w2" not in inits
    assert relative_error(before, model) < 0.02
    assert not quantize(model).modified  # weights behind DequantizeLinear are not quantized again


@pytest.mark.parametrize(
    "bits,granularity,bound",
    [(8, "per-tensor", 0.03), (8, "blocked", 0.02), (4, "per-channel", 0.25), (4, "blocked", 0.25),
     (4, "per-tensor", 0.35), (2, "per-channel", 1.2), (2, "blocked", 1.2), (1, "per-channel", 1.2),
     (1, "per-tensor", 1.5)],
)
def test_every_bit_width_and_granularity_runs_in_ort_within_its_error_bound(bits, granularity, bound):
    model = mlp()
    before = model.clone()
    result = quantize(model, bits=bits, granularity=granularity, block_size=16)
    assert result.modified and result.stats["weights_quantized"] == 2
    feeds = random_feeds(before)
    want, got = run_ort(before, feeds)[0], run_ort(model, feeds)[0]
    assert np.abs(want - got).max() / np.abs(want).max() < bound
    cosine = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > {8: 0.999, 4: 0.95, 2: 0.5, 1: 0.5}[bits]
    if bits == 1:
        assert "DequantizeLinear" not in op_types(model) and op_types(model).count("BitShift") == 2
    else:
        dtype = {8: ir.DataType.INT8, 4: ir.DataType.INT4, 2: ir.DataType.INT2}[bits]
        assert model.graph.initializers["w1_quantized"].dtype == dtype
        assert default_opset(model) >= {8: 21 if granularity == "blocked" else 13, 4: 21, 2: 25}[bits]


def test_unsigned_asymmetric_stores_a_zero_point():
    model = mlp()
    before = model.clone()
    quantize(model, signed=False, symmetric=False)
    assert model.graph.initializers["w1_zero_point"].dtype == ir.DataType.UINT8
    assert relative_error(before, model) < 0.02


def test_model_without_eligible_weights_is_not_modified():
    model = with_weights("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,8] x) => (float[4,8] y) { y = Add(x, b) }""", b=(4, 8))
    result = quantize(model)
    assert not result.modified and result.stats["weights_quantized"] == 0
    assert op_types(model) == ["Add"]


def test_small_weights_are_skipped_with_a_reason():
    model = mlp()
    result = QuantizeWeightsPass()(model)  # default min_elements=1024: both weights are larger
    assert result.stats["skipped"] == {} and result.stats["weights_quantized"] == 2
    model = mlp()
    result = QuantizeWeightsPass(min_elements=2000)(model)
    assert result.stats["skipped"] == {"w2": "1536 elements < min_elements=2000"}
    assert result.stats["weights_quantized"] == 1


SUBGRAPH = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4,64] x, bool c) => (float[4,32] y) {
    y = If(c) <
        then_branch = t () => (float[4,32] a) { a = MatMul(x, w_outer) },
        else_branch = e () => (float[4,32] b) {
            h = MatMul(x, w_inner)
            b = Relu(h)
        }>
}"""


def _subgraph_model() -> ir.Model:
    proto = onnx.parser.parse_model(SUBGRAPH)
    rng = np.random.default_rng(5)
    proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_outer"))
    else_branch = next(a.g for a in proto.graph.node[0].attribute if a.name == "else_branch")
    else_branch.initializer.append(numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w_inner"))
    return ir.from_proto(proto)


def test_weights_in_if_bodies_and_captured_from_outer_scope_are_quantized():
    model = _subgraph_model()
    before = model.clone()
    result = quantize(model)
    assert result.stats["weights_quantized"] == 2
    assert op_types(model) == ["DequantizeLinear", "If", "MatMul", "DequantizeLinear", "MatMul", "Relu"]
    assert "w_outer_quantized" in model.graph.initializers  # stored where the weight was stored
    x = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    for c in (True, False):
        feeds = {"x": x, "c": np.array(c)}
        assert relative_error(before, model, feeds) < 0.02


def test_shared_weight_is_quantized_once_or_forked_on_request():
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,64] x) => (float[4,48] y) { a = MatMul(x, w)  b = MatMul(x, w)  y = Add(a, b) }"""
    model = with_weights(text, w=(64, 48))
    before = model.clone()
    result = quantize(model)
    assert result.stats["weights_quantized"] == 1 and op_types(model).count("DequantizeLinear") == 1
    assert relative_error(before, model) < 0.02
    forked = with_weights(text, w=(64, 48))
    result = quantize(forked, fork_shared=True)
    assert result.stats["weights_quantized"] == 2 and op_types(forked).count("DequantizeLinear") == 2


def test_weight_also_used_as_activation_is_skipped_unless_forked():
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[64,64] x) => (float[64,64] y) { a = MatMul(x, w)  y = Add(a, w) }"""
    model = with_weights(text, w=(64, 64))
    result = quantize(model)
    assert not result.modified and "Add" in result.stats["skipped"]["w"]
    model = with_weights(text, w=(64, 64))
    before = model.clone()
    result = quantize(model, fork_shared=True)
    assert result.modified and "w" in model.graph.initializers  # Add still reads the float weight
    assert result.stats["bytes_before"] == 0  # nothing removed
    assert relative_error(before, model) < 0.02


def test_already_quantized_model_is_left_alone():
    text = """<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,64] x) => (float[4,48] y) {
            wf = DequantizeLinear<axis=1>(wq, ws)
            y = MatMul(x, wf)
        }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.ones((64, 48), np.int8), "wq"),
        numpy_helper.from_array(np.full(48, 0.1, np.float32), "ws")])
    model = ir.from_proto(proto)
    assert not quantize(model).modified
    assert op_types(model) == ["DequantizeLinear", "MatMul"]


def test_weights_in_constant_nodes_stay_constant_nodes():
    proto = onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 11]>
        g (float[1,8,6,6] x) => (float[1,16,4,4] y) { y = Conv(x, w) }""")
    w = np.random.default_rng(7).standard_normal((16, 8, 3, 3)).astype(np.float32)
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)))
    model = ir.from_proto(proto)
    before = model.clone()
    result = quantize(model, bits=4, granularity="blocked", block_size=16)
    assert result.stats["opset_upgraded"] == "11->21" and default_opset(model) == 21 and model.ir_version >= 10
    # blocked Conv: blocks run over input channels x kernel, stored flat and reshaped back
    assert op_types(model) == ["Constant", "Constant", "DequantizeLinear", "Constant", "Reshape", "Conv"]
    assert not model.graph.initializers
    quantized = next(n for n in model.graph if n.outputs[0].name == "w_quantized").attributes["value"].as_tensor()
    assert quantized.dtype == ir.DataType.INT4 and quantized.shape.numpy() == (16, 72)
    assert relative_error(before, model) < 0.25


@pytest.mark.parametrize("function_opset", [17, 21])
def test_constant_weights_inside_functions(function_opset):
    proto = onnx.parser.parse_model(f"""<ir_version: 10, opset_import: ["" : 21, "local" : 1]>
        g (float[4,64] x) => (float[4,32] y) {{ y = local.proj(x) }}
        <domain: "local", opset_import: ["" : {function_opset}]>
        proj (a) => (b) {{ b = MatMul(a, w) }}""")
    w = np.random.default_rng(8).standard_normal((64, 32)).astype(np.float32)
    proto.functions[0].node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)))
    model, before = ir.from_proto(proto), ir.from_proto(proto)
    result = quantize(model, bits=4)
    if function_opset < 21:  # a function's own opset import is not upgraded: refused, not broken
        assert not result.modified and result.stats["skipped"] == {"w": "in function proj with opset 17 < 21"}
        return
    assert result.modified and op_types(model) == ["proj", "Constant", "Constant", "DequantizeLinear", "MatMul"]
    assert relative_error(before, model) < 0.25


def test_opset_11_model_is_upgraded_or_refused_clearly():
    model = mlp(opset=11)
    result = quantize(model)  # per-channel needs DequantizeLinear axis: opset 13
    assert result.stats["opset_upgraded"] == "11->13" and default_opset(model) == 13
    run_ort(model, random_feeds(model))
    with pytest.raises(UsageError, match="needs opset 21.*opset 11"):
        quantize(mlp(opset=11), bits=4, upgrade_opset=False)
    per_tensor = mlp(opset=11)
    result = quantize(per_tensor, granularity="per-tensor", upgrade_opset=False)  # opset 10 suffices
    assert result.modified and default_opset(per_tensor) == 11
    one_bit = mlp(opset=11)
    assert quantize(one_bit, bits=1).modified and default_opset(one_bit) == 11


def test_ensure_opset_reports_and_refuses():
    model = mlp(opset=11)
    assert not ensure_opset(model, 11)
    assert ensure_opset(model, 18) and default_opset(model) == 18 and model.ir_version >= 8
    with pytest.raises(UsageError, match="opset 999"):
        ensure_opset(model, 999)
    # Split's attribute became an input in opset 13/18: the upgraded model must still be valid
    split = ir.from_proto(onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 11]>
        g (float[2,6] x) => (float[2,3] y) { a, b = Split<axis = 1, split = [3, 3]>(x)  y = Mul(a, b) }"""))
    before = ir.from_proto(ir.to_proto(split))
    assert ensure_opset(split, 21)
    onnx.checker.check_model(ir.to_proto(split), full_check=True)
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    np.testing.assert_array_equal(run_ort(split, {"x": x})[0], run_ort(before, {"x": x})[0])
    broken = ir.from_proto(onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 11]>
        g (float[2,6] x) => (float[2,8] y) { y = Pad<pads = [0, 1, 0, 1]>(x) }"""))  # invalid at opset 11
    with pytest.raises(UsageError, match="cannot upgrade the model from opset 11 to opset 13"):
        ensure_opset(broken, 13)


@pytest.mark.parametrize("bits,granularity,ratio", [(4, "blocked", 0.16), (2, "per-channel", 0.08), (1, "per-channel", 0.05)])
def test_saved_file_shrinks_with_packed_low_bit_storage(tmp_path: Path, bits, granularity, ratio):
    model = with_weights("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,256] x) => (float[2,256] y) { y = MatMul(x, w) }""", w=(256, 256))
    float_path, low_path = tmp_path / "float.onnx", tmp_path / "low.onnx"
    ir.save(model, float_path)
    quantize(model, bits=bits, granularity=granularity)
    ir.save(model, low_path)
    assert os.path.getsize(low_path) < ratio * os.path.getsize(float_path)
    run_ort(ir.load(low_path), random_feeds(model))


def test_clip_reports_clipped_values_per_tensor():
    model = mlp()
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w1[0, 0] = 100.0
    model.graph.initializers["w1"].const_value = ir.tensor(w1)
    result = quantize(model, clip="percentile:99")
    clipped = result.stats["clipped"]
    assert set(clipped) == {"w1", "w2"} and clipped["w1"] > 0
    scale = model.graph.initializers["w1_scale"].const_value.numpy()
    assert scale[0] < 100 / 127  # the outlier did not set channel 0's scale


def test_gather_embeddings_get_one_scale_per_row():
    model = with_weights("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[3] ids) => (float[3,32] y) { y = Gather(table, ids) }""", table=(100, 32))
    before = model.clone()
    quantize(model)
    assert model.graph.initializers["table_scale"].shape.numpy() == (100, 1)  # [rows, blocks]: gather.py
    feeds = {"ids": np.array([0, 57, 99])}
    assert relative_error(before, model, feeds) < 0.02


def test_selector_options_restrict_and_refuse():
    model = mlp()
    result = quantize(model, ops=("Gemm",))
    assert result.stats["weights_quantized"] == 1 and "w1" in model.graph.initializers
    with pytest.raises(UsageError, match="matched no node"):
        quantize(mlp(), nodes=("no_such_node",))


def test_option_parsing_and_validation():
    options = build_options(QuantizeWeightsOptions, {"bits": "4", "granularity": "blocked", "ops": "[MatMul]"},
                            owner="quantize-weights")
    assert options.bits == 4 and options.ops == ("MatMul",)
    for bad in ({"bits": "3"}, {"bits": "1", "granularity": "blocked"}, {"clip": "mse"}, {"clip": "percentile:20"}):
        with pytest.raises(UsageError):
            build_options(QuantizeWeightsOptions, bad, owner="quantize-weights")
    assert QuantizeWeightsPass().fidelity.value == "lossy"


PPOCR = Path(__file__).resolve().parents[1] / "models" / "data" / "ppocr_mobile_v2_cls.onnx"


def _smooth_images(count: int) -> list[np.ndarray]:
    """Low-frequency random images: the classifier is confident on them, unlike on white noise."""
    rng = np.random.default_rng(0)
    low = rng.uniform(-1, 1, (count, 1, 3, 6, 24)).astype(np.float32)
    return [np.repeat(np.repeat(x, 8, axis=2), 8, axis=3) for x in low]


@pytest.mark.zoo
@pytest.mark.parametrize("options,tolerance", [({"bits": 8}, 0.03), ({"bits": 4, "granularity": "blocked"}, 0.25)])
def test_ppocr_classifier_keeps_its_decisions(options, tolerance):
    if not PPOCR.exists():
        pytest.skip(f"bundled model missing: {PPOCR}")
    reference = ir.load(PPOCR)
    model = ir.load(PPOCR)
    result = QuantizeWeightsPass(**options)(model)
    assert result.modified and result.stats["weights_quantized"] >= 25  # weights live in Constant nodes
    assert result.stats["bytes_after"] < result.stats["bytes_before"] / 3
    for x in _smooth_images(4):
        want, got = run_ort(reference, {"x": x})[0], run_ort(model, {"x": x})[0]
        assert want.argmax() == got.argmax()
        assert np.abs(want - got).max() < tolerance


CONSUMERS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[4,64] x) => (float[4,48] y) {
    [MatMul_0] r = Relu(x)
    a = MatMul(r, w1)
    [proj] b = MatMul(r, w2)
    c = MatMul(r, w3)
    s = Add(a, b)
    y = Add(s, c)
}"""


def test_unnamed_consumers_get_stable_names_that_exclude_nodes_can_address():
    def consumers(model):
        return [n.name for n in model.graph if n.op_type == "MatMul"]

    model = with_weights(CONSUMERS, w1=(64, 48), w2=(64, 48), w3=(64, 48))
    result = quantize(model)
    # "MatMul_0" is taken by the Relu: the unnamed MatMuls become MatMul_1 and MatMul_2
    assert result.stats["quantized_nodes"] == ["MatMul_1", "MatMul_2", "proj"]
    assert consumers(model) == ["MatMul_1", "proj", "MatMul_2"]
    again = with_weights(CONSUMERS, w1=(64, 48), w2=(64, 48), w3=(64, 48))
    before = again.clone()
    result = quantize(again, exclude_nodes=(f"^{re.escape('MatMul_1')}$",))
    assert result.stats["quantized_nodes"] == ["MatMul_2", "proj"]
    assert "w1" in again.graph.initializers and "w3" not in again.graph.initializers
    assert consumers(again) == ["", "proj", "MatMul_2"]  # the excluded node gets its empty name back
    assert relative_error(before, again) < 0.02


def test_no_op_run_leaves_node_names_alone():
    model = with_weights(CONSUMERS, w1=(64, 48), w2=(64, 48), w3=(64, 48))
    result = QuantizeWeightsPass(min_elements=10_000)(model)
    assert not result.modified and result.stats["quantized_nodes"] == []
    assert [n.name for n in model.graph] == ["MatMul_0", "", "proj", "", "", ""]


_KERNEL_CASES = [  # (shape, bits, signed, axis, block, symmetric, pow2, clip)
    ((64, 48), 4, True, 0, 16, True, False, None), ((64, 48), 4, True, 0, 5, True, False, None),
    ((48, 64), 4, True, 1, 16, True, False, None), ((64, 48), 8, True, 1, None, True, False, None),
    ((64, 48), 8, False, 0, None, False, False, None), ((64, 48), 8, True, None, None, True, False, None),
    ((16, 8, 3, 3), 4, False, 1, 7, False, True, None), ((16, 8, 3, 3), 8, True, 0, None, True, True, None),
    ((3, 70, 5), 2, True, 1, 16, True, False, None), ((64, 48), 8, True, 1, None, True, False, 99.0),
    ((64, 48), 4, True, 0, 16, False, False, 99.0), ((200,), 8, True, None, None, True, False, 99.0),
]


@pytest.mark.parametrize("shape,bits,signed,axis,block,symmetric,pow2,clip", _KERNEL_CASES)
def test_chunked_kernel_matches_quant_math_exactly(monkeypatch, shape, bits, signed, axis, block, symmetric, pow2, clip):
    monkeypatch.setattr(lazy, "CHUNK_ELEMENTS", 37)  # many chunks, most of them ragged
    w = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    w.reshape(-1)[[5, 77, 140]] = [np.nan, np.inf, -np.inf]
    qtype = qm.QuantType(bits, signed)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = qm.quantize_weight(w, qtype, axis, block, symmetric, pow2, clip)
        got = lazy.quantize_array(w, qtype, axis, block, symmetric, pow2, clip)
        params = lazy.weight_params(w, qtype, axis, block, symmetric, pow2, clip)
        tensor = lazy.quantize_tensor(w, qtype, axis, block, symmetric, pow2, clip)[0]
    assert got[0].dtype == want[0].dtype
    np.testing.assert_array_equal(got[0].astype(np.int32), want[0].astype(np.int32))
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2].astype(np.int32), want[2].astype(np.int32))
    assert got[3] == want[3] == params[2]
    np.testing.assert_array_equal(params[0], want[1])
    assert tensor.tobytes() == ir.tensor(want[0], dtype=qtype.ir_dtype).tobytes()  # packed like onnx_ir packs
