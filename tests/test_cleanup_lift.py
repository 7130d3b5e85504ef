"""lift-constants: Constant nodes become initializers, in every graph that can hold one."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.models import sample_feeds
from onnxopt.passes.cleanup.lift import LiftConstantsPass

from helpers import assert_same_outputs, model_from_text, op_types

H17 = '<ir_version: 8, opset_import: ["" : 17]>'


def test_lift_constants_turns_every_constant_node_into_an_initializer():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) {{
            k = Constant<value = float[2] {{1., 2.}}>()
            n = Constant<value_float = 3.>()
            a = Add(x, k)
            y = Mul(a, n)
        }}""")
    before = model.clone()
    result = LiftConstantsPass()(model)
    assert result.modified
    assert result.stats == {"constants_lifted": 2, "constants_kept": 0, "initializers_added": 2}
    assert op_types(model) == ["Add", "Mul"]
    assert sorted(model.graph.initializers) == ["k", "n"]
    assert_same_outputs(before, model)
    assert not LiftConstantsPass()(model).modified


def test_lift_constants_does_nothing_without_constant_nodes():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y) <float[2] k = {{1., 2.}}> {{ y = Add(x, k) }}""")
    result = LiftConstantsPass()(model)
    assert not result.modified and result.stats["constants_lifted"] == 0


def test_lift_constants_lifts_into_the_if_branch_that_holds_the_constant():
    model = model_from_text(f"""{H17}
        g (bool c, float[2] x) => (float[2] y) {{
            outer = Constant<value = float[2] {{3., 4.}}>()
            y = If(c) <then_branch = g1 () => (float[2] a) {{
                           inner = Constant<value = float[2] {{1., 2.}}>()
                           a = Add(x, inner) }},
                       else_branch = g2 () => (float[2] b) {{ b = Mul(x, outer) }}>
        }}""")
    before = model.clone()
    assert LiftConstantsPass()(model).stats["constants_lifted"] == 2
    then_branch = model.graph.node(0).attributes["then_branch"].as_graph()
    assert list(model.graph.initializers) == ["outer"] and list(then_branch.initializers) == ["inner"]
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    for flag in (True, False):
        assert_same_outputs(before, model, {"c": np.array(flag), "x": np.array([1.5, -2.0], np.float32)})


def test_lift_constants_keeps_constants_in_functions_which_cannot_hold_initializers():
    model = model_from_text(f"""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        <domain: "local", opset_import: ["" : 17]>
        F (u) => (v) {{ k = Constant<value = float[2] {{1., 2.}}>()  v = Add(u, k) }}""")
    result = LiftConstantsPass()(model)
    assert not result.modified and result.stats["constants_kept"] == 1


def test_lift_constants_keeps_a_constant_that_is_a_graph_output():
    model = model_from_text(f"""{H17}
        g (float[2] x) => (float[2] y, float[2] k) {{ k = Constant<value = float[2] {{1., 2.}}>()  y = Add(x, k) }}""")
    assert not LiftConstantsPass()(model).modified
    assert op_types(model) == ["Constant", "Add"]


def test_lift_constants_lifts_nothing_below_ir_version_4():
    # There an initializer must also be a graph input: lifting would change the signature.
    model = model_from_text("""<ir_version: 3, opset_import: ["" : 8]>
        g (float[2] x) => (float[2] y) { k = Constant<value = float[2] {1., 2.}>()  y = Add(x, k) }""")
    result = LiftConstantsPass()(model)
    assert not result.modified and result.stats["constants_kept"] == 1


def test_lift_constants_size_limit_keeps_small_constants_as_nodes():
    model = model_from_text(f"""{H17}
        g (float[4] x) => (float[4] y) {{
            small = Constant<value = float[1] {{2.}}>()
            big = Constant<value = float[4] {{1., 2., 3., 4.}}>()
            a = Mul(x, small)
            y = Add(a, big)
        }}""")
    LiftConstantsPass(size_limit=4)(model)
    assert op_types(model) == ["Constant", "Mul", "Add"]
    with pytest.raises(onnxopt.UsageError, match="size_limit"):
        onnxopt.parse_pipeline(["lift-constants:size_limit=-1"])


def test_lift_constants_on_the_bundled_pp_ocr_classifier(cls_path):
    model = ir.load(cls_path)
    before = model.clone()
    result = LiftConstantsPass()(model)
    assert result.stats["constants_lifted"] > 300 and result.stats["constants_kept"] == 0
    assert "Constant" not in op_types(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert_same_outputs(before, model, sample_feeds("ppocr_cls", count=1)[0])
