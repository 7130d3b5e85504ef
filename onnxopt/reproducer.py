"""Crash reproducers: the model before the failing pass, the remaining pipeline, versions."""

from __future__ import annotations

import json
import platform
import time
import traceback
from pathlib import Path

import onnx_ir as ir


def versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import onnxscript

    import onnxopt

    return {
        "onnxopt": onnxopt.__version__,
        "onnx": onnx.__version__,
        "onnx_ir": ir.__version__,
        "onnxscript": onnxscript.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def write_reproducer(directory: str | Path | None, model_before: ir.Model, remaining_pipeline: str,
                     error: BaseException) -> Path:
    from .model_io import save_model

    base = Path(directory) if directory else Path.cwd() / f"onnxopt-crash-{time.strftime('%Y%m%d-%H%M%S')}"
    base.mkdir(parents=True, exist_ok=True)
    save_model(model_before, base / "model_before.onnx")
    (base / "pipeline.txt").write_text(remaining_pipeline + "\n", encoding="utf-8")
    (base / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n", encoding="utf-8")
    (base / "traceback.txt").write_text("".join(traceback.format_exception(error)), encoding="utf-8")
    (base / "README.txt").write_text(
        "Replay with:\n  onnxopt optimize model_before.onnx -o out.onnx "
        + " ".join(f"-p {step}" for step in remaining_pipeline.split()) + "\n",
        encoding="utf-8",
    )
    return base
