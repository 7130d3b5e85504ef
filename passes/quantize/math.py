"""Numpy primitives of linear quantization, matching ONNX QuantizeLinear/DequantizeLinear.

Pure functions on arrays; no IR. Granularity is given the way ONNX gives it:

* per-tensor: ``axis=None`` and scalar ``scale``/``zero_point``;
* per-axis: ``axis=k`` and 1-D ``scale`` of length ``x.shape[k]``;
* blocked: ``axis=k, block_size=B`` and ``scale`` of ``x``'s rank whose dim ``k`` is
  ``ceil(x.shape[k] / B)`` (opset 21 ``block_size``); element ``i`` along ``k`` uses block ``i // B``.

Rounding is half to even and results saturate to the type's range, as in ONNX.
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np
import onnx_ir as ir

_IR_TYPES = {
    (2, True): ir.DataType.INT2,
    (2, False): ir.DataType.UINT2,
    (4, True): ir.DataType.INT4,
    (4, False): ir.DataType.UINT4,
    (8, True): ir.DataType.INT8,
    (8, False): ir.DataType.UINT8,
    (16, True): ir.DataType.INT16,
    (16, False): ir.DataType.UINT16,
}
_NP_TYPES = {
    (2, True): ml_dtypes.int2,
    (2, False): ml_dtypes.uint2,
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
    (16, True): np.int16,
    (16, False): np.uint16,
}


@dataclasses.dataclass(frozen=True)
class QuantType:
    """An integer quantized type: ``bits`` in (1, 2, 4, 8, 16) and signedness.

    1 bit has no ONNX tensor type: binary weights are stored with :func:`pack_bits`
    and ``ir_dtype``/``np_dtype`` raise for it.
    """

    bits: int
    signed: bool = True

    def __post_init__(self):
        if self.bits not in (1, 2, 4, 8, 16):
            raise ValueError(f"unsupported bit width {self.bits}; expected 1, 2, 4, 8 or 16")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def ir_dtype(self) -> ir.DataType:
        if self.bits == 1:
            raise ValueError("1-bit values have no ONNX type; store them with pack_bits")
        return _IR_TYPES[(self.bits, self.signed)]

    @property
    def np_dtype(self) -> np.dtype:
        if self.bits == 1:
            raise ValueError("1-bit values have no numpy type; store them with pack_bits")
        return np.dtype(_NP_TYPES[(self.bits, self.signed)])

    @property
    def name(self) -> str:
        return ("int" if self.signed else "uint") + str(self.bits)

    @classmethod
    def parse(cls, text: str) -> QuantType:
        """``"int8"``, ``"uint4"``, ``"int2"``, ... (also ``"binary"`` for signed 1 bit)."""
        lowered = text.strip().lower()
        if lowered == "binary":
            return cls(1, True)
        for prefix, signed in (("uint", False), ("int", True)):
            if lowered.startswith(prefix) and lowered[len(prefix) :].isdigit():
                return cls(int(lowered[len(prefix) :]), signed)
        raise ValueError(f"unknown quantized type {text!r}; expected e.g. int8, uint8, int4, uint4, int2")


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim


def scale_zero_point(lo, hi, qtype: QuantType, symmetric: bool = True, pow2: bool = False):
    """Scales (float32) and zero points (``qtype.np_dtype``) covering ``[lo, hi]``, elementwise.

    The range is widened to include 0. Symmetric: signed types get zero point 0 and
    ``scale = max|x| / qmax``; unsigned types get the middle zero point. ``pow2``
    rounds each scale up to the smallest power of two ``2**-n`` not below it (and then
    recomputes asymmetric zero points for it). A scale is never 0: an all-zero range
    gets scale 1.
    """
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    qmin, qmax = qtype.qmin, qtype.qmax
    if symmetric:
        middle = 0 if qtype.signed else (qmin + qmax + 1) // 2
        zp = np.full(lo.shape, middle, dtype=np.float64)
        steps = max(min(qmax - middle, middle - qmin), 1)
        scale = np.maximum(-lo, hi) / steps
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = np.where(scale > 0, scale, 1.0)
    scale = np.maximum(scale, np.finfo(np.float32).tiny)
    if pow2:
        scale = np.exp2(np.ceil(np.log2(scale)))
    scale = scale.astype(np.float32)
    if pow2:  # float32 rounding must not push a power of two below what is needed
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    if not symmetric:
        zp = np.clip(np.rint(qmin - lo / scale.astype(np.float64)), qmin, qmax)
    if qtype.bits == 1:
        return scale, zp.astype(np.int8)
    return scale, zp.astype(qtype.np_dtype)


def _broadcast_param(param, x_shape: tuple[int, ...], axis: int | None, block_size: int | None) -> np.ndarray:
    """Expand a per-tensor/per-axis/blocked parameter to broadcast against ``x``."""
    param = np.asarray(param)
    if axis is None or param.ndim == 0:
        if param.size != 1:
            raise ValueError(f"per-tensor parameter must be a scalar, got shape {param.shape}")
        return param.reshape(())
    ndim = len(x_shape)
    axis = _norm_axis(axis, ndim)
    if block_size:
        blocks = math.ceil(x_shape[axis] / block_size)
        expected = tuple(blocks if i == axis else d for i, d in enumerate(x_shape))
        if param.shape != expected:
            raise ValueError(f"blocked parameter shape {param.shape}, expected {expected}")
        return np.repeat(param, block_size, axis=axis).take(range(x_shape[axis]), axis=axis)
    if param.shape != (x_shape[axis],):
        raise ValueError(f"per-axis parameter shape {param.shape}, expected ({x_shape[axis]},)")
    shape = [1] * ndim
    shape[axis] = x_shape[axis]
    return param.reshape(shape)


def quantize(x, scale, zero_point, qtype: QuantType, axis: int | None = None, block_size: int | None = None):
    """``saturate(round_half_even(x / scale) + zero_point)`` as ``qtype.np_dtype`` (QuantizeLinear)."""
    x = np.asarray(x, dtype=np.float32)
    s = _broadcast_param(np.asarray(scale, dtype=np.float32), x.shape, axis, block_size)
    zp = _broadcast_param(np.asarray(zero_point).astype(np.int32), x.shape, axis, block_size)
    q = np.rint(x / s).astype(np.float64) + zp
    q = np.clip(np.nan_to_num(q, nan=0.0), qtype.qmin, qtype.qmax)
    return q.astype(np.int32).astype(qtype.np_dtype)


def dequantize(q, scale, zero_point=None, qtype: QuantType | None = None, axis: int | None = None,
               block_size: int | None = None):
    """``(q - zero_point) * scale`` in float32 (DequantizeLinear). ``qtype`` is accepted for symmetry."""
    q = np.asarray(q)
    s = _broadcast_param(np.asarray(scale, dtype=np.float32), q.shape, axis, block_size)
    if zero_point is None:
        centered = q.astype(np.int32)
    else:
        zp = _broadcast_param(np.asarray(zero_point).astype(np.int32), q.shape, axis, block_size)
        centered = q.astype(np.int32) - zp
    return (centered.astype(np.float32) * s).astype(np.float32)


def _grouped(w: np.ndarray, axis: int | None, block_size: int | None) -> tuple[np.ndarray, callable]:
    """A float64 view ``[..., group]`` (NaN-padded) and a function mapping reductions back."""
    w = np.asarray(w, dtype=np.float64)
    if axis is None:
        return w.reshape(1, -1), lambda r: r.reshape(())
    axis = _norm_axis(axis, w.ndim)
    if not block_size:
        moved = np.moveaxis(w, axis, 0)
        return moved.reshape(moved.shape[0], -1), lambda r: r
    moved = np.moveaxis(w, axis, -1)
    length = moved.shape[-1]
    blocks = math.ceil(length / block_size)
    pad = blocks * block_size - length
    if pad:
        widths = [(0, 0)] * (moved.ndim - 1) + [(0, pad)]
        moved = np.pad(moved, widths, constant_values=np.nan)
    grouped = moved.reshape(*moved.shape[:-1], blocks, block_size)
    return grouped, lambda r: np.moveaxis(r, -1, axis)


def weight_ranges(w, axis: int | None = None, block_size: int | None = None,
                  clip_percentile: float | None = None):
    """``(lo, hi, clipped)``: per-group min and max of ``w`` and how many values fall outside.

    Groups follow the granularity convention of this module (``axis`` is the channel
    axis for per-axis, the blocked axis with ``block_size``). With ``clip_percentile=p``
    (50 < p <= 100) each group's range is ``[percentile(100-p), percentile(p)]`` and
    ``clipped`` counts the values outside it; otherwise ``clipped`` is 0.
    """
    grouped, back = _grouped(w, axis, block_size)
    if clip_percentile is None or clip_percentile >= 100:
        lo, hi = np.nanmin(grouped, axis=-1), np.nanmax(grouped, axis=-1)
        return back(lo), back(hi), 0
    if not 50 < clip_percentile <= 100:
        raise ValueError(f"clip percentile must be in (50, 100], got {clip_percentile}")
    lo = np.nanpercentile(grouped, 100 - clip_percentile, axis=-1)
    hi = np.nanpercentile(grouped, clip_percentile, axis=-1)
    with np.errstate(invalid="ignore"):
        outside = (grouped < lo[..., None]) | (grouped > hi[..., None])
    return back(lo), back(hi), int(np.count_nonzero(outside))


def quantize_weight(w, qtype: QuantType, axis: int | None = None, block_size: int | None = None,
                    symmetric: bool = True, pow2: bool = False, clip_percentile: float | None = None):
    """One-call weight quantization: ``(q, scale, zero_point, clipped)`` for DequantizeLinear."""
    lo, hi, clipped = weight_ranges(w, axis, block_size, clip_percentile)
    scale, zp = scale_zero_point(lo, hi, qtype, symmetric, pow2)
    q = quantize(w, scale, zp, qtype, axis, block_size)
    return q, scale, zp, clipped


def binary_scale(w, axis: int = 0) -> np.ndarray:
    """Per-channel scale of binary weights: mean ``|w|`` over everything but ``axis`` (never 0)."""
    w = np.asarray(w, dtype=np.float32)
    axis = _norm_axis(axis, w.ndim)
    moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    scale = np.abs(moved).mean(axis=1).astype(np.float32)
    return np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)


def pack_bits(bits) -> np.ndarray:
    """Pack a boolean array (flattened, C order) into uint8, element ``8*j + i`` in bit ``i`` of byte ``j``."""
    return np.packbits(np.asarray(bits, dtype=bool).reshape(-1), bitorder="little")


def unpack_bits(packed, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` booleans."""
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=count, bitorder="little").astype(bool)


def all_finite(tensor, chunk: int = 1 << 22) -> bool:
    """Whether a weight (numpy array or ``ir`` tensor) holds no NaN or Inf. A range with NaN or
    Inf has no finite scale: such a tensor is left float and named in the pass's stats.

    External data is read from its file in chunks, not through a memory map, so checking a
    large model does not map every page of its weights into the process."""
    import onnx_ir as ir

    if isinstance(tensor, ir.ExternalTensor):
        dtype = tensor.dtype.numpy()
        if np.dtype(dtype).kind != "f":
            return True
        step = chunk * np.dtype(dtype).itemsize
        with open(tensor.path, "rb") as handle:
            handle.seek(tensor.offset or 0)
            remaining = tensor.nbytes
            while remaining > 0:
                data = handle.read(min(step, remaining))
                if not data:
                    break
                remaining -= len(data)
                if not np.isfinite(np.frombuffer(data, dtype=dtype)).all():
                    return False
        return True
    if isinstance(tensor, ir.LazyTensor):  # computed by a pass from finite inputs; not re-read here
        return True
    array = np.asarray(tensor.numpy() if hasattr(tensor, "numpy") else tensor)
    if array.dtype.kind != "f":
        return True
    flat = array.reshape(-1)
    return all(np.isfinite(flat[i:i + chunk]).all() for i in range(0, flat.size, chunk))
