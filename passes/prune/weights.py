"""prune-weights: zero the least important weights of Conv/ConvTranspose/Gemm/MatMul.

Weights are constant inputs (initializers or Constant nodes) of the selected layers in
every graph (If/Loop bodies too); a weight read by several layers is pruned once, ranked
on the sum of its layers' scores. ``sparsity`` is the fraction zeroed, per layer
(``scope=layer``) or over all selected weights at once (``scope=global``).

Importance: ``l1`` |w|; ``l2`` w² over the layer's mean w² (scale-free, so ``global``
compares layers by their own energy; the same order as l1 within a layer); ``activation``
|w| times the RMS of its input channel on the calibration feeds (Wanda); ``entropy`` the
activation score times sqrt(KL_l / mean KL), where KL_l is the divergence of the model's
output distribution (softmax over the last axis) when layer l alone is pruned to
``sparsity``, measured on the calibration feeds. With ``scope=layer`` entropy ranks like
activation; with ``scope=global`` it moves sparsity to the layers whose pruning changes
the output distribution least.

``storage=packed`` stores each pruned weight as its non-zero values plus a bit mask (1 bit
per element) and rebuilds it at run time with BitShift/Mod/Cast/CumSum/Mul/Gather/Reshape, which ORT
runs (and folds at session start when its optimizations are on): the file shrinks to about
1/32 + (1 - sparsity) of the dense size, at the cost of those ops (a copy of the dense
weight in memory and a few ms at load). Weights smaller than ``pack_min_elements`` stay dense.
Packed weights are no longer constants, so later weight passes do not see them: pack last.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.calibration import stream_tensors
from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs
from onnxopt.model_stats import compute_estimate
from onnxopt.naming import Namer
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.passes.quantize.weights_store import Store
from onnxopt.selectors import SelectorOptions, promote_field, promote_filter, selector_from_options

from . import activations
from .common import constant_array, opset, set_constant

NAME = "prune-weights"
WEIGHT_INPUT = {"Conv": (1, 1), "ConvTranspose": (1, 0), "Gemm": (1, None), "MatMul": (1, 0)}  # (index, in-axis)


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class PruneWeightsOptions(SelectorOptions):
    """The shared selectors (nodes, exclude_nodes, ops, exclude_ops, region) come first."""

    sparsity: float = _opt(0.5, "fraction of weights set to zero (0 <= sparsity < 1)")
    scope: Literal["layer", "global"] = _opt("layer", "rank within each layer, or over all selected layers")
    importance: Literal["l1", "l2", "activation", "entropy"] = _opt("l1", "how weights are ranked")
    storage: Literal["dense", "packed"] = _opt("dense", "packed: non-zero values + bit mask, rebuilt at run time")
    min_elements: int = _opt(64, "leave weights with fewer elements alone")
    pack_min_elements: int = _opt(4096, "storage=packed: keep smaller weights dense (the unpacking ops cost ~1.5 KB)")
    promote_nodes: tuple[str, ...] = promote_field()
    promote_sparsity: float = _opt(-1.0, "sparsity of promote_nodes' weights; -1: half of sparsity")

    def __post_init__(self):
        if not 0 <= self.sparsity < 1:
            raise UsageError(f"{NAME}: sparsity must be in [0, 1), got {self.sparsity}")
        if self.promote_sparsity != -1.0 and not 0 <= self.promote_sparsity < 1:
            raise UsageError(f"{NAME}: promote_sparsity must be in [0, 1) or -1, got {self.promote_sparsity}")
        if self.min_elements < 0:
            raise UsageError(f"{NAME}: min_elements must be >= 0")


@dataclasses.dataclass
class _Weight:
    value: ir.Value
    graph: ir.Graph
    layers: list[ir.Node]
    array: np.ndarray
    score: np.ndarray | None = None
    sparsity: float = 0.0


class PruneWeightsPass(Pass):
    """Zero the least important Conv/Gemm/MatMul weights (unstructured), optionally stored packed."""

    name = NAME
    Options = PruneWeightsOptions
    fidelity_of = Fidelity.LOSSY

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        """Lower sparsities for the most sensitive layers: half, then a quarter."""
        s = self.options.sparsity
        return [] if s == 0 else [({"promote_sparsity": v}, f"sparsity {v:g}") for v in (s / 2, s / 4)]

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        selected = set(selector_from_options(opts).select(model))
        promote = promote_filter(model, opts.promote_nodes, NAME)
        weights = _find_weights(model, selected, opts.min_elements)
        stats: dict = {"weights_pruned": 0, "per_layer": {}, "quantized_nodes": []}
        if not weights or opts.sparsity == 0:
            return PassResult(model, False, stats)
        low = opts.sparsity / 2 if opts.promote_sparsity == -1.0 else opts.promote_sparsity
        for w in weights:
            w.sparsity = low if any(promote.matches(n) for n in w.layers) else opts.sparsity
        shapes = {k: np.shape(v) for k, v in self.context.feeds[0].items()} if self.context.feeds else None
        before = compute_estimate(model, shapes)
        self._score(model, weights)
        masks = self._masks(weights)
        changed = []
        for w, mask in zip(weights, masks):
            new = np.where(mask, w.array, np.zeros_like(w.array))
            zeros = int(np.sum(new == 0))
            label = ",".join(n.name or n.op_type for n in w.layers)
            stats["per_layer"][label] = round(zeros / new.size, 4)
            if not np.array_equal(new, w.array):
                set_constant(w.value, new)
                changed.append(w)
        stats["weights_pruned"] = len(changed)
        stats["quantized_nodes"] = sorted({n.name for w in changed for n in w.layers if n.name})
        total = sum(w.array.size for w in weights)
        stats["sparsity_achieved"] = round(sum(float(np.sum(constant_array(w.value) == 0)) for w in weights) / total, 4)
        if opts.storage == "packed":
            if opset(model) < 11:
                raise UsageError(f"{NAME}: storage=packed needs opset 11 (BitShift, CumSum); the model has {opset(model)}")
            stats.update(_pack(model, changed, opts.pack_min_elements))
        after = compute_estimate(model, shapes)
        stats.update(parameters_before=before["parameters"], bytes_before=before["bytes"],
                     bytes_after=after["bytes"], flops=before["flops"],
                     nonzero_parameters_after=sum(int(np.count_nonzero(constant_array(w.value)))
                                                  for w in weights if constant_array(w.value) is not None))
        return PassResult(model, bool(changed), stats)

    # -- importance ------------------------------------------------------------------------
    def _score(self, model: ir.Model, weights: list[_Weight]) -> None:
        kind = self.options.importance
        for w in weights:
            mag = np.abs(w.array.astype(np.float64))
            w.score = mag * mag / max(float(np.mean(mag * mag)), 1e-30) if kind == "l2" else mag
        if kind in ("activation", "entropy"):
            if not self.context.feeds:
                raise UsageError(f"{NAME}: importance={kind} needs calibration feeds (--data)")
            self._wanda(model, weights)
        if kind == "entropy":
            self._entropy(model, weights)

    def _wanda(self, model: ir.Model, weights: list[_Weight]) -> None:
        axes: dict[str, int] = {}
        for w in weights:
            for node in w.layers:
                axes[node.inputs[0].name] = _input_axis(node, model)
        axes = {k: v for k, v in axes.items() if v is not None}
        norms = activations.channel_norms(model, self.context.feeds, axes, self.context.progress)
        for w in weights:
            total = np.zeros_like(w.score)
            for node in w.layers:
                norm = norms.get(node.inputs[0].name)
                axis = _weight_in_axis(node)
                if norm is None or axis is None or norm.size != w.array.shape[axis]:
                    continue
                shape = [1] * w.array.ndim
                shape[axis] = norm.size
                total += np.abs(w.array) * norm.reshape(shape)
            if total.any():
                w.score = total

    def _entropy(self, model: ir.Model, weights: list[_Weight]) -> None:
        outputs = [v.name for v in model.graph.outputs]
        kl = []
        for w in weights:
            mask = _layer_mask(w.score, w.sparsity)
            pruned = model.clone()
            value = _value_named(pruned, w.value.name)
            set_constant(value, np.where(mask, w.array, 0).astype(w.array.dtype))
            kl.append(_output_kl(model, pruned, self.context.feeds, outputs))
        mean = max(float(np.mean(kl)), 1e-30)
        for w, d in zip(weights, kl):
            w.score = w.score / max(float(np.mean(w.score)), 1e-30) * np.sqrt(max(d, 1e-30) / mean)

    def _masks(self, weights: list[_Weight]) -> list[np.ndarray]:
        if self.options.scope == "layer":
            return [_layer_mask(w.score, w.sparsity) for w in weights]
        by_sparsity: dict[float, list[int]] = defaultdict(list)
        for i, w in enumerate(weights):
            by_sparsity[w.sparsity].append(i)
        masks: list[np.ndarray | None] = [None] * len(weights)
        for sparsity, members in by_sparsity.items():
            flat = np.concatenate([weights[i].score.reshape(-1) for i in members])
            count = int(flat.size * sparsity)
            threshold = np.partition(flat, count)[count] if count < flat.size else np.inf
            for i in members:
                masks[i] = weights[i].score >= threshold
        return masks  # type: ignore[return-value]


def _layer_mask(score: np.ndarray, sparsity: float) -> np.ndarray:
    """True where a weight stays: all but the ``sparsity`` fraction with the lowest score."""
    flat = score.reshape(-1)
    count = int(flat.size * sparsity)
    keep = np.ones(flat.size, bool)
    if count:
        keep[np.argpartition(flat, count - 1)[:count]] = False
    return keep.reshape(score.shape)


def _find_weights(model: ir.Model, selected: set[ir.Node], min_elements: int) -> list[_Weight]:
    found: dict[ir.Value, _Weight] = {}
    excluded: set[ir.Value] = set()
    for graph in all_graphs(model):
        for node in graph:
            if node.op_type not in WEIGHT_INPUT or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            value = node.inputs[1]
            array = constant_array(value)
            if array is None or array.dtype.kind != "f" or array.size < min_elements:
                continue
            if node not in selected:
                excluded.add(value)
                continue
            if value not in found:
                found[value] = _Weight(value, graph, [], array)
            found[value].layers.append(node)
    for value, w in list(found.items()):
        other = [u.node for u in value.uses() if u.node not in w.layers]
        if value in excluded or other:  # read elsewhere too: zeroing it would change that reader
            del found[value]
    return list(found.values())


def _weight_in_axis(node: ir.Node) -> int | None:
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        return 1 if trans_b is not None and trans_b.as_int() else 0
    return WEIGHT_INPUT[node.op_type][1]


def _input_axis(node: ir.Node, model: ir.Model) -> int | None:
    """The axis of the layer's activation input that its weight's input axis reads."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return 1
    if node.op_type == "Gemm":
        trans_a = node.attributes.get("transA")
        return 0 if trans_a is not None and trans_a.as_int() else 1
    shape = node.inputs[0].shape
    return None if shape is None else len(shape) - 1


def _value_named(model: ir.Model, name: str) -> ir.Value:
    for graph in all_graphs(model):
        for value in [*getattr(graph, "initializers", {}).values(), *(o for n in graph for o in n.outputs)]:
            if value.name == name:
                return value
    raise KeyError(name)


class _KL:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def update(self, arrays) -> None:
        ref, got = (np.asarray(a, dtype=np.float64) for a in arrays)
        if ref.shape != got.shape or not ref.size or ref.dtype.kind != "f":
            return
        p, q = _softmax(ref), _softmax(got)
        self.total += float(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12))))
        self.count += p.size // p.shape[-1] if p.ndim else 1


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _output_kl(reference: ir.Model, pruned: ir.Model, feeds, outputs: list[str]) -> float:
    states, _ = stream_tensors([reference, pruned], feeds, outputs, _KL, lambda s, arrays: s.update(arrays),
                               label="entropy")
    return sum(s.total / max(s.count, 1) for s in states.values())


def _pack(model: ir.Model, weights: list[_Weight], min_elements: int) -> dict:
    """Store each weight as non-zero values + a bit mask, rebuilt by ops ORT runs."""
    namer = Namer(model)
    dense = packed = 0
    for w in weights:
        array = constant_array(w.value)
        if array.size < min_elements:
            continue
        mask = (array != 0).reshape(-1)
        values = np.concatenate([np.zeros(1, array.dtype), array.reshape(-1)[mask]])
        bits = np.packbits(mask.astype(np.uint8), bitorder="little")
        store = Store(w.graph, namer, as_nodes=w.value.producer() is not None)
        base = w.value.name
        bit_values = store.const(f"{base}_mask", ir.tensor(bits))
        two = store.const(f"{base}_two", ir.tensor(np.array([2], np.uint8)))
        shifts = store.const(f"{base}_shifts", ir.tensor(np.arange(8, dtype=np.uint8).reshape(1, 8)))
        step = iter(range(100))

        def op(op_type, inputs, attrs=None, name=None):
            return store.op(op_type, inputs, attrs, name=name or f"{base}_unpack_{next(step)}")

        column = op("Reshape", [bit_values, store.const(f"{base}_column", ir.tensor(np.array([-1, 1], np.int64)))])
        spread = op("BitShift", [column, shifts], {"direction": "RIGHT"})
        flags = op("Reshape", [op("Mod", [spread, two]),
                               store.const(f"{base}_flat", ir.tensor(np.array([-1], np.int64)))])
        flags = op("Slice", [flags, store.const(f"{base}_start", ir.tensor(np.array([0], np.int64))),
                             store.const(f"{base}_stop", ir.tensor(np.array([mask.size], np.int64)))])
        flags = op("Cast", [flags], {"to": ir.DataType.INT64})
        index = op("Mul", [op("CumSum", [flags, store.const(f"{base}_zero", ir.tensor(np.array(0, np.int64)))]), flags])
        gathered = op("Gather", [store.const(f"{base}_values", ir.tensor(values)), index], {"axis": 0})
        rebuilt = op("Reshape", [gathered, store.const(f"{base}_shape", ir.tensor(np.array(array.shape, np.int64)))],
                     name=f"{base}_unpacked")
        store.insert(None)
        w.value.replace_all_uses_with(rebuilt)
        rebuilt.shape, rebuilt.dtype = ir.Shape(array.shape), w.value.dtype
        producer = w.value.producer()
        if producer is not None:
            w.graph.remove(producer, safe=True)
        else:
            w.graph.initializers.pop(w.value.name)
        dense += array.nbytes
        packed += bits.nbytes + values.nbytes
    return {"packed_bytes_before": dense, "packed_bytes_after": packed,
            "packed_ratio": round(packed / dense, 4) if dense else None}
