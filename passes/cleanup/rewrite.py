"""rewrite-patterns: onnxscript's pattern rewrite rules, in named rule sets, guarded.

onnxscript's ``RewriteRuleSet`` visits the main graph, every If/Loop/Scan body and every
function. Each rule is wrapped so that a rewrite it proposes is refused (and counted in
``rewrites_refused``) instead of applied when:

* the rule raises (e.g. the pad fusion indexes a Pad's ``pads`` input, which opset < 11
  keeps as an attribute);
* a new node does not check against the opsets the graph imports;
* it adds an initializer to a function (which cannot hold one), or reuses the name of an
  initializer that something outside the match still reads or that lives in an outer graph
  (the batch-norm fusion writes its fused weight under the old weight's name);
* it would drop a matched node whose other outputs are still used;
* a matched node reads an initializer that is also a graph input (overridable at run time,
  so not a constant);
* it returns an existing value as a new output (onnx_ir would rename that value);
* a rule-specific guard says the rule's own check is too weak (``rewrite_guards``).

Rules are taken from onnxscript 0.7 where it has them and from ``rules`` where not.
onnxscript's scalar-only, tolerance-matching ``x * 1`` / ``x + 0`` rules, the auto_pad
normalization (it ignores dilations), the ConvInteger pad fusion (ConvInteger pads with
the zero point, not 0), ``Min``/``Max`` to ``Clip`` (NaN handling) and Flatten to Reshape
(no fewer nodes) are left out.

Like onnxscript's ``rewrite()``, the pass writes the type and shape of Constant outputs it
reads. Unlike it, it leaves nodes that were dead before it ran to ``remove-unused`` (only
the nodes a rule matched and orphaned go), so each pass's stats say what it did.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import field
from typing import Any, Callable

import onnx_ir as ir
from onnxscript.rewriter import RULE_NAME_TAG, RewriteRuleSet
from onnxscript.rewriter.rules import common as rules

import onnxopt

from .fold import checks_in
from .rewrite_guards import GUARDS
from .rules import conv_bias_rules, neutral_element_rules, reshape_shape_rules
from .snapshot import Snapshot, census_delta

# Rule set name -> its rules, built on first use (building patterns takes a while).
RULE_SETS: dict[str, Callable[[], list]] = {
    "no-op": lambda: [*neutral_element_rules(), rules.no_op_cast_rule, rules.no_op_expand_rule,
                      rules.no_op_transpose_rule],
    "slices": lambda: [rules.collapse_slice_rule, rules.collapse_slice2_rule],
    "casts": lambda: [rules.cast_cast_rule, rules.cast_constant_of_shape_rule,
                      rules.cast_constant_of_shape_without_value_rule],
    "transposes": lambda: [rules.transpose_transpose_rule],
    "reshapes": lambda: [rules.reshape_reshape_rule, rules.unsqueeze_unsqueeze_rule,
                         rules.squeeze_reshape_1d_rule, *reshape_shape_rules(infer_dim=False)],
    "reshape-infer-dim": lambda: reshape_shape_rules(infer_dim=True),
    "conv-bias": conv_bias_rules,
    "batchnorm": lambda: [rules.fuse_batchnorm_into_conv_rule, rules.fuse_batchnorm_into_conv_transpose_rule,
                          rules.fuse_batchnorm_into_gemm_rule],
    "pad-conv": lambda: [rules.fuse_pad_into_conv_rule],
    "gemm": lambda: [rules.transpose_ab_matmul_add_to_gemm_rule, rules.transpose_a_matmul_add_to_gemm_rule,
                     rules.transpose_b_matmul_add_to_gemm_rule, rules.matmul_add_to_gemm_rule],
}


@functools.cache
def _rules_of(rule_set: str) -> list:
    return RULE_SETS[rule_set]()


def _opsets(model: ir.Model, graph: ir.Graph | ir.Function) -> dict[str, int]:
    return dict(graph.opset_imports) if isinstance(graph, ir.Function) else dict(model.opset_imports)


def _refusal(model: ir.Model, graph, rule, delta) -> str | None:
    """Why this proposed rewrite must not be applied, or None."""
    matched = list(delta.match.nodes)
    matched_set = set(matched)
    new_nodes = set(delta.new_nodes)
    for value in delta.new_outputs:
        if value is not None and value.producer() not in new_nodes:
            return "returns an existing value"
    if not all(checks_in(n, _opsets(model, graph), model.ir_version) for n in delta.new_nodes):
        return "a new node is not valid in the graph's opsets"
    read = {v.name: v for n in matched for v in n.inputs if v is not None}
    if any(v.is_graph_input() and v.const_value is not None for v in read.values()):
        return "reads an overridable initializer"
    if delta.new_initializers:
        if isinstance(graph, ir.Function):
            return "a function cannot hold initializers"
        for value in delta.new_initializers:
            old = graph.initializers.get(value.name)
            if old is None:
                if value.name in read:
                    return "shadows an outer-scope value"
            elif old.is_graph_input() or old.is_graph_output() or any(
                user not in matched_set for user, _ in old.uses()
            ):
                return "replaces an initializer that is still read"
    if rule.remove_nodes:
        outputs = set(delta.match.outputs)
        for node in matched:
            for value in node.outputs:
                if value not in outputs and (value.is_graph_output() or any(
                    user not in matched_set for user, _ in value.uses()
                )):
                    return "drops an output that is still used"
    guard = GUARDS.get(id(rule))
    return guard(model, graph, delta) if guard is not None else None


class _GuardedRule:
    """A rule whose proposed rewrites pass ``_refusal`` before the rule set applies them."""

    def __init__(self, rule, rule_set: str, counts: dict[str, Any]):
        self._rule, self._set, self._counts = rule, rule_set, counts
        # Matching is slow; a node of another op type than the pattern's root is skipped first.
        self._roots = {op_type for _, op_type, _ in
                       (n.op_identifier() for n in rule._target_pattern.output_nodes)}

    def __getattr__(self, name: str):
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, *, verbose=None, tracer=None):
        if node.op_type not in self._roots or node.domain not in ("", "ai.onnx"):
            return None
        # A proposed rewrite already adds the opsets it uses; a refused one must not.
        imports = [(g, dict(g.opset_imports)) for g in (graph_or_function, model.graph)]
        try:
            delta = self._rule.try_rewrite(model, graph_or_function, node, verbose=verbose, tracer=tracer)
            reason = None if delta is None else _refusal(model, graph_or_function, self._rule, delta)
        except Exception as exc:  # a rule that crashes on an unexpected form refuses it
            delta, reason = None, f"raised {type(exc).__name__}"
        if delta is None and reason is None:
            return None
        if reason is not None:
            for graph, opsets in imports:
                graph.opset_imports.clear()
                graph.opset_imports.update(opsets)
            self._counts["rewrites_refused"] += 1
            self._counts["refusals"].setdefault(reason, 0)
            self._counts["refusals"][reason] += 1
            return None
        self._counts["rewrites"][self._set] += 1
        if not self._rule.remove_nodes:  # the rule leaves its matched nodes for a cleanup
            self._counts["leftovers"].extend(delta.match.nodes)
        return delta


class RewritePatternsPass(onnxopt.Pass):
    """Apply local rewrite rules: no-op removal, cast/transpose/reshape chains, BN/bias/pad fusion."""

    name = "rewrite-patterns"

    @dataclasses.dataclass(frozen=True)
    class Options:
        rules: tuple[str, ...] = field(
            default=tuple(RULE_SETS),
            metadata={"help": "rule sets to apply: " + ", ".join(RULE_SETS)
                              + " (reshape-infer-dim assumes reshaped tensors are never empty)"},
        )

        def __post_init__(self):
            unknown = [name for name in self.rules if name not in RULE_SETS]
            if unknown:
                raise ValueError(f"unknown rule set '{unknown[0]}'; valid: {', '.join(RULE_SETS)}")
            if not self.rules:
                raise ValueError("rules must name at least one rule set")

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        counts: dict[str, Any] = {"rewrites": dict.fromkeys(self.options.rules, 0),
                                  "rewrites_refused": 0, "refusals": {}, "leftovers": []}
        guarded = [_GuardedRule(rule, name, counts) for name in self.options.rules for rule in _rules_of(name)]
        rule_set = RewriteRuleSet(guarded)
        rule_set.remove_unused_nodes = False  # dead nodes are remove-unused's to report
        tagged = {id(n) for n in onnxopt.all_nodes(model) if RULE_NAME_TAG in n.metadata_props}
        before = Snapshot(model)
        rule_set.apply_to_model(model)
        _remove_dead(counts["leftovers"])
        for node in onnxopt.all_nodes(model):  # the rewriter's provenance notes are not model content
            if id(node) not in tagged:
                node.metadata_props.pop(RULE_NAME_TAG, None)
        after = Snapshot(model)
        stats = {
            "nodes_removed": census_delta(before, after)["nodes_removed"],
            "rewrites_applied": sum(counts["rewrites"].values()),
            "rewrites_refused": counts["rewrites_refused"],
            **{f"{name.replace('-', '_')}_rewrites": n for name, n in counts["rewrites"].items()},
        }
        if counts["refusals"]:
            stats["refusal_reasons"] = dict(sorted(counts["refusals"].items()))
        return onnxopt.PassResult(model, before != after, stats)


def _remove_dead(nodes: list[ir.Node]) -> None:
    """Remove the nodes a rule matched but left in place, now that nothing reads them."""
    removed = True
    while removed:
        removed = False
        for node in nodes:
            graph = node.graph
            if graph is not None and not any(v.uses() or v.is_graph_output() for v in node.outputs):
                graph.remove(node, safe=True)
                removed = True
