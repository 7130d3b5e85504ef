"""Where quantize-weights finds weights and how it stores what replaces them.

Stored constants (initializers and tensor Constant nodes of every graph), deterministic
names for unnamed consumer nodes, fresh value/node names, and a builder that adds the
new constants (as initializers or Constant nodes, the way the weight was stored) and
ops for one weight, then inserts them.
"""

from __future__ import annotations


import onnx_ir as ir

from onnxopt.naming import Namer
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


def take_back_names(model: ir.Model, assigned: dict[str, str | None], keep: set[ir.Node]) -> None:
    """Restore the original (empty) name of every node named by this call that is not in ``keep``."""
    if not assigned:
        return
    for graph in all_graphs(model):
        for node in graph:
            if node.name in assigned and node not in keep:
                node.name = assigned[node.name]


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
