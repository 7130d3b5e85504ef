"""Analyses measured with ORT for the split passes: tensor shapes and per-node latency.

Passes never create ORT sessions; they ask ``PassContext.value_shapes`` / ``node_latency``,
which call these once per model state (cached until a pass modifies the model). Both run on
the context's feeds, or on generated feeds when it has none.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import ort_run
from .feeds import generate_feeds, input_specs
from .model_io import has_deferred_tensors


def _feeds_for(model: ir.Model, feeds: list[dict] | None, count: int = 1) -> list[dict]:
    return list(feeds[:count]) if feeds else generate_feeds(input_specs(model), count=count, seed=0)


def measure_value_shapes(model: ir.Model, feeds: list[dict] | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of every main-graph input and node output, from one ORT run."""
    proto = ir.to_proto(model)
    present = {o.name for o in proto.graph.output}
    for node in proto.graph.node:
        for name in node.output:
            if name and name not in present:
                proto.graph.output.append(onnx.ValueInfoProto(name=name))
                present.add(name)
    feed = _feeds_for(model, feeds)[0]
    session = ort_run.make_session(ir.serde.deserialize_model(proto))
    outputs = ort_run.run(session, feed)
    shapes = {name: (tuple(a.shape), a.dtype) for name, a in feed.items()}
    for name, array in outputs.items():
        array = np.asarray(array)
        shapes[name] = (tuple(array.shape), array.dtype)
    return shapes


def measure_node_latency(model: ir.Model, feeds: list[dict] | None = None, repeat: int = 5) -> list[float]:
    """Median seconds per run of each main-graph node (graph order), from ORT's profiler.

    The session runs without graph optimizations, so every node is its own kernel; a node's
    bodies (If/Loop) are timed inside it. Nodes are renamed to their index in a private copy
    so the profile maps back whatever the original names are.
    """
    import onnxruntime as ort

    proto = ir.to_proto(model)
    for index, node in enumerate(proto.graph.node):
        node.name = f"onnxopt_node_{index}"
    feed_list = _feeds_for(model, feeds)
    with tempfile.TemporaryDirectory(prefix="onnxopt-latency-") as tmp:
        options = ort_run.session_options()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        options.intra_op_num_threads = 1
        path = Path(tmp) / "model.onnx"
        ir.save(ir.serde.deserialize_model(proto), path, external_data="model.onnx.data"
                if has_deferred_tensors(model) else None)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for feed in feed_list:  # warm-up
            ort_run.run(session, feed)
        start = time.perf_counter()
        for _ in range(repeat):
            for feed in feed_list:
                ort_run.run(session, feed)
        elapsed = time.perf_counter() - start
        profile = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[int, list[float]] = {}
    for event in profile:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or not name.startswith("onnxopt_node_"):
            continue
        index = name[len("onnxopt_node_"):-len("_kernel_time")]
        if index.isdigit():
            per_node.setdefault(int(index), []).append(event.get("dur", 0) * 1e-6)
    runs = (repeat + 1) * len(feed_list)
    latency = [float(np.median(_pad(per_node.get(i, []), runs))) for i in range(len(proto.graph.node))]
    if not any(latency):  # no profile events (should not happen): spread the wall time evenly
        latency = [elapsed / max(1, repeat * len(feed_list) * len(latency))] * len(latency)
    return latency


def _pad(samples: list[float], runs: int) -> list[float]:
    return samples + [0.0] * max(0, runs - len(samples))
