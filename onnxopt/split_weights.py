"""Shared weights for split stages: every initializer the stages hold written once to one
external-data file (``weights.data`` in OUTDIR), each stage's initializers pointing into it.

Constant-node tensors stay inside their stage (they are attributes, copied per stage).
Both files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx_ir as ir

from .model_io import default_file_mode

WEIGHTS_NAME = "weights.data"
_ALIGN = 64


def share_initializers(stages: list[ir.Model], outdir: Path, name: str = WEIGHTS_NAME) -> dict:
    """Write each distinct initializer (by name) of ``stages`` once to ``outdir/name`` and point the
    stages' initializers at it. Returns {"file", "tensors", "bytes", "bytes_saved"} (bytes that
    per-stage copies would have taken on top)."""
    outdir = Path(outdir)
    placed: dict[str, tuple[int, int]] = {}
    copies = 0
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=outdir)
    try:
        with os.fdopen(fd, "wb") as handle:
            offset = 0
            for model in stages:
                for value in model.graph.initializers.values():
                    tensor = value.const_value
                    if tensor is None:
                        continue
                    if value.name in placed:
                        copies += placed[value.name][1]
                        continue
                    data = tensor.tobytes()
                    pad = (-offset) % _ALIGN
                    handle.write(b"\0" * pad)
                    offset += pad
                    handle.write(data)
                    placed[value.name] = (offset, len(data))
                    offset += len(data)
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, outdir / name)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    for model in stages:
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None or value.name not in placed:
                continue
            start, length = placed[value.name]
            value.const_value = ir.ExternalTensor(name, start, length, tensor.dtype, shape=tensor.shape,
                                                  name=value.name, base_dir=outdir)
    return {"file": name, "tensors": len(placed), "bytes": sum(n for _, n in placed.values()), "bytes_saved": copies}


def save_referencing(model: ir.Model, path: Path) -> Path:
    """Write a stage whose initializers reference the shared file, atomically, without inlining them."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, "wb") as handle:
            handle.write(ir.to_proto(model).SerializeToString())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
