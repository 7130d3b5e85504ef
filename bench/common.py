"""Shared benchmark plumbing: child-process tool runs with peak RSS, alternated latency timing."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort


def run_child(script: Path, args: list[str]) -> dict:
    """Run ``script --worker ARGS`` in a fresh process; it prints one JSON line (seconds, peak_rss_mb)."""
    proc = subprocess.run([sys.executable, str(script), "--worker", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm")


def machine_lines() -> list[str]:
    """The CPU model, its integer-kernel ISA flags, cores, library versions and onnxopt's detected target."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "Hardware") and model == "unknown CPU":
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    import os

    lines = [f"CPU: {model}, {os.cpu_count()} logical cores; ISA: "
             + (" ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)),
             f"onnx {onnx.__version__}, onnxruntime {ort.__version__}"]
    try:
        from onnxopt import target  # the target helper's module; absent in older trees
    except ImportError:
        lines.append("target: (onnxopt.target not available)")
    else:
        lines.append(f"target: {target_line(target)}")
    return lines


def target_line(target) -> str:
    """onnxopt's auto-detected target: name, summary, how it was chosen."""
    found = target.resolve("auto")
    return f"{found.name} ({found.summary}; chosen by {found.chosen_by})"


def peak_rss_bytes() -> int:
    """Peak RSS of this process image: VmHWM where Linux has it, else getrusage's ru_maxrss.

    getrusage(RUSAGE_SELF).ru_maxrss is not used on Linux because it keeps the high-water
    mark of the pre-exec image, i.e. of the parent that forked us: a child of a 400 MB
    parent reports 400 MB before doing anything. VmHWM belongs to the exec'd image only.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_rss_mb() -> float:
    return peak_rss_bytes() / (1 << 20)


def count_nodes(proto: onnx.ModelProto) -> int:
    def graph_nodes(graph) -> int:
        total = 0
        for node in graph.node:
            total += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    total += graph_nodes(attr.g)
                for sub in attr.graphs:
                    total += graph_nodes(sub)
        return total

    return graph_nodes(proto.graph) + sum(len(f.node) for f in proto.functions)


def session(path: Path, threads: int = 1, optimized: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def outputs(path: Path, feeds: list[dict], optimized: bool = False) -> list[list[np.ndarray]]:
    sess = session(path, optimized=optimized)
    return [sess.run(None, feed) for feed in feeds]


def max_abs_diff(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    worst = 0.0
    for ref_outs, cand_outs in zip(reference, candidate):
        for ref, cand in zip(ref_outs, cand_outs):
            if ref.shape != cand.shape:
                return float("inf")
            if ref.size:
                worst = max(worst, float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64)))))
    return worst


def alternated_latency_ms(paths: dict[str, Path], feed: dict, threads: int = 1, rounds: int = 7,
                          per_round: int | None = 5, max_per_round: int = 1000,
                          reference: str = "fp32") -> dict[str, float]:
    """Median per-run latency (ms) of each model, timing the models in turn in one process; each
    round rotates which model goes first. ``per_round=None``: as many runs per round as take
    about 50 ms of the ``reference`` model (the first model when there is none of that name),
    at most ``max_per_round``."""
    sessions = {name: session(path, threads) for name, path in paths.items()}
    for sess in sessions.values():
        for _ in range(2):
            sess.run(None, feed)
    if per_round is None:
        start = time.perf_counter()
        sessions.get(reference, next(iter(sessions.values()))).run(None, feed)
        per_round = max(1, min(max_per_round, int(0.05 / max(time.perf_counter() - start, 1e-6))))
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    for index in range(rounds):
        for name in order[index % len(order):] + order[:index % len(order)]:
            start = time.perf_counter()
            for _ in range(per_round):
                sessions[name].run(None, feed)
            samples[name].append((time.perf_counter() - start) * 1000 / per_round)
    return {name: statistics.median(values) for name, values in samples.items()}


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_cell(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_cell(row.get(c)).ljust(widths[c]) for c in columns))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)

