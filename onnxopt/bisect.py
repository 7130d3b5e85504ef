"""`onnxopt bisect`: the first pass of a pipeline that breaks the model, and inside its
result the first node that diverges.

The runner validates every prefix of the pipeline against the original (``--validate
each``), which is what a search over ``--bisect-limit`` would test, in one run: the first
step it fails or rolls back is the first prefix that breaks the budget (a lossless pass:
float rounding). Mixed-precision fallback is off by default so the pass is judged as
written. The model before that pass is captured by an instrument; the pass is replayed on a
copy of it, and the two are compared tensor by tensor (``diff.tensor_diff``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .metrics import Budget, Tolerance
from .pass_base import PassContext
from .registry import Registry, default_registry
from .runner import Instrument, RunConfig, Runner, _jsonable
from .snapshot import snapshot
from .spec import PassSpec


class _BeforeEachPass(Instrument):
    """Keeps a copy of the model as it was before the latest pass (one copy at a time)."""

    def __init__(self):
        self.model: ir.Model | None = None

    def before_pass(self, step, model) -> None:
        self.model = snapshot(model)


@dataclass
class BisectOutcome:
    broken: bool
    steps: list[dict] = field(default_factory=list)
    breaking: dict | None = None
    divergence: dict | None = None
    divergence_error: str | None = None
    before: ir.Model | None = None
    after: ir.Model | None = None

    def as_dict(self) -> dict:
        return _jsonable({"broken": self.broken, "breaking_pass": self.breaking, "steps": self.steps,
                          "first_divergence": (self.divergence or {}).get("first_divergence"),
                          "tensors": self.divergence, "divergence_error": self.divergence_error})


def bisect_pipeline(model: ir.Model, specs: list[PassSpec], feeds: list[dict[str, np.ndarray]],
                    calibration_feeds: list[dict[str, np.ndarray]] | None = None, *, budget: Budget | None = None,
                    tolerance: Tolerance | None = None, fallback: bool = False, registry: Registry | None = None,
                    reproducer_dir: Path | None = None, progress=None) -> BisectOutcome:
    registry = registry or default_registry()
    tolerance = tolerance or Tolerance()
    capture = _BeforeEachPass()
    config = RunConfig(validate="each", budget=budget if budget is not None else Budget.parse(None),
                       tolerance=tolerance, mixed_precision=fallback, reproducer_dir=reproducer_dir)
    run = Runner(specs, config, [capture], registry=registry, progress=progress).run(model, feeds, calibration_feeds)
    steps = [{"index": s.index, "spec": s.spec, "status": s.status, "reason": s.reason} for s in run.steps]
    outcome = BisectOutcome(broken=not run.ok, steps=steps)
    failed = next((s for s in run.steps if s.status in ("failed", "rolled_back")), None)
    if failed is None:
        if run.structure_problems:
            outcome.breaking = {"index": None, "spec": None, "status": "failed", "reason": run.structure_problems[0]}
        return outcome
    outcome.breaking = {"index": failed.index, "spec": failed.spec, "status": failed.status, "reason": failed.reason,
                        "fidelity": failed.fidelity, "metrics": failed.fidelity_metrics}
    if run.crash or capture.model is None:
        outcome.divergence_error = "the pass crashed: there is no result to compare"
        return outcome
    from .diff import tensor_diff
    from .errors import OnnxoptError

    before = capture.model
    context = PassContext(calibration_feeds if calibration_feeds is not None else feeds, progress)
    try:
        after = specs[failed.index].make_pass(registry, context)(snapshot(before)).model
    except Exception as exc:  # noqa: BLE001 - the replay differs from the run: report, do not crash
        outcome.divergence_error = f"replaying the pass failed: {type(exc).__name__}: {exc}"
        return outcome
    outcome.before, outcome.after = before, after
    try:
        outcome.divergence = tensor_diff(before, after, feeds, tolerance, progress)
    except OnnxoptError as exc:
        outcome.divergence_error = f"cannot compare tensors: {exc}"
    return outcome


def save_models(outcome: BisectOutcome, directory: str | Path) -> list[Path]:
    """Write the models before and after the breaking pass, for `onnxopt diff` or `reduce`."""
    from .model_io import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, model in (("before.onnx", outcome.before), ("after.onnx", outcome.after)):
        if model is not None:
            written.append(save_model(model, directory / name))
    return written


def render_bisect(result: dict, print_line=print) -> None:
    breaking = result.get("breaking_pass")
    if not result["broken"] or breaking is None:
        print_line(f"no pass breaks the model ({len(result['steps'])} passes validated)")
        return
    where = f"#{breaking['index']} {breaking['spec']}" if breaking.get("index") is not None else "the pipeline"
    print_line(f"first breaking pass: {where} ({breaking['status'].replace('_', ' ')}: {breaking['reason']})")
    first = result.get("first_divergence")
    if first:
        print_line(f"first divergent node: '{first['node']}' ({first['op']}), output '{first['tensor']}': "
                   f"max_abs {_f(first.get('max_abs'))}, cosine {_f(first.get('cosine'))}, snr {_f(first.get('snr_db'))} dB")
    elif result.get("divergence_error"):
        print_line(f"first divergent node: unknown ({result['divergence_error']})")
    else:
        print_line("first divergent node: none beyond tolerance inside the pass's result")


def _f(value) -> str:
    try:
        return f"{float(value):.4g}"
    except (TypeError, ValueError):
        return str(value)
