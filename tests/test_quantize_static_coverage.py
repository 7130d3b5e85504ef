"""quantize-static coverage: ConvTranspose (placement=all only) and model-local function bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from helpers import op_types
from onnx import numpy_helper
from test_quantize_static import quantize, samples, worst_cosine

from onnxopt import PassContext, all_nodes
from onnxopt import calibration as calib
from onnxopt.passes.quantize.static import QuantizeStaticPass

CONV_TRANSPOSE = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,6,6] x) => (float[N,8,12,12] y) {
    t = ConvTranspose<strides = [2,2], pads = [1,1,0,0], group = 2>(x, w, b)
    y = Relu(t)
}"""

LOCAL_FUNCTION = """<ir_version: 10, opset_import: ["" : 17, "local" : 1]>
g (float[N,64] x) => (float[N,64] y) {
    a = local.Block(x, w1)
    y = local.Block(a, w2)
}
<domain: "local", opset_import: ["" : 17]>
Block (inp, w) => (out) {
    mm = MatMul(inp, w)
    out = Relu(mm)
}"""


def with_arrays(text: str, **arrays: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    for name, array in arrays.items():
        proto.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    return ir.from_proto(proto)


def conv_transpose_model() -> ir.Model:
    rng = np.random.default_rng(0)  # weight [C_in=8, C_out/group=4, 3, 3], bias [C_out=8]
    return with_arrays(CONV_TRANSPOSE, w=rng.standard_normal((8, 4, 3, 3)) / 6, b=rng.standard_normal(8) / 6)


def function_model() -> ir.Model:
    rng = np.random.default_rng(0)
    return with_arrays(LOCAL_FUNCTION, w1=rng.standard_normal((64, 64)) / 8, w2=rng.standard_normal((64, 64)) / 8)


def test_conv_transpose_stays_float_for_ort_cpu_which_has_no_integer_kernel_for_it():
    model = conv_transpose_model()
    result = quantize(model, samples((2, 8, 6, 6)))
    assert not result.modified and result.stats["fallbacks"] == {"no_integer_kernel": 1}
    assert op_types(model) == ["ConvTranspose", "Relu"]


def test_conv_transpose_with_placement_all_gets_per_channel_weights_on_axis_1_and_matching_bias_scales():
    model = conv_transpose_model()
    before = model.clone()
    weight = before.graph.initializers["w"].const_value.numpy()
    feeds = samples((2, 8, 6, 6))
    result = quantize(model, feeds, placement="all")
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear",
                               "ConvTranspose", "Relu", "QuantizeLinear", "DequantizeLinear"]
    assert result.stats["ops_quantized"] == {"ConvTranspose": 1} and result.stats["biases_quantized"] == 1
    conv = next(n for n in model.graph if n.op_type == "ConvTranspose")
    x_dq, w_dq, b_dq = (v.producer() for v in conv.inputs)
    assert w_dq.attributes["axis"].as_int() == 1
    q, w_scale, w_zp = (v.const_value.numpy() for v in w_dq.inputs)
    assert w_scale.shape == (4,)  # C_out/group channels, repeated by each group
    step = w_scale.reshape(1, 4, 1, 1)
    dequantized = (q.astype(np.float64) - w_zp.reshape(1, 4, 1, 1)) * step
    assert np.all(np.abs(dequantized - weight) <= step * 0.501)  # within half a step of numpy's weight
    x_scale = x_dq.inputs[1].const_value.numpy()
    assert b_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    np.testing.assert_allclose(b_dq.inputs[1].const_value.numpy(), x_scale * np.tile(w_scale, 2), rtol=1e-6)
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.999


def test_local_function_bodies_are_inlined_calibrated_and_quantized():
    model = function_model()
    before = model.clone()
    feeds = samples((3, 64))
    context = PassContext(feeds)  # an earlier pass already asked for statistics of the model with functions
    cached = context.analysis(("calibration-statistics", False, 0), lambda: calib.collect_statistics(model, feeds))
    result = QuantizeStaticPass(context=context, min_reduction=0)(model)
    assert result.modified and result.stats["functions_inlined"] == 2 and not model.functions
    assert result.stats["ops_quantized"] == {"MatMul": 2} and result.stats["tensors_calibrated"] > len(cached)
    assert "in_function" not in result.stats["fallbacks"]
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    assert len(matmuls) == 2 and all(n.inputs[1].producer().op_type == "DequantizeLinear" for n in matmuls)
    assert len(set(result.stats["quantized_nodes"])) == 2  # each call site's MatMul has a name of its own
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.99


def test_inline_functions_false_leaves_function_bodies_float():
    model = function_model()
    result = quantize(model, samples((3, 64)), inline_functions=False)
    assert not result.modified and result.stats["fallbacks"] == {"in_function": 1}
    assert len(model.functions) == 1 and "QuantizeLinear" not in op_types(model)
    assert all(n.op_type == "Block" for n in model.graph)


def test_inlining_alone_is_reported_as_a_change():
    model = function_model()
    result = quantize(model, samples((3, 64)), ops=("Relu",))  # nothing to quantize
    assert result.modified and result.stats["functions_inlined"] == 2 and result.stats["ops_quantized"] == {}
    assert not model.functions and [n.op_type for n in all_nodes(model)] == ["MatMul", "Relu", "MatMul", "Relu"]
