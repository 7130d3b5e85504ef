"""`onnxopt diff`: structural differences and the first diverging tensor."""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxopt import api
from onnxopt.cli import main
from onnxopt.models import builders


def _pair(tmp_path):
    model = builders.build_mlp()
    a = tmp_path / "a.onnx"
    onnx.save(model, a)
    weight = next(t for t in model.graph.initializer if t.name == "fc2_weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, "fc2_weight"))
    b = tmp_path / "b.onnx"
    onnx.save(model, b)
    return a, b


def test_diff_names_changed_initializers_and_the_first_diverging_node(tmp_path):
    a, b = _pair(tmp_path)
    result = api.diff(a, b, tensors=True)
    assert result["structure"]["initializers_changed"] == []  # same dtype and shape
    first = result["tensors"]["first_divergence"]
    consumers = [n for n in onnx.load(a).graph.node if "fc2_weight" in n.input]
    assert first["op"] == consumers[0].op_type
    assert first["tensor"] == consumers[0].output[0]


def test_identical_models_have_no_divergence(tmp_path, capsys):
    a, _ = _pair(tmp_path)
    assert main(["diff", str(a), str(a), "--tensors"]) == 0
    assert "no tensor diverges" in capsys.readouterr().out


def test_structural_diff_reports_op_changes(tmp_path):
    model = builders.build_mlp()
    a = tmp_path / "a.onnx"
    onnx.save(model, a)
    model.graph.node.append(onnx.helper.make_node("Identity", [model.graph.output[0].name], ["extra"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    b = tmp_path / "b.onnx"
    onnx.save(model, b)
    structure = api.diff(a, b)["structure"]
    assert structure["op_delta"] == {"Identity": 1} and structure["outputs_changed"]
