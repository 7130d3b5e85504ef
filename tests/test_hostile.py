"""Unusual and malformed models (issue 8): each class is handled or refused in one line, nothing lost."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import InputError, api
from onnxopt.cli import main
from onnxopt.feeds import generate_feeds, input_specs
from onnxopt.passes.cleanup.fold import FoldConstantsPass

from helpers import assert_same_outputs, run_ort

OPSET = [helper.make_opsetid("", 21)]


def _model(nodes, inputs, outputs, initializers=(), opsets=OPSET, **graph_kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers), **graph_kw)
    return helper.make_model(graph, opset_imports=opsets)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _save(tmp_path, proto, name="m.onnx"):
    path = tmp_path / name
    onnx.save(proto, path)
    return path


def _cli(capsys, args) -> tuple[int, str]:
    code = main([*map(str, args), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return code, err


def _refused(capsys, tmp_path, proto, expected: str, *extra) -> str:
    code, err = _cli(capsys, ["optimize", _save(tmp_path, proto), "-o", tmp_path / "out.onnx", "-p", "cleanup", *extra])
    assert code == 2, err
    assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "out.onnx").exists()
    return err


def _optimized(tmp_path, proto, passes=("cleanup",), **kw):
    result = api.optimize(_save(tmp_path, proto), tmp_path / "out.onnx", list(passes), **kw)
    assert result.ok, api.failure_summary(result.run)
    return result, onnx.load(tmp_path / "out.onnx")


# --- strings ------------------------------------------------------------------------------------

def _string_model() -> onnx.ModelProto:
    words = numpy_helper.from_array(np.array(["a", "bb", "c"], dtype=object), "words")
    return _model([helper.make_node("Constant", [], ["c"], value=words), helper.make_node("Identity", ["c"], ["i"]),
                   helper.make_node("Concat", ["i", "x"], ["y"], axis=0),
                   helper.make_node("Equal", ["i", "i"], ["same"])],
                  [_vi("x", TensorProto.STRING, [2])], [_vi("y", TensorProto.STRING, [5]), _vi("same", TensorProto.BOOL, [3])])


def test_fold_constants_folds_string_constants_into_string_initializers():
    proto = _string_model()
    model = ir.from_proto(proto)
    result = FoldConstantsPass()(model)
    assert result.modified
    assert [n.op_type for n in model.graph if n.op_type != "Constant"] == ["Concat"]  # Identity, Equal folded
    folded = model.graph.initializers["i"].const_value
    assert folded.dtype == ir.DataType.STRING and list(folded.numpy()) == [b"a", b"bb", b"c"]
    feeds = {"x": np.array(["p", "q"], dtype=object)}
    assert_same_outputs(proto, model, feeds)
    assert run_ort(model, feeds)[0].tolist() == ["a", "bb", "c", "p", "q"]


def test_cleanup_keeps_strings_through_the_cli(tmp_path):
    _, written = _optimized(tmp_path, _string_model())
    assert run_ort(written, {"x": np.array(["p", "q"], dtype=object)})[0].tolist() == ["a", "bb", "c", "p", "q"]


# --- sparse tensors -------------------------------------------------------------------------------

def _sparse(name="S", values=(1.0, 2.0), indices=(0, 5), dims=(2, 3)):
    return helper.make_sparse_tensor(numpy_helper.from_array(np.array(values, np.float32), name),
                                     numpy_helper.from_array(np.array(indices, np.int64), name + "_idx"), list(dims))


def test_sparse_initializer_is_densified_and_the_report_says_so(tmp_path):
    proto = _model([helper.make_node("Add", ["x", "S"], ["y"])], [_vi("x", TensorProto.FLOAT, [2, 3])],
                   [_vi("y", TensorProto.FLOAT, [2, 3])], sparse_initializer=[_sparse()])
    result, written = _optimized(tmp_path, proto)
    assert any("densified sparse initializer 'S' [2, 3] (2 of 6 values stored)" in n for n in result.report["notes"])
    dense = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    np.testing.assert_array_equal(dense["S"], [[1, 0, 0], [0, 0, 2]])
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(run_ort(written, {"x": x})[0], run_ort(proto, {"x": x})[0])  # ORT reads sparse too


def test_sparse_constant_with_coordinate_indices_becomes_a_dense_constant(tmp_path):
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([3.0], np.float32), "v"),
                                       numpy_helper.from_array(np.array([[1, 2]], np.int64), "v_idx"), [2, 3])
    proto = _model([helper.make_node("Constant", [], ["c"], sparse_value=sparse), helper.make_node("Mul", ["x", "c"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, [2, 3])], [_vi("y", TensorProto.FLOAT, [2, 3])])
    result, written = _optimized(tmp_path, proto, passes=("remove-unused",))
    assert any("sparse attribute 'sparse_value'" in n for n in result.report["notes"])
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(run_ort(written, {"x": x})[0], [[0, 0, 0], [0, 0, 3]])


def test_sparse_index_outside_the_shape_is_refused(tmp_path, capsys):
    proto = _model([helper.make_node("Add", ["x", "S"], ["y"])], [_vi("x", TensorProto.FLOAT, [2, 3])],
                   [_vi("y", TensorProto.FLOAT, [2, 3])], sparse_initializer=[_sparse(indices=(0, 6))])
    _refused(capsys, tmp_path, proto, "sparse tensor 'S' has an index outside its shape [2, 3]")


# --- generated inputs: 0-d bool, every dtype ORT takes, huge dims -------------------------------------

def test_zero_d_bool_input_feeding_an_if_is_generated(tmp_path):
    then = helper.make_graph([helper.make_node("Neg", ["x"], ["t"])], "then", [], [_vi("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Abs", ["x"], ["e"])], "else", [], [_vi("e", TensorProto.FLOAT, [2])])
    proto = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                   [_vi("c", TensorProto.BOOL, []), _vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])])
    feeds = generate_feeds(input_specs(ir.from_proto(proto)), count=8)
    assert all(isinstance(f["c"], np.ndarray) and f["c"].shape == () and f["c"].dtype == np.bool_ for f in feeds)
    assert {bool(f["c"]) for f in feeds} == {True, False}
    result, _ = _optimized(tmp_path, proto, samples=8)
    assert result.report["inputs"]["signature"]["c"] == [[], "bool"]


# Types numpy has no type for, which ORT CPU takes as inputs (Cast or DequantizeLinear, opset 25).
EXOTIC = ["BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT8E8M0",
          "INT4", "UINT4", "INT2", "UINT2"]
NATIVE = ["FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL"]


def _typed_model(name: str, echo: bool) -> onnx.ModelProto:
    """x of type ``name`` -> float y (Cast, or DequantizeLinear for 2/4-bit integers); ``echo`` adds x back."""
    dtype = getattr(TensorProto, name)
    packed = name in ("INT4", "UINT4", "INT2", "UINT2")
    node = (helper.make_node("DequantizeLinear", ["x", "scale"], ["y"]) if packed
            else helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT))
    nodes = [node] + ([helper.make_node("Identity", ["x"], ["x_echo"])] if echo else [])
    outputs = [_vi("y", TensorProto.FLOAT, [2, 3])] + ([_vi("x_echo", dtype, [2, 3])] if echo else [])
    scale = [numpy_helper.from_array(np.array(0.5, np.float32), "scale")] if packed else []
    return _model(nodes, [_vi("x", dtype, [2, 3])], outputs, scale, opsets=[helper.make_opsetid("", 25)])


@pytest.mark.parametrize("name", EXOTIC + NATIVE)
def test_every_dtype_ort_takes_is_generated_and_validated(tmp_path, name):
    echo = name not in ("INT4", "UINT4", "INT2", "UINT2", "FLOAT8E8M0")  # ORT has no Identity kernel for these
    proto = _typed_model(name, echo)
    result, written = _optimized(tmp_path, proto, passes=("cleanup",))
    expected = ir.DataType[name].numpy()
    assert result.report["inputs"]["signature"]["x"] == [[2, 3], str(np.dtype(expected))]
    feeds = generate_feeds(input_specs(ir.from_proto(proto)), count=2)
    assert all(f["x"].dtype == expected for f in feeds)
    assert len({v for f in feeds for v in np.asarray(f["x"], np.float64).ravel()}) > 1  # not a constant fill


def test_exotic_outputs_are_read_back_with_their_values():
    from onnxopt import ort_run

    for name in ("BFLOAT16", "FLOAT8E5M2", "INT4"):
        proto = _typed_model(name, echo=name != "INT4")
        session = ort_run.make_session(ir.from_proto(proto))
        feed = generate_feeds(input_specs(ir.from_proto(proto)), count=1)[0]
        outputs = ort_run.run(session, feed)
        scale = 0.5 if name == "INT4" else 1.0
        np.testing.assert_array_equal(outputs["y"], np.asarray(feed["x"], np.float32) * scale)
        if name != "INT4":
            assert outputs["x_echo"].dtype == feed["x"].dtype
            np.testing.assert_array_equal(outputs["x_echo"].view(np.uint8), feed["x"].view(np.uint8))


def test_a_dimension_of_2_to_the_62_is_one_line_naming_the_input(tmp_path, capsys):
    proto = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [2**62])],
                   [_vi("y", TensorProto.FLOAT, [2**62])])
    err = _refused(capsys, tmp_path, proto, "input 'x' has shape [4611686018427387904]")
    assert "too large to generate" in err and "--data" in err


# --- constant-folding bombs ---------------------------------------------------------------------------

def _bomb(producer: str) -> onnx.ModelProto:
    shape = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "shape")
    one = numpy_helper.from_array(np.array([1.0], np.float32), "one")
    scalars = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0), ("limit", 2.0**40), ("step", 1))]
    make = {"ConstantOfShape": helper.make_node("ConstantOfShape", ["shape"], ["big"], value=one),
            "Expand": helper.make_node("Expand", ["one", "shape"], ["big"]),
            "Range": helper.make_node("Range", ["zero", "limit", "step"], ["big"])}[producer]
    return _model([make, helper.make_node("ReduceSum", ["big"], ["total"], keepdims=0),
                   helper.make_node("Add", ["x", "total"], ["y"])],
                  [_vi("x", TensorProto.FLOAT, [1])], [_vi("y", TensorProto.FLOAT, [1])], [shape, one, *scalars])


@pytest.mark.parametrize("producer", ["ConstantOfShape", "Expand", "Range"])
@pytest.mark.parametrize("shape_inference", [True, False])
def test_fold_constants_refuses_a_2_to_the_40_bomb_without_computing_it(producer, shape_inference):
    model = ir.from_proto(_bomb(producer))
    result = FoldConstantsPass(shape_inference=shape_inference)(model)  # 4 TiB if it evaluated the node
    assert [n.op_type for n in model.graph] == [producer, "ReduceSum", "Add"]
    assert result.stats["folds_refused"] >= 1 and result.stats["initializers_added"] == 0


def test_fold_constants_still_folds_a_small_range():
    proto = _model([helper.make_node("Range", ["zero", "limit", "step"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])],
                   [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("zero", 0), ("limit", 4), ("step", 1))])
    model = ir.from_proto(proto)
    FoldConstantsPass(shape_inference=False)(model)
    assert [n.op_type for n in model.graph] == ["Add"]
    assert_same_outputs(proto, model)


def test_a_bomb_ort_cannot_run_points_at_validate_off_which_finishes(tmp_path, capsys):
    err = _refused(capsys, tmp_path, _bomb("ConstantOfShape"), "ONNX Runtime cannot run even the original model")
    assert "4,398,046,511,104 bytes" in err and "--validate off" in err
    code, err = _cli(capsys, ["optimize", _save(tmp_path, _bomb("Expand")), "-o", tmp_path / "out.onnx",
                              "-p", "cleanup", "--validate", "off"])
    assert code == 0, err
    assert "Expand" in [n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node]


# --- malformed models refused at load ---------------------------------------------------------------

def _relu(**kw) -> onnx.ModelProto:
    outputs = kw.pop("outputs", [_vi("y", TensorProto.FLOAT, [2])])
    return _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", TensorProto.FLOAT, [2])], outputs, **kw)


def test_duplicate_opset_imports_for_one_domain_are_refused(tmp_path, capsys):
    proto = _relu(opsets=[helper.make_opsetid("", 21), helper.make_opsetid("ai.onnx", 17)])
    _refused(capsys, tmp_path, proto, "imports domain '' (ai.onnx) 2 times (versions 21, 17)")


def test_duplicate_graph_output_names_are_refused(tmp_path, capsys):
    proto = _relu(outputs=[_vi("y", TensorProto.FLOAT, [2]), _vi("y", TensorProto.FLOAT, [2])])
    _refused(capsys, tmp_path, proto, "graph output 'y' is declared more than once")


def _external(tmp_path, entries: dict[str, str], data: bytes = np.ones(4, np.float32).tobytes()) -> onnx.ModelProto:
    (tmp_path / "w.bin").write_bytes(data)
    tensor = numpy_helper.from_array(np.ones(4, np.float32), "w")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    return _model([helper.make_node("Add", ["x", "w"], ["y"])], [_vi("x", TensorProto.FLOAT, [4])],
                  [_vi("y", TensorProto.FLOAT, [4])], [tensor])


def test_unknown_external_data_keys_are_refused(tmp_path, capsys):
    proto = _external(tmp_path, {"location": "w.bin", "compression": "zstd"})
    _refused(capsys, tmp_path, proto, "tensor 'w' external data has unknown key(s) 'compression'")


def test_external_offset_past_the_end_names_the_offset_and_the_file_size(tmp_path, capsys):
    proto = _external(tmp_path, {"location": "w.bin", "offset": "100", "length": "16"})
    _refused(capsys, tmp_path, proto, "offset 100 lies past the end of 'w.bin' (the file has 16 bytes)")


def test_external_length_past_the_end_names_the_length_and_the_file_size(tmp_path, capsys):
    proto = _external(tmp_path, {"location": "w.bin", "offset": "8", "length": "16"})
    _refused(capsys, tmp_path, proto, "length 16 from offset 8 runs past the end of 'w.bin' (ends at byte 24; "
                                      "the file has 16 bytes)")


def test_a_sound_external_model_still_loads(tmp_path):
    proto = _external(tmp_path, {"location": "w.bin", "offset": "0", "length": "16", "checksum": ""})
    _, written = _optimized(tmp_path, proto)
    np.testing.assert_array_equal(run_ort(written, {"x": np.zeros(4, np.float32)})[0], np.ones(4))


def test_nodes_out_of_topological_order_are_sorted_on_load_and_said_so(tmp_path):
    then = helper.make_graph([helper.make_node("Neg", ["b"], ["t"]), helper.make_node("Abs", ["x"], ["b"])], "then", [],
                             [_vi("t", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", TensorProto.FLOAT, [2])])
    proto = _model([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
                    helper.make_node("Greater", ["s", "zero"], ["c"]), helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0)],
                   [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])],
                   [numpy_helper.from_array(np.array(0.0, np.float32), "zero")])
    result, written = _optimized(tmp_path, proto)
    notes = " ".join(result.report["notes"])
    assert "main graph: sorted the nodes topologically (2 of 3 moved" in notes and "If.then_branch: sorted" in notes
    onnx.checker.check_model(written)
    for x in (np.array([1.0, -3.0], np.float32), np.array([4.0, -3.0], np.float32)):
        np.testing.assert_array_equal(run_ort(written, {"x": x})[0], x if x.sum() <= 0 else -np.abs(x))


def test_repeated_node_names_are_made_unique_on_load(tmp_path):
    proto = _model([helper.make_node("Relu", ["x"], ["a"], name="n"), helper.make_node("Neg", ["a"], ["y"], name="n")],
                   [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])])
    result, written = _optimized(tmp_path, proto, passes=("remove-unused",))
    assert [n.name for n in written.graph.node] == ["n", "n_1"]
    assert any("renamed 1 nodes whose names repeat another node's ('n')" in n for n in result.report["notes"])


# --- quantization never writes NaN/Inf/zero scales ------------------------------------------------

def _scales(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Scale inputs of Q/DQ nodes, and initializers named like scales (quantize-dynamic's Mul)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    scales = {n.input[1]: inits[n.input[1]] for n in proto.graph.node
              if n.op_type in ("DequantizeLinear", "QuantizeLinear") and n.input[1] in inits}
    return scales | {name: value for name, value in inits.items() if name.endswith("scale")}


def _two_weights(bad_weight: bool, bad_input: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    bad = rng.standard_normal((128, 32)).astype(np.float32)
    if bad_weight:
        bad[0, 0], bad[5, 3] = np.nan, np.inf
    nodes = [helper.make_node("MatMul", ["x", "good"], ["a"], name="mm_good"),
             helper.make_node("Div" if bad_input else "Mul", ["x", "zero"], ["xs"], name="scale_x"),
             helper.make_node("MatMul", ["xs", "bad"], ["b"], name="mm_bad")]
    inits = [numpy_helper.from_array(rng.standard_normal((128, 32)).astype(np.float32), "good"),
             numpy_helper.from_array(bad, "bad"), numpy_helper.from_array(np.array(0.0 if bad_input else 1.0, np.float32), "zero")]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [4, 128])],
                  [_vi("a", TensorProto.FLOAT, [4, 32]), _vi("b", TensorProto.FLOAT, [4, 32])], inits)


@pytest.mark.parametrize("spec, named_in", [
    ("quantize-static", "left_float"), ("quantize-dynamic", "left_float"),
    ("quantize-weights", "skipped"), ("quantize-weights:bits=4,granularity=blocked", "skipped")])
def test_a_weight_holding_nan_or_inf_stays_float_and_is_named(tmp_path, spec, named_in):
    result, written = _optimized(tmp_path, _two_weights(bad_weight=True, bad_input=False), passes=(spec,), budget="none")
    step = result.report["passes"][0]
    assert step["modified"] and "mm_good" in step["stats"]["quantized_nodes"]
    assert "mm_bad" not in step["stats"]["quantized_nodes"]
    assert "NaN or Inf" in step["stats"][named_in]["bad"]
    scales = _scales(written)
    assert scales and all(np.isfinite(s).all() and (s != 0).all() for s in scales.values())
    assert "bad" in {t.name for t in written.graph.initializer}  # still float, still there


def test_quantize_static_leaves_an_activation_with_no_finite_value_float(tmp_path):
    result, written = _optimized(tmp_path, _two_weights(bad_weight=False, bad_input=True), passes=("quantize-static",),
                                 budget="none")
    stats = result.report["passes"][0]["stats"]  # calibration keeps finite values only: xs has none
    assert stats["fallbacks"] == {"uncalibrated": 1} and stats["quantized_nodes"] == ["mm_good"]
    assert all(np.isfinite(s).all() and (s != 0).all() for s in _scales(written).values())


def test_recursive_local_functions_are_refused(tmp_path, capsys):
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    f = helper.make_function("local", "f", ["a"], ["b"], [helper.make_node("g", ["a"], ["b"], domain="local")], opsets)
    g = helper.make_function("local", "g", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["r"]),
                                                          helper.make_node("f", ["r"], ["b"], domain="local")], opsets)
    graph = helper.make_graph([helper.make_node("f", ["x"], ["y"], domain="local")], "g",
                              [_vi("x", TensorProto.FLOAT, [2])], [_vi("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=opsets, functions=[f, g])
    _refused(capsys, tmp_path, proto, "local function 'local:f' is recursive (local:f -> local:g -> local:f)",
             "--validate", "off")
