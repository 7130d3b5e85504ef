"""split-at-tensors: mark stages that end at named tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import field

import onnx_ir as ir

import onnxopt
from onnxopt.split_marks import mark_stages, outer_node, subgraph_owners

from .partition import unit_dependencies, units_of

NAME = "split-at-tensors"


@dataclasses.dataclass(frozen=True)
class SplitAtTensorsOptions:
    tensors: tuple[str, ...] = field(default=(), metadata={
        "help": "tensor names, in order: stage K holds what tensor K needs that earlier stages do not"})


class SplitAtTensorsPass(onnxopt.Pass):
    """Mark stages cut at named tensors: stage K computes tensor K; the last stage the rest."""

    name = NAME
    Options = SplitAtTensorsOptions

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        names = self.options.tensors
        if not names:
            raise onnxopt.UsageError(f"{NAME}: give the tensors to cut at, e.g. tensors=[t1,t2]")
        if len(set(names)) != len(names):
            raise onnxopt.UsageError(f"{NAME}: a tensor is named twice in {list(names)}")
        units = units_of(model)
        producers = _producers(model, units)
        deps = unit_dependencies(model, units)
        stage_of: dict[ir.Node, int] = {}
        for index, name in enumerate(names):
            producer = producers.get(name)
            if producer is None:
                raise onnxopt.UsageError(_not_cuttable(model, name))
            new = [u for u in _ancestors(producer, deps) if u not in stage_of]
            if not new:
                raise onnxopt.UsageError(f"{NAME}: stage {index} would be empty: tensor {name!r} is computed by "
                                         "an earlier stage; list the tensors in topological order")
            for unit in new:
                stage_of[unit] = index
        last = len(names)
        rest = [u for u in units if u not in stage_of]
        if not rest:
            raise onnxopt.UsageError(f"{NAME}: nothing is left after tensor {names[-1]!r}; drop it from the list")
        for unit in rest:
            stage_of[unit] = last
        stages = [stage_of[u] for u in units]
        modified = mark_stages(model, units, stages)
        counts = [stages.count(k) for k in range(last + 1)]
        return onnxopt.PassResult(model, modified, {"stages": last + 1, "stage_nodes": counts})


def _producers(model: ir.Model, units: list[ir.Node]) -> dict[str, ir.Node]:
    return {out.name: unit for unit in units for out in unit.outputs if out.name}


def _ancestors(node: ir.Node, deps: dict[ir.Node, set[ir.Node]]) -> set[ir.Node]:
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(deps[current])
    return seen


def _not_cuttable(model: ir.Model, name: str) -> str:
    if any(v.name == name for v in model.graph.inputs):
        return f"{NAME}: {name!r} is a graph input, not a tensor computed inside the model"
    if name in model.graph.initializers:
        return f"{NAME}: {name!r} is an initializer, not a tensor computed inside the model"
    owners = subgraph_owners(model.graph)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if any(o.name == name for o in node.outputs):
            if node.graph is not model.graph:
                owner = outer_node(node, model.graph, owners)
                return (f"{NAME}: {name!r} is inside a body of {owner.op_type} node {owner.name or '(unnamed)'!r}; a node with "
                        "subgraphs is never split internally")
            return f"{NAME}: {name!r} is the output of Constant node {node.name!r}, which is copied, not cut after"
    return f"{NAME}: no tensor named {name!r} in the main graph"
