"""`onnxopt split` and `onnxopt merge`: mark partitions with a split pass, export the stages,
prove the stages reproduce the original (stitch-back), and rebuild one model from them.

:func:`split_model` returns a :class:`SplitResult`; ``SplitResult.as_dict()`` is the JSON
report (stage costs, wiring, stitch-back metrics, timings) other views (HTML) render.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputError, UsageError
from .metrics import Tolerance
from .model_io import same_file, save_model
from .model_stats import model_stats
from .pass_base import PassContext
from .registry import Registry, default_registry
from .report import write_report
from .spec import PassSpec
from .split_export import (MANIFEST_NAME, check_stage, file_sha256, manifest_dict, plan_split, stage_model,
                           value_types)
from .stitch import StageChain, StitchCheck, compare_outputs, merge_stages, model_outputs, read_manifest


@dataclass
class SplitResult:
    ok: bool
    outdir: Path
    manifest: dict
    pass_spec: str
    pass_stats: dict
    stitch: StitchCheck
    seconds: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The split as plain data: stages (files, partition, nodes, params, cost, IO), balance, stitch-back."""
        balance = {k: self.pass_stats[k] for k in ("by", "stage_costs", "total_cost", "ideal_cost", "max_over_ideal")
                   if k in self.pass_stats}
        return {"ok": self.ok, "outdir": str(self.outdir), "pass": self.pass_spec, "pass_stats": self.pass_stats,
                "balance": balance, "stages": [{k: v for k, v in s.items()} for s in self.manifest["stages"]],
                "tensors": self.manifest["tensors"], "stitch": self.stitch.as_dict(), "seconds": self.seconds}


@dataclass
class MergeResult:
    ok: bool
    output: Path | None
    against_stages: StitchCheck
    against_original: StitchCheck | None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"ok": self.ok, "output": str(self.output) if self.output else None,
                "against_stages": self.against_stages.as_dict(),
                "against_original": self.against_original.as_dict() if self.against_original else None,
                "notes": self.notes}


def split_spec(at: list[str] | None = None, stages: int | None = None, by: str = "params",
               supported_ops: list[str] | None = None, registry: Registry | None = None) -> PassSpec:
    """The split pass for one of the three modes (exactly one must be given)."""
    from .options import build_options

    given = [m for m, v in (("--at", at), ("--stages", stages), ("--supported-ops", supported_ops)) if v]
    if len(given) != 1:
        raise UsageError("split needs exactly one of --at T1,T2, --stages N or --supported-ops FILE"
                         + (f" (got {', '.join(given)})" if given else ""))
    registry = registry or default_registry()
    if at:
        name, raw = "split-at-tensors", {"tensors": tuple(at)}
    elif stages:
        name, raw = "split-stages", {"stages": stages, "by": by}
    else:
        name, raw = "split-supported-ops", {"ops": tuple(supported_ops)}
    return PassSpec(name, build_options(registry.get(name).Options, raw, owner=name))


def read_supported_ops(path: str | Path) -> list[str]:
    """Op specs from a file: JSON (a list, or {"ops": [...]}) or text (one per line or comma-separated, # comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"supported-ops file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read supported-ops file {path}: {exc}") from None
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        ops = data.get("ops") if isinstance(data, dict) else data
        if not isinstance(ops, list) or not all(isinstance(o, str) for o in ops):
            raise InputError(f"{path}: expected a JSON list of op names or {{\"ops\": [...]}}")
    else:
        ops = [item.strip() for line in text.splitlines() for item in line.split("#", 1)[0].split(",")]
        ops = [o for o in ops if o]
    if not ops:
        raise InputError(f"{path} lists no ops")
    return ops


def check_outdir(outdir: Path, force: bool) -> None:
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"output directory {outdir} is a file")
    if outdir.is_dir() and any(outdir.iterdir()) and not force:
        raise UsageError(f"output directory {outdir} is not empty; choose another or pass --force")


def split_model(model: ir.Model, model_path: str | Path | None, outdir: str | Path, spec: PassSpec,
                feeds: list[dict[str, np.ndarray]], *, force: bool = False, share_weights: bool = False,
                tolerance: Tolerance | None = None, registry: Registry | None = None, progress=None) -> SplitResult:
    """Mark partitions on ``model`` with ``spec``'s pass, write the stages and manifest to ``outdir``,
    and chain the stages against the original on ``feeds``. Nothing is written when the split is refused.
    With ``share_weights`` every initializer is stored once in ``outdir/weights.data`` instead of per stage."""
    outdir = Path(outdir)
    check_outdir(outdir, force)
    seconds = {}
    start = time.perf_counter()
    reference = model_outputs(model, feeds)
    seconds["reference"] = time.perf_counter() - start
    context = PassContext(feeds, progress)
    start = time.perf_counter()
    result = spec.make_pass(registry, context)(model)
    plan = plan_split(model)
    types = value_types(model, context.value_shapes(model))
    stage_models = []
    for stage in plan.stages:
        staged = stage_model(model, plan, stage, types)
        check_stage(staged, stage.index)
        stage_models.append(staged)
    seconds["split"] = time.perf_counter() - start
    start = time.perf_counter()
    outdir.mkdir(parents=True, exist_ok=True)
    if force:
        _clear_old_split(outdir)
    protect = (model_path,) if model_path else ()
    files, stats = [], []
    costs = result.stats.get("stage_costs")
    shared = None
    if share_weights:
        from .split_weights import share_initializers

        shared = share_initializers(stage_models, outdir)
    for stage, staged in zip(plan.stages, stage_models):
        target = outdir / f"stage{stage.index}.onnx"
        if shared:
            from .split_weights import save_referencing

            path = save_referencing(staged, target)
        else:
            path = save_model(staged, target, protect=protect)
        files.append(path.name)
        facts = model_stats(staged)
        stats.append({"nodes": facts.nodes, "params": _param_count(staged), "weight_bytes":
                      facts.initializer_bytes + facts.constant_bytes, "ops": facts.ops, "sha256": file_sha256(path),
                      **({"cost": costs[stage.index]} if costs else {})})
    source = {"path": str(Path(model_path).resolve()) if model_path else None,
              "sha256": file_sha256(Path(model_path)) if model_path else None}
    method = {"pass": spec.text(), **{k: v for k, v in result.stats.items() if k in ("by", "stages")}}
    manifest = manifest_dict(plan, files, types, source, method, stats)
    if shared:
        manifest["shared_weights"] = shared
    manifest["_dir"] = str(outdir)
    seconds["export"] = time.perf_counter() - start
    start = time.perf_counter()
    stitched = StageChain(manifest).outputs(feeds)
    check = compare_outputs(reference, stitched, tolerance, "original")
    seconds["stitch"] = time.perf_counter() - start
    manifest.pop("_dir")
    manifest["stitch_check"] = {"equal": check.equal, "feeds": len(feeds)}
    write_report(manifest, outdir / MANIFEST_NAME)
    return SplitResult(check.equal, outdir, manifest, spec.text(), result.stats, check, seconds)


def _param_count(model: ir.Model) -> int:
    from .graph_walk import all_graphs

    total = 0
    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            if value.const_value is not None and value.const_value.shape is not None:
                total += int(np.prod(value.const_value.shape))
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and "value" in node.attributes:
            attr = node.attributes["value"]
            if attr.type == ir.AttributeType.TENSOR:
                total += int(np.prod(attr.value.shape))
    return total


def _clear_old_split(outdir: Path) -> None:
    """With --force: remove what an earlier split wrote here (stage files, their data, the manifest)."""
    from .split_weights import WEIGHTS_NAME

    for path in list(outdir.glob("stage*.onnx")) + list(outdir.glob("stage*.onnx.data")) + [
            outdir / MANIFEST_NAME, outdir / WEIGHTS_NAME]:
        if path.is_file() and not path.is_symlink():
            os.unlink(path)


def merge_manifest(manifest_path: str | Path, output: str | Path, feeds_for, *, tolerance: Tolerance | None = None,
                   force: bool = False) -> MergeResult:
    """Rebuild one model from a manifest's stages; check it against the chained stages and, when the
    manifest's source model is still there unchanged (same sha256), against it. ``feeds_for(model)``
    makes the feeds. The model is written only when both checks hold."""
    manifest = read_manifest(manifest_path)
    output = Path(output)
    stage_files = [Path(manifest["_dir"]) / s["file"] for s in manifest["stages"]]
    for path in stage_files:
        if output.exists() and same_file(output, path):
            raise UsageError(f"refusing to overwrite stage file {path}; choose another -o path")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; choose another -o path or pass --force")
    merged = merge_stages(manifest)
    feeds = feeds_for(merged)
    chained = StageChain(manifest).outputs(feeds)
    against_stages = compare_outputs(chained, model_outputs(merged, feeds), tolerance, "stages")
    against_original, notes = None, []
    source = manifest.get("source") or {}
    original = Path(source["path"]) if source.get("path") else None
    if original is not None and original.is_file() and source.get("sha256") == file_sha256(original):
        if output.exists() and same_file(output, original):
            raise UsageError(f"refusing to overwrite the original model {original}")
        against_original = compare_outputs(model_outputs(original, feeds), model_outputs(merged, feeds),
                                           tolerance, "original")
    else:
        notes.append("the original model is not where the manifest says (or changed): checked against the stages only")
    ok = against_stages.equal and (against_original is None or against_original.equal)
    written = None
    if ok:
        protect = tuple(stage_files) + ((original,) if original is not None and original.is_file() else ())
        written = save_model(merged, output, protect=protect)
    return MergeResult(ok, written, against_stages, against_original, notes)


def print_split(result: SplitResult) -> None:
    """One line per stage, then the balance and the stitch-back verdict."""
    data = result.as_dict()
    cost_name = data["balance"].get("by")
    for stage in data["stages"]:
        cost = f", {cost_name} {stage['cost']:.4g}" if "cost" in stage else ""
        print(f"stage {stage['index']} [{stage['partition']}] {stage['file']}: {stage['nodes']} nodes, "
              f"{stage['params']:,} params{cost}; in {len(stage['inputs'])}, out {len(stage['outputs'])}")
    if "max_over_ideal" in data["balance"]:
        print(f"largest stage / ideal: {data['balance']['max_over_ideal']:.3f}")
    worst = max((m.get("max_abs") or 0.0 for m in result.stitch.metrics.values()), default=0.0)
    print(f"stitch-back vs original: {'exact' if result.stitch.equal else 'DIFFERENT'} (max abs {worst:.3g}); "
          f"split {result.seconds.get('split', 0):.2f} s, stitch {result.seconds.get('stitch', 0):.2f} s")
