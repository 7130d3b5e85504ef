"""quantize-dynamic: op lists, ORT numerics within the quantization error bound, subgraphs, refusals."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run_ort
from onnx import numpy_helper

from onnxopt import all_nodes, ort_run
from onnxopt.errors import UsageError
from onnxopt.models import builders, sample_feeds
from onnxopt.passes.quantize.dynamic import QuantizeDynamicPass

MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,96] x) => (float[N,24] y) {
    mm = MatMul(x, w)
    logits = Add(mm, b)
    y = Softmax<axis = -1>(logits)
}"""

GEMM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,96] x) => (float[N,24] y) {
    y = Gemm<transB = 1, alpha = 0.5, beta = 2.0>(x, w, b)
}"""


def with_weights(text: str, seed: int = 0, **shapes) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    return ir.from_proto(proto)


def quantize(model: ir.Model, **options):
    options.setdefault("min_reduction", 0)
    return QuantizeDynamicPass(**options)(model)


def error_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """|x_q @ w_q - x @ w| bound: uint8 x over [min(x, 0), max(x, 0)], w per column in 127 steps a side."""
    sx = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
    sw = np.abs(w).max(axis=0) / 127
    return sx / 2 * np.abs(w).sum(0) + np.abs(x) @ np.ones_like(w) * sw / 2 + w.shape[0] * sx * sw / 4 + 1e-5


def test_matmul_becomes_dynamic_quantize_and_matmul_integer():
    model = with_weights(MATMUL, w=(96, 24), b=(24,))
    result = quantize(model)
    assert result.modified and result.stats["ops_quantized"] == {"MatMul": 1}
    assert op_types(model) == ["DynamicQuantizeLinear", "MatMulInteger", "Cast", "Mul", "Mul", "Add", "Softmax"]
    integer = next(n for n in model.graph if n.op_type == "MatMulInteger")
    assert integer.inputs[1].const_value.dtype == ir.DataType.UINT8  # u8u8: exact on every x86 CPU
    assert set(integer.inputs[3].const_value.numpy()) == {128}
    signed = with_weights(MATMUL, w=(96, 24), b=(24,))
    quantize(signed, weight_type="int8")
    integer = next(n for n in signed.graph if n.op_type == "MatMulInteger")
    assert integer.inputs[1].const_value.dtype == ir.DataType.INT8 and len(integer.inputs) == 3
    assert next(n for n in model.graph if n.op_type == "Add").inputs[0].name == "mm"  # the name is kept


def test_matmul_error_stays_within_the_quantization_bound_in_ort():
    model = with_weights(MATMUL.replace("logits = Add(mm, b)\n    y = Softmax<axis = -1>(logits)", "y = Identity(mm)"),
                         w=(96, 24))
    w = model.graph.initializers["w"].const_value.numpy()
    before = model.clone()
    quantize(model)
    rng = np.random.default_rng(3)
    for optimized in (False, True):
        session = ort_run.make_session(model, optimized=optimized)
        for scale in (0.1, 1.0, 30.0):
            x = (rng.standard_normal((5, 96)) * scale).astype(np.float32)
            want = run_ort(before, {"x": x})[0]
            got = ort_run.run(session, {"x": x})["y"]
            assert np.all(np.abs(got - want) <= error_bound(x, w))
            assert np.abs(got - want).max() > 0  # it is quantized


def test_gemm_with_transposed_weight_alpha_beta_and_bias():
    model = with_weights(GEMM, w=(24, 96), b=(24,))
    before = model.clone()
    quantize(model)
    assert "Gemm" not in op_types(model) and "MatMulInteger" in op_types(model)
    x = np.random.default_rng(4).standard_normal((3, 96)).astype(np.float32)
    want, got = run_ort(before, {"x": x})[0], run_ort(model, {"x": x})[0]
    w = before.graph.initializers["w"].const_value.numpy().T * 0.5
    assert np.all(np.abs(got - want) <= error_bound(x, w))


def test_one_dynamic_quantize_per_activation_and_one_copy_per_weight():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,96] x) => (float[N,96] y) {
        a = MatMul(x, w)
        b = MatMul(x, w)
        y = Add(a, b)
    }"""
    model = with_weights(text, w=(96, 96))
    result = quantize(model)
    counts = collections.Counter(op_types(model))
    assert counts["DynamicQuantizeLinear"] == 1 and counts["MatMulInteger"] == 2
    assert result.stats["weights_quantized"] == 1 and "w" not in model.graph.initializers


def test_conv_is_opt_in_and_runs_as_conv_integer():
    model = ir.from_proto(builders.build_cnn())
    assert not quantize(model, ops=("Conv",), min_reduction=10_000).modified
    assert "Conv" in op_types(model)
    before = model.clone()
    result = quantize(model, ops=("Conv",))
    assert result.stats["ops_quantized"] == {"Conv": 5} and op_types(model).count("ConvInteger") == 5
    feed = sample_feeds("cnn", 1)[0]
    want, got = run_ort(before, feed)[0], run_ort(model, feed)[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_if_and_loop_bodies_are_quantized_and_run():
    model = ir.from_proto(builders.build_control_flow())
    before = model.clone()
    result = quantize(model)
    assert result.stats["ops_quantized"] == {"MatMul": 3}
    assert not any(n.op_type == "MatMul" for n in all_nodes(model))
    for optimized in (False, True):
        session = ort_run.make_session(model, optimized=optimized)
        for feed in sample_feeds("control_flow", 4):
            want, got = run_ort(before, feed)[0], ort_run.run(session, feed)["y"]
            assert np.abs(got - want).max() < 0.05 * np.abs(want).max()


def test_second_run_changes_nothing_and_small_or_excluded_nodes_stay_float():
    model = with_weights(MATMUL, w=(96, 24), b=(24,))
    quantize(model)
    again = quantize(model)
    assert not again.modified and again.stats["fallbacks"] == {}
    small = with_weights(MATMUL, w=(96, 24), b=(24,))
    result = QuantizeDynamicPass(min_reduction=128)(small)
    assert not result.modified and result.stats["fallbacks"] == {"reduction_below_min": 1}
    proto = builders.build_mlp()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}"
    named = ir.from_proto(proto)
    assert quantize(named, exclude_nodes=("^n0$",)).stats["ops_quantized"] == {"MatMul": 2}
    assert next(n for n in named.graph if n.name == "n0").op_type == "MatMul"


def test_bad_options_are_refused():
    with pytest.raises(UsageError, match="ops must name"):
        QuantizeDynamicPass(ops=("Softmax",))
    with pytest.raises(UsageError, match="matched no node"):
        quantize(with_weights(MATMUL, w=(96, 24), b=(24,)), nodes=("nothing",))


def test_pow2_weight_scales_are_powers_of_two_and_stay_accurate():
    reference = with_weights(MATMUL, w=(96, 24), b=(24,))
    x = np.random.default_rng(3).standard_normal((4, 96)).astype(np.float32)
    want = run_ort(reference, {"x": x})[0]
    errors = {}
    for pow2 in (False, True):
        model = with_weights(MATMUL, w=(96, 24), b=(24,))
        quantize(model, pow2=pow2)
        errors[pow2] = np.max(np.abs(run_ort(model, {"x": x})[0] - want))
    constant_muls = [n for n in model.graph if n.op_type == "Mul" and n.inputs[1].const_value is not None]
    scales = constant_muls[0].inputs[1].const_value.numpy()
    assert np.allclose(np.log2(scales), np.round(np.log2(scales)))
    assert errors[True] <= 4 * errors[False] + 1e-3  # at most one bit of weight precision lost


def test_a_refused_constant_node_weight_leaves_the_model_byte_for_byte():
    unnamed = numpy_helper.from_array(np.ones((8, 4), np.float32))  # the Constant's tensor has no name
    nodes = [onnx.helper.make_node("Constant", [], ["w"], value=unnamed),
             onnx.helper.make_node("MatMul", ["x", "w"], ["y"])]
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    model = ir.from_proto(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    before = ir.to_proto(model).SerializeToString()
    result = QuantizeDynamicPass()(model)  # K = 8 < min_reduction
    assert not result.modified and result.stats["fallbacks"] == {"reduction_below_min": 1}
    assert ir.to_proto(model).SerializeToString() == before
