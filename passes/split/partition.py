"""Partitioning over a topological order: balanced contiguous stages and supported-op islands."""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import onnx_ir as ir

from onnxopt.split_marks import is_free_constant, outer_node, subgraph_owners
from onnxopt.graph_walk import node_subgraphs


def units_of(model: ir.Model) -> list[ir.Node]:
    """Main-graph nodes that partitioning places, in graph (topological) order; free constants are copied instead."""
    return [node for node in model.graph if not is_free_constant(node)]


def balanced_stages(costs: Sequence[float], stages: int) -> list[int]:
    """Stage index per position: ``stages`` contiguous non-empty runs minimizing the largest run's cost.

    The smallest feasible bound is found by bisection with a greedy check (exact for contiguous
    runs); runs are then split until there are exactly ``stages`` of them (never raising the max).
    """
    n = len(costs)
    if not 1 <= stages <= n:
        raise ValueError(f"cannot make {stages} stages from {n} nodes")
    costs = [max(0.0, float(c)) for c in costs]
    lo, hi = max(costs), sum(costs)
    if hi > 0:
        for _ in range(100):
            if hi - lo <= 1e-9 * max(hi, 1e-30):
                break
            mid = (lo + hi) / 2
            if len(_greedy(costs, mid)) <= stages:
                hi = mid
            else:
                lo = mid
    runs = _greedy(costs, hi)
    while len(runs) < stages:  # split the run with most positions (cost never grows when splitting)
        i = max(range(len(runs)), key=lambda k: (runs[k][1] - runs[k][0], -k))
        start, end = runs[i]
        cut = _best_cut(costs, start, end)
        runs[i:i + 1] = [(start, cut), (cut, end)]
    labels = [0] * n
    for index, (start, end) in enumerate(runs):
        for pos in range(start, end):
            labels[pos] = index
    return labels


def _greedy(costs: list[float], bound: float) -> list[tuple[int, int]]:
    runs, start, total = [], 0, 0.0
    for pos, cost in enumerate(costs):
        if pos > start and total + cost > bound * (1 + 1e-12):
            runs.append((start, pos))
            start, total = pos, 0.0
        total += cost
    runs.append((start, len(costs)))
    return runs


def _best_cut(costs: list[float], start: int, end: int) -> int:
    """The cut inside [start, end) that balances its two halves best."""
    total = sum(costs[start:end])
    best, best_gap, left = start + 1, float("inf"), 0.0
    for cut in range(start + 1, end):
        left += costs[cut - 1]
        gap = abs(2 * left - total)
        if gap < best_gap:
            best, best_gap = cut, gap
    return best


def unit_dependencies(model: ir.Model, units: list[ir.Node]) -> dict[ir.Node, set[ir.Node]]:
    """unit -> the units producing a value it reads (its own inputs or values its bodies capture)."""
    owners = subgraph_owners(model.graph)
    unit_set = set(units)
    deps: dict[ir.Node, set[ir.Node]] = {u: set() for u in units}
    for unit in units:
        for value in read_values(unit):
            producer = value.producer()
            if producer is None:
                continue
            outer = outer_node(producer, model.graph, owners)
            if outer is not None and outer is not unit and outer in unit_set:
                deps[unit].add(outer)
    return deps


def read_values(node: ir.Node):
    """Values ``node`` reads: its inputs and, inside its bodies, every input of every body node."""
    for value in node.inputs:
        if value is not None:
            yield value
    for sub in node_subgraphs(node):
        for inner in sub:
            yield from read_values(inner)


def island_order(model: ir.Model, units: list[ir.Node], supported: dict[ir.Node, bool]) -> tuple[list[ir.Node], list[int]]:
    """A topological order of ``units`` that keeps supported and unsupported nodes in as few
    contiguous runs as it can (Kahn's algorithm that stays on the current kind while it can),
    and the run index of each node in that order. Both starting kinds are tried; the fewer runs win."""
    deps = unit_dependencies(model, units)
    position = {u: i for i, u in enumerate(units)}
    best = None
    for start_kind in (True, False):
        order = _kind_first_order(units, deps, supported, position, start_kind)
        runs, labels = 0, []
        for i, node in enumerate(order):
            if i == 0 or supported[node] != supported[order[i - 1]]:
                runs += 1
            labels.append(runs - 1)
        if best is None or runs < best[2]:
            best = (order, labels, runs)
    return best[0], best[1]


def _kind_first_order(units, deps, supported, position, kind: bool) -> list[ir.Node]:
    waiting = {u: len(d) for u, d in deps.items()}
    users: dict[ir.Node, list[ir.Node]] = {u: [] for u in units}
    for unit, producers in deps.items():
        for producer in producers:
            users[producer].append(unit)
    ready: dict[bool, list] = {True: [], False: []}
    for unit in units:
        if not waiting[unit]:
            heapq.heappush(ready[supported[unit]], (position[unit], unit))
    order = []
    while ready[True] or ready[False]:
        if not ready[kind]:
            kind = not kind
        _, unit = heapq.heappop(ready[kind])
        order.append(unit)
        for user in users[unit]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready[supported[user]], (position[user], user))
    return order


def depth_first_order(model: ir.Model, units: list[ir.Node]) -> list[ir.Node]:
    """A topological order that finishes each branch before starting the next: post-order of a
    depth-first walk from the model's last units back through their producers (graph order breaks ties)."""
    deps = unit_dependencies(model, units)
    position = {u: i for i, u in enumerate(units)}
    has_users = {p for producers in deps.values() for p in producers}
    seen: set[ir.Node] = set()
    order: list[ir.Node] = []
    for root in [u for u in units if u not in has_users] + units:
        if root in seen:
            continue
        seen.add(root)
        stack = [(root, iter(sorted(deps[root], key=position.__getitem__)))]
        while stack:
            node, producers = stack[-1]
            nxt = next((p for p in producers if p not in seen), None)
            if nxt is None:
                stack.pop()
                order.append(node)
            else:
                seen.add(nxt)
                stack.append((nxt, iter(sorted(deps[nxt], key=position.__getitem__))))
    return order
