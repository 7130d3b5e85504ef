"""prune-channels: tiny before/after graphs checked in ORT, plus the bundled real classifier.

Most cases plant the weakest channels as exact zeros (weights and bias): removing them must
then leave the outputs unchanged, which checks that the right slices of every dependent
tensor went and nothing else did.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import UsageError
from onnxopt.pass_base import PassContext
from onnxopt.passes.prune import PruneChannelsPass
from tests.helpers import assert_same_outputs, run_ort

RNG = np.random.default_rng(0)


def conv_w(m, c, k=3, zero=()):
    w = RNG.standard_normal((m, c, k, k)).astype(np.float32)
    w[list(zero)] = 0
    return w


def bias(m, zero=()):
    b = RNG.standard_normal(m).astype(np.float32)
    b[list(zero)] = 0
    return b


def build(nodes, inits: dict, inputs=(("x", (1, 4, 8, 8)),), outputs=("y",), opset=17) -> ir.Model:
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def conv(x, w, b, y, group=1, name=None):
    return helper.make_node("Conv", [x, w, b], [y], pads=[1, 1, 1, 1] if group else None, group=group,
                            name=name or y)


def shape_of(model: ir.Model, name: str) -> tuple:
    return tuple(model.graph.initializers[name].const_value.shape)


def prune(model, **options):
    before = model.clone()
    result = PruneChannelsPass(**options)(model)
    return before, result


def test_residual_add_group_is_pruned_together():
    dead = (1, 3, 5, 7)
    model = build([
        conv("x", "wa", "ba", "a"), helper.make_node("Relu", ["a"], ["ra"]),
        conv("ra", "wb", "bb", "b"), helper.make_node("Add", ["ra", "b"], ["s"]),
        conv("s", "wc", "bc", "y"),
    ], {"wa": conv_w(8, 4, zero=dead), "ba": bias(8, dead), "wb": conv_w(8, 8, zero=dead), "bb": bias(8, dead),
        "wc": conv_w(6, 8), "bc": bias(6)})
    before, result = prune(model, ratio=0.5)
    assert result.modified
    assert shape_of(model, "wa") == (4, 4, 3, 3) and shape_of(model, "wb") == (4, 4, 3, 3)
    assert shape_of(model, "wc") == (6, 4, 3, 3)
    assert result.stats["per_layer"] == {"a": (8, 4), "b": (8, 4), "y": (6, 6)}
    assert_same_outputs(before, model)


def test_concat_branches_keep_their_offsets():
    model = build([
        conv("x", "wa", "ba", "a"), conv("x", "wb", "bb", "b"),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1), conv("c", "wc", "bc", "y"),
    ], {"wa": conv_w(4, 4, zero=(1, 3)), "ba": bias(4, (1, 3)), "wb": conv_w(6, 4, zero=(0, 2, 4)),
        "bb": bias(6, (0, 2, 4)), "wc": conv_w(5, 10), "bc": bias(5)})
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "wc") == (5, 5, 3, 3)
    assert_same_outputs(before, model)


def test_split_sizes_follow_the_removed_channels():
    model = build([
        conv("x", "wa", "ba", "a"),
        helper.make_node("Split", ["a", "sizes"], ["p", "q"], axis=1),
        conv("p", "wp", "bp", "y1"), conv("q", "wq", "bq", "y2"),
    ], {"wa": conv_w(8, 4, zero=(0, 5, 6, 7)), "ba": bias(8, (0, 5, 6, 7)), "sizes": np.array([4, 4], np.int64),
        "wp": conv_w(3, 4), "bp": bias(3), "wq": conv_w(3, 4), "bq": bias(3)}, outputs=("y1", "y2"))
    before, result = prune(model, ratio=0.5)
    split = next(n for n in model.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [3, 1]
    assert shape_of(model, "wq") == (3, 1, 3, 3)
    assert_same_outputs(before, model)


def test_depthwise_conv_passes_channels_through_and_shrinks_its_group():
    dead = (0, 2, 4, 6)
    dw = conv_w(8, 1)
    model = build([
        conv("x", "wa", "ba", "a"), conv("a", "wd", "bd", "d", group=8),
        conv("d", "wc", "bc", "y"),
    ], {"wa": conv_w(8, 4, zero=dead), "ba": bias(8, dead), "wd": dw, "bd": bias(8, dead),
        "wc": conv_w(6, 8), "bc": bias(6)})
    before, result = prune(model, ratio=0.5)
    node = next(n for n in model.graph if n.outputs[0].name == "d")
    assert node.attributes["group"].as_int() == 4 and shape_of(model, "wd") == (4, 1, 3, 3)
    assert_same_outputs(before, model)


def test_grouped_conv_loses_an_equal_count_per_group():
    model = build([
        conv("x", "wg", "bg", "g", group=2), conv("g", "wc", "bc", "y"),
    ], {"wg": RNG.standard_normal((8, 2, 3, 3)).astype(np.float32), "bg": bias(8), "wc": conv_w(6, 8), "bc": bias(6)})
    model.graph.initializers["wg"].const_value.numpy()  # materialize
    w = model.graph.initializers["wg"].const_value.numpy().copy()
    w[[0, 1, 4, 5]] *= 1e-3  # the two weakest of each group of four
    model.graph.initializers["wg"].const_value = ir.tensor(w, name="wg")
    before, result = prune(model, ratio=0.5)
    node = next(n for n in model.graph if n.outputs[0].name == "g")
    assert node.attributes["group"].as_int() == 2 and shape_of(model, "wg") == (4, 2, 3, 3)
    assert shape_of(model, "wc") == (6, 4, 3, 3)
    assert run_ort(model, {"x": np.ones((1, 4, 8, 8), np.float32)})[0].shape == (1, 6, 8, 8)


def test_grouped_conv_input_is_a_group_left_whole():
    model = build([
        conv("x", "wa", "ba", "a"), conv("a", "wg", "bg", "y", group=2),
    ], {"wa": conv_w(8, 4), "ba": bias(8), "wg": RNG.standard_normal((4, 4, 3, 3)).astype(np.float32), "bg": bias(4)})
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "wa") == (8, 4, 3, 3)
    assert any("grouped Conv" in reason for reason in result.stats["groups_kept_whole"])
    assert_same_outputs(before, model)


def test_matmul_chain_prunes_features_through_bias_and_relu():
    w1 = RNG.standard_normal((16, 12)).astype(np.float32)
    b1 = RNG.standard_normal(12).astype(np.float32)
    w1[:, 6:] = 0
    b1[6:] = 0
    w2 = RNG.standard_normal((12, 10)).astype(np.float32)
    b2 = RNG.standard_normal(10).astype(np.float32)
    w2[:, ::2] = 0
    b2[::2] = 0
    model = build([
        helper.make_node("MatMul", ["x", "w1"], ["h1"]), helper.make_node("Add", ["h1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("MatMul", ["r1", "w2"], ["h2"]),
        helper.make_node("Add", ["h2", "b2"], ["a2"]), helper.make_node("MatMul", ["a2", "w3"], ["y"]),
    ], {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": RNG.standard_normal((10, 4)).astype(np.float32)},
        inputs=(("x", (3, 16)),))
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "w1") == (16, 6) and shape_of(model, "b1") == (6,)
    assert shape_of(model, "w2") == (6, 5) and shape_of(model, "w3") == (5, 4)
    assert_same_outputs(before, model)


def test_shared_weight_is_pruned_once_for_both_layers():
    dead = (0, 1, 2, 3)
    model = build([
        conv("x", "w", "b", "a1", name="c1"), conv("x2", "w", "b", "a2", name="c2"),
        conv("a1", "wc1", "bc1", "y1"), conv("a2", "wc2", "bc2", "y2"),
    ], {"w": conv_w(8, 4, zero=dead), "b": bias(8, dead), "wc1": conv_w(3, 8), "bc1": bias(3),
        "wc2": conv_w(3, 8), "bc2": bias(3)}, inputs=(("x", (1, 4, 8, 8)), ("x2", (1, 4, 8, 8))),
        outputs=("y1", "y2"))
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "w") == (4, 4, 3, 3)
    assert shape_of(model, "wc1") == (3, 4, 3, 3) and shape_of(model, "wc2") == (3, 4, 3, 3)
    assert_same_outputs(before, model)


def _if_model() -> ir.Model:
    then = helper.make_graph([helper.make_node("Relu", ["a"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", ["a"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    return build([
        conv("x", "wa", "ba", "a"), helper.make_node("If", ["cond"], ["i"], then_branch=then, else_branch=other),
        conv("i", "wc", "bc", "y"),
        conv("x", "wp", "bp", "p"), helper.make_node("Relu", ["p"], ["rp"]), conv("rp", "wq", "bq", "y2"),
    ], {"wa": conv_w(8, 4), "ba": bias(8), "wc": conv_w(3, 8), "bc": bias(3), "cond": np.array(True),
        "wp": conv_w(8, 4), "bp": bias(8), "wq": conv_w(3, 8), "bq": bias(3)}, outputs=("y", "y2"))


def test_channels_read_inside_an_if_body_stay_whole_and_the_rest_is_pruned():
    model = _if_model()
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "wa") == (8, 4, 3, 3)  # read by the If branches
    assert shape_of(model, "wp") == (4, 4, 3, 3)
    assert any("subgraph" in reason for reason in result.stats["groups_kept_whole"])
    assert "subgraph_layers_not_pruned" not in result.stats  # the bodies hold no layer
    feeds = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    want, got = run_ort(before, feeds), run_ort(model, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)  # the If path is untouched
    assert got[1].shape == want[1].shape


def _dead_model() -> ir.Model:
    wa = conv_w(8, 4, zero=(2,))
    ba = bias(8, (2,))
    gamma, beta = np.ones(8, np.float32), RNG.standard_normal(8).astype(np.float32)
    gamma[5], beta[5] = 0, 0  # BN scale and shift zero: channel 5 is zero after BN
    beta[2] = 0  # channel 2 is zero out of the Conv and BN keeps it zero
    wc = conv_w(6, 8)
    wc[:, 7] = 0  # channel 7 is ignored by its only consumer
    return build([
        conv("x", "wa", "ba", "a"),
        helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]), conv("r", "wc", "bc", "y"),
    ], {"wa": wa, "ba": ba, "g": gamma, "be": beta, "mu": np.zeros(8, np.float32), "var": np.ones(8, np.float32),
        "wc": wc, "bc": bias(6)})


def test_lossless_removes_only_planted_dead_channels_bit_identically():
    model = _dead_model()
    _ = model.graph.initializers["be"].const_value.numpy()
    before, result = prune(model, lossless=True)
    assert result.modified and result.stats["per_layer"]["a"] == (8, 5)
    assert PruneChannelsPass(lossless=True).fidelity.value == "lossless"
    feeds = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}
    for want, got in zip(run_ort(before, feeds), run_ort(model, feeds)):
        assert np.array_equal(want, got)
    assert not PruneChannelsPass(lossless=True)(model).modified  # nothing dead is left


def test_lossless_keeps_a_channel_that_is_zero_before_batchnorm_shifts_it():
    model = build([
        conv("x", "wa", "ba", "a"),
        helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["n"]), conv("n", "wc", "bc", "y"),
    ], {"wa": conv_w(4, 4, zero=(1,)), "ba": bias(4, (1,)), "g": np.ones(4, np.float32),
        "be": np.full(4, 0.5, np.float32), "mu": np.zeros(4, np.float32), "var": np.ones(4, np.float32),
        "wc": conv_w(2, 4), "bc": bias(2)})
    _, result = prune(model, lossless=True)
    assert not result.modified


def _redundant_model():
    base = RNG.standard_normal((4, 4, 3, 3)).astype(np.float32)
    wa = np.concatenate([base, 0.3 * base])  # channels 4..7 are 0.3 x channels 0..3
    return build([conv("x", "wa", "ba", "a"), conv("a", "wc", "bc", "y")],
                 {"wa": wa, "ba": np.zeros(8, np.float32), "wc": conv_w(5, 8), "bc": bias(5)})


def test_reconstruction_beats_plain_removal_on_redundant_channels():
    feeds = [{"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    errors = {}
    for reconstruct in (False, True):
        model = _redundant_model()
        before = model.clone()
        result = PruneChannelsPass(ratio=0.5, reconstruct=reconstruct, context=PassContext(feeds))(model)
        assert shape_of(model, "wa") == (4, 4, 3, 3)
        probe = {"x": RNG.standard_normal((1, 4, 8, 8)).astype(np.float32)}
        errors[reconstruct] = float(np.abs(run_ort(before, probe)[0] - run_ort(model, probe)[0]).max())
    assert result.stats["layers_refit"] == 1
    assert errors[True] < errors[False] / 100, errors


def test_no_op_and_refusals():
    model = _redundant_model()
    assert not PruneChannelsPass(ratio=0.0)(model).modified
    with pytest.raises(UsageError):
        PruneChannelsPass(ratio=1.0)
    with pytest.raises(UsageError, match="calibration"):
        PruneChannelsPass(criterion="activation")(model)
    with pytest.raises(UsageError, match="matched no node"):
        PruneChannelsPass(nodes=("nothing-like-this",))(model)


def test_exclude_nodes_keeps_that_layer_whole_and_ladder_lowers_the_ratio():
    model = _redundant_model()
    result = PruneChannelsPass(ratio=0.5, exclude_nodes=("^a$",))(model)
    assert not result.modified
    pass_ = PruneChannelsPass(ratio=0.5)
    assert [label for _, label in pass_.promotion_ladder()] == ["ratio 0.25", "ratio 0.125"]
    result = PruneChannelsPass(ratio=0.5, promote_nodes=("^a$",), promote_ratio=0.25)(model)
    assert result.stats["per_layer"]["a"] == (8, 6)


def test_bundled_classifier_with_constant_node_weights_runs_and_shrinks():
    from onnxopt.models import bundled_model_path

    model = ir.load(bundled_model_path())
    before = model.clone()
    result = PruneChannelsPass(ratio=0.5, criterion="bn")(model)
    assert result.modified and result.stats["parameters_after"] < result.stats["parameters_before"]
    feeds = {"x": RNG.standard_normal((1, 3, 48, 192)).astype(np.float32)}
    want, got = run_ort(before, feeds)[0], run_ort(model, feeds)[0]
    assert got.shape == want.shape
    onnx.checker.check_model(ir.to_proto(model))


def test_flatten_into_gemm_and_transpose_into_matmul_follow_the_channel_axis():
    dead = (0, 3, 4, 7)
    model = build([
        conv("x", "wa", "ba", "a"), helper.make_node("MaxPool", ["a"], ["p"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),  # [1, 8*2*2]: each channel spans 4 features
        helper.make_node("Gemm", ["f", "wg", "bg"], ["y"], transB=1),
        helper.make_node("Transpose", ["a"], ["t"], perm=[0, 2, 3, 1]), helper.make_node("MatMul", ["t", "wm"], ["y2"]),
    ], {"wa": conv_w(8, 4, zero=dead), "ba": bias(8, dead), "wg": RNG.standard_normal((5, 32)).astype(np.float32),
        "bg": bias(5), "wm": RNG.standard_normal((8, 3)).astype(np.float32)}, outputs=("y", "y2"))
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "wg") == (5, 16) and shape_of(model, "wm") == (4, 3)
    assert_same_outputs(before, model)


def test_per_channel_dequantize_parameters_are_sliced():
    dead = (1, 2)
    model = build([
        conv("x", "wa", "ba", "a"),
        helper.make_node("QuantizeLinear", ["a", "s", "z"], ["q"], axis=1),
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["d"], axis=1), conv("d", "wc", "bc", "y"),
    ], {"wa": conv_w(4, 4, zero=dead), "ba": bias(4, dead), "s": np.array([0.1, 0.2, 0.3, 0.4], np.float32),
        "z": np.zeros(4, np.int8), "wc": conv_w(3, 4), "bc": bias(3)})
    before, result = prune(model, ratio=0.5)
    assert shape_of(model, "s") == (2,) and shape_of(model, "z") == (2,)
    assert_same_outputs(before, model)
