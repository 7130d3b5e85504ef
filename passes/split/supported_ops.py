"""split-supported-ops: mark the islands a target runtime supports and the fallback parts between them."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import field

import onnx
import onnx_ir as ir

import onnxopt
from onnxopt.graph_walk import node_subgraphs
from onnxopt.split_marks import mark_stages

from .partition import island_order, units_of

NAME = "split-supported-ops"
SUPPORTED, FALLBACK = "accelerator", "fallback"
_SPEC = re.compile(r"^(?:(?P<domain>[\w.]*)::)?(?P<op>\w+)(?:@(?P<lo>\d*)(?:-(?P<hi>\d*))?)?$")


@dataclasses.dataclass(frozen=True)
class OpSupport:
    """One supported op: ``[domain::]OpType[@A-B]``, the op's versions A..B (``@B``: up to B)."""

    domain: str
    op_type: str
    low: int | None = None
    high: int | None = None

    @classmethod
    def parse(cls, text: str) -> OpSupport:
        match = _SPEC.match(text.strip())
        if not match:
            raise onnxopt.UsageError(f"{NAME}: bad op {text!r}; write [domain::]OpType[@A-B], e.g. Conv, "
                                     "com.microsoft::FusedConv, Resize@11-18")
        domain = "" if match["domain"] in (None, "ai.onnx") else match["domain"]
        lo, hi = match["lo"], match["hi"]
        if lo is not None and hi is None and "-" not in text:  # "@B" means up to B
            lo, hi = None, lo
        return cls(domain, match["op"], int(lo) if lo else None, int(hi) if hi else None)

    def allows(self, version: int | None) -> bool:
        if version is None:
            return self.low is None and self.high is None
        return (self.low is None or version >= self.low) and (self.high is None or version <= self.high)


@dataclasses.dataclass(frozen=True)
class SplitSupportedOpsOptions:
    ops: tuple[str, ...] = field(default=(), metadata={
        "help": "ops the target runs: [domain::]OpType[@A-B] (op versions A..B; @B up to B)"})


def op_version(node: ir.Node, opsets: dict[str, int]) -> int | None:
    """The version of ``node``'s op schema under the model's opset (the since_version), where onnx knows it."""
    domain = "" if node.domain == "ai.onnx" else node.domain
    opset = opsets.get(domain)
    if opset is None:
        return None
    try:
        return onnx.defs.get_schema(node.op_type, opset, domain).since_version
    except onnx.defs.SchemaError:
        return opset


class SplitSupportedOpsPass(onnxopt.Pass):
    """Mark maximal islands of supported ops (partition accelerator) and the fallback parts between them."""

    name = NAME
    Options = SplitSupportedOpsOptions

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        if not self.options.ops:
            raise onnxopt.UsageError(f"{NAME}: give the supported ops, e.g. ops=[Conv,Relu]")
        table: dict[tuple[str, str], list[OpSupport]] = {}
        for text in self.options.ops:
            spec = OpSupport.parse(text)
            table.setdefault((spec.domain, spec.op_type), []).append(spec)
        opsets = {("" if d == "ai.onnx" else d): v for d, v in model.opset_imports.items()}

        def supported(node: ir.Node) -> bool:
            domain = "" if node.domain == "ai.onnx" else node.domain
            specs = table.get((domain, node.op_type), [])
            version = op_version(node, opsets)
            if not any(s.allows(version) for s in specs):
                return False
            return all(supported(inner) for body in node_subgraphs(node) for inner in body)

        units = units_of(model)
        flags = {u: supported(u) for u in units}
        order, runs = island_order(model, units, flags)
        labels = [SUPPORTED if flags[u] else FALLBACK for u in order]
        modified = mark_stages(model, order, runs, labels)
        islands = sorted({r for r, label in zip(runs, labels) if label == SUPPORTED})
        stats = {"stages": (max(runs) + 1) if runs else 0, "islands": len(islands),
                 "nodes_supported": sum(flags.values()), "nodes_fallback": len(units) - sum(flags.values())}
        return onnxopt.PassResult(model, modified, stats)
