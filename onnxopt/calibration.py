"""Activation calibration and per-tensor SQNR, streamed through ONNX Runtime.

The original model runs with intermediate tensors exposed as extra outputs, a chunk of
tensors per session so that memory stays bounded; every sample updates fixed-size
statistics (min/max, and optionally a histogram) and is then dropped, so memory does not
grow with the number of samples. Tensors inside If, Loop and Scan bodies are exposed by
adding body outputs: an If branch outputs the tensor and the other branch an empty
tensor; Loop and Scan collect it as an extra scan output.

Range methods: ``minmax``, ``percentile`` (two-sided, ``percentile`` of the mass kept),
``entropy`` (TensorRT-style KL-divergence threshold) and ``mse`` (the range minimizing the
expected quantization error). The histogram has a fixed number of bins of width ``2**e``
on a grid anchored at zero; when new data falls outside, pairs of bins merge exactly.
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

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 4096
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)
Feed = dict[str, np.ndarray]


class MinMaxStats:
    """Running min and max of the finite values seen, and the smallest nonzero mean square of
    one sample (what a per-tensor scale must still resolve); fixed size."""

    __slots__ = ("min", "max", "count", "min_power", "rank")

    def __init__(self):
        self.min, self.max, self.count, self.min_power = math.inf, -math.inf, 0, math.inf
        self.rank = None  # the rank every sample had, -1 when it varied

    def update(self, x: np.ndarray) -> None:
        x = self._observe(x)
        if x.size:
            self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
            self.count += x.size

    def _observe(self, x) -> np.ndarray:
        x = np.asarray(x)
        self.rank = x.ndim if self.rank in (None, x.ndim) else -1
        x = _finite(x)
        power = float(np.dot(x, x)) / x.size if x.size else 0.0
        if power > 0:
            self.min_power = min(self.min_power, power)
        return x

    def range(self) -> tuple[float, float]:
        return self.min, self.max

    def worst_sqnr_db(self, lo: float, hi: float, levels: int) -> float:
        """Estimated SQNR (dB) of the quietest sample when ``[lo, hi]`` maps to ``levels`` values."""
        step = (max(hi, 0.0) - min(lo, 0.0)) / max(levels - 1, 1)
        if step <= 0 or not math.isfinite(self.min_power):
            return math.inf
        return 10 * math.log10(self.min_power / (step * step / 12))


class HistogramStats(MinMaxStats):
    """A fixed-size histogram: bin ``i`` covers ``[(k0 + i) * 2**e, (k0 + i + 1) * 2**e)``."""

    __slots__ = ("bins", "counts", "exponent", "k0")

    def __init__(self, bins: int = DEFAULT_BINS):
        super().__init__()
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.bins, self.counts, self.exponent, self.k0 = bins, np.zeros(bins, np.int64), 0, 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def _span(self, lo: float, hi: float, delta: int = 0) -> int:
        """Bins ``[lo, hi]`` covers at width ``2**(exponent + delta)``."""
        e = -(self.exponent + delta)
        return math.floor(math.ldexp(hi, e)) - math.floor(math.ldexp(lo, e)) + 1

    def update(self, x: np.ndarray) -> None:
        x = self._observe(x)
        if not x.size:
            return
        lo, hi = min(self.min, float(x.min())), max(self.max, float(x.max()))
        if self.count == 0:
            if hi > lo:  # the finest power-of-two width that fits [lo, hi] in the bins
                self.exponent = math.frexp((hi - lo) / (self.bins - 2))[1]
                self.exponent -= self._span(lo, hi, -1) <= self.bins
            else:
                self.exponent = math.frexp(max(abs(lo), 1e-30))[1] - 20
            self.k0 = math.floor(math.ldexp(lo, -self.exponent))
        while self._span(lo, hi) > self.bins:  # merge pairs of bins: exact on a zero-anchored grid
            merged = np.zeros(self.bins, np.int64)
            new_k0 = self.k0 // 2
            np.add.at(merged, (self.k0 + np.arange(self.bins)) // 2 - new_k0, self.counts)
            self.counts, self.k0, self.exponent = merged, new_k0, self.exponent + 1
        new_k0 = math.floor(math.ldexp(lo, -self.exponent))
        if new_k0 < self.k0:
            shift = self.k0 - new_k0
            self.counts = np.concatenate([np.zeros(shift, np.int64), self.counts[: self.bins - shift]])
            self.k0 = new_k0
        scaled = x * x.dtype.type(math.ldexp(1.0, -self.exponent))  # exact: a power-of-two scaling
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int64)
        index -= self.k0
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)
        self.min, self.max, self.count = lo, hi, self.count + x.size

    def edges(self) -> np.ndarray:
        return (self.k0 + np.arange(self.bins + 1)) * self.width

    def magnitudes(self) -> np.ndarray:
        """Counts of ``|x|`` on bins ``[i * 2**e, (i + 1) * 2**e)`` (exact: the grid is anchored at 0)."""
        k = self.k0 + np.arange(self.bins)
        folded = np.where(k >= 0, k, -k - 1)
        used = self.counts > 0
        size = int(folded[used].max()) + 1 if used.any() else 1
        return np.bincount(folded[used], weights=self.counts[used], minlength=size)


def _finite(x) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return x if np.isfinite(x).all() else x[np.isfinite(x)]


# -- ranges from statistics --------------------------------------------------------------------


def _quantile(hist: HistogramStats, q: float) -> float:
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts, dtype=np.float64)])
    return float(np.interp(q * cdf[-1], cdf, hist.edges()))


def _kl_divergence(m: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) of keeping the first ``i`` bins: P folds the tail into bin i-1, Q is P's
    first ``i`` bins merged into ``levels`` groups and spread back over their nonzero bins."""
    p = m[:i].astype(np.float64)
    p[-1] += m[i:].sum()
    starts = (np.arange(levels) * i) // levels
    nonzero = m[:i] > 0
    sums = np.add.reduceat(m[:i], starts)
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    per_bin = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0)
    q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def _kl_threshold(m: np.ndarray, levels: int, max_bins: int = 2048) -> tuple[int, int]:
    """TensorRT's entropy calibration on magnitude counts ``m``: ``(bins kept, merge factor)``.

    Bins are first merged in pairs down to ``max_bins`` (exact); a coarse search over 128
    thresholds is refined around the best one.
    """
    factor = 1
    while len(m) > max_bins:
        m = np.add.reduceat(m, np.arange(0, len(m), 2))
        factor *= 2
    n = len(m)
    if n <= levels:
        return n, factor
    coarse = np.unique(np.linspace(levels, n, min(128, n - levels + 1)).astype(int))
    kl = {int(i): _kl_divergence(m, int(i), levels) for i in coarse}
    best = min(kl, key=kl.get)
    step = int(coarse[1] - coarse[0]) if len(coarse) > 1 else 1
    for i in range(max(levels, best - step + 1), min(n, best + step - 1) + 1):
        if i not in kl:
            kl[i] = _kl_divergence(m, i, levels)
    best = min(kl, key=kl.get)
    return best, factor


def _tail_errors(centers, counts, candidates, right: bool) -> np.ndarray:
    """Sum of count * (center - t)^2 over the centers beyond each candidate t (right or left tail)."""
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(counts * centers**k)]) for k in range(3))
    if right:
        idx = np.searchsorted(centers, candidates, side="right")
        a0, a1, a2 = s0[-1] - s0[idx], s1[-1] - s1[idx], s2[-1] - s2[idx]
    else:
        idx = np.searchsorted(centers, candidates, side="left")
        a0, a1, a2 = s0[idx], s1[idx], s2[idx]
    return np.maximum(a2 - 2 * candidates * a1 + candidates**2 * a0, 0.0), a0


def _mse_range(hist: HistogramStats, steps: int) -> tuple[float, float]:
    """The zero-including range minimizing clipping plus rounding error (coordinate descent)."""
    edges = hist.edges()
    centers, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
    total = counts.sum()
    los = np.unique(np.append(np.clip(edges, min(hist.min, 0.0), 0.0), min(hist.min, 0.0)))
    his = np.unique(np.append(np.clip(edges, 0.0, max(hist.max, 0.0)), max(hist.max, 0.0)))
    left, left_n = _tail_errors(centers, counts, los, right=False)
    right, right_n = _tail_errors(centers, counts, his, right=True)
    i, j = 0, len(his) - 1
    for _ in range(32):
        inside = total - left_n[i] - right_n
        j_new = int(np.argmin(right + inside * ((his - los[i]) / steps) ** 2 / 12))
        inside = total - left_n - right_n[j_new]
        i_new = int(np.argmin(left + inside * ((his[j_new] - los) / steps) ** 2 / 12))
        if (i_new, j_new) == (i, j):
            break
        i, j = i_new, j_new
    return float(los[i]), float(his[j])


def _symmetric_mse(m: np.ndarray, width: float, steps: int) -> float:
    centers, edges = (np.arange(len(m)) + 0.5) * width, np.arange(1, len(m) + 1) * width
    tail, _ = _tail_errors(centers, m.astype(np.float64), edges, right=True)
    inside = np.cumsum(m)
    return float(edges[int(np.argmin(tail + inside * (edges / steps) ** 2 / 12))])


def tensor_range(stats: MinMaxStats, method: str = "minmax", *, percentile: float = 99.99,
                 levels: int = 256, symmetric: bool = False) -> tuple[float, float]:
    """The calibrated ``(lo, hi)`` of one tensor; ``levels`` is the target's number of integer values."""
    lo, hi = stats.range()
    if method == "minmax":
        return lo, hi
    if not isinstance(stats, HistogramStats):
        raise UsageError(f"calibration method '{method}' needs histogram statistics")
    one_sided = lo >= 0 or hi <= 0
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise UsageError(f"percentile must be in (50, 100], got {percentile}")
        if symmetric or one_sided:
            m = stats.magnitudes()
            cdf = np.cumsum(m) / m.sum()
            k = int(np.searchsorted(cdf, percentile / 100.0))
            t = min((k + 1) * stats.width, max(-lo, hi))
            return max(lo, -t), min(hi, t)
        tail = (1.0 - percentile / 100.0) / 2
        return max(lo, min(_quantile(stats, tail), 0.0)), min(hi, max(_quantile(stats, 1.0 - tail), 0.0))
    if method == "entropy":
        quant_levels = levels if one_sided and not symmetric else levels // 2
        kept, factor = _kl_threshold(stats.magnitudes(), max(quant_levels, 2))
        t = kept * factor * stats.width
        return max(lo, -t), min(hi, t)
    if method == "mse":
        if symmetric:
            t = _symmetric_mse(stats.magnitudes(), stats.width, max(levels // 2 - 1, 1))
            return max(lo, -t), min(hi, t)
        return _mse_range(stats, max(levels - 1, 1))
    raise UsageError(f"unknown calibration method '{method}'; valid: {', '.join(METHODS)}")


def ranges_from_statistics(stats: dict[str, MinMaxStats], method: str = "minmax",
                           tensors: Iterable[str] | None = None, **options) -> dict[str, tuple[float, float]]:
    """``tensor_range`` of every observed tensor (of ``tensors`` only, when given)."""
    names = stats if tensors is None else [n for n in dict.fromkeys(tensors) if n in stats]
    return {name: tensor_range(stats[name], method, **options) for name in names if stats[name].count}


# -- streaming tensors out of ORT ---------------------------------------------------------------


def _value_dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Element types of every named value, from the IR and from onnx shape inference."""
    dtypes: dict[str, ir.DataType] = {}
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=False)
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
                   dtypes: Sequence[dict] | None = None) -> tuple[dict[str, object], set[str]]:
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
    while pending:
        part, pending = pending[:chunk], pending[chunk:]
        used = _run_chunk(models, dtypes, feeds, part, main, make, update, states, failed)
        chunk = int(min(1024, max(8, memory_budget_mb * 2**20 / max(used / max(len(part), 1), 1.0))))
    return states, failed


def _check_feeds(model: ir.Model, feeds: list[Feed]) -> None:
    if not feeds:
        raise UsageError("calibration needs at least one sample (--data)")
    wanted = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers}
    for i, feed in enumerate(feeds):
        if not wanted <= feed.keys():
            raise InputError(f"sample {i} has no array for model input(s): {', '.join(sorted(wanted - feed.keys()))}")


def _run_chunk(models, dtypes, feeds, names, main, make, update, states, failed) -> int:
    """Run one chunk and commit its states; returns the largest bytes one feed exposed.

    Only tensors lifted out of bodies can make a chunk fail: bisect those so that just the
    offending ones are skipped; a failure with main-graph tensors only is the model's own.
    """
    direct = [n for n in names if n in feeds[0]]  # graph inputs come straight from the feeds
    computed = [n for n in names if n not in feeds[0]]
    try:
        sessions = []
        for model, types in zip(models, dtypes):
            if computed:
                exposed, outs = _exposed(model, computed, types)
                sessions.append((ort_run.make_session(exposed), outs))
        local = {name: make() for name in names}
        peak = 0
        for feed in feeds:
            arrays = []
            for session, outs in sessions:
                result = ort_run.run(session, {i.name: feed[i.name] for i in session.get_inputs() if i.name in feed})
                arrays.append([result[o] for o in outs])
            peak = max(peak, sum(a.nbytes for a in arrays[0]) if arrays else 0)
            for i, name in enumerate(computed):
                update(local[name], [a[i] for a in arrays])
            for name in direct:
                update(local[name], [np.asarray(feed[name])] * len(models))
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
                       memory_budget_mb: float = 256) -> dict[str, MinMaxStats]:
    """Streaming statistics of activations ``tensors`` (default: :func:`activation_names`).

    Tensors that never ran (an If branch no sample took) or could not be exposed are absent.
    """
    dtypes = _value_dtypes(model)
    names = activation_names(model, dtypes) if tensors is None else list(tensors)
    make = (lambda: HistogramStats(bins)) if histogram else MinMaxStats
    states, _ = stream_tensors([model], feeds, names, make, lambda s, arrays: s.update(arrays[0]),
                               memory_budget_mb=memory_budget_mb, dtypes=[dtypes])
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
                tensors: Sequence[str] | None = None, *, memory_budget_mb: float = 256) -> dict[str, float]:
    """Signal-to-quantization-noise ratio (dB) of every float tensor both models compute under
    the same name (default: all but the graph inputs), summed over ``feeds``; worst first."""
    dtypes = [_value_dtypes(float_model), _value_dtypes(quant_model)]
    if tensors is None:
        inputs = {v.name for v in float_model.graph.inputs}
        theirs = set(activation_names(quant_model, dtypes[1]))
        tensors = [n for n in activation_names(float_model, dtypes[0]) if n in theirs and n not in inputs]
    states, _ = stream_tensors([float_model, quant_model], feeds, list(tensors), _ErrorEnergy,
                               lambda s, arrays: s.update(arrays), memory_budget_mb=memory_budget_mb, dtypes=dtypes)
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
