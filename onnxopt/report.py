"""Run reports: a versioned JSON document and the same summary as a terminal table."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from .reproducer import versions
from .runner import RunResult, _jsonable

REPORT_VERSION = 1


def build_report(result: RunResult, *, model_path: str | None, output_path: str | None,
                 inputs: dict, budget: str, validate: str, data_source: str) -> dict:
    final = None
    if result.final is not None:
        final = {"equal": result.final.equal, "breaches": result.final.breaches,
                 "error": result.final.error, "metrics": _jsonable(result.final.metrics)}
    return {
        "report_version": REPORT_VERSION,
        "tool": "onnxopt",
        "versions": versions(),
        "model": model_path,
        "output": output_path,
        "pipeline": result.pipeline,
        "validate": validate,
        "budget": budget,
        "inputs": {"source": data_source, "feeds": inputs.get("count"), "signature": inputs.get("signature")},
        "ok": result.ok,
        "crash": result.crash,
        "reproducer": result.reproducer,
        "notes": result.notes,
        "passes": [dataclasses.asdict(step) for step in result.steps],
        "final_validation": final,
    }


def write_report(report: dict, path: str | Path) -> Path:
    """Write the JSON report atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(tmp, path)
    return path


def _fmt_metric(metrics: dict | None) -> str:
    if not metrics:
        return "-"
    worst_abs, worst_cos, worst_snr = 0.0, 1.0, None
    for values in metrics.values():
        worst_abs = max(worst_abs, _num(values.get("max_abs")))
        if values.get("cosine") is not None:
            worst_cos = min(worst_cos, _num(values.get("cosine")))
        if values.get("snr_db") is not None:
            snr = _num(values.get("snr_db"))
            worst_snr = snr if worst_snr is None else min(worst_snr, snr)
    snr_text = "" if worst_snr is None else (" snr inf" if worst_snr == float("inf") else f" snr {worst_snr:.1f}dB")
    return f"max|d| {worst_abs:.2g} cos {worst_cos:.5f}{snr_text}"


def _num(value) -> float:
    if value is None:
        return 0.0
    return float(value)


def render_table(report: dict, console=None) -> None:
    """Print the per-pass summary with rich (to stdout unless a console is given)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"onnxopt: {report['pipeline'] or '(no passes)'}")
    for column in ("#", "pass", "status", "changed", "seconds", "nodes", "weights", "fidelity"):
        table.add_column(column, justify="right" if column in ("#", "seconds") else "left")
    for step in report["passes"]:
        before, after = step.get("before") or {}, step.get("after") or {}
        nodes = f"{before.get('nodes', '-')}→{after.get('nodes', '-')}" if before else "-"
        weights = (f"{_mb(before.get('initializer_bytes', 0) + before.get('constant_bytes', 0))}→"
                   f"{_mb(after.get('initializer_bytes', 0) + after.get('constant_bytes', 0))}") if before else "-"
        status = step["status"] if not step.get("reason") else f"{step['status']}: {step['reason']}"
        style = {"ok": "green", "skipped": "dim", "rolled_back": "yellow", "failed": "red"}[step["status"]]
        table.add_row(str(step["index"]), step["spec"], f"[{style}]{status}[/{style}]",
                      "yes" if step["modified"] else "no", f"{step['seconds']:.2f}", nodes, weights,
                      _fmt_metric(step.get("fidelity_metrics")))
    console.print(table)
    final = report.get("final_validation")
    if final:
        console.print(f"final validation: {'ok' if not final['breaches'] and not final['error'] else 'FAILED'} "
                      f"{_fmt_metric(final.get('metrics'))}")
    for note in report.get("notes", []):
        console.print(f"note: {note}")


def _mb(count: int) -> str:
    if count >= 1 << 20:
        return f"{count / (1 << 20):.1f}MB"
    return f"{count / 1024:.0f}KB"
