"""quantize-static promote_nodes: the fallback's int16 step, one Q/DQ type per tensor, ORT numerics."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from helpers import op_types
from onnx import numpy_helper
from test_quantize_static import quantize, samples, worst_cosine

from onnxopt import all_nodes, ort_run
from onnxopt.errors import UsageError
from onnxopt.models import builders, sample_feeds
from onnxopt.opset import default_opset
from onnxopt.passes.quantize.static import QuantizeStaticPass

TWO_CONVS = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,6,6] x) => (float[N,16,6,6] y) {
    c1 = Conv<pads = [1,1,1,1]>(x, w1, b1)
    r1 = Relu(c1)
    y = Conv<pads = [1,1,1,1]>(r1, w2, b2)
}"""

# h's channel 0 is 300x louder than the rest and the second MatMul ignores it (row 0 of w2 is
# zero): an 8-bit scale spanning channel 0 leaves the channels that matter a handful of levels.
BADLY_RANGED = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,64] x) => (float[N,3,16] y) {
    h = MatMul(x, w1)
    y = MatMul(h, w2)
}"""


def named(text: str, **weights: np.ndarray) -> ir.Model:
    """Parse ``text``, add ``weights`` as initializers, name node i after its output."""
    proto = onnx.parser.parse_model(text)
    for name, array in weights.items():
        proto.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    for node in proto.graph.node:
        node.name = node.name or f"{node.output[0]}_{node.op_type}"
    return ir.from_proto(proto)


def two_convs() -> ir.Model:
    rng = np.random.default_rng(0)
    return named(TWO_CONVS, w1=rng.standard_normal((16, 8, 3, 3)) / 8, b1=rng.standard_normal(16) / 4,
                 w2=rng.standard_normal((16, 16, 3, 3)) / 12, b2=rng.standard_normal(16) / 4)


def badly_ranged() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((64, 128)) / 8
    w1[:, 0] *= 300
    w2 = rng.standard_normal((128, 16)) / 11
    w2[0] = 0.0
    return named(BADLY_RANGED, w1=w1, w2=w2), w1.astype(np.float32), w2.astype(np.float32)


def qdq_type(value: ir.Value) -> ir.DataType:
    """The integer type of the Q/DQ pair a consumer reads ``value`` through."""
    dq = value.producer()
    assert dq is not None and dq.op_type == "DequantizeLinear", value.name
    return dq.inputs[0].dtype


def quantize_type_of(model: ir.Model, tensor: str) -> ir.DataType:
    """The type the QuantizeLinear of float tensor ``tensor`` produces."""
    q = next(n for n in all_nodes(model) if n.op_type == "QuantizeLinear" and n.inputs[0].name.startswith(tensor))
    return q.outputs[0].dtype


def default_session(model: ir.Model) -> ort.InferenceSession:
    """ORT as a deployment would open it: all optimizations, default config (MatMulNBits accuracy level 4)."""
    return ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])


def sqnr_db(reference: np.ndarray, got: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - got) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / noise))


def test_promoted_conv_reads_and_writes_int16_and_keeps_8bit_weights():
    model = two_convs()
    before = model.clone()
    feeds = samples((2, 8, 6, 6))
    result = quantize(model, feeds, promote_nodes=("^y_Conv$",))
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear", "Conv",
                               "Relu", "QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear",
                               "Conv", "QuantizeLinear", "DequantizeLinear"]
    first, second = (n for n in model.graph if n.op_type == "Conv")
    assert qdq_type(first.inputs[0]) == ir.DataType.UINT8  # x: read by the unpromoted Conv only
    assert qdq_type(second.inputs[0]) == ir.DataType.INT16  # r1: written by c1, read by the promoted Conv
    assert qdq_type(model.graph.outputs[0]) == ir.DataType.INT16
    assert qdq_type(second.inputs[1]) == ir.DataType.INT8  # int8 weights, float Conv between int16 Q/DQ
    assert qdq_type(second.inputs[2]) == ir.DataType.INT32
    assert default_opset(model) == 21 and result.stats["opset_upgraded"] == "17->21"
    assert result.stats["promoted_nodes"] == ["y_Conv"]
    assert result.stats["quantized_nodes"] == ["c1_Conv", "y_Conv"]
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.999


def test_a_tensor_shared_with_a_promoted_node_and_its_concat_group_take_int16():
    proto = builders.build_cnn()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}_{node.op_type}"
    model = ir.from_proto(proto)
    before = model.clone()
    feeds = sample_feeds("cnn", 6)
    result = quantize(model, feeds, promote_nodes=("^n9_Conv$",))  # branch_a; branch_b (n11) reads the same input
    assert result.stats["promoted_nodes"] == ["n9_Conv"]
    branch_a, branch_b = (n for n in model.graph if n.name in ("n9_Conv", "n11_Conv"))
    assert branch_a.inputs[0] is branch_b.inputs[0]  # one Q/DQ pair for the shared input: int16 for both
    assert qdq_type(branch_a.inputs[0]) == ir.DataType.INT16
    concat = next(n for n in model.graph if n.op_type == "Concat")
    assert {qdq_type(v) for v in concat.inputs} == {ir.DataType.INT16}  # bb_act too: one scale per group
    assert quantize_type_of(model, "joined") == ir.DataType.INT16
    assert quantize_type_of(model, "image") == ir.DataType.UINT8
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.99


def test_promotion_recovers_a_badly_ranged_tensor_in_ort():
    feeds = samples((4, 3, 64), count=8)
    _, w1, w2 = badly_ranged()
    want = np.concatenate([f["x"] @ w1 @ w2 for f in feeds])  # numpy math of the float model
    got = {}
    for label, options in (("int8", {}), ("promoted", {"promote_nodes": ("^y_MatMul$",)})):
        model = badly_ranged()[0]
        result = quantize(model, feeds, **options)
        assert result.stats["ops_quantized"] == {"MatMul": 2}
        for session in (ort_run.make_session(model), default_session(model)):
            got.setdefault(label, []).append(sqnr_db(want, np.concatenate([session.run(None, f)[0] for f in feeds])))
        if label == "promoted":
            second = next(n for n in model.graph if n.name == "y_MatMul")
            assert qdq_type(second.inputs[0]) == ir.DataType.INT16
            assert qdq_type(second.inputs[1]) == ir.DataType.INT16  # int8 would become MatMulNBits: x back to 8 bits
    assert max(got["int8"]) < 5 and min(got["promoted"]) > max(got["int8"]) + 20  # measured: 0.2 dB -> 38.7 dB


def test_promotion_ladder_and_refusals():
    assert QuantizeStaticPass().promotion_ladder() == [({}, "int16 activations")]
    assert QuantizeStaticPass(activation_type="int16").promotion_ladder() == []
    with pytest.raises(UsageError, match="no higher precision"):
        QuantizeStaticPass(activation_type="int16", promote_nodes=("y_Conv",))
    with pytest.raises(UsageError, match="bad regular expression"):
        QuantizeStaticPass(promote_nodes=("(",))
    with pytest.raises(UsageError, match="promote_nodes matched no node"):
        quantize(two_convs(), samples((2, 8, 6, 6)), promote_nodes=("no_such_node",))


def test_without_promote_nodes_nothing_is_int16_and_the_opset_stays():
    model = two_convs()
    result = quantize(model, samples((2, 8, 6, 6)))
    assert result.stats["promoted_nodes"] == [] and default_opset(model) == 17
    assert all(n.outputs[0].dtype == ir.DataType.UINT8 for n in model.graph if n.op_type == "QuantizeLinear")


def test_promoted_tensors_are_not_clipped_by_percentile_calibration():
    feeds = samples((4, 3, 64), count=8)
    feeds[3]["x"][0, 0, 0] = 40.0  # one outlier among ~6000 values: percentile 99 clips it
    peak, low = max(float(f["x"].max()) for f in feeds), min(float(f["x"].min()) for f in feeds)

    def input_scale(model: ir.Model) -> tuple[float, ir.DataType]:
        first = next(n for n in model.graph if n.name == "h_MatMul")
        dq = first.inputs[0].producer()
        return float(dq.inputs[1].const_value.numpy()), dq.inputs[0].dtype

    clipped = badly_ranged()[0]
    quantize(clipped, feeds, calibration="percentile", percentile=99.0)
    scale, dtype = input_scale(clipped)
    assert dtype == ir.DataType.UINT8 and scale * 255 < (peak - low) * 0.9  # the outlier saturates
    promoted = badly_ranged()[0]
    result = quantize(promoted, feeds, calibration="percentile", percentile=99.0, promote_nodes=("^h_MatMul$",))
    assert result.stats["promoted_nodes"] == ["h_MatMul"]
    scale, dtype = input_scale(promoted)
    assert dtype == ir.DataType.INT16 and scale * 65535 >= (peak - low) * 0.999  # minmax: nothing clipped
