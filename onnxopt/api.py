"""The Python API; the CLI is a thin layer over these functions."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputError, UsageError, ValidationFailed
from .feeds import (DEFAULT_LEADING_DIM, DEFAULT_OTHER_DIM, DEFAULT_SAMPLE_COUNT, describe_feeds, generate_feeds,
                    input_specs, load_data)
from .inspect_model import inspect_model
from .metrics import Budget, Tolerance
from .model_io import load_model, same_file, save_model
from .progress import Progress
from .registry import Registry
from .report import build_report, write_report
from .runner import RunConfig, Runner, RunResult
from .spec import PassSpec, parse_pipeline, parse_recipe, recipe_settings
from .target import Target
from .target import resolve as resolve_target
from .validation import Comparison, Validator


@dataclass
class OptimizeResult:
    ok: bool
    report: dict
    model: ir.Model
    run: RunResult
    output: Path | None

    def raise_for_status(self) -> None:
        if not self.ok:
            raise ValidationFailed(failure_summary(self.run))


def failure_summary(run: RunResult) -> str:
    if run.crash:
        return run.crash
    for step in run.steps:
        if step.status in ("failed", "rolled_back"):
            return f"pass '{step.spec}' {step.status.replace('_', ' ')}: {step.reason}"
    if run.structure_problems:
        return "structural check after the last pass: " + run.structure_problems[0]
    if run.final is not None and (run.final.error or run.final.breaches):
        return "final validation failed: " + (run.final.error or "; ".join(run.final.breaches[:3]))
    return "ok"


def resolve_specs(passes: list[str] | tuple[str, ...] = (), recipe: str | Path | None = None,
                  registry: Registry | None = None) -> list[PassSpec]:
    specs = parse_recipe(recipe, registry) if recipe else []
    specs += parse_pipeline(list(passes), registry)
    if not specs:
        raise UsageError("no passes given: use -p NAME[:key=value,...] or --recipe FILE (see `onnxopt passes`)")
    return specs


def make_feeds(model: ir.Model, data: str | Path | None, dims: dict[str, int] | None = None,
               samples: int | None = None, seed: int = 0) -> tuple[list[dict[str, np.ndarray]], str]:
    """Feeds from ``data`` (npz or directory) or generated; and a description of their source."""
    specs = input_specs(model)
    if data:
        return load_data(data, specs, limit=samples), str(data)
    count = samples or DEFAULT_SAMPLE_COUNT
    rules = "".join(f"; {s.name} {s.rule}" for s in specs if s.rule)
    return generate_feeds(specs, count=count, seed=seed, dims=dims), f"generated ({count} samples, seed {seed}{rules})"


def optimize(
    model_path: str | Path,
    output: str | Path | None,
    passes: list[str] | tuple[str, ...] = (),
    *,
    recipe: str | Path | None = None,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    budget: str | Budget | None = None,
    validate: str = "each",
    dims: dict[str, int] | None = None,
    samples: int | None = None,
    keep_going: bool = False,
    bisect_limit: int | None = None,
    dump_dir: str | Path | None = None,
    report: str | Path | None = None,
    in_place: bool = False,
    reproducer_dir: str | Path | None = None,
    tolerance: Tolerance | None = None,
    progress: Progress | None = None,
    registry: Registry | None = None,
    html: str | Path | None = None,
    target: str | Target | None = None,
    threads: int | None = None,
    output_roles=None,
) -> OptimizeResult:
    """Load, run the pipeline with validation, write the output (when the run is ok or
    ``keep_going``) and the report. Usage errors surface before the model is read. ``html``
    also writes the page, with each model's latency and the per-tensor error of the result.

    ``output_roles`` declares what outputs are for (``{"out": "embedding"}`` or
    ``["out=boxes:layout=cxa"]``, as ``--output-role``); a recipe's ``output_roles`` come
    first. ``eval_data`` only checks the finished model; ``data`` feeds validate each step.

    ``target`` is the CPU the model is for: ``auto`` (this machine, the default), a name from
    ``onnxopt.target.TARGETS`` or a Target; a recipe's ``target:`` applies when none is given.
    ``threads``: the intra-op threads it will run with (speed measurements; default 1)."""
    specs = resolve_specs(passes, recipe, registry)
    roles = _declared_roles(recipe, output_roles)
    settings = recipe_settings(recipe) if recipe else {}
    target = resolve_target(target if target is not None else settings.get("target", "auto"),
                            threads if threads is not None else settings.get("threads"))
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    if validate not in ("each", "end", "off"):
        raise UsageError(f"--validate must be each, end or off, not '{validate}'")
    if output is not None:
        _check_output_path(Path(model_path), Path(output), in_place)
    load_notes: list[str] = []
    model = load_model(model_path, notes=load_notes)
    feeds, source = make_feeds(model, data, dims, samples)
    eval_feeds = None
    if eval_data:
        eval_feeds, eval_source = make_feeds(model, eval_data, dims, samples)
        source = f"calibration and validation {source}; evaluation {eval_source}"
    config = RunConfig(validate=validate, budget=budget, tolerance=tolerance or Tolerance(), keep_going=keep_going,
                       bisect_limit=bisect_limit, dump_dir=Path(dump_dir) if dump_dir else None,
                       reproducer_dir=Path(reproducer_dir) if reproducer_dir else None, target=target,
                       output_roles=roles)
    instruments, original = [], None
    if html:
        from .latency import LatencyInstrument
        from .snapshot import snapshot

        original = snapshot(model)
        instruments.append(LatencyInstrument(feeds[0]))
    with _hint_on_generated_inputs(not data):
        run = Runner(specs, config, instruments, registry=registry, progress=progress).run(model, feeds, feeds,
                                                                                          eval_feeds)
    run.notes[:0] = load_notes
    written = None
    final_failed = run.final is not None and bool(run.final.error or run.final.breaches)
    if output is not None and not run.crash and run.model_trusted and not run.structure_problems \
            and not final_failed and (run.ok or keep_going):
        protect = () if in_place else (model_path,)
        written = save_model(run.model, output, protect=protect)
    inputs = {"count": len(feeds), "signature": describe_feeds(feeds),
              "eval_count": len(eval_feeds) if eval_feeds is not None else None}
    document = build_report(run, model_path=str(model_path), output_path=str(written) if written else None,
                            inputs=inputs, budget=budget.text(), validate=validate, data_source=source)
    if report:
        write_report(document, report)
    if html:
        _write_optimize_page(document, html, original, run.model, feeds, instruments[0], tolerance, progress)
    return OptimizeResult(ok=run.ok, report=document, model=run.model, run=run, output=written)


def _write_optimize_page(document, path, original, final, feeds, latency, tolerance, progress) -> None:
    from .diff import tensor_diff
    from .html_report import render_optimize_page, write_page
    from .runner import _jsonable

    page = dict(document, latency=latency.summary())
    try:
        page["tensors"] = _jsonable(tensor_diff(original, final, feeds[:4], tolerance, progress))
    except Exception as exc:  # noqa: BLE001 - the page is debug output: say why the plot is missing
        page["notes"] = [*document.get("notes", []), f"per-tensor comparison unavailable: {type(exc).__name__}: {exc}"]
    write_page(render_optimize_page(page), path)


def _declared_roles(recipe, output_roles) -> dict:
    """Declared roles: the recipe's ``output_roles``, then ``output_roles`` (which wins)."""
    from .roles import parse_role_specs, recipe_roles

    roles = parse_role_specs(recipe_roles(recipe)) if recipe else {}
    return roles | parse_role_specs(output_roles)


@contextlib.contextmanager
def _hint_on_generated_inputs(generated: bool):
    """A model that ORT cannot run on generated inputs usually needs real sizes: say how to give them."""
    try:
        yield
    except InputError as exc:
        if not str(exc).startswith("ONNX Runtime failed to run"):
            raise
        from .feeds import reference_failure

        if not generated or reference_failure(str(exc)):
            raise InputError(reference_failure(str(exc)) or f"{exc} (the original model; --validate off skips "
                             "running it)") from None
        raise InputError(f"{exc} (the inputs were generated: symbolic dims are {DEFAULT_LEADING_DIM} "
                         f"for the first axis and {DEFAULT_OTHER_DIM} elsewhere; give real sizes with --dim NAME=VALUE or "
                         "INPUT.AXIS=VALUE, or real inputs with --data; --validate off skips running it)") from None


def _check_output_path(model_path: Path, output: Path, in_place: bool) -> None:
    if output.exists() and same_file(output, model_path):
        if not in_place:
            raise UsageError(f"refusing to overwrite the input model {model_path}; choose another -o path or pass --in-place")
    elif in_place:
        raise UsageError("--in-place needs -o to name the input model itself")


def validate_models(reference: str | Path, candidate: str | Path, *, data: str | Path | None = None,
                    dims: dict[str, int] | None = None, samples: int | None = None,
                    budget: str | Budget | None = None, tolerance: Tolerance | None = None,
                    progress: Progress | None = None, output_roles=None) -> Comparison:
    """Compare two models' outputs on the same feeds, each output by its role (declared in
    ``output_roles`` or inferred; ``comparison.roles``). ``comparison.equal`` is within
    tolerance; with a budget, ``comparison.breaches`` lists what falls outside it."""
    from .roles import parse_role_specs

    budget = budget if isinstance(budget, Budget) else (Budget.parse(budget) if budget else Budget())
    roles = parse_role_specs(output_roles)
    ref_model = load_model(reference)
    cand_model = load_model(candidate)
    feeds, _ = make_feeds(ref_model, data, dims, samples)
    validator = Validator(ref_model, feeds, tolerance, progress, roles=roles)
    comparison = validator.compare(cand_model, budget or None, "candidate")
    comparison.roles = validator.roles_report()
    return comparison


def diff(model_a: str | Path, model_b: str | Path, *, tensors: bool = False, data: str | Path | None = None,
         dims: dict[str, int] | None = None, samples: int | None = None, tolerance: Tolerance | None = None,
         progress: Progress | None = None, memory_budget_mb: float = 256, html: str | Path | None = None) -> dict:
    """Structural differences; with ``tensors`` (implied by ``data``), per-tensor numeric comparison
    and the first divergence. ``html`` also writes the self-contained page."""
    from .diff import match_nodes, structural_diff, tensor_diff

    a, b = load_model(model_a), load_model(model_b)
    matching = match_nodes(a, b)
    result = {"model_a": str(model_a), "model_b": str(model_b), "structure": structural_diff(a, b, matching)}
    if tensors or data:
        feeds, _ = make_feeds(a, data, dims, samples)
        result["tensors"] = tensor_diff(a, b, feeds, tolerance, progress, matching, memory_budget_mb)
    if html:
        from .html_report import render_diff_page, write_page

        write_page(render_diff_page(result), html)
    return result


def bisect(model_path: str | Path, passes: list[str] | tuple[str, ...] = (), *, recipe: str | Path | None = None,
           data: str | Path | None = None, budget: str | Budget | None = None, dims: dict[str, int] | None = None,
           samples: int | None = None, tolerance: Tolerance | None = None, fallback: bool = False,
           save_dir: str | Path | None = None, reproducer_dir: str | Path | None = None,
           registry: Registry | None = None, progress: Progress | None = None) -> dict:
    """The first pass that breaks the budget (lossless passes: float rounding) and, inside its
    result, the first divergent node; ``result["broken"]`` is False when nothing breaks."""
    from .bisect import bisect_pipeline, save_models

    specs = resolve_specs(passes, recipe, registry)
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    model = load_model(model_path)
    feeds, _ = make_feeds(model, data, dims, samples)
    with _hint_on_generated_inputs(not data):
        outcome = bisect_pipeline(model, specs, feeds, budget=budget, tolerance=tolerance, fallback=fallback,
                                  registry=registry, progress=progress,
                                  reproducer_dir=Path(reproducer_dir) if reproducer_dir else None)
    result = outcome.as_dict()
    if save_dir and outcome.before is not None:
        result["saved"] = [str(p) for p in save_models(outcome, save_dir)]
    return result


def reduce(model_path: str | Path, output: str | Path, *, budget: str | Budget | None = None,
           against: str | Path | None = None, check: str | None = None, data: str | Path | None = None,
           dims: dict[str, int] | None = None, samples: int | None = None) -> dict:
    """Shrink a failing model to a small subgraph that still fails and write it to ``output``
    (with ``OUTPUT.inputs.npz``, the captured values of its inputs, when they stack)."""
    from .reduce import reduce_model, save_reduced

    if (budget is None) == (check is None):
        raise UsageError("reduce needs exactly one of --budget (with --against REF to compare) or --check CMD")
    if against is not None and check is not None:
        raise UsageError("--against goes with --budget, not with --check")
    budget = budget if isinstance(budget, Budget) or budget is None else Budget.parse(budget)
    _check_output_path(Path(model_path), Path(output), False)
    model = load_model(model_path)
    reference = load_model(against) if against else None
    feeds = make_feeds(reference or model, data, dims, samples)[0] if check is None else []
    reduced, summary, values = reduce_model(model, feeds, budget=budget, against=reference, check=check)
    summary["output"] = str(save_reduced(reduced, output))
    if values and all(len({a.shape for a in arrays}) == 1 for arrays in values.values()):
        inputs_path = Path(f"{output}.inputs.npz")
        np.savez(inputs_path, **{name: np.stack(arrays) for name, arrays in values.items()})
        summary["inputs_file"] = str(inputs_path)
    return summary


def inspect(model_path: str | Path) -> dict:
    return inspect_model(load_model(model_path))


def split(model_path: str | Path, outdir: str | Path, *, at: list[str] | tuple[str, ...] | None = None,
          stages: int | None = None, by: str = "params", supported_ops: str | Path | list[str] | None = None,
          data: str | Path | None = None, dims: dict[str, int] | None = None, samples: int | None = None,
          report: str | Path | None = None, force: bool = False, share_weights: bool = False,
          tolerance: Tolerance | None = None, progress: Progress | None = None, registry: Registry | None = None,
          html: str | Path | None = None):
    """Split a model into standalone stage models plus ``manifest.json`` in ``outdir`` (one of ``at``,
    ``stages``/``by`` or ``supported_ops``, a file or a list of op specs), then chain the stages with ORT
    against the original. ``share_weights`` stores every initializer once in ``outdir/weights.data``.
    Returns a ``SplitResult``; ``result.ok`` is False when the stages differ.
    ``html`` also writes the page (stage costs, wiring, stitch-back)."""
    from .split_run import check_outdir, read_supported_ops, split_model, split_spec

    ops = read_supported_ops(supported_ops) if isinstance(supported_ops, (str, Path)) else supported_ops
    spec = split_spec(list(at) if at else None, stages, by, list(ops) if ops else None, registry)
    check_outdir(Path(outdir), force)
    model = load_model(model_path)
    feeds, _ = make_feeds(model, data, dims, samples)
    with _hint_on_generated_inputs(not data):
        result = split_model(model, model_path, outdir, spec, feeds, force=force, share_weights=share_weights,
                             tolerance=tolerance,
                             registry=registry, progress=progress)
    if report:
        write_report(result.as_dict(), report)
    if html:
        from .html_report import render_split_page, write_page
        from .runner import _jsonable

        write_page(render_split_page(_jsonable(result.as_dict())), html)
    return result


def merge(manifest: str | Path, output: str | Path, *, data: str | Path | None = None,
          dims: dict[str, int] | None = None, samples: int | None = None, force: bool = False,
          tolerance: Tolerance | None = None):
    """Rebuild one model from a split manifest; written only when it matches the chained stages and
    (where it is still there) the original. Returns a ``MergeResult``."""
    from .split_run import merge_manifest

    return merge_manifest(manifest, output, lambda model: make_feeds(model, data, dims, samples)[0],
                          tolerance=tolerance, force=force)
