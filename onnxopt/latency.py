"""Model latency after each pass, for the HTML report: an instrument that only observes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .runner import Instrument


def median_latency(model: ir.Model, feed: dict[str, np.ndarray], repeat: int = 5) -> float | None:
    """Median seconds of one run in ORT with its graph optimizations on (as deployed), one thread
    (:class:`.speed.OrtTimer`); None when ORT cannot run the model."""
    from .speed import OrtTimer

    names = {v.name for v in model.graph.inputs}
    try:
        ms = OrtTimer(threads=1, rounds=repeat, per_round=1).latencies(
            {"model": model}, {k: v for k, v in feed.items() if k in names})
        return ms["model"] / 1000.0
    except Exception:  # noqa: BLE001 - a debug measurement never fails the run
        return None


class LatencyInstrument(Instrument):
    """Times the input model before the first pass and the model after every successful pass."""

    def __init__(self, feed: dict[str, np.ndarray], repeat: int = 5):
        self.feed, self.repeat = feed, repeat
        self.seconds: dict[str, float | None] = {}

    def before_pass(self, step, model) -> None:
        if "input" not in self.seconds:
            self.seconds["input"] = median_latency(model, self.feed, self.repeat)

    def after_pass(self, step, model) -> None:
        self.seconds[str(step.index)] = median_latency(model, self.feed, self.repeat)

    def summary(self) -> dict:
        return {**self.seconds, "note": f"median of {self.repeat} runs, 1 thread, first feed"}
