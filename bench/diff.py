"""`onnxopt diff` with every tensor compared, on the largest fetched model, against Polygraphy.

A is PP-OCRv4 rec (fp32), B is its `quantize-weights:bits=8` copy (tensor names kept, so both
tools compare the same tensors). Both tools get the same 4 text-line feeds and run in fresh
child processes, taking turns; the table gives the median time and highest peak RSS.

- onnxopt: `api.diff(A, B, tensors=True)`: a bounded chunk of tensors is exposed per ORT
  session (optimizations off), compared with running statistics, and dropped; `onnxopt` with
  the default 256 MB of exposed tensors per chunk, `onnxopt-64mb` with `--memory-mb 64`.
- Polygraphy (when installed): its per-layer compare, `ModifyOutputs(outputs=MARK_ALL)` on both
  models, `Comparator.run` over the feeds, then `Comparator.compare_accuracy`; every tensor of
  every feed is held at once.

Usage: python bench/diff.py [--repeat 3] [--samples 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_lines, peak_rss_mb, print_table, run_child  # noqa: E402

MODEL = "ppocr_rec_v4"


def _worker(tool: str, a: str, b: str, data: str) -> None:
    start = time.perf_counter()
    if tool.startswith("onnxopt"):
        from onnxopt import api

        budget = float(tool.split("-")[1].removesuffix("mb")) if "-" in tool else 256.0
        result = api.diff(a, b, tensors=True, data=data, memory_budget_mb=budget)
        compared, diverged = result["tensors"]["compared"], result["tensors"]["diverged"]
    else:
        from polygraphy import constants
        from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, CompareFunc

        with np.load(data) as archive:
            feeds = [{k: archive[k][i] for k in archive.files} for i in range(len(archive[archive.files[0]]))]
        runners = [OnnxrtRunner(SessionFromOnnx(BytesFromOnnx(ModifyOutputs(OnnxFromPath(p), outputs=constants.MARK_ALL))),
                                name=n)
                   for n, p in (("a", a), ("b", b))]
        results = Comparator.run(runners, data_loader=feeds)
        accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=1e-5, rtol=1e-4))
        iterations = accuracy[0][("a", "b")]  # one dict of output name -> match per feed
        compared = len(iterations[0])
        diverged = sum(1 for name in iterations[0] if not all(bool(it[name]) for it in iterations))
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(),
                      "compared": compared, "diverged": diverged}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("TOOL", "A", "B", "DATA"), help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4)
    args = parser.parse_args()
    if args.worker:
        _worker(*args.worker)
        return
    from onnxopt import api
    from onnxopt.models import cached_path, feeds as zoo_feeds

    source = cached_path(MODEL)
    if source is None:
        sys.exit(f"{MODEL} is not fetched: run `onnxopt zoo fetch {MODEL}`")
    tools = ["onnxopt", "onnxopt-64mb"]
    try:
        import polygraphy  # noqa: F401

        tools.append("polygraphy")
    except ImportError:
        print("polygraphy is not installed (pip install polygraphy onnx-graphsurgeon): onnxopt only")
    print("\n".join(machine_lines()))
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-diff-") as tmp:
        b = Path(tmp) / "b.onnx"
        api.optimize(source, b, ["quantize-weights:bits=8"], budget="none", validate="off")
        # text lines padded (edge values) to the widest, 320 px, so the feeds stack into one .npz
        lines = [f["x"] for f in zoo_feeds.sample_feeds(MODEL, args.samples, seed=0)]
        width = max(x.shape[-1] for x in lines)
        feeds = [{"x": np.pad(x, [(0, 0)] * 3 + [(0, width - x.shape[-1])], mode="edge")} for x in lines]
        data = Path(tmp) / "feeds.npz"
        np.savez(data, x=np.stack([f["x"] for f in feeds]))
        size = Path(source).stat().st_size / 2**20
        print(f"A {MODEL} ({size:.1f} MB), B its quantize-weights:bits=8 copy; {len(feeds)} feeds of {feeds[0]['x'].shape}")
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        for _ in range(args.repeat):
            for tool in tools:
                runs[tool].append(run_child(Path(__file__), [tool, str(source), str(b), str(data)]))
    rows = []
    for tool, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            rows.append({"tool": tool, "error": results[0]["error"]})
            continue
        rows.append({"tool": tool, "seconds": statistics.median(r["seconds"] for r in ok),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in ok), "compared": ok[0]["compared"],
                     "diverged": ok[0]["diverged"], "runs": len(ok)})
    peer = next((r for r in rows if r["tool"] == "polygraphy" and "seconds" in r), None)
    for row in rows:
        if peer is not None and row is not peer and "seconds" in row:
            row["time_vs_polygraphy"] = row["seconds"] / peer["seconds"]
            row["rss_vs_polygraphy"] = row["peak_rss_mb"] / peer["peak_rss_mb"]
    print_table(rows, ["tool", "seconds", "peak_rss_mb", "compared", "diverged", "runs", "time_vs_polygraphy",
                       "rss_vs_polygraphy", "error"])


if __name__ == "__main__":
    main()
