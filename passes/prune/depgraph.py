"""The channel dependency graph of prune-channels (after torch-pruning's DepGraph, on ONNX).

Every output channel of a prunable layer (Conv, ConvTranspose, Gemm, MatMul with a constant
weight) is an *element*; a value whose channel axis is tracked carries a list of element
ids, one per index along that axis. Walking the main graph in order, each op maps its
inputs' lists to its outputs': elementwise ops and pooling keep them, Add/Mul of two
tracked values unites them index by index (a residual group), Concat concatenates them,
Split slices them, Flatten/Reshape repeat each id for the positions it spans, a depthwise
Conv passes them through. Every constant sliced along a tracked axis (weights, biases,
BatchNorm parameters, per-channel scales, the consumers' input channels) is a *param*; a
constant sliced by two lists (a shared weight) unites them too, so it is pruned once.

Wherever the walk cannot follow a channel (an unknown op, a graph output, a read inside an
If/Loop body, a Reshape that splits the axis, a Shape), the elements there are *blocked*
with the reason: their groups stay whole. Removing a set of element roots then slices
every param and fixes the attributes and shape constants that name a channel count.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from .channel_graph import ChannelGraph, Param, Sink, Source, Track, UnionFind, _normalize
from .common import attr_int, attr_ints, constant_array, static_shapes
from .layout_ops import LayoutOps

UNARY = frozenset({
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Exp", "Log", "Neg", "Abs",
    "Sqrt", "Reciprocal", "Identity", "Cast", "Erf", "Softplus", "Softsign", "Elu", "Selu", "Celu", "Gelu",
    "Mish", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Dropout", "Swish",
})
ZERO_KEEPING = frozenset({  # f(0) == 0
    "Relu", "LeakyRelu", "Tanh", "Neg", "Abs", "Sqrt", "Identity", "Cast", "Erf", "Softsign", "Elu", "Selu",
    "Celu", "Gelu", "HardSwish", "Mish", "Floor", "Ceil", "Round", "Sign", "Sin", "ThresholdedRelu", "Dropout",
    "Swish",
})
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Pow", "PRelu", "Where"})



class _Builder(LayoutOps):
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.shapes = static_shapes(model)
        self.uf = UnionFind()
        self.tracks: dict[ir.Value, Track] = {}
        self.params: list[Param] = []
        self.param_uses: dict[ir.Value, set[tuple[int, int]]] = defaultdict(set)
        self.param_by_key: dict[tuple[int, int], Param] = {}
        self.sources: list[Source] = []
        self.source_ids: dict[int, list[int]] = {}  # id(weight value) -> ids (shared weights)
        self.sinks: list[Sink] = []
        self.blocks: list[tuple[list[int], str]] = []
        self.fixups: list = []
        self.bn_scales: list = []
        self.handled: set[tuple[int, int]] = set()  # (id(node), input index) consumed by a rule

    # -- helpers ---------------------------------------------------------------------------
    def rank(self, value: ir.Value) -> int | None:
        shape = self.shapes.get(value.name) if value is not None else None
        return None if shape is None else len(shape)

    def dim(self, value: ir.Value, axis: int) -> int | None:
        shape = self.shapes.get(value.name)
        return None if shape is None or axis >= len(shape) else shape[axis]

    def block(self, ids, reason: str) -> None:
        self.blocks.append((list(ids), reason))

    def param(self, node: ir.Node, index: int, axis: int, ids: list[int]) -> bool:
        """Record that constant input ``index`` of ``node`` is sliced along ``axis`` by ``ids``."""
        value = node.inputs[index]
        array = constant_array(value)
        if array is None or axis >= array.ndim or array.shape[axis] != len(ids):
            return False
        self.param_uses[value].add((id(node), index))
        key = (id(value), axis)
        if key in self.param_by_key:
            for a, b in zip(self.param_by_key[key].ids, ids):
                self.uf.union(a, b)
        else:
            self.param_by_key[key] = Param(value, axis, list(ids))
            self.params.append(self.param_by_key[key])
        return True

    def out(self, value: ir.Value, axis: int, rank: int, ids: list[int], zero) -> None:
        if value is None or not value.name and not value.uses():
            return
        self.tracks[value] = Track(axis, rank, list(ids), np.asarray(zero, dtype=bool))

    def handle(self, node: ir.Node, *indices: int) -> None:
        for i in indices:
            self.handled.add((id(node), i))

    def tracked(self, node: ir.Node) -> list[tuple[int, Track]]:
        return [(i, self.tracks[v]) for i, v in enumerate(node.inputs) if v is not None and v in self.tracks]

    # -- walk ------------------------------------------------------------------------------
    def build(self) -> ChannelGraph:
        for node in self.graph:
            if node.domain not in ("", "ai.onnx"):
                continue
            rule = getattr(self, f"_op_{node.op_type}", None)
            if rule is None:
                if node.op_type in UNARY:
                    rule = self._unary
                elif node.op_type in POOLS:
                    rule = self._pool
                elif node.op_type in BINARY:
                    rule = self._broadcast
            if rule is not None:
                rule(node)
        self._check_uses()
        return ChannelGraph(self.uf, self.tracks, self.params, self.sources, self.sinks, self.blocks,
                            self.fixups, self.bn_scales)

    def _check_uses(self) -> None:
        outputs = set(self.graph.outputs)
        for value, track in self.tracks.items():
            if value in outputs:
                self.block(track.ids, f"{value.name} is a graph output")
            for use in value.uses():
                node = use.node
                if node.graph is not self.graph:
                    self.block(track.ids, f"{value.name} is read inside a subgraph ({node.op_type} body)")
                elif (id(node), use.idx) not in self.handled:
                    self.block(track.ids, f"{node.op_type} {node.name or ''} reads {value.name} "
                                          "in a way the channel graph cannot follow".replace("  ", " "))
        for value, uses in self.param_uses.items():
            accounted = {(id(u.node), u.idx) for u in value.uses()}
            if accounted - uses or value in outputs:
                for p in self.params:
                    if p.value is value:
                        self.block(p.ids, f"constant {value.name} is also read by a node the pruning does not slice")

    # -- producers and consumers -------------------------------------------------------------
    def _new_source(self, node: ir.Node, weight_index: int, out_axis: int, count: int, weight_out_axis: int,
                    groups: int = 1) -> list[int]:
        weight = node.inputs[weight_index]
        if id(weight) in self.source_ids and len(self.source_ids[id(weight)]) == count:
            ids = self.source_ids[id(weight)]
        else:
            ids = self.uf.new(count)
            self.source_ids[id(weight)] = ids
        array = np.moveaxis(constant_array(weight), weight_out_axis, 0)
        self.sources.append(Source(node, ids, array, groups))
        self.param(node, weight_index, weight_out_axis, ids)
        return ids

    def _sink(self, node: ir.Node, index: int, track: Track, weight_index: int, weight_axis: int) -> bool:
        weight = node.inputs[weight_index]
        array = constant_array(weight)
        if array is None or not self.param(node, weight_index, weight_axis, track.ids):
            return False
        moved = np.moveaxis(array, weight_axis, 0).reshape(array.shape[weight_axis], -1)
        self.sinks.append(Sink(node, node.inputs[index], track.ids, weight, weight_axis,
                               ~np.any(moved != 0, axis=1), track.zero))
        self.handle(node, index)
        return True

    def _bias_zero(self, node: ir.Node, index: int, count: int) -> np.ndarray:
        bias = constant_array(node.inputs[index]) if len(node.inputs) > index else None
        return np.ones(count, bool) if bias is None else (bias.reshape(-1) == 0) if bias.size == count else np.zeros(count, bool)

    def _op_Conv(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        weight = constant_array(w)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if weight is None or (has_bias and constant_array(node.inputs[2]) is None):
            return
        group = attr_int(node, "group", 1)
        m, c_per_group = weight.shape[0], weight.shape[1]
        rank = weight.ndim
        track = self.tracks.get(x)
        if track is not None and track.axis != 1:
            return
        dead_rows = ~np.any(weight.reshape(m, -1) != 0, axis=1)
        if group == 1:
            if track is not None:
                self._sink(node, 0, track, 1, 1)
            ids = self._new_source(node, 1, 1, m, 0)
            if has_bias:
                self.param(node, 2, 0, ids)
            zero = dead_rows & self._bias_zero(node, 2, m)
        elif c_per_group == 1 and track is not None and len(track.ids) == group:  # depthwise
            mult = m // group
            ids = [track.ids[j // mult] for j in range(m)]
            self.param(node, 1, 0, ids)
            if has_bias:
                self.param(node, 2, 0, ids)
            self.handle(node, 0)
            in_zero = np.repeat(track.zero, mult)
            zero = (in_zero | dead_rows) & self._bias_zero(node, 2, m)
            self.fixups.append(_set_group(node, track.ids))
        else:  # grouped: only its own output channels, an equal count per group
            if track is not None:
                self.block(track.ids, f"input channels of grouped Conv {node.name} (group={group})")
                self.handle(node, 0)
            ids = self._new_source(node, 1, 1, m, 0, groups=group)
            if has_bias:
                self.param(node, 2, 0, ids)
            zero = dead_rows & self._bias_zero(node, 2, m)
        self.out(node.outputs[0], 1, rank, ids, zero)

    def _op_ConvTranspose(self, node: ir.Node) -> None:
        x, w = node.inputs[0], node.inputs[1]
        weight = constant_array(w)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        if weight is None or attr_int(node, "group", 1) != 1 or (has_bias and constant_array(node.inputs[2]) is None):
            return
        if attr_ints(node, "output_shape") is not None:
            pass
        track = self.tracks.get(x)
        if track is not None and track.axis == 1:
            self._sink(node, 0, track, 1, 0)
        m = weight.shape[1]
        ids = self._new_source(node, 1, 1, m, 1)
        if has_bias:
            self.param(node, 2, 0, ids)
        dead = ~np.any(np.moveaxis(weight, 1, 0).reshape(m, -1) != 0, axis=1)
        self.out(node.outputs[0], 1, weight.ndim, ids, dead & self._bias_zero(node, 2, m))

    def _op_Gemm(self, node: ir.Node) -> None:
        b = constant_array(node.inputs[1])
        c = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if b is None or b.ndim != 2 or (len(node.inputs) > 2 and node.inputs[2] is not None and c is None):
            return
        trans_a, trans_b = attr_int(node, "transA", 0), attr_int(node, "transB", 0)
        track = self.tracks.get(node.inputs[0])
        if track is not None and track.axis == (0 if trans_a else 1) and not trans_a:
            self._sink(node, 0, track, 1, 1 if trans_b else 0)
        n_axis = 0 if trans_b else 1
        n = b.shape[n_axis]
        ids = self._new_source(node, 1, 1, n, n_axis)
        zero = ~np.any(np.moveaxis(b, n_axis, 0) != 0, axis=1)
        if c is not None:
            if c.ndim >= 1 and c.shape[-1] == n and c.size == n:
                self.param(node, 2, c.ndim - 1, ids)
                zero &= c.reshape(-1) == 0
            elif c.size != 1:
                self.block(ids, f"Gemm {node.name} has a bias that is not per output feature")
            else:
                zero &= float(c.reshape(-1)[0]) == 0
        self.out(node.outputs[0], 1, 2, ids, zero)

    def _op_MatMul(self, node: ir.Node) -> None:
        a, b = node.inputs
        weight = constant_array(b)
        rank = self.rank(a)
        track = self.tracks.get(a)
        if weight is None or weight.ndim != 2 or rank is None or rank < 2:
            return
        if track is not None and track.axis == rank - 1:
            self._sink(node, 0, track, 1, 0)
        elif track is not None:
            self.block(track.ids, f"MatMul {node.name} reads a tracked axis other than its reduction axis")
            self.handle(node, 0)
        ids = self._new_source(node, 1, rank - 1, weight.shape[1], 1)
        self.out(node.outputs[0], rank - 1, rank, ids, ~np.any(weight != 0, axis=0))

    # -- channel-preserving ops ----------------------------------------------------------------
    def _unary(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0]) if node.inputs else None
        if track is None:
            return
        if node.op_type == "Clip":
            lo, hi = (constant_array(v) if v is not None else None for v in (list(node.inputs) + [None, None])[1:3])
            if lo is None and "min" in node.attributes:
                lo = node.attributes["min"].as_float()
            if hi is None and "max" in node.attributes:
                hi = node.attributes["max"].as_float()
            keeps = (lo is None or float(lo) <= 0) and (hi is None or float(hi) >= 0)
            if any(v is not None and constant_array(v) is None for v in node.inputs[1:]):
                return
            self.handle(node, *range(len(node.inputs)))
        else:
            keeps = node.op_type in ZERO_KEEPING
            self.handle(node, 0)
        if node.op_type == "Dropout" and len(node.outputs) > 1 and node.outputs[1].uses():
            self.block(track.ids, f"the mask output of Dropout {node.name}")
        zero = track.zero if keeps else np.zeros(len(track.ids), bool)
        self.out(node.outputs[0], track.axis, track.rank, track.ids, zero)

    def _pool(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None or track.axis != 1:
            return
        if len(node.outputs) > 1 and node.outputs[1].uses():
            self.block(track.ids, f"the indices output of {node.op_type} {node.name}")
        self.handle(node, 0)
        self.out(node.outputs[0], 1, track.rank, track.ids, track.zero)

    def _per_channel(self, node: ir.Node, names: tuple[int, ...]) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None or track.axis != 1:
            return
        if any(constant_array(node.inputs[i]) is None for i in names if i < len(node.inputs)):
            return
        for i in names:
            if i < len(node.inputs) and not self.param(node, i, 0, track.ids):
                return
        self.handle(node, 0)
        arrays = [constant_array(node.inputs[i]) for i in names]
        if node.op_type == "BatchNormalization":
            scale, bias, mean, var = arrays
            eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
            self.bn_scales.append((track.ids, np.abs(scale)))
            shift = bias - mean * scale / np.sqrt(var + eps)
            zero = ((scale == 0) & (bias == 0)) | (track.zero & (shift == 0))
            if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                self.block(track.ids, f"training outputs of BatchNormalization {node.name}")
        else:
            zero = np.zeros(len(track.ids), bool)
        self.out(node.outputs[0], 1, track.rank, track.ids, zero)

    def _op_BatchNormalization(self, node):
        self._per_channel(node, (1, 2, 3, 4))

    def _op_InstanceNormalization(self, node):
        self._per_channel(node, (1, 2))

    def _broadcast(self, node: ir.Node) -> None:
        inputs = list(node.inputs)
        start = 1 if node.op_type == "Where" else 0
        tracked = [(i, self.tracks[v]) for i, v in enumerate(inputs) if v is not None and v in self.tracks]
        if not tracked:
            return
        ranks = [self.rank(v) for v in inputs if v is not None]
        if any(r is None for r in ranks):
            return
        out_rank = max(ranks)
        axes = {track.axis + out_rank - track.rank for _, track in tracked}
        lengths = {len(track.ids) for _, track in tracked}
        all_ids = [i for _, t in tracked for i in t.ids]
        if len(axes) != 1 or len(lengths) != 1:
            self.block(all_ids, f"{node.op_type} {node.name} mixes channel axes or counts")
            return
        axis, count = axes.pop(), lengths.pop()
        ids = tracked[0][1].ids
        for _, track in tracked[1:]:
            for a, b in zip(ids, track.ids):
                self.uf.union(a, b)
        zeros = {i: t.zero for i, t in tracked}
        for i, value in enumerate(inputs):
            if value is None or value in self.tracks:
                continue
            local = axis - (out_rank - self.rank(value))
            size = 1 if local < 0 else self.dim(value, local)
            array = constant_array(value)
            if size == 1:
                if array is not None:
                    zeros[i] = np.full(count, bool(np.all(array == 0)))
                continue
            if array is not None and size == count and i >= start:
                self.param(node, i, local, ids)
                zeros[i] = ~np.any(np.moveaxis(array, local, 0).reshape(count, -1) != 0, axis=1)
                continue
            self.block(ids, f"{node.op_type} {node.name} combines the channels with {value.name}, "
                            "which the channel graph does not track")
            return
        self.handle(node, *range(len(inputs)))
        none = np.zeros(count, bool)
        if node.op_type in ("Add", "Sub", "Sum", "Max", "Min", "Mean"):
            zero = np.logical_and.reduce([zeros.get(i, none) for i in range(len(inputs))])
        elif node.op_type == "Mul":
            zero = np.logical_or.reduce([zeros.get(i, none) for i in range(len(inputs))])
        elif node.op_type in ("Div", "Pow"):
            zero = zeros.get(0, none) if node.op_type == "Div" else none
        else:
            zero = none
        self.out(node.outputs[0], axis, out_rank, ids, zero)

    def _softmax_like(self, node: ir.Node, default_axis: int) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        axis = _normalize(attr_int(node, "axis", default_axis), track.rank)
        if node.op_type == "LayerNormalization":
            if track.axis >= axis:
                return
            if any(len(node.outputs) > k and node.outputs[k].uses() for k in (1, 2)):
                return
        elif axis == track.axis:
            return
        self.handle(node, 0)
        self.out(node.outputs[0], track.axis, track.rank, track.ids, np.zeros(len(track.ids), bool))

    def _op_Softmax(self, node):
        self._softmax_like(node, -1)

    def _op_LogSoftmax(self, node):
        self._softmax_like(node, -1)

    def _op_LayerNormalization(self, node):
        self._softmax_like(node, -1)

    def _qdq(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        scale = constant_array(node.inputs[1])
        if scale is None or (len(node.inputs) > 2 and node.inputs[2] is not None and constant_array(node.inputs[2]) is None):
            return
        if scale.size > 1:
            if _normalize(attr_int(node, "axis", 1), track.rank) != track.axis or attr_int(node, "block_size", 0):
                return
            for i in (1, 2):
                if i < len(node.inputs) and node.inputs[i] is not None and not self.param(node, i, 0, track.ids):
                    return
        self.handle(node, *range(len(node.inputs)))
        self.out(node.outputs[0], track.axis, track.rank, track.ids, track.zero)

    _op_QuantizeLinear = _qdq
    _op_DequantizeLinear = _qdq


def _set_group(node: ir.Node, ids: list[int]):
    def fix(keep):
        node.attributes["group"] = ir.AttrInt64("group", int(keep(ids).sum()))
    return fix


def build_channel_graph(model: ir.Model) -> ChannelGraph:
    """The channel dependency graph of ``model``'s main graph."""
    return _Builder(model).build()
