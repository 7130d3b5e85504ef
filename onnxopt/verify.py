"""Structural verification of an IR model: onnx checker, topological order, unique names."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .graph_checks import structure_problems


# onnx's checker looks for an external tensor's file (relative to the working directory
# when given a protobuf) unless its location starts with '#'.
_UNREAD_LOCATION = "#onnxopt-verify-data-not-read"


def structural_problems(model: ir.Model) -> list[str]:
    """Problems found by our graph checks and the onnx checker (external data is not read)."""
    try:
        proto = proto_for_checking(model)
    except Exception as exc:  # serialization of a broken IR raises many types
        return [f"model cannot be serialized: {exc}"]
    problems = structure_problems(proto)
    problems += _topological_problems(model)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        problems.append("onnx checker: " + str(exc).strip().splitlines()[0])
    except ValueError as exc:  # protobuf over 2 GB with embedded tensors
        problems.append(f"onnx checker could not run: {exc}")
    return problems


def proto_for_checking(model: ir.Model):
    """The model as protobuf, initializers held as external or lazy tensors described but not read.

    ``ir.to_proto`` would compute every ``ir.LazyTensor`` and embed its bytes (the whole
    quantized model in memory at once), and onnx's checker would look for each external
    tensor's file relative to the working directory. On a clone (tensors shared, the
    model untouched) those initializers become external references to a '#' location
    with their dtype, shape and byte length.
    """
    from .graph_walk import all_graphs

    def deferred(graph) -> list[ir.Value]:
        return [v for v in getattr(graph, "initializers", {}).values()
                if isinstance(v.const_value, (ir.ExternalTensor, ir.LazyTensor))]

    if not any(deferred(graph) for graph in all_graphs(model)):
        return ir.to_proto(model)
    view = model.clone()
    for graph in all_graphs(view):
        for value in deferred(graph):
            tensor = value.const_value
            value.const_value = ir.ExternalTensor(_UNREAD_LOCATION, 0, tensor.nbytes, tensor.dtype,
                                                  shape=tensor.shape, name=tensor.name or value.name)
    return ir.to_proto(view)


def _topological_problems(model: ir.Model) -> list[str]:
    from .graph_walk import all_graphs

    problems = []
    for graph in all_graphs(model):
        seen: set[int] = set()
        scope = {id(v) for v in graph.inputs}
        if isinstance(graph, ir.Graph):
            scope |= {id(v) for v in graph.initializers.values()}
        for node in graph:
            for value in node.inputs:
                if value is None or id(value) in scope:
                    continue
                producer = value.producer()
                if producer is not None and producer.graph is graph and id(producer) not in seen:
                    problems.append(f"node '{node.name}' ({node.op_type}) runs before the producer of its input '{value.name}'")
                    break
            seen.add(id(node))
    return problems[:5]
