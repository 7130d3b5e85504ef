"""quant_math against a plain numpy reference and against ORT's QuantizeLinear/DequantizeLinear."""

from __future__ import annotations

import math
import zlib

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt.passes.quantize import math as qm

from helpers import run_ort

LAYOUTS = [(None, None), (1, None), (0, None), (0, 4), (1, 3)]  # (axis, block_size)
TYPES = ["int8", "uint8", "int4", "uint4", "int2", "uint2"]


def _opset(qtype: qm.QuantType, block_size) -> int:
    if qtype.bits == 2:
        return 25
    return 21 if qtype.bits == 4 or block_size else 13


def _qdq_model(qtype, axis, block_size, scale, zero_point, x_shape, opset, q=None) -> onnx.ModelProto:
    """QuantizeLinear -> DequantizeLinear of input x, or (given ``q``) DequantizeLinear of constant q."""
    attrs = {} if axis is None else {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    inits = [
        ir.serde.serialize_tensor(ir.tensor(scale, name="s")),
        ir.serde.serialize_tensor(ir.tensor(zero_point, dtype=qtype.ir_dtype, name="z")),
    ]
    if q is None:  # ORT cannot take 4/2-bit numpy feeds, so quantized data stays inside the model
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs)]
        inputs = [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)]
    else:
        nodes, inputs = [], []
        inits.append(ir.serde.serialize_tensor(ir.tensor(q, dtype=qtype.ir_dtype, name="q")))
    nodes.append(helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs))
    graph = helper.make_graph(
        nodes, "g", inputs, [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, x_shape)],
        initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _reference_quantize(x, scale, zp, qtype, axis, block_size):
    """Element by element, the textbook formula (independent of quant_math's broadcasting)."""
    x = np.asarray(x, np.float32)
    out = np.empty(x.shape, np.int64)
    for index in np.ndindex(x.shape):
        if axis is None:
            sidx = ()
        elif block_size:
            sidx = tuple(i // block_size if d == axis else i for d, i in enumerate(index))
        else:
            sidx = (index[axis],)
        s, z = np.float32(np.asarray(scale)[sidx]), int(np.asarray(zp)[sidx])
        value = np.rint(np.float32(x[index] / s)) + z
        out[index] = min(max(int(value), qtype.qmin), qtype.qmax)
    return out


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("axis,block_size", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_dequantize_match_reference_and_ort(type_name, axis, block_size, symmetric):
    qtype = qm.QuantType.parse(type_name)
    rng = np.random.default_rng(zlib.crc32(repr((type_name, axis, block_size, symmetric)).encode()))
    w = rng.standard_normal((6, 7)).astype(np.float32)
    lo, hi, _ = qm.weight_ranges(w, axis, block_size)
    scale, zp = qm.scale_zero_point(lo, hi, qtype, symmetric)
    x = (w * 1.3).astype(np.float32)  # some values saturate
    q = qm.quantize(x, scale, zp, qtype, axis, block_size)
    assert q.dtype == qtype.np_dtype
    np.testing.assert_array_equal(q.astype(np.int64), _reference_quantize(x, scale, zp, qtype, axis, block_size))
    deq = qm.dequantize(q, scale, zp, qtype, axis, block_size)
    opset = _opset(qtype, block_size)
    (ort_deq,) = run_ort(_qdq_model(qtype, axis, block_size, scale, zp, x.shape, opset, q=q), [])
    np.testing.assert_array_equal(ort_deq, deq)
    (ort_qdq,) = run_ort(_qdq_model(qtype, axis, block_size, scale, zp, x.shape, opset), [x])
    np.testing.assert_array_equal(ort_qdq, deq)


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("axis,block_size", LAYOUTS)
def test_error_inside_range_is_at_most_half_a_step(type_name, axis, block_size):
    qtype = qm.QuantType.parse(type_name)
    w = np.random.default_rng(1).standard_normal((6, 8)).astype(np.float32)
    for symmetric in (True, False):
        q, scale, zp, clipped = qm.quantize_weight(w, qtype, axis, block_size, symmetric)
        assert clipped == 0
        step = qm.dequantize(np.ones_like(q), scale, np.zeros_like(zp), qtype, axis, block_size)
        err = np.abs(qm.dequantize(q, scale, zp, qtype, axis, block_size) - w)
        if qtype.signed and symmetric:  # the most negative code is unused: range edges are exact
            assert np.all(err <= step / 2 * (1 + 1e-5))
        else:  # the zero point is rounded: half a step plus the zero point's rounding
            assert np.all(err <= step * (1 + 1e-5))


def test_round_half_to_even_and_saturation():
    int8 = qm.QuantType.parse("int8")
    q = qm.quantize(np.array([0.5, 1.5, 2.5, -0.5, -2.5, 1000.0, -1000.0], np.float32), 1.0, 0, int8)
    assert q.tolist() == [0, 2, 2, 0, -2, 127, -128]
    uint4 = qm.QuantType.parse("uint4")
    assert qm.quantize(np.array([-3.0, 3.5, 99.0], np.float32), 1.0, 2, uint4).astype(int).tolist() == [0, 6, 15]


@pytest.mark.parametrize("type_name", ["int8", "int4", "int2", "uint8"])
def test_pow2_scales_are_exact_powers_of_two_and_cover_the_range(type_name):
    qtype = qm.QuantType.parse(type_name)
    w = np.random.default_rng(2).standard_normal((5, 9)).astype(np.float32) * 3
    lo, hi, _ = qm.weight_ranges(w, axis=0)
    scale, zp = qm.scale_zero_point(lo, hi, qtype, symmetric=True, pow2=True)
    exponents = np.log2(scale.astype(np.float64))
    np.testing.assert_array_equal(exponents, np.round(exponents))
    plain, _ = qm.scale_zero_point(lo, hi, qtype, symmetric=True)
    assert np.all(scale >= plain) and np.all(scale < 2 * plain)
    if qtype.signed:
        assert np.all(zp == 0)
        q = qm.quantize(w, scale, zp, qtype, axis=0)
        np.testing.assert_array_equal(
            q.astype(np.int64), np.clip(np.rint(w / scale[:, None]), qtype.qmin, qtype.qmax))


def test_scales_include_zero_and_are_never_zero():
    int8 = qm.QuantType.parse("int8")
    scale, zp = qm.scale_zero_point(np.array([0.0, 2.0, -3.0]), np.array([0.0, 5.0, -1.0]), int8, symmetric=False)
    assert np.all(scale > 0)
    assert scale[0] == 1.0
    # [2, 5] widens to [0, 5]: 0 is exactly representable
    assert qm.dequantize(qm.quantize(0.0, scale[1], zp[1], int8), scale[1], zp[1]) == 0.0
    assert qm.quantize(0.0, scale[2], zp[2], int8) == zp[2]


def test_weight_ranges_granularities_and_percentile_clipping():
    w = np.arange(24, dtype=np.float32).reshape(4, 6)
    lo, hi, _ = qm.weight_ranges(w)
    assert (lo, hi) == (0.0, 23.0)
    lo, hi, _ = qm.weight_ranges(w, axis=1)
    assert lo.tolist() == [0, 1, 2, 3, 4, 5] and hi.tolist() == [18, 19, 20, 21, 22, 23]
    lo, hi, _ = qm.weight_ranges(w, axis=1, block_size=4)  # blocks [0:4], [4:6] along axis 1
    assert lo.shape == (4, 2) and lo[:, 1].tolist() == [4, 10, 16, 22] and hi[:, 0].tolist() == [3, 9, 15, 21]
    outliers = np.random.default_rng(3).standard_normal(1000).astype(np.float32)
    outliers[:3] = [40.0, -50.0, 60.0]
    lo, hi, clipped = qm.weight_ranges(outliers, clip_percentile=99.0)
    assert hi < 10 and lo > -10 and clipped == 20  # 1% on each side of 1000 values
    assert qm.weight_ranges(outliers, clip_percentile=None)[2] == 0


def test_quant_type_parse_and_properties():
    assert qm.QuantType.parse("uint4") == qm.QuantType(4, False)
    assert (qm.QuantType(2, True).qmin, qm.QuantType(2, True).qmax) == (-2, 1)
    assert qm.QuantType(4, True).ir_dtype == ir.DataType.INT4
    assert qm.QuantType.parse("int16").np_dtype == np.int16
    with pytest.raises(ValueError):
        qm.QuantType.parse("float8")
    with pytest.raises(ValueError):
        qm.QuantType(3)
    with pytest.raises(ValueError):
        _ = qm.QuantType(1).ir_dtype


def test_pack_bits_round_trip_and_size():
    bits = np.random.default_rng(4).random((3, 7)) > 0.5
    packed = qm.pack_bits(bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(21 / 8)
    np.testing.assert_array_equal(qm.unpack_bits(packed, 21).reshape(3, 7), bits)
    assert qm.pack_bits([True, False, False, False, False, False, False, False, True]).tolist() == [1, 1]


def test_binary_scale_is_mean_abs_per_channel():
    w = np.array([[1.0, -3.0], [0.0, 0.0]], np.float32)
    np.testing.assert_array_equal(qm.binary_scale(w, axis=0), [2.0, 1.0])  # all-zero channel -> 1
