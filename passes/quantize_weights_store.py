"""Where quantize-weights finds weights and how it stores what replaces them.

Stored constants (initializers and tensor Constant nodes of every graph), deterministic
names for unnamed consumer nodes, fresh value/node names, and a builder that adds the
new constants (as initializers or Constant nodes, the way the weight was stored) and
ops for one weight, then inserts them.
"""

from __future__ import annotations

from collections import Counter

import onnx_ir as ir

from onnxopt.graph_walk import all_graphs


def stored_constants(model: ir.Model):
    """(graph, value, Constant node or None, tensor) for every initializer and tensor Constant."""
    for graph in all_graphs(model):
        if isinstance(graph, ir.Graph):
            for value in list(graph.initializers.values()):
                if value.const_value is not None:
                    yield graph, value, None, value.const_value
        for node in list(graph):
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(node.attributes) == {"value"}:
                yield graph, node.outputs[0], node, node.attributes["value"].as_tensor()


def name_unnamed_nodes(model: ir.Model, op_types: frozenset[str]) -> dict[str, str | None]:
    """Name every unnamed default-domain node of ``op_types`` ``<op_type>_<n>``; returns {new name: old name}.

    The numbering depends only on the model (graph order, names already in use), never
    on the pass options, so a run with ``exclude_nodes=[^MatMul_3$]`` on the same input
    finds the node an earlier run reported as ``MatMul_3``.
    """
    nodes = [node for graph in all_graphs(model) for node in graph]
    used = {node.name for node in nodes if node.name}
    counters: Counter[str] = Counter()
    assigned: dict[str, str | None] = {}
    for node in nodes:
        if node.name or node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
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


def take_back_names(model: ir.Model, assigned: dict[str, str | None], keep: set[ir.Node]) -> None:
    """Restore the original (empty) name of every node named by this call that is not in ``keep``."""
    if not assigned:
        return
    for graph in all_graphs(model):
        for node in graph:
            if node.name in assigned and node not in keep:
                node.name = assigned[node.name]


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


class Store:
    """Builds constants (initializers or Constant nodes) and ops for one weight, then inserts them."""

    def __init__(self, graph, namer: Namer, as_nodes: bool):
        self.graph, self.namer, self.as_nodes = graph, namer, as_nodes
        self.nodes: list[ir.Node] = []
        self.nbytes = 0

    def const(self, base: str, tensor: ir.TensorProtocol) -> ir.Value:
        name = self.namer.fresh(base)
        tensor.name = name
        self.nbytes += tensor.nbytes
        if self.as_nodes:
            node = ir.node("Constant", [], {"value": tensor}, name=self.namer.fresh(f"{name}_node"))
            value = node.outputs[0]
            value.name = name
            self.nodes.append(node)
        else:
            value = ir.Value(name=name, const_value=tensor)
            self.graph.register_initializer(value)
        value.dtype, value.shape = tensor.dtype, ir.Shape(tensor.shape.numpy())
        value.const_value = tensor
        return value

    def op(self, op_type: str, inputs, attrs=None, name: str | None = None) -> ir.Value:
        node = ir.node(op_type, inputs, attrs or {}, name=self.namer.fresh(f"{name or inputs[0].name}_{op_type}"))
        out = node.outputs[0]
        out.name = self.namer.fresh(name or f"{node.name}_out")
        self.nodes.append(node)
        return out

    def insert(self, after: ir.Node | None) -> None:
        if after is not None:
            self.graph.insert_after(after, self.nodes)
        elif len(self.graph):
            self.graph.insert_before(self.graph[0], self.nodes)
        else:
            self.graph.extend(self.nodes)
