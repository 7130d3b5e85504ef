"""Generated inputs respect the graph (issue 7 item 6): table indices stay inside the table, masks are ones."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import api
from onnxopt.feeds import generate_feeds, input_specs

from helpers import run_ort

VOCAB, TYPES, WIDTH, SEQ = 50, 2, 8, 6


def bert_toy() -> onnx.ModelProto:
    """input_ids -> word table (through Reshape), token_type_ids -> 2-row table, attention_mask -> additive bias."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    inits = [weight("word_emb", VOCAB, WIDTH), weight("type_emb", TYPES, WIDTH), weight("wq", WIDTH, WIDTH),
             numpy_helper.from_array(np.array([-1], np.int64), "flat"),
             numpy_helper.from_array(np.array([1, SEQ], np.int64), "back"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-10000.0, np.float32), "neg"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    nodes = [
        helper.make_node("Reshape", ["input_ids", "flat"], ["ids_flat"]),
        helper.make_node("Gather", ["word_emb", "ids_flat"], ["words_flat"]),
        helper.make_node("Concat", ["back", "width"], ["back_shape"], axis=0),
        helper.make_node("Reshape", ["words_flat", "back_shape"], ["words"]),
        helper.make_node("Gather", ["type_emb", "token_type_ids"], ["types"]),
        helper.make_node("Add", ["words", "types"], ["hidden"]),
        helper.make_node("MatMul", ["hidden", "wq"], ["q"]),
        helper.make_node("Transpose", ["hidden"], ["kt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["one", "mask_f"], ["inverted"]),
        helper.make_node("Mul", ["inverted", "neg"], ["bias2d"]),
        helper.make_node("Unsqueeze", ["bias2d", "axis1"], ["bias"]),
        helper.make_node("Add", ["scores", "bias"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "hidden"], ["last_hidden_state"]),
    ]
    inits.append(numpy_helper.from_array(np.array([WIDTH], np.int64), "width"))
    ints = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
            for n in ("input_ids", "attention_mask", "token_type_ids")]
    graph = helper.make_graph(nodes, "bert_toy", ints,
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", WIDTH])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bert_style_inputs_follow_their_tables_and_masks():
    specs = {s.name: s for s in input_specs(ir.from_proto(bert_toy()))}
    assert (specs["input_ids"].low, specs["input_ids"].high) == (0, VOCAB)  # through Reshape
    assert (specs["token_type_ids"].low, specs["token_type_ids"].high) == (0, TYPES)
    assert specs["attention_mask"].ones and "mask" in specs["attention_mask"].rule
    feeds = generate_feeds(list(specs.values()), count=4, dims={"seq": SEQ})
    ids = np.stack([f["input_ids"] for f in feeds])
    types = np.stack([f["token_type_ids"] for f in feeds])
    assert ids.min() >= 0 and ids.max() < VOCAB and ids.max() >= 4  # the whole table, not [0, 4)
    assert set(np.unique(types)) == {0, 1}
    assert all((f["attention_mask"] == 1).all() for f in feeds)
    for feed in feeds:  # ORT runs every generated feed (an index past the table would raise)
        assert np.isfinite(run_ort(bert_toy(), feed)[0]).all()


def test_bert_toy_optimizes_and_quantizes_on_generated_inputs(tmp_path):
    path = tmp_path / "bert.onnx"
    onnx.save(bert_toy(), path)
    result = api.optimize(path, tmp_path / "out.onnx", ["cleanup", "quantize-dynamic"], dims={"seq": SEQ},
                          budget="none")
    assert result.ok, api.failure_summary(result.run)
    source = result.report["inputs"]["source"]
    assert "token_type_ids in [0, 2) (indexes Gather" in source and "attention_mask all ones" in source


def test_without_a_table_integers_stay_in_the_default_range():
    graph = helper.make_graph([helper.make_node("Cast", ["n"], ["y"], to=TensorProto.FLOAT)], "g",
                              [helper.make_tensor_value_info("n", TensorProto.INT32, [64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])])
    specs = input_specs(ir.from_proto(helper.make_model(graph)))
    assert specs[0].rule == "" and specs[0].high is None
    values = generate_feeds(specs, count=1)[0]["n"]
    assert values.min() >= 0 and values.max() == 3


@pytest.mark.parametrize("axis, rows", [(0, 5), (1, 3), (-1, 3)])
def test_the_gathered_axis_sets_the_bound_and_the_smallest_table_wins(axis, rows):
    table = numpy_helper.from_array(np.zeros((5, 3), np.float32), "table")
    small = numpy_helper.from_array(np.zeros((7, 4), np.float32), "small")
    nodes = [helper.make_node("Gather", ["table", "i"], ["a"], axis=axis),
             helper.make_node("Cast", ["i"], ["i32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["small", "i32"], ["b"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("i", TensorProto.INT64, [4])],
                              [helper.make_tensor_value_info("a", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("b", TensorProto.FLOAT, None)], [table, small])
    spec = input_specs(ir.from_proto(helper.make_model(graph)))[0]
    assert spec.high == rows and f"of {rows} rows" in spec.rule
