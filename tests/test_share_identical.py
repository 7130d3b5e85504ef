"""merge-identical-weights: one copy of bit-identical weights, across If bodies, never across functions."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import assert_same_outputs, model_from_text, op_types, run_ort
from onnx import numpy_helper

import onnxopt
from onnxopt.models import sample_feeds, zoo
from onnxopt.passes.share import MergeIdenticalWeightsPass

RNG = np.random.default_rng(0)
W = RNG.standard_normal((3, 4)).astype(np.float32)
V = RNG.standard_normal((3, 4)).astype(np.float32)


def with_arrays(text: str, **arrays: np.ndarray) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    return ir.from_proto(proto)


def literal(array: np.ndarray) -> str:
    return "{" + ",".join(repr(float(v)) for v in array.reshape(-1)) + "}"


TWO_MATMULS = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,4] y1, float[2,4] y2) { y1 = MatMul(x, w1)  y2 = MatMul(x, w2) }"""


def test_two_matmuls_read_one_initializer():
    model = with_arrays(TWO_MATMULS, w1=W, w2=W.copy())
    before = model.clone()
    result = MergeIdenticalWeightsPass()(model)
    assert result.modified and result.stats["initializers_merged"] == 1
    assert result.stats["bytes_saved"] == W.nbytes
    assert list(model.graph.initializers) == ["w1"]
    assert [n.inputs[1].name for n in model.graph] == ["w1", "w1"]
    assert_same_outputs(before, model)
    assert not MergeIdenticalWeightsPass()(model).modified  # idempotent


def test_different_or_signed_zero_weights_stay_apart():
    zeros, negative_zeros = np.zeros((3, 4), np.float32), -np.zeros((3, 4), np.float32)
    for a, b in ((W, V), (zeros, negative_zeros)):
        model = with_arrays(TWO_MATMULS, w1=a, w2=b)
        result = MergeIdenticalWeightsPass()(model)
        assert not result.modified and result.stats["initializers_merged"] == 0
        assert len(model.graph.initializers) == 2


BRANCHES = f"""<ir_version: 10, opset_import: ["" : 17]>
g (float[2,3] x, bool flag) => (float[2,4] y) {{
    y = If(flag) <
        then_branch = t () => (float[2,4] ty) {{ tw = Constant<value = float[3,4] {literal(W)}>()  ty = MatMul(x, tw) }},
        else_branch = e () => (float[2,4] ey) {{
            ew = Constant<value = float[3,4] {literal(W)}>()
            em = MatMul(x, ew)
            ey = Relu(em) }}>
}}"""


def test_copies_in_sibling_branches_move_to_the_enclosing_graph():
    model = model_from_text(BRANCHES)
    before = model.clone()
    result = MergeIdenticalWeightsPass()(model)
    assert result.stats["initializers_merged"] == 1 and result.stats["bytes_saved"] == W.nbytes
    assert op_types(model) == ["Constant", "If", "MatMul", "MatMul", "Relu"]  # one Constant, in the main graph
    shared = model.graph[0].outputs[0]
    assert {use.node.graph.name for use in shared.uses()} == {"t", "e"}
    for flag in (True, False):
        feeds = {"x": RNG.standard_normal((2, 3)).astype(np.float32), "flag": np.array(flag)}
        assert_same_outputs(before, model, feeds)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_body_copy_of_an_outer_initializer_reads_the_outer_one():
    model = with_arrays(f"""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,3] x, bool flag) => (float[2,4] y) {{
        a = MatMul(x, w)
        y = If(flag) <
            then_branch = t () => (float[2,4] ty) {{ tw = Constant<value = float[3,4] {literal(W)}>()  ty = MatMul(x, tw) }},
            else_branch = e () => (float[2,4] ey) {{ ey = Identity(a) }}>
    }}""", w=W)
    before = model.clone()
    result = MergeIdenticalWeightsPass()(model)
    assert result.stats["initializers_merged"] == 1
    assert op_types(model) == ["MatMul", "If", "MatMul", "Identity"]
    then_matmul = next(n for n in onnxopt.all_nodes(model) if n.graph.name == "t")
    assert then_matmul.inputs[1] is model.graph.initializers["w"]
    assert_same_outputs(before, model, {"x": np.ones((2, 3), np.float32), "flag": np.array(True)})


def test_function_constants_are_not_shared_with_the_main_graph():
    model = with_arrays(f"""<ir_version: 10, opset_import: ["" : 17, "local" : 1]>
    g (float[2,3] x) => (float[2,4] y) {{ a = MatMul(x, w)  b = local.f(x)  y = Add(a, b) }}
    <domain: "local", opset_import: ["" : 17]>
    f (fx) => (fy) {{ fw = Constant<value = float[3,4] {literal(W)}>()  fy = MatMul(fx, fw) }}""", w=W)
    result = MergeIdenticalWeightsPass()(model)
    assert not result.modified


def test_graph_input_initializers_are_left_alone_and_bad_options_refused():
    model = with_arrays("""<ir_version: 10, opset_import: ["" : 17]>
    g (float[2,3] x, float[3,4] w1) => (float[2,4] y1, float[2,4] y2) { y1 = MatMul(x, w1)  y2 = MatMul(x, w2) }""",
                        w1=W, w2=W.copy())
    assert not MergeIdenticalWeightsPass()(model).modified
    with pytest.raises(ValueError, match="min_bytes"):
        MergeIdenticalWeightsPass(min_bytes=-1)


def test_min_bytes_leaves_small_constants():
    model = with_arrays(TWO_MATMULS, w1=W, w2=W.copy())
    assert not MergeIdenticalWeightsPass(min_bytes=W.nbytes + 1)(model).modified
    assert MergeIdenticalWeightsPass(min_bytes=W.nbytes)(model).stats["initializers_merged"] == 1


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_rec_v4", "ppocr_det_v4", "silero_vad"])
def test_zoo_models_keep_their_outputs(name):
    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    model, reference = ir.load(path), ir.load(path)
    MergeIdenticalWeightsPass()(model)
    for feed in sample_feeds(name, 2, seed=1):
        for want, got in zip(run_ort(reference, feed), run_ort(model, feed)):
            np.testing.assert_array_equal(want, got)


def test_bundled_classifier_keeps_its_outputs(cls_path):
    model, reference = ir.load(cls_path), ir.load(cls_path)
    result = MergeIdenticalWeightsPass()(model)
    x = {"x": np.random.default_rng(1).uniform(-1, 1, (1, 3, 48, 192)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(reference, x)[0], run_ort(model, x)[0])
    assert result.modified == (result.stats["initializers_merged"] > 0)
