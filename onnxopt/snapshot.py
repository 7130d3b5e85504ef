"""Independent copies of a model for rollback.

``ir.Model.clone()`` copies graphs, nodes and values but shares tensors (immutable,
fine) and type objects (mutable: ``value.dtype = ...`` on one model changes the other).
A snapshot gets its own type objects, so a pass editing types in place cannot reach it.
"""

from __future__ import annotations

import copy

import onnx_ir as ir

from .graph_walk import all_graphs


def snapshot(model: ir.Model) -> ir.Model:
    clone = model.clone()
    for graph in all_graphs(clone):
        values = list(graph.inputs) + list(graph.outputs)
        if isinstance(graph, ir.Graph):
            values += list(graph.initializers.values())
        for node in graph:
            values += list(node.outputs)
        for value in values:
            if value.type is not None:
                value.type = copy.deepcopy(value.type)
    return clone
