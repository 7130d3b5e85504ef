"""Speed as part of the budget: a rewritten model's latency against the model it came from.

Latency is what the deployed model sees: ORT CPU sessions with all graph optimizations, the
target's intra-op thread count (default 1), timed runs of the two models alternating in one
process, medians. A pass that declares ``measures_speed`` (quantize-static, quantize-dynamic)
always gets its ratio measured; a ``speedup=X`` budget key sets a floor for every lossy pass.

When the ratio misses the floor, or the result is slower than the float model, the search
re-runs the pass up its ``speed_ladder()`` (placements that keep more of ORT's float fusions,
e.g. no lone quantized op between float ops), keeps the first rung that is within the
fidelity budget and fast enough, else the fastest; a missed floor rolls the pass back.
Timing goes through a timer object (``latencies(models, feed) -> ms``) so the search's logic
is testable with fake latencies.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from . import ort_run
from .snapshot import snapshot

DEFAULT_ROUNDS = 7


class OrtTimer:
    """Median per-run latency (ms) of each model in ORT with all optimizations, runs alternating."""

    def __init__(self, threads: int = 1, rounds: int = DEFAULT_ROUNDS, per_round: int = 2,
                 clock: Callable[[], float] = time.perf_counter):
        self.threads, self.rounds, self.per_round, self.clock = threads, rounds, per_round, clock

    def latencies(self, models: dict[str, ir.Model], feed: dict[str, np.ndarray]) -> dict[str, float]:
        sessions = {name: ort_run.make_session(model, optimized=True, threads=self.threads)
                    for name, model in models.items()}
        for session in sessions.values():  # warm up: first runs allocate and pack weights
            ort_run.run(session, feed)
        samples: dict[str, list[float]] = {name: [] for name in sessions}
        names = list(sessions)
        for index in range(self.rounds):
            for name in (names if index % 2 == 0 else names[::-1]):
                start = self.clock()
                for _ in range(self.per_round):
                    ort_run.run(sessions[name], feed)
                samples[name].append((self.clock() - start) * 1000.0 / self.per_round)
        return {name: statistics.median(values) for name, values in samples.items()}


@dataclasses.dataclass
class Speed:
    speedup: float  # reference latency / candidate latency: > 1 is faster
    reference_ms: float
    candidate_ms: float


def accepted_options(options, fallback: dict | None):
    """The options that gave the model the mixed-precision search accepted (a step's
    ``fallback`` field): the pass's options plus its promoted and float nodes."""
    from .fallback import _exact

    if not fallback or not (fallback.get("float_nodes") or fallback.get("promoted_nodes")):
        return options
    changes = {"exclude_nodes": tuple(options.exclude_nodes) + _exact(fallback.get("float_nodes") or ())}
    if fallback.get("promoted_nodes"):
        changes["promote_nodes"] = tuple(options.promote_nodes) + _exact(fallback["promoted_nodes"])
    return dataclasses.replace(options, **changes)


def largest_feed(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return max(feeds, key=lambda feed: sum(int(a.size) for a in feed.values()))


def measure(reference: ir.Model, candidate: ir.Model, feed: dict[str, np.ndarray], timer) -> Speed:
    ms = timer.latencies({"reference": reference, "candidate": candidate}, feed)
    return Speed(ms["reference"] / max(ms["candidate"], 1e-9), ms["reference"], ms["candidate"])


@dataclasses.dataclass
class SpeedOutcome:
    """What the speed check decided for one step."""

    report: dict  # the step's ``speed`` field
    model: ir.Model | None = None  # a faster placement's model, when one was taken
    stats: dict | None = None
    metrics: dict | None = None
    reason: str | None = None  # set: roll the pass back
    note: str | None = None  # set: a warning for the run's notes


def check(pass_name: str, make_pass, options, ladder: list[tuple[dict, str]], before: ir.Model, model: ir.Model,
          validator, budget, timer, floor: float | None, threads: int) -> SpeedOutcome:
    """Measure ``model`` against ``before``; below ``floor`` (or below 1.0 without one) try the
    ladder's placements. ``make_pass(options)`` builds the pass for a rung."""
    feed = largest_feed(validator.feeds)
    first = measure(before, model, feed, timer)
    report = {"speedup": first.speedup, "reference_ms": first.reference_ms, "candidate_ms": first.candidate_ms,
              "threads": threads, "floor": floor, "placement": None, "trials": []}
    need = floor if floor is not None else 1.0
    if first.speedup >= need:
        report["slower_than_reference"] = first.speedup < 1.0
        return SpeedOutcome(report)
    best = None  # (speed, label, result, comparison)
    for changes, label in ladder:
        rung = dataclasses.replace(options, **changes)
        result = make_pass(rung)(snapshot(before))
        trial = {"placement": label, "modified": bool(result.modified)}
        report["trials"].append(trial)
        if not result.modified:
            continue
        comparison = validator.compare(result.model, budget, f"speed {label}")
        trial["ok"] = comparison.error is None and not comparison.breaches
        if not trial["ok"]:
            trial["breaches"] = (comparison.breaches or [comparison.error])[:3]
            continue
        speed = measure(before, result.model, feed, timer)
        trial["speedup"] = speed.speedup
        if best is None or speed.speedup > best[0].speedup:
            best = (speed, label, result, comparison)
        if speed.speedup >= need:
            break
    tried = "; ".join(f"{t['placement']}: " + (f"{t['speedup']:.2f}x" if "speedup" in t else
                                                "quantizes nothing" if not t["modified"] else "over budget")
                      for t in report["trials"]) or "none to try"
    outcome = SpeedOutcome(report)
    if best is not None and best[0].speedup > first.speedup:
        speed, label, result, comparison = best
        report.update(speedup=speed.speedup, reference_ms=speed.reference_ms, candidate_ms=speed.candidate_ms,
                      placement=label, first_speedup=first.speedup)
        outcome.model, outcome.stats, outcome.metrics = result.model, result.stats, comparison.metrics
    final = report["speedup"]
    report["slower_than_reference"] = final < 1.0
    if floor is not None and final < floor:
        outcome.model = None
        outcome.reason = (f"speedup {final:.2f}x < {floor:g} ({threads} thread{'s' if threads != 1 else ''}); "
                          f"no placement that keeps ORT's fusions is fast enough ({tried})")
    elif final < 1.0:
        placement = f" with {report['placement']}" if report["placement"] else ""
        outcome.note = (f"'{pass_name}' runs at {final:.2f}x the speed of the model before it{placement}: "
                        f"slower, kept for its size; no placement that keeps ORT's fusions is faster ({tried})")
    return outcome
