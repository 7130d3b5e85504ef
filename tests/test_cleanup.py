"""Cleanup passes: tiny before/after models, one idea each, outputs checked in ORT."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.models import sample_feeds
from onnxopt.passes.cleanup import (
    EliminateCommonSubexpressionsPass,
    EliminateIdentitiesPass,
    InferShapesPass,
    RemoveUnusedPass,
    SortTopologicallyPass,
)
from onnxopt.passes.cleanup.fold import FoldConstantsPass

from helpers import assert_same_outputs, model_from_text, op_types, run_ort

H17 = '<ir_version: 8, opset_import: ["" : 17]>'
H17_LOCAL = '<ir_version: 8, opset_import: ["" : 17, "local" : 1]>'
FUNCTION_HEADER = '<domain: "local", opset_import: ["" : 17]>'
IF_FEEDS = [{"c": np.array(flag), "x": np.array([1.5, -2.0], np.float32)} for flag in (True, False)]


def _if_model(then_body: str, else_body: str = "{ b = Neg(x) }", prelude: str = "") -> ir.Model:
    return model_from_text(f"""{H17}
        g (bool c, float[2] x) => (float[2] y) {{
            {prelude}
            y = If(c) <then_branch = g1 () => (float[2] a) {then_body},
                       else_branch = g2 () => (float[2] b) {else_body}>
        }}""")


def _assert_same_if_outputs(before: ir.Model, after: ir.Model) -> None:
    for feeds in IF_FEEDS:
        assert_same_outputs(before, after, feeds)


def test_cleanup_family_expands_to_the_default_order():
    names = [spec.name for spec in onnxopt.parse_pipeline(["cleanup"])]
    assert names == [
        "lift-constants",
        "fold-constants",
        "rewrite-patterns",
        "eliminate-identities",
        "eliminate-common-subexpressions",
        "remove-unused",
        "sort-topologically",
    ]


def test_bad_option_values_are_refused_before_any_model_is_loaded():
    with pytest.raises(onnxopt.UsageError, match="size limits"):
        onnxopt.parse_pipeline(["fold-constants:input_size_limit=-1"])
    with pytest.raises(onnxopt.UsageError, match="valid options: size_limit"):
        onnxopt.parse_pipeline(["eliminate-common-subexpressions:limit=3"])


def test_cleanup_family_on_a_model_with_every_kind_of_waste():
    model = model_from_text(f"""{H17}
        g (float[2,3] x) => (float[2,3] y) <float[3] a = {{1., 2., 3.}}, float[3] b = {{4., 5., 6.}},
                                             float[3] unused = {{0., 0., 0.}}> {{
            ab = Add(a, b)
            r1 = Relu(x)
            r2 = Relu(x)
            i = Identity(r1)
            dead = Neg(x)
            s = Add(i, r2)
            y = Mul(s, ab)
        }}""")
    before = model.clone()
    for spec in onnxopt.parse_pipeline(["cleanup"]):
        spec.make_pass()(model)
    assert sorted(op_types(model)) == ["Add", "Mul", "Relu"]
    assert list(model.graph.initializers) == ["ab"]
    assert_same_outputs(before, model)


# fold-constants -------------------------------------------------------------------------


def test_fold_constants_replaces_a_constant_subexpression_by_one_initializer():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] a = {{1., 2.}}, float[2] b = {{3., 4.}}> {{
            c = Add(a, b)
            d = Mul(c, c)
            y = Add(x, d)
        }}""")
    before = model.clone()
    result = FoldConstantsPass()(model)
    assert result.modified
    assert result.stats == {"nodes_removed": 2, "initializers_added": -1, "bytes_added": -8,
                            "folds_refused": 0}
    assert op_types(model) == ["Add"]
    np.testing.assert_array_equal(model.graph.initializers["d"].const_value.numpy(), [16.0, 36.0])
    assert_same_outputs(before, model)
    assert not FoldConstantsPass()(model).modified


def test_fold_constants_leaves_no_provenance_metadata_in_the_model():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] a = {{1., 2.}}> {{ c = Neg(a)  y = Add(x, c) }}""")
    FoldConstantsPass()(model)
    proto = ir.to_proto(model)
    assert "folded_from" not in str(proto)


def test_fold_constants_does_nothing_to_an_annotated_model_without_constants():
    # (Values without a type or shape would get one from the folder's shape inference.)
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] r> {{ r = Relu(x)  y = Neg(r) }}""")
    assert not FoldConstantsPass()(model).modified


def test_fold_constants_respects_the_input_size_limit():
    model = model_from_text(f"""{H17}
        g (float[4] x) => (float[4] y) <float[4] a = {{1., 2., 3., 4.}}> {{ c = Neg(a)  y = Add(x, c) }}""")
    FoldConstantsPass(input_size_limit=3)(model)
    assert op_types(model) == ["Neg", "Add"]
    FoldConstantsPass(input_size_limit=4)(model)
    assert op_types(model) == ["Add"]


def test_fold_constants_folds_inside_an_if_branch():
    model = _if_model("""{ k = Constant<value = float[2] {1., 2.}>()  k2 = Add(k, k)  a = Mul(x, k2) }""")
    before = model.clone()
    assert FoldConstantsPass()(model).modified
    assert "Add" not in op_types(model)
    _assert_same_if_outputs(before, model)


def test_fold_constants_folds_inside_a_function():
    model = model_from_text(f"""{H17_LOCAL}
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        {FUNCTION_HEADER}
        F (u) => (v) {{ k = Constant<value = float[2] {{1., 2.}}>()  k2 = Add(k, k)  v = Mul(u, k2) }}""")
    before = model.clone()
    assert FoldConstantsPass()(model).modified
    assert "Add" not in op_types(model)
    assert_same_outputs(before, model)


def test_fold_constants_keeps_castlike_saturate_which_the_folder_would_drop():
    model = model_from_text("""<ir_version: 10, opset_import: ["" : 21]>
        g (float[3] x) => (float[3] y) <float[1] one = {1.}, float8e4m3fn[1] like> {
            like = Cast<to = 17>(one)
            q = CastLike<saturate = 0>(x, like)
            y = Cast<to = 1>(q)
        }""")
    before = model.clone()
    result = FoldConstantsPass()(model)
    assert result.stats["folds_refused"] == 1
    assert "CastLike" in op_types(model)
    big = {"x": np.array([1.0, 1000.0, -1000.0], np.float32)}
    assert_same_outputs(before, model, big)
    assert np.isnan(run_ort(model, big)[0][1])  # saturate=0: out of range becomes NaN, not 448


def test_fold_constants_folds_shapes_in_an_opset_11_graph_without_opset_12_constants():
    # The folder would write Constant<value_ints>, which opset 11 does not have.
    model = model_from_text("""<ir_version: 6, opset_import: ["" : 11]>
        g (float[2,3] x) => (float[6] y) {
            s = Shape(x)
            p = ReduceProd<keepdims = 1>(s)
            y = Reshape(x, p)
        }""")
    before = model.clone()
    result = FoldConstantsPass()(model)
    assert result.stats["folds_refused"] == 0
    assert op_types(model) == ["Constant", "Reshape"]  # the now unused Constant is remove-unused's
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(before, model)


def test_fold_constants_writes_no_opset_13_forms_into_an_opset_11_graph():
    # The folder would rewrite ConcatFromSequence to Unsqueeze with axes as an input (opset 13).
    model = model_from_text("""<ir_version: 6, opset_import: ["" : 11]>
        g (float[2,3] a, float[2,3] b) => (float[2,2,3] y) {
            s = SequenceConstruct(a, b)
            y = ConcatFromSequence<axis = 1, new_axis = 1>(s)
        }""")
    before = model.clone()
    assert FoldConstantsPass()(model).stats["folds_refused"] == 1
    assert op_types(model) == ["SequenceConstruct", "ConcatFromSequence"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(before, model)


def test_fold_constants_survives_split_to_sequence_with_an_unknown_scalar_split():
    model = model_from_text("""<ir_version: 9, opset_import: ["" : 19]>
        g (float[3,6] data, int64 split) => (seq(float[3,?]) s) {
            s = SplitToSequence<axis = 1>(data, split)
        }""")
    result = FoldConstantsPass()(model)
    assert result.stats["folds_refused"] == 1
    assert op_types(model) == ["SplitToSequence"]


def test_fold_constants_keeps_an_if_in_a_function_whose_branch_has_initializers():
    # Inlining the branch would move its initializer onto the function, which cannot hold one.
    model = model_from_text(f"""{H17_LOCAL}
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        {FUNCTION_HEADER}
        F (u) => (v) {{
            c = Constant<value = bool {{1}}>()
            v = If(c) <then_branch = g1 () => (float[2] a) <float[2] k = {{5., 6.}}> {{ a = Add(u, k) }},
                       else_branch = g2 () => (float[2] b) {{ b = Neg(u) }}>
        }}""")
    before = model.clone()
    assert FoldConstantsPass()(model).stats["folds_refused"] == 1
    assert "If" in op_types(model)
    assert_same_outputs(before, model)


def test_fold_constants_never_freezes_a_random_draw():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] p = {{0.5, 0.5}}> {{
            b = Bernoulli(p)
            y = Add(x, b)
        }}""")
    FoldConstantsPass()(model)
    assert "Bernoulli" in op_types(model)


# remove-unused --------------------------------------------------------------------------


def test_remove_unused_drops_a_dead_node_and_its_initializer():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] w = {{1., 2.}}, float[2] k = {{3., 4.}}> {{
            y = Add(x, w)
            dead = Mul(x, k)
        }}""")
    before = model.clone()
    result = RemoveUnusedPass()(model)
    assert result.modified
    assert result.stats == {"nodes_removed": 1, "initializers_removed": 1, "bytes_saved": 8,
                            "functions_removed": 0, "opset_imports_removed": 0}
    assert list(model.graph.initializers) == ["w"]
    assert_same_outputs(before, model)
    assert not RemoveUnusedPass()(model).modified


def test_remove_unused_keeps_every_graph_input_and_output():
    model = model_from_text(f"""{H17}
        g (float[2] x, float[2] unused_input) => (float[2] y, float[2] w) <float[2] w = {{1., 2.}}> {{
            y = Relu(x)
        }}""")
    assert not RemoveUnusedPass()(model).modified
    assert [v.name for v in model.graph.inputs] == ["x", "unused_input"]
    assert [v.name for v in model.graph.outputs] == ["y", "w"]


def test_remove_unused_cleans_if_branches_including_their_initializers():
    model = _if_model("""<float[2] k = {5., 6.}> { dead = Neg(x)  dead2 = Mul(x, k)  a = Relu(x) }""")
    before = model.clone()
    result = RemoveUnusedPass()(model)
    assert result.stats["nodes_removed"] == 2 and result.stats["initializers_removed"] == 1
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert len(then_branch.initializers) == 0
    _assert_same_if_outputs(before, model)


def test_remove_unused_drops_an_unused_function_and_its_opset_import():
    model = model_from_text(f"""<ir_version: 8, opset_import: ["" : 17, "local" : 1, "other" : 1]>
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        {FUNCTION_HEADER}
        F (u) => (v) {{ dead = Neg(u)  v = Relu(u) }}
        <domain: "other", opset_import: ["" : 17]>
        G (u) => (v) {{ v = Neg(u) }}""")
    before = model.clone()
    result = RemoveUnusedPass()(model)
    # opset imports count the model's and its functions': "other" and G's own "" import
    assert result.stats["functions_removed"] == 1 and result.stats["opset_imports_removed"] == 2
    assert result.stats["nodes_removed"] == 2  # G's Neg and the dead Neg inside F
    assert list(model.opset_imports) == ["", "local"]
    assert_same_outputs(before, model)


def test_remove_unused_reports_trimmed_optional_outputs_as_a_change():
    # onnx_ir's own pass says "not modified" when it only drops an unused optional output.
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ y, mask = Dropout(x) }}""")
    assert RemoveUnusedPass()(model).modified
    assert len(model.graph.node(0).outputs) == 1


# eliminate-identities -------------------------------------------------------------------


def test_eliminate_identities_bypasses_an_inner_identity():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ r = Relu(x)  i = Identity(r)  y = Neg(i) }}""")
    before = model.clone()
    result = EliminateIdentitiesPass()(model)
    assert result.modified and result.stats == {"nodes_removed": 1}
    assert op_types(model) == ["Relu", "Neg"]
    assert_same_outputs(before, model)
    assert not EliminateIdentitiesPass()(model).modified


def test_eliminate_identities_keeps_the_graph_output_name():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ r = Relu(x)  y = Identity(r) }}""")
    assert EliminateIdentitiesPass()(model).modified
    assert op_types(model) == ["Relu"]
    assert [v.name for v in model.graph.outputs] == ["y"]


def test_eliminate_identities_does_nothing_when_an_identity_links_input_to_output():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ y = Identity(x) }}""")
    assert not EliminateIdentitiesPass()(model).modified


def test_eliminate_identities_keeps_a_scan_body_output_that_copies_another_output():
    # onnx_ir would rename sum_out to scan_out: two body outputs, one value, garbage results.
    model = model_from_text(f"""{H17}
        g (float[2] init, float[3,2] xs) => (float[2] y, float[3,2] z) {{
            y, z = Scan<num_scan_inputs = 1, body = body (float[2] acc, float[2] nxt)
                                                  => (float[2] sum_out, float[2] scan_out) {{
                sum_out = Add(acc, nxt)
                scan_out = Identity(sum_out)
            }}>(init, xs)
        }}""")
    before = model.clone()
    assert not EliminateIdentitiesPass()(model).modified
    assert_same_outputs(before, model)


def test_eliminate_identities_in_if_branches_keeps_outer_values_and_removes_inner_copies():
    # then: a copy of an outer value feeds the branch output (onnx_ir crashes renaming it);
    # else: an inner Identity that can go.
    model = _if_model("{ a = Identity(t) }", "{ n = Neg(x)  i = Identity(n)  b = Relu(i) }",
                      prelude="t = Relu(x)")
    before = model.clone()
    result = EliminateIdentitiesPass()(model)
    assert result.stats == {"nodes_removed": 1}
    assert op_types(model) == ["Relu", "If", "Identity", "Neg", "Relu"]
    _assert_same_if_outputs(before, model)


def test_eliminate_identities_inside_a_function():
    model = model_from_text(f"""{H17_LOCAL}
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        {FUNCTION_HEADER}
        F (u) => (v) {{ i = Identity(u)  v = Relu(i) }}""")
    before = model.clone()
    assert EliminateIdentitiesPass()(model).stats == {"nodes_removed": 1}
    assert_same_outputs(before, model)


# eliminate-common-subexpressions --------------------------------------------------------


def test_cse_merges_two_identical_nodes():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ a = Relu(x)  b = Relu(x)  y = Add(a, b) }}""")
    before = model.clone()
    result = EliminateCommonSubexpressionsPass()(model)
    assert result.modified and result.stats == {"nodes_removed": 1, "graphs_skipped": 0}
    assert op_types(model) == ["Relu", "Add"]
    assert_same_outputs(before, model)
    assert not EliminateCommonSubexpressionsPass()(model).modified


def test_cse_keeps_nodes_that_differ_in_an_attribute():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ a = LeakyRelu<alpha = 0.1>(x)  b = LeakyRelu<alpha = 0.2>(x)
                                         y = Add(a, b) }}""")
    assert not EliminateCommonSubexpressionsPass()(model).modified


def test_cse_merges_inside_if_branches():
    model = _if_model("{ p = Relu(x)  q = Relu(x)  a = Add(p, q) }")
    before = model.clone()
    assert EliminateCommonSubexpressionsPass()(model).stats["nodes_removed"] == 1
    _assert_same_if_outputs(before, model)


def test_cse_merges_inside_a_function():
    model = model_from_text(f"""{H17_LOCAL}
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        {FUNCTION_HEADER}
        F (u) => (v) {{ p = Relu(u)  q = Relu(u)  v = Add(p, q) }}""")
    before = model.clone()
    assert EliminateCommonSubexpressionsPass()(model).stats["nodes_removed"] == 1
    assert_same_outputs(before, model)


def test_cse_skips_a_graph_with_random_draws_it_would_merge():
    model = model_from_text(f"""{H17}
        g (float[2] p) => (float[2] y) {{ a = Bernoulli(p)  b = Bernoulli(p)  y = Add(a, b) }}""")
    result = EliminateCommonSubexpressionsPass()(model)
    assert not result.modified and result.stats["graphs_skipped"] == 1
    assert op_types(model).count("Bernoulli") == 2


def test_cse_skips_a_graph_with_a_type_attribute_instead_of_crashing():
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 16]>
        g (float[2] x) => (optional(seq(float[2])) o) {
            a = Relu(x)  b = Relu(x)
            o = Optional<type = seq(float[2])>()
        }""")
    assert EliminateCommonSubexpressionsPass()(model).stats["graphs_skipped"] == 1


# sort-topologically ---------------------------------------------------------------------


def test_sort_topologically_orders_a_shuffled_graph():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{ y = Neg(r)  r = Relu(x) }}""")
    result = SortTopologicallyPass()(model)
    assert result.modified and result.stats == {"nodes_moved": 2}
    assert op_types(model) == ["Relu", "Neg"]
    onnx.checker.check_model(ir.to_proto(model))
    assert not SortTopologicallyPass()(model).modified


def test_sort_topologically_orders_an_if_branch_and_a_function():
    model = model_from_text(f"""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (bool c, float[2] x) => (float[2] y) {{
            y = If(c) <then_branch = g1 () => (float[2] a) {{ a = Neg(r)  r = Relu(x) }},
                       else_branch = g2 () => (float[2] b) {{ b = local.F(x) }}>
        }}
        {FUNCTION_HEADER}
        F (u) => (v) {{ v = Neg(r)  r = Relu(u) }}""")
    assert SortTopologicallyPass()(model).stats == {"nodes_moved": 4}
    assert op_types(model) == ["If", "Relu", "Neg", "F", "Relu", "Neg"]
    _assert_same_if_outputs(model, model)


# infer-shapes ---------------------------------------------------------------------------


def test_infer_shapes_annotates_intermediate_values():
    model = model_from_text(f"""{H17}
        g (float[2,3] x) => (float[3,2] y) {{ r = Relu(x)  y = Transpose(r) }}""")
    result = InferShapesPass()(model)
    assert result.modified and result.stats == {"values_refined": 1}
    relu_out = model.graph.node(0).outputs[0]
    assert relu_out.dtype == ir.DataType.FLOAT and relu_out.shape == [2, 3]
    assert not InferShapesPass()(model).modified


def test_infer_shapes_annotates_if_branch_values():
    model = _if_model("{ r = Relu(x)  a = Neg(r) }")
    assert InferShapesPass()(model).modified
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert then_branch.node(0).outputs[0].shape == [2]


def test_infer_shapes_gives_an_untyped_sequence_a_sequence_type():
    # onnx_ir's ShapeInferencePass would declare it a float tensor.
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[4] y) {{ s = SequenceConstruct(x, x)  y = ConcatFromSequence<axis = 0>(s) }}""")
    assert InferShapesPass()(model).stats == {"values_refined": 1}
    assert model.graph.node(0).outputs[0].type == ir.SequenceType(ir.TensorType(ir.DataType.FLOAT))
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_infer_shapes_leaves_a_model_that_contradicts_inference_unchanged():
    model = model_from_text(f"""{H17}
        g (float[2,3] x) => (float[5] y) {{ r = Relu(x)  y = Neg(r) }}""")
    result = InferShapesPass()(model)
    assert not result.modified and result.stats["values_refined"] == 0
    assert "differ" in result.stats["inference_error"]
    assert model.graph.outputs[0].shape == [5] and model.graph.node(0).outputs[0].shape is None


def test_infer_shapes_with_data_prop_resolves_a_computed_reshape():
    text = f"""{H17}
        g (float[2,3] x) => (float[?,?] y) {{ s = Shape(x)  r = Relu(x)  y = Reshape(r, s) }}"""
    plain, propagated = model_from_text(text), model_from_text(text)
    InferShapesPass()(plain)
    InferShapesPass(data_prop=True)(propagated)
    assert plain.graph.outputs[0].shape != [2, 3]
    assert propagated.graph.outputs[0].shape == [2, 3]


def test_infer_shapes_leaves_external_data_unread(tmp_path):
    weights = np.arange(1024, dtype=np.float32)
    model = model_from_text(f"""{H17}
        g (float[1024] x) => (float[1024] y) {{ r = Add(x, w)  y = Relu(r) }}""")
    model.graph.register_initializer(ir.Value(name="w", const_value=ir.tensor(weights, name="w")))
    path = tmp_path / "m.onnx"
    ir.save(model, path, external_data="m.data")
    loaded = ir.load(path)
    (tmp_path / "m.data").unlink()  # reading the weights now would fail
    result = InferShapesPass()(loaded)
    assert result.stats == {"values_refined": 1}
    assert isinstance(loaded.graph.initializers["w"].const_value, ir.ExternalTensor)
    assert [v.name for v in loaded.graph.inputs] == ["x"]


# a real model ---------------------------------------------------------------------------


def test_cleanup_family_on_the_bundled_pp_ocr_classifier(cls_path):
    model = ir.load(cls_path)
    before = model.clone()
    specs = onnxopt.parse_pipeline(["cleanup"])
    stats = {spec.name: spec.make_pass()(model).stats for spec in specs}
    assert stats["lift-constants"]["constants_lifted"] == 308
    assert stats["fold-constants"]["nodes_removed"] > 0
    assert stats["rewrite-patterns"]["batchnorm_rewrites"] == 35
    assert len(op_types(model)) <= 179  # onnxslim 0.1.98 leaves 179 of the 566 nodes
    onnx.checker.check_model(ir.to_proto(model), full_check=True)  # opset 11 stays opset 11
    assert_same_outputs(before, model, sample_feeds("ppocr_cls", count=1)[0])
    assert not any(spec.make_pass()(model).modified for spec in specs)
