"""The recipe prune-channels -> merge-identical-weights -> quantize runs end to end and validates."""

from __future__ import annotations

import numpy as np
import onnx

from onnxopt import api
from onnxopt.models import builders
from onnxopt.models.seed_example import RECIPES


def test_prune_share_quantize_recipe_validates_every_step_on_the_trained_mlp(tmp_path):
    model = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), model)
    x, labels = builders.mlp_task(256, seed=5)
    np.savez(tmp_path / "calib.npz", x=x.reshape(8, 32, 100))
    result = api.optimize(model, tmp_path / "small.onnx", recipe=RECIPES / "prune_share_quantize.yaml",
                          data=tmp_path / "calib.npz", budget="agreement=0.9")
    steps = result.report["passes"]
    assert [s["spec"] for s in steps] == ["prune-channels:ratio=0.25", "merge-identical-weights", "quantize-static:min_reduction=16"]
    assert result.ok and all(s["status"] == "ok" for s in steps), [s["reason"] for s in steps]
    assert steps[0]["modified"] and steps[2]["modified"] and steps[2]["fidelity_metrics"]
    assert result.output is not None and result.output.stat().st_size < 0.5 * model.stat().st_size
