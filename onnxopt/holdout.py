"""Budgets that hold on feeds the search did not see.

The mixed-precision search (fallback.py) chooses on one part of the validation feeds; its
choice is then confirmed on the held-out rest. When confirmation fails the search climbs
from where it stopped: more nodes promoted (the same rung, then the higher rungs, all nodes),
then more nodes kept in float, each trial now held to the budget on both parts. With fewer
than ``MIN_SPLIT_FEEDS`` feeds nothing is held out and the report says so. ``--eval-data``
stays out of all of this: it is the final check of the finished model.
"""

from __future__ import annotations

from .fallback import FallbackOutcome, _Trials, search
from .validation import Comparison, Validator

# Below this many feeds nothing is held out (a held-out part of one or two feeds says little
# and leaves the search too few to choose on).
MIN_SPLIT_FEEDS = 8
HOLDOUT_EVERY = 4  # every 4th feed (indices 3, 7, ...) is held out
MAX_CLIMB_TRIALS = 8


def split(count: int) -> tuple[list[int], list[int]] | None:
    """(search indices, held-out indices), interleaved so both parts span the feeds; None
    below ``MIN_SPLIT_FEEDS``."""
    if count < MIN_SPLIT_FEEDS:
        return None
    held = [i for i in range(count) if i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    return [i for i in range(count) if i not in set(held)], held


class BothParts:
    """Runs a candidate once on all feeds; the budget must hold on each part separately."""

    def __init__(self, full: Validator, parts: list[tuple[str, list[int]]]):
        self.full, self.progress, self.feeds = full, full.progress, full.feeds
        self.parts = [(label, indices, full.subset(indices)) for label, indices in parts]

    def compare(self, model, budget=None, label: str = "candidate") -> Comparison:
        from .errors import InputError

        try:
            outputs = self.full.outputs_of(model, label)
        except (InputError, ValueError) as exc:
            return Comparison(equal=False, error=str(exc), breaches=[str(exc)], feeds=len(self.feeds))
        merged = None
        for part, indices, view in self.parts:
            comparison = view.judge({n: [v[i] for i in indices] for n, v in outputs.items()}, budget)
            if merged is None:
                merged = comparison
            else:
                merged.breaches += [f"{part}: {b}" for b in comparison.breaches]
                merged.equal = merged.equal and comparison.equal
        return merged


def search_and_confirm(pass_factory, spec_options, model_before, first_model, first_stats,
                       validator: Validator, budget, ladder) -> FallbackOutcome:
    """The fallback search on the search part, confirmed on the held-out part (climbing when
    confirmation fails); on all feeds, with a note, when there are too few to split."""
    parts = split(len(validator.feeds))
    if parts is None:
        outcome = search(pass_factory, spec_options, model_before, first_model, first_stats, validator, budget,
                         validator.feeds, ladder)
        outcome.holdout = {"search_feeds": len(validator.feeds), "held_out_feeds": 0, "confirmed": None,
                           "note": f"only {len(validator.feeds)} validation feeds (fewer than {MIN_SPLIT_FEEDS}): "
                                   "the search chose and checked on the same feeds, nothing was held out; give more "
                                   "with --data (or --samples) for a confirmed choice"}
        return outcome
    search_ids, held_ids = parts
    searched, held = validator.subset(search_ids), validator.subset(held_ids)
    outcome = search(pass_factory, spec_options, model_before, first_model, first_stats, searched, budget,
                     searched.feeds, ladder)
    outcome.holdout = {"search_feeds": len(search_ids), "held_out_feeds": len(held_ids), "confirmed": None,
                       "climb_trials": 0}
    if outcome.model is None:
        return outcome
    confirmation = held.compare(outcome.model, budget, "held-out")
    outcome.holdout |= {"search": _worst(outcome.comparison), "held_out": _worst(confirmation),
                        "confirmed": confirmation.ok, "held_out_breaches": confirmation.breaches[:3]}
    if confirmation.ok:
        return outcome
    both = BothParts(validator, [("search", search_ids), ("held-out", held_ids)])
    trials = _Trials(pass_factory, spec_options, model_before, both, budget, outcome)
    found = _climb(trials, outcome, list(ladder))
    outcome.holdout["climb_trials"] = sum(1 for t in outcome.trials if t["stage"] == "climb")
    if found is None:
        outcome.model = None
        return outcome
    (_, outcome.model, comparison, outcome.stats), outcome.promoted, outcome.excluded, rung = found
    outcome.precision = rung[1] or outcome.precision
    outcome.comparison = comparison  # the search part's metrics, held-out breaches appended
    outcome.holdout |= {"confirmed": True, "climbed": True, "search": _worst(comparison),
                        "held_out": _worst(held.compare(outcome.model, budget, "held-out"))}
    return outcome


def _climb(trials: _Trials, outcome: FallbackOutcome, ladder: list[tuple[dict, str]]):
    """Configurations of rising precision from the search's choice, each held to both parts:
    the first that holds as (trial result, promoted, float nodes, rung), or None."""
    order = outcome.order
    left = lambda: sum(1 for t in outcome.trials if t["stage"] == "climb") < MAX_CLIMB_TRIALS  # noqa: E731

    def grow(chosen: list[str], most: int):
        """``chosen`` plus the next ranked nodes, doubling, up to ``most`` nodes."""
        size = len(chosen)
        while size < most:
            size = min(most, max(1, size * 2))
            yield chosen + [n for n in order if n not in chosen][: size - len(chosen)]

    def attempts():
        if outcome.stage == "promote":
            rung = ladder[outcome.rung_index]
            for names in grow(outcome.promoted, len(order)):
                yield names, [], rung
            for rung in ladder[outcome.rung_index + 1:]:
                yield list(order), [], rung
            floats: list[str] = []
        else:
            floats = list(outcome.excluded)
        top = ladder[-1] if ladder else ({}, "")
        promoted = list(order) if ladder else []
        for names in grow(floats, len(order) - 1):
            yield [n for n in promoted if n not in names], names, top

    for promoted, excluded, rung in attempts():
        if not left():
            return None
        result = trials.run("climb", promoted, excluded, [], rung)
        if result[0]:
            return result, promoted, excluded, rung
    return None


def _worst(comparison: Comparison | None) -> dict:
    if comparison is None:
        return {}
    worst = comparison.worst()
    keys = ("cosine", "cosine_worst", "snr_db", "agreement", "sequence_agreement", "nn_agreement", "box_f1")
    return {"feeds": comparison.feeds} | {k: worst[k] for k in keys if k in worst}
