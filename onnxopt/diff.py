"""`onnxopt diff`: how two models differ in structure and, optionally, tensor by tensor.

The tensor comparison streams every main-graph value that exists under the same name in
both models through ORT (calibration's chunked exposure), walks them in the first model's
topological order and names the first node whose output diverges beyond tolerance.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir

from .calibration import stream_tensors
from .metrics import Tolerance, output_metrics
from .model_stats import model_stats, op_delta


def _initializer_table(model: ir.Model) -> dict[str, tuple[str, tuple]]:
    return {name: (v.const_value.dtype.name if v.const_value is not None else "?",
                   tuple(v.const_value.shape) if v.const_value is not None else ())
            for name, v in model.graph.initializers.items()}


def _signature(values) -> list[tuple[str, str, str]]:
    return [(v.name, v.dtype.name if v.dtype else "?", str(v.shape)) for v in values]


def structural_diff(a: ir.Model, b: ir.Model) -> dict:
    stats_a, stats_b = model_stats(a), model_stats(b)
    inits_a, inits_b = _initializer_table(a), _initializer_table(b)
    changed = sorted(n for n in inits_a.keys() & inits_b.keys() if inits_a[n] != inits_b[n])
    names_a = Counter(n.name for n in a.graph if n.name)
    names_b = Counter(n.name for n in b.graph if n.name)
    return {
        "nodes": [stats_a.nodes, stats_b.nodes],
        "initializer_bytes": [stats_a.initializer_bytes + stats_a.constant_bytes,
                              stats_b.initializer_bytes + stats_b.constant_bytes],
        "op_delta": op_delta(stats_a, stats_b),
        "opsets": [dict(a.opset_imports), dict(b.opset_imports)] if a.opset_imports != b.opset_imports else None,
        "inputs_changed": _signature(a.graph.inputs) != _signature(b.graph.inputs),
        "outputs_changed": _signature(a.graph.outputs) != _signature(b.graph.outputs),
        "initializers_removed": sorted(inits_a.keys() - inits_b.keys()),
        "initializers_added": sorted(inits_b.keys() - inits_a.keys()),
        "initializers_changed": changed,
        "nodes_removed": sorted((names_a - names_b).elements())[:50],
        "nodes_added": sorted((names_b - names_a).elements())[:50],
    }


def _value_order(model: ir.Model) -> list[tuple[str, ir.Node]]:
    """(value name, producing node) for every float node output of the main graph, in order."""
    order = []
    for node in model.graph:
        for out in node.outputs:
            if out.name and (out.dtype is None or out.dtype.is_floating_point()):
                order.append((out.name, node))
    return order


class _Pair:
    """The values one tensor took in both models, per feed (diff is for debugging: kept whole)."""

    __slots__ = ("a", "b")

    def __init__(self):
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []

    def add(self, arrays: list[np.ndarray]) -> None:
        self.a.append(arrays[0])
        self.b.append(arrays[1])


def tensor_diff(a: ir.Model, b: ir.Model, feeds: list[dict[str, np.ndarray]],
                tolerance: Tolerance | None = None, progress=None) -> dict:
    tolerance = tolerance or Tolerance()
    names_b = {out.name for node in b.graph for out in node.outputs}
    shared = [(name, node) for name, node in _value_order(a) if name in names_b]
    pairs, _ = stream_tensors([a, b], feeds, [name for name, _ in shared], _Pair,
                              lambda pair, arrays: pair.add(arrays), progress=progress, label="diff tensors")
    rows, first = [], None
    for name, node in shared:
        if name not in pairs:
            continue
        pair = pairs[name]
        metrics = output_metrics(pair.a, pair.b)
        equal = tolerance.allows(pair.a, pair.b)
        rows.append({"tensor": name, "node": node.name, "op": node.op_type, "equal": equal, **metrics})
        if not equal and first is None:
            first = rows[-1]
    return {"compared": len(rows), "first_divergence": first,
            "worst": sorted((r for r in rows if not r["equal"]), key=_sort_key)[:20]}


def _sort_key(row: dict) -> float:
    snr = row.get("snr_db")
    return float(snr) if isinstance(snr, (int, float)) else float("inf")
