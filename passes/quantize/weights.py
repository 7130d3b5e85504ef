"""quantize-weights: store float weights as low-bit integers, dequantized at run time.

The weight input of MatMul (B), Gemm (B), Conv (W), Gather (data) and LSTM/GRU/RNN (W, R)
becomes a quantized constant behind a DequantizeLinear node (2, 4 and 8 bits), or for
``bits=1`` a bit-packed sign tensor unpacked with BitShift/Mod/Where and scaled per output
channel.

A weight may reach those inputs through data-movement ops (Slice, Split, Concat, Transpose,
Reshape, Squeeze, Unsqueeze, Identity), as exported LSTMs do when they reorder gates with
Slice/Concat inside If bodies. When every path from the stored weight ends in such a
weight input, the dequantized tensor takes the place of the stored weight and the
data-movement ops run on it unchanged (exact: they only select and rearrange elements).
The quantization axis is the consumers' output-channel axis traced back through
Slice/Split/Concat/Transpose/Squeeze/Unsqueeze (their reduction axis for ``blocked``); when
the consumers disagree, or a Reshape or a non-constant axes input hides the axis, it is
axis 0 (per channel; ``blocked`` falls back to that too). Selectors and ``promote_nodes``
address the consuming nodes (the LSTM, MatMul...), not the data-movement ops: such a
weight is quantized only when all its consumers are selected, and is left float, with a
reason in ``stats["skipped"]``, when only some are.

Weights are found as initializers or Constant nodes of every graph (If/Loop/Scan bodies
and functions too); a weight captured by a subgraph from an outer scope is quantized
where it is stored. New constants are stored the way the weight was (initializer or
Constant node). Weights already behind DequantizeLinear, and MatMulNBits/QLinear ops,
have no float weight input and are left alone. Blocked Conv weights are stored as
[M, C/group * kernel] and reshaped back, so blocks span the whole reduction (a depthwise
kernel gets one block, not one scale per weight). Formats needing a newer opset upgrade
the model (``upgrade_opset``); a function importing an older opset is skipped with a reason.

A weight stored as external data (an initializer backed by ``ir.ExternalTensor``) is not
read by the pass: its quantized tensor, scale and zero point become ``ir.LazyTensor``s
computed from the memory-mapped source when the model is saved (or handed to ORT), one
tensor at a time, so peak memory follows the largest tensor, not the model (see
``weights_lazy``). Other weights are quantized at once. Both paths give the same
numbers as ``math.quantize_weight``.

Unnamed consumer nodes (MatMul/Gemm/Conv/Gather/LSTM/GRU/RNN) get a deterministic name
``<op_type>_<n>`` (skipping names in use) before nodes are selected, so ``nodes`` /
``exclude_nodes`` / ``promote_nodes`` can address them; the names stay on the nodes whose
weights were quantized, listed in ``stats["quantized_nodes"]``, and are taken back from the
others.

``promote_nodes`` (the mixed-precision fallback's higher precision) quantizes the weights
of the matched consumers at ``promote_bits`` instead of ``bits`` (same signedness and
granularity; per channel when ``bits=1``): by default 8, or 16 when ``bits=8`` (int16/uint16
behind DequantizeLinear, opset 21: half the float size, noise 48 dB lower), and without
``clip``: clipping trades outliers for resolution, and the outliers are what hurt. A weight shared by
promoted and other consumers takes the higher precision. Every consumer of such a weight is listed in ``stats["promoted_nodes"]``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_nodes
from onnxopt.opset import default_opset, min_ir_version, require_opset
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import NameFilter, promote_field, promote_filter, selector_field, selector_from_options

from onnxopt.naming import Namer, name_unnamed_nodes

from . import gather
from . import math as qm
from . import weights_lazy as lazy
from .weights_reach import CONSUMER_OPS, Reach, follow_weight, weight_axes
from .weights_store import Store, stored_constants, take_back_names

NAME = "quantize-weights"


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class QuantizeWeightsOptions:
    bits: int = _opt(8, "bits per weight: 1 (binary sign x channel scale), 2, 4 or 8")
    signed: bool = _opt(True, "signed integers (int8/int4/int2) instead of unsigned")
    granularity: Literal["per-channel", "per-tensor", "blocked"] = _opt(
        "per-channel", "one scale per output channel, per tensor, or per block along the reduction axis")
    block_size: int = _opt(32, "elements per block along the reduction axis (granularity=blocked)")
    symmetric: bool = _opt(True, "symmetric range (zero point 0 for signed types)")
    pow2: bool = _opt(False, "round every scale up to a power of two")
    clip: str | None = _opt(None, "clip weight outliers before computing scales, e.g. percentile:99.9")
    min_elements: int = _opt(1024, "leave weights with fewer elements in float")
    fork_shared: bool = _opt(False, "give each consumer of a shared weight its own quantized copy")
    upgrade_opset: bool = _opt(True, "upgrade the model's opset when the chosen format needs it (else refuse)")
    gather: Literal["contrib", "onnx", "table", "float"] = _opt(
        "contrib", "Gather tables: dequantize only the gathered rows with ORT's GatherBlockQuantized (contrib) or "
                   "Gather+DequantizeLinear (onnx, 8/16 bits), dequantize the whole table (table), or keep them float")
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    ops: tuple[str, ...] = selector_field("ops")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    partition: tuple[str, ...] = selector_field("partition")
    promote_nodes: tuple[str, ...] = promote_field()
    promote_bits: int = _opt(0, "bits of promote_nodes' weights, 8 or 16; 0: the next step up (8, or 16 when bits=8)")

    def __post_init__(self):
        if self.bits not in (1, 2, 4, 8):
            raise UsageError(f"{NAME}: bits must be 1, 2, 4 or 8, got {self.bits}")
        if self.promote_bits not in (0, 8, 16) or 0 < self.promote_bits <= self.bits:
            raise UsageError(f"{NAME}: promote_bits must be 0, or 8 or 16 above bits={self.bits}, got {self.promote_bits}")
        if self.block_size < 1:
            raise UsageError(f"{NAME}: block_size must be positive, got {self.block_size}")
        if self.bits == 1:
            bad = [k for k, v in (("granularity=blocked", self.granularity == "blocked"),
                                  ("signed=false", not self.signed), ("symmetric=false", not self.symmetric),
                                  ("pow2=true", self.pow2), ("clip", self.clip is not None)) if v]
            if bad:
                raise UsageError(f"{NAME}: bits=1 (sign x mean |w| per channel) does not take {', '.join(bad)}")
        self.clip_percentile  # validates the text

    @property
    def clip_percentile(self) -> float | None:
        if self.clip is None:
            return None
        kind, _, number = self.clip.partition(":")
        try:
            value = float(number)
        except ValueError:
            value = None
        if kind.strip() != "percentile" or value is None or not 50 < value <= 100:
            raise UsageError(f"{NAME}: clip must look like percentile:99.9 (50 < p <= 100), got {self.clip!r}")
        return value


@dataclasses.dataclass
class _Group:
    """One quantized copy of a weight and the uses it feeds."""

    value: ir.Value
    graph: ir.Graph | ir.Function
    const_node: ir.Node | None
    tensor: ir.TensorProtocol
    shape: tuple[int, ...]
    uses: list[tuple[ir.Node, int]]  # the inputs that read the dequantized weight instead
    consumers: list[ir.Node]  # the nodes computing with the weight (behind data-movement ops too)
    bits: int
    axis: int | None  # per-axis or blocked axis of the stored form; None = per tensor
    block: int | None
    drops_original: bool
    flatten: bool = False  # blocked Conv: blocks run over C/group x kernel, stored as [M, C/group*k]
    rows: gather.Rows | None = None  # Gather tables: only the gathered rows are dequantized (gather.py)

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return (self.shape[0], int(np.prod(self.shape[1:]))) if self.flatten else self.shape

    @property
    def deferred(self) -> bool:
        """Computed at save time from the memory-mapped source instead of now."""
        return self.const_node is None and isinstance(self.tensor, ir.ExternalTensor)

    def opset(self) -> int:
        if self.rows is not None:
            return self.rows.opset
        if self.bits == 1:
            return 11
        need = {2: 25, 4: 21, 8: 10, 16: 21}[self.bits]
        if self.block:
            need = max(need, 21)
        elif self.axis is not None:
            need = max(need, 13)
        return need


class QuantizeWeightsPass(Pass):
    """Store MatMul/Gemm/Conv/Gather/LSTM/GRU/RNN weights as 1/2/4/8-bit integers dequantized at run time."""

    name = NAME
    Options = QuantizeWeightsOptions
    fidelity_of = Fidelity.LOSSY

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        """The higher precisions ``promote_nodes`` can give, lowest first: (option changes, label)."""
        steps = (8, 16) if self.options.bits < 8 else (16,)
        return [({"promote_bits": bits}, f"{bits}-bit weights") for bits in steps]

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        stats: dict = {"weights_quantized": 0, "bytes_before": 0, "bytes_after": 0, "skipped": {},
                       "quantized_nodes": [], "promoted_nodes": []}
        if opts.clip is not None:
            stats["clipped"] = {}
        assigned = name_unnamed_nodes(model, CONSUMER_OPS)
        try:
            groups = self._plan_and_upgrade(model, stats)
        except BaseException:
            take_back_names(model, assigned, keep=set())
            raise
        consumers = {node for group in groups for node in group.consumers}
        take_back_names(model, assigned, keep=consumers)
        if not groups:
            return PassResult(model, "opset_upgraded" in stats, stats)
        stats["quantized_nodes"] = sorted({node.name for node in consumers})
        stats["promoted_nodes"] = sorted({n.name for g in groups if g.bits != opts.bits for n in g.consumers})
        namer = Namer(model)
        for group in groups:
            self._apply(group, namer, stats)
        rows = {n.name: g.rows.fmt for g in groups if g.rows is not None for n in g.rows.gathers}
        if rows:
            stats["gather_rows"] = rows
        if any(fmt == "contrib" for fmt in rows.values()):
            model.opset_imports.setdefault(gather.CONTRIB, 1)
        model.ir_version = max(model.ir_version, min_ir_version(default_opset(model)))
        return PassResult(model, True, stats)

    def _plan_and_upgrade(self, model: ir.Model, stats: dict) -> list[_Group]:
        opts = self.options
        groups = self._plan(model, stats["skipped"])
        if not groups:
            return groups
        needed = max(g.opset() for g in groups)
        upgraded = require_opset(
            model, needed, allow_upgrade=opts.upgrade_opset,
            refusal=f"{NAME}: bits={opts.bits} granularity={opts.granularity} needs opset {{needed}}, the model "
                    f"has opset {{current}}; allow upgrade_opset=true or choose per-tensor 8-bit (opset 10)")
        if upgraded:  # the upgrade replaced the graph objects: plan again
            stats["opset_upgraded"] = upgraded
            stats["skipped"] = {}
            groups = self._plan(model, stats["skipped"])
        return groups

    # -- planning -------------------------------------------------------------------------
    def _plan(self, model: ir.Model, skipped: dict) -> list[_Group]:
        selector = selector_from_options(self.options)
        selected = None if selector.is_trivial else set(selector.select(model))
        promote = promote_filter(model, self.options.promote_nodes, NAME)
        groups: list[_Group] = []
        for graph, value, const_node, tensor in stored_constants(model):
            reach = follow_weight(value, len(tensor.shape))
            chosen = [(n, i) for n, i, _ in reach.slots if (selected is None or n in selected)
                      and not (self.options.gather == "float" and n.op_type == "Gather")]
            if not chosen:
                continue
            name = value.name or "(unnamed)"
            reason = self._refusal(value, tensor, graph, reach, chosen)
            planned = reason or (self._plan_moved if reach.moved else self._plan_direct)(
                value, graph, const_node, tensor, reach, chosen, promote)
            if isinstance(planned, str):
                skipped[name] = planned
                continue
            for group in planned:
                if isinstance(graph, ir.Function):  # functions import their own opset; not upgraded here
                    have = graph.opset_imports.get("", 1)
                    if have < group.opset():
                        skipped[name] = f"in function {graph.name} with opset {have} < {group.opset()}"
                        continue
                groups.append(self._with_rows(group, skipped, name))
        return groups

    def _with_rows(self, group: _Group, skipped: dict, name: str) -> _Group:
        """The group with its row Gathers planned (gather.py), or as it was, noting why its table stays whole."""
        opts = self.options
        rows, why = gather.plan(opts.gather, group.uses, group.shape, group.bits, opts.granularity, opts.block_size)
        if why:
            skipped[f"{name} (rows)"] = f"dequantized as a whole table: {why}"
        if rows is None:
            return group
        uses = [(n, i) for n, i in group.uses if n not in rows.gathers]
        return dataclasses.replace(group, uses=uses, rows=rows, flatten=False)

    def _plan_direct(self, value, graph, const_node, tensor, reach, chosen, promote) -> list[_Group] | str:
        """Groups for a weight read directly by its consumers: one, or one per use with fork_shared."""
        shape = tuple(int(d) for d in tensor.shape.numpy())
        uses = list(value.uses())
        keep_original = self.options.fork_shared and len(chosen) < len(uses)
        parts = [[use] for use in chosen] if self.options.fork_shared else [chosen]
        groups = []
        for part in parts:
            consumers = list(dict.fromkeys(n for n, _ in part))
            bits, granularity = self._precision(consumers, promote)
            layouts = {self._layout(n, len(shape), granularity) for n in consumers}
            if len(layouts) > 1:
                return "its consumers need different channel axes; set fork_shared=true"
            axis, block = layouts.pop()
            flat = block is not None and part[0][0].op_type == "Conv" and int(np.prod(shape[2:])) > 1
            groups.append(_Group(value, graph, const_node, tensor, shape, part, consumers, bits, axis, block,
                                 not keep_original, flat))
        return groups

    def _plan_moved(self, value, graph, const_node, tensor, reach, chosen, promote) -> list[_Group]:
        """One group for a weight behind data-movement ops: dequantized where it is stored."""
        shape = tuple(int(d) for d in tensor.shape.numpy())
        consumers = reach.consumers()
        bits, granularity = self._precision(consumers, promote)
        axis, block = self._moved_layout(reach, len(shape), granularity)
        uses = [(use.node, use.idx) for use in value.uses()]
        return [_Group(value, graph, const_node, tensor, shape, uses, consumers, bits, axis, block, True)]

    def _precision(self, consumers: list[ir.Node], promote: NameFilter) -> tuple[int, str]:
        """(bits, granularity) for a weight of these consumers: 8 (or 16) bits when one of them is promoted."""
        opts = self.options
        if promote and any(promote.matches(node) for node in consumers):
            bits = opts.promote_bits or (16 if opts.bits == 8 else 8)
            return (bits, "per-channel") if opts.bits == 1 else (bits, opts.granularity)
        return opts.bits, opts.granularity

    def _refusal(self, value, tensor, graph, reach: Reach, chosen) -> str | None:
        opts = self.options
        if tensor.dtype != ir.DataType.FLOAT:
            return f"dtype {tensor.dtype.name}; only float32 weights are quantized"
        if value.is_graph_input():
            return "the initializer is also a graph input (it can be overridden at run time)"
        if value.is_graph_output() or any(value is out for out in graph.outputs):
            return "the weight is also a graph output"
        size = int(np.prod(tensor.shape.numpy()))
        if size < opts.min_elements:
            return f"{size} elements < min_elements={opts.min_elements}"
        if not qm.all_finite(tensor):
            return "holds NaN or Inf: no finite scale, left float"
        if reach.moved:
            return self._moved_refusal(reach, chosen)
        uses = [(use.node, use.idx) for use in value.uses()]
        if len(chosen) < len(uses) and not opts.fork_shared:
            others = [f"{n.op_type} '{n.name}' input {i}" for n, i in uses if (n, i) not in chosen]
            return f"also used by {others[0]} (not a selected weight input); set fork_shared=true"
        return None

    @staticmethod
    def _moved_refusal(reach: Reach, chosen) -> str | None:
        """Behind data-movement ops the weight is dequantized for every path, so every path must end in a
        selected weight input."""
        if reach.problem:
            return f"{reach.problem} (behind data-movement ops every path must end in a weight input)"
        unselected = [n for n, i, _ in reach.slots if (n, i) not in chosen]
        if unselected:
            return (f"its consumer {unselected[0].op_type} '{unselected[0].name}' is not selected (behind "
                    f"data-movement ops a weight is quantized for all its consumers or none)")
        return None

    def _layout(self, node: ir.Node, rank: int, granularity: str) -> tuple[int | None, int | None]:
        channel, reduction = weight_axes(node, rank)
        if granularity == "per-tensor" or channel is None:
            return None, None
        if granularity == "blocked":
            return reduction, self.options.block_size
        return channel, None

    def _moved_layout(self, reach: Reach, rank: int, granularity: str) -> tuple[int | None, int | None]:
        """The consumers' traced axes; axis 0 per channel when they disagree or a Reshape hides them."""
        if granularity == "per-tensor" or rank < 2:
            return None, None
        reduction = reach.stored_axis(1)
        if granularity == "blocked" and reduction is not None:
            return reduction, self.options.block_size
        channel = reach.stored_axis(0)
        return (0 if channel is None else channel), None

    # -- rewriting ------------------------------------------------------------------------
    def _apply(self, group: _Group, namer: Namer, stats: dict) -> None:
        opts = self.options
        base = group.value.name or "weight"
        as_nodes = group.const_node is not None or not isinstance(group.graph, ir.Graph)
        store = Store(group.graph, namer, as_nodes)
        if group.rows is not None:
            out = self._rows(group, base, store, namer)
        elif group.bits == 1:
            out = self._binary(group, base, store)
        else:
            qtype = qm.QuantType(group.bits, opts.signed)
            q, scale, zp, clipped = self._quantized_tensors(group, qtype)
            if opts.clip is not None:
                stats["clipped"][base] = stats["clipped"].get(base, 0) + clipped
            inputs = [store.const(f"{base}_quantized", q), store.const(f"{base}_scale", scale)]
            if not (opts.symmetric and opts.signed):
                inputs.append(store.const(f"{base}_zero_point", zp))
            attrs = {} if group.axis is None else {"axis": group.axis}
            if group.block:
                attrs["block_size"] = group.block
            out = store.op("DequantizeLinear", inputs, attrs, None if group.flatten else f"{base}_dequantized")
            if group.flatten:
                out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(group.stored_shape)
                shape = store.const(f"{base}_shape", ir.tensor(np.array(group.shape, dtype=np.int64)))
                out = store.op("Reshape", [out, shape], name=f"{base}_dequantized")
        if out is not None:
            out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(group.shape)
        store.insert(group.const_node)
        for node, index in group.uses:
            node.replace_input_with(index, out)
        stats["weights_quantized"] += 1
        stats["bytes_after"] += store.nbytes
        if group.drops_original and not group.value.uses():
            stats["bytes_before"] += group.tensor.nbytes
            if group.const_node is not None:
                group.graph.remove(group.const_node, safe=True)
            elif group.value.name in getattr(group.graph, "initializers", {}):
                group.graph.initializers.pop(group.value.name)

    def _rows(self, group: _Group, base: str, store: Store, namer: Namer) -> ir.Value | None:
        """Row Gathers dequantize their rows only; other consumers (a tied projection) share the integers."""
        opts, rows = self.options, group.rows
        clip = opts.clip_percentile if group.bits == opts.bits else None
        q, scale, zp = gather.tensors(group.tensor, rows, qm.QuantType(group.bits, opts.signed), opts.symmetric,
                                      opts.pow2, clip, group.deferred)
        q, scale = store.const(f"{base}_quantized", q), store.const(f"{base}_scale", scale)
        zp = None if zp is None else store.const(f"{base}_zero_point", zp)
        gather.replace_gathers(rows, q, scale, zp, namer)
        if rows.fmt == "contrib" and isinstance(group.graph, ir.Function):  # a function imports its own domains
            group.graph.opset_imports.setdefault(gather.CONTRIB, 1)
        return gather.dequantize_table(rows, q, scale, zp, store, f"{base}_dequantized") if group.uses else None

    def _quantized_tensors(self, group: _Group, qtype: qm.QuantType):
        """(quantized, scale, zero point, clipped count): computed now, or deferred to save time."""
        opts = self.options
        stored = group.stored_shape
        clip = opts.clip_percentile if group.bits == opts.bits else None  # promoted: outliers are the harm
        args = (qtype, group.axis, group.block, opts.symmetric, opts.pow2, clip)
        source = lazy.WeightSource(group.tensor)
        if not group.deferred:
            q, scale, zp, clipped = source.apply(lambda w: lazy.quantize_tensor(w.reshape(stored), *args))
            return q, ir.tensor(scale), ir.tensor(zp, dtype=qtype.ir_dtype), clipped
        params = lazy.param_shape(stored, group.axis, group.block)
        q = lazy.deferred(source, lambda w: lazy.quantize_tensor(w.reshape(stored), *args)[0], qtype.ir_dtype, stored)
        scale = lazy.deferred(source, lambda w: lazy.weight_params(w.reshape(stored), *args)[0],
                              ir.DataType.FLOAT, params)
        zp = lazy.deferred(source, lambda w: lazy.weight_params(w.reshape(stored), *args)[1], qtype.ir_dtype, params)
        clipped = 0
        if clip is not None:  # a statistic of this run: one bounded read of the weight now
            clipped = source.apply(lambda w: lazy.weight_params(w.reshape(stored), *args)[2])
        return q, scale, zp, clipped

    def _binary_tensors(self, group: _Group):
        """(packed sign bits, scale, -scale), computed now or deferred to save time."""
        shape, axis = group.shape, group.axis
        scale_shape = () if axis is None else tuple(d if i == axis else 1 for i, d in enumerate(shape))

        def scale_of(w: np.ndarray) -> np.ndarray:
            if axis is None:
                return qm.binary_scale(w.reshape(1, -1), axis=0).reshape(())
            return qm.binary_scale(w, axis).reshape(scale_shape)

        def bits_of(w: np.ndarray) -> np.ndarray:
            return qm.pack_bits(w >= 0)

        source = lazy.WeightSource(group.tensor)
        if not group.deferred:
            packed, scale = source.apply(lambda w: (bits_of(w), scale_of(w)))
            return ir.tensor(packed), ir.tensor(scale), ir.tensor(-scale)
        size = int(np.prod(shape))
        return (lazy.deferred(source, bits_of, ir.DataType.UINT8, ((size + 7) // 8,)),
                lazy.deferred(source, scale_of, ir.DataType.FLOAT, scale_shape),
                lazy.deferred(source, lambda w: -scale_of(w), ir.DataType.FLOAT, scale_shape))

    def _binary(self, group: _Group, base: str, store: Store) -> ir.Value:
        """sign(w) in one bit per weight: Where(bit, scale, -scale), scale = mean |w| per channel."""
        n = int(np.prod(group.shape))
        bits_tensor, scale, neg_scale = self._binary_tensors(group)
        i64 = lambda *v: ir.tensor(np.array(v, dtype=np.int64))  # noqa: E731
        packed = store.const(f"{base}_bits", bits_tensor)
        col = store.op("Reshape", [packed, store.const(f"{base}_col", i64(-1, 1))])
        shifts = store.const(f"{base}_shifts", ir.tensor(np.arange(8, dtype=np.uint8)))
        shifted = store.op("BitShift", [col, shifts], {"direction": "RIGHT"})
        two = store.const(f"{base}_two", ir.tensor(np.array(2, dtype=np.uint8)))
        bits = store.op("Mod", [shifted, two])
        flat = store.op("Reshape", [bits, store.const(f"{base}_flat", i64(-1))])
        if n % 8:
            flat = store.op("Slice", [flat, store.const(f"{base}_start", i64(0)), store.const(f"{base}_end", i64(n))])
        flags = store.op("Cast", [flat], {"to": ir.DataType.BOOL})
        shaped = store.op("Reshape", [flags, store.const(f"{base}_shape", i64(*group.shape))])
        pos = store.const(f"{base}_scale", scale)
        neg = store.const(f"{base}_neg_scale", neg_scale)
        return store.op("Where", [shaped, pos, neg], name=f"{base}_dequantized")


GATHER_SELECTORS = ("nodes", "exclude_nodes", "exclude_ops", "region", "promote_nodes")


def gather_bits_field():
    return _opt(8, "bits of Gather tables (embeddings), stored as quantize-weights does them (gather=contrib: "
                   "only the gathered rows are dequantized); 0 keeps them float")


def quantize_gather_tables(model: ir.Model, owner_options, bits: int, ops_selector: bool = False) -> dict:
    """``bits``-bit rows for the Gather tables chosen by the selector fields of ``owner_options`` (the
    ``gather_bits`` of quantize-dynamic and quantize-static): quantize-weights' stats, or {} when no table
    is selected (``ops_selector``: the owner's ``ops`` is a selector, which must then name Gather). The Gather
    nodes join ``quantized_nodes``, so mixed precision can keep them float."""
    if bits == 0 or not any(n.op_type == "Gather" for n in all_nodes(model)):
        return {}
    fields = {f.name for f in dataclasses.fields(owner_options)}
    if ops_selector and owner_options.ops and "Gather" not in owner_options.ops:
        return {}
    selectors = {k: getattr(owner_options, k) for k in GATHER_SELECTORS if k in fields}
    options = QuantizeWeightsOptions(bits=bits, ops=("Gather",), **selectors)
    try:  # the pass names unnamed Gathers before it selects, so an excluded name can match only then
        stats = QuantizeWeightsPass(options)(model).stats
    except UsageError as err:
        if "matched no node" in str(err):  # the owner's selectors choose no Gather
            return {}
        raise
    return stats if stats["weights_quantized"] else {}


def merge_gather_stats(stats: dict, tables: dict) -> None:
    """Fold quantize_gather_tables' stats into the calling pass's stats."""
    if not tables:
        return
    stats["weights_quantized"] = stats.get("weights_quantized", 0) + tables["weights_quantized"]
    stats["quantized_nodes"] = sorted(set(stats.get("quantized_nodes", [])) | set(tables["quantized_nodes"]))
    stats["gather_tables"] = {key: tables[key] for key in ("gather_rows", "bytes_before", "bytes_after", "skipped",
                                                           "promoted_nodes", "opset_upgraded") if tables.get(key)}
