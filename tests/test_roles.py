"""Output roles: inference, declaration, each role's metric and its default floors."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxopt import api
from onnxopt.errors import UsageError
from onnxopt.metrics import Budget
from onnxopt.model_io import load_model
from onnxopt.models import builders
from onnxopt.role_metrics import measure
from onnxopt.roles import OutputRole, parse_role, parse_role_specs
from onnxopt.validation import Validator

ANCHORS = 64


def _yolo_head(drop_anchor: int | None = None) -> onnx.ModelProto:
    """A YOLOv8-style head: features [1, A, 8] -> boxes (cx, cy, w, h in pixels) and 2 sigmoid
    class scores, concatenated and transposed to [1, 4+2, A]. ``drop_anchor`` pushes that
    anchor's class logits down by 20 (a quantized model losing one detection)."""
    rng = np.random.default_rng(3)
    drop = np.zeros((1, ANCHORS, 2), np.float32)
    if drop_anchor is not None:
        drop[0, drop_anchor] = -20.0
    weights = {"wb": rng.standard_normal((8, 4)).astype(np.float32),
               "box_scale": np.array([[[120.0, 120.0, 12.0, 12.0]]], np.float32),
               "box_offset": np.array([[[40.0, 40.0, 8.0, 8.0]]], np.float32),
               "ws": rng.standard_normal((8, 2)).astype(np.float32),
               "score_bias": np.full((2,), -8.0, np.float32), "drop": drop}
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wb"], ["b_mm"]), helper.make_node("Abs", ["b_mm"], ["b_abs"]),
         helper.make_node("Mul", ["b_abs", "box_scale"], ["b_scaled"]),
         helper.make_node("Add", ["b_scaled", "box_offset"], ["boxes"]),
         helper.make_node("MatMul", ["x", "ws"], ["s_mm"]), helper.make_node("Add", ["s_mm", "score_bias"], ["s_b"]),
         helper.make_node("Add", ["s_b", "drop"], ["s_logits"]), helper.make_node("Sigmoid", ["s_logits"], ["scores"]),
         helper.make_node("Concat", ["boxes", "scores"], ["table"], axis=-1),
         helper.make_node("Transpose", ["table"], ["output0"], perm=[0, 2, 1])],
        "yolo_head", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, ANCHORS, 8])],
        [helper.make_tensor_value_info("output0", onnx.TensorProto.FLOAT, [1, 6, ANCHORS])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _feeds(count: int, shape=(1, ANCHORS, 8), seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _save(model: onnx.ModelProto, path):
    onnx.save(model, path)
    return path


def test_the_tiny_transformers_hidden_state_is_not_judged_by_argmax(tmp_path):
    path = _save(builders.build_transformer(), tmp_path / "t.onnx")
    result = api.optimize(path, tmp_path / "q.onnx", ["quantize-weights:bits=8,min_elements=16"],
                          dims={"seq": 6})
    hidden = result.report["outputs"]["hidden"]
    assert hidden["role"] == "raw" and not hidden["declared"] and "softmax" in hidden["why"]
    assert hidden["limits"] == {"cosine": 0.99}
    metrics = result.report["passes"][0]["fidelity_metrics"]["hidden"]
    assert "agreement" not in metrics and "sequence_agreement" not in metrics and metrics["cosine"] > 0.99


def test_a_yolo_style_head_is_inferred_as_boxes_and_a_dropped_box_fails_box_f1_not_cosine(tmp_path):
    feeds = _feeds(6)
    validator = Validator(load_model(_save(_yolo_head(), tmp_path / "ref.onnx")), feeds)
    role = validator.roles["output0"]
    assert role.role == "boxes" and role.param("layout") == "cxa" and "YOLOv8" in role.why
    # drop the most confident detection of feed 0 (NMS always keeps the top box)
    table = validator.reference["output0"][0][0]
    anchor = int(np.argmax(table[4:].max(axis=0)))
    assert table[4:, anchor].max() > 0.26
    dropped = load_model(_save(_yolo_head(drop_anchor=anchor), tmp_path / "cand.onnx"))
    comparison = validator.compare(dropped, Budget.parse(None))
    metrics = comparison.metrics["output0"]
    assert metrics["cosine"] > 0.9999  # the raw tensor barely moved
    boxes = metrics["boxes_reference"]  # one of n missing (or more: the anchor in other feeds) gives
    assert 2 <= boxes <= 20 and metrics["box_f1"] <= 2 * (boxes - 1) / (2 * boxes - 1) + 1e-9  # F1 <= this
    assert comparison.breaches == [f"output0: box_f1 {metrics['box_f1']:.6g} < 0.99"]
    assert validator.compare(load_model(tmp_path / "ref.onnx"), Budget.parse(None)).ok  # no-op: F1 1


def test_boxes_under_threshold_or_suppressed_by_nms_are_not_detections():
    role = OutputRole("boxes", params={"layout": "aoc", "box": "xyxy"})
    # [1, A=3, 5+1]: x0, y0, x1, y1, objectness, class score
    reference = np.array([[[0, 0, 10, 10, 0.9, 1.0], [1, 1, 10, 10, 0.8, 1.0], [50, 50, 60, 60, 0.2, 1.0]]],
                         np.float32)
    same = measure(role, [reference], [reference.copy()])
    assert same["boxes_reference"] == 1 and same["box_f1"] == 1.0  # anchor 1 suppressed, anchor 2 below 0.25
    moved = reference.copy()
    moved[0, 0, :4] = [30, 30, 40, 40]  # the detection moves away: a false box, and the one NMS
    assert measure(role, [reference], [moved])["box_f1"] == pytest.approx(2 / 3)  # had suppressed matches
    moved[0, 1, 4] = 0.1
    assert measure(role, [reference], [moved])["box_f1"] == 0.0  # a miss and a false box
    near = reference.copy()
    near[0, 2, 4] = 0.255  # a box at the threshold flips in: a tie, not a false positive
    assert measure(role, [reference], [near])["box_f1"] == 1.0


def test_a_declared_role_overrides_inference(mlp_path, tmp_path):
    feeds = _feeds(8, shape=(1, 100))
    model = load_model(mlp_path)
    assert Validator(model, feeds).roles["probs"].role == "scores"  # Softmax head
    declared = Validator(model, feeds, roles=parse_role_specs(["probs=embedding:nn_agreement=0.5"]))
    role = declared.roles["probs"]
    assert role.role == "embedding" and role.declared and role.floors == {"nn_agreement": 0.5}
    metrics = declared.compare(model).metrics["probs"]
    assert metrics["nn_agreement"] == 1.0 and metrics["cosine_worst"] == pytest.approx(1.0)
    assert "agreement" not in metrics
    assert Budget.parse(None).limits_for(role) == {"cosine": 0.99, "cosine_worst": 0.99, "nn_agreement": 0.5}


def test_cli_output_role_reaches_the_report_and_the_table(mlp_path, tmp_path, capsys):
    import json

    from onnxopt.cli import main

    code = main(["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "-p", "quantize-weights:bits=8",
                 "--output-role", "probs=probability:threshold=0.2", "--report", str(tmp_path / "r.json")])
    assert code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["outputs"]["probs"] == {"role": "probability", "declared": True, "why": "declared",
                                          "params": {"threshold": 0.2}, "floors": {},
                                          "limits": {"cosine": 0.99, "agreement": 0.99}}
    assert "output probs: probability (declared); cosine>=0.99, agreement>=0.99" in capsys.readouterr().out


def test_recipe_output_roles_are_declared(mlp_path, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("pipeline: [sort-topologically]\noutput_roles: {probs: raw}\n")
    result = api.optimize(mlp_path, tmp_path / "o.onnx", recipe=recipe, output_roles={})
    assert result.report["outputs"]["probs"]["role"] == "raw" and result.report["outputs"]["probs"]["declared"]


def test_bad_role_declarations_fail_clearly(mlp_path, tmp_path):
    with pytest.raises(UsageError, match="unknown output role 'logits'"):
        parse_role("logits")
    with pytest.raises(UsageError, match="has no option 'treshold'"):
        parse_role("probability:treshold=0.3")
    with pytest.raises(UsageError, match="layout must be"):
        parse_role("boxes:layout=xyz")
    with pytest.raises(UsageError, match="'nope', which is not an output; outputs: probs"):
        api.optimize(mlp_path, tmp_path / "o.onnx", ["sort-topologically"], output_roles=["nope=raw"])


def test_embedding_neighbour_agreement_catches_swapped_neighbours():
    role = OutputRole("embedding")
    base = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.2]], np.float32)
    same = measure(role, [base[i:i + 1] for i in range(4)], [base[i:i + 1] for i in range(4)])
    assert same["nn_agreement"] == 1.0 and same["cosine_worst"] == pytest.approx(1.0)
    moved = base.copy()
    moved[1] = [0.1, 0.9, 0.1]  # vector 1 now sits next to 2 and 3
    metrics = measure(role, [base[i:i + 1] for i in range(4)], [moved[i:i + 1] for i in range(4)])
    assert metrics["nn_agreement"] < 1.0 and metrics["cosine_worst"] < 0.3
    assert measure(role, [base[:1], base[1:2]], [base[:1], base[1:2]])["nn_agreement"] is None  # 2 vectors say nothing


def test_inference_is_conservative():
    from onnxopt.roles import infer_role

    rng = np.random.default_rng(0)
    features = [rng.standard_normal((1, 7, 384)).astype(np.float32)]
    assert infer_role("last_hidden_state", features, "Add").role == "raw"
    assert infer_role("out", [rng.standard_normal((1, 10)).astype(np.float32)], "Gemm").role == "raw"
    assert infer_role("logits", [rng.standard_normal((1, 10)).astype(np.float32)], "Gemm").role == "scores"
    unit = rng.standard_normal((2, 16))
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    assert infer_role("out", [unit.astype(np.float32)], "Div").role == "embedding"
    assert infer_role("sentence_embedding", [rng.standard_normal((1, 384)).astype(np.float32)], "Gemm").role == "embedding"
    assert infer_role("prob", [np.array([[0.7]], np.float32)], "Sigmoid").role == "probability"
    softmax = np.exp(features[0]) / np.exp(features[0]).sum(-1, keepdims=True)
    assert infer_role("y", [softmax], "Softmax").role == "sequence"
    # shaped like an input: never a decision metric
    assert infer_role("y", [softmax], "Softmax", shaped_like="x").role == "state"
    assert infer_role("stateN", [features[0]], "Concat", shaped_like="state").role == "state"


def test_budget_keys_override_role_floors_and_model_metrics_register():
    from onnxopt.metrics import register_metric

    boxes = OutputRole("boxes")
    assert Budget.parse(None).limits_for(boxes) == {"cosine": 0.99, "box_f1": 0.99}
    assert Budget.parse("default,box_f1=0.9").limits_for(boxes) == {"cosine": 0.99, "box_f1": 0.9}
    assert Budget.parse("snr_db=30").limits_for(boxes) == {"snr_db": 30.0}  # an explicit budget replaces them
    assert not Budget.parse("none") and Budget.parse("none").limits_for(boxes) == {}
    register_metric("test_ratio", "floor", scope="model")
    budget = Budget.parse("test_ratio=1.2")
    assert budget.breaches({"y": {"cosine": 0.5}}, model_metrics={"test_ratio": 1.1}) == ["test_ratio 1.1 < 1.2"]
    assert budget.limits_for(boxes) == {}


def test_validate_command_reports_roles_and_judges_by_them(mlp_path, tmp_path, capsys):
    import json

    from onnxopt.cli import main

    code = main(["validate", str(mlp_path), str(mlp_path), "--budget", "default", "--output-role", "probs=raw",
                 "--json"])
    shown = json.loads(capsys.readouterr().out)
    assert code == 0 and shown["roles"]["probs"]["role"] == "raw" and shown["roles"]["probs"]["declared"]
    assert "agreement" not in shown["metrics"]["probs"]


def test_with_few_feeds_the_search_holds_nothing_out_and_says_so(mlp_path, tmp_path):
    result = api.optimize(mlp_path, tmp_path / "o.onnx", ["quantize-weights:bits=2,min_elements=16"],
                          budget="snr_db=25", keep_going=True)  # 4 generated feeds
    holdout = result.report["passes"][0]["fallback"]["holdout"]
    assert holdout["held_out_feeds"] == 0 and holdout["confirmed"] is None
    assert any("only 4 validation feeds" in note and "nothing was held out" in note for note in result.report["notes"])


def test_ctc_decoding_lets_a_sequence_agree_when_its_string_does():
    blank, a, b = np.eye(3, dtype=np.float32)
    reference = np.stack([a, a, blank, b])[None]    # "a a _ b" reads "ab"
    candidate = np.stack([a, blank, blank, b])[None]  # "a _ _ b" reads "ab" too
    other = np.stack([a, blank, a, b])[None]          # "a _ a b" reads "aab"
    steps, ctc = OutputRole("sequence"), parse_role("sequence:decode=ctc")
    assert measure(steps, [reference], [candidate])["sequence_agreement"] == 0.0
    assert measure(ctc, [reference], [candidate])["sequence_agreement"] == 1.0
    assert measure(ctc, [reference], [other])["sequence_agreement"] == 0.0
    assert measure(ctc, [reference], [candidate])["agreement"] == 0.75  # steps still count per step
    with pytest.raises(UsageError, match="decode must be steps or ctc"):
        parse_role("sequence:decode=beam")


def test_the_bundled_classifier_is_inferred_as_scores(cls_path):
    model = load_model(cls_path)
    feeds, _ = api.make_feeds(model, None, {"x.2": 48, "x.3": 192}, 2)
    (name, role), = Validator(model, feeds).roles.items()
    assert role.role == "scores" and role.why.startswith("produced by Softmax") and not role.declared
