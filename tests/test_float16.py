"""convert-float16: half-precision storage and ops, Casts around float32-kept ops, ORT CPU loads it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx.reference
import onnx_ir as ir
import pytest
from helpers import op_types, random_feeds, run_ort
from onnx import numpy_helper

from onnxopt.errors import UsageError
from onnxopt.passes.quantize.float16 import ConvertFloat16Pass

NET = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,16] x) => (float[2,8] y) {
    h = MatMul(x, w)
    hb = Add(h, b)
    shape = Constant<value = int64[2] {2, 8}>()
    r = Reshape(hb, shape)
    tt = Transpose<perm = [1, 0]>(table)
    rows = Gather(tt, ids)
    y = Add(r, rows)
}"""


def net(seed: int = 0) -> ir.Model:
    proto = onnx.parser.parse_model(NET)
    rng = np.random.default_rng(seed)
    for name, array in {"w": rng.standard_normal((16, 8)), "b": rng.standard_normal(8),
                        "table": rng.standard_normal((8, 4))}.items():
        proto.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1, 0], np.int64), "ids"))
    return ir.from_proto(proto)


def _close(before: ir.Model, after: ir.Model, feeds=None, rtol=2e-2, atol=2e-2, cast_inputs=None):
    feeds = feeds or random_feeds(before)
    after_feeds = {k: v.astype(cast_inputs) for k, v in feeds.items()} if cast_inputs else feeds
    for want, got in zip(run_ort(before, feeds), run_ort(after, after_feeds)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=rtol, atol=atol)


def test_ort_cpu_target_stores_half_weights_and_casts_around_float32_ops():
    model = net()
    before = model.clone()
    result = ConvertFloat16Pass()(model)
    assert result.modified
    inits = model.graph.initializers
    assert inits["w"].dtype == inits["b"].dtype == inits["table"].dtype == ir.DataType.FLOAT16
    assert inits["ids"].dtype == ir.DataType.INT64
    # MatMul/Add have no half kernel on ORT CPU: their half weights are cast back; Gather and
    # Transpose run in half because their float input (table) is half already.
    assert op_types(model) == [
        "Cast", "MatMul", "Cast", "Add", "Constant", "Reshape", "Transpose", "Gather", "Cast", "Add"]
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.outputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT and model.graph.inputs[0].dtype == ir.DataType.FLOAT
    stats = result.stats
    assert stats["tensors_converted"] == 3 and stats["casts_inserted"] == 3
    assert stats["nodes_half"] == 2 and stats["bytes_saved"] == (16 * 8 + 8 + 32) * 2
    _close(before, model)
    assert not ConvertFloat16Pass()(model).modified


def test_keep_io_types_false_makes_the_interface_half():
    model = net()
    before = model.clone()
    ConvertFloat16Pass(keep_io_types=False)(model)
    assert model.graph.inputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].dtype == ir.DataType.FLOAT16
    assert model.graph.outputs[0].name == "y"
    _close(before, model, cast_inputs=np.float16)


def test_target_any_converts_every_op_and_patches_type_attributes():
    model = ir.from_proto(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,4] x, int64[2] n) => (float[2,4] y) {
            c = Cast<to = 1>(n)
            z = ConstantOfShape<value = float[1] {0.5}>(n)
            s = ReduceSum<keepdims = 0>(c)
            a = Mul(x, z)
            y = Add(a, s)
        }"""))
    before = model.clone()
    result = ConvertFloat16Pass(target="any")(model)
    cast = next(n for n in model.graph if n.op_type == "Cast" and n.outputs[0].name == "c")
    assert cast.attributes["to"].as_int() == ir.DataType.FLOAT16
    constant_of_shape = next(n for n in model.graph if n.op_type == "ConstantOfShape")
    assert constant_of_shape.attributes["value"].as_tensor().dtype == ir.DataType.FLOAT16
    assert result.stats["attributes_patched"] == 2 and result.stats["nodes_kept_float32"] == 0
    assert op_types(model) == ["Cast", "ConstantOfShape", "ReduceSum", "Cast", "Mul", "Add", "Cast"]
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "n": np.array([2, 4], np.int64)}
    (got,) = onnx.reference.ReferenceEvaluator(proto).run(None, feeds)
    np.testing.assert_allclose(got, run_ort(before, feeds)[0], rtol=1e-3)
    assert got.dtype == np.float32


def test_model_without_float_tensors_is_not_modified():
    model = ir.from_proto(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[4] x) => (int64[4] y) { y = Add(x, x) }"""))
    result = ConvertFloat16Pass()(model)
    assert not result.modified and op_types(model) == ["Add"]


def test_values_out_of_half_range_stay_float32():
    model = net()
    big = model.graph.initializers["b"]
    big.const_value = ir.tensor(np.full(8, 1e6, np.float32))
    before = model.clone()
    result = ConvertFloat16Pass()(model)
    assert model.graph.initializers["b"].dtype == ir.DataType.FLOAT
    assert result.stats["kept_float32_range"] == {"b": 1e6}
    _close(before, model, rtol=2e-2, atol=1e3 * 2e-2)
    small = net()
    result = ConvertFloat16Pass(keep_ranges_over=1.0)(small)
    assert set(result.stats["kept_float32_range"]) == {"w", "b", "table"}


def test_op_block_list_and_selectors_keep_nodes_float32():
    model = net()
    before = model.clone()
    result = ConvertFloat16Pass(op_block_list=("Gather",))(model)
    assert result.stats["nodes_half"] == 1  # the Transpose
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert gather.outputs[0].dtype in (None, ir.DataType.FLOAT)
    _close(before, model)
    model = net()
    result = ConvertFloat16Pass(exclude_ops=("Transpose", "MatMul"), store_weights=False)(model)
    # w's and table's only consumers are excluded; b feeds Add, which has no ORT CPU half kernel
    assert not result.modified and model.graph.initializers["table"].dtype == ir.DataType.FLOAT
    with pytest.raises(UsageError, match="matched no node"):
        ConvertFloat16Pass(ops=("Conv",))(net())


def test_subgraph_weights_local_and_captured_are_converted():
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,8] x, bool c) => (float[2,8] y) {
            y = If(c) <
                then_branch = t () => (float[2,8] a) { a = Add(x, outer) },
                else_branch = e () => (float[2,8] b) { bt = Transpose<perm = [1, 0]>(inner)  b = Add(x, bt) }>
        }""")
    rng = np.random.default_rng(3)
    proto.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((2, 8)).astype(np.float32), "outer"))
    else_branch = next(a.g for a in proto.graph.node[0].attribute if a.name == "else_branch")
    else_branch.initializer.append(numpy_helper.from_array(rng.standard_normal((8, 2)).astype(np.float32), "inner"))
    model = ir.from_proto(proto)
    before = model.clone()
    result = ConvertFloat16Pass()(model)
    assert result.stats["tensors_converted"] == 2
    assert model.graph.initializers["outer"].dtype == ir.DataType.FLOAT16
    if_node = model.graph[0]
    inner = if_node.attributes["else_branch"].as_graph().initializers["inner"]
    assert inner.dtype == ir.DataType.FLOAT16
    # the If interface stays float32: the half Transpose output is cast back inside the branch
    assert op_types(model) == ["If", "Cast", "Add", "Transpose", "Cast", "Add"]
    x = rng.standard_normal((2, 8)).astype(np.float32)
    for c in (True, False):
        _close(before, model, {"x": x, "c": np.array(c)})


def test_loop_body_is_converted_and_schema_fixed_float_inputs_stay_float32():
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,2,4,4] x, int64 n) => (float[1,2,4,4] y, float[1,2,8,8] z) {
            c = Constant<value = bool {1}>()
            y = Loop(n, c, x) <body = b (int64 i, bool cin, float[1,2,4,4] acc) => (bool cout, float[1,2,4,4] nxt) {
                cout = Identity(cin)
                t = Transpose<perm = [0, 1, 3, 2]>(wt)
                nxt = Add(acc, t)
            }>
            scales = Constant<value = float[4] {1, 1, 2, 2}>()
            z = Resize<mode = "nearest">(x, , scales)
        }""")
    wt = np.random.default_rng(4).standard_normal((1, 2, 4, 4)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(wt, "wt"))
    model, before = ir.from_proto(proto), ir.from_proto(proto)
    result = ConvertFloat16Pass()(model)
    assert model.graph.initializers["wt"].dtype == ir.DataType.FLOAT16  # captured by the Loop body
    scales = next(n for n in model.graph if n.outputs[0].name == "scales")
    assert scales.attributes["value"].as_tensor().dtype == ir.DataType.FLOAT  # Resize scales are float only
    assert op_types(model) == ["Constant", "Loop", "Constant", "Resize", "Identity", "Transpose", "Cast", "Add"]
    assert result.stats["nodes_half"] == 1
    _close(before, model, {"x": np.ones((1, 2, 4, 4), np.float32), "n": np.array(3)})


def test_bfloat16_runs_in_ort_and_upgrades_or_refuses_below_opset_13():
    model = net()
    before = model.clone()
    ConvertFloat16Pass(dtype="bfloat16")(model)
    assert model.graph.initializers["w"].dtype == ir.DataType.BFLOAT16
    _close(before, model, rtol=5e-2, atol=1e-1)
    def old():
        return ir.from_proto(onnx.parser.parse_model("""<ir_version: 7, opset_import: ["" : 11]>
            g (float[2] x) => (float[2] y) { y = Relu(x) }"""))

    with pytest.raises(UsageError, match="bfloat16 needs opset 13"):
        ConvertFloat16Pass(dtype="bfloat16", upgrade_opset=False)(old())
    upgraded = old()
    result = ConvertFloat16Pass(dtype="bfloat16")(upgraded)
    assert result.stats["opset_upgraded"] == "11->13" and upgraded.opset_imports[""] == 13
    x = np.array([-1.5, 2.25], np.float32)
    assert np.array_equal(run_ort(upgraded, {"x": x})[0], np.maximum(x, 0))


PPOCR = Path(__file__).resolve().parents[1] / "models" / "data" / "ppocr_mobile_v2_cls.onnx"


@pytest.mark.zoo
def test_ppocr_classifier_in_half_storage_loads_runs_and_shrinks(tmp_path: Path):
    if not PPOCR.exists():
        pytest.skip(f"bundled model missing: {PPOCR}")
    reference, model = ir.load(PPOCR), ir.load(PPOCR)
    result = ConvertFloat16Pass()(model)
    assert result.modified and result.stats["tensors_converted"] > 250  # Constant-node weights
    path = tmp_path / "half.onnx"
    ir.save(model, path)
    assert os.path.getsize(path) < 0.7 * os.path.getsize(PPOCR)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)
    np.testing.assert_allclose(run_ort(ir.load(path), {"x": x})[0], run_ort(reference, {"x": x})[0], atol=5e-3)


def test_half_graph_inputs_validate_through_the_runner(tmp_path):
    from onnxopt import api

    result = api.optimize(PPOCR, tmp_path / "half.onnx", ["convert-float16:keep_io_types=false"],
                          dims={"x.2": 48, "x.3": 192})
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    assert onnx.load(tmp_path / "half.onnx").graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert min(m["cosine"] for m in step["fidelity_metrics"].values()) > 0.999


def test_bfloat16_graph_inputs_are_refused_before_the_model_is_read():
    with pytest.raises(UsageError, match="bfloat16 needs keep_io_types=true"):
        ConvertFloat16Pass(dtype="bfloat16", keep_io_types=False)
