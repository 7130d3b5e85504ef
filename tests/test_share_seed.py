"""The seed's worked example: the trained MLP, its labelled task, the recipe and the table."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from helpers import run_ort

from onnxopt import api
from onnxopt.models import builders, seed_example


def test_trained_mlp_is_deterministic_and_accurate_on_held_out_samples():
    first, second = builders.build_mlp(), builders.build_mlp()
    assert first.SerializeToString() == second.SerializeToString()
    x, labels = builders.mlp_task(1000, seed=77)
    accuracy = (run_ort(first, {"x": x})[0].argmax(axis=1) == labels).mean()
    assert 0.9 <= accuracy < 0.99  # learnt, and hard enough that compression shows
    assert [n.op_type for n in first.graph.node] == ["MatMul", "Add", "Relu"] * 2 + ["MatMul", "Add", "Softmax"]


def test_seed_recipe_validates_and_keeps_the_accuracy(tmp_path):
    model, calibration, evaluation, labels = seed_example.write_inputs(tmp_path)
    result = api.optimize(model, tmp_path / "small.onnx", recipe=seed_example.RECIPES / "seed_mlp.yaml",
                          data=calibration, eval_data=evaluation, budget=seed_example.BUDGET)
    steps = result.report["passes"]
    assert [s["name"] for s in steps] == ["clip-weights", "prune-weights", "merge-identical-weights",
                                          "quantize-weights"]
    assert result.ok and [s["status"] for s in steps] == ["ok"] * 4
    assert [s["modified"] for s in steps] == [True, True, False, True]  # the MLP has no identical weights
    assert result.output.stat().st_size < 0.25 * model.stat().st_size
    float_accuracy = seed_example.accuracy(model, evaluation, labels)
    # half the weights pruned without retraining costs about 2 points, 4-bit pow2 weights 1.5 more
    assert seed_example.accuracy(result.output, evaluation, labels) >= float_accuracy - 0.05


@pytest.mark.slow
def test_seed_example_prints_a_row_per_step(tmp_path, capsys):
    assert seed_example.main(["--out", str(tmp_path), "--markdown"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "step" not in line]
    assert len(rows) == len(seed_example.steps("prune-weights" in api.default_registry().names()))
    assert "float32, trained" in rows[0] and "int4" in out and "1-bit" in out
