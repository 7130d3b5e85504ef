"""split-stages: mark N stages balanced by parameters, FLOPs, latency or memory."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Literal

import onnx_ir as ir

import onnxopt
from onnxopt.split_marks import mark_stages

from . import cost
from .partition import balanced_stages, depth_first_order, units_of

NAME = "split-stages"


@dataclasses.dataclass(frozen=True)
class SplitStagesOptions:
    stages: int = field(default=2, metadata={"help": "number of stages (contiguous in topological order)"})
    by: Literal["params", "flops", "latency", "memory"] = field(
        default="params", metadata={"help": "the cost to balance: parameters, estimated FLOPs, ORT-measured "
                                            "latency, or weight+activation bytes"})

    def __post_init__(self):
        if self.stages < 1:
            raise ValueError(f"stages must be at least 1, got {self.stages}")


def unit_costs(model: ir.Model, units: list[ir.Node], by: str, context: onnxopt.PassContext) -> list[float]:
    """Cost of each unit by ``by``; latency and shapes are analyses the context measures."""
    if by == "params":
        return cost.params_costs(units)
    if by == "latency":
        latency = context.node_latency(model)
        index = {node: i for i, node in enumerate(model.graph)}
        return [latency[index[u]] for u in units]
    shapes = context.value_shapes(model)
    return cost.flops_costs(units, shapes) if by == "flops" else cost.memory_costs(units, shapes)


def balance_summary(costs: list[float], stages: list[int], count: int) -> dict:
    """Per-stage cost, the ideal (total/N, or the largest single node when bigger) and the ratio."""
    per_stage = [0.0] * count
    for c, s in zip(costs, stages):
        per_stage[s] += c
    total = sum(costs)
    ideal = max(total / count, max(costs, default=0.0))
    return {"stage_costs": per_stage, "total_cost": total, "ideal_cost": ideal,
            "max_over_ideal": (max(per_stage) / ideal) if ideal > 0 else 1.0}


class SplitStagesPass(onnxopt.Pass):
    """Mark N stages contiguous in a topological order, minimizing the largest stage's cost."""

    name = NAME
    Options = SplitStagesOptions

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        opts = self.options
        units = units_of(model)
        if opts.stages > len(units):
            raise onnxopt.UsageError(f"{NAME}: stages={opts.stages} is more than the model's {len(units)} "
                                     "splittable nodes (Constant nodes are copied, not placed)")
        cost_of = dict(zip(units, unit_costs(model, units, opts.by, self.context)))
        best = None
        # Two topological orders: the graph's, and depth-first (one branch finished before the next),
        # which often lets a cut fall between parallel branches; the smaller largest stage wins.
        for label, order in (("graph", units), ("depth-first", depth_first_order(model, units))):
            costs = [cost_of[u] for u in order]
            stages = balanced_stages(costs, opts.stages)
            summary = balance_summary(costs, stages, opts.stages)
            if best is None or summary["max_over_ideal"] < best[3]["max_over_ideal"] - 1e-9:
                best = (label, order, stages, summary)
        label, order, stages, summary = best
        modified = mark_stages(model, order, stages)
        stats = {"stages": opts.stages, "by": opts.by, "order": label, **summary}
        return onnxopt.PassResult(model, modified, stats)
