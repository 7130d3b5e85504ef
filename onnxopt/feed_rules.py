"""Value rules for generated inputs, read from the graph.

- An input whose name contains ``mask`` (``attention_mask``, ``input_mask``) is all ones.
- An integer input that indexes a table (``Gather``/``GatherElements`` indices, ``OneHot``
  indices), directly or through ops that carry its values unchanged (Cast, Reshape,
  Unsqueeze, Squeeze, Flatten, Identity, Expand, Transpose, Slice, Tile, Concat, Split),
  takes values in ``[0, rows)`` of the smallest such table with a static size on the
  gathered axis (``token_type_ids`` over a 2-row table: ``[0, 2)``).
- Otherwise integers are in ``[0, 4)`` (see feeds.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# op -> input positions whose values reach the output unchanged (None: every input).
_CARRIERS: dict[str, tuple[int, ...] | None] = {
    "Cast": (0,), "CastLike": (0,), "Reshape": (0,), "Unsqueeze": (0,), "Squeeze": (0,), "Flatten": (0,),
    "Identity": (0,), "Expand": (0,), "Transpose": (0,), "Slice": (0,), "Tile": (0,), "Concat": None,
    "Split": (0,),
}
_MAX_VISITED = 200


def value_rule(value: ir.Value, dtype: np.dtype) -> dict:
    """InputSpec fields (``low``, ``high``, ``ones``, ``rule``) for one graph input."""
    if "mask" in value.name.lower() and dtype.kind in "biufV":
        return {"ones": True, "rule": "all ones (a mask)"}
    if dtype.kind not in "iuV":
        return {}
    bound = _table_bound(value)
    if bound is None:
        return {}
    rows, where = bound
    return {"low": 0, "high": rows, "rule": f"in [0, {rows}) (indexes {where})"}


def _table_bound(value: ir.Value) -> tuple[int, str] | None:
    """The smallest static table size this value's integers index, and which node it is."""
    best: tuple[int, str] | None = None
    pending, seen = [value], set()
    while pending and len(seen) < _MAX_VISITED:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for node, index in current.uses():
            if node.domain not in ("", "ai.onnx"):
                continue
            rows = _rows_indexed(node, index)
            if rows is not None and rows > 0 and (best is None or rows < best[0]):
                best = (rows, f"{node.op_type} '{node.name or node.outputs[0].name}' of {rows} rows")
            carried = _CARRIERS.get(node.op_type, ())
            if carried is None or index in carried:
                pending.extend(node.outputs)
    return best


def _rows_indexed(node: ir.Node, index: int) -> int | None:
    """The static size of the axis ``node`` indexes with its input ``index``, if it does."""
    if node.op_type in ("Gather", "GatherElements") and index == 1 and node.inputs[0] is not None:
        axis = node.attributes.get("axis")
        return _static_dim(node.inputs[0], axis.as_int() if axis is not None else 0)
    if node.op_type == "OneHot" and index == 0 and len(node.inputs) > 1 and node.inputs[1] is not None:
        depth = node.inputs[1].const_value
        if depth is not None and depth.size == 1:
            return int(np.asarray(depth.numpy()).reshape(-1)[0])
    return None


def _static_dim(data: ir.Value, axis: int) -> int | None:
    shape = data.const_value.shape if data.const_value is not None else data.shape
    if shape is None or len(shape) == 0:
        return None
    axis = axis + len(shape) if axis < 0 else axis
    if not 0 <= axis < len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None
