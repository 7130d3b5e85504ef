"""Partition marks: which stage (and which kind of part) each main-graph node belongs to.

The split passes write them; the stage exporter, the ``partition`` selector and reports read
them. Marks live in ``node.metadata_props`` so they survive cloning, saving and reloading.
Only main-graph nodes are marked: a node with If/Loop/Scan bodies is never split internally
and its body nodes belong to its part. A ``Constant`` node (no inputs, no subgraphs) is
free: the exporter copies it into every stage that reads it, like a shared initializer.
"""

from __future__ import annotations

import onnx_ir as ir

from .errors import UsageError
from .graph_walk import node_subgraphs

STAGE_KEY = "onnxopt.stage"
PARTITION_KEY = "onnxopt.partition"


def is_free_constant(node: ir.Node) -> bool:
    """A node the exporter copies into each consuming stage instead of cutting after it."""
    return (node.op_type == "Constant" and node.domain in ("", "ai.onnx") and not node.inputs
            and not node_subgraphs(node))


def mark(node: ir.Node, stage: int, partition: str | None = None) -> bool:
    """Mark ``node`` as part of ``stage`` (label ``partition``, default ``stageK``); True when that changed it."""
    label = partition or f"stage{stage}"
    before = (node.metadata_props.get(STAGE_KEY), node.metadata_props.get(PARTITION_KEY))
    node.metadata_props[STAGE_KEY] = str(stage)
    node.metadata_props[PARTITION_KEY] = label
    return before != (str(stage), label)


def stage_of(node: ir.Node) -> int | None:
    text = node.metadata_props.get(STAGE_KEY)
    return int(text) if text is not None and text.lstrip("-").isdigit() else None


def partition_of(node: ir.Node) -> str | None:
    return node.metadata_props.get(PARTITION_KEY)


def clear_marks(model: ir.Model) -> bool:
    """Remove every partition mark (main graph); True when there were any."""
    changed = False
    for node in model.graph:
        for key in (STAGE_KEY, PARTITION_KEY):
            if key in node.metadata_props:
                del node.metadata_props[key]
                changed = True
    return changed


def mark_stages(model: ir.Model, units: list[ir.Node], stages: list[int], labels: list[str] | None = None) -> bool:
    """Mark ``units[i]`` with ``stages[i]``; free constants take the first stage that reads them.

    Old marks are replaced; returns whether any node's marks changed.
    """
    by_node = {node: (stage, (labels[i] if labels else None)) for i, (node, stage) in enumerate(zip(units, stages))}
    changed = False
    marked: set[ir.Node] = set()
    owners = subgraph_owners(model.graph)
    for node, (stage, label) in by_node.items():
        changed |= mark(node, stage, label)
        marked.add(node)
    for node in model.graph:
        if node in marked:
            continue
        if is_free_constant(node):
            readers = [by_node[c] for c in consumer_units(node, by_node, owners)]
            stage, label = min(readers) if readers else (0, None)
            if not readers and by_node:
                stage, label = min(by_node.values(), key=lambda s: s[0])
            changed |= mark(node, stage, label)
        else:
            raise UsageError(f"node {node.name!r} ({node.op_type}) was given no stage")
    return changed


def consumer_units(node: ir.Node, units, owners: dict[int, ir.Node] | None = None) -> list[ir.Node]:
    """Main-graph nodes in ``units`` that read an output of ``node`` (directly or from a body)."""
    owners = owners if owners is not None else subgraph_owners(node.graph)
    found = []
    for output in node.outputs:
        for use in output.uses():
            user = outer_node(use.node, node.graph, owners)
            if user is not None and user in units and user not in found:
                found.append(user)
    return found


def subgraph_owners(graph: ir.Graph) -> dict[int, ir.Node]:
    """id(body) -> the node holding it, for every body nested anywhere in ``graph``."""
    owners: dict[int, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for sub in node_subgraphs(node):
            owners[id(sub)] = node
    return owners


def outer_node(node: ir.Node, graph: ir.Graph, owners: dict[int, ir.Node]) -> ir.Node | None:
    """The node of ``graph`` that is ``node`` or holds (transitively) the body ``node`` sits in."""
    while node is not None and node.graph is not graph:
        node = owners.get(id(node.graph))
    return node


def stage_assignment(model: ir.Model) -> dict[ir.Node, int]:
    """Every main-graph node's stage; unmarked non-constant nodes are an error naming the first."""
    stages: dict[ir.Node, int] = {}
    for node in model.graph:
        stage = stage_of(node)
        if stage is None:
            raise UsageError(f"node {node.name!r} ({node.op_type}) carries no partition mark; run a split-* pass first")
        stages[node] = stage
    return stages
