"""Structural checks on a model protobuf: duplicate names, undefined inputs, cycles.

They run at load time (naming the problem in one line) and after each pass (the
structural-verify instrument, on the IR serialized back to protobuf).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import onnx

from .errors import InputError


def structure_problems(proto: onnx.ModelProto) -> list[str]:
    """Every structural problem found, as one-line messages (empty when sound)."""
    problems: list[str] = []
    _check_graph(proto.graph, outer=set(), where="main graph", problems=problems)
    for function in proto.functions:
        _check_nodes(function.node, set(function.input), f"function '{function.name}'", problems, outer=set())
    return problems


def check_graph_structure(proto: onnx.ModelProto, path: Path | str) -> None:
    problems = structure_problems(proto)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise InputError(f"{path}: {problems[0]}{more}")


def _check_graph(graph: onnx.GraphProto, outer: set[str], where: str, problems: list[str]) -> None:
    defined: set[str] = set()
    input_names = [i.name for i in graph.input]
    init_names = [i.name for i in graph.initializer] + [s.values.name for s in graph.sparse_initializer]
    _report_duplicates(input_names, f"{where}: graph input", problems)
    _report_duplicates(init_names, f"{where}: initializer", problems)
    defined.update(input_names)
    defined.update(init_names)
    _check_nodes(graph.node, defined, where, problems, outer)
    known = defined | outer
    for node in graph.node:
        known.update(o for o in node.output if o)
    for output in graph.output:
        if output.name not in known:
            problems.append(f"{where}: graph output '{output.name}' is not produced by any node or input")


def _check_nodes(nodes: Iterable[onnx.NodeProto], defined: set[str], where: str, problems: list[str], outer: set[str]) -> None:
    nodes = list(nodes)
    producers: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for out in node.output:
            if not out:
                continue
            if out in producers or out in defined:
                problems.append(f"{where}: value '{out}' is defined more than once (duplicate name)")
            producers[out] = index
    available = defined | outer
    for node in nodes:
        label = node.name or node.op_type
        for name in node.input:
            if name and name not in available and name not in producers:
                problems.append(f"{where}: node '{label}' uses undefined input '{name}'")
        scope = available | set(producers)
        for attr in node.attribute:
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for sub in subgraphs:
                _check_graph(sub, scope, f"{where} > {label}.{attr.name}", problems)
    if not problems:
        cycle = _find_cycle(nodes, available, producers)
        if cycle:
            problems.append(f"{where}: the graph has a cycle through {' -> '.join(cycle)}")


def _find_cycle(nodes: list[onnx.NodeProto], available: set[str], producers: dict[str, int]) -> list[str]:
    """Kahn's algorithm over node dependencies (including subgraph captures); names a cycle if any."""
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        needed = set(node.input) | _captured_names(node)
        for source in {producers[n] for n in needed if n in producers and n not in available}:
            users[source].append(index)
            pending[index] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    visited = 0
    while ready:
        current = ready.pop()
        visited += 1
        for user in users[current]:
            pending[user] -= 1
            if pending[user] == 0:
                ready.append(user)
    if visited == len(nodes):
        return []
    stuck = [i for i, count in enumerate(pending) if count > 0]
    return [nodes[i].name or f"{nodes[i].op_type}#{i}" for i in stuck][:5]


def _report_duplicates(names: list[str], what: str, problems: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            problems.append(f"{what} '{name}' is declared more than once (duplicate name)")
        seen.add(name)


def _captured_names(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for attr in node.attribute:
        for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            for inner in sub.node:
                names.update(inner.input)
                names |= _captured_names(inner)
    return names
