"""Shared fixtures: bundled and built models written to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxopt.models import builders, bundled_model_path


class _SteadyTimer:
    """Stands in for ``speed.OrtTimer``: the candidate always runs twice as fast, without timing.

    The runner tries other placements when a quantized model measures slower, so with real timing
    a test's outcome would depend on how busy the machine is. Tests of the speed logic pass their
    own fake timer; tests marked ``real_timing`` time in ORT.
    """

    def __init__(self, threads: int = 1, *args, **kwargs):
        self.threads = threads

    def latencies(self, models, feed):
        return {name: (2.0 if name == "reference" else 1.0) for name in models}


@pytest.fixture(autouse=True)
def _steady_speed(request, monkeypatch):
    if request.node.get_closest_marker("real_timing") is None:
        from onnxopt import speed

        monkeypatch.setattr(speed, "OrtTimer", _SteadyTimer)


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), path)
    return path


@pytest.fixture
def cls_path() -> Path:
    """The bundled real PP-OCR direction classifier (read-only: copy before writing near it)."""
    return bundled_model_path("ppocr_cls")
