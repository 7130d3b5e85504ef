"""Mixed precision to a budget: when a lossy pass breaks the budget, move its most
sensitive nodes to a higher precision (when the pass has one: int16 activations,
8-bit weights), and then to float, until the budget holds.

Sensitivity comes from the per-tensor SQNR of the quantized model's activations against
the float model's on the validation feeds; nodes are ranked by the SQNR they lose
themselves (inputs' SQNR minus outputs'), worst first. The search promotes, then
excludes, the worst 1, 2, 4, ... nodes (at most all but one in float: keeping every
node in float would undo the pass) until the budget holds, then bisects down to the
smallest count that still holds, and finally keeps either half of the chosen nodes
while that half alone holds (the ranking is an estimate; often one or two nodes
decide). Every trial is re-validated and recorded with its measured effect.

It applies to passes whose options have an ``exclude_nodes`` selector field and that
report the nodes they changed as ``stats["quantized_nodes"]``; promotion applies to passes
that also have ``promote_nodes`` and ``promotion_ladder()`` (see ``selectors.promote_field``):
each rung of the ladder (8-bit, then 16-bit weights) is tried in turn.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

import onnx_ir as ir

from .calibration import activation_names, tensor_sqnr
from .graph_walk import all_nodes
from .metrics import Budget
from .snapshot import snapshot
from .validation import Comparison, Validator

MAX_TRIALS = 12
MAX_REFINE_TRIALS = 12


@dataclass
class FallbackOutcome:
    model: ir.Model | None
    comparison: Comparison | None
    excluded: list[str] = field(default_factory=list)
    promoted: list[str] = field(default_factory=list)
    precision: str | None = None
    trials: list[dict] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    # How the choice was confirmed on feeds the search did not see (see ``confirm``).
    holdout: dict | None = None
    # Where the search stopped, so a failed confirmation can climb from there.
    stage: str | None = None
    order: list[str] = field(default_factory=list)
    rung_index: int = -1


def can_exclude_nodes(options) -> bool:
    return "exclude_nodes" in {f.name for f in dataclasses.fields(options)}


def supports_fallback(options, stats: dict) -> bool:
    return can_exclude_nodes(options) and bool(stats.get("quantized_nodes"))


def rank_nodes(float_model: ir.Model, quant_model: ir.Model, feeds, candidates: list[str],
               progress=None) -> list[tuple[str, float]]:
    """(node name, local SNR dB) for the candidates, most damaging first.

    A node's output SQNR also carries every upstream error, so the ranking uses the noise
    the node adds itself: noise-to-signal at its output minus noise-to-signal at its
    activation inputs (taken from the float model's graph), as an SNR in dB. Where the
    output is cleaner than the input the estimate falls back to the output's SQNR.
    """
    wanted = set(candidates)
    outputs: dict[str, list[str]] = {}
    position: dict[str, int] = {}
    for index, node in enumerate(all_nodes(quant_model)):
        if node.name in wanted:
            outputs[node.name] = [out.name for out in node.outputs if out.name]
            position.setdefault(node.name, index)
    float_inputs = _float_inputs_by_output(float_model)
    tensors = {t for names in outputs.values() for t in names}
    for names in outputs.values():
        for t in names:
            tensors.update(float_inputs.get(t, ()))
    present = set(activation_names(float_model)) & set(activation_names(quant_model))
    sqnr = tensor_sqnr(float_model, quant_model, feeds, sorted(tensors & present), progress=progress)
    local: dict[str, float] = {}
    for node, names in outputs.items():
        out_db = min((sqnr[t] for t in names if t in sqnr), default=None)
        if out_db is None:
            continue
        upstream = [sqnr[i] for t in names for i in float_inputs.get(t, ()) if i in sqnr]
        added = _nsr(out_db) - _nsr(min(upstream, default=math.inf))
        # Less noise out than in (a projection can average noise away) says nothing about the
        # node's own share: assume the worst, all of its output noise.
        local[node] = -10.0 * math.log10(added) if added > 0 else out_db
    # Near-ties (within 0.5 dB) go to the earlier node: upstream noise is what flows downstream.
    # (A node whose output is still exact has infinite SNR: it sorts last, unrounded.)
    ranked = sorted(local.items(), key=lambda kv: (kv[1] if math.isinf(kv[1]) else round(kv[1] * 2) / 2,
                                                   position.get(kv[0], 0)))
    unranked = [n for n in candidates if n not in local]  # e.g. outputs inside subgraphs
    return ranked + [(n, math.inf) for n in unranked]


def _nsr(snr_db: float) -> float:
    """Noise-to-signal power ratio of an SNR in dB."""
    return 0.0 if snr_db == math.inf else 10.0 ** (-snr_db / 10.0)


def _float_inputs_by_output(model: ir.Model) -> dict[str, list[str]]:
    """For each node output name: the names of the node's non-constant inputs."""
    table: dict[str, list[str]] = {}
    for node in all_nodes(model):
        inputs = [v.name for v in node.inputs if v is not None and v.name and v.const_value is None
                  and not (v.producer() is not None and v.producer().op_type == "Constant")]
        for out in node.outputs:
            if out.name:
                table[out.name] = inputs
    return table


def promotion_ladder(pass_) -> list[tuple[dict, str]]:
    """The pass's higher precisions, lowest first, as (option changes, label); [] when the pass
    has no ``promote_nodes`` or its options leave nothing higher than float."""
    if "promote_nodes" not in {f.name for f in dataclasses.fields(pass_.options)}:
        return []
    return list(pass_.promotion_ladder())


def _exact(names) -> tuple[str, ...]:
    return tuple(f"^{re.escape(n)}$" for n in names)


class _Trials:
    """Re-runs of the pass with some nodes promoted and some kept in float, each validated."""

    def __init__(self, pass_factory, spec_options, model_before, validator, budget, outcome):
        self.pass_factory, self.spec_options = pass_factory, spec_options
        self.model_before, self.validator, self.budget = model_before, validator, budget
        self.outcome = outcome
        self.cache: dict[tuple, tuple[bool, ir.Model | None, Comparison | None, dict]] = {}

    def run(self, stage: str, promoted: list[str], excluded: list[str], added: list[str],
            rung: tuple[dict, str] = ({}, ""), keep: bool = False):
        """(ok, model, comparison, stats) of one trial, cached; the model of a failed trial is
        dropped (memory) unless ``keep``."""
        key = (tuple(promoted), tuple(excluded), tuple(sorted(rung[0].items())))
        if key in self.cache:
            return self.cache[key]
        changes = {"exclude_nodes": tuple(self.spec_options.exclude_nodes) + _exact(excluded)}
        if promoted:
            changes |= rung[0]
            changes["promote_nodes"] = tuple(self.spec_options.promote_nodes) + _exact(promoted)
        options = dataclasses.replace(self.spec_options, **changes)
        result = self.pass_factory(options)(snapshot(self.model_before))
        comparison = self.validator.compare(result.model, self.budget, f"fallback {stage} {len(promoted)}/{len(excluded)}")
        ok = comparison.error is None and not comparison.breaches
        worst = comparison.worst()
        self.outcome.trials.append({
            "stage": stage, "precision": rung[1] if promoted else None, "promoted": len(promoted),
            "float_nodes": len(excluded), "ok": ok,
            "worst": {k: worst.get(k) for k in ("cosine", "snr_db", "max_abs", "agreement")},
            "breaches": comparison.breaches[:3], "added": added})
        self.cache[key] = (ok, result.model if ok or keep else None, comparison, result.stats)
        return self.cache[key]

    def count(self, stage: str) -> int:
        return sum(1 for t in self.outcome.trials if t["stage"] == stage)


def _smallest_holding(holds, most: int, trials_left) -> int | None:
    """The smallest count in 1..most for which ``holds(count)``, assuming more never hurts:
    double until it holds, then bisect. None when ``most`` fails or the trials run out."""
    count, last_bad = 1, 0
    while True:
        if most < 1 or not trials_left():
            return None
        count = min(count, most)
        if holds(count):
            break
        if count == most:
            return None
        last_bad, count = count, count * 2
    low, high = last_bad, count  # low fails, high holds
    while high - low > 1 and trials_left():
        mid = (low + high) // 2
        if holds(mid):
            high = mid
        else:
            low = mid
    return high


def search(pass_factory, spec_options, model_before: ir.Model, first_model: ir.Model, first_stats: dict,
           validator: Validator, budget: Budget, feeds, ladder: list[tuple[dict, str]] = ()) -> FallbackOutcome:
    """Re-run the pass with its most sensitive nodes promoted (up each rung of the pass's
    ``ladder`` of higher precisions), else kept in float; return the first model within
    budget (or None).

    Promote stage, per rung: promoting every node is allowed (the model stays quantized) and
    is tried first, so a rung that cannot hold costs one trial; when it holds, promote the
    worst 1, 2, 4, ... nodes, then bisect. Float stage: keep the worst nodes in float, the
    others on the top rung, ranked again on the all-promoted model.
    """
    candidates = list(first_stats["quantized_nodes"])
    ranking = rank_nodes(model_before, first_model, feeds, candidates, validator.progress)
    order = [name for name, _ in ranking]
    outcome = FallbackOutcome(None, None, ranking=[{"node": n, "local_snr_db": db} for n, db in ranking[:20]])
    trials = _Trials(pass_factory, spec_options, model_before, validator, budget, outcome)

    def finish(result, promoted, excluded, stage) -> FallbackOutcome:
        _, outcome.model, outcome.comparison, outcome.stats = result
        outcome.promoted, outcome.excluded = list(promoted), list(excluded)
        outcome.stage, outcome.order = stage, list(order)
        return outcome

    promoted: list[str] = []
    top: tuple[dict, str] = ({}, "")
    everything = None
    for index, rung in enumerate(ladder):
        everything = trials.run("promote", order, [], order, rung, keep=True)
        outcome.precision, outcome.rung_index = rung[1], index
        if everything[0]:
            best = _smallest_holding(lambda k: trials.run("promote", order[:k], [], order[k - 1:k], rung)[0],
                                     len(order), lambda: trials.count("promote") < MAX_TRIALS)
            chosen = _halve(lambda names: trials.run("refine", names, [], [], rung)[0], order[:best or len(order)],
                            lambda: trials.count("refine") < MAX_REFINE_TRIALS)
            return finish(trials.run("promote", chosen, [], [], rung), chosen, [], "promote")
        promoted, top = order, rung
    if everything is not None and everything[1] is not None and everything[2].error is None:
        ranking = rank_nodes(model_before, everything[1], feeds, candidates, validator.progress)
        order = [name for name, _ in ranking]
        outcome.ranking = [{"node": n, "local_snr_db": db} for n, db in ranking[:20]]

    def keep_float(names: list[str], stage: str = "float"):
        rest = [n for n in promoted if n not in names]
        return trials.run(stage, rest, names, names[-1:], top)

    # Keeping every node in float would undo the pass: the most the search tries is all but one.
    best = _smallest_holding(lambda k: keep_float(order[:k])[0], len(order) - 1,
                             lambda: trials.count("float") < MAX_TRIALS)
    if best is None:
        return outcome
    chosen = _halve(lambda names: keep_float(names, "refine")[0], order[:best],
                    lambda: trials.count("refine") < MAX_REFINE_TRIALS)
    return finish(keep_float(chosen), [n for n in promoted if n not in chosen], chosen, "float")


def _halve(holds, chosen: list[str], trials_left) -> list[str]:
    """Drop half of ``chosen`` while the other half alone still holds.

    The ranking is an estimate (a node's own noise can hide behind the noise flowing into
    it), and often one or two nodes decide: after the ranked search, try each half of
    what it chose, keep a half that holds, and repeat until neither does.
    """
    while len(chosen) > 1 and trials_left():
        half = len(chosen) // 2
        for part in (chosen[half:], chosen[:half]):
            if trials_left() and holds(part):
                chosen = part
                break
        else:
            return chosen
    return chosen
