"""The pass runner: runs a pipeline, checks every step, rolls back what breaks the model.

Per step: snapshot, run the pass, then structural verification and ORT validation
against reference outputs computed once from the original. A lossless pass must match
within float rounding; a lossy pass must stay within the budget. A step that fails is
rolled back from its snapshot and reported with the reason. Instruments observe the
run (dumps, custom hooks) and never edit the model.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from .errors import OnnxoptError
from .metrics import Budget, Tolerance
from .model_stats import ModelStats, model_stats, op_delta
from .options import non_default_items, format_value
from .pass_base import Fidelity, PassContext
from .progress import Progress
from .registry import Registry, default_registry
from .reproducer import write_reproducer
from .snapshot import snapshot as take_snapshot
from .spec import PassSpec, pipeline_text
from .target import Target
from .validation import Comparison, Validator
from .verify import structural_problems

Status = Literal["ok", "skipped", "rolled_back", "failed"]


@dataclass
class StepReport:
    index: int
    name: str
    spec: str
    options: dict
    fidelity: str
    status: Status = "ok"
    modified: bool = False
    seconds: float = 0.0
    stats: dict = field(default_factory=dict)
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    op_delta: dict = field(default_factory=dict)
    fidelity_metrics: dict | None = None
    reason: str | None = None
    fallback: dict | None = None
    tensor_sqnr: list | None = None
    kernel_choices: dict | None = None  # option -> "value (target NAME: why)" for target-decided options
    speed: dict | None = None  # measured speed-up against the model before the pass (onnxopt/speed.py)


@dataclass
class RunConfig:
    validate: Literal["each", "end", "off"] = "each"
    budget: Budget = field(default_factory=Budget)
    tolerance: Tolerance = field(default_factory=Tolerance)
    keep_going: bool = False
    bisect_limit: int | None = None
    dump_dir: Path | None = None
    reproducer_dir: Path | None = None
    verify_structure: bool = True
    mixed_precision: bool = True
    sqnr_top: int = 10
    target: Target | None = None  # the CPU the model is for (None: generic); passes read it from their context
    speed_timer: Any = None  # latencies(models, feed) -> ms; None: ORT, the target's threads (speed.OrtTimer)
    # Declared output roles (roles.parse_role_specs); the others are inferred.
    output_roles: dict = field(default_factory=dict)


@dataclass
class RunResult:
    model: ir.Model
    steps: list[StepReport]
    pipeline: str
    final: Comparison | None = None
    crash: str | None = None
    reproducer: str | None = None
    notes: list[str] = field(default_factory=list)
    structure_problems: list[str] = field(default_factory=list)
    # False when a step failed with no snapshot to roll back to: the model must not be written.
    model_trusted: bool = True
    target: dict | None = None  # the target CPU and how it was chosen (Target.describe())
    # Each output's role (declared or inferred, and why), as roles.OutputRole.as_dict().
    roles: dict = field(default_factory=dict)
    # The feeds of the final check: "validation" (--validate end) or "evaluation" (--eval-data).
    final_feeds: str | None = None
    speed: dict | None = None  # --validate end without a budget: the final model's speed-up against the input

    @property
    def ok(self) -> bool:
        if self.crash or self.structure_problems or not self.model_trusted:
            return False
        if any(s.status in ("failed", "rolled_back") for s in self.steps):
            return False
        return self.final is None or (self.final.error is None and not self.final.breaches)


class Instrument:
    """Observes the run. Hooks receive the live model and must not modify it."""

    def before_pass(self, step: StepReport, model: ir.Model) -> None:
        pass

    def after_pass(self, step: StepReport, model: ir.Model) -> None:
        pass

    def on_failure(self, step: StepReport, model_before: ir.Model, error: BaseException) -> None:
        pass


class DumpInstrument(Instrument):
    """Writes the model after each pass as ``NNN_name.onnx`` (for ``onnxopt diff``)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)

    def after_pass(self, step: StepReport, model: ir.Model) -> None:
        from .model_io import save_model

        save_model(model, self.directory / f"{step.index:03d}_{step.name}.onnx")


class Runner:
    def __init__(self, specs: list[PassSpec], config: RunConfig | None = None,
                 instruments: list[Instrument] | None = None, registry: Registry | None = None,
                 progress: Progress | None = None):
        self.specs = list(specs)
        self.config = config or RunConfig()
        self.instruments = list(instruments or [])
        if self.config.dump_dir:
            self.instruments.append(DumpInstrument(self.config.dump_dir))
        self.registry = registry or default_registry()
        self.progress = progress or Progress()

    def run(self, model: ir.Model, feeds: list[dict[str, np.ndarray]],
            calibration_feeds: list[dict[str, np.ndarray]] | None = None,
            eval_feeds: list[dict[str, np.ndarray]] | None = None) -> RunResult:
        """``feeds`` validate each step (and the mixed-precision search, which holds part of
        them out); ``eval_feeds``, when given, only check the finished model."""
        config = self.config
        result = RunResult(model=model, steps=[], pipeline=pipeline_text(self.specs),
                           target=config.target.describe() if config.target is not None else None)
        self._notes = result.notes
        validator = final_validator = None
        # Checking each step needs a snapshot per step to roll back to; with --validate end
        # or off, the original is kept once and checks run after the last pass (lossy passes
        # under a budget are still checked, and searched, on their own).
        self._original = None if self._per_step else take_snapshot(model)
        if config.validate != "off":
            validator = Validator(self._original or model, feeds, config.tolerance, self.progress,
                                  roles=config.output_roles)
            result.roles = validator.roles_report()
            final_validator = validator if config.validate == "end" else None
            if eval_feeds is not None:
                final_validator = Validator(self._original or model, eval_feeds, config.tolerance, self.progress,
                                            roles=validator.roles)
        baseline_problems = set(structural_problems(model)) if config.verify_structure else set()
        if baseline_problems:
            result.notes.append(f"the input model already fails structural checks: {sorted(baseline_problems)[0]}")
        context = PassContext(calibration_feeds if calibration_feeds is not None else feeds, self.progress,
                              target=config.target)
        limit = len(self.specs) if config.bisect_limit is None else max(0, config.bisect_limit)
        stopped = False
        pipeline_task = self.progress.add("pipeline", len(self.specs))
        for index, spec in enumerate(self.specs):
            step = self._new_step(index, spec, context)
            result.steps.append(step)
            if index >= limit or stopped:
                step.status = "skipped"
                step.reason = "beyond --bisect-limit" if index >= limit else "an earlier pass failed"
                continue
            model, stop = self._run_step(model, spec, step, context, validator, baseline_problems, result)
            stopped = stopped or stop
            self.progress.advance(pipeline_task)
        self.progress.done(pipeline_task)
        result.model = model
        if not self._per_step and config.verify_structure and not result.crash:
            result.structure_problems = [p for p in structural_problems(model) if p not in baseline_problems]
        if final_validator is not None and not result.crash and result.model_trusted:
            lossy = any(s.fidelity == Fidelity.LOSSY.value and s.status == "ok" for s in result.steps)
            final = final_validator.compare(model, config.budget if lossy else None, "final")
            if not lossy and not final.equal and final.error is None:
                final.breaches.append("outputs changed beyond float rounding")
            result.final = final
            result.final_feeds = "validation" if final_validator is validator else "evaluation"
            if lossy and final.error is None and self._timed_at_end(result):
                self._final_speed(model, validator, result)
        return result

    def _timed_at_end(self, result: RunResult) -> bool:
        """--validate end with steps that were not checked on their own (no budget): time the final
        model when a step that measures speed changed it (no snapshot to time each step against)."""
        if self.config.validate != "end":
            return False
        timed = {name for name in self.registry.names() if getattr(self.registry.get(name), "measures_speed", False)}
        changed = [s for s in result.steps if s.status == "ok" and s.modified and s.speed is None]
        return any(s.name in timed for s in changed) or (bool(changed) and
                                                         self.config.budget.value("speedup") is not None)

    def _final_speed(self, model, validator, result: RunResult) -> None:
        from . import speed

        threads = self.config.target.threads if self.config.target is not None else 1
        timer = self.config.speed_timer or speed.OrtTimer(threads=threads)
        measured = speed.measure(self._original, model, speed.largest_feed(validator.feeds), timer)
        result.speed = {"speedup": measured.speedup, "reference_ms": measured.reference_ms,
                        "candidate_ms": measured.candidate_ms, "threads": threads,
                        "slower_than_reference": measured.speedup < 1.0}
        if measured.speedup < 1.0:
            result.notes.append(f"the final model runs at {measured.speedup:.2f}x the speed of the input: slower")

    @property
    def _per_step(self) -> bool:
        return self.config.validate == "each"

    def _checked(self, pass_) -> bool:
        """Whether this step is checked on its own: every step with --validate each; with
        --validate end, lossy steps under a budget (so they can be searched or rolled back)."""
        if self.config.validate == "each":
            return True
        return self.config.validate == "end" and pass_.fidelity == Fidelity.LOSSY and bool(self.config.budget)

    def _new_step(self, index: int, spec: PassSpec, context: PassContext) -> StepReport:
        pass_ = spec.make_pass(self.registry, context)
        options = {k: (format_value(v) if isinstance(v, tuple) else v) for k, v in non_default_items(spec.options)}
        return StepReport(index=index, name=spec.name, spec=spec.text(), options=options,
                          fidelity=pass_.fidelity.value, kernel_choices=pass_.kernel_choices or None)

    def _run_step(self, model, spec, step, context, validator, baseline_problems, result):
        """Run one step; returns the model to continue with and whether to stop."""
        pass_ = spec.make_pass(self.registry, context)
        task = self.progress.add(f"pass {spec.name}", None)
        if self._may_fall_back(pass_):
            from .naming import name_unnamed_nodes

            named = len(name_unnamed_nodes(model))
            if named:
                result.notes.append(f"named {named} unnamed nodes before '{spec.name}' so mixed precision can "
                                    "keep nodes in float by name")
        before = model_stats(model)
        checked = self._checked(pass_)
        snapshot = take_snapshot(model) if checked else None
        for instrument in self.instruments:
            instrument.before_pass(step, model)
        start = time.perf_counter()
        try:
            pass_result = pass_(model)
        except OnnxoptError as exc:
            step.seconds = time.perf_counter() - start
            self.progress.done(task)
            return self._fail(step, snapshot, "failed", f"{type(exc).__name__}: {exc}", result, model)
        except Exception as exc:  # an unexpected crash: leave a reproducer
            step.seconds = time.perf_counter() - start
            self.progress.done(task)
            if snapshot is not None:
                before_model, replay = snapshot, pipeline_text(self.specs[step.index:])
            else:  # no per-step snapshot: replay from the original input
                before_model, replay = self._original, pipeline_text(self.specs[: step.index + 1])
            for instrument in self.instruments:
                instrument.on_failure(step, before_model, exc)
            path = write_reproducer(self.config.reproducer_dir, before_model, replay, exc)
            result.reproducer = str(path)
            result.crash = f"pass '{spec.name}' crashed ({type(exc).__name__}: {exc}); reproducer written to {path}"
            step.status, step.reason = "failed", f"crashed: {type(exc).__name__}: {exc}"
            return (snapshot if snapshot is not None else model), True
        step.seconds = time.perf_counter() - start
        self.progress.done(task)
        model = pass_result.model
        after = model_stats(model)
        step.modified = bool(pass_result.modified)
        step.stats = _jsonable(pass_result.stats)
        step.before, step.after, step.op_delta = before.as_dict(), after.as_dict(), op_delta(before, after)
        reason = self._check(step, model, before, after, validator, baseline_problems, pass_.fidelity, checked)
        if reason and reason.startswith("budget exceeded") and self._can_fall_back(pass_, pass_result.stats):
            model, reason = self._fall_back(spec, pass_, snapshot, model, pass_result.stats, step, context,
                                            validator, reason)
        if not reason and step.modified and self._measures_speed(pass_, snapshot):
            model, reason = self._check_speed(spec, pass_, snapshot, model, step, context, validator, result)
        if reason:
            return self._fail(step, snapshot, "rolled_back" if pass_.fidelity == Fidelity.LOSSY else "failed",
                              reason, result, model)
        if (pass_.fidelity == Fidelity.LOSSY and step.modified and validator is not None and snapshot is not None
                and self.config.sqnr_top):
            step.tensor_sqnr = self._worst_tensors(snapshot, model, validator)
        if step.modified:
            context.invalidate()
        for instrument in self.instruments:
            instrument.after_pass(step, model)
        return model, False

    def _check(self, step, model, before: ModelStats, after: ModelStats, validator, baseline_problems, fidelity,
               checked: bool):
        if not step.modified:
            if before.fingerprint() != after.fingerprint():
                return "the pass reported no change but the model changed"
            return None
        if self.config.verify_structure and checked:
            new_problems = [p for p in structural_problems(model) if p not in baseline_problems]
            if new_problems:
                return "structural check: " + new_problems[0]
        if validator is None or not checked:
            return None
        budget = self.config.budget if fidelity == Fidelity.LOSSY else None
        comparison = validator.compare(model, budget, step.name)
        step.fidelity_metrics = _jsonable(comparison.metrics)
        if comparison.error:
            return f"ORT cannot run the rewritten model: {comparison.error}"
        if fidelity == Fidelity.LOSSLESS and not comparison.equal:
            worst = comparison.worst()
            return (f"a lossless pass changed outputs beyond float rounding "
                    f"(max_abs {worst.get('max_abs', float('nan')):.3g})")
        if comparison.breaches:
            return "budget exceeded: " + "; ".join(comparison.breaches[:3])
        return None

    def _may_fall_back(self, pass_) -> bool:
        from .fallback import can_exclude_nodes

        return (self.config.mixed_precision and self.config.validate != "off" and bool(self.config.budget)
                and pass_.fidelity == Fidelity.LOSSY and can_exclude_nodes(pass_.options))

    def _can_fall_back(self, pass_, stats) -> bool:
        from .fallback import supports_fallback

        return self._may_fall_back(pass_) and supports_fallback(pass_.options, stats)

    def _fall_back(self, spec, pass_, snapshot, model, stats, step, context, validator, reason):
        """Promote the most sensitive nodes, then keep them in float, until the budget holds
        (fallback.py), choosing on part of the feeds and confirming on the rest (holdout.py)."""
        from .fallback import promotion_ladder
        from .holdout import search_and_confirm

        cls = type(pass_)
        outcome = search_and_confirm(lambda options: cls(options, context=context), pass_.options, snapshot, model,
                                     stats, validator, self.config.budget, promotion_ladder(pass_))
        step.fallback = {"precision": outcome.precision, "promoted_nodes": outcome.promoted,
                         "float_nodes": outcome.excluded, "trials": _jsonable(outcome.trials),
                         "sensitivity": _jsonable(outcome.ranking), "holdout": _jsonable(outcome.holdout)}
        holdout = outcome.holdout or {}
        if holdout.get("note") and outcome.trials:
            self._notes.append(f"'{spec.name}': {holdout['note']}")
        if outcome.model is None:
            if not outcome.trials:
                return model, f"{reason} (the pass changed one node: keeping it in float would undo the pass)"
            if holdout.get("confirmed") is False:
                return model, (f"{reason}; the search's choice held on {holdout['search_feeds']} search feeds but "
                               f"not on {holdout['held_out_feeds']} held-out feeds "
                               f"({'; '.join(holdout.get('held_out_breaches') or [])}), and "
                               + (f"{holdout['climb_trials']} trials with more precision did not hold on both"
                                  if holdout.get("climb_trials") else "no higher precision was left to try"))
            tried = max((t["float_nodes"] for t in outcome.trials), default=0)
            promoted = f" ({outcome.precision} for the others)" if outcome.precision and tried else ""
            return model, f"{reason} (still over budget with {tried} nodes kept in float{promoted})"
        step.stats = _jsonable(outcome.stats)
        step.after = model_stats(outcome.model).as_dict()
        step.op_delta = op_delta(model_stats(snapshot), model_stats(outcome.model))
        step.fidelity_metrics = _jsonable(outcome.comparison.metrics)
        return outcome.model, None

    def _measures_speed(self, pass_, snapshot) -> bool:
        """A checked lossy step (it has a snapshot to time against and to roll back to)."""
        if snapshot is None or self.config.validate == "off" or pass_.fidelity != Fidelity.LOSSY:
            return False
        return pass_.measures_speed or self.config.budget.value("speedup") is not None

    def _check_speed(self, spec, pass_, snapshot, model, step, context, validator, result):
        """Measure the step's speed-up; too slow: try the pass's faster placements (speed.py)."""
        from . import speed

        target = self.config.target
        threads = target.threads if target is not None else 1
        timer = self.config.speed_timer or speed.OrtTimer(threads=threads)
        cls = type(pass_)
        options = speed.accepted_options(pass_.options, step.fallback)
        outcome = speed.check(spec.name, lambda o: cls(o, context=context), options, pass_.speed_ladder(),
                              snapshot, model, validator, self.config.budget, timer,
                              self.config.budget.value("speedup"), threads)
        step.speed = _jsonable(outcome.report)
        if outcome.note:
            result.notes.append(outcome.note)
        if outcome.model is not None:
            step.stats = _jsonable(outcome.stats)
            step.after = model_stats(outcome.model).as_dict()
            step.op_delta = op_delta(model_stats(snapshot), model_stats(outcome.model))
            step.fidelity_metrics = _jsonable(outcome.metrics)
            model = outcome.model
        return model, outcome.reason

    def _worst_tensors(self, reference, model, validator) -> list | None:
        """Per-tensor SQNR of the rewritten model against the float one, worst first."""
        from .calibration import tensor_sqnr

        try:
            sqnr = tensor_sqnr(reference, model, validator.feeds, progress=self.progress)
        except Exception as exc:  # debug output must never fail the run
            return [{"error": f"{type(exc).__name__}: {exc}"}]
        return [{"tensor": name, "sqnr_db": _jsonable(db)} for name, db in list(sqnr.items())[: self.config.sqnr_top]]

    def _fail(self, step, snapshot, status, reason, result, current):
        """Roll back to the snapshot (the model the cached analyses describe: the cache stays
        valid); without one (--validate end/off) the model cannot be trusted: stop."""
        step.status, step.reason = status, reason
        step.modified = False
        if snapshot is None:
            step.status = "failed"
            result.model_trusted = False
            return current, True
        return snapshot, not self.config.keep_going


def _jsonable(value):
    """Stats and metrics made JSON-safe (numpy scalars, tuples, inf/nan as strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        if number != number or number in (float("inf"), float("-inf")):
            return str(number)
        return number
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    return value
