"""Mixed precision to a budget: when a lossy pass breaks the budget, keep its most
sensitive nodes in float until the budget holds.

Sensitivity comes from the per-tensor SQNR of the quantized model's activations against
the float model's on the validation feeds; nodes are ranked by the SQNR they lose
themselves (inputs' SQNR minus outputs'), worst first. The search excludes the worst 1, 2, 4, ... nodes (at most all but one: keeping every
node in float would undo the pass) until the budget holds, then bisects down to the
smallest count that still holds. Every trial is re-validated
and recorded with its measured effect.

It applies to passes whose options have an ``exclude_nodes`` selector field and that
report the nodes they changed as ``stats["quantized_nodes"]``.
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


@dataclass
class FallbackOutcome:
    model: ir.Model | None
    comparison: Comparison | None
    excluded: list[str] = field(default_factory=list)
    trials: list[dict] = field(default_factory=list)
    ranking: list[dict] = field(default_factory=list)
    stats: dict = field(default_factory=dict)


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
    ranked = sorted(local.items(), key=lambda kv: (round(kv[1] * 2) / 2, position.get(kv[0], 0)))
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


def search(pass_factory, spec_options, model_before: ir.Model, first_model: ir.Model, first_stats: dict,
           validator: Validator, budget: Budget, feeds) -> FallbackOutcome:
    """Re-run the pass with growing exclusions; return the first model within budget (or None)."""
    candidates = list(first_stats["quantized_nodes"])
    ranking = rank_nodes(model_before, first_model, feeds, candidates, validator.progress)
    order = [name for name, _ in ranking]
    outcome = FallbackOutcome(None, None, ranking=[{"node": n, "local_snr_db": db} for n, db in ranking[:20]])
    tried: dict[int, tuple[ir.Model, Comparison, dict] | None] = {}

    def attempt(count: int):
        if count in tried:
            return tried[count]
        excluded = order[:count]
        patterns = tuple(spec_options.exclude_nodes) + tuple(f"^{re.escape(n)}$" for n in excluded)
        options = dataclasses.replace(spec_options, exclude_nodes=patterns)
        model = snapshot(model_before)
        result = pass_factory(options)(model)
        comparison = validator.compare(result.model, budget, f"fallback {count}")
        ok = comparison.error is None and not comparison.breaches
        worst = comparison.worst()
        outcome.trials.append({"float_nodes": count, "ok": ok, "worst": {k: worst.get(k) for k in ("cosine", "snr_db", "max_abs", "agreement")},
                               "breaches": comparison.breaches[:3], "added": excluded[len(excluded) - 1:] if count else []})
        tried[count] = (result.model, comparison, result.stats) if ok else None
        return tried[count]

    # Keeping every node in float would undo the pass: the most the search tries is all but one.
    most = len(order) - 1
    count, last_bad = 1, 0
    good = None
    while most >= 1 and len(outcome.trials) < MAX_TRIALS:
        count = min(count, most)
        good = attempt(count)
        if good is not None or count == most:
            break
        last_bad, count = count, count * 2
    if good is None:
        return outcome
    best = count
    low, high = last_bad, count  # low fails, high holds
    while high - low > 1 and len(outcome.trials) < MAX_TRIALS:
        mid = (low + high) // 2
        if attempt(mid) is not None:
            high = best = mid
        else:
            low = mid
    model, comparison, stats = tried[best]
    outcome.model, outcome.comparison, outcome.stats = model, comparison, stats
    outcome.excluded = order[:best]
    return outcome
