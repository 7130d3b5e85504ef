"""prune-channels: remove whole output channels of Conv/ConvTranspose/Gemm/MatMul layers.

The removal follows the channel dependency graph (``depgraph``): a group of channels that
must go together (a residual Add's branches, a shared weight, a depthwise Conv and its
input) is ranked as one, and every tensor that depends on it is sliced. Groups the graph
cannot follow are left whole and listed in ``stats["groups_kept_whole"]`` with the reason.

Ranking (``criterion``): ``l1``/``l2`` norm of the producers' weights, ``bn`` |gamma| of the
BatchNormalization after them (l2 where there is none), ``activation``: on the calibration
feeds, RMS of the channel at each consumer's input times the norm of the consumer's weights
for it. The weakest ``ratio`` of each group's channels go (at least one stays in every
tensor). ``lossless=true`` removes only channels that provably change nothing: all-zero at
every consumer (zero weights and bias, or zero BatchNorm scale and bias) or ignored by every
consumer (zero input weights). ``reconstruct=true`` refits each consumer that lost inputs by
least squares on the calibration feeds (``activations.Refit``).

Only the main graph is pruned; a channel read inside an If/Loop body is left whole.
Weights in Constant nodes are sliced in place; a weight shared by several layers is
sliced once for all of them. For mixed precision to a budget the pass reports the layers
it pruned, most sensitive first, as ``stats["quantized_nodes"]``; ``promote_nodes`` prunes
the matched layers at ``promote_ratio`` instead, and ``promotion_ladder()`` gives the
ratios (half, then a quarter of ``ratio``).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs
from onnxopt.model_stats import compute_estimate
from onnxopt.naming import Namer
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import NameFilter, SelectorOptions, promote_field, promote_filter, selector_from_options

from . import activations
from .common import PRUNABLE_OPS, constant_array, set_constant
from .depgraph import ChannelGraph, build_channel_graph

NAME = "prune-channels"


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class PruneChannelsOptions(SelectorOptions):
    """The shared selectors (nodes, exclude_nodes, ops, exclude_ops, region) come first."""

    ratio: float = _opt(0.5, "fraction of each channel group to remove (0 <= ratio < 1)")
    criterion: Literal["l1", "l2", "bn", "activation"] = _opt("l2", "how channels are ranked")
    lossless: bool = _opt(False, "remove only provably dead channels (outputs stay bit-identical); ignores ratio")
    reconstruct: bool = _opt(False, "refit the consumers' weights and bias by least squares on calibration feeds")
    round_to: int = _opt(1, "keep a multiple of this many channels per group where the group is larger "
                            "(8 or 16 suit blocked CPU kernels)")
    promote_nodes: tuple[str, ...] = promote_field()
    promote_ratio: float = _opt(-1.0, "ratio of promote_nodes' groups; -1: half of ratio")

    def __post_init__(self):
        if not 0 <= self.ratio < 1:
            raise UsageError(f"{NAME}: ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise UsageError(f"{NAME}: round_to must be >= 1, got {self.round_to}")
        if self.promote_ratio != -1.0 and not 0 <= self.promote_ratio < 1:
            raise UsageError(f"{NAME}: promote_ratio must be in [0, 1) or -1, got {self.promote_ratio}")

    @property
    def effective_promote_ratio(self) -> float:
        return self.ratio / 2 if self.promote_ratio == -1.0 else self.promote_ratio


class PruneChannelsPass(Pass):
    """Remove the weakest output channels of Conv/Gemm/MatMul and every tensor slice that depends on them."""

    name = NAME
    Options = PruneChannelsOptions
    fidelity_of = Fidelity.LOSSY

    @property
    def fidelity(self) -> Fidelity:
        return Fidelity.LOSSLESS if self.options.lossless else Fidelity.LOSSY

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        """Lower ratios for the most sensitive layers, highest first: half, then a quarter."""
        if self.options.lossless or self.options.ratio == 0:
            return []
        return [({"promote_ratio": r}, f"ratio {r:g}") for r in (self.options.ratio / 2, self.options.ratio / 4)]

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        graph = build_channel_graph(model)
        selector = selector_from_options(opts)
        selected = set(selector.select(model))
        promote = promote_filter(model, opts.promote_nodes, NAME)
        plan = _Plan(graph, model, opts, self.context)
        removed = plan.choose(selected, promote)
        stats = plan.stats
        inner = sum(1 for g in all_graphs(model) if g is not model.graph for n in g if n.op_type in PRUNABLE_OPS)
        if inner:
            stats["subgraph_layers_not_pruned"] = inner  # only the main graph's channels are removed
        if not removed:
            stats.update(channels_removed=0, quantized_nodes=[])
            return PassResult(model, False, stats)
        shapes = {k: np.shape(v) for k, v in self.context.feeds[0].items()} if self.context.feeds else None
        before = compute_estimate(model, shapes)
        refits = plan.refits(removed) if opts.reconstruct else {}
        graph.apply(removed, Namer(model))
        stats["layers_refit"] = plan.write_refits(refits)
        after = compute_estimate(model, shapes)
        stats.update(_size_stats(before, after))
        return PassResult(model, True, stats)


def _size_stats(before: dict, after: dict) -> dict:
    return {"parameters_before": before["parameters"], "parameters_after": after["parameters"],
            "bytes_before": before["bytes"], "bytes_after": after["bytes"],
            "flops_before": before["flops"], "flops_after": after["flops"]}


class _Plan:
    """Groups, importance and the choice of channels to remove."""

    def __init__(self, graph: ChannelGraph, model: ir.Model, opts: PruneChannelsOptions, context):
        self.graph, self.model, self.opts, self.context = graph, model, opts, context
        self.find = graph.uf.find
        self.stats: dict = {"groups_pruned": 0, "groups_kept_whole": {}, "per_layer": {}}

    # -- importance -----------------------------------------------------------------------
    def importance(self) -> dict[int, float]:
        crit = self.opts.criterion
        score: dict[int, float] = defaultdict(float)
        if crit == "activation":
            self._activation_importance(score)
            return score
        for source in self.graph.sources:
            w = source.weight.reshape(source.weight.shape[0], -1).astype(np.float64)
            per = np.abs(w).sum(axis=1) if crit == "l1" else np.sqrt((w * w).sum(axis=1))
            per = per / max(per.mean(), 1e-30)
            for e, s in zip(source.ids, per):
                score[self.find(e)] += float(s)
        if crit == "bn":
            bn: dict[int, float] = defaultdict(float)
            for ids, gamma in self.graph.bn_scales:
                normalized = gamma / max(float(gamma.mean()), 1e-30)
                for e, g in zip(ids, normalized):
                    bn[self.find(e)] += float(g)
            self.stats["bn_ranked_groups"] = len(bn)
            score.update(bn)
        return score

    def _activation_importance(self, score: dict[int, float]) -> None:
        feeds = self.context.feeds
        if not feeds:
            raise UsageError(f"{NAME}: criterion=activation needs calibration feeds (--data)")
        axes = {sink.input.name: self.graph.tracks[sink.input].axis for sink in self.graph.sinks}
        norms = activations.channel_norms(self.model, feeds, axes, self.context.progress)
        for sink in self.graph.sinks:
            if sink.input.name not in norms:
                continue
            w = constant_array(sink.weight).astype(np.float64)
            w = np.moveaxis(w, sink.weight_axis, 0).reshape(w.shape[sink.weight_axis], -1)
            contribution = norms[sink.input.name] * np.sqrt((w * w).sum(axis=1))
            contribution = contribution / max(contribution.mean(), 1e-30)
            for e, c in zip(sink.ids, contribution):
                score[self.find(e)] += float(c)

    # -- choice -----------------------------------------------------------------------------
    def choose(self, selected: set[ir.Node], promote: NameFilter) -> set[int]:
        graph, find, opts = self.graph, self.find, self.opts
        blocked = graph.blocked_roots()
        clusters: dict[int, list[int]] = {}  # key root-of-sources -> roots
        sources_of: dict[int, set[int]] = defaultdict(set)
        for index, source in enumerate(graph.sources):
            for e in source.ids:
                sources_of[find(e)].add(index)
        groups: dict[frozenset, list[int]] = defaultdict(list)
        for root, sources in sources_of.items():
            groups[frozenset(sources)].append(root)
        del clusters
        removed: set[int] = set()
        score = self.importance() if not opts.lossless else {}
        dead = self._dead_roots() if opts.lossless else set()
        kept_whole = self.stats["groups_kept_whole"]
        sensitivity: list[tuple[float, list[str]]] = []
        for key, roots in groups.items():
            nodes = [graph.sources[i].node for i in sorted(key)]
            names = sorted({n.name or n.op_type for n in nodes})
            reason = next((blocked[r] for r in roots if r in blocked), None)
            if reason is not None and all(r in blocked for r in roots):
                kept_whole[reason] = kept_whole.get(reason, 0) + 1
                continue
            if not all(n in selected for n in nodes):
                continue
            free = [r for r in roots if r not in blocked]
            if opts.lossless:
                gone = [r for r in free if r in dead]
                gone = gone[: len(roots) - 1]
            else:
                ratio = opts.effective_promote_ratio if any(promote.matches(n) for n in nodes) else opts.ratio
                grouped = [graph.sources[i] for i in key if graph.sources[i].groups > 1]
                if grouped and (len(key) > 1 or len(free) != len(roots)):
                    why = f"grouped Conv {grouped[0].node.name} shares its channels with other layers"
                    kept_whole[why] = kept_whole.get(why, 0) + 1
                    continue
                if grouped:
                    gone = self._per_group(grouped[0], ratio, score)
                else:
                    count = min(_removal(len(roots), ratio, opts.round_to), len(free), len(roots) - 1)
                    gone = sorted(free, key=lambda r: score.get(r, 0.0))[:count]
                if gone:
                    total = sum(score.get(r, 0.0) for r in roots) or 1.0
                    sensitivity.append((sum(score.get(r, 0.0) for r in gone) / total, names))
            if gone:
                removed.update(gone)
                self.stats["groups_pruned"] += 1
        removed = self._keep_one_per_tensor(removed, score)
        self._per_layer(removed)
        order = [n for _, names in sorted(sensitivity, key=lambda item: -item[0]) for n in names]
        pruned_layers = {name for name, (b, a) in self.stats["per_layer"].items() if a < b}
        self.stats["channels_removed"] = sum(b - a for b, a in self.stats["per_layer"].values())
        self.stats["quantized_nodes"] = list(dict.fromkeys(n for n in order if n in pruned_layers)) or sorted(pruned_layers)
        return removed

    def _per_group(self, source, ratio: float, score: dict[int, float]) -> list[int]:
        per = len(source.ids) // source.groups
        count = min(int(per * ratio + 1e-9), per - 1)
        gone = []
        for g in range(source.groups):
            roots = [self.find(e) for e in source.ids[g * per:(g + 1) * per]]
            gone += sorted(roots, key=lambda r: score.get(r, 0.0))[:count]
        return gone

    def _dead_roots(self) -> set[int]:
        """Roots that every consumer ignores or sees as all zero."""
        alive: set[int] = set()
        for sink in self.graph.sinks:
            for e, ignores, zero in zip(sink.ids, sink.ignores, sink.zero):
                if not (ignores or zero):
                    alive.add(self.find(e))
        return {self.find(e) for s in self.graph.sources for e in s.ids} - alive

    def _keep_one_per_tensor(self, removed: set[int], score) -> set[int]:
        """Give back the strongest channel of any tensor that would lose all of them."""
        find = self.find
        changed = True
        while changed:
            changed = False
            for track in self.graph.tracks.values():
                roots = {find(e) for e in track.ids}
                if roots and roots <= removed:
                    removed.discard(max(roots, key=lambda r: score.get(r, 0.0)))
                    changed = True
        return removed

    def _per_layer(self, removed: set[int]) -> None:
        for source in self.graph.sources:
            kept = sum(1 for e in source.ids if self.find(e) not in removed)
            self.stats["per_layer"][source.node.name or source.node.op_type] = (len(source.ids), kept)

    # -- reconstruction ------------------------------------------------------------------------
    def refits(self, removed: set[int]) -> dict[str, list[activations.Refit]]:
        """Least-squares problems of the consumers that lose input channels, fed on the
        unpruned model's activations."""
        feeds = self.context.feeds
        if not feeds:
            raise UsageError(f"{NAME}: reconstruct=true needs calibration feeds (--data)")
        out_ids = {id(s.node): s.ids for s in self.graph.sources}
        weight_users: dict[ir.Value, int] = defaultdict(int)
        for sink in self.graph.sinks:
            weight_users[sink.weight] += 1
        problems: dict[str, list[activations.Refit]] = defaultdict(list)
        skipped = 0
        for sink in self.graph.sinks:
            keep_in = np.array([self.find(e) not in removed for e in sink.ids])
            if keep_in.all():
                continue
            node = sink.node
            weight_shared = len(list(sink.weight.uses())) > 1
            if not activations.can_refit(node) or weight_shared or len(set(sink.ids)) != len(sink.ids) and node.op_type == "Conv":
                skipped += 1
                continue
            w = constant_array(sink.weight).astype(np.float64)
            if node.op_type == "MatMul" or (node.op_type == "Gemm" and not _trans_b(node)):
                w = w.T
            bias = _bias(node)
            rows = out_ids.get(id(node))
            keep_out = (np.ones(w.shape[0], bool) if rows is None
                        else np.array([self.find(e) not in removed for e in rows]))
            kind = "conv" if node.op_type == "Conv" else "dense"
            problems[sink.input.name].append(activations.Refit(node, w, bias, keep_in, keep_out, kind))
        self.stats["layers_not_refit"] = skipped
        if problems:
            activations.accumulate(self.model, feeds, problems, self.context.progress)
        return problems

    def write_refits(self, problems) -> int:
        count = 0
        for refits in problems.values():
            for refit in refits:
                solved = refit.solve()
                if solved is None:
                    self.stats["layers_not_refit"] = self.stats.get("layers_not_refit", 0) + 1
                    continue
                w, b = solved
                node = refit.node
                dtype = constant_array(node.inputs[1]).dtype
                if node.op_type == "MatMul":
                    set_constant(node.inputs[1], w.reshape(w.shape[0], -1).T.astype(dtype))
                    count += 1
                    continue
                if node.op_type == "Gemm" and not _trans_b(node):
                    w = w.reshape(w.shape[0], -1).T
                set_constant(node.inputs[1], w.astype(dtype))
                _set_bias(self.model, node, b.astype(dtype))
                count += 1
        return count


def _removal(size: int, ratio: float, round_to: int) -> int:
    """How many of ``size`` channels go: ``ratio`` of them, fewer so that a multiple of
    ``round_to`` stays when the group is larger than ``round_to``."""
    count = int(size * ratio + 1e-9)
    keep = size - count
    if round_to > 1 and size > round_to:
        keep = min(size, -(-keep // round_to) * round_to)
    return size - keep


def _trans_b(node: ir.Node) -> bool:
    attr = node.attributes.get("transB")
    return attr is not None and attr.as_int() == 1


def _bias(node: ir.Node) -> np.ndarray | None:
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        array = constant_array(node.inputs[2])
        return None if array is None else array.reshape(-1).astype(np.float64)
    return None


def _set_bias(model: ir.Model, node: ir.Node, bias: np.ndarray) -> None:
    from .common import new_constant

    if len(node.inputs) > 2 and node.inputs[2] is not None:
        current = constant_array(node.inputs[2])
        set_constant(node.inputs[2], bias.reshape(current.shape) if current.size == bias.size else bias)
        return
    name = Namer(model).fresh(f"{node.name or node.op_type}_bias")
    while len(node.inputs) < 3:
        node.resize_inputs(len(node.inputs) + 1)
    node.replace_input_with(2, new_constant(model.graph, name, bias))
