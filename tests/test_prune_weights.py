"""prune-weights and drop-pruned-initializers: tiny graphs checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.errors import UsageError
from onnxopt.pass_base import PassContext
from onnxopt.passes.prune import DropPrunedInitializersPass, PruneWeightsPass
from tests.helpers import assert_same_outputs, run_ort

RNG = np.random.default_rng(1)


def build(nodes, inits, inputs=(("x", (2, 16)),), outputs=("y",), opset=17, sub_inits=()):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def mlp(w1=None, w2=None):
    return build([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
                 {"w1": RNG.standard_normal((16, 32)).astype(np.float32) if w1 is None else w1,
                  "w2": RNG.standard_normal((32, 8)).astype(np.float32) if w2 is None else w2})


def weight(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_layer_sparsity_zeroes_the_smallest_weights_of_each_layer():
    model = mlp()
    w1 = weight(model, "w1").copy()
    result = PruneWeightsPass(sparsity=0.5)(model)
    assert result.modified and result.stats["per_layer"] == {"mm1": 0.5, "mm2": 0.5}
    pruned = weight(model, "w1")
    assert np.abs(w1[pruned == 0]).max() <= np.abs(w1[pruned != 0]).min()
    assert not PruneWeightsPass(sparsity=0.5)(model).modified or PruneWeightsPass(sparsity=0.5)(model).stats[
        "sparsity_achieved"] == 0.5


def test_global_scope_prunes_the_layer_with_smaller_weights_harder():
    model = mlp(w2=0.01 * RNG.standard_normal((32, 8)).astype(np.float32))
    result = PruneWeightsPass(sparsity=0.5, scope="global", importance="l1")(model)
    assert result.stats["per_layer"]["mm2"] == 1.0 and result.stats["sparsity_achieved"] == 0.5


def test_activation_importance_weighs_weights_by_their_input_channel():
    w1 = np.ones((16, 32), np.float32)
    model = mlp(w1=w1)
    scale = np.ones((1, 16), np.float32)
    scale[0, :8] = 100  # inputs 0..7 are large: their weights matter
    feeds = [{"x": (RNG.standard_normal((2, 16)) * scale).astype(np.float32)} for _ in range(4)]
    PruneWeightsPass(sparsity=0.5, importance="activation", context=PassContext(feeds), nodes=("mm1",))(model)
    pruned = weight(model, "w1")
    assert np.all(pruned[:8] == 1) and np.all(pruned[8:] == 0)


def test_entropy_importance_measures_output_divergence_and_needs_feeds():
    model = mlp()
    with pytest.raises(UsageError, match="calibration"):
        PruneWeightsPass(importance="entropy")(model)
    feeds = [{"x": RNG.standard_normal((2, 16)).astype(np.float32)} for _ in range(2)]
    result = PruneWeightsPass(sparsity=0.5, importance="entropy", scope="global", context=PassContext(feeds))(model)
    assert result.modified and abs(result.stats["sparsity_achieved"] - 0.5) < 0.01


def test_packed_storage_shrinks_the_file_and_gives_the_same_outputs():
    model = mlp(w1=RNG.standard_normal((256, 64)).astype(np.float32), w2=RNG.standard_normal((64, 8)).astype(np.float32))
    model = build([helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
                   helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")],
                  {"w1": weight(model, "w1"), "w2": weight(model, "w2")}, inputs=(("x", (2, 256)),))
    dense = model.clone()
    PruneWeightsPass(sparsity=0.75)(dense)
    packed = model.clone()
    result = PruneWeightsPass(sparsity=0.75, storage="packed")(packed)
    assert "w1" not in packed.graph.initializers and result.stats["packed_ratio"] < 0.3
    size = lambda m: len(ir.to_proto(m).SerializeToString())  # noqa: E731
    assert size(packed) < 0.35 * size(model)
    feeds = {"x": RNG.standard_normal((2, 256)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(packed, feeds)[0], run_ort(dense, feeds)[0])


def test_weights_inside_an_if_body_are_pruned_and_shared_weights_once():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    body = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["t"], name="inner")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["e"], name="inner2")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    model = build([helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=other)],
                  {"w": w, "c": np.array(True)}, inputs=(("x", (2, 16)),))
    result = PruneWeightsPass(sparsity=0.5)(model)
    assert result.stats["weights_pruned"] == 1 and sorted(list(result.stats["per_layer"])[0].split(",")) == ["inner", "inner2"]
    assert np.mean(weight(model, "w") == 0) == 0.5
    x = RNG.standard_normal((2, 16)).astype(np.float32)
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], x @ weight(model, "w"), rtol=1e-5, atol=1e-5)


def test_no_op_refusal_and_ladder():
    model = mlp()
    assert not PruneWeightsPass(sparsity=0.0)(model).modified
    with pytest.raises(UsageError):
        PruneWeightsPass(sparsity=1.5)
    with pytest.raises(UsageError, match="matched no node"):
        PruneWeightsPass(nodes=("absent",))(model)
    assert [label for _, label in PruneWeightsPass(sparsity=0.5).promotion_ladder()] == ["sparsity 0.25", "sparsity 0.125"]
    result = PruneWeightsPass(sparsity=0.5, promote_nodes=("mm1",))(model)
    assert result.stats["per_layer"] == {"mm1": 0.25, "mm2": 0.5}


# -- drop-pruned-initializers ---------------------------------------------------------------


def test_drop_folds_matmul_by_zeros_add_of_zeros_and_mul_by_one():
    model = build([
        helper.make_node("MatMul", ["x", "wz"], ["z"], name="mmz"), helper.make_node("Add", ["x2", "z"], ["s"]),
        helper.make_node("Add", ["s", "zero"], ["s2"]), helper.make_node("Mul", ["s2", "one"], ["m"]),
        helper.make_node("Relu", ["m"], ["y"]),
    ], {"wz": np.zeros((16, 8), np.float32), "zero": np.zeros((1, 8), np.float32), "one": np.ones((1,), np.float32),
        "unused": np.ones((100,), np.float32)}, inputs=(("x", (3, 16)), ("x2", (3, 8))))
    before = model.clone()
    result = DropPrunedInitializersPass()(model)
    assert result.stats["matmuls_folded"] == 1 and result.stats["identities_bypassed"] == 2
    assert not {"wz", "zero", "unused"} & set(model.graph.initializers)
    assert "MatMul" not in [n.op_type for n in model.graph]
    assert_same_outputs(before, model)
    assert not DropPrunedInitializersPass()(model).modified


def test_drop_folds_a_matmul_by_zeros_inside_an_if_body_reading_outer_scope():
    zeros = numpy_helper.from_array(np.zeros((16, 8), np.float32), "wz")
    then_body = helper.make_graph([helper.make_node("MatMul", ["x", "wz"], ["t"]), helper.make_node("Relu", ["t"], ["ty"])],
                                  "then", [], [helper.make_tensor_value_info("ty", TensorProto.FLOAT, (2, 8))], [zeros])
    slice_args = [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s8", 8), ("s1", 1))]
    else_body = helper.make_graph([helper.make_node("Slice", ["x", "s0", "s8", "s1"], ["ey"])], "else", [],
                                  [helper.make_tensor_value_info("ey", TensorProto.FLOAT, (2, 8))], slice_args)
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_body, else_branch=else_body)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, ()), helper.make_tensor_value_info("x", TensorProto.FLOAT, (2, 16))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 8))])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    before = model.clone()
    result = DropPrunedInitializersPass()(model)
    assert result.modified and result.stats["matmuls_folded"] == 1
    body = model.graph.node(0).attributes["then_branch"].value
    assert "MatMul" not in [n.op_type for n in body] and "wz" not in body.initializers
    x = RNG.standard_normal((2, 16)).astype(np.float32)
    for cond in (True, False):
        assert_same_outputs(before, model, {"c": np.array(cond), "x": x})
    assert not DropPrunedInitializersPass()(model).modified


def test_drop_keeps_a_broadcasting_zero_add_and_a_graph_output():
    model = build([helper.make_node("Add", ["x", "zero"], ["y"])], {"zero": np.zeros((4, 2, 16), np.float32)})
    assert not DropPrunedInitializersPass()(model).modified


def test_drop_removes_an_unused_initializer_listed_as_graph_input():
    proto = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2,)), helper.make_tensor_value_info("w", TensorProto.FLOAT, (3,))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2,))], [numpy_helper.from_array(np.ones(3, np.float32), "w")]),
        opset_imports=[helper.make_opsetid("", 17)])
    model = ir.from_proto(proto)
    result = DropPrunedInitializersPass()(model)
    assert result.stats["graph_inputs_dropped"] == 1 and [v.name for v in model.graph.inputs] == ["x"]
    assert run_ort(model, {"x": np.array([-1, 2], np.float32)})[0].tolist() == [0, 2]
