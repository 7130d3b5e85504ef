"""Run reports: a versioned JSON document and the same summary as a terminal table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .reproducer import versions
from .runner import RunResult, _jsonable
from .target import choices_text

REPORT_VERSION = 1


def build_report(result: RunResult, *, model_path: str | None, output_path: str | None,
                 inputs: dict, budget: str, validate: str, data_source: str) -> dict:
    final = None
    if result.final is not None:
        final = {"feeds": result.final_feeds, "count": result.final.feeds, "equal": result.final.equal,
                 "breaches": result.final.breaches, "error": result.final.error,
                 "metrics": _jsonable(result.final.metrics)}
    return {
        "report_version": REPORT_VERSION,
        "tool": "onnxopt",
        "versions": versions(),
        "model": model_path,
        "output": output_path,
        "pipeline": result.pipeline,
        "validate": validate,
        "budget": budget,
        "target": result.target,
        "inputs": {"source": data_source, "feeds": inputs.get("count"), "eval_feeds": inputs.get("eval_count"),
                   "signature": inputs.get("signature")},
        "outputs": _outputs(result.roles, budget),
        "ok": result.ok,
        "crash": result.crash,
        "reproducer": result.reproducer,
        "structure_problems": result.structure_problems,
        "notes": result.notes,
        "passes": [dataclasses.asdict(step) for step in result.steps],
        "final_validation": final,
        "final_speed": result.speed,
    }


def _outputs(roles: dict, budget_text: str) -> dict:
    """Each output's role (declared or inferred, and why) and the floors it is held to."""
    from .metrics import Budget
    from .roles import OutputRole

    budget = Budget.parse(budget_text or "none")
    outputs = {}
    for name, info in roles.items():
        role = OutputRole(info["role"], info["declared"], info["why"], info["params"], info["floors"])
        outputs[name] = dict(info) | {"limits": budget.limits_for(role)}
    return outputs


def write_report(report: dict, path: str | Path) -> Path:
    """Write the JSON report atomically."""
    from .model_io import write_atomically

    text = json.dumps(report, indent=2, default=str) + "\n"
    return write_atomically(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fmt_metric(metrics: dict | None) -> str:
    """Worst-output fidelity in a few characters: "exact", or SNR and cosine."""
    if not metrics:
        return "-"
    worst_abs, worst_cos, worst_snr = 0.0, 1.0, float("inf")
    for values in metrics.values():
        worst_abs = max(worst_abs, _num(values.get("max_abs"), 0.0))
        worst_cos = min(worst_cos, _num(values.get("cosine"), 1.0))
        worst_snr = min(worst_snr, _num(values.get("snr_db"), float("inf")))
    if worst_abs == 0.0:
        return "exact"
    if worst_snr == float("inf"):
        return f"max|d| {worst_abs:.2g}"
    return f"snr {worst_snr:.1f}dB cos {worst_cos:.5f}"


def _num(value, default: float) -> float:
    if value is None:
        return default
    return float(value)


def render_table(report: dict, console=None) -> None:
    """Print the per-pass summary with rich (to stdout unless a console is given)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=130)
    table = Table(title=f"onnxopt: {len(report['passes'])} passes", title_justify="left")
    for column in ("#", "pass", "status", "time", "nodes", "weights", "fidelity"):
        table.add_column(column, justify="right" if column in ("#", "time") else "left",
                         no_wrap=column != "pass", min_width=16 if column == "pass" else None,
                         overflow="fold")
    reasons = []
    for step in report["passes"]:
        before, after = step.get("before") or {}, step.get("after") or {}
        nodes = f"{before.get('nodes', '-')}→{after.get('nodes', '-')}" if before else "-"
        weights = (f"{_mb(before.get('initializer_bytes', 0) + before.get('constant_bytes', 0))}→"
                   f"{_mb(after.get('initializer_bytes', 0) + after.get('constant_bytes', 0))}") if before else "-"
        style = {"ok": "green", "skipped": "dim", "rolled_back": "yellow", "failed": "red"}[step["status"]]
        status = step["status"] if step["modified"] or step["status"] != "ok" else "ok (no change)"
        table.add_row(str(step["index"]), step["spec"], f"[{style}]{status}[/{style}]", f"{step['seconds']:.2f}s",
                      nodes, weights, _fmt_metric(step.get("fidelity_metrics")))
        if step.get("kernel_choices") and step["status"] == "ok" and step["modified"]:
            reasons.append(f"#{step['index']} {step['name']}: {choices_text(step['kernel_choices'])}")
        if step.get("speed") and step["status"] == "ok":
            reasons.append(f"#{step['index']} {step['name']}: {_speed_summary(step['speed'])}")
        if step.get("reason") and step["status"] != "skipped":
            reasons.append(f"#{step['index']} {step['name']}: {step['reason']}")
        elif step.get("fallback") and step["status"] == "ok":
            reasons.append(f"#{step['index']} {step['name']}: {_fallback_summary(step['fallback'])}")
    target = report.get("target")
    if target:
        console.print(f"target: {_target_line(target)}", markup=False)
    console.print(table)
    for name, info in (report.get("outputs") or {}).items():
        limits = ", ".join(f"{k}{'<=' if k in ('max_abs', 'max_rel') else '>='}{v:g}"
                           for k, v in info.get("limits", {}).items()) or "no budget"
        how = "declared" if info["declared"] else f"inferred: {info['why']}"
        console.print(f"output {name}: {info['role']} ({how}); {limits}", markup=False)
    for reason in reasons:
        console.print(reason, markup=False)
    final = report.get("final_validation")
    if final:
        where = f" on {final.get('count')} {final.get('feeds')} feeds" if final.get("feeds") else ""
        console.print(f"final validation{where}: {'ok' if not final['breaches'] and not final['error'] else 'FAILED'} "
                      f"{_fmt_metric(final.get('metrics'))}", markup=False)
        for breach in (final.get("breaches") or [])[:3]:
            console.print(f"  {breach}", markup=False)
    for note in report.get("notes", []):
        console.print(f"note: {note}", markup=False)


def _speed_summary(speed: dict) -> str:
    """``1.42x the speed of the model before it (ORT, 1 thread)``, with the placement the search took."""
    threads = speed.get("threads", 1)
    text = f"{_num(speed['speedup'], 0.0):.2f}x the speed of the model before it (ORT, {threads} thread" \
           f"{'s' if threads != 1 else ''})"
    if speed.get("placement"):
        text += f" with {speed['placement']} (first placement {_num(speed.get('first_speedup'), 0.0):.2f}x)"
    if speed.get("slower_than_reference"):
        text += ": slower"
    return text


def _target_line(target: dict) -> str:
    """``avx512-vnni (auto: AMD EPYC; avx2 avx512_vnni), 1 thread``."""
    how = target.get("chosen_by", "")
    detail = "; ".join(p for p in (target.get("cpu"), " ".join(target.get("flags") or ())) if p)
    threads = target.get("threads", 1)
    return f"{target['name']} ({how}{': ' + detail if detail else ''}), {threads} thread{'s' if threads != 1 else ''}"


def _fallback_summary(fallback: dict) -> str:
    """One line on what mixed precision moved: "2 nodes to int16 activations, 1 kept in float (5 trials)"."""
    moved = []
    if fallback.get("promoted_nodes"):
        moved.append(f"{len(fallback['promoted_nodes'])} nodes to {fallback['precision']}")
    moved.append(f"{len(fallback.get('float_nodes') or [])} kept in float")
    line = f"mixed precision to the budget: {', '.join(moved)} ({len(fallback.get('trials') or [])} trials)"
    holdout = fallback.get("holdout") or {}
    if holdout.get("held_out_feeds"):
        climbed = f", after climbing {holdout.get('climb_trials', 0)} trials" if holdout.get("climbed") else ""
        line += (f"; chosen on {holdout['search_feeds']} feeds, confirmed on {holdout['held_out_feeds']} held-out"
                 f"{climbed}")
    elif holdout.get("note"):
        line += f"; nothing held out ({holdout['search_feeds']} feeds)"
    return line


def _mb(count: int) -> str:
    if count >= 1 << 20:
        return f"{count / (1 << 20):.1f}MB"
    return f"{count / 1024:.0f}KB"
