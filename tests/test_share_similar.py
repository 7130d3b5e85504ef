"""merge-similar-weights (tolerance, transpose, scale) and clip-weights (L2/L1 norms)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, model_from_text, op_types, run_ort
from onnx import numpy_helper

import onnxopt
from onnxopt.passes.share import ClipWeightsPass, MergeSimilarWeightsPass
from onnxopt.passes.share.clip import clip_array

RNG = np.random.default_rng(0)
A = RNG.standard_normal((6, 4)).astype(np.float32)


def with_arrays(text: str, **arrays: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return ir.from_proto(proto)


TWO = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,6] x) => (float[2,4] y1, float[2,4] y2) { y1 = MatMul(x, a)  y2 = MatMul(x, b) }"""
TRANSPOSED = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,6] x, float[2,4] z) => (float[2,4] y1, float[2,6] y2) { y1 = MatMul(x, a)  y2 = MatMul(z, b) }"""


def feeds(model):
    return {v.name: RNG.standard_normal(tuple(v.shape)).astype(np.float32) for v in model.graph.inputs}


@pytest.mark.parametrize("text,b,ops,how", [
    (TWO, A * (1 + 1e-5), ["MatMul", "MatMul"], "a"),
    (TWO, -0.5 * A, ["Mul", "MatMul", "MatMul"], "a x -0.5"),
    (TRANSPOSED, A.T.copy(), ["Transpose", "MatMul", "MatMul"], "a transposed"),
    (TRANSPOSED, 2 * A.T, ["Transpose", "Mul", "MatMul", "MatMul"], "a transposed x 2"),
])
def test_similar_weight_is_rewritten_from_the_kept_one(text, b, ops, how):
    model, before = with_arrays(text, a=A, b=b), with_arrays(text, a=A, b=b)
    result = MergeSimilarWeightsPass()(model)
    assert result.stats["initializers_merged"] == 1 and result.stats["merged"] == {"b": how}
    assert list(model.graph.initializers) in (["a"], ["a", "b_scale"])
    assert op_types(model) == ops
    assert_same_outputs(before, model, feeds(before), rtol=1e-4, atol=1e-4)
    assert not MergeSimilarWeightsPass()(model).modified


def test_different_weights_and_disabled_forms_are_left():
    assert not MergeSimilarWeightsPass()(with_arrays(TWO, a=A, b=RNG.standard_normal(A.shape).astype(np.float32))).modified
    assert not MergeSimilarWeightsPass(scale=False)(with_arrays(TWO, a=A, b=2 * A)).modified
    assert not MergeSimilarWeightsPass(transpose=False)(with_arrays(TRANSPOSED, a=A, b=A.T.copy())).modified
    assert not MergeSimilarWeightsPass(rtol=0, atol=0, scale=False)(with_arrays(TWO, a=A, b=A * (1 + 1e-5))).modified
    with pytest.raises(ValueError, match="rtol"):
        MergeSimilarWeightsPass(rtol=-1)


def literal(array: np.ndarray) -> str:
    return "{" + ",".join(f"{v:.8g}" for v in array.reshape(-1)) + "}"


def test_scaled_copy_in_an_if_branch_reads_the_outer_weight_through_a_mul_in_the_branch():
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,6] x, bool flag) => (float[2,4] y) {{
        y = If(flag) <
            then_branch = t () => (float[2,4] ty) {{ ty = MatMul(x, a) }},
            else_branch = e () => (float[2,4] ey) {{ eb = Constant<value = float[6,4] {literal(3 * A)}>()  ey = MatMul(x, eb) }}>
    }}"""
    model, before = with_arrays(text, a=A), with_arrays(text, a=A)
    result = MergeSimilarWeightsPass()(model)
    assert result.stats["merged"] == {"eb": "a x 3"}
    else_branch = model.graph[0].attributes["else_branch"].as_graph()
    assert [n.op_type for n in else_branch] == ["Constant", "Mul", "MatMul"]  # the scale, the rebuild, the reader
    for flag in (True, False):
        x = {"x": RNG.standard_normal((2, 6)).astype(np.float32), "flag": np.array(flag)}
        np.testing.assert_allclose(run_ort(model, x)[0], run_ort(before, x)[0], rtol=1e-5, atol=1e-5)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_copies_in_sibling_branches_share_one_outer_copy():
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,6] x, bool flag) => (float[2,4] y) {{
        y = If(flag) <
            then_branch = t () => (float[2,4] ty) {{ ta = Constant<value = float[6,4] {literal(A)}>()  ty = MatMul(x, ta) }},
            else_branch = e () => (float[2,4] ey) {{ eb = Constant<value = float[4,6] {literal(A.T)}>()  eb_t = Transpose(eb)  ey = MatMul(x, eb_t) }}>
    }}"""
    model, before = model_from_text(text), model_from_text(text)
    result = MergeSimilarWeightsPass()(model)
    assert result.stats["initializers_merged"] == 1
    assert [n.op_type for n in model.graph] == ["Constant", "If"]  # the kept copy moved out of the then branch
    for flag in (True, False):
        x = {"x": RNG.standard_normal((2, 6)).astype(np.float32), "flag": np.array(flag)}
        np.testing.assert_allclose(run_ort(model, x)[0], run_ort(before, x)[0], rtol=1e-6, atol=1e-6)


# -- clip-weights --------------------------------------------------------------------------------
def test_clip_array_uses_the_l2_or_l1_norm():
    w = np.array([[0.1, -0.2, 10.0, 0.3]], np.float32)
    rms, mean_abs = np.sqrt(np.mean(w.astype(np.float64) ** 2)), np.mean(np.abs(w))
    np.testing.assert_allclose(clip_array(w, "l2", 1.0, None).max(), rms, rtol=1e-6)
    np.testing.assert_allclose(clip_array(w, "l1", 1.0, None).max(), mean_abs, rtol=1e-6)
    per_channel = clip_array(np.array([[1.0, 100.0], [1.0, 2.0]], np.float32), "l1", 1.0, 0)
    np.testing.assert_allclose(per_channel, [[1.0, 50.5], [1.0, 1.5]])


def test_clip_weights_clips_outliers_once_for_a_shared_weight_and_leaves_biases():
    w = RNG.standard_normal((6, 4)).astype(np.float32)
    w[0, 0] = 40.0
    model = with_arrays("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,6] x) => (float[2,4] y) { a = MatMul(x, w)  b = MatMul(x, w)  s = Add(a, b)  y = Add(s, bias) }""",
                        w=w, bias=np.full(4, 40.0, np.float32))
    result = ClipWeightsPass(factor=2.0, min_elements=0)(model)
    assert result.stats["weights_clipped"] == 1 and result.stats["clipped"] == {"w": 1}
    clipped = model.graph.initializers["w"].const_value.numpy()
    assert clipped.max() < 40.0 and (clipped == w).sum() == w.size - 1
    assert model.graph.initializers["bias"].const_value.numpy().max() == 40.0
    assert not ClipWeightsPass(factor=100.0, min_elements=0)(model).modified


def test_clip_weights_changes_constant_nodes_in_an_if_body_and_skips_weights_read_elsewhere():
    big = A.copy()
    big[1, 1] = 30.0
    text = f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,6] x, bool flag) => (float[2,4] y, float[6,4] raw) {{
        raw = Identity(other)
        y = If(flag) <
            then_branch = t () => (float[2,4] ty) {{ tw = Constant<value = float[6,4] {literal(big)}>()  ty = MatMul(x, tw) }},
            else_branch = e () => (float[2,4] ey) {{ ey = MatMul(x, other) }}>
    }}"""
    model = with_arrays(text, other=big)
    result = ClipWeightsPass(min_elements=0)(model)
    assert list(result.stats["clipped"]) == ["tw"] and "other" in result.stats["skipped"]
    then_branch = model.graph[-1].attributes["then_branch"].as_graph()
    assert then_branch[0].attributes["value"].as_tensor().numpy().max() < 30.0
    run_ort(model, {"x": np.ones((2, 6), np.float32), "flag": np.array(True)})
