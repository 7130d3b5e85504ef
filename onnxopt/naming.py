"""Names for new values and nodes, and for nodes that came without one."""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from .graph_walk import all_graphs


class Namer:
    """Fresh value and node names that collide with nothing in the model."""

    def __init__(self, model: ir.Model):
        self.used: set[str] = set()
        for graph in all_graphs(model):
            self.used.update(v.name for v in graph.inputs if v.name)
            self.used.update(getattr(graph, "initializers", {}).keys())
            for node in graph:
                self.used.update(v.name for v in node.outputs if v.name)
                if node.name:
                    self.used.add(node.name)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.used:
            name, i = f"{base}_{i}", i + 1
        self.used.add(name)
        return name


def name_unnamed_nodes(model: ir.Model, op_types: frozenset[str] | None = None) -> dict[str, str | None]:
    """Name every unnamed default-domain node (of ``op_types``, or all) ``<op_type>_<n>``;
    returns {new name: old name}.

    The numbering depends only on the model (graph order, names already in use), never on
    a pass's options, so a run with ``exclude_nodes=[^MatMul_3$]`` on the same input finds
    the node an earlier run reported as ``MatMul_3``.
    """
    nodes = [node for graph in all_graphs(model) for node in graph]
    used = {node.name for node in nodes if node.name}
    counters: Counter[str] = Counter()
    assigned: dict[str, str | None] = {}
    for node in nodes:
        if node.name or node.domain not in ("", "ai.onnx") or (op_types is not None and node.op_type not in op_types):
            continue
        while True:
            name = f"{node.op_type}_{counters[node.op_type]}"
            counters[node.op_type] += 1
            if name not in used:
                break
        used.add(name)
        assigned[name] = node.name
        node.name = name
    return assigned
