"""Where a stored weight lives and from where it can be read: the scope tree of a model.

A value stored in a graph (initializer or Constant node) is visible in that graph and in
every subgraph nested in it (If/Loop/Scan bodies read outer-scope values by reference);
a function sees only its own values. Sharing one copy between two scopes therefore
means storing it in their lowest common ancestor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.graph_walk import node_subgraphs
from onnxopt.naming import Namer
from onnxopt.passes.quantize.weights_store import stored_constants

Scope = ir.Graph | ir.Function


@dataclasses.dataclass
class Weight:
    """One stored constant: where it is, its value and tensor, and its Constant node if any."""

    graph: Scope
    value: ir.Value
    const_node: ir.Node | None
    tensor: ir.TensorProtocol

    @property
    def nbytes(self) -> int:
        return int(self.tensor.nbytes)

    def array(self) -> np.ndarray:
        return self.tensor.numpy()

    def fixed(self) -> bool:
        """Graph inputs can be overridden at run time and graph outputs are the model's
        signature: such a weight is never merged, clustered or removed."""
        value = self.value
        return value.is_graph_input() or value.is_graph_output() or any(value is o for o in self.graph.outputs)

    def remove(self) -> None:
        """Drop the stored copy (its uses must already point elsewhere)."""
        if self.const_node is not None:
            self.graph.remove(self.const_node, safe=True)
        else:
            self.graph.initializers.pop(self.value.name)


def stored_weights(model: ir.Model) -> list[Weight]:
    """Every initializer and tensor Constant node of every graph, subgraph and function."""
    return [Weight(*entry) for entry in stored_constants(model)]


class Scopes:
    """The parent of every graph of a model; a function is a root of its own."""

    def __init__(self, model: ir.Model):
        self.parent: dict[int, Scope | None] = {}
        self._inner: dict[int, Scope] = {}  # a function's inner ir.Graph -> the function
        self._walk(model.graph, None)
        for function in model.functions.values():
            self._inner[id(function.graph)] = function
            self._walk(function, None)

    def _walk(self, scope: Scope, parent: Scope | None) -> None:
        self.parent[id(scope)] = parent
        for node in scope:
            for sub in node_subgraphs(node):
                self._walk(sub, scope)

    def of_node(self, node: ir.Node) -> Scope:
        graph = node.graph
        return self._inner.get(id(graph), graph)

    def chain(self, scope: Scope) -> list[Scope]:
        """``scope``, its parent, ..., its root."""
        chain = [scope]
        while (parent := self.parent[id(chain[-1])]) is not None:
            chain.append(parent)
        return chain

    def common(self, scopes: list[Scope]) -> Scope | None:
        """The innermost scope enclosing all of ``scopes``; None when they have different roots."""
        chains = [self.chain(s) for s in scopes]
        shared = {id(s) for s in chains[0]}
        for chain in chains[1:]:
            shared &= {id(s) for s in chain}
        return next((s for s in chains[0] if id(s) in shared), None)

    def root(self, scope: Scope) -> Scope:
        return self.chain(scope)[-1]

    def sees(self, reader: Scope, stored_in: Scope) -> bool:
        """Whether a value stored in ``stored_in`` can be read from ``reader``."""
        return any(s is stored_in for s in self.chain(reader))


def store_constant(scope: Scope, tensor: ir.TensorProtocol, base: str, namer: Namer, as_node: bool) -> ir.Value:
    """Store ``tensor`` in ``scope``: an initializer, or a Constant node first in the scope
    (functions hold no initializers). Returns its value, typed and shaped."""
    name = namer.fresh(base)
    tensor.name = name
    if as_node or isinstance(scope, ir.Function):
        node = ir.node("Constant", [], {"value": tensor}, name=namer.fresh(f"{name}_node"))
        value = node.outputs[0]
        value.name = name
        put_first(scope, node)
    else:
        value = ir.Value(name=name, const_value=tensor)
        scope.register_initializer(value)
    value.dtype, value.shape, value.const_value = tensor.dtype, ir.Shape(tensor.shape.numpy()), tensor
    return value


def put_first(scope: Scope, nodes: ir.Node | list[ir.Node]) -> None:
    """Put nodes that read only constants first in ``scope`` (valid wherever their outputs are read)."""
    nodes = [nodes] if isinstance(nodes, ir.Node) else nodes
    for node in nodes:
        if node.graph is not None:
            node.graph.remove(node, safe=False)
    if len(scope):
        scope.insert_before(scope[0], nodes)
    else:
        scope.extend(nodes)
