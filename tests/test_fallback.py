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


def test_static_quantization_over_budget_moves_a_node_to_float(tmp_path):
    model, data = _mlp_with_calibration(tmp_path)
    loose = api.optimize(model, tmp_path / "a.onnx", ["quantize-static:min_reduction=16"], data=data,
                         budget="snr_db=30").report["passes"][0]
    assert loose["status"] == "ok" and loose["fallback"] is None
    assert loose["stats"]["quantized_nodes"] == ["MatMul_0", "MatMul_1", "MatMul_2"]
    tight = api.optimize(model, tmp_path / "b.onnx", ["quantize-static:min_reduction=16"], data=data,
                         budget="snr_db=40").report["passes"][0]
    assert tight["status"] == "ok", tight["reason"]
    kept_float = tight["fallback"]["float_nodes"]
    assert len(kept_float) == 1 and kept_float[0] not in tight["stats"]["quantized_nodes"]
    assert min(m["snr_db"] for m in tight["fidelity_metrics"].values()) >= 40
    assert tight["fallback"]["trials"][-1]["ok"]


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
