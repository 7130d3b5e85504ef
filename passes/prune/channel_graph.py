"""The channel dependency graph of prune-channels: elements, tracks, params, and the removal
that slices every param (built by :mod:`.depgraph`)."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from .common import constant_array, set_constant


class UnionFind:
    def __init__(self):
        self.parent: list[int] = []

    def new(self, count: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + count))
        return list(range(start, start + count))

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


@dataclasses.dataclass
class Track:
    axis: int
    rank: int
    ids: list[int]
    zero: np.ndarray  # bool per index: provably all zero there


@dataclasses.dataclass
class Param:
    value: ir.Value
    axis: int
    ids: list[int]


@dataclasses.dataclass
class Source:
    node: ir.Node
    ids: list[int]  # one per output channel
    weight: np.ndarray  # the weight with output channels on axis 0
    groups: int = 1  # a grouped Conv keeps an equal count per group


@dataclasses.dataclass
class Sink:
    node: ir.Node
    input: ir.Value  # the activation the consumer reads
    ids: list[int]
    weight: ir.Value
    weight_axis: int  # the weight's input-channel axis
    ignores: np.ndarray  # bool per index: the weight is all zero there
    zero: np.ndarray  # bool per index: the input is all zero there


@dataclasses.dataclass
class ChannelGraph:
    uf: UnionFind
    tracks: dict[ir.Value, Track]
    params: list[Param]
    sources: list[Source]
    sinks: list[Sink]
    blocks: list[tuple[list[int], str]]
    fixups: list[Callable[[Callable[[list[int]], np.ndarray]], None]]
    bn_scales: list[tuple[list[int], np.ndarray]]

    def blocked_roots(self) -> dict[int, str]:
        reasons: dict[int, str] = {}
        for ids, reason in self.blocks:
            for i in ids:
                reasons.setdefault(self.uf.find(i), reason)
        return reasons

    def apply(self, removed: set[int], namer) -> dict:
        """Remove the element roots ``removed`` everywhere; returns counts."""
        find = self.uf.find

        def keep(ids: list[int]) -> np.ndarray:
            return np.array([find(i) not in removed for i in ids], dtype=bool)

        by_value: dict[ir.Value, list[Param]] = defaultdict(list)
        for p in self.params:
            by_value[p.value].append(p)
        sliced = 0
        for value, params in by_value.items():
            array = constant_array(value)
            done = set()
            for p in params:
                if p.axis in done:
                    continue
                done.add(p.axis)
                mask = keep(p.ids)
                if not mask.all():
                    array = np.compress(mask, array, axis=p.axis)
            if array.shape != constant_array(value).shape:
                set_constant(value, array)
                sliced += 1
        for fix in self.fixups:
            fix(keep)
        for value, track in self.tracks.items():
            if value.shape is not None and len(value.shape) == track.rank:
                dims = list(value.shape)
                dims[track.axis] = int(keep(track.ids).sum())
                value.shape = ir.Shape(dims)
        return {"constants_sliced": sliced}


def _normalize(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis
