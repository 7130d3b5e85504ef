"""rewrite-patterns: one rule set per test, outputs checked in ORT, and the guards around them."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.models import sample_feeds
from onnxopt.passes.cleanup import RemoveUnusedPass
from onnxopt.passes.cleanup.fold import FoldConstantsPass
from onnxopt.passes.cleanup.lift import LiftConstantsPass
from onnxopt.passes.cleanup.rewrite import RULE_SETS, RewritePatternsPass

from helpers import assert_same_outputs, model_from_text, op_types

H17 = '<ir_version: 8, opset_import: ["" : 17]>'
H17_LOCAL = '<ir_version: 8, opset_import: ["" : 17, "local" : 1]>'
# A 1x1 convolution from 2 to 3 channels and a batch norm over its 3 channels.
CONV = "float[3,2,1,1] w = {1., 2., 3., 4., 5., 6.}"
NORM = ("float[3] s = {1., 2., 3.}, float[3] b = {0.1, 0.2, 0.3}, "
        "float[3] mu = {0.5, 0., -1.}, float[3] var = {1., 4., 0.25}")
ONES = ", ".join(["1."] * 12)


def _rewritten(text: str, **options) -> tuple[ir.Model, ir.Model, onnxopt.PassResult]:
    """The model, its rewrite (dead leftovers removed) and the pass result; outputs compared."""
    model = model_from_text(text)
    before = model.clone()
    result = RewritePatternsPass(**options)(model)
    RemoveUnusedPass()(model)
    assert_same_outputs(before, model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    return before, model, result


def _applied(result: onnxopt.PassResult) -> dict[str, int]:
    return {k: v for k, v in result.stats.items() if k.endswith("_rewrites") and v}


def test_rewrite_patterns_is_idempotent_and_does_nothing_to_a_clean_model():
    text = f"""{H17}
        g (float[2,3] x) => (float[2,3] y) <float[1] one = {{1.}}> {{ m = Mul(x, one)  y = Relu(m) }}"""
    _, model, result = _rewritten(text)
    assert result.modified and _applied(result) == {"no_op_rewrites": 1}
    assert not RewritePatternsPass()(model).modified
    clean = model_from_text(f"{H17} g (float[2,3] x) => (float[2,3] y) {{ y = Relu(x) }}")
    assert not RewritePatternsPass()(clean).modified


def test_unknown_rule_sets_are_refused_before_any_model_is_loaded():
    with pytest.raises(onnxopt.UsageError, match="unknown rule set 'fuse-everything'"):
        onnxopt.parse_pipeline(["rewrite-patterns:rules=[batchnorm,fuse-everything]"])
    names = [s.options.rules for s in onnxopt.parse_pipeline(["rewrite-patterns:rules=[batchnorm,no-op]"])]
    assert names == [("batchnorm", "no-op")]
    assert list(RULE_SETS) == ["no-op", "slices", "casts", "transposes", "reshapes", "reshape-infer-dim",
                               "conv-bias", "batchnorm", "pad-conv", "gemm"]


# no-op ----------------------------------------------------------------------------------


def test_no_op_removes_mul_by_a_one_element_one_and_add_of_zeros():
    _, model, result = _rewritten(f"""{H17}
        g (float[2,3] x) => (float[2,3] y) <float[1] one = {{1.}}, float[3] zeros = {{0., 0., 0.}}> {{
            a = Add(x, zeros)
            y = Mul(one, a)
        }}""")
    assert op_types(model) == ["Identity", "Identity"]  # eliminate-identities removes them
    assert result.stats["no_op_rewrites"] == 2


def test_no_op_keeps_a_constant_that_is_only_nearly_neutral():
    # onnxscript's own rule matches x * 1.000001 (a tolerance compare).
    _, model, _ = _rewritten(f"""{H17}
        g (float[2] x) => (float[2] y) <float one = {{1.000001}}> {{ y = Mul(x, one) }}""")
    assert op_types(model) == ["Mul"]


def test_no_op_keeps_an_add_that_broadcasting_makes_larger():
    _, model, _ = _rewritten(f"""{H17}
        g (float[3] x) => (float[2,3] y) <float[2,1] zeros = {{0., 0.}}> {{ y = Add(x, zeros) }}""")
    assert op_types(model) == ["Add"]


def test_no_op_leaves_zero_minus_x():
    _, model, _ = _rewritten(f"""{H17}
        g (float[2] x) => (float[2] y) <float zero = {{0.}}> {{ y = Sub(zero, x) }}""")
    assert op_types(model) == ["Sub"]


# conv-bias ------------------------------------------------------------------------------


def test_conv_bias_folds_a_per_channel_add_into_the_convolution():
    _, model, result = _rewritten(f"""{H17}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) <{CONV}, float[1,3,1,1] c = {{0.5, -1., 2.}}> {{
            t = Conv(x, w)
            y = Add(c, t)
        }}""")
    assert op_types(model) == ["Conv"] and result.stats["conv_bias_rewrites"] == 1


def test_conv_bias_adds_to_an_existing_bias_of_a_conv_transpose():
    _, model, _ = _rewritten(f"""{H17}
        g (float[1,3,2,2] x) => (float[1,2,4,4] y) <float[3,2,2,2] w = {{1., 2., 3., 4., 5., 6., 7., 8.,
            9., 10., 11., 12., 13., 14., 15., 16., 17., 18., 19., 20., 21., 22., 23., 24.}},
            float[2] b = {{0.5, 1.5}}, float c = {{3.}}> {{
            t = ConvTranspose<strides = [2, 2]>(x, w, b)
            y = Add(t, c)
        }}""")
    assert op_types(model) == ["ConvTranspose"]


def test_conv_bias_keeps_an_add_that_varies_over_space():
    _, model, _ = _rewritten(f"""{H17}
        g (float[1,2,1,2] x) => (float[1,3,1,2] y) <{CONV}, float[2] c = {{1., 2.}}> {{
            t = Conv(x, w)
            y = Add(t, c)
        }}""")
    assert op_types(model) == ["Conv", "Add"]


# batchnorm ------------------------------------------------------------------------------


def test_batchnorm_folds_into_the_convolution_before_it():
    _, model, result = _rewritten(f"""{H17}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) <{CONV}, {NORM}> {{
            t = Conv(x, w)
            y = BatchNormalization(t, s, b, mu, var)
        }}""")
    assert op_types(model) == ["Conv"] and result.stats["batchnorm_rewrites"] == 1


def test_batchnorm_in_training_mode_is_not_folded():
    _, model, result = _rewritten(f"""{H17}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) <{CONV}, {NORM}> {{
            t = Conv(x, w)
            y, running_mean, running_var = BatchNormalization<training_mode = 1>(t, s, b, mu, var)
        }}""")
    assert op_types(model) == ["Conv", "BatchNormalization"]
    assert result.stats["refusal_reasons"] == {"batch normalization is not in inference mode": 1}


def test_batchnorm_in_an_if_branch_with_the_branch_weights():
    model = model_from_text(f"""{H17}
        g (bool c, float[1,2,2,2] x) => (float[1,3,2,2] y) <float[1,3,2,2] k = {{{ONES}}}> {{
            y = If(c) <then_branch = g1 () => (float[1,3,2,2] a) <{CONV}, {NORM}> {{
                           t = Conv(x, w)
                           a = BatchNormalization(t, s, b, mu, var) }},
                       else_branch = g2 () => (float[1,3,2,2] a2) {{ a2 = Identity(k) }}>
        }}""")
    before = model.clone()
    assert RewritePatternsPass(rules=("batchnorm",))(model).stats["batchnorm_rewrites"] == 1
    assert op_types(model) == ["If", "Conv", "Identity"]
    for flag in (True, False):
        feeds = {"c": np.array(flag), "x": np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2)}
        assert_same_outputs(before, model, feeds)


def test_batchnorm_in_an_if_branch_does_not_shadow_the_outer_weights():
    # The fusion writes the fused weight under the old weight's name: inside the branch that
    # would be a second value named w, shadowing the outer initializer.
    model = model_from_text(f"""{H17}
        g (bool c, float[1,2,2,2] x) => (float[1,3,2,2] y) <{CONV}, {NORM}, float[1,3,2,2] k = {{{ONES}}}> {{
            y = If(c) <then_branch = g1 () => (float[1,3,2,2] a) {{
                           t = Conv(x, w)
                           a = BatchNormalization(t, s, b, mu, var) }},
                       else_branch = g2 () => (float[1,3,2,2] a2) {{ a2 = Identity(k) }}>
        }}""")
    result = RewritePatternsPass(rules=("batchnorm",))(model)
    assert not result.modified
    assert result.stats["refusal_reasons"] == {"shadows an outer-scope value": 1}


# gemm -----------------------------------------------------------------------------------


def test_gemm_replaces_matmul_plus_bias():
    _, model, result = _rewritten(f"""{H17}
        g (float[2,3] a) => (float[2,4] y) <float[3,4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.}},
                                            float[4] c = {{1., 2., 3., 4.}}> {{
            t = MatMul(a, w)
            y = Add(t, c)
        }}""")
    assert op_types(model) == ["Gemm"] and result.stats["gemm_rewrites"] == 1


def test_gemm_keeps_an_add_that_broadcasts_the_product_to_rank_3():
    _, model, result = _rewritten(f"""{H17}
        g (float[2,3] a) => (float[2,2,4] y) <float[3,4] w = {{1., 2., 3., 4., 5., 6., 7., 8., 9., 10., 11., 12.}},
                                              float[2,1,4] c = {{1., 2., 3., 4., 5., 6., 7., 8.}}> {{
            t = MatMul(a, w)
            y = Add(t, c)
        }}""")
    assert op_types(model) == ["MatMul", "Add"] and result.stats["rewrites_refused"] == 1


# pad-conv -------------------------------------------------------------------------------


def test_pad_conv_moves_zero_padding_into_the_convolution():
    _, model, _ = _rewritten("""<ir_version: 8, opset_import: ["" : 13]>
        g (float[1,1,3,3] x) => (float[1,1,5,5] y) <float[1,1,1,1] w = {2.}, int64[8] pads = {0, 0, 1, 1, 0, 0, 1, 1}> {
            p = Pad(x, pads)
            y = Conv(p, w)
        }""")
    assert op_types(model) == ["Conv"]


def test_pad_conv_refuses_an_opset_10_pad_instead_of_crashing():
    # onnxscript's rule reads the pads input, which opset 10 keeps as an attribute.
    _, model, result = _rewritten("""<ir_version: 5, opset_import: ["" : 10]>
        g (float[1,1,3,3] x) => (float[1,1,5,5] y) <float[1,1,1,1] w = {2.}> {
            p = Pad<pads = [0, 0, 1, 1, 0, 0, 1, 1]>(x)
            y = Conv(p, w)
        }""")
    assert op_types(model) == ["Pad", "Conv"]
    assert result.stats["refusal_reasons"] == {"raised IndexError": 1}


# casts, slices, transposes --------------------------------------------------------------


def test_casts_merge_int8_to_float16_through_float():
    _, model, _ = _rewritten(f"""{H17}
        g (int8[3] x) => (float16[3] y) {{ a = Cast<to = 1>(x)  y = Cast<to = 10>(a) }}""")
    assert op_types(model) == ["Cast"]


def test_casts_keep_double_to_float16_through_float():
    # Rounding to float, then to float16, is not always rounding to float16 once.
    _, model, result = _rewritten(f"""{H17}
        g (double[3] x) => (float16[3] y) {{ a = Cast<to = 1>(x)  y = Cast<to = 10>(a) }}""")
    assert op_types(model) == ["Cast", "Cast"]
    assert result.stats["refusal_reasons"] == {"the first cast may round": 1}


def test_slices_drop_a_slice_that_takes_everything():
    _, model, _ = _rewritten(f"""{H17}
        g (float[4,3] x) => (float[4,3] y) <int64[1] zero = {{0}}, int64[1] end = {{9223372036854775807}},
                                          int64[1] axis = {{0}}, int64[1] step = {{1}}> {{
            s = Slice(x, zero, end, axis, step)
            y = Relu(s)
        }}""")
    assert op_types(model) == ["Identity", "Relu"]


def test_transposes_cancel_an_inverse_pair():
    _, model, _ = _rewritten(f"""{H17}
        g (float[2,3,4] x) => (float[2,3,4] y) {{
            a = Transpose<perm = [1, 2, 0]>(x)
            y = Transpose<perm = [2, 0, 1]>(a)
        }}""")
    assert op_types(model) == ["Identity"]


# reshapes -------------------------------------------------------------------------------


def test_reshapes_copy_the_dimensions_a_shape_computation_takes_from_the_data():
    _, model, result = _rewritten(f"""{H17}
        g (float[2,3,4] x) => (float[2,12] y) <int64[1] zero = {{0}}, int64[1] one = {{1}}, int64[1] rest = {{-1}}> {{
            s = Shape(x)
            head = Slice(s, zero, one)
            shape = Concat<axis = 0>(head, rest)
            y = Reshape(x, shape)
        }}""", rules=("reshapes",))
    assert op_types(model) == ["Reshape"] and result.stats["reshapes_rewrites"] == 1
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), [0, -1])


def test_reshape_infer_dim_turns_the_one_computed_dimension_into_minus_one():
    text = f"""{H17}
        g (float[2,3,4] x, float[5,3] q) => (float[2,3,4] y) <int64[1] zero = {{0}}, int64[1] one = {{1}},
                                                            int64[1] two = {{2}}, int64[1] four = {{4}}> {{
            s = Shape(q)
            mid = Slice(s, one, two)
            shape = Concat<axis = 0>(zero, mid, four)
            y = Reshape(x, shape)
        }}"""
    _, model, _ = _rewritten(text, rules=("reshapes",))
    assert op_types(model) == ["Shape", "Slice", "Concat", "Reshape"]  # no dimension of x
    _, model, result = _rewritten(text)
    assert op_types(model) == ["Reshape"] and result.stats["reshape_infer_dim_rewrites"] == 1
    np.testing.assert_array_equal(model.graph.node(0).inputs[1].const_value.numpy(), [0, -1, 4])


def test_reshape_infer_dim_works_out_the_length_of_a_piece_after_an_earlier_rewrite():
    # The first Reshape gets a constant shape; only then is y1's rank, and so the length
    # of the slice of its shape, known. One sweep does both.
    _, model, result = _rewritten(f"""{H17}
        g (float[2,3,4] x) => (float[2,3,4] y) <int64[1] rest = {{-1}}, int64[1] zero = {{0}}, int64[1] one = {{1}},
                                              int64[1] three = {{3}}, int64[1] four = {{4}}> {{
            s = Shape(x)
            head = Slice(s, zero, one)
            flat = Concat<axis = 0>(head, rest)
            y1 = Reshape(x, flat)
            t = Relu(y1)
            s2 = Shape(t)
            c2 = Cast<to = 6>(s2)
            d = Slice(c2, zero, one)
            d64 = Cast<to = 7>(d)
            back = Concat<axis = 0>(d64, three, four)
            y = Reshape(t, back)
        }}""")
    assert op_types(model) == ["Reshape", "Relu", "Reshape"]
    assert result.stats["reshapes_rewrites"] == 1 and result.stats["reshape_infer_dim_rewrites"] == 1


# subgraphs and functions ----------------------------------------------------------------


def test_rewrite_patterns_inside_a_loop_body():
    model = model_from_text(f"""{H17}
        g (int64 n, bool t, float[2] x0) => (float[2] x) {{
            x = Loop<body = body (int64 i, bool cond, float[2] acc) => (bool cond_out, float[2] acc_out)
                            <float[1] one = {{1.}}> {{
                cond_out = Identity(cond)
                m = Mul(acc, one)
                acc_out = Relu(m)
            }}>(n, t, x0)
        }}""")
    before = model.clone()
    assert RewritePatternsPass()(model).stats["no_op_rewrites"] == 1
    assert "Mul" not in op_types(model)
    feeds = {"n": np.array(3, np.int64), "t": np.array(True), "x0": np.array([1.0, -2.0], np.float32)}
    assert_same_outputs(before, model, feeds)


def test_rewrite_patterns_inside_a_function():
    model = model_from_text(f"""{H17_LOCAL}
        g (float[2] x) => (float[2] y) {{ y = local.F(x) }}
        <domain: "local", opset_import: ["" : 17]>
        F (u) => (v) {{ one = Constant<value = float {{1.}}>()  m = Mul(u, one)  v = Relu(m) }}""")
    before = model.clone()
    assert RewritePatternsPass()(model).stats["no_op_rewrites"] == 1
    assert "Mul" not in op_types(model)
    assert_same_outputs(before, model)


def test_rewrite_patterns_adds_no_initializer_to_a_function():
    model = model_from_text(f"""{H17_LOCAL}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) {{ y = local.F(x) }}
        <domain: "local", opset_import: ["" : 17]>
        F (u) => (v) {{
            w = Constant<value = float[3,2,1,1] {{1., 2., 3., 4., 5., 6.}}>()
            c = Constant<value = float[1,3,1,1] {{0.5, -1., 2.}}>()
            t = Conv(u, w)
            v = Add(t, c)
        }}""")
    result = RewritePatternsPass(rules=("conv-bias",))(model)
    assert result.stats["refusal_reasons"] == {"a function cannot hold initializers": 1}
    assert "Add" in op_types(model)


# a real model ---------------------------------------------------------------------------


def test_rewrite_patterns_on_the_bundled_pp_ocr_classifier(cls_path):
    model = ir.load(cls_path)
    LiftConstantsPass()(model)
    FoldConstantsPass()(model)  # the per-channel addends are Reshapes of constants until folded
    before = model.clone()
    result = RewritePatternsPass()(model)
    assert result.stats["batchnorm_rewrites"] == 35 and result.stats["conv_bias_rewrites"] == 18
    assert "BatchNormalization" not in op_types(model)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)  # opset 11 stays opset 11
    assert_same_outputs(before, model, sample_feeds("ppocr_cls", count=1)[0])
