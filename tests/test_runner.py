"""The runner: validation per pass, rollback, bisect limit, dumps, reproducers, reports."""

from __future__ import annotations

import json

import pytest

from onnxopt import api
from onnxopt.model_io import load_model
from tests.core_passes import core_registry

REG = core_registry()


def _optimize(mlp_path, tmp_path, passes, **kwargs):
    return api.optimize(mlp_path, tmp_path / "out.onnx", passes, registry=REG, **kwargs)


def test_lossless_pass_validates_and_writes_output(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["name-nodes"], report=tmp_path / "r.json")
    assert result.ok
    step = result.report["passes"][0]
    assert step["status"] == "ok" and step["modified"] and step["stats"] == {"nodes_named": 9}
    assert step["fidelity_metrics"]["probs"]["max_abs"] == 0.0
    assert all(n.name for n in load_model(tmp_path / "out.onnx").graph)
    assert json.loads((tmp_path / "r.json").read_text())["report_version"] == 1


def test_noop_pass_is_not_validated_again(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "name-nodes"])
    second = result.report["passes"][1]
    assert second["status"] == "ok" and not second["modified"] and second["fidelity_metrics"] is None


def test_lossy_pass_within_budget_is_kept_with_fidelity(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-weights:scale=0.0001"], budget="cosine=0.999")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok" and step["fidelity"] == "lossy"
    assert 0.999 <= step["fidelity_metrics"]["probs"]["cosine"] < 1.0


def test_lossy_pass_over_budget_is_rolled_back(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-weights:scale=0.5", "name-nodes"], budget="snr_db=40")
    first, second = result.report["passes"]
    assert not result.ok
    assert first["status"] == "rolled_back" and "budget exceeded" in first["reason"] and "snr_db" in first["reason"]
    assert second["status"] == "skipped"
    assert not (tmp_path / "out.onnx").exists()
    assert "rolled back" in api.failure_summary(result.run)


def test_keep_going_continues_after_rollback_and_writes_the_rest(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-weights:scale=0.5", "name-nodes"], budget="snr_db=40",
                       keep_going=True)
    first, second = result.report["passes"]
    assert first["status"] == "rolled_back" and second["status"] == "ok"
    out = load_model(tmp_path / "out.onnx")
    original = load_model(mlp_path)
    for name, value in original.graph.initializers.items():  # the rolled-back weights are the originals
        assert (out.graph.initializers[name].const_value.numpy() == value.const_value.numpy()).all()


def test_lossless_pass_that_changes_outputs_fails(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["break-weights:scale=0.3"])
    step = result.report["passes"][0]
    assert step["status"] == "failed" and "beyond float rounding" in step["reason"]


def test_pass_that_lies_about_modification_is_caught(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["lying-pass"])
    assert result.report["passes"][0]["reason"] == "the pass reported no change but the model changed"


def test_bisect_limit_runs_only_the_first_passes(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "perturb-weights"], bisect_limit=1)
    statuses = [s["status"] for s in result.report["passes"]]
    assert statuses == ["ok", "skipped"] and result.ok
    assert result.report["passes"][1]["reason"] == "beyond --bisect-limit"


def test_crash_writes_a_reproducer(mlp_path, tmp_path):
    repro = tmp_path / "repro"
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "crash", "perturb-weights:scale=0.5"],
                       reproducer_dir=repro)
    assert not result.ok and "reproducer written to" in result.run.crash
    assert (repro / "pipeline.txt").read_text().strip() == "crash perturb-weights:scale=0.5"
    assert "onnxruntime" in json.loads((repro / "versions.json").read_text())
    assert "ZeroDivisionError" in (repro / "traceback.txt").read_text()
    before = load_model(repro / "model_before.onnx")
    assert all(n.name for n in before.graph)  # the model as it was after name-nodes
    assert not (tmp_path / "out.onnx").exists()


def test_dump_dir_writes_each_pass(mlp_path, tmp_path):
    _optimize(mlp_path, tmp_path, ["name-nodes", "perturb-weights:scale=0.001"], dump_dir=tmp_path / "dumps")
    assert sorted(p.name for p in (tmp_path / "dumps").iterdir()) == ["000_name-nodes.onnx", "001_perturb-weights.onnx"]


def test_validate_end_checks_lossless_passes_only_on_the_final_model(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "perturb-weights:scale=0.0001"], validate="end",
                       budget="snr_db=40")
    lossless, lossy = result.report["passes"]
    assert lossless["fidelity_metrics"] is None and lossy["fidelity_metrics"]["probs"]["snr_db"] >= 40
    assert result.ok and result.run.final.ok and result.report["final_validation"]["feeds"] == "validation"


def test_validate_end_still_checks_a_lossy_pass_over_budget_and_says_why(mlp_path, tmp_path):
    # --validate end used to skip the lossy step's own check and fail the final one with no model
    result = _optimize(mlp_path, tmp_path, ["perturb-weights:scale=0.5"], validate="end", budget="snr_db=40")
    step = result.report["passes"][0]
    assert step["status"] == "rolled_back" and "budget exceeded: probs: snr_db" in step["reason"]
    assert not result.ok and "rolled back" in api.failure_summary(result.run)


def test_report_schema(mlp_path, tmp_path):
    report = _optimize(mlp_path, tmp_path, ["name-nodes"]).report
    assert {"report_version", "versions", "pipeline", "inputs", "passes", "ok", "budget"} <= report.keys()
    step = report["passes"][0]
    assert {"name", "options", "status", "modified", "seconds", "stats", "before", "after", "op_delta",
            "fidelity_metrics"} <= step.keys()
    assert {"nodes", "initializers", "initializer_bytes", "ops"} <= step["before"].keys()
    assert report["inputs"]["signature"] == {"x": [[1, 100], "float32"]}
    json.dumps(report)


def test_data_file_feeds_validation(mlp_path, tmp_path):
    import numpy as np

    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((3, 2, 100)).astype(np.float32))
    report = _optimize(mlp_path, tmp_path, ["name-nodes"], data=data).report
    assert report["inputs"]["feeds"] == 3 and report["inputs"]["signature"]["x"][0] == [2, 100]


def test_wrong_data_is_a_clear_input_error(mlp_path, tmp_path):
    import numpy as np

    from onnxopt import InputError

    data = tmp_path / "calib.npz"
    np.savez(data, y=np.zeros((2, 1, 100), np.float32))
    with pytest.raises(InputError, match="no array for model input"):
        _optimize(mlp_path, tmp_path, ["name-nodes"], data=data)
    np.savez(data, x=np.zeros((2, 1, 100), np.float64))
    with pytest.raises(InputError, match="float64, the model wants float32"):
        _optimize(mlp_path, tmp_path, ["name-nodes"], data=data)


def test_rollback_restores_types_a_pass_edited_in_place(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["retype-half"], keep_going=True)
    assert result.report["passes"][0]["status"] == "rolled_back"
    out = load_model(tmp_path / "out.onnx")
    assert {str(n.outputs[0].dtype) for n in out.graph if n.outputs[0].dtype is not None} == {"FLOAT"}


def test_budget_breach_keeps_the_most_sensitive_node_in_float(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls:loud_node=MatMul_1"], budget="snr_db=30")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    assert step["fallback"]["float_nodes"] == ["MatMul_1"]
    assert step["fallback"]["sensitivity"][0]["node"] == "MatMul_1"
    assert step["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_2"]
    assert "named 9 unnamed nodes" in result.report["notes"][0]
    assert min(m["snr_db"] for m in step["fidelity_metrics"].values()) >= 30
    assert [t["ok"] for t in step["fallback"]["trials"]] == [True]


def test_budget_that_cannot_hold_rolls_back_after_trying_every_node(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls:scale=0.05"], budget="snr_db=200")
    step = result.report["passes"][0]
    assert step["status"] == "rolled_back" and "still over budget with 2 nodes kept in float" in step["reason"]
    # one node changed: there is nothing to fall back to
    single = _optimize(mlp_path, tmp_path, ["perturb-matmuls:scale=0.05,exclude_nodes=[MatMul_0,MatMul_1]"],
                       budget="snr_db=200").report["passes"][0]
    assert single["status"] == "rolled_back" and "keeping it in float would undo the pass" in single["reason"]


def test_lossy_pass_reports_worst_tensors(mlp_path, tmp_path):
    step = _optimize(mlp_path, tmp_path, ["perturb-matmuls"]).report["passes"][0]
    assert step["tensor_sqnr"] and step["tensor_sqnr"][0]["sqnr_db"] <= step["tensor_sqnr"][-1]["sqnr_db"]


def test_validate_off_checks_structure_once_at_the_end_and_writes_nothing_broken(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "dangle"], validate="off")
    assert [s["status"] for s in result.report["passes"]] == ["ok", "ok"]
    assert not result.ok and "ghost" in result.report["structure_problems"][0]
    assert not (tmp_path / "out.onnx").exists()


def test_validate_off_crash_reproducer_replays_from_the_original(mlp_path, tmp_path):
    repro = tmp_path / "repro"
    result = _optimize(mlp_path, tmp_path, ["name-nodes", "crash", "perturb-weights"], validate="off",
                       reproducer_dir=repro)
    assert not result.ok
    assert (repro / "pipeline.txt").read_text().strip() == "name-nodes crash"
    assert not any(n.name for n in load_model(repro / "model_before.onnx").graph)  # the untouched input


def test_validate_end_failure_cannot_roll_back_and_stops(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["break-weights:scale=0.3", "name-nodes"], validate="end",
                       keep_going=True)
    assert not result.ok and "beyond float rounding" in result.run.final.breaches[0]
    assert not (tmp_path / "out.onnx").exists()


def test_agreement_is_argmax_for_class_scores_and_thresholded_for_probabilities():
    import numpy as np

    from onnxopt.metrics import output_metrics

    scores = [np.array([[0.1, 0.9], [0.8, 0.2]], np.float32)]
    assert output_metrics(scores, [np.array([[0.2, 0.8], [0.4, 0.6]], np.float32)])["agreement"] == 0.5
    probability = [np.array([[0.9], [0.2], [0.6], [0.1]], np.float32)]
    assert output_metrics(probability, [np.array([[0.8], [0.3], [0.4], [0.1]], np.float32)])["agreement"] == 0.75
    detection_map = [np.zeros((1, 1, 4, 8), np.float32)]
    assert output_metrics(detection_map, detection_map)["agreement"] is None


def test_sequence_agreement_counts_sequences_whose_every_step_agrees():
    import numpy as np

    from onnxopt.metrics import output_metrics

    steps = np.eye(3, dtype=np.float32)[[0, 1, 2, 1]]  # one sequence of 4 steps over 3 classes
    reference = [steps[None], steps[None]]
    flipped = steps.copy()
    flipped[3] = [0, 0, 1]
    metrics = output_metrics(reference, [steps[None], flipped[None]])
    assert metrics["agreement"] == 7 / 8 and metrics["sequence_agreement"] == 0.5
    assert output_metrics([steps[None, :, :2]], [steps[None, :, :2]])["sequence_agreement"] == 1.0
    assert output_metrics(reference, [steps[None], flipped[None]], decisions=False)["agreement"] is None


def test_an_output_shaped_like_an_input_is_state_not_decisions(tmp_path):
    import numpy as np

    from onnxopt.validation import Validator
    from tests.helpers import model_from_text

    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 1, 4] state, float[1, 4] x) => (float[2, 1, 4] state_out, float[1, 4] y) {
            state_out = Relu(state)
            y = Relu(x)
        }""")
    feeds = [{"state": np.ones((2, 1, 4), np.float32), "x": np.ones((1, 4), np.float32)}]
    validator = Validator(model, feeds)
    assert validator.carried_state() == {"state_out", "y"}


def test_budget_breach_promotes_the_most_sensitive_node_before_keeping_it_in_float(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls-promotable:loud_node=MatMul_1"], budget="snr_db=30")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    fallback = step["fallback"]
    assert fallback["precision"] == "quieter noise"
    assert fallback["promoted_nodes"] == ["MatMul_1"] and fallback["float_nodes"] == []
    assert step["stats"]["promoted_nodes"] == ["MatMul_1"]
    assert step["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_1", "MatMul_2"]
    # everything promoted first (one trial says the stage can hold), then the smallest count
    assert [(t["stage"], t["promoted"], t["ok"]) for t in fallback["trials"]] == [("promote", 3, True), ("promote", 1, True)]
    assert min(m["snr_db"] for m in step["fidelity_metrics"].values()) >= 30


def test_promotion_that_cannot_hold_falls_back_to_float_with_the_rest_promoted(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls-promotable:loud_node=MatMul_1,promoted_gain=0.5"],
                       budget="snr_db=30")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    fallback = step["fallback"]
    assert fallback["float_nodes"] == ["MatMul_1"]
    assert sorted(fallback["promoted_nodes"]) == ["MatMul_0", "MatMul_2"]
    assert [t["stage"] for t in fallback["trials"]] == ["promote", "float"]
    assert step["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_2"]


def test_promotion_climbs_the_ladder_before_keeping_nodes_in_float(mlp_path, tmp_path):
    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls-promotable:loud_node=MatMul_1,promoted_gain=0.5,"
                                            "higher_gains=[0.001]"], budget="snr_db=30")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    fallback = step["fallback"]
    assert fallback["precision"] == "gain 0.001" and fallback["float_nodes"] == []
    assert fallback["promoted_nodes"] == ["MatMul_1"]
    assert [(t["stage"], t["precision"], t["promoted"], t["ok"]) for t in fallback["trials"]] == [
        ("promote", "quieter noise", 3, False), ("promote", "gain 0.001", 3, True), ("promote", "gain 0.001", 1, True)]


def test_table_says_what_mixed_precision_moved(mlp_path, tmp_path):
    import io

    from rich.console import Console

    from onnxopt.report import render_table

    result = _optimize(mlp_path, tmp_path, ["perturb-matmuls-promotable:loud_node=MatMul_1"], budget="snr_db=30")
    out = io.StringIO()
    render_table(result.report, Console(file=out, width=160))
    assert "mixed precision to the budget: 1 nodes to quieter noise, 0 kept in float (2 trials)" in out.getvalue()


def test_stacked_npz_feeds_scalar_inputs_as_0d_arrays(tmp_path):
    import numpy as np

    from onnxopt.feeds import input_specs, load_data
    from onnxopt.model_io import save_model
    from tests.helpers import model_from_text

    # silero-vad takes its sample rate as a 0-d int64 input: stacked, it is a [N] array
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[1, 4] x, int64 sr) => (float[1, 4] y) {
            f = Cast<to = 1>(sr)
            y = Mul(x, f)
        }""")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.ones((3, 1, 4), np.float32), sr=np.array([16000, 8000, 16000], np.int64))
    feeds = load_data(data, input_specs(model))
    assert [f["sr"].shape for f in feeds] == [(), (), ()] and isinstance(feeds[1]["sr"], np.ndarray)
    save_model(model, tmp_path / "m.onnx")
    result = api.optimize(tmp_path / "m.onnx", tmp_path / "out.onnx", ["eliminate-identities"], data=data)
    assert result.ok


def test_a_near_tie_of_the_reference_agrees_either_way():
    import numpy as np

    from onnxopt.metrics import output_metrics

    # sample 2 is a coin flip for the reference (0.5005 vs 0.4995): flipping it is not a disagreement
    reference = [np.array([[0.9, 0.1], [0.4995, 0.5005], [0.2, 0.8]], np.float32)]
    flipped = [np.array([[0.9, 0.1], [0.5005, 0.4995], [0.2, 0.8]], np.float32)]
    assert output_metrics(reference, flipped)["agreement"] == 1.0
    clear_flip = [np.array([[0.1, 0.9], [0.5005, 0.4995], [0.2, 0.8]], np.float32)]
    assert output_metrics(reference, clear_flip)["agreement"] == 2 / 3
    probability = [np.array([[0.9], [0.503], [0.1]], np.float32)]
    assert output_metrics(probability, [np.array([[0.9], [0.497], [0.1]], np.float32)])["agreement"] == 1.0
    assert output_metrics(probability, [np.array([[0.4], [0.503], [0.1]], np.float32)])["agreement"] == 2 / 3
