"""A structural snapshot of a model, so cleanup passes report `modified` and stats honestly.

The wrapped onnx_ir / onnxscript passes compute their own `modified` flags, and some miss
changes (optional outputs trimmed by unused removal, shapes written by the folder, subgraphs
re-sorted). A cleanup pass therefore compares a snapshot taken before with one taken after:
node order and identity, op and attributes, value names, types and shapes, initializers,
graph inputs and outputs, opset imports and functions, over every graph and function.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

import onnxopt


def _shape_key(shape: ir.Shape | None) -> tuple | None:
    # A copy of the dims; symbolic dims compare by name.
    return None if shape is None else shape.dims


def _type_key(type_: ir.TypeProtocol | None) -> object:
    if type_ is None:
        return None
    if type(type_) is ir.TensorType:  # the common case, without building a repr
        return type_.dtype
    return repr(type_)


class Snapshot:
    """What a model looks like now; two snapshots compare equal iff the structure is the same.

    Objects are recorded by ``id``; the snapshot keeps them alive so no id is reused.
    """

    def __init__(self, model: ir.Model):
        self._keep: list[Any] = []
        self.values: dict[int, tuple] = {}
        self.nodes = self.initializers = self.initializer_bytes = 0
        graphs = [self._graph(g) for g in onnxopt.all_graphs(model)]
        self.functions = len(model.functions)
        self.opset_imports = len(model.opset_imports) + sum(
            len(f.opset_imports) for f in model.functions.values()
        )
        self.key = (
            model.ir_version,
            tuple(sorted(model.opset_imports.items())),
            tuple((k, self._id(f)) for k, f in model.functions.items()),
            tuple(graphs),
        )

    def _id(self, obj: Any) -> int | None:
        if obj is None:
            return None
        self._keep.append(obj)
        return id(obj)

    def _value(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        self.values[id(value)] = (value.name, _type_key(value.type), _shape_key(value.shape))
        return self._id(value)

    def _graph(self, graph: ir.Graph | ir.Function) -> tuple:
        opsets = tuple(sorted(graph.opset_imports.items())) if isinstance(graph, ir.Function) else ()
        inputs = tuple(self._value(v) for v in graph.inputs)
        outputs = tuple(self._value(v) for v in graph.outputs)
        initializers = []
        if isinstance(graph, ir.Graph):
            for name, value in graph.initializers.items():
                self._value(value)
                initializers.append((name, self._id(value), self._id(value.const_value)))
                if value.const_value is not None:
                    self.initializer_bytes += value.const_value.nbytes
        self.initializers += len(initializers)
        nodes = []
        for node in graph:
            self.nodes += 1
            nodes.append((
                self._id(node), node.name, node.domain, node.op_type, node.overload,
                tuple(self._id(v) for v in node.inputs),
                tuple(self._value(v) for v in node.outputs),
                tuple((k, self._id(a)) for k, a in node.attributes.items()),
            ))
        return (self._id(graph), graph.name, opsets, inputs, outputs, tuple(initializers), tuple(nodes))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Snapshot):
            return NotImplemented
        return self.key == other.key and self.values == other.values

    __hash__ = None  # type: ignore[assignment]

    def values_changed(self, later: Snapshot) -> int:
        """How many values present in both snapshots changed type or shape."""
        return sum(
            1
            for vid, (_, type_, shape) in later.values.items()
            if vid in self.values and self.values[vid][1:] != (type_, shape)
        )


def census_delta(before: Snapshot, after: Snapshot) -> dict[str, int]:
    """Counts that went down from ``before`` to ``after`` (negative if they went up)."""
    return {
        "nodes_removed": before.nodes - after.nodes,
        "initializers_removed": before.initializers - after.initializers,
        "bytes_saved": before.initializer_bytes - after.initializer_bytes,
        "functions_removed": before.functions - after.functions,
        "opset_imports_removed": before.opset_imports - after.opset_imports,
    }
