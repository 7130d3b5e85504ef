"""ORT validation: reference outputs computed once, every candidate compared against them."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import ort_run
from .metrics import Budget, Tolerance, metric_direction
from .role_metrics import measure
from .roles import OutputRole, resolve_roles


@dataclass
class Comparison:
    """How a candidate model's outputs compare with the reference."""

    metrics: dict[str, dict] = field(default_factory=dict)
    equal: bool = True
    breaches: list[str] = field(default_factory=list)
    error: str | None = None
    feeds: int = 0
    roles: dict = field(default_factory=dict)  # set by api.validate_models for its report

    @property
    def ok(self) -> bool:
        return self.error is None and not self.breaches

    def worst(self) -> dict[str, float | None]:
        """The worst value of each metric across outputs."""
        worst: dict[str, float | None] = {}
        for metrics in self.metrics.values():
            for key, value in metrics.items():
                if not isinstance(value, (int, float)) or value is None:
                    continue
                current = worst.get(key)
                if current is None:
                    worst[key] = value
                elif metric_direction(key) == "ceiling":
                    worst[key] = max(current, value)
                else:
                    worst[key] = min(current, value)
        return worst


class Validator:
    """Runs the original once, then compares any candidate on the same feeds.

    Sessions run with ORT graph optimizations disabled so ORT cannot mask a broken rewrite.
    Each output is judged by its role (roles.py): ``roles`` declares some, the others are
    inferred from the reference once, on all feeds, and stay fixed for every comparison.
    """

    def __init__(self, reference_model: ir.Model, feeds: list[dict[str, np.ndarray]],
                 tolerance: Tolerance | None = None, progress=None, roles: dict[str, OutputRole] | None = None):
        self.feeds = feeds
        self.tolerance = tolerance or Tolerance()
        self.progress = progress
        session = ort_run.make_session(reference_model)
        self.output_names = [o.name for o in session.get_outputs()]
        self.reference = self._run(session, "reference")
        self.roles = resolve_roles(roles or {}, self.output_names, self.reference, reference_model,
                                   feeds[0] if feeds else None)

    def subset(self, indices: list[int]) -> Validator:
        """The same reference and roles on some of the feeds (a search or held-out split)."""
        view = copy.copy(self)
        view.feeds = [self.feeds[i] for i in indices]
        view.reference = {name: [values[i] for i in indices] for name, values in self.reference.items()}
        return view

    def _run(self, session, label: str) -> dict[str, list[np.ndarray]]:
        per_output: dict[str, list[np.ndarray]] = {name: [] for name in self.output_names}
        task = self.progress.add(f"validate {label}", len(self.feeds)) if self.progress else None
        for feed in self.feeds:
            outputs = ort_run.run(session, feed)
            for name in self.output_names:
                per_output[name].append(outputs[name])
            if task is not None:
                self.progress.advance(task)
        if task is not None:
            self.progress.done(task)
        return per_output

    def carried_state(self) -> set[str]:
        """Outputs shaped like one of the inputs they were computed from: a recurrent state the
        caller feeds back (silero-vad's ``stateN``), not scores to take decisions on."""
        if not self.feeds:
            return set()
        shapes = {(a.shape, a.dtype) for a in self.feeds[0].values()}
        return {name for name in self.output_names
                if self.reference[name] and (self.reference[name][0].shape, self.reference[name][0].dtype) in shapes}

    def roles_report(self) -> dict[str, dict]:
        return {name: role.as_dict() for name, role in self.roles.items()}

    def outputs_of(self, model: ir.Model, label: str = "candidate") -> dict[str, list[np.ndarray]]:
        session = ort_run.make_session(model)
        names = [o.name for o in session.get_outputs()]
        if names != self.output_names:
            raise ValueError(f"outputs changed: {self.output_names} -> {names}")
        return self._run(session, label)

    def compare(self, model: ir.Model, budget: Budget | None = None, label: str = "candidate") -> Comparison:
        from .errors import InputError

        try:
            candidate = self.outputs_of(model, label)
        except (InputError, ValueError) as exc:
            return Comparison(equal=False, error=str(exc), breaches=[str(exc)], feeds=len(self.feeds))
        return self.judge(candidate, budget)

    def judge(self, candidate: dict[str, list[np.ndarray]], budget: Budget | None = None) -> Comparison:
        """Compare candidate outputs (per output, per feed) with the reference."""
        result = Comparison(feeds=len(self.feeds))
        for name in self.output_names:
            result.metrics[name] = measure(self.roles[name], self.reference[name], candidate[name])
            if not self.tolerance.allows(self.reference[name], candidate[name]):
                result.equal = False
        if budget:
            result.breaches = budget.breaches(result.metrics, self.roles)
        return result
