"""Shared fixtures: bundled and built models written to a temporary directory."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from onnxopt.models import builders, bundled_model_path


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), path)
    return path


@pytest.fixture
def cls_path() -> Path:
    """The bundled real PP-OCR direction classifier (read-only: copy before writing near it)."""
    return bundled_model_path("ppocr_cls")
