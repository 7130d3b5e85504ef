"""merge-identical-weights: keep one copy of bit-identical stored constants.

onnx_ir's ``DeduplicateInitializersPass`` merges initializers within each graph only: it
sees neither Constant nodes (how PaddleOCR exports weights) nor copies in different
scopes (the two branches of an If). This pass covers both. Copies are grouped by dtype,
shape and bytes (so ``-0.0`` and ``0.0``, or two NaN payloads, stay apart); the kept copy
lives in the innermost scope enclosing every copy, so each former reader, in any If/Loop
body, can still read it. When no copy lives there (copies only in sibling branches), one
is stored there, as an initializer, or as a Constant node when every copy was one or the
scope is a function. Functions share nothing with the main graph or each other. Weights
that are graph inputs (overridable) or graph outputs are left alone.
"""

from __future__ import annotations

import dataclasses
import hashlib

import onnx_ir as ir

from onnxopt.naming import Namer
from onnxopt.pass_base import Pass, PassResult

from .scope import Scopes, Weight, put_first, store_constant, stored_weights

NAME = "merge-identical-weights"


@dataclasses.dataclass(frozen=True)
class MergeIdenticalWeightsOptions:
    min_bytes: int = dataclasses.field(default=0, metadata={"help": "leave constants smaller than this many bytes"})

    def __post_init__(self):
        if self.min_bytes < 0:
            raise ValueError(f"{NAME}: min_bytes must be >= 0, got {self.min_bytes}")


def _key(weight: Weight, root: int) -> tuple | None:
    tensor = weight.tensor
    if tensor.dtype == ir.DataType.STRING:
        return None
    return (root, tensor.dtype, tuple(tensor.shape.numpy()), hashlib.sha256(tensor.tobytes()).digest())


def merge_into(scopes: Scopes, group: list[Weight], namer: Namer, target=None) -> tuple[ir.Value, int]:
    """Point every reader of the weights in ``group`` at one copy stored where all can read it
    (``target``, by default the innermost scope enclosing them all; the first weight's tensor is
    kept); returns that value and the bytes saved."""
    target = target if target is not None else scopes.common([w.graph for w in group])
    here = [w for w in group if w.graph is target]
    keeper = min(here, key=lambda w: w.const_node is not None) if here else None
    saved = 0
    if keeper is None:
        first = group[0]
        as_node = all(w.const_node is not None for w in group)
        value = store_constant(target, ir.tensor(first.array()), first.value.name or "shared_weight", namer, as_node)
        saved -= first.nbytes
    else:
        value = keeper.value
        if keeper.const_node is not None:
            put_first(target, keeper.const_node)  # readers elsewhere in the scope may come first
    for weight in group:
        if weight is keeper:
            continue
        weight.value.replace_all_uses_with(value)
        weight.remove()
        saved += weight.nbytes
    return value, saved


class MergeIdenticalWeightsPass(Pass):
    """Keep one copy of bit-identical initializers and Constant weights across all graphs."""

    name = NAME
    Options = MergeIdenticalWeightsOptions

    def call(self, model: ir.Model) -> PassResult:
        scopes = Scopes(model)
        groups: dict[tuple, list[Weight]] = {}
        for weight in stored_weights(model):
            if weight.fixed() or weight.nbytes < self.options.min_bytes:
                continue
            key = _key(weight, id(scopes.root(weight.graph)))
            if key is not None:
                groups.setdefault(key, []).append(weight)
        stats = {"initializers_merged": 0, "bytes_saved": 0, "merged": {}}
        namer = Namer(model)
        for group in groups.values():
            if len(group) < 2:
                continue
            data = group[0].tensor.tobytes()  # a digest match is confirmed byte for byte
            group = [w for w in group if w is group[0] or w.tensor.tobytes() == data]
            if len(group) < 2:
                continue
            value, saved = merge_into(scopes, group, namer)
            stats["initializers_merged"] += len(group) - 1
            stats["bytes_saved"] += saved
            stats["merged"][value.name] = sorted(w.value.name for w in group if w.value is not value)
        return PassResult(model, stats["initializers_merged"] > 0, stats)
