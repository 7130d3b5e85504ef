"""clip-weights: clip weight outliers to a multiple of the weight's L2 (RMS) or L1 (mean |w|) norm.

The weight inputs of MatMul (B), Gemm (B) and Conv (W), and LSTM/GRU/RNN (W, R), stored as
initializers or Constant nodes in any graph, are clipped in place to ``±factor · s`` with
``s = sqrt(mean(w²))`` (``norm=l2``) or ``mean(|w|)`` (``norm=l1``), per tensor or per output
channel. Tighter ranges make the following quantization finer (the seed example clips before
it quantizes). A weight also read by another kind of input (an Add, a Reshape) is left, with
a reason in ``stats["skipped"]``; a shared weight is clipped once.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.passes.quantize.weights_reach import WEIGHT_SLOTS, weight_axes

from .scope import stored_weights

NAME = "clip-weights"


@dataclasses.dataclass(frozen=True)
class ClipWeightsOptions:
    norm: Literal["l2", "l1"] = dataclasses.field(
        default="l2", metadata={"help": "scale s of the clip: l2 = sqrt(mean(w^2)), l1 = mean(|w|)"})
    factor: float = dataclasses.field(default=3.0, metadata={"help": "clip every weight to +-factor * s"})
    granularity: Literal["per-tensor", "per-channel"] = dataclasses.field(
        default="per-tensor", metadata={"help": "one s per weight, or one per output channel"})
    min_elements: int = dataclasses.field(default=1024, metadata={"help": "leave weights with fewer elements"})

    def __post_init__(self):
        if not self.factor > 0:
            raise ValueError(f"{NAME}: factor must be > 0, got {self.factor}")


def clip_array(w: np.ndarray, norm: str, factor: float, axis: int | None) -> np.ndarray:
    """``w`` clipped to ±factor·s, s the L2 (RMS) or L1 (mean absolute) norm per tensor or along ``axis``."""
    reduce = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    wide = w.astype(np.float64)
    scale = np.sqrt(np.mean(wide ** 2, axis=reduce, keepdims=True)) if norm == "l2" else \
        np.mean(np.abs(wide), axis=reduce, keepdims=True)
    limit = (factor * scale).astype(w.dtype)
    return np.clip(w, -limit, limit)


class ClipWeightsPass(Pass):
    """Clip MatMul/Gemm/Conv/RNN weights to a multiple of their L2 or L1 norm."""

    name = NAME
    Options = ClipWeightsOptions
    fidelity_of = Fidelity.LOSSY

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        stats: dict = {"weights_clipped": 0, "values_clipped": 0, "clipped": {}, "skipped": {}}
        for weight in stored_weights(model):
            tensor = weight.tensor
            if tensor.dtype != ir.DataType.FLOAT or tensor.size < opts.min_elements or weight.fixed():
                continue
            uses = [(use.node, use.idx) for use in weight.value.uses()]
            slots = [(n, i) for n, i in uses if n.domain in ("", "ai.onnx") and (n.op_type, i) in WEIGHT_SLOTS
                     and n.op_type != "Gather"]
            if not slots:
                continue
            if len(slots) < len(uses):
                other = next(n for n, i in uses if (n, i) not in slots)
                stats["skipped"][weight.value.name] = f"also read by {other.op_type} '{other.name}'"
                continue
            w = weight.array()
            axis = None
            if opts.granularity == "per-channel":
                axes = {weight_axes(n, w.ndim)[0] for n, _ in slots}
                axis = axes.pop() if len(axes) == 1 else None
            clipped = clip_array(w, opts.norm, opts.factor, axis)
            changed = int(np.count_nonzero(clipped != w))
            if not changed:
                continue
            new = ir.tensor(clipped, name=tensor.name)
            if weight.const_node is not None:
                weight.const_node.attributes["value"] = ir.AttrTensor("value", new)
            weight.value.const_value = new
            stats["weights_clipped"] += 1
            stats["values_clipped"] += changed
            stats["clipped"][weight.value.name] = changed
        return PassResult(model, stats["weights_clipped"] > 0, stats)
