"""Structural checks on a model protobuf: duplicate names (values, graph inputs, outputs,
initializers), duplicate opset imports for one domain, undefined inputs, cycles.

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
    _check_opsets(proto.opset_import, "the model", problems)
    _check_graph(proto.graph, outer=set(), where="main graph", problems=problems)
    _check_function_recursion(proto, problems)
    for function in proto.functions:
        _check_opsets(function.opset_import, f"function '{function.name}'", problems)
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
    _report_duplicates([o.name for o in graph.output], f"{where}: graph output", problems)
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


def _check_function_recursion(proto: onnx.ModelProto, problems: list[str]) -> None:
    """Local functions may not call themselves, directly or through others (ONNX forbids it;
    inlining one would never end)."""
    key = lambda domain, name, overload="": f"{domain}:{name}" + (f"@{overload}" if overload else "")
    calls: dict[str, set[str]] = {}
    for function in proto.functions:
        nodes, callees = list(function.node), set()
        while nodes:
            node = nodes.pop()
            callees.add(key(node.domain, node.op_type, getattr(node, "overload", "")))
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    nodes.extend(sub.node)
        calls[key(function.domain, function.name, getattr(function, "overload", ""))] = callees
    state: dict[str, int] = {}

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for callee in sorted(calls[name] & calls.keys()):
            if state.get(callee) == 1:
                return path + [callee]
            if callee not in state and (cycle := visit(callee, path + [callee])):
                return cycle
        state[name] = 2
        return None

    for name in calls:
        if name not in state and (cycle := visit(name, [name])):
            start = cycle.index(cycle[-1])
            problems.append(f"local function '{cycle[-1]}' is recursive ({' -> '.join(cycle[start:])}); "
                            "ONNX forbids recursive functions")
            return


def _check_opsets(opsets, where: str, problems: list[str]) -> None:
    """One import per domain ('' and 'ai.onnx' are the same domain)."""
    versions: dict[str, list[int]] = {}
    for opset in opsets:
        versions.setdefault("" if opset.domain == "ai.onnx" else opset.domain, []).append(opset.version)
    for domain, found in versions.items():
        if len(found) > 1:
            label = repr(domain) if domain else "'' (ai.onnx)"
            problems.append(f"{where} imports domain {label} {len(found)} times (versions "
                            f"{', '.join(map(str, found))}); keep one opset import per domain")


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


def sort_nodes(proto: onnx.ModelProto) -> list[str]:
    """Put every graph's nodes (subgraphs and functions too) in topological order, in place.

    The ONNX spec requires it and onnx_ir relies on it, but exporters and hand edits do not
    always honour it (ORT sorts for itself). Call after ``structure_problems`` found no cycle;
    returns one note per graph that was reordered."""
    notes: list[str] = []
    _sort_graph(proto.graph, "main graph", notes)
    for function in proto.functions:
        _sort_container(function.node, f"function '{function.name}'", notes)
    return notes


def _sort_graph(graph: onnx.GraphProto, where: str, notes: list[str]) -> None:
    _sort_container(graph.node, where, notes)
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _sort_graph(sub, f"{where} > {node.name or node.op_type}.{attr.name}", notes)


def _sort_container(container, where: str, notes: list[str]) -> None:
    import heapq

    nodes = list(container)
    producers = {out: index for index, node in enumerate(nodes) for out in node.output if out}
    users: list[list[int]] = [[] for _ in nodes]
    pending = [0] * len(nodes)
    for index, node in enumerate(nodes):
        for source in {producers[n] for n in set(node.input) | _captured_names(node) if n in producers} - {index}:
            users[source].append(index)
            pending[index] += 1
    ready = [i for i, count in enumerate(pending) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:  # the original order wherever dependencies allow it
        current = heapq.heappop(ready)
        order.append(current)
        for user in users[current]:
            pending[user] -= 1
            if pending[user] == 0:
                heapq.heappush(ready, user)
    if len(order) != len(nodes) or order == list(range(len(nodes))):
        return
    copies = [onnx.NodeProto() for _ in order]
    for copy, index in zip(copies, order):
        copy.CopyFrom(nodes[index])
    del container[:]
    container.extend(copies)
    moved = sum(1 for position, index in enumerate(order) if position != index)
    notes.append(f"{where}: sorted the nodes topologically ({moved} of {len(nodes)} moved; the file's order was not)")


def rename_duplicate_nodes(proto: onnx.ModelProto) -> list[str]:
    """Give the second and later nodes sharing a name (in any graph of the model) a unique one.

    ORT refuses a graph with two nodes of one name; node names carry no meaning otherwise.
    Returns one note when something was renamed."""
    graphs = [proto.graph]
    index = 0
    while index < len(graphs):
        for node in graphs[index].node:
            for attr in node.attribute:
                graphs.extend(([attr.g] if attr.HasField("g") else []) + list(attr.graphs))
        index += 1
    nodes = [node for graph in graphs for node in graph.node]
    taken = {node.name for node in nodes if node.name}
    seen: set[str] = set()
    renamed = []
    for node in nodes:
        if not node.name:
            continue
        if node.name in seen:
            suffix = 1
            while f"{node.name}_{suffix}" in taken:
                suffix += 1
            renamed.append(node.name)
            node.name = f"{node.name}_{suffix}"
            taken.add(node.name)
        seen.add(node.name)
    if not renamed:
        return []
    shown = ", ".join(f"'{n}'" for n in sorted(set(renamed))[:5])
    return [f"renamed {len(renamed)} nodes whose names repeat another node's ({shown}): ORT refuses duplicate node names"]
