"""Activation calibration and per-tensor SQNR, streamed through ONNX Runtime.

The original model runs with intermediate tensors exposed as extra outputs, a chunk of
tensors per session so that memory stays bounded; every sample updates fixed-size
statistics (min/max, and optionally a histogram) and is then dropped, so memory does not
grow with the number of samples. Tensors inside If, Loop and Scan bodies are exposed by
adding body outputs: an If branch outputs the tensor and the other branch an empty
tensor; Loop and Scan collect it as an extra scan output.

Statistics and range methods live in ``statistics``; they are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from . import ort_run
from .errors import InputError, UsageError
from .graph_walk import all_graphs

from .statistics import (  # noqa: F401  (re-exported: passes use calibration as one entry point)
    DEFAULT_BINS,
    METHODS,
    HistogramStats,
    MinMaxStats,
    ranges_from_statistics,
    tensor_range,
)

_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
Feed = dict[str, np.ndarray]


def _value_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of every named value, from the IR and from onnx shape inference.

    Inference sees the model without its big initializers (onnx_ir's ``call_onnx_api``
    turns them into typed inputs), so models over protobuf's 2 GB limit are inferred too.
    """
    dtypes: dict[str, ir.DataType] = {}
    try:
        proto = _without_big_initializers(lambda p: onnx.shape_inference.infer_shapes(p, data_prop=False), model)
        graphs = [proto.graph]
        while graphs:
            g = graphs.pop()
            for info in [*g.input, *g.output, *g.value_info]:
                if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                    dtypes[info.name] = ir.DataType(info.type.tensor_type.elem_type)
            for node in g.node:
                for attr in node.attribute:
                    graphs.extend([attr.g] if attr.HasField("g") else list(attr.graphs))
    except Exception:  # noqa: BLE001 - inference is best effort; IR types below still count
        pass
    for graph in all_graphs(model):
        for value in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
            if value.name and value.dtype is not None:
                dtypes[value.name] = value.dtype
    return dtypes


def _without_big_initializers(func, model: ir.Model):
    try:
        from onnx_ir.passes.common._c_api_utils import call_onnx_api
    except ImportError:  # a private helper of onnx_ir: without it, serialize everything
        return func(ir.to_proto(model))
    return call_onnx_api(func, model)


def activation_names(model: ir.Model, dtypes: dict[str, ir.DataType] | None = None) -> list[str]:
    """Float tensors computed at run time (node outputs and non-constant inputs), main graph
    first then bodies, in graph order; Constant outputs and initializers are weights, not activations."""
    dtypes = _value_dtypes(model) if dtypes is None else dtypes
    names: list[str] = []
    seen: set[str] = set()
    for graph in all_graphs(model):
        if not isinstance(graph, ir.Graph):
            continue  # function bodies are inlined by ORT and cannot be exposed
        inputs = [v for v in graph.inputs if v.name not in graph.initializers]
        outputs = [o for n in graph if n.op_type != "Constant" for o in n.outputs]
        for value in [*inputs, *outputs]:
            if value.name and value.name not in seen and dtypes.get(value.name) in _FLOAT_TYPES:
                seen.add(value.name)
                names.append(value.name)
    return names


def _owners(model: ir.Model) -> dict[int, tuple[ir.Node, str]]:
    owners = {}
    for graph in all_graphs(model):
        for node in graph:
            for key, attr in node.attributes.items():
                if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH:
                    owners[id(attr.as_graph())] = (node, key)
    return owners


def _lift(node: ir.Node, key: str, body: ir.Graph, value: ir.Value, dtype: ir.DataType) -> ir.Value:
    """Make ``value`` of ``body`` an extra output of ``node`` (If/Loop/Scan) in the enclosing graph."""
    ident = ir.node("Identity", [value])
    body.append(ident)
    if node.op_type == "If":
        other = node.attributes["else_branch" if key == "then_branch" else "then_branch"].as_graph()
        empty = ir.node("Constant", [], {"value": ir.tensor(np.zeros((0,), dtype.numpy()))})
        other.append(empty)
        other.outputs.append(empty.outputs[0])
    elif node.op_type == "Scan":
        for attr in ("scan_output_axes", "scan_output_directions"):
            if attr in node.attributes:
                node.attributes[attr] = ir.AttrInt64s(attr, [*node.attributes[attr].as_ints(), 0])
    elif node.op_type != "Loop":
        raise InputError(f"cannot expose values of a {node.op_type} body")
    body.outputs.append(ident.outputs[0])
    node.resize_outputs(len(node.outputs) + 1)
    return node.outputs[-1]


def _exposed(model: ir.Model, names: Sequence[str], dtypes: dict[str, ir.DataType]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` whose only outputs are ``names`` (lifted out of bodies); the output names."""
    model = model.clone()
    owners = _owners(model)
    where: dict[str, tuple[ir.Value, ir.Graph]] = {}
    for graph in all_graphs(model):
        if isinstance(graph, ir.Graph):
            for value in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
                where.setdefault(value.name, (value, graph))
    outputs, out_names = [], []
    for i, name in enumerate(names):
        value, graph = where[name]
        while graph is not model.graph:
            node, key = owners[id(graph)]
            value = _lift(node, key, graph, value, dtypes.get(name, ir.DataType.FLOAT))
            value.name = f"onnxopt_calib_{i}_{len(node.outputs)}_{id(value)}"
            graph = node.graph
        if value in outputs:  # the same value twice (a body output already lifted)
            ident = ir.node("Identity", [value])
            model.graph.append(ident)
            value = ident.outputs[0]
            value.name = f"onnxopt_calib_{i}_dup"
        outputs.append(value)
        out_names.append(value.name)
    model.graph.outputs.clear()
    model.graph.outputs.extend(outputs)
    return model, out_names


def stream_tensors(models: Sequence[ir.Model], feeds: Iterable[Feed], names: Sequence[str],
                   make: Callable[[], object], update: Callable[[object, list[np.ndarray]], None], *,
                   memory_budget_mb: float = 256, first_chunk: int = 64,
                   dtypes: Sequence[dict] | None = None, progress=None,
                   label: str = "calibrate") -> tuple[dict[str, object], set[str]]:
    """Stream tensors ``names`` of ``models`` (same inputs) over ``feeds``, a chunk of tensors per
    session: ``update(state, [array per model])`` for each tensor and feed, ``state = make()``.

    Returns the states by name and the names that could not be exposed (a Loop body tensor
    whose shape changes across iterations, say); those are skipped, never half-counted.
    """
    feeds = list(feeds)
    _check_feeds(models[0], feeds)
    dtypes = [_value_dtypes(m) for m in models] if dtypes is None else dtypes
    for model in models:
        known = {v.name for g in all_graphs(model) if isinstance(g, ir.Graph)
                 for v in [*g.inputs, *(o for n in g for o in n.outputs)]}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise UsageError(f"no tensor named {unknown[0]!r} in the model (or only inside a function)")
    main = {v.name for v in [*models[0].graph.inputs, *(o for n in models[0].graph for o in n.outputs)]}
    states: dict[str, object] = {}
    failed: set[str] = set()
    pending, chunk = list(names), first_chunk
    task = progress.add(f"{label} ({len(feeds)} samples)", len(names)) if progress else None
    while pending:
        part, pending = pending[:chunk], pending[chunk:]
        used = _run_chunk(models, dtypes, feeds, part, main, make, update, states, failed)
        held = used * (len(feeds) * (len(models) - 1) if len(models) > 1 else 1)  # see _chunk_outputs
        chunk = int(min(1024, max(8, memory_budget_mb * 2**20 / max(held / max(len(part), 1), 1.0))))
        if task is not None:
            progress.advance(task, len(part))
    if task is not None:
        progress.done(task)
    return states, failed


def _check_feeds(model: ir.Model, feeds: list[Feed]) -> None:
    if not feeds:
        raise UsageError("calibration needs at least one sample (--data)")
    wanted = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers}
    for i, feed in enumerate(feeds):
        if not wanted <= feed.keys():
            raise InputError(f"sample {i} has no array for model input(s): {', '.join(sorted(wanted - feed.keys()))}")


def _chunk_outputs(models, dtypes, feeds, computed):
    """Per feed, ``[arrays of tensors computed, per model]``.

    One model streams feed by feed. Several models run one after the other, each session closed
    before the next opens (the tensors of the earlier models are kept meanwhile): a float model
    and its quantized copy never hold their weights at the same time.
    """
    def session_of(model, types):
        exposed, outs = _exposed(model, computed, types)
        return ort_run.make_session(exposed), outs

    def outputs(session, outs, feed):
        result = ort_run.run(session, {i.name: feed[i.name] for i in session.get_inputs() if i.name in feed})
        return [result[o] for o in outs]

    if not computed:
        yield from ([] for _ in feeds)
        return
    if len(models) == 1:
        session, outs = session_of(models[0], dtypes[0])
        for feed in feeds:
            yield [outputs(session, outs, feed)]
        return
    kept: list[list[list[np.ndarray]]] = [[] for _ in feeds]
    for model, types in zip(models, dtypes):
        session, outs = session_of(model, types)
        for index, feed in enumerate(feeds):
            kept[index].append(outputs(session, outs, feed))
        del session
    for index in range(len(feeds)):
        yield kept[index]
        kept[index] = []


def _run_chunk(models, dtypes, feeds, names, main, make, update, states, failed) -> int:
    """Run one chunk and commit its states; returns the largest bytes one feed exposed.

    Only tensors lifted out of bodies can make a chunk fail: bisect those so that just the
    offending ones are skipped; a failure with main-graph tensors only is the model's own.
    """
    direct = [n for n in names if n in feeds[0]]  # graph inputs come straight from the feeds
    computed = [n for n in names if n not in feeds[0]]
    try:
        local = {name: make() for name in names}
        peak = 0
        for index, arrays in enumerate(_chunk_outputs(models, dtypes, feeds, computed)):
            peak = max(peak, sum(a.nbytes for a in arrays[0]) if arrays else 0)
            for i, name in enumerate(computed):
                update(local[name], [a[i] for a in arrays])
            for name in direct:
                update(local[name], [np.asarray(feeds[index][name])] * len(models))
            del arrays
        states.update(local)
        return peak
    except InputError:
        lifted = [n for n in names if n not in main]
        if not lifted:
            raise
        if len(names) == 1:
            failed.add(names[0])
            return 0
        plain = [n for n in names if n in main]
        halves = [lifted[: len(lifted) // 2], lifted[len(lifted) // 2:]] if len(lifted) > 1 else [lifted]
        return max(_run_chunk(models, dtypes, feeds, part, main, make, update, states, failed)
                   for part in ([plain] if plain else []) + halves)


# -- public analyses -------------------------------------------------------------------------


def collect_statistics(model: ir.Model, feeds: Iterable[Feed], tensors: Sequence[str] | None = None, *,
                       histogram: bool = True, bins: int = DEFAULT_BINS,
                       memory_budget_mb: float = 256, progress=None) -> dict[str, MinMaxStats]:
    """Streaming statistics of activations ``tensors`` (default: :func:`activation_names`).

    Tensors that never ran (an If branch no sample took) or could not be exposed are absent.
    """
    dtypes = _value_dtypes(model)
    names = activation_names(model, dtypes) if tensors is None else list(tensors)
    make = (lambda: HistogramStats(bins)) if histogram else MinMaxStats
    states, _ = stream_tensors([model], feeds, names, make, lambda s, arrays: s.update(arrays[0]),
                               memory_budget_mb=memory_budget_mb, dtypes=[dtypes], progress=progress)
    return {name: s for name, s in states.items() if s.count}


def activation_ranges(model: ir.Model, feeds: Iterable[Feed], method: str = "minmax",
                      tensors: Sequence[str] | None = None, *, percentile: float = 99.99, levels: int = 256,
                      symmetric: bool = False, bins: int = DEFAULT_BINS,
                      memory_budget_mb: float = 256) -> dict[str, tuple[float, float]]:
    """Calibrated ``(lo, hi)`` per activation tensor with ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise UsageError(f"unknown calibration method '{method}'; valid: {', '.join(METHODS)}")
    stats = collect_statistics(model, feeds, tensors, histogram=method != "minmax", bins=bins,
                               memory_budget_mb=memory_budget_mb)
    return ranges_from_statistics(stats, method, percentile=percentile, levels=levels, symmetric=symmetric)


class _ErrorEnergy:
    __slots__ = ("signal", "noise", "seen")

    def __init__(self):
        self.signal, self.noise, self.seen = 0.0, 0.0, False

    def update(self, arrays: list[np.ndarray]) -> None:
        ref, got = (np.asarray(a, dtype=np.float64) for a in arrays)
        if ref.shape != got.shape or not ref.size:
            return
        ok = np.isfinite(ref)
        self.signal += float(np.sum(ref[ok] ** 2))
        diff = np.where(ok, ref - got, 0.0)
        self.noise += float(np.sum(np.nan_to_num(diff, nan=np.inf) ** 2))
        self.seen = True

    def db(self) -> float:
        if self.noise == 0:
            return math.inf
        return 10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf


def tensor_sqnr(float_model: ir.Model, quant_model: ir.Model, feeds: Iterable[Feed],
                tensors: Sequence[str] | None = None, *, memory_budget_mb: float = 256,
                progress=None) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of every float tensor both models compute under
    the same name (default: all but the graph inputs), summed over ``feeds``; worst first."""
    dtypes = [_value_dtypes(float_model), _value_dtypes(quant_model)]
    if tensors is None:
        inputs = {v.name for v in float_model.graph.inputs}
        theirs = set(activation_names(quant_model, dtypes[1]))
        tensors = [n for n in activation_names(float_model, dtypes[0]) if n in theirs and n not in inputs]
    states, _ = stream_tensors([float_model, quant_model], feeds, list(tensors), _ErrorEnergy,
                               lambda s, arrays: s.update(arrays), memory_budget_mb=memory_budget_mb, dtypes=dtypes,
                               progress=progress, label="compare tensors")
    sqnr = {name: s.db() for name, s in states.items() if s.seen}
    return dict(sorted(sqnr.items(), key=lambda item: item[1]))


def producer_names(model: ir.Model, tensors: Iterable[str], ops: Sequence[str] | None = None) -> dict[str, str]:
    """Name of the node computing each tensor, for excluding the worst offenders by node name.

    With ``ops``, walk up through single-activation-input nodes (BatchNormalization, a bias
    Add, Relu, ...) to the nearest named node of one of ``ops``, the one a pass quantized."""
    producers = {o.name: n for g in all_graphs(model) for n in g for o in n.outputs}
    found = {}
    for name in tensors:
        node = producers.get(name)
        while ops is not None and node is not None and node.op_type not in ops:
            runtime = [v for v in node.inputs if v is not None and v.const_value is None and
                       (v.producer() is None or v.producer().op_type != "Constant")]
            node = runtime[0].producer() if len(runtime) == 1 else None
        if node is not None and node.name:
            found[name] = node.name
    return found
