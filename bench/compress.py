"""Benchmark: onnxopt compression (pruning) against onnxsim's structured pruning, in one run.

Models: the fetched PP-OCRv4 det and rec, PP-OCR cls, and the bundled CNN from ``models/``
(Conv+BN, a residual block, a Concat of two branches, a Gemm head). Every model is first
cleaned with ``-p cleanup`` (weights lifted to initializers, BatchNorm folded: onnxsim's
pruning expects that); the cleaned model is the fp32 reference and the input of every
candidate.

Candidates come from ``CANDIDATES`` (name -> what the worker runs), each in a fresh child
process (tool seconds and peak RSS of the child). Add a row there to benchmark another
pass (``{"tool": "onnxopt", "passes": [...]}``) or peer (``{"tool": "NAME", ...}`` handled in
``worker``). onnxopt runs through ``onnxopt.api.optimize`` with the calibration directory as
``data``, ``--budget none`` (report only) and ``validate="end"``.

Metrics against the reference, measured on evaluation feeds (seed 1) no tool saw:

* ``params``: parameters / reference parameters (float initializer and Constant elements);
* ``size``: file size / reference file size;
* ``lat1``: candidate latency / reference latency in ORT (CPU, all graph optimizations,
  1 intra-op thread; < 1 is faster), median of rounds that time all candidates alternately;
* ``flops``: estimated FLOPs / reference FLOPs (Conv/Gemm/MatMul multiply-accumulates);
* ``agree``: task agreement with the reference (``bench/tasks.py``), ``cosine`` over the set;
* ``valid``: the candidate passes onnx's checker and runs in ORT.

Then one verdict line per model against ``TARGETS``.

    python bench/compress.py [--models ppocr_cls cnn ...] [--candidates ...] [--quick] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tasks  # noqa: E402

MODELS = ("ppocr_det_v4", "ppocr_rec_v4", "ppocr_cls", "cnn")
TARGETS = {"params": 0.52, "lat1": 0.60}

# name -> job. "tool": onnxopt (passes through the runner) or a peer handled in worker().
CANDIDATES: dict[str, dict] = {
    "onnxopt-channels-0.5": {"tool": "onnxopt", "passes": ["prune-channels:ratio=0.5", "drop-pruned-initializers"]},
    "onnxopt-channels-0.5-rec": {"tool": "onnxopt", "passes": [
        "prune-channels:ratio=0.5,reconstruct=true", "drop-pruned-initializers"]},
    "onnxopt-channels-0.5-act-rec": {"tool": "onnxopt", "passes": [
        "prune-channels:ratio=0.5,criterion=activation,reconstruct=true", "drop-pruned-initializers"]},
    # Lighter pruning, for comparing with onnxsim at equal or fewer parameters (it prunes less).
    "onnxopt-channels-0.1-act-rec": {"tool": "onnxopt", "passes": [
        "prune-channels:ratio=0.1,criterion=activation,reconstruct=true", "drop-pruned-initializers"]},
    "onnxopt-channels-0.25-act-rec": {"tool": "onnxopt", "passes": [
        "prune-channels:ratio=0.25,criterion=activation,reconstruct=true", "drop-pruned-initializers"]},
    "onnxopt-weights-0.5-packed": {"tool": "onnxopt", "passes": ["prune-weights:sparsity=0.5,storage=packed"]},
    "onnxsim-structured-0.5": {"tool": "onnxsim-structured", "sparsity": 0.5},
}
RECONSTRUCTED = ("onnxopt-channels-0.5-rec", "onnxopt-channels-0.5-act-rec", "onnxopt-channels-0.1-act-rec",
                 "onnxopt-channels-0.25-act-rec")


# --- the child process --------------------------------------------------------------------

def worker(job: dict) -> None:
    start = time.perf_counter()
    result: dict = {}
    if job["tool"] == "onnxopt":
        from onnxopt import api

        run = api.optimize(job["src"], job["dst"], job["passes"], data=job["calib"], budget="none",
                           validate="end")
        result = {"ok": run.ok, "note": _failure(run)}
    elif job["tool"] == "onnxsim-structured":
        import onnx
        import onnxsim

        pruned = onnxsim.apply_structured_pruning(onnx.load(job["src"]), sparsity=job["sparsity"])
        onnx.save(pruned, job["dst"])
    else:
        raise SystemExit(f"unknown tool {job['tool']}")
    result |= {"seconds": time.perf_counter() - start, "peak_rss_mb": common.peak_rss_mb()}
    print(json.dumps(result))


def _failure(run) -> str | None:
    if run.ok:
        return None
    from onnxopt.api import failure_summary

    return failure_summary(run)


# --- the parent ---------------------------------------------------------------------------

def source_model(name: str, workdir: Path) -> Path:
    """The cleaned fp32 reference for ``name``."""
    import onnx

    from onnxopt import api

    if name == "cnn":
        from onnxopt.models.builders import build_cnn

        raw = workdir / "cnn_raw.onnx"
        onnx.save(build_cnn(), raw)
    else:
        from onnxopt.models import zoo

        raw = zoo.cached_path(name)
        if raw is None:
            raise SystemExit(f"{name} is not fetched: run `onnxopt zoo fetch {name}`")
    out = workdir / f"{name}.onnx"
    run = api.optimize(raw, out, ["cleanup"], budget="none", validate="off")
    run.raise_for_status()
    return out


def save_feeds(feeds: list[dict], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(directory / f"{index:04d}.npz", **feed)
    return directory


def estimate(path: Path, feed: dict) -> dict:
    import onnx_ir as ir

    from onnxopt.model_stats import compute_estimate

    return compute_estimate(ir.load(str(path)), {k: np.shape(v) for k, v in feed.items()})


def valid(path: Path, feed: dict) -> tuple[str | None, str | None]:
    """(error, note): the error when onnx's checker rejects the model or ORT cannot run it;
    a note when only onnx's strict shape inference (full_check) disagrees with its declared
    shapes (stale value_info: ORT trusts its own inference and runs it)."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
        common.session(path, 1).run(None, feed)
    except Exception as exc:  # noqa: BLE001 - the verdict is the message
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}", None
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        return None, f"stale shapes: {str(exc).splitlines()[0][:90]}"
    return None, None


def bench_model(name: str, workdir: Path, calib_count: int, eval_count: int, rounds: int, only) -> list[dict]:
    from onnxopt.models.feeds import sample_feeds, task_of

    task = task_of(name)
    src = source_model(name, workdir)
    calib = save_feeds(sample_feeds(name, calib_count, seed=0), workdir / f"{name}_calib")
    evaluation = sample_feeds(name, eval_count, seed=1)
    paths = {"fp32": src}
    rows = [{"model": name, "tool": "fp32", "metric": tasks.AGREEMENT[task][0]}]
    for cand, spec in CANDIDATES.items():
        if only and cand not in only:
            continue
        dst = workdir / f"{name}_{cand}.onnx"
        job = {**spec, "src": str(src), "dst": str(dst), "calib": str(calib)}
        result = common.run_child(Path(__file__), [json.dumps(job)])
        row = {"model": name, "tool": cand, **{k: result.get(k) for k in ("seconds", "peak_rss_mb")}}
        if result.get("error") or not dst.exists():
            row["error"] = result.get("error") or result.get("note") or "no output written"
        else:
            row["error"], row["note"] = valid(dst, evaluation[0])
            if row["error"] is None:
                paths[cand] = dst
        rows.append(row)
    base = estimate(src, evaluation[0])
    latency = common.alternated_latency_ms(paths, evaluation[0], 1, rounds, per_round=None, max_per_round=200)
    reference = common.outputs(src, evaluation)
    for row in rows:
        path = paths.get(row["tool"])
        if path is None:
            continue
        est = estimate(path, evaluation[0])
        row["params"] = est["parameters"] / base["parameters"]
        row["flops"] = est["flops"] / base["flops"] if est["flops"] and base["flops"] else None
        row["size"] = path.stat().st_size / src.stat().st_size
        row["lat1"] = latency[row["tool"]] / latency["fp32"]
        row["ms"] = latency[row["tool"]]
        if row["tool"] != "fp32":
            outputs = common.outputs(path, evaluation)
            first = [o[0] for o in outputs]
            ref = [r[0] for r in reference]
            row["agree"] = tasks.task_agreement(task, ref, first)[1]
            row["cosine"] = tasks.cosine(ref, first)
    return rows


# --- verdicts -----------------------------------------------------------------------------

def verdicts(rows: list[dict]) -> list[str]:
    """Per model: the plain ratio=0.5 target, and reconstruction against onnxsim."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = {r["tool"]: r for r in rows if r["model"] == model}
        plain = mine.get("onnxopt-channels-0.5")
        if plain is not None:
            if plain.get("params") is None:
                lines.append(f"{model}: prune-channels:ratio=0.5 failed: {plain.get('error')}")
            else:
                ok = plain["params"] <= TARGETS["params"] and plain["lat1"] <= TARGETS["lat1"]
                lines.append(f"{model}: prune-channels:ratio=0.5 params {plain['params']:.3f}x "
                             f"(target <= {TARGETS['params']}), latency {plain['lat1']:.2f}x "
                             f"(target <= {TARGETS['lat1']}), valid graph: {'met' if ok else 'MISSED'}")
        peer = mine.get("onnxsim-structured-0.5")
        recs = [mine[c] for c in RECONSTRUCTED if c in mine and mine[c].get("agree") is not None]
        if peer is None or not recs:
            continue
        if peer.get("agree") is None:
            lines.append(f"{model}: onnxsim gave no usable model ({peer.get('error')})")
            continue
        # reconstruct=true against onnxsim at equal or fewer parameters: the best such candidate
        fewer = [r for r in recs if r["params"] <= peer["params"] + 1e-9]
        if not fewer:
            lines.append(f"{model}: no reconstruct=true candidate at or below onnxsim's {peer['params']:.3f}x params: MISSED")
            continue
        best = max(fewer, key=lambda r: (r["agree"], r["cosine"]))
        better = best["agree"] > peer["agree"]
        tie = best["agree"] == peer["agree"] and best["cosine"] > peer["cosine"]
        verdict = "met" if better else "tie in agreement, higher cosine" if tie else "MISSED"
        lines.append(f"{model}: {best['tool']} agreement {best['agree']:.3f} cos {best['cosine']:.4f} at params "
                     f"{best['params']:.3f}x vs onnxsim {peer['agree']:.3f} cos {peer['cosine']:.4f} at "
                     f"{peer['params']:.3f}x: {verdict}")
    return lines


COLUMNS = ["model", "tool", "params", "size", "flops", "lat1", "ms", "agree", "cosine", "seconds", "peak_rss_mb",
           "error", "note"]
MARKDOWN = {"params": "{:.3f}", "size": "{:.3f}", "flops": "{:.3f}", "lat1": "{:.2f}", "agree": "{:.3f}",
            "cosine": "{:.4f}", "seconds": "{:.1f}"}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| model | tool | " + " | ".join(MARKDOWN) + " | note |", "|" + "---|" * (len(MARKDOWN) + 3)]
    for row in rows:
        cells = ["-" if row.get(c) is None else fmt.format(row[c]) for c, fmt in MARKDOWN.items()]
        if row["tool"] == "fp32":
            cells[4] = f"({row['metric']})"
        note = re.sub(r"\s+", " ", row.get("error") or row.get("note") or "")[:100].replace("|", "/")
        lines.append(f"| {row['model']} | {row['tool']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--candidates", nargs="*", default=None, help=f"only these (fp32 always): {', '.join(CANDIDATES)}")
    parser.add_argument("--quick", action="store_true", help="fewer evaluation samples and latency rounds")
    parser.add_argument("--calib", type=int, default=16, help="calibration feeds (seed 0)")
    parser.add_argument("--eval", type=int, default=None, help="evaluation feeds (seed 1); default 32, quick 8")
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds; default 9, quick 5")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    eval_count = args.eval or (8 if args.quick else 32)
    rounds = args.rounds or (5 if args.quick else 9)
    only = set(args.candidates) if args.candidates else None
    rows: list[dict] = []
    started = time.perf_counter()
    for line in common.machine_lines():
        print(line)
    with tempfile.TemporaryDirectory(prefix="onnxopt-cbench-") as tmp:
        for name in names:
            rows.extend(bench_model(name, Path(tmp), args.calib, eval_count, rounds, only))
    if args.markdown:
        print(markdown_table(rows))
    else:
        common.print_table([{**r, "error": (r.get("error") or "")[:60] or None, "note": (r.get("note") or "")[:40] or None}
                           for r in rows], COLUMNS)
    print()
    for line in verdicts(rows):
        print(line)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; calibration {args.calib} feeds (seed 0), "
          f"evaluation {eval_count} (seed 1), {rounds} latency rounds (1 thread); budget none")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
