"""`onnxopt reduce`: a failing model shrinks to the planted failing node."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from onnxopt import api
from onnxopt.cli import main
from onnxopt.models import builders


def _planted(tmp_path):
    """The CNN, and a copy whose branch_b Conv has a sign-flipped weight (the planted bug)."""
    model = builders.build_cnn()
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
    ref = tmp_path / "ref.onnx"
    onnx.save(model, ref)
    weight = next(t for t in model.graph.initializer if t.name == "branch_b_weight")
    weight.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(weight), "branch_b_weight"))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    target = next(n.name for n in model.graph.node if n.output[0] == "bb")
    return ref, bad, target


def test_reduce_against_a_reference_finds_the_planted_node(tmp_path):
    ref, bad, target = _planted(tmp_path)
    out = tmp_path / "reduced.onnx"
    summary = api.reduce(bad, out, budget="cosine=0.999", against=ref, samples=3)
    assert summary["nodes"] == [target] and summary["nodes_before"] == 17
    assert summary["inputs"] == ["pooled"] and summary["outputs"] == ["bb"]
    reduced = onnx.load(out)
    onnx.checker.check_model(reduced, full_check=True)
    inputs = np.load(summary["inputs_file"])
    assert inputs["pooled"].shape[0] == 3  # three samples of the original's intermediate value
    session = ort.InferenceSession(reduced.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pooled": inputs["pooled"][0]})[0]
    ref_model = onnx.load(ref)
    ref_model.graph.output.append(helper.make_tensor_value_info("bb", onnx.TensorProto.FLOAT, None))
    ref_model.graph.output.append(helper.make_tensor_value_info("pooled", onnx.TensorProto.FLOAT, None))
    full = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
    image = api.make_feeds(api.load_model(ref), None, samples=1)[0][0]["image"]
    want_bb, want_pooled = full.run(["bb", "pooled"], {"image": image})
    np.testing.assert_allclose(inputs["pooled"][0], want_pooled, rtol=1e-5, atol=1e-6)
    # the reduced model reproduces the divergence on the captured input
    assert np.corrcoef(got.ravel(), want_bb.ravel())[0, 1] < 0.5


def test_reduce_finds_the_node_ort_fails_on(tmp_path, capsys):
    model = builders.build_cnn()
    # plant a Reshape to an impossible size after the residual block
    shape = numpy_helper.from_array(np.array([7, -1, 5], np.int64), "bad_shape")
    model.graph.initializer.append(shape)
    index = next(i for i, n in enumerate(model.graph.node) if n.output[0] == "res")
    model.graph.node.insert(index + 1, helper.make_node("Reshape", ["res", "bad_shape"], ["res_bad"], name="planted"))
    model.graph.node.insert(index + 2, helper.make_node("Relu", ["res_bad"], ["res_bad_relu"], name="after"))
    model.graph.output.append(helper.make_tensor_value_info("res_bad_relu", onnx.TensorProto.FLOAT, None))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, bad)
    out = tmp_path / "reduced.onnx"
    assert main(["reduce", str(bad), "--budget", "none", "-o", str(out), "--samples", "2"]) == 0
    assert "reduced 19 nodes to 1 " in capsys.readouterr().out
    reduced = onnx.load(out)
    assert [n.name for n in reduced.graph.node] == ["planted"]
    assert [i.name for i in reduced.graph.input] == ["res"]


def test_reduce_with_a_check_command(tmp_path):
    model = builders.build_cnn()
    bad = tmp_path / "m.onnx"
    onnx.save(model, bad)
    out = tmp_path / "reduced.onnx"
    summary = api.reduce(bad, out, check="! grep -q MaxPool {}")  # failing while a MaxPool is in the file
    assert summary["ops"] == ["MaxPool"] and summary["inputs"] == ["res"]
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_reduce_refuses_a_model_that_does_not_fail_and_bad_usage(tmp_path):
    ref, _, _ = _planted(tmp_path)
    with pytest.raises(Exception, match="does not fail"):
        api.reduce(ref, tmp_path / "r.onnx", budget="cosine=0.999", against=ref)
    assert main(["reduce", str(ref), "-o", str(tmp_path / "r.onnx")]) == 2
