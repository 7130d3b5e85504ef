"""Node selectors shared by passes: by node name, by op type, and by region between two tensors.

A pass that lets the user restrict where it acts declares the selector fields in its
options dataclass (``selector_field("nodes")`` ... or by inheriting ``SelectorOptions``)
and builds a :class:`NodeSelector` with :func:`selector_from_options`. A selector that
filters anything and matches no node raises ``UsageError`` saying what it looked for;
an empty selector selects every node.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

import onnx_ir as ir

from .errors import UsageError
from .graph_walk import all_graphs, node_subgraphs

SELECTOR_HELP = {
    "nodes": "only nodes whose name matches one of these regular expressions (searched; anchor with ^$)",
    "exclude_nodes": "skip nodes whose name matches one of these regular expressions",
    "ops": "only nodes of these op types (e.g. [MatMul,Conv])",
    "exclude_ops": "skip nodes of these op types",
    "region": "two tensor names [from,to]: only nodes on a path from the first to the second",
    "partition": "only nodes a split-* pass marked with one of these partitions (e.g. [accelerator], [stage1]); "
                 "If/Loop body nodes follow their node",
}
SELECTOR_FIELDS = tuple(SELECTOR_HELP)


def selector_field(name: str) -> dataclasses.Field:
    """A dataclass field for selector option ``name`` with the shared default and help text."""
    if name not in SELECTOR_HELP:
        raise ValueError(f"unknown selector field {name!r}; valid: {', '.join(SELECTOR_FIELDS)}")
    return dataclasses.field(default=(), metadata={"help": SELECTOR_HELP[name]})


@dataclasses.dataclass(frozen=True)
class SelectorOptions:
    """Base for an options dataclass that only needs the selector fields (they come first)."""

    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    ops: tuple[str, ...] = selector_field("ops")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    partition: tuple[str, ...] = selector_field("partition")


PROMOTE_HELP = ("nodes (name regular expressions) quantized at the pass's higher fallback precision; "
                "set by mixed precision to a budget, or by hand")


def promote_field() -> dataclasses.Field:
    """The ``promote_nodes`` option of a pass that has a higher precision to fall back to.

    A pass declaring it also defines ``promotion_ladder()``: the precisions those nodes can
    get, lowest first, as (option changes, label) pairs, e.g. ``({"promote_bits": 16},
    "16-bit weights")``; empty when its options leave nothing higher. It reports
    ``stats["promoted_nodes"]``.
    """
    return dataclasses.field(default=(), metadata={"help": PROMOTE_HELP})


@dataclasses.dataclass(frozen=True)
class NameFilter:
    """Nodes whose name matches one of some regular expressions (searched, like ``nodes``)."""

    patterns: tuple[str, ...] = ()
    field: str = "promote_nodes"

    def __post_init__(self):
        object.__setattr__(self, "_res", _compile(self.patterns, self.field))

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, node: ir.Node) -> bool:
        name = node.name or ""
        return any(p.search(name) for p in self._res)


def promote_filter(model: ir.Model, patterns: tuple[str, ...], owner: str) -> NameFilter:
    """The :class:`NameFilter` of a pass's ``promote_nodes``; a filter that matches no node of
    ``model`` is a ``UsageError`` naming the pass ``owner``."""
    promote = NameFilter(patterns)
    if promote and not any(promote.matches(n) for graph in all_graphs(model) for n in graph):
        raise UsageError(f"{owner}: promote_nodes matched no node: looked for {list(patterns)}")
    return promote


def _compile(patterns: Iterable[str], field: str) -> tuple[re.Pattern, ...]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise UsageError(f"selector '{field}': bad regular expression {pattern!r}: {exc}") from None
    return tuple(compiled)


@dataclasses.dataclass(frozen=True)
class NodeSelector:
    """Which nodes a pass may touch. Name and op filters combine with AND; lists within a field with OR."""

    nodes: tuple[str, ...] = ()
    exclude_nodes: tuple[str, ...] = ()
    ops: tuple[str, ...] = ()
    exclude_ops: tuple[str, ...] = ()
    region: tuple[str, ...] = ()
    partition: tuple[str, ...] = ()

    def __post_init__(self):
        for f in SELECTOR_FIELDS:
            object.__setattr__(self, f, tuple(getattr(self, f)))
        if self.region and len(self.region) != 2:
            raise UsageError(f"selector 'region' needs two tensor names [from,to], got {list(self.region)}")
        object.__setattr__(self, "_name_res", _compile(self.nodes, "nodes"))
        object.__setattr__(self, "_exclude_res", _compile(self.exclude_nodes, "exclude_nodes"))

    @property
    def is_trivial(self) -> bool:
        """True when no field is set: every node is selected."""
        return not any(getattr(self, f) for f in SELECTOR_FIELDS)

    def describe(self) -> str:
        parts = [f"{f}={list(getattr(self, f))}" for f in SELECTOR_FIELDS if getattr(self, f)]
        return ", ".join(parts) or "(all nodes)"

    def matches(self, node: ir.Node, region: frozenset[ir.Node] | set[ir.Node] | None = None) -> bool:
        """Whether ``node`` passes the name and op filters (and is in ``region`` when one is given).

        A ``region`` selector needs the model: pass ``region=self.region_nodes(model)``,
        or use :meth:`select`.
        """
        name = node.name or ""
        if self._name_res and not any(p.search(name) for p in self._name_res):
            return False
        if any(p.search(name) for p in self._exclude_res):
            return False
        if self.ops and node.op_type not in self.ops:
            return False
        if node.op_type in self.exclude_ops:
            return False
        return region is None or node in region

    def select(self, model: ir.Model) -> list[ir.Node]:
        """Every selected node of every graph (subgraphs and functions too), in graph order."""
        region = self.region_nodes(model) if self.region else None
        if self.partition:
            marked = self.partition_nodes(model)
            region = marked if region is None else region & marked
        selected = [node for graph in all_graphs(model) for node in graph if self.matches(node, region)]
        if not selected and not self.is_trivial:
            raise UsageError(f"node selector matched no node: looked for {self.describe()}")
        return selected

    def region_nodes(self, model: ir.Model) -> frozenset[ir.Node]:
        """Nodes on some path from tensor ``region[0]`` to tensor ``region[1]``, with their subgraphs."""
        if not self.region:
            return frozenset(node for graph in all_graphs(model) for node in graph)
        start_name, end_name = self.region
        owners = _subgraph_owners(model)
        start, end = _find_value(model, start_name), _find_value(model, end_name)
        missing = [n for n, v in ((start_name, start), (end_name, end)) if v is None]
        if missing:
            raise UsageError(f"selector 'region': no tensor named {', '.join(map(repr, missing))} in the model")
        graph = _value_graph(end, owners)
        forward = _forward(start, graph, owners)
        backward = _backward(end, graph, owners)
        core = forward & backward
        if not core:
            raise UsageError(f"selector 'region': no path from tensor {start_name!r} to tensor {end_name!r}")
        return frozenset(_with_subgraph_nodes(core))


    def partition_nodes(self, model: ir.Model) -> frozenset[ir.Node]:
        """Main-graph nodes marked with one of ``partition`` (see onnxopt.split_marks), with their bodies."""
        from .split_marks import partition_of

        labels = {partition_of(node) for node in model.graph} - {None}
        if not labels:
            raise UsageError("selector 'partition': the model carries no partition marks; run a split-* pass "
                             "before this one (e.g. -p split-supported-ops:ops=[Conv,Relu])")
        unknown = [p for p in self.partition if p not in labels]
        if unknown:
            raise UsageError(f"selector 'partition': no partition named {unknown[0]!r}; the model has "
                             f"{', '.join(sorted(labels))}")
        return frozenset(_with_subgraph_nodes(n for n in model.graph if partition_of(n) in self.partition))


def selector_from_options(options) -> NodeSelector:
    """The :class:`NodeSelector` described by an options object's selector fields (missing ones empty)."""
    return NodeSelector(**{f: getattr(options, f, ()) or () for f in SELECTOR_FIELDS})


def _subgraph_owners(model: ir.Model) -> dict[int, ir.Node]:
    """id(subgraph) -> the node whose attribute holds it."""
    owners: dict[int, ir.Node] = {}
    for graph in all_graphs(model):
        for node in graph:
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH:
                    owners[id(attr.as_graph())] = node
                elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.as_graphs():
                        owners[id(sub)] = node
    return owners


def _find_value(model: ir.Model, name: str) -> ir.Value | None:
    for graph in all_graphs(model):
        candidates = list(graph.inputs)
        candidates += list(getattr(graph, "initializers", {}).values())
        candidates += [out for node in graph for out in node.outputs]
        for value in candidates:
            if value.name == name:
                return value
    return None


def _value_graph(value: ir.Value, owners: dict[int, ir.Node]):
    producer = value.producer()
    if producer is not None:
        return producer.graph
    if value.graph is not None:
        return value.graph
    uses = list(value.uses())  # a function input knows no graph: take its outermost consumer's
    if not uses:
        return None
    node = uses[0].node
    while id(node.graph) in owners:
        node = owners[id(node.graph)]
    return node.graph


def _lift(node: ir.Node, graph, owners: dict[int, ir.Node]) -> ir.Node | None:
    """The node of ``graph`` that is ``node`` or (transitively) holds the subgraph containing it."""
    while node is not None and node.graph is not graph:
        node = owners.get(id(node.graph))
    return node


def _forward(start: ir.Value, graph, owners) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [start]
    while stack:
        value = stack.pop()
        for use in value.uses():
            node = _lift(use.node, graph, owners)
            if node is not None and node not in seen:
                seen.add(node)
                stack.extend(node.outputs)
    return seen


def _inner_inputs(node: ir.Node) -> Iterable[ir.Value | None]:
    yield from node.inputs
    for sub in node_subgraphs(node):
        for inner in sub:
            yield from _inner_inputs(inner)


def _backward(end: ir.Value, graph, owners) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    producer = end.producer()
    stack = [producer] if producer is not None else []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for value in _inner_inputs(node):
            if value is None or value.producer() is None:
                continue
            outer = _lift(value.producer(), graph, owners)
            if outer is not None and outer is not node and outer not in seen:
                stack.append(outer)
    return seen


def _with_subgraph_nodes(nodes: Iterable[ir.Node]) -> set[ir.Node]:
    result: set[ir.Node] = set()
    for node in nodes:
        result.add(node)
        for sub in node_subgraphs(node):
            result |= _with_subgraph_nodes(sub)
    return result
