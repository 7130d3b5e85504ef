"""Shared weights for split stages: every initializer the stages hold written once to one
external-data file (``weights.data`` in OUTDIR), each stage's initializers pointing into it.

Constant-node tensors stay inside their stage (they are attributes, copied per stage).
Both files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from .model_io import write_atomically

WEIGHTS_NAME = "weights.data"
_ALIGN = 64


def share_initializers(stages: list[ir.Model], outdir: Path, name: str = WEIGHTS_NAME) -> dict:
    """Write each distinct initializer (by name) of ``stages`` once to ``outdir/name`` and point the
    stages' initializers at it. Returns {"file", "tensors", "bytes", "bytes_saved"} (bytes that
    per-stage copies would have taken on top)."""
    outdir = Path(outdir)
    placed: dict[str, tuple[int, int]] = {}
    copies = 0

    def write(tmp_name: str) -> None:
        nonlocal copies
        with open(tmp_name, "wb") as handle:
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

    write_atomically(outdir / name, write)
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
    def write(tmp_name: str) -> None:
        with open(tmp_name, "wb") as handle:
            handle.write(ir.to_proto(model).SerializeToString())

    return write_atomically(path, write)
