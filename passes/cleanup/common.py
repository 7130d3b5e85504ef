"""Lossless cleanup passes wrapping onnx_ir's common passes, over every graph and function.

Each pass takes a snapshot before and after (``snapshot``) so ``modified`` is exactly
"the model differs", whatever the wrapped pass says. Where an onnx_ir pass skips subgraphs or
functions it is applied per graph; where it breaks a model it is guarded (see each class).
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import onnx
import onnx_ir as ir
from onnx_ir.passes import common
from onnx_ir.passes.common import _c_api_utils

import onnxopt

from .snapshot import Snapshot, census_delta


class _GuardedIdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's identity elimination, minus the two cases it gets wrong (onnx_ir 1.1).

    When ``y = Identity(x)`` feeds a graph output it renames ``x`` to ``y``. If ``x`` is
    already an output of that graph the graph ends up with one value under two output slots
    (a Scan body then reads garbage); if ``x`` comes from an outer scope, or is a graph
    input or initializer anywhere, the rename crashes or renames the outer value.
    """

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if node.op_type == "Identity" and node.domain == "" and len(node.inputs) == 1:
            source, output = node.inputs[0], node.outputs[0]
            if source is not None and output.is_graph_output():
                producer = source.producer()
                if producer is None or producer.graph is not node.graph or source.is_graph_output():
                    return False
        return super()._try_eliminate_identity_node(node)


_TYPE_ATTRS = (ir.AttributeType.TYPE_PROTO, ir.AttributeType.TYPE_PROTOS)


def _blocks_cse(node: ir.Node) -> bool:
    if node.op_type == "Bernoulli" and node.domain in ("", "ai.onnx"):
        return True
    return any(attr.type in _TYPE_ATTRS for attr in node.attributes.values())


class _EveryGraphCSE(common.CommonSubexpressionEliminationPass):
    """onnx_ir's CSE only visits the main graph; run it on every subgraph and function too.

    Graphs are skipped (``graphs_skipped``) when they hold a ``Bernoulli`` node (onnx_ir does
    not count it as random; merging two draws changes what the model computes) or a node
    with a type attribute such as ``Optional<type=...>`` (onnx_ir crashes hashing it).
    """

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.graphs_skipped = 0
        modified = False
        for graph in list(onnxopt.all_graphs(model)):
            if any(_blocks_cse(n) for n in graph):
                self.graphs_skipped += 1
                continue
            modified |= self._eliminate_common_subexpression(graph)
        return ir.passes.PassResult(model, modified)


def _remove_unused_subgraph_initializers(model: ir.Model) -> None:
    """RemoveUnusedNodesPass drops unused initializers of the main graph only."""
    for graph in onnxopt.all_graphs(model):
        if not isinstance(graph, ir.Graph) or graph is model.graph:
            continue
        for name, value in list(graph.initializers.items()):
            if not (value.uses() or value.is_graph_output() or value.is_graph_input()):
                del graph.initializers[name]


class RemoveUnusedPass(onnxopt.Pass):
    """Remove nodes, initializers, functions and opset imports nothing uses."""

    name = "remove-unused"

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        before = Snapshot(model)
        common.RemoveUnusedNodesPass()(model)
        _remove_unused_subgraph_initializers(model)
        common.RemoveUnusedFunctionsPass()(model)
        common.RemoveUnusedOpsetsPass()(model)
        after = Snapshot(model)
        return onnxopt.PassResult(model, before != after, census_delta(before, after))


class EliminateIdentitiesPass(onnxopt.Pass):
    """Remove Identity nodes, keeping graph input and output names."""

    name = "eliminate-identities"

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        before = Snapshot(model)
        _GuardedIdentityElimination()(model)
        after = Snapshot(model)
        return onnxopt.PassResult(
            model, before != after, {"nodes_removed": before.nodes - after.nodes}
        )


class EliminateCommonSubexpressionsPass(onnxopt.Pass):
    """Merge nodes that compute the same op on the same inputs with the same attributes."""

    name = "eliminate-common-subexpressions"

    @dataclasses.dataclass(frozen=True)
    class Options:
        size_limit: int = field(
            default=10,
            metadata={"help": "merge Constant-like nodes only up to this many tensor elements"},
        )

        def __post_init__(self):
            if self.size_limit < 0:
                raise ValueError("size_limit must be >= 0")

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        before = Snapshot(model)
        cse = _EveryGraphCSE(size_limit=self.options.size_limit)
        cse(model)
        after = Snapshot(model)
        stats = {"nodes_removed": before.nodes - after.nodes, "graphs_skipped": cse.graphs_skipped}
        return onnxopt.PassResult(model, before != after, stats)


class SortTopologicallyPass(onnxopt.Pass):
    """Reorder nodes so every value is produced before it is used (stable)."""

    name = "sort-topologically"

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        orders = [list(g) for g in onnxopt.all_graphs(model)]
        common.TopologicalSortPass()(model)  # Graph.sort also sorts subgraphs
        moved = sum(
            sum(a is not b for a, b in zip(old, g))
            for old, g in zip(orders, onnxopt.all_graphs(model))
        )
        return onnxopt.PassResult(model, moved > 0, {"nodes_moved": moved})


class InferShapesPass(onnxopt.Pass):
    """Annotate value types and shapes with ONNX shape inference (functions stay as they are)."""

    name = "infer-shapes"

    @dataclasses.dataclass(frozen=True)
    class Options:
        data_prop: bool = field(
            default=False,
            metadata={"help": "also propagate shape values through Shape/Gather/Concat... (more static dims)"},
        )

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        # onnx_ir's ShapeInferencePass would do, but its merge writes a tensor type onto a
        # sequence or optional value that had no type (onnx_ir 1.1), and it hides a failure.
        # Its C-API helper detaches initializers over 1 KB while ONNX infers, so external
        # data is never read and >2GB models are never serialized.
        def infer(proto: onnx.ModelProto) -> onnx.ModelProto:
            return onnx.shape_inference.infer_shapes(
                proto, check_type=True, strict_mode=True, data_prop=self.options.data_prop
            )

        before = Snapshot(model)
        try:
            inferred = ir.serde.deserialize_model(_c_api_utils.call_onnx_api(infer, model))
        except onnx.shape_inference.InferenceError as error:  # model disagrees with ONNX: leave it
            stats = {"values_refined": 0, "inference_error": str(error).strip().splitlines()[0]}
            return onnxopt.PassResult(model, before != Snapshot(model), stats)
        for graph, inferred_graph in zip(model.graphs(), inferred.graphs()):
            found = ir.convenience.create_value_mapping(inferred_graph)
            for name, value in ir.convenience.create_value_mapping(graph).items():
                if (new := found.get(name)) is not None:
                    if new.type is not None and value.type != new.type:
                        value.type = new.type
                    if new.shape is not None and value.shape != new.shape:
                        value.shape = new.shape
        after = Snapshot(model)
        stats = {"values_refined": before.values_changed(after)}
        return onnxopt.PassResult(model, before != after, stats)
