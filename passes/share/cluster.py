"""cluster-weights: store a float weight as a k-means codebook and packed indices.

Each float32 weight (initializer or Constant node, in any graph) of at least
``min_elements`` becomes ``2^bits`` float codebook entries (one codebook per tensor, or per
group of ``group_size`` output channels) and one index per element, rebuilt at run time as
``Gather(codebook, Cast(DequantizeLinear(indices)))`` (plus an int32 offset per channel group).
Indices are stored as uint2 (bits 1-2, opset 25), uint4 (bits 3-4, opset 21) or uint8;
the model's opset is upgraded when needed (``upgrade_opset``). DequantizeLinear with scale
1 is how ORT's CPU provider reads packed sub-byte integers, and it is also what keeps the
file small after ``-p cleanup``: constant folding preserves DequantizeLinear (onnxscript's
folder lists it as never folded), so the rebuilt float weight is never written back.

A weight read by several nodes is clustered once; its rebuild lives where it is stored,
so readers in If/Loop bodies keep reading it. Weights whose readers are not all selected,
graph inputs/outputs, and codebooks of an earlier run are left, with a reason in
``stats["skipped"]``. ``promote_nodes`` gives the weights of the matched readers
``promote_bits`` (the mixed-precision fallback's ladder: 8, or twice ``bits``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.naming import Namer, name_unnamed_nodes
from onnxopt.opset import default_opset, min_ir_version, require_opset
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.passes.quantize.weights_lazy import pack_low_bits
from onnxopt.passes.quantize.weights_reach import weight_axes
from onnxopt.passes.quantize.weights_store import Store, take_back_names
from onnxopt.selectors import promote_field, promote_filter, selector_field, selector_from_options

from .kmeans import kmeans_1d
from .scope import Weight, stored_weights

NAME = "cluster-weights"
QUANT_OPS = ("DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear")
STORAGE = ((2, ir.DataType.UINT2, 25), (4, ir.DataType.UINT4, 21), (8, ir.DataType.UINT8, 10))


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class ClusterWeightsOptions:
    bits: int = _opt(4, "codebook of 2^bits entries, 1 to 8")
    granularity: Literal["per-tensor", "per-channel-group"] = _opt(
        "per-tensor", "one codebook per weight, or one per group of output channels")
    group_size: int = _opt(8, "output channels sharing a codebook (granularity=per-channel-group)")
    min_elements: int = _opt(1024, "leave weights with fewer elements in float")
    iterations: int = _opt(200, "at most this many Lloyd steps")
    init: Literal["linear", "quantile"] = _opt(
        "linear", "start from evenly spaced values between min and max (keeps outliers), or from quantiles")
    upgrade_opset: bool = _opt(True, "upgrade the model's opset when the index type needs it (else refuse)")
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    ops: tuple[str, ...] = selector_field("ops")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    promote_nodes: tuple[str, ...] = promote_field()
    promote_bits: int = _opt(0, "bits of promote_nodes' weights; 0: twice bits, at most 8")

    def __post_init__(self):
        if not 1 <= self.bits <= 8:
            raise UsageError(f"{NAME}: bits must be 1 to 8, got {self.bits}")
        if self.promote_bits and not self.bits < self.promote_bits <= 8:
            raise UsageError(f"{NAME}: promote_bits must be 0 or above bits={self.bits} and at most 8, "
                             f"got {self.promote_bits}")
        if self.group_size < 1 or self.iterations < 1:
            raise UsageError(f"{NAME}: group_size and iterations must be positive")


def storage(bits: int) -> tuple[int, ir.DataType, int]:
    """(stored bits, index type, opset DequantizeLinear needs for it)."""
    return next(entry for entry in STORAGE if bits <= entry[0])


@dataclasses.dataclass
class _Plan:
    weight: Weight
    readers: list[ir.Node]
    bits: int
    axis: int | None  # channel axis of the groups; None per tensor


class ClusterWeightsPass(Pass):
    """Store float weights as a k-means codebook of 2^bits values plus packed indices."""

    name = NAME
    Options = ClusterWeightsOptions
    fidelity_of = Fidelity.LOSSY

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        steps, bits = [], self.options.bits
        while bits < 8:
            bits = min(8, 2 * bits)
            steps.append(({"promote_bits": bits}, f"{bits}-bit codebook"))
        return steps

    def call(self, model: ir.Model) -> PassResult:
        stats: dict = {"weights_clustered": 0, "bytes_before": 0, "bytes_after": 0, "codebooks": {},
                       "skipped": {}, "quantized_nodes": [], "promoted_nodes": []}
        assigned = name_unnamed_nodes(model)
        try:
            plans = self._plan(model, stats)
            if plans:
                needed = max(storage(p.bits)[2] for p in plans)
                upgraded = require_opset(
                    model, needed, allow_upgrade=self.options.upgrade_opset,
                    refusal=f"{NAME}: bits={self.options.bits} indices need opset {{needed}}, the model has "
                            f"opset {{current}}; allow upgrade_opset=true or use bits=5 or more (uint8 indices)")
                if upgraded:  # the upgrade replaced the graph objects: plan again
                    stats["opset_upgraded"], stats["skipped"] = upgraded, {}
                    plans = self._plan(model, stats)
        except BaseException:
            take_back_names(model, assigned, keep=set())
            raise
        readers = {node for plan in plans for node in plan.readers}
        take_back_names(model, assigned, keep=readers)
        stats["quantized_nodes"] = sorted(node.name for node in readers)
        stats["promoted_nodes"] = sorted({n.name for p in plans if p.bits != self.options.bits for n in p.readers})
        namer = Namer(model)
        for plan in plans:
            self._apply(plan, namer, stats)
        if plans:
            model.ir_version = max(model.ir_version, min_ir_version(default_opset(model)))
        return PassResult(model, bool(plans) or "opset_upgraded" in stats, stats)

    # -- planning -------------------------------------------------------------------------
    def _plan(self, model: ir.Model, stats: dict) -> list[_Plan]:
        opts = self.options
        selector = selector_from_options(opts)
        selected = None if selector.is_trivial else set(selector.select(model))
        promote = promote_filter(model, opts.promote_nodes, NAME)
        plans = []
        for weight in stored_weights(model):
            if weight.tensor.dtype != ir.DataType.FLOAT or weight.tensor.size < opts.min_elements:
                continue  # integers, shapes, biases: not worth a codebook
            readers = list(dict.fromkeys(use.node for use in weight.value.uses()))
            if not readers or (selected is not None and not any(n in selected for n in readers)):
                continue
            reason = self._refusal(weight, readers, selected)
            if reason:
                stats["skipped"][weight.value.name or "(unnamed)"] = reason
                continue
            bits = opts.bits
            if promote and any(promote.matches(n) for n in readers):
                bits = opts.promote_bits or min(8, 2 * opts.bits)
            if isinstance(weight.graph, ir.Function) and weight.graph.opset_imports.get("", 1) < storage(bits)[2]:
                stats["skipped"][weight.value.name] = f"in function {weight.graph.name} with an opset older than " \
                                                      f"{storage(bits)[2]}"
                continue
            plans.append(_Plan(weight, readers, bits, self._axis(weight, readers)))
        return plans

    def _refusal(self, weight: Weight, readers: list[ir.Node], selected) -> str | None:
        if weight.fixed():
            return "the weight is a graph input or output"
        if selected is not None and not all(n in selected for n in readers):
            other = next(n for n in readers if n not in selected)
            return f"also read by {other.op_type} '{other.name}', which is not selected"
        if all(_reads_as_codebook(n, weight.value) for n in readers):
            return "already a codebook"
        if any(n.op_type in QUANT_OPS for n in readers):
            return "a quantization parameter"
        return None

    def _axis(self, weight: Weight, readers: list[ir.Node]) -> int | None:
        rank = len(weight.tensor.shape)
        if self.options.granularity == "per-tensor" or rank == 0:
            return None
        axes = {weight_axes(n, rank)[0] for n in readers}
        axis = axes.pop() if len(axes) == 1 else None
        return 0 if axis is None else axis

    # -- rewriting ------------------------------------------------------------------------
    def _apply(self, plan: _Plan, namer: Namer, stats: dict) -> None:
        weight, bits = plan.weight, plan.bits
        w = weight.array().astype(np.float32, copy=False)
        codebook, index, offsets = cluster_array(w, bits, plan.axis, self.options)
        stored_bits, index_type, _ = storage(bits)
        base = weight.value.name or "weight"
        as_nodes = weight.const_node is not None or isinstance(weight.graph, ir.Function)
        store = Store(weight.graph, namer, as_nodes)
        if stored_bits == 8:
            packed = ir.Tensor(index.astype(np.uint8), dtype=index_type)
        else:
            packed = ir.PackedTensor(pack_low_bits(index.astype(np.uint8), stored_bits), index_type, shape=w.shape)
        ids = store.op("DequantizeLinear", [store.const(f"{base}_indices", packed),
                                            store.const(f"{base}_index_scale", ir.tensor(np.float32(1.0)))])
        ids = store.op("Cast", [ids], {"to": ir.DataType.INT32})
        if offsets is not None:
            ids = store.op("Add", [ids, store.const(f"{base}_group_offsets", ir.tensor(offsets))])
        out = store.op("Gather", [store.const(f"{base}_codebook", ir.tensor(codebook)), ids], {"axis": 0},
                       name=f"{base}_clustered")
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(w.shape)
        store.insert(weight.const_node)
        weight.value.replace_all_uses_with(out)
        weight.remove()
        stats["weights_clustered"] += 1
        stats["bytes_before"] += weight.nbytes
        stats["bytes_after"] += store.nbytes
        stats["codebooks"][base] = int(np.unique(codebook).size)


def cluster_array(w: np.ndarray, bits: int, axis: int | None, opts: ClusterWeightsOptions):
    """(codebook float32 [groups * 2^bits], index of each element within its group's codebook,
    int32 offsets of each channel's codebook broadcastable to ``w`` or None per tensor)."""
    k, group_size = 1 << bits, opts.group_size
    if axis is None:
        codebook, index = kmeans_1d(w, k, opts.iterations, opts.init)
        return codebook, index.reshape(w.shape), None
    moved = np.moveaxis(w, axis, 0)
    channels = moved.shape[0]
    books, index = [], np.empty(moved.shape, dtype=np.int64)
    for group, start in enumerate(range(0, channels, group_size)):
        block = moved[start:start + group_size]
        book, idx = kmeans_1d(block, k, opts.iterations, opts.init)
        books.append(book)
        index[start:start + group_size] = idx.reshape(block.shape)
    offsets = (np.arange(channels) // group_size * k).astype(np.int32)
    shape = [1] * w.ndim
    shape[axis] = channels
    return np.concatenate(books), np.moveaxis(index, 0, axis), offsets.reshape(shape)


def _reads_as_codebook(node: ir.Node, value: ir.Value) -> bool:
    """Whether ``node`` is a Gather reading ``value`` as the codebook of indices rebuilt by this pass."""
    if node.op_type != "Gather" or node.inputs[0] is not value or len(node.inputs) < 2:
        return False
    producer = node.inputs[1].producer() if node.inputs[1] is not None else None
    return producer is not None and producer.op_type in ("Cast", "Add")
