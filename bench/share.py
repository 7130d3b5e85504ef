"""Benchmark: weight sharing (merge-identical/similar, cluster-weights) against onnxsim's k-means.

Models: the trained seed MLP from ``models/`` (weight-dominated: 35 KB of weights, evaluated
on its labelled task), the fetched PP-OCRv4 recognizer (10.8 MB, 1x1 convs and linear
layers), the PP-OCR classifier and silero-vad (weights inside If bodies). Each model is first
cleaned with ``-p cleanup`` (weights lifted to initializers), which is the fp32 reference
and the input of every candidate. onnxopt runs through ``api.optimize`` (``validate="end"``,
``--budget none`` unless the row names one); onnxsim 0.8.1's ``quantize_weight_only_kmeans``
(MatMul/Gemm 2-D weights only) runs in the same process when installed.

Columns: ``size`` file / reference; ``size+cleanup`` the candidate's file after onnxopt
``-p cleanup`` / reference (constant folding must not undo a codebook); ``cosine`` and the
task agreement (``bench/tasks.py``; the MLP also its accuracy on labels) on evaluation feeds
(seed 1) no tool saw; ``lat1`` candidate / reference ORT latency, 1 thread, all
optimizations, median of alternated rounds; ``seconds`` tool time in this process;
``exact`` whether every output is bit-identical (the lossless merge must be).

    python bench/share.py [--models mlp ppocr_rec_v4 ...] [--markdown]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tasks  # noqa: E402

MODELS = ("mlp", "ppocr_rec_v4", "ppocr_cls", "silero_vad")
TARGET = {"size": 0.17, "cosine": 0.99}  # cluster-weights:bits=4 on a weight-dominated model
CANDIDATES: dict[str, dict] = {
    "onnxopt-merge-identical": {"passes": ["merge-identical-weights"]},
    "onnxopt-merge-similar": {"passes": ["merge-similar-weights"]},
    "onnxopt-cluster-4": {"passes": ["cluster-weights:bits=4"]},
    "onnxopt-cluster-4-groups": {"passes": ["cluster-weights:bits=4,granularity=per-channel-group"]},
    "onnxopt-cluster-4-budget": {"passes": ["cluster-weights:bits=4"], "budget": "cosine=0.99"},
    "onnxsim-kmeans-4": {"peer": "onnxsim-kmeans", "bits": 4},
}
SMALL = {"mlp": "min_elements=0"}  # the MLP's last layer has 320 weights: cluster it too


def session(path: Path, threads: int = 1) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 4
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    s = session(path)
    return [s.run(None, feed)[0] for feed in feeds]


def cleanup(src: Path, dst: Path) -> Path:
    from onnxopt import api

    api.optimize(src, dst, ["cleanup"], validate="off")
    return dst


def reference_model(name: str, workdir: Path) -> tuple[Path, list[dict], list[dict], np.ndarray | None]:
    from onnxopt.models import builders, sample_feeds, zoo

    raw, labels = workdir / f"{name}_raw.onnx", None
    if name == "mlp":
        onnx.save(builders.build_mlp(), raw)
        x, _ = builders.mlp_task(512, seed=100)
        calibration = [{"x": b} for b in x.reshape(16, 32, 100)]
        x, labels = builders.mlp_task(2000, seed=200)
        evaluation = [{"x": b} for b in x.reshape(20, 100, 100)]
    else:
        path = zoo.cached_path(name)
        if path is None:
            raise FileNotFoundError(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
        raw.write_bytes(path.read_bytes())
        calibration, evaluation = sample_feeds(name, 8, seed=0), sample_feeds(name, 16, seed=1)
    return cleanup(raw, workdir / f"{name}.onnx"), calibration, evaluation, labels


def run_candidate(job: dict, name: str, src: Path, dst: Path, calibration: Path) -> float:
    start = time.perf_counter()
    if "peer" in job:
        import onnxsim

        onnx.save(onnxsim.quantize_weight_only_kmeans(onnx.load(src), bits=job["bits"]), dst)
    else:
        from onnxopt import api

        passes = [p + ("," if ":" in p else ":") + SMALL[name] if name in SMALL and p.startswith("cluster") else p
                  for p in job["passes"]]
        result = api.optimize(src, dst, passes, data=calibration, budget=job.get("budget", "none"),
                              validate="end", keep_going=True)
        if result.output is None:
            raise RuntimeError(f"onnxopt wrote nothing: {result.report['passes'][-1].get('reason')}")
    return time.perf_counter() - start


def latency(paths: dict[str, Path], feed: dict, rounds: int) -> dict[str, float]:
    sessions = {k: session(p) for k, p in paths.items()}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for _ in range(rounds):
        for key, s in sessions.items():  # alternated: every candidate once per round
            s.run(None, feed)
            start = time.perf_counter()
            for _ in range(5):
                s.run(None, feed)
            times[key].append((time.perf_counter() - start) / 5)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, workdir: Path, rounds: int) -> list[dict]:
    from onnxopt.models import task_of

    ref, calibration, evaluation, labels = reference_model(name, workdir)
    calib = workdir / f"{name}_calib"  # one .npz per feed: the shapes differ
    calib.mkdir()
    for i, feed in enumerate(calibration):
        np.savez(calib / f"{i:03d}.npz", **feed)
    task = task_of(name)
    want = outputs(ref, evaluation)
    rows, paths = [], {"fp32": ref}
    base = ref.stat().st_size
    rows.append({"model": name, "tool": "fp32", "size": 1.0, "size_cleanup": 1.0, "cosine": 1.0, "agree": 1.0,
                 "metric": tasks.task_agreement(task, want, want)[0], "exact": True, "seconds": None,
                 "accuracy": _accuracy(want, labels)})
    for cand, job in CANDIDATES.items():
        dst = workdir / f"{name}_{cand}.onnx"
        row = {"model": name, "tool": cand}
        try:
            if "peer" in job:
                import onnxsim  # noqa: F401
            row["seconds"] = run_candidate(job, name, ref, dst, calib)
            got = outputs(dst, evaluation)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is a row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}"
            rows.append(row)
            continue
        cleaned = cleanup(dst, workdir / f"{name}_{cand}_cleanup.onnx")
        row.update(size=dst.stat().st_size / base, size_cleanup=cleaned.stat().st_size / base,
                   cosine=tasks.cosine(want, got), agree=tasks.task_agreement(task, want, got)[1],
                   exact=all(np.array_equal(a, b) for a, b in zip(want, got)), accuracy=_accuracy(got, labels))
        paths[cand] = dst
        rows.append(row)
    largest = max(evaluation, key=lambda f: sum(v.size for v in f.values()))
    timed = latency(paths, largest, rounds)
    for row in rows:
        if row["tool"] in timed:
            row["lat1"] = timed[row["tool"]] / timed["fp32"]
    return rows


def _accuracy(outs: list[np.ndarray], labels: np.ndarray | None) -> float | None:
    if labels is None:
        return None
    return float((np.concatenate(outs).argmax(axis=-1) == labels).mean())


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict], markdown: bool) -> str:
    head = ["model", "tool", "size", "size+cleanup", "lat1", "cosine", "agree", "accuracy", "exact", "seconds", "note"]
    lines = []
    for r in rows:
        agree = f"({r['metric']})" if r["tool"] == "fp32" else fmt(r.get("agree"), ".3f")
        lines.append([r["model"], r["tool"], fmt(r.get("size"), ".3f"), fmt(r.get("size_cleanup"), ".3f"),
                      fmt(r.get("lat1"), ".2f"), fmt(r.get("cosine"), ".4f"), agree, fmt(r.get("accuracy"), ".3f"),
                      "-" if "exact" not in r else ("yes" if r["exact"] else "no"), fmt(r.get("seconds"), ".1f"),
                      r.get("error", "")])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(line[i]) for line in [head] + lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [head] + lines)


def verdicts(rows: list[dict]) -> list[str]:
    out = []
    for row in rows:
        if row["tool"].startswith("onnxopt-cluster-4") and "size" in row:
            ok = row["size"] <= TARGET["size"] and row["cosine"] >= TARGET["cosine"]
            out.append(f"{row['model']} {row['tool']}: size {row['size']:.3f}x (target <= {TARGET['size']}), cosine "
                       f"{row['cosine']:.4f} (>= {TARGET['cosine']}): {'met' if ok else 'MISSED'}")
        if row["tool"] == "onnxopt-merge-identical" and "exact" in row:
            out.append(f"{row['model']} merge-identical: {'lossless' if row['exact'] else 'NOT LOSSLESS'}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    for line in common.machine_lines():
        print(line)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                rows += bench_model(name, Path(tmp), args.rounds)
            except FileNotFoundError as exc:
                print(f"skipped {name}: {exc}")
    print(table(rows, args.markdown))
    for line in verdicts(rows):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
