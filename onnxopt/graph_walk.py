"""Helpers for visiting every graph of a model: main graph, If/Loop/Scan bodies, functions."""

from __future__ import annotations

from collections.abc import Iterator

import onnx_ir as ir


def all_graphs(model: ir.Model) -> Iterator[ir.Graph | ir.Function]:
    """The main graph, every nested subgraph, and every function (and their subgraphs)."""
    yield from _graph_and_subgraphs(model.graph)
    for function in model.functions.values():
        yield function
        for node in function:
            for attr in node.attributes.values():
                yield from _attr_graphs(attr)


def _graph_and_subgraphs(graph: ir.Graph) -> Iterator[ir.Graph]:
    yield graph
    for node in graph:
        for attr in node.attributes.values():
            yield from _attr_graphs(attr)


def _attr_graphs(attr) -> Iterator[ir.Graph]:
    if isinstance(attr, ir.Attr):
        if attr.type == ir.AttributeType.GRAPH:
            yield from _graph_and_subgraphs(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            for sub in attr.as_graphs():
                yield from _graph_and_subgraphs(sub)


def node_subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held directly by a node's attributes (If branches, Loop/Scan bodies)."""
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.as_graph())
        elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.as_graphs())
    return graphs


def all_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the model, including subgraph and function nodes."""
    for graph in all_graphs(model):
        yield from graph


def count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in all_nodes(model))
