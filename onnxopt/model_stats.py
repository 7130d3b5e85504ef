"""Size and shape facts about a model, cheap enough to take before and after every pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from .graph_walk import all_graphs, all_nodes


@dataclass
class ModelStats:
    nodes: int = 0
    initializers: int = 0
    initializer_bytes: int = 0
    constant_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> tuple:
        return (self.nodes, self.initializers, self.initializer_bytes, self.constant_bytes, tuple(sorted(self.ops.items())))


def op_key(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def model_stats(model: ir.Model) -> ModelStats:
    stats = ModelStats()
    ops: Counter[str] = Counter()
    for node in all_nodes(model):
        stats.nodes += 1
        ops[op_key(node)] += 1
        if node.op_type == "Constant" and node.domain == "":
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    stats.constant_bytes += attr.value.nbytes
    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            stats.initializers += 1
            if value.const_value is not None:
                stats.initializer_bytes += value.const_value.nbytes
    stats.ops = dict(sorted(ops.items()))
    return stats


def op_delta(before: ModelStats, after: ModelStats) -> dict[str, int]:
    """Op-type histogram change, only the ops whose count changed."""
    keys = set(before.ops) | set(after.ops)
    delta = {k: after.ops.get(k, 0) - before.ops.get(k, 0) for k in sorted(keys)}
    return {k: v for k, v in delta.items() if v}
