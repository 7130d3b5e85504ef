"""quantize-weights on weights behind data-movement ops (Slice/Concat/Transpose/... chains, LSTM weights
in If bodies), and the promote_nodes fallback precision (8-bit weights for chosen consumers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import random_feeds, run_ort
from onnx import numpy_helper

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_nodes
from onnxopt.model_io import load_model, save_model
from onnxopt.models import zoo
from onnxopt.models.feeds import sample_feeds
from onnxopt.passes.quantize import math as qm
from onnxopt.passes.quantize.weights import QuantizeWeightsPass
from onnxopt.passes.quantize.weights_store import stored_constants
from test_quantize_weights import quantize, with_weights

# An exported LSTM, as in silero-vad: the gate rows of W (a Constant node of the outer graph) and of
# R (an initializer) are reordered with Slice/Concat inside the then-branch, then unsqueezed to
# [1, 4*hidden, input]; the else-branch reads its own W2 directly.
LSTM_IN_IF = """<ir_version: 8, opset_import: ["" : 17]>
g (float[5,1,32] x, bool c) => (float[5,1,1,16] y) <int64[1] zero = {0}, int64[1] q1 = {16},
                                                 int64[1] q3 = {48}, int64[1] q4 = {64}> {
    y = If(c) <
        then_branch = t () => (float[5,1,1,16] a) {
            w_i = Slice(w, zero, q1, zero)
            w_o = Slice(w, q3, q4, zero)
            w_fc = Slice(w, q1, q3, zero)
            w_ifc = Concat<axis = 0>(w_i, w_o, w_fc)
            w_3d = Unsqueeze(w_ifc, zero)
            r_i = Slice(r, zero, q1, zero)
            r_o = Slice(r, q3, q4, zero)
            r_fc = Slice(r, q1, q3, zero)
            r_ifc = Concat<axis = 0>(r_i, r_o, r_fc)
            r_3d = Unsqueeze(r_ifc, zero)
            [rnn] a = LSTM<hidden_size = 16>(x, w_3d, r_3d)
        },
        else_branch = e () => (float[5,1,1,16] b) {
            [rnn_direct] b = LSTM<hidden_size = 16>(x, w2, r3)
        }>
}"""


def lstm_in_if() -> ir.Model:
    proto = onnx.parser.parse_model(LSTM_IN_IF)
    rng = np.random.default_rng(0)
    arrays = {"w": (64, 32), "r": (64, 16), "w2": (1, 64, 32), "r3": (1, 64, 16)}
    arrays = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32) for name, shape in arrays.items()}
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(arrays["w"])))
    proto.graph.initializer.extend(numpy_helper.from_array(arrays[n], n) for n in ("r", "w2", "r3"))
    return ir.from_proto(proto)


def chain_model(body: str, opset: int = 17, **shapes) -> ir.Model:
    """A one-input graph ``x -> ... -> y`` with seeded float initializers of the given shapes."""
    return with_weights("""<ir_version: 10, opset_import: ["" : OPSET]>
        g (float[4,64] x) => (float[4,48] y) <int64[1] zero = {0}, int64[2] flat = {64, 48}> { BODY }"""
                        .replace("BODY", body), opset, seed=1, **shapes)


def dequantize_node(model: ir.Model, weight: str) -> ir.Node:
    name = f"{weight}_dequantized"
    return next(n for n in all_nodes(model) if n.op_type == "DequantizeLinear" and n.outputs[0].name == name)


def stored(model: ir.Model) -> dict[str, np.ndarray]:
    return {value.name: tensor.numpy() for _, value, _, tensor in stored_constants(model)}


def with_weights_replaced(model: ir.Model, arrays: dict[str, np.ndarray]) -> ir.Model:
    """``model`` with these stored weights (initializers or Constant nodes) set to other float values."""
    copy = model.clone()
    for _, value, node, _ in stored_constants(copy):
        if value.name in arrays:
            tensor = ir.tensor(arrays[value.name], name=value.name)
            if node is None:
                value.const_value = tensor
            else:
                node.attributes["value"] = ir.AttrTensor("value", tensor)
    return copy


def numpy_dequantized(model: ir.Model, weight: str) -> np.ndarray:
    """What DequantizeLinear computes for ``weight``, in numpy (int8, symmetric)."""
    node = dequantize_node(model, weight)
    arrays = stored(model)
    axis = node.attributes["axis"].as_int() if "axis" in node.attributes else None
    q, scale = arrays[f"{weight}_quantized"], arrays[f"{weight}_scale"]
    return qm.dequantize(q, scale, None, qm.QuantType(8, True), axis).astype(np.float32)


def lstm_feeds(c: bool) -> dict[str, np.ndarray]:
    x = np.random.default_rng(2).standard_normal((5, 1, 32)).astype(np.float32)
    return {"x": x, "c": np.array(c)}


def test_lstm_weights_behind_slice_concat_unsqueeze_in_an_if_body_are_dequantized_where_stored():
    model = lstm_in_if()
    before = model.clone()
    result = quantize(model)
    assert result.modified and result.stats["skipped"] == {}
    assert result.stats["weights_quantized"] == 4  # w, r (through the chains), w2, r3 (read directly)
    assert result.stats["quantized_nodes"] == ["rnn", "rnn_direct"]
    # the DequantizeLinear sits right after the stored weight, in the outer graph; the Slices read it
    slices = [n for n in all_nodes(model) if n.op_type == "Slice"]
    assert {n.inputs[0].name for n in slices} == {"w_dequantized", "r_dequantized"}
    assert all(dequantize_node(model, name).graph is model.graph for name in ("w", "r", "w2", "r3"))
    # one scale per gate row: LSTM's output-channel axis 1 traced back through Unsqueeze to axis 0
    arrays = stored(model)
    assert dequantize_node(model, "w").attributes["axis"].as_int() == 0 and arrays["w_scale"].shape == (64,)
    assert dequantize_node(model, "w2").attributes["axis"].as_int() == 1 and arrays["w2_scale"].shape == (64,)
    assert not {"w", "r", "w2", "r3"} & set(arrays)  # the float originals are gone
    # exact: the quantized model computes what the original computes with numpy-dequantized weights
    dequantized = {name: numpy_dequantized(model, name) for name in ("w", "r", "w2", "r3")}
    reference = with_weights_replaced(before, dequantized)
    for c in (True, False):
        got = run_ort(model, lstm_feeds(c))[0]
        np.testing.assert_allclose(got, run_ort(reference, lstm_feeds(c))[0], atol=1e-5)
        want = run_ort(before, lstm_feeds(c))[0]
        assert np.abs(want - got).max() < 0.04 * np.abs(want).max()  # int8, 5 recurrent steps
    assert not quantize(model).modified  # weights behind DequantizeLinear are never quantized again


def test_blocked_granularity_blocks_along_the_traced_reduction_axis():
    model = lstm_in_if()
    before = model.clone()
    quantize(model, bits=4, granularity="blocked", block_size=16)
    node = dequantize_node(model, "w")
    assert node.attributes["axis"].as_int() == 1 and node.attributes["block_size"].as_int() == 16
    assert stored(model)["w_scale"].shape == (64, 2)  # input_size 32 in blocks of 16
    for c in (True, False):
        want, got = run_ort(before, lstm_feeds(c))[0], run_ort(model, lstm_feeds(c))[0]
        assert np.abs(want - got).max() < 0.3 * np.abs(want).max()


@pytest.mark.parametrize("body,shapes,axis,scales", [
    # Transpose then Gemm(transB): Gemm's channel axis 0 is the stored weight's axis 1
    ("wt = Transpose<perm = [1, 0]>(w)  y = Gemm<transB = 1>(x, wt)", {"w": (64, 48)}, 1, 48),
    # Squeeze: MatMul's channel axis 1 is the stored weight's axis 2
    ("ws = Squeeze(w, zero)  y = MatMul(x, ws)", {"w": (1, 64, 48)}, 2, 48),
    # Reshape hides the axes: per channel along the stored axis 0
    ("wr = Reshape(w, flat)  y = MatMul(x, wr)", {"w": (48, 64)}, 0, 48),
    # Split into two halves along the output channels, each read by a MatMul
    ("wa, wb = Split<axis = 1>(w)  a = MatMul(x, wa)  b = MatMul(x, wb)  y = Concat<axis = 1>(a, b)",
     {"w": (64, 48)}, 1, 48),
])
def test_the_quantization_axis_follows_the_consumers_output_channels_through_the_chain(body, shapes, axis, scales):
    model = chain_model(body, **shapes)
    before = model.clone()
    result = quantize(model)
    assert result.modified and result.stats["weights_quantized"] == 1
    node = dequantize_node(model, "w")
    assert node.attributes["axis"].as_int() == axis and stored(model)["w_scale"].shape == (scales,)
    reference = with_weights_replaced(before, {"w": numpy_dequantized(model, "w")})
    feeds = random_feeds(before)
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(reference, feeds)[0], atol=1e-5)


def test_reshape_makes_blocked_fall_back_to_per_channel_on_axis_0():
    model = chain_model("wr = Reshape(w, flat)  y = MatMul(x, wr)", w=(48, 64))
    quantize(model, bits=4, granularity="blocked")
    node = dequantize_node(model, "w")
    assert node.attributes["axis"].as_int() == 0 and "block_size" not in node.attributes


def test_weight_shared_by_two_chains_is_quantized_once():
    body = "wt = Transpose<perm = [1, 0]>(w)  a = Gemm<transB = 1>(x, wt)  b = MatMul(x, w)  y = Add(a, b)"
    model = chain_model(body, w=(64, 48))
    before = model.clone()
    result = quantize(model)
    assert result.stats["weights_quantized"] == 1 and result.stats["quantized_nodes"] == ["Gemm_0", "MatMul_0"]
    assert [n.op_type for n in all_nodes(model)].count("DequantizeLinear") == 1
    assert dequantize_node(model, "w").attributes["axis"].as_int() == 1  # both consumers agree
    reference = with_weights_replaced(before, {"w": numpy_dequantized(model, "w")})
    feeds = random_feeds(before)
    np.testing.assert_allclose(run_ort(model, feeds)[0], run_ort(reference, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("body,reason", [
    ("wt = Transpose<perm = [1, 0]>(w)  a = Gemm<transB = 1>(x, wt)  b = Add(wt, wt)  s = ReduceSum(b)  y = Add(a, s)",
     "also used by Add"),
    ("wt = Transpose<perm = [1, 0]>(w)  a = Gemm<transB = 1>(x, wt)  y = Identity(a)  z = Identity(wt)",
     "reaches graph output 'z'"),
])
def test_chain_with_a_non_weight_use_is_left_float_with_a_reason(body, reason):
    text_outputs = ", float[48,64] z" if "z =" in body else ""
    proto = onnx.parser.parse_model(f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,64] x) => (float[4,48] y{text_outputs}) {{ {body} }}""")
    proto.graph.initializer.append(numpy_helper.from_array(np.ones((64, 48), np.float32), "w"))
    model = ir.from_proto(proto)
    result = quantize(model)
    assert not result.modified and reason in result.stats["skipped"]["w"]
    assert "w" in model.graph.initializers


def test_selectors_address_the_consumers_at_the_end_of_the_chain():
    body = "wt = Transpose<perm = [1, 0]>(w)  [g] a = Gemm<transB = 1>(x, wt)  [m] b = MatMul(x, w)  y = Add(a, b)"
    some = quantize(chain_model(body, w=(64, 48)), nodes=("^g$",))
    assert not some.modified and "consumer MatMul 'm' is not selected" in some.stats["skipped"]["w"]
    none = quantize(chain_model(body, w=(64, 48)), ops=("Conv", "Add"))  # matches nodes, but no consumer
    assert not none.modified and none.stats["skipped"] == {}
    both = quantize(chain_model(body, w=(64, 48)), ops=("Gemm", "MatMul"))
    assert both.stats["weights_quantized"] == 1 and both.stats["quantized_nodes"] == ["g", "m"]
    excluded = quantize(chain_model(body, w=(64, 48)), exclude_nodes=("^m$",))
    assert not excluded.modified and "'m' is not selected" in excluded.stats["skipped"]["w"]


def test_min_elements_applies_to_the_stored_weight():
    result = QuantizeWeightsPass(min_elements=4096)(lstm_in_if())
    assert result.stats["skipped"] == {n: f"{size} elements < min_elements=4096"
                                       for n, size in (("w", 2048), ("r", 1024), ("w2", 2048), ("r3", 1024))}


# -- promote_nodes -------------------------------------------------------------------------
def mlp() -> ir.Model:
    return chain_model("[first] h = MatMul(x, w1)  [second] y = MatMul(h, w2)", opset=21, w1=(64, 64), w2=(64, 48))


def dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    return {value.name: tensor.dtype for _, value, _, tensor in stored_constants(model)
            if value.name.endswith("_quantized")}


def test_promoted_consumers_get_8_bit_weights_and_are_reported():
    model = mlp()
    before = model.clone()
    result = quantize(model, bits=4, granularity="blocked", promote_nodes=("^second$",))
    assert dtypes(model) == {"w1_quantized": ir.DataType.INT4, "w2_quantized": ir.DataType.INT8}
    assert dequantize_node(model, "w2").attributes["block_size"].as_int() == 32  # same granularity
    assert result.stats["promoted_nodes"] == ["second"]
    assert result.stats["quantized_nodes"] == ["first", "second"]
    feeds = random_feeds(before)
    want, got = run_ort(before, feeds)[0], run_ort(model, feeds)[0]
    assert np.abs(want - got).max() < 0.25 * np.abs(want).max()


def test_a_weight_shared_with_a_promoted_consumer_takes_8_bits():
    body = "wt = Transpose<perm = [1, 0]>(w)  [g] a = Gemm<transB = 1>(x, wt)  [m] b = MatMul(x, w)  y = Add(a, b)"
    model = chain_model(body, w=(64, 48))
    result = quantize(model, bits=2, promote_nodes=("^m$",))
    assert dtypes(model) == {"w_quantized": ir.DataType.INT8}
    assert result.stats["promoted_nodes"] == ["g", "m"]  # both compute with the 8-bit weight


def test_one_bit_promotes_to_int8_per_channel():
    model = mlp()
    before = model.clone()
    result = quantize(model, bits=1, granularity="per-tensor", promote_nodes=("^first$",))
    assert dtypes(model) == {"w1_quantized": ir.DataType.INT8}  # w2 is stored as packed sign bits
    assert dequantize_node(model, "w1").attributes["axis"].as_int() == 1
    assert result.stats["promoted_nodes"] == ["first"]
    run_ort(model, random_feeds(before))


def test_eight_bit_promotes_to_int16_and_the_noise_drops():
    model = mlp()
    before = model.clone()
    result = quantize(model, bits=8, promote_nodes=("^first$",))
    assert dtypes(model) == {"w1_quantized": ir.DataType.INT16, "w2_quantized": ir.DataType.INT8}
    assert result.stats["promoted_nodes"] == ["first"] and model.opset_imports[""] >= 21
    feeds = random_feeds(before)
    both_int16 = quantize(mlp(), bits=8, promote_nodes=("first", "second"))
    assert both_int16.stats["promoted_nodes"] == ["first", "second"]
    want = run_ort(before, feeds)[0]
    errors = [np.abs(run_ort(m, feeds)[0] - want).max() for m in (model, both_int16.model)]
    assert errors[1] < errors[0] / 50  # 16-bit weights everywhere: noise ~256x lower


def test_promotion_ladder_and_refusals():
    labels = {bits: [label for _, label in QuantizeWeightsPass(bits=bits).promotion_ladder()] for bits in (1, 4, 8)}
    assert labels == {1: ["8-bit weights", "16-bit weights"], 4: ["8-bit weights", "16-bit weights"],
                      8: ["16-bit weights"]}
    with pytest.raises(UsageError, match="promote_bits must be"):
        QuantizeWeightsPass(bits=8, promote_bits=8)
    with pytest.raises(UsageError, match="promote_nodes matched no node"):
        quantize(mlp(), bits=4, promote_nodes=("^nowhere$",))
    with pytest.raises(UsageError, match="bad regular expression"):
        quantize(mlp(), bits=4, promote_nodes=("(",))


def test_promotion_on_external_weights_stays_lazy_and_matches_the_eager_path(tmp_path: Path):
    path = tmp_path / "in" / "m.onnx"
    path.parent.mkdir()
    ir.save(mlp(), path, external_data="m.onnx.data", size_threshold_bytes=0)
    deferred, immediate = load_model(path), ir.external_data.load_to_model(load_model(path))
    options = dict(bits=4, promote_nodes=("^first$",))
    stats = [quantize(m, **options).stats for m in (deferred, immediate)]
    assert stats[0] == stats[1] and stats[0]["promoted_nodes"] == ["first"]
    assert isinstance(deferred.graph.initializers["w1_quantized"].const_value, ir.LazyTensor)
    assert dtypes(deferred) == {"w1_quantized": ir.DataType.INT8, "w2_quantized": ir.DataType.INT4}
    saved = []
    for label, model in (("deferred", deferred), ("immediate", immediate)):
        save_model(model, tmp_path / label / "q.onnx", external_data=True)
        saved.append(ir.external_data.load_to_model(load_model(tmp_path / label / "q.onnx")))
    for name, value in saved[0].graph.initializers.items():
        other = saved[1].graph.initializers[name].const_value
        assert value.const_value.tobytes() == other.tobytes(), name
    feeds = random_feeds(saved[0])
    np.testing.assert_array_equal(run_ort(saved[0], feeds)[0], run_ort(saved[1], feeds)[0])


# -- the real model --------------------------------------------------------------------------
@pytest.mark.zoo
@pytest.mark.parametrize("name", ["silero_vad", "silero_vad_op15"])
def test_silero_lstm_weights_behind_slices_are_quantized(name, tmp_path: Path):
    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    model, reference = ir.load(path), ir.load(path)
    result = QuantizeWeightsPass()(model)
    lstms = [n.name for n in all_nodes(model) if n.op_type == "LSTM"]
    assert lstms and set(lstms) <= set(result.stats["quantized_nodes"])
    float_left = [v.name for _, v, _, t in stored_constants(model) if t.dtype == ir.DataType.FLOAT and t.size >= 1024]
    assert float_left == []
    out = tmp_path / "q.onnx"
    ir.save(model, out)
    assert out.stat().st_size < 0.35 * path.stat().st_size
    for feed in sample_feeds(name, 8, seed=1):
        want, got = run_ort(reference, feed)[0], run_ort(model, feed)[0]
        assert np.abs(want - got).max() < 0.05
        assert (want > 0.5) == (got > 0.5)


def test_promoted_weights_are_not_clipped():
    model = mlp()
    w1 = model.graph.initializers["w1"].const_value.numpy().copy()
    w1[0, 0] = 40.0  # one outlier: percentile 90 clips it
    model.graph.initializers["w1"].const_value = ir.tensor(w1, name="w1")
    result = quantize(model, bits=4, clip="percentile:90", promote_nodes=("^first$",))
    assert result.stats["clipped"]["w1"] == 0 and result.stats["clipped"]["w2"] > 0
    scale = dequantize_node(model, "w1").inputs[1].const_value.numpy()
    assert scale.reshape(-1)[0] * 127 >= 40.0 * 0.999  # 8-bit range reaches the outlier
