"""The prune family on real models through the API: runner validation, mixed precision to a
budget, and the fetched PP-OCR conv models (det and rec are slow)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxopt import api
from onnxopt.models import zoo
from onnxopt.models.builders import build_cnn
from onnxopt.models.feeds import sample_feeds


def _data(tmp_path, name, count=4):
    data = tmp_path / "feeds"
    data.mkdir()
    for index, feed in enumerate(sample_feeds(name, count=count)):
        np.savez(data / f"{index:03d}.npz", **feed)
    return data


def test_budget_backs_off_the_most_sensitive_layers_on_the_ratio_ladder(tmp_path):
    src = tmp_path / "cnn.onnx"
    onnx.save(build_cnn(), src)
    data = _data(tmp_path, "cnn", 8)
    free = api.optimize(src, tmp_path / "free.onnx", ["prune-channels:ratio=0.5"], data=data, budget="none")
    loose = free.report["passes"][0]["fidelity_metrics"]
    cosine = min(m["cosine"] for m in loose.values() if isinstance(m, dict) and "cosine" in m)
    assert cosine < 0.995
    result = api.optimize(src, tmp_path / "out.onnx", ["prune-channels:ratio=0.5"], data=data,
                          budget="cosine=0.995")
    step = result.report["passes"][0]
    assert result.ok and step["status"] == "ok", api.failure_summary(result.run)
    assert step["fallback"]["trials"] and step["fallback"]["trials"][0]["precision"] == "ratio 0.25"
    held = [t for t in step["fallback"]["trials"] if t["ok"]]
    assert held and all(t["worst"]["cosine"] >= 0.995 for t in held)
    assert step["stats"]["parameters_after"] < step["stats"]["parameters_before"]


@pytest.mark.zoo
@pytest.mark.parametrize("name", [
    "ppocr_cls",
    pytest.param("ppocr_det_v4", marks=pytest.mark.slow),
    pytest.param("ppocr_rec_v4", marks=pytest.mark.slow),
])
def test_prune_family_on_fetched_ppocr_models(name, tmp_path):
    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    data = _data(tmp_path, name, 2)
    out = tmp_path / "out.onnx"
    result = api.optimize(path, out, ["cleanup", "prune-channels:ratio=0.5,reconstruct=true",
                                      "drop-pruned-initializers"], data=data, budget="none")
    assert result.ok, api.failure_summary(result.run)
    stats = next(s for s in result.report["passes"] if s["name"] == "prune-channels")["stats"]
    assert stats["parameters_after"] <= 0.52 * stats["parameters_before"]
    assert stats["flops_after"] < stats["flops_before"]
    onnx.checker.check_model(str(out))
