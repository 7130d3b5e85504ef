"""Mixed precision to a budget with the real quantization passes."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import api
from onnxopt.metrics import Budget
from onnxopt.models import builders


def _mlp_with_calibration(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(trained=False), model)  # the budgets below are tuned to its noise
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 4, 100)).astype(np.float32))
    return model, data


def test_static_quantization_over_budget_promotes_a_node_to_int16(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    loose = api.optimize(model, tmp_path / "a.onnx", ["quantize-static:min_reduction=16"], data=data,
                         budget="snr_db=30").report["passes"][0]
    assert loose["status"] == "ok" and loose["fallback"] is None
    assert loose["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_1", "MatMul_2"]
    tight = api.optimize(model, tmp_path / "b.onnx", ["quantize-static:min_reduction=16"], data=data,
                         budget="snr_db=40").report["passes"][0]
    assert tight["status"] == "ok", tight["reason"]
    fallback = tight["fallback"]
    assert fallback["precision"] == "int16 activations" and fallback["float_nodes"] == []
    assert len(fallback["promoted_nodes"]) == 1 and fallback["promoted_nodes"] == tight["stats"]["promoted_nodes"]
    assert tight["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_1", "MatMul_2"]
    assert min(m["snr_db"] for m in tight["fidelity_metrics"].values()) >= 40
    assert fallback["trials"][-1]["ok"]


def test_static_int16_has_nothing_higher_and_keeps_nodes_in_float(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    spec = "quantize-static:min_reduction=16,activation_type=int16,weight_type=int8"
    # (at snr_db=45, 2 nodes in float hold on the 12 search feeds but not on the 4 held out)
    step = api.optimize(model, tmp_path / "a.onnx", [spec], data=data, budget="snr_db=43").report["passes"][0]
    assert step["status"] == "ok", step["reason"]
    fallback = step["fallback"]
    assert fallback["precision"] is None and fallback["promoted_nodes"] == []
    assert {t["stage"] for t in fallback["trials"]} <= {"float", "refine"} and len(fallback["float_nodes"]) in (1, 2)
    assert not set(fallback["float_nodes"]) & set(step["stats"]["quantized_nodes"])
    assert min(m["snr_db"] for m in step["fidelity_metrics"].values()) >= 43
    assert step["fallback"]["holdout"]["confirmed"] and step["fallback"]["holdout"]["held_out_feeds"] == 4


def test_a_choice_that_fails_the_held_out_feeds_climbs_until_both_hold(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    spec = "quantize-static:min_reduction=16,activation_type=int16,weight_type=int8"
    step = api.optimize(model, tmp_path / "a.onnx", [spec], data=data, budget="snr_db=44").report["passes"][0]
    assert step["status"] == "ok", step["reason"]
    holdout = step["fallback"]["holdout"]
    assert (holdout["search_feeds"], holdout["held_out_feeds"]) == (12, 4)
    # one node in float held on the 12 search feeds only; the climb kept a second one in float
    assert holdout["held_out_breaches"] and holdout["held_out_breaches"][0].startswith("probs: snr_db")
    assert [(t["stage"], t["float_nodes"], t["ok"]) for t in step["fallback"]["trials"]] == [
        ("float", 1, True), ("climb", 2, True)]
    assert holdout["climbed"] and holdout["confirmed"] and len(step["fallback"]["float_nodes"]) == 2
    assert holdout["held_out"]["snr_db"] >= 44 and holdout["search"]["snr_db"] >= 44


def test_weight_quantization_over_budget_keeps_nodes_in_float_or_rolls_back(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    result = api.optimize(model, tmp_path / "c.onnx", ["quantize-weights:bits=2,min_elements=16"], data=data,
                          budget="snr_db=25", keep_going=True)
    step = result.report["passes"][0]
    assert step["fallback"] is not None and step["fallback"]["trials"]
    if step["status"] == "ok":
        assert min(m["snr_db"] for m in step["fidelity_metrics"].values()) >= 25
    else:
        assert "still over budget" in step["reason"]


def test_float16_over_budget_keeps_nodes_in_float32(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    loose = api.optimize(model, tmp_path / "a.onnx", ["convert-float16"], data=data).report["passes"][0]
    assert loose["status"] == "ok" and loose["fallback"] is None
    snr = min(m["snr_db"] for m in loose["fidelity_metrics"].values())
    tight = api.optimize(model, tmp_path / "b.onnx", ["convert-float16"], data=data,
                         budget=f"snr_db={snr + 6:.1f}").report["passes"][0]
    assert tight["status"] == "ok", tight["reason"]
    kept = tight["fallback"]["float_nodes"]
    assert kept and tight["fallback"]["precision"] is None
    assert not set(kept) & set(tight["stats"]["quantized_nodes"])
    assert min(m["snr_db"] for m in tight["fidelity_metrics"].values()) >= snr + 6


def test_halving_narrows_a_ranked_choice_to_the_nodes_that_decide():
    from onnxopt.fallback import _halve

    names = [f"n{i}" for i in range(8)]
    calls = []

    def holds(part):
        calls.append(list(part))
        return "n6" in part

    assert _halve(holds, names, lambda: True) == ["n6"]
    assert len(calls) <= 2 * 3
    both = _halve(lambda part: {"n1", "n6"} <= set(part), names, lambda: True)
    assert {"n1", "n6"} <= set(both)  # neither half holds alone: it stops with both
    assert _halve(lambda part: True, names, lambda: False) == names  # no trials left: unchanged


def test_validate_end_still_searches_a_lossy_pass_over_budget(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    result = api.optimize(model, tmp_path / "a.onnx", ["quantize-static:min_reduction=16"], data=data,
                          budget="snr_db=40", validate="end")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", step["reason"]
    assert step["fallback"]["promoted_nodes"] and step["fallback"]["holdout"]["confirmed"]
    final = result.report["final_validation"]
    assert final["feeds"] == "validation" and not final["breaches"] and (tmp_path / "a.onnx").exists()


def test_validate_end_over_budget_exits_1_and_says_why(tmp_path, capsys):
    from onnxopt.cli import main

    model, data = _mlp_with_calibration(tmp_path)
    code = main(["optimize", str(model), "-o", str(tmp_path / "a.onnx"), "-p", "quantize-weights:bits=2,min_elements=16",
                 "--data", str(data), "--budget", "max_abs=0", "--validate", "end", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and not (tmp_path / "a.onnx").exists()
    assert "rolled back: budget exceeded: probs: max_abs" in err[0] and "still over budget" in err[0]


def test_eval_data_checks_only_the_finished_model(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    held = tmp_path / "eval.npz"
    np.savez(held, x=np.random.default_rng(1).standard_normal((6, 4, 100)).astype(np.float32))
    result = api.optimize(model, tmp_path / "a.onnx", ["quantize-static:min_reduction=16"], data=data, eval_data=held,
                          budget="snr_db=40")
    step = result.report["passes"][0]
    assert step["fallback"]["holdout"]["search_feeds"] == 12  # the search saw the --data feeds only
    final = result.report["final_validation"]
    assert (final["feeds"], final["count"]) == ("evaluation", 6) and result.report["inputs"]["eval_feeds"] == 6
    assert result.ok == (not final["breaches"]) and (tmp_path / "a.onnx").exists() == result.ok


def test_validate_end_holds_a_lossy_pass_to_its_speedup_floor_too():
    from onnxopt import target
    from onnxopt.runner import RunConfig, Runner
    from onnxopt.spec import parse_pipeline
    from tests.test_speed import FakeTimer, feeds, model

    config = RunConfig(validate="end", budget=Budget.parse("cosine=0.9,speedup=1.5"), speed_timer=FakeTimer(5.0, 4.0),
                       target=target.resolve("avx512-vnni"))
    result = Runner(parse_pipeline(["quantize-static:min_reduction=0"]), config).run(model(), feeds())
    step = result.steps[0]
    assert step.status == "rolled_back" and "speedup 1.11x < 1.5" in step.reason and not result.ok
