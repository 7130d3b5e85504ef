"""Calibration statistics the prune passes need, streamed through ORT (calibration.stream_tensors):
per-channel activation norms, and least-squares normal equations of a consumer layer.

Reconstruction refits a consumer (Conv with group 1, Gemm, MatMul) whose input channels were
removed: with X its original input (im2col patches for a Conv, sampled positions) restricted
to the kept channels and Y = X_full W^T its original output, it solves the ridge least squares
``min |[X_kept 1] [W'; b']^T - (Y + b)|`` for the kept output rows (bias correction included).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxopt.calibration import stream_tensors

from .common import attr_int, attr_ints

MAX_POSITIONS = 4096  # sampled rows per sample and consumer
MIN_ROWS_PER_FEATURE = 4  # a refit needs this many calibration rows per kept input column


def _by_name(names: list[str], make_for):
    """A ``make()`` for stream_tensors that knows which tensor it makes a state for: states are
    made in the order of ``names`` (main-graph tensors are streamed in chunks, in order)."""
    pending = list(names)
    return lambda: make_for(pending.pop(0))


class _Norm:
    def __init__(self, axis: int):
        self.axis, self.sum, self.count = axis, None, 0

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array, dtype=np.float64)
        moved = np.moveaxis(array, self.axis, 0).reshape(array.shape[self.axis], -1)
        squares = np.sum(moved * moved, axis=1)
        self.sum = squares if self.sum is None else self.sum + squares
        self.count += moved.shape[1]


def channel_norms(model: ir.Model, feeds, axes: dict[str, int], progress=None) -> dict[str, np.ndarray]:
    """Root-mean-square of each index along ``axes[name]`` of tensor ``name`` over the feeds."""
    names = sorted(axes)
    states, _ = stream_tensors([model], feeds, names, _by_name(names, lambda n: _Norm(axes[n])),
                               lambda state, arrays: state.update(arrays[0]), progress=progress,
                               label="channel norms")
    return {name: np.sqrt(s.sum / max(s.count, 1)) for name, s in states.items() if s.sum is not None}


@dataclasses.dataclass
class Refit:
    """One consumer's least-squares problem: which input columns and output rows it keeps."""

    node: ir.Node
    weight: np.ndarray  # original weight, output rows on axis 0 (Gemm transB=0 is transposed)
    bias: np.ndarray | None
    keep_in: np.ndarray  # bool per input channel
    keep_out: np.ndarray  # bool per output row
    kind: str  # conv | dense
    gram: np.ndarray | None = None
    cross: np.ndarray | None = None
    rows: int = 0

    def columns(self) -> np.ndarray:
        per = int(np.prod(self.weight.shape[2:])) if self.kind == "conv" else 1
        return np.repeat(self.keep_in, per)

    def add(self, x: np.ndarray, rng: np.random.Generator) -> None:
        patches = self._patches(np.asarray(x, dtype=np.float64), rng)
        w = self.weight.reshape(self.weight.shape[0], -1)[self.keep_out]
        target = patches @ w.T
        kept = np.concatenate([patches[:, self.columns()], np.ones((patches.shape[0], 1))], axis=1)
        gram, cross = kept.T @ kept, kept.T @ target
        self.gram = gram if self.gram is None else self.gram + gram
        self.cross = cross if self.cross is None else self.cross + cross
        self.rows += patches.shape[0]

    def _patches(self, x: np.ndarray, rng) -> np.ndarray:
        if self.kind == "dense":
            rows = x.reshape(-1, x.shape[-1])
        else:
            rows = _im2col(x, self.node, self.weight.shape[2:])
        if rows.shape[0] > MAX_POSITIONS:
            rows = rows[rng.choice(rows.shape[0], MAX_POSITIONS, replace=False)]
        return rows

    def solve(self, ridge: float = 1e-6) -> tuple[np.ndarray, np.ndarray] | None:
        """(weight [M', C'...], bias [M']) of the refit, or None without data."""
        if self.gram is None or self.rows < MIN_ROWS_PER_FEATURE * self.gram.shape[0]:
            return None  # too few calibration rows for this many weights: a refit would overfit
        gram = self.gram.copy()
        scale = np.trace(gram) / gram.shape[0]
        gram[np.diag_indices_from(gram)] += ridge * max(scale, 1e-12)
        solution = np.linalg.solve(gram, self.cross)  # [d'+1, M']
        w, b = solution[:-1].T, solution[-1]
        if self.bias is not None:
            b = b + self.bias[self.keep_out]
        shape = (int(self.keep_out.sum()), int(self.keep_in.sum()), *self.weight.shape[2:])
        return w.reshape(shape), b


def _im2col(x: np.ndarray, node: ir.Node, kernel: tuple[int, ...]) -> np.ndarray:
    """Rows [positions, C*kh*kw] of a 2-D convolution's input patches (NOTSET/VALID padding)."""
    kh, kw = kernel
    strides = attr_ints(node, "strides") or [1, 1]
    dilations = attr_ints(node, "dilations") or [1, 1]
    pads = attr_ints(node, "pads") or [0, 0, 0, 0]
    padded = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    windows = np.lib.stride_tricks.sliding_window_view(padded, (eh, ew), axis=(2, 3))
    windows = windows[:, :, ::strides[0], ::strides[1], ::dilations[0], ::dilations[1]]
    n, c, ho, wo = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def can_refit(node: ir.Node) -> bool:
    if node.op_type == "Conv":
        auto_pad = node.attributes.get("auto_pad")
        pad_ok = auto_pad is None or auto_pad.as_string() in ("NOTSET", "VALID")
        return pad_ok and attr_int(node, "group", 1) == 1 and len(attr_ints(node, "kernel_shape") or [0, 0]) == 2
    if node.op_type == "Gemm":
        return attr_int(node, "transA", 0) == 0
    return node.op_type == "MatMul"


def accumulate(model: ir.Model, feeds, refits: dict[str, list[Refit]], progress=None, seed: int = 0) -> None:
    """Feed every refit the original activations of its input tensor (keyed by tensor name)."""
    rng = np.random.default_rng(seed)
    names = sorted(refits)

    def update(items, arrays):
        for refit in items:
            refit.add(arrays[0], rng)

    stream_tensors([model], feeds, names, _by_name(names, lambda n: refits[n]), update, progress=progress,
                   label="reconstruct")
