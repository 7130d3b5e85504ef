"""Mixed precision to a budget with the real quantization passes."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import api
from onnxopt.models import builders


def _mlp_with_calibration(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), model)
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
    step = api.optimize(model, tmp_path / "a.onnx", [spec], data=data, budget="snr_db=45").report["passes"][0]
    assert step["status"] == "ok", step["reason"]
    fallback = step["fallback"]
    assert fallback["precision"] is None and fallback["promoted_nodes"] == []
    assert {t["stage"] for t in fallback["trials"]} <= {"float", "refine"} and len(fallback["float_nodes"]) in (1, 2)
    assert not set(fallback["float_nodes"]) & set(step["stats"]["quantized_nodes"])
    assert min(m["snr_db"] for m in step["fidelity_metrics"].values()) >= 45


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
