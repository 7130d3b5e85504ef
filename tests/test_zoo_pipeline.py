"""The cleanup pipeline on every fetched real model: outputs unchanged, counts reported."""

from __future__ import annotations

import numpy as np
import pytest

from onnxopt import api
from onnxopt.models import zoo
from onnxopt.models.feeds import sample_feeds

# ppocr_cls and silero_vad run by default (small, and silero has If bodies);
# the larger OCR models are marked slow.
FAST = {"ppocr_cls", "silero_vad"}


def _params():
    for name in zoo.ZOO:
        marks = [pytest.mark.zoo] + ([] if name in FAST else [pytest.mark.slow])
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_cleanup_keeps_real_model_outputs(name, tmp_path):
    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    data = tmp_path / "feeds"
    data.mkdir()
    for index, feed in enumerate(sample_feeds(name, count=2)):
        np.savez(data / f"{index:03d}.npz", **feed)
    result = api.optimize(path, tmp_path / "out.onnx", ["cleanup"], data=data, report=tmp_path / "r.json")
    assert result.ok, api.failure_summary(result.run)
    steps = result.report["passes"]
    assert all(step["status"] == "ok" for step in steps)
    assert steps[0]["before"]["nodes"] > 0
    assert steps[-1]["after"]["nodes"] <= steps[0]["before"]["nodes"]
    final = api.validate_models(path, tmp_path / "out.onnx", data=data)
    assert final.equal
