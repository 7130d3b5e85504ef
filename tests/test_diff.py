"""`onnxopt diff`: structural differences, matching by structure, and the first diverging tensor."""

from __future__ import annotations

import json

import onnx
from onnx import numpy_helper

from onnxopt import api, ort_run
from onnxopt.cli import main
from onnxopt.diff import structurally_equal
from onnxopt.model_io import load_model
from onnxopt.models import builders
from onnxopt.tensor_capture import comparable_names, compare_tensors


def _pair(tmp_path, first_node_name: str | None = None):
    """The MLP and a copy whose fc2 weight is 1.1x (the first node renamed in both if asked)."""
    model = builders.build_mlp()
    if first_node_name is not None:
        model.graph.node[0].name = first_node_name
    a = tmp_path / "a.onnx"
    onnx.save(model, a)
    weight = next(t for t in model.graph.initializer if t.name == "fc2_weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.1, "fc2_weight"))
    b = tmp_path / "b.onnx"
    onnx.save(model, b)
    return a, b


def test_a_perturbed_weight_names_its_consumer_first(tmp_path):
    a, b = _pair(tmp_path)
    result = api.diff(a, b, tensors=True)
    structure = result["structure"]
    assert structure["initializers_changed"] == []  # same dtype and shape
    assert structure["initializers_values_changed"] == ["fc2_weight"]
    first = result["tensors"]["first_divergence"]
    consumers = [n for n in onnx.load(a).graph.node if "fc2_weight" in n.input]
    assert first["op"] == consumers[0].op_type
    assert first["tensor"] == consumers[0].output[0]
    assert first["cosine"] < 1.0 and first["max_abs"] > 0
    rows = result["tensors"]["rows"]
    upstream = rows[: rows.index(first)]
    assert upstream and all(r["exact"] for r in upstream)


def test_a_model_against_itself_has_no_differences(tmp_path, capsys):
    a, _ = _pair(tmp_path)
    assert main(["diff", str(a), str(a), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "no tensor diverges" in out and "structure: no differences" in out
    result = api.diff(a, a, tensors=True)
    assert structurally_equal(result["structure"])
    assert result["tensors"]["compared"] == len(onnx.load(a).graph.node)
    assert all(r["exact"] for r in result["tensors"]["rows"])


def test_a_cleaned_copy_differs_in_structure_only(tmp_path):
    a = tmp_path / "cnn.onnx"
    onnx.save(builders.build_cnn(), a)
    b = tmp_path / "clean.onnx"
    assert api.optimize(a, b, ["cleanup"]).ok
    result = api.diff(a, b, tensors=True)
    structure = result["structure"]
    assert structure["op_delta"].get("BatchNormalization") == -1  # folded into the stem Conv
    assert not structurally_equal(structure)
    tensors = result["tensors"]
    assert tensors["compared"] >= 10 and tensors["first_divergence"] is None
    # the stem Conv's own output is not paired with the fused Conv (it computes stem_bn now)
    assert "stem" not in {r["tensor"] for r in tensors["rows"]} and "stem_bn" in {r["tensor"] for r in tensors["rows"]}


def test_renamed_nodes_and_tensors_are_matched_by_structure(tmp_path):
    model = builders.build_cnn()
    a = tmp_path / "a.onnx"
    onnx.save(model, a)
    renames = {out: f"t{i}" for i, node in enumerate(model.graph.node) for out in node.output
               if out not in {o.name for o in model.graph.output}}
    for i, node in enumerate(model.graph.node):
        node.name = f"renamed_{i}"
        node.input[:] = [renames.get(x, x) for x in node.input]
        node.output[:] = [renames.get(x, x) for x in node.output]
    b = tmp_path / "b.onnx"
    onnx.save(model, b)
    result = api.diff(a, b, tensors=True)
    structure = result["structure"]
    assert structure["nodes_matched"] == {"structure": len(model.graph.node)}
    assert not structure["nodes_added"] and not structure["nodes_removed"]
    rows = result["tensors"]["rows"]
    assert len(rows) == len(model.graph.node) and all(r["exact"] for r in rows)
    assert rows[0]["tensor"] == "stem" and rows[0]["tensor_b"] == "t0"


def test_tensors_are_captured_in_bounded_chunks(tmp_path, monkeypatch):
    a, b = _pair(tmp_path)
    model_a, model_b = load_model(a), load_model(b)
    names, _ = comparable_names(model_a)
    pairs = [(n, n) for n in names]
    feeds = api.make_feeds(model_a, None)[0]
    whole = compare_tensors(model_a, model_b, pairs, feeds)
    sessions = []
    real = ort_run.make_session
    monkeypatch.setattr(ort_run, "make_session", lambda model, **kw: sessions.append(1) or real(model, **kw))
    chunked = compare_tensors(model_a, model_b, pairs, feeds, memory_budget_mb=1e-6, first_chunk=1)
    assert len(names) > 4 and len(sessions) == 2 * (1 + -(-(len(names) - 1) // 4))  # 1, then chunks of 4
    assert {n: (s.equal, s.metrics()) for n, s in chunked.items()} == {n: (s.equal, s.metrics()) for n, s in whole.items()}


def test_structural_diff_reports_op_changes_and_json(tmp_path, capsys):
    model = builders.build_mlp()
    a = tmp_path / "a.onnx"
    onnx.save(model, a)
    model.graph.node.append(onnx.helper.make_node("Identity", [model.graph.output[0].name], ["extra"]))
    model.graph.output.append(onnx.helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT, None))
    b = tmp_path / "b.onnx"
    onnx.save(model, b)
    structure = api.diff(a, b)["structure"]
    assert structure["op_delta"] == {"Identity": 1} and structure["outputs_changed"]
    assert main(["diff", str(a), str(b), "--json", "--tensors"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["structure"]["op_delta"] == {"Identity": 1}
    assert document["tensors"]["first_divergence"] is None


def test_the_real_classifier_against_its_cleaned_copy(tmp_path, cls_path):
    dims = {"x.2": 48, "x.3": 192}
    cleaned = tmp_path / "clean.onnx"
    assert api.optimize(cls_path, cleaned, ["cleanup"], dims=dims).ok
    result = api.diff(cls_path, cleaned, tensors=True, dims=dims, samples=2)
    structure = result["structure"]
    assert structure["op_delta"]["BatchNormalization"] < 0 and structure["constants_lifted"]
    assert structure["nodes_matched"]["structure"] > 0  # the renamed Convs
    assert result["tensors"]["compared"] > 100 and result["tensors"]["first_divergence"] is None
