"""Structural verification of an IR model: onnx checker, topological order, unique names."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from .graph_checks import structure_problems


def structural_problems(model: ir.Model) -> list[str]:
    """Problems found by our graph checks and the onnx checker (external data is not read)."""
    try:
        proto = ir.to_proto(model)
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
