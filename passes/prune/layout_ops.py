"""How prune-channels follows a channel axis through data-movement ops (Concat, Split, Transpose,
Flatten, Reshape, Squeeze/Unsqueeze, Resize, Pad), and the fixes that rewrite their channel counts."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .channel_graph import _normalize
from .common import attr_int, attr_ints, constant_array, new_constant


class LayoutOps:
    """Handlers of :class:`.depgraph._Builder` for ops that move or reshape a tracked axis."""

    def _op_Concat(self, node: ir.Node) -> None:
        tracked = self.tracked(node)
        if not tracked:
            return
        rank = tracked[0][1].rank
        axis = _normalize(node.attributes["axis"].as_int(), rank)
        if any(t.axis != axis for _, t in tracked):
            self.block([i for _, t in tracked for i in t.ids], f"Concat {node.name} along another axis")
            return
        ids: list[int] = []
        zero = []
        for i, value in enumerate(node.inputs):
            if value in self.tracks:
                ids += self.tracks[value].ids
                zero.append(self.tracks[value].zero)
            else:
                count = self.dim(value, axis)
                if count is None:
                    self.block(ids + [i for _, t in tracked for i in t.ids],
                               f"Concat {node.name}: input {value.name} has an unknown channel count")
                    return
                fresh = self.uf.new(count)
                self.block(fresh, f"channels of {value.name}, concatenated untracked")
                ids += fresh
                zero.append(np.zeros(count, bool))
        self.handle(node, *range(len(node.inputs)))
        self.out(node.outputs[0], axis, rank, ids, np.concatenate(zero))

    def _op_Split(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        axis = _normalize(attr_int(node, "axis", 0), track.rank)
        if axis != track.axis:
            self.handle(node, 0)
            for out in node.outputs:
                self.out(out, track.axis, track.rank, track.ids, track.zero)
            return
        sizes = attr_ints(node, "split")
        from_input = len(node.inputs) > 1 and node.inputs[1] is not None
        if from_input:
            array = constant_array(node.inputs[1])
            if array is None:
                return
            sizes = [int(s) for s in array]
        if sizes is None:
            n = len(node.outputs)
            each = math.ceil(len(track.ids) / n)
            sizes = [min(each, len(track.ids) - k * each) for k in range(n)]
        if sum(sizes) != len(track.ids):
            return
        self.handle(node, *range(len(node.inputs)))
        offsets = np.cumsum([0] + sizes)
        parts = [track.ids[offsets[k]:offsets[k + 1]] for k in range(len(sizes))]
        for out, part, lo, hi in zip(node.outputs, parts, offsets[:-1], offsets[1:]):
            self.out(out, axis, track.rank, part, track.zero[lo:hi])
        self.fixups.append(_set_split(self, node, parts))

    def _op_Transpose(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        perm = attr_ints(node, "perm") or list(reversed(range(track.rank)))
        self.handle(node, 0)
        self.out(node.outputs[0], perm.index(track.axis), track.rank, track.ids, track.zero)

    def _op_Flatten(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        a = _normalize(attr_int(node, "axis", 1), track.rank)
        shape = self.shapes.get(node.inputs[0].name)
        if a > track.axis or shape is None:
            return
        dims = shape[a:track.axis] + shape[track.axis + 1:]
        if any(d is None for d in dims):
            return
        outer, inner = math.prod(shape[a:track.axis]), math.prod(shape[track.axis + 1:])
        self.handle(node, 0)
        self.out(node.outputs[0], 1, 2, _spread(track.ids, outer, inner), _spread(track.zero, outer, inner))

    def _op_Reshape(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        target = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        in_shape = self.shapes.get(node.inputs[0].name)
        if track is None or target is None or in_shape is None:
            return
        target = [int(t) for t in target]
        allow_zero = attr_int(node, "allowzero", 0) == 0
        resolved = [in_shape[i] if (t == 0 and allow_zero and i < len(in_shape)) else t for i, t in enumerate(target)]
        axis, count = track.axis, len(track.ids)
        prefix_in, prefix_out = in_shape[:axis], resolved[:axis]
        if len(resolved) <= axis or any(d is None for d in prefix_in) or list(prefix_in) != list(prefix_out):
            return
        if resolved[axis] in (count, -1) and (resolved[axis] != -1 or -1 not in resolved[axis + 1:]):
            self.handle(node, 0, 1)
            self.out(node.outputs[0], axis, len(target), track.ids, track.zero)
            if target[axis] == count:
                self.fixups.append(_set_shape(self, node, axis, track.ids, 1))
            return
        inner_dims = in_shape[axis + 1:]
        if len(resolved) == axis + 1 and all(d is not None for d in inner_dims):
            inner = math.prod(inner_dims)
            if resolved[axis] in (-1, count * inner):
                self.handle(node, 0, 1)
                self.out(node.outputs[0], axis, axis + 1, _spread(track.ids, 1, inner), _spread(track.zero, 1, inner))
                if target[axis] != -1:
                    self.fixups.append(_set_shape(self, node, axis, track.ids, inner))

    def _op_Squeeze(self, node: ir.Node) -> None:
        self._squeeze(node, -1)

    def _op_Unsqueeze(self, node: ir.Node) -> None:
        self._squeeze(node, +1)

    def _squeeze(self, node: ir.Node, sign: int) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        axes = attr_ints(node, "axes")
        if axes is None and len(node.inputs) > 1:
            array = constant_array(node.inputs[1])
            axes = None if array is None else [int(a) for a in array]
        out_rank = track.rank + sign * len(axes or [])
        if axes is None:
            return
        axes = sorted(_normalize(a, out_rank if sign > 0 else track.rank) for a in axes)
        if sign < 0:
            if track.axis in axes:
                return
            axis = track.axis - sum(1 for a in axes if a < track.axis)
        else:
            axis = track.axis
            for a in axes:
                if a <= axis:
                    axis += 1
        self.handle(node, *range(len(node.inputs)))
        self.out(node.outputs[0], axis, out_rank, track.ids, track.zero)

    def _op_Resize(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        sizes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if len(node.inputs) > 3 and node.inputs[3] is not None and sizes is None:
            return
        if sizes is not None and (attr_ints(node, "axes") is not None or len(sizes) != track.rank):
            return
        scales = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        if scales is not None and scales.size == track.rank and float(scales[track.axis]) != 1.0:
            return
        self.handle(node, *range(len(node.inputs)))
        self.out(node.outputs[0], track.axis, track.rank, track.ids, track.zero)
        if sizes is not None:
            self.fixups.append(_set_vector(self, node, 3, track.axis, track.ids))

    _op_Upsample = _op_Resize

    def _op_Pad(self, node: ir.Node) -> None:
        track = self.tracks.get(node.inputs[0])
        if track is None:
            return
        pads = attr_ints(node, "pads")
        if pads is None and len(node.inputs) > 1:
            array = constant_array(node.inputs[1])
            pads = None if array is None else [int(p) for p in array]
        if pads is None or (len(node.inputs) > 3 and node.inputs[3] is not None) or len(pads) != 2 * track.rank:
            return
        if pads[track.axis] or pads[track.axis + track.rank]:
            return
        value = constant_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else None
        self.handle(node, *range(len(node.inputs)))
        zero = track.zero if value is None or float(value) == 0 else np.zeros(len(track.ids), bool)
        self.out(node.outputs[0], track.axis, track.rank, track.ids, zero)


def _spread(ids, outer: int, inner: int):
    """Each id repeated for the ``inner`` positions it spans, the whole list ``outer`` times."""
    if isinstance(ids, np.ndarray):
        return np.tile(np.repeat(ids, inner), outer)
    return [i for _ in range(outer) for i in ids for _ in range(inner)]


def _fresh_input(builder, node: ir.Node, index: int, array: np.ndarray) -> None:
    """Give ``node`` its own copy of a constant input (the original may be shared)."""
    name = f"{node.inputs[index].name}_pruned"
    used = {v.name for v in builder.graph.initializers.values()}
    while name in used:
        name += "_"
    old = node.inputs[index]
    node.replace_input_with(index, new_constant(builder.graph, name, array))
    if old.is_initializer() and not old.uses() and not old.is_graph_output():
        builder.graph.initializers.pop(old.name, None)


def _set_split(builder, node: ir.Node, parts: list[list[int]]):
    def fix(keep):
        sizes = np.array([int(keep(p).sum()) for p in parts], dtype=np.int64)
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            _fresh_input(builder, node, 1, sizes)
        elif "split" in node.attributes or builder.model.opset_imports.get("", 13) < 13:
            node.attributes["split"] = ir.AttrInt64s("split", sizes.tolist())
        else:
            node.attributes.pop("num_outputs", None)
            while len(node.inputs) < 2:
                node.resize_inputs(len(node.inputs) + 1)
            _fresh_input(builder, node, 1, sizes)
    return fix


def _set_shape(builder, node: ir.Node, axis: int, ids: list[int], inner: int):
    def fix(keep):
        target = constant_array(node.inputs[1]).copy()
        target[axis] = int(keep(ids).sum()) * inner
        _fresh_input(builder, node, 1, target)
    return fix


def _set_vector(builder, node: ir.Node, index: int, axis: int, ids: list[int]):
    def fix(keep):
        vector = constant_array(node.inputs[index]).copy()
        vector[axis] = int(keep(ids).sum())
        _fresh_input(builder, node, index, vector)
    return fix
