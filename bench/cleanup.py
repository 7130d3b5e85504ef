"""Benchmark: onnxopt's `cleanup` against onnxslim and onnxscript's optimizer on the zoo models.

Per model and tool: tool time and peak RSS (each run in a fresh process; the tools take
turns, `--repeat` rounds, median time and highest RSS), node count after, ORT CPU latency
after (1 thread, optimized session, median of alternated rounds), and the max abs output
difference against the original (ORT optimizations disabled). onnxopt runs with
`--validate off` for the time comparison (its time with per-pass validation on the model's
sample feeds is shown separately): the peers do not validate.

    python bench/cleanup.py [--models ppocr_cls silero_vad ...] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

TOOLS = ("onnxopt", "onnxslim", "onnxscript")


def worker(tool: str, source: str, target: str, validate: str) -> None:
    start = time.perf_counter()
    if tool == "onnxopt":
        from onnxopt import api

        data = None if validate == "off" else validate  # validate names the feeds directory
        result = api.optimize(source, target, ["cleanup"], validate="off" if data is None else "each", data=data)
        if not result.ok:
            raise SystemExit(api.failure_summary(result.run))
    elif tool == "onnxslim":
        import onnxslim

        import onnx

        onnx.save(onnxslim.slim(source), target)
    elif tool == "onnxscript":
        import onnx
        import onnxscript.optimizer

        onnx.save(onnxscript.optimizer.optimize(onnx.load(source)), target)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_rss_mb": common.peak_rss_mb()}))


def bench_model(name: str, path: Path, workdir: Path, repeat: int) -> list[dict]:
    import numpy as np
    import onnx
    from onnxopt.models.feeds import sample_feeds

    feeds = sample_feeds(name, count=4)
    feed_dir = workdir / f"{name}_feeds"
    feed_dir.mkdir(exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(feed_dir / f"{index:03d}.npz", **feed)
    reference = common.outputs(path, feeds)
    original_nodes = common.count_nodes(onnx.load(path, load_external_data=False))
    runs: dict[str, list[dict]] = {tool: [] for tool in TOOLS}
    for _ in range(repeat):  # tools take turns so load on the shared machine hits all alike
        for tool in TOOLS:
            target = workdir / f"{name}.{tool}.onnx"
            runs[tool].append(common.run_child(Path(__file__), [tool, str(path), str(target), "off"]))
    rows, outputs = [], {"original": path}
    for tool in TOOLS:
        target = workdir / f"{name}.{tool}.onnx"
        good = [r for r in runs[tool] if "error" not in r]
        row = {"model": name, "tool": tool, "nodes_before": original_nodes}
        if not good:
            row["error"] = runs[tool][0]["error"]
        else:
            row["seconds"] = statistics.median(r["seconds"] for r in good)
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in good)
            row["nodes_after"] = common.count_nodes(onnx.load(target, load_external_data=False))
            row["max_abs_diff"] = common.max_abs_diff(reference, common.outputs(target, feeds))
            outputs[tool] = target
        rows.append(row)
    validated = common.run_child(Path(__file__), ["onnxopt", str(path), str(workdir / "v.onnx"), str(feed_dir)])
    rows[0]["validated_seconds"] = validated.get("seconds")
    if "error" in validated:
        rows[0]["error"] = f"validated run: {validated['error']}"
    latency = common.alternated_latency_ms(outputs, feeds[0])
    for row in rows:
        row["ort_ms"] = latency.get(row["tool"])
        row["ort_ms_original"] = latency["original"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of alternated tool runs (median time)")
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "SRC", "DST", "VALIDATE"))
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return 0
    from onnxopt.models import zoo

    names = args.models or list(zoo.ZOO)
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        for name in names:
            path = zoo.cached_path(name)
            if path is None:
                print(f"skip {name}: not fetched (run `onnxopt zoo fetch {name}`)", file=sys.stderr)
                continue
            rows.extend(bench_model(name, path, Path(tmp), args.repeat))
    columns = ["model", "tool", "nodes_before", "nodes_after", "seconds", "validated_seconds", "peak_rss_mb",
               "ort_ms", "ort_ms_original", "max_abs_diff", "error"]
    common.print_table(rows, columns)
    _print_verdict(rows)
    return 0


def _print_verdict(rows: list[dict]) -> None:
    """The target: node count and tool time no worse than onnxslim's, outputs unchanged."""
    by_model: dict[str, dict[str, dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], {})[row["tool"]] = row
    for model, tools in by_model.items():
        ours, slim = tools.get("onnxopt", {}), tools.get("onnxslim", {})
        if "nodes_after" not in ours or "nodes_after" not in slim:
            print(f"{model}: cannot compare ({ours.get('error') or slim.get('error')})")
            continue
        node_ratio = ours["nodes_after"] / max(slim["nodes_after"], 1)
        time_ratio = ours["seconds"] / max(slim["seconds"], 1e-9)
        unchanged = ours["max_abs_diff"] <= 1e-4
        verdict = "MEETS" if node_ratio <= 1 and time_ratio <= 1 and unchanged else "MISSES"
        print(f"{model}: nodes onnxopt/onnxslim {node_ratio:.3f}, time ratio {time_ratio:.2f}, "
              f"max_abs_diff {ours['max_abs_diff']:.2g} -> {verdict} target")


if __name__ == "__main__":
    sys.exit(main())
