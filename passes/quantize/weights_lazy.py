"""Chunked and deferred weight quantization for quantize-weights and quantize-dynamic: peak memory follows one
tensor, not the model.

:func:`quantize_array` returns exactly what :func:`math.quantize_weight` returns
(same ranges, scales, zero points, rounding, saturation and NaN handling) but walks the
weight in chunks of about a million elements in float32, so its scratch memory does not
grow with the tensor and it runs many times faster than the float64 reference.

:class:`WeightSource` and :func:`deferred` turn a weight stored as external data into
``ir.LazyTensor`` payloads (quantized tensor, scale, zero point, packed sign
bits) whose dtype and shape are known up front and whose bytes are computed from the
memory-mapped source only when someone asks for them (the saver, a validation session).
Nothing is cached: each request maps the source, computes, and unmaps it, so two writer
threads can compute two tensors at once and nothing accumulates across the model. The
scale is recomputed from the weight's ranges when it is written (a cheap min/max pass)
rather than kept from the quantization, so no per-model table of scales lives in memory.
:func:`payload` gives ``fn(weight)`` either now or deferred, so a pass writes one code path
for both; :func:`symmetric_zero_point` gives symmetric zero points without reading the weight.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np
import onnx_ir as ir

from . import math as qm

# Elements per chunk: 4 MB of float32 source, a few such buffers of scratch.
CHUNK_ELEMENTS = 1 << 20


# -- shapes ---------------------------------------------------------------------------------
def param_shape(shape: tuple[int, ...], axis: int | None, block: int | None) -> tuple[int, ...]:
    """Shape of the scale / zero point for a weight of ``shape`` (quant_math's convention)."""
    if axis is None:
        return ()
    if not block:
        return (shape[axis],)
    return tuple(math.ceil(d / block) if i == axis else d for i, d in enumerate(shape))


def _view3(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``w`` as [before, axis, after]; per tensor as [size, 1, 1] (one group)."""
    if axis is None:
        return w.reshape(-1, 1, 1)
    pre = math.prod(w.shape[:axis])
    post = math.prod(w.shape[axis + 1:])
    return w.reshape(pre, w.shape[axis], post)


def _channel_chunks(pre: int, channels: int, post: int, whole_channels: bool) -> Iterator[tuple[int, int, int, int]]:
    """(p0, p1, c0, c1) covering a [pre, channels, post] view in about CHUNK_ELEMENTS each.

    ``whole_channels``: every chunk spans all of ``pre`` (a channel's values in one chunk).
    """
    if whole_channels:
        step = max(1, CHUNK_ELEMENTS // max(1, pre * post))
        for c0 in range(0, channels, step):
            yield 0, pre, c0, min(channels, c0 + step)
        return
    plane = channels * post
    if plane <= CHUNK_ELEMENTS:
        rows = max(1, CHUNK_ELEMENTS // max(1, plane))
        for p0 in range(0, pre, rows):
            yield p0, min(pre, p0 + rows), 0, channels
        return
    step = max(1, CHUNK_ELEMENTS // max(1, post))
    for p0 in range(pre):
        for c0 in range(0, channels, step):
            yield p0, p0 + 1, c0, min(channels, c0 + step)


def _block_chunks(pre: int, length: int, post: int, block: int) -> Iterator[tuple[int, int, int, int]]:
    """(p0, p1, l0, l1) covering a [pre, length, post] view; l0, l1 are multiples of ``block`` (or length)."""
    row = length * post
    if row <= CHUNK_ELEMENTS:
        rows = max(1, CHUNK_ELEMENTS // max(1, row))
        for p0 in range(0, pre, rows):
            yield p0, min(pre, p0 + rows), 0, length
        return
    span = max(1, CHUNK_ELEMENTS // max(1, block * post)) * block
    for p0 in range(pre):
        for l0 in range(0, length, span):
            yield p0, p0 + 1, l0, min(length, l0 + span)


# -- ranges ---------------------------------------------------------------------------------
def _minmax(x: np.ndarray, axis) -> tuple[np.ndarray, np.ndarray, bool]:
    """NaN-ignoring min and max over ``axis`` (nanmin semantics, no warnings) and whether all were finite."""
    lo = np.minimum.reduce(x, axis=axis)
    hi = np.maximum.reduce(x, axis=axis)
    finite = bool(np.isfinite(lo).all() and np.isfinite(hi).all())
    if not finite and (np.isnan(lo).any() or np.isnan(hi).any()):
        lo = np.fmin.reduce(x, axis=axis)
        hi = np.fmax.reduce(x, axis=axis)
    return lo, hi, finite


def _block_split(x3: np.ndarray, block: int) -> list[np.ndarray]:
    """A [p, l, post] chunk as [p, blocks, block, post] pieces: the full blocks, then a short last block."""
    p, length, post = x3.shape
    full = (length // block) * block
    pieces = []
    if full:
        pieces.append(x3[:, :full].reshape(p, full // block, block, post))
    if full < length:
        pieces.append(x3[:, full:].reshape(p, 1, length - full, post))
    return pieces


def _block_ranges(x3: np.ndarray, block: int, clip: float | None):
    """(lo, hi, clipped, finite) of one [p, l, post] chunk, each range [p, blocks, post]."""
    if clip is not None:
        lo, hi, clipped = qm.weight_ranges(x3, 1, block, clip)
        return lo, hi, clipped, bool(np.isfinite(x3).all())
    parts = [_minmax(piece, 2) for piece in _block_split(x3, block)]
    lo = np.concatenate([p[0] for p in parts], axis=1)
    hi = np.concatenate([p[1] for p in parts], axis=1)
    return lo, hi, 0, all(p[2] for p in parts)


def _channel_ranges(v3: np.ndarray, clip: float | None):
    """(lo, hi, clipped, finite) per channel of a [pre, channels, post] view, chunk by chunk."""
    pre, channels, post = v3.shape
    lo = np.full(channels, np.nan, dtype=np.float64)
    hi = np.full(channels, np.nan, dtype=np.float64)
    clipped, finite = 0, True
    for p0, p1, c0, c1 in _channel_chunks(pre, channels, post, whole_channels=clip is not None):
        x = v3[p0:p1, c0:c1]
        if clip is not None:  # chunks hold whole channels (per tensor: the whole tensor)
            part_lo, part_hi, part_clipped = qm.weight_ranges(x, 1, None, clip)
            part_finite = bool(np.isfinite(x).all())
            clipped += part_clipped
        else:
            part_lo, part_hi, part_finite = _minmax(x, (0, 2))
        lo[c0:c1] = np.fmin(lo[c0:c1], part_lo)
        hi[c0:c1] = np.fmax(hi[c0:c1], part_hi)
        finite = finite and part_finite
    return lo, hi, clipped, finite


def weight_params(w: np.ndarray, qtype: qm.QuantType, axis: int | None = None, block: int | None = None,
                  symmetric: bool = True, pow2: bool = False, clip: float | None = None):
    """``(scale, zero_point, clipped)`` as :func:`math.quantize_weight` computes them, chunk by chunk."""
    shape = param_shape(w.shape, axis, block)
    v3 = _view3(w, axis)
    if block:
        pre, length, post = v3.shape
        nb = math.ceil(length / block)
        scale = np.empty((pre, nb, post), dtype=np.float32)
        zp = np.empty((pre, nb, post), dtype=qtype.np_dtype)
        clipped = 0
        for p0, p1, l0, l1 in _block_chunks(pre, length, post, block):
            lo, hi, part_clipped, _ = _block_ranges(v3[p0:p1, l0:l1], block, clip)
            s, z = qm.scale_zero_point(lo, hi, qtype, symmetric, pow2)
            b0 = l0 // block
            scale[p0:p1, b0:b0 + s.shape[1]] = s
            zp[p0:p1, b0:b0 + s.shape[1]] = z
            clipped += part_clipped
        return scale.reshape(shape), zp.reshape(shape), clipped
    lo, hi, clipped, _ = _channel_ranges(v3, clip)
    scale, zp = qm.scale_zero_point(lo, hi, qtype, symmetric, pow2)
    return scale.reshape(shape), zp.reshape(shape), clipped


# -- quantization ---------------------------------------------------------------------------
def _work_dtype(qtype: qm.QuantType) -> np.dtype:
    if qtype.bits <= 8:
        return np.dtype(np.int8 if qtype.signed else np.uint8)
    return np.dtype(np.int32)


def _quantize_into(out: np.ndarray, x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None,
                   qtype: qm.QuantType, finite: bool) -> None:
    """``out[...] = saturate(rint(x / scale) + zp)`` with NaN -> 0, in float32 (as math.quantize)."""
    buf = np.divide(x, scale, dtype=np.float32)
    np.rint(buf, out=buf)
    if zp is not None:
        buf += zp
    np.clip(buf, qtype.qmin, qtype.qmax, out=buf)
    if not finite:  # NaN weights (or inf / inf) quantize to 0, as nan_to_num does in quant_math
        buf[np.isnan(buf)] = 0
    out[...] = buf


def quantize_array(w: np.ndarray, qtype: qm.QuantType, axis: int | None = None, block: int | None = None,
                   symmetric: bool = True, pow2: bool = False, clip: float | None = None):
    """``(q, scale, zero_point, clipped)``, equal to ``math.quantize_weight`` but chunked in float32.

    ``q`` has ``qtype.np_dtype``; scratch memory is a few chunks, plus ``q`` itself.
    """
    q, scale, zp, clipped = _quantize(w, qtype, axis, block, symmetric, pow2, clip)
    return q.astype(qtype.np_dtype, copy=False), scale, zp, clipped


def quantize_tensor(w: np.ndarray, qtype: qm.QuantType, axis: int | None = None, block: int | None = None,
                    symmetric: bool = True, pow2: bool = False, clip: float | None = None):
    """``(q, scale, zero_point, clipped)`` with ``q`` an IR tensor (sub-byte types packed straight from the integers)."""
    q, scale, zp, clipped = _quantize(w, qtype, axis, block, symmetric, pow2, clip)
    if qtype.bits >= 8:
        tensor = ir.Tensor(q.astype(qtype.np_dtype, copy=False), dtype=qtype.ir_dtype)
    else:
        tensor = ir.PackedTensor(pack_low_bits(q, qtype.bits), qtype.ir_dtype, shape=q.shape)
    return tensor, scale, zp, clipped


def pack_low_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """2- or 4-bit integers (held one per byte) packed little-end first, as ONNX stores INT4/INT2."""
    per = 8 // bits
    flat = q.reshape(-1).view(np.uint8)
    if flat.size % per:
        flat = np.concatenate([flat, np.zeros(per - flat.size % per, dtype=np.uint8)])
    mask = np.uint8((1 << bits) - 1)
    packed = flat[0::per] & mask
    for i in range(1, per):
        packed |= (flat[i::per] & mask) << np.uint8(bits * i)
    return packed


def _quantize(w: np.ndarray, qtype: qm.QuantType, axis: int | None, block: int | None,
              symmetric: bool, pow2: bool, clip: float | None):
    """quantize_array with ``q`` in a working integer type (int8/uint8 up to 8 bits)."""
    if qtype.bits == 1:
        raise ValueError("1-bit weights are packed with math.pack_bits, not quantized here")
    w = np.asarray(w, dtype=np.float32)
    shape = param_shape(w.shape, axis, block)
    work = _work_dtype(qtype)
    q = np.empty(w.shape, dtype=work)
    v3, q3 = _view3(w, axis), _view3(q, axis)
    pre, length, post = v3.shape
    if block:
        nb = math.ceil(length / block)
        scale = np.empty((pre, nb, post), dtype=np.float32)
        zp = np.empty((pre, nb, post), dtype=qtype.np_dtype)
        clipped = 0
        for p0, p1, l0, l1 in _block_chunks(pre, length, post, block):
            x3 = v3[p0:p1, l0:l1]
            lo, hi, part_clipped, finite = _block_ranges(x3, block, clip)
            s, z = qm.scale_zero_point(lo, hi, qtype, symmetric, pow2)
            b0 = l0 // block
            scale[p0:p1, b0:b0 + s.shape[1]] = s
            zp[p0:p1, b0:b0 + s.shape[1]] = z
            clipped += part_clipped
            zf = z.astype(np.float32) if z.any() else None
            out3 = q3[p0:p1, l0:l1]
            start = 0
            for piece, out in zip(_block_split(x3, block), _block_split(out3, block)):
                count = piece.shape[1]
                sl = slice(start, start + count)
                _quantize_into(out, piece, s[:, sl, None, :], None if zf is None else zf[:, sl, None, :],
                               qtype, finite)
                start += count
        return q, scale.reshape(shape), zp.reshape(shape), clipped
    lo, hi, clipped, finite = _channel_ranges(v3, clip)
    s, z = qm.scale_zero_point(lo, hi, qtype, symmetric, pow2)
    s3 = s.reshape(1, -1, 1)
    zf = z.astype(np.float32).reshape(1, -1, 1) if z.any() else None
    for p0, p1, c0, c1 in _channel_chunks(pre, length, post, whole_channels=False):
        _quantize_into(q3[p0:p1, c0:c1], v3[p0:p1, c0:c1], s3[:, c0:c1],
                       None if zf is None else zf[:, c0:c1], qtype, finite)
    return q, s.reshape(shape), z.reshape(shape), clipped


# -- deferred payloads ----------------------------------------------------------------------
def _file_identity(path: str) -> tuple[int, int, int, int]:
    info = os.stat(path)
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class WeightSource:
    """A float weight read on demand: an external tensor is mapped afresh for each use and unmapped after.

    The source ``ir.ExternalTensor`` itself is never loaded, so it holds no map between
    uses. The data file's identity is recorded now; a later read of a file that was
    replaced or rewritten in the meantime raises instead of quantizing the wrong bytes.
    """

    def __init__(self, tensor: ir.TensorProtocol):
        self.tensor = tensor
        self.external = isinstance(tensor, ir.ExternalTensor)
        self._identity = _file_identity(tensor.path) if self.external else None

    def apply(self, fn: Callable[[np.ndarray], object]):
        """``fn(weight as float32 array)``; its result must not be a view of the weight."""
        if not self.external:
            return fn(np.asarray(self.tensor.numpy(), dtype=np.float32))
        source = self.tensor
        if _file_identity(source.path) != self._identity:
            raise RuntimeError(
                f"external data file {source.path} changed after quantize-weights read its layout; "
                f"cannot compute the quantized '{source.name}' from it (load the model again)")
        fresh = ir.ExternalTensor(source.location, source.offset, source.length, source.dtype,
                                  shape=source.shape, name=source.name, base_dir=source.base_dir)
        try:
            return fn(fresh.numpy())
        finally:
            try:
                fresh.release()
            except BufferError:  # a view outlived fn (an exception's traceback); unmapped when collected
                pass


def deferred(source: WeightSource, fn: Callable[[np.ndarray], np.ndarray | ir.TensorProtocol],
             dtype: ir.DataType, shape: tuple[int, ...]) -> ir.LazyTensor:
    """A LazyTensor whose data is ``fn(weight)`` (an array or tensor), computed on every request, never cached."""

    def compute() -> ir.TensorProtocol:
        result = source.apply(fn)
        return result if isinstance(result, ir.TensorProtocol) else ir.Tensor(result, dtype=dtype)

    return ir.LazyTensor(compute, dtype=dtype, shape=ir.Shape(shape))


def payload(source: WeightSource, fn: Callable[[np.ndarray], np.ndarray | ir.TensorProtocol],
            dtype: ir.DataType, shape: tuple[int, ...], defer: bool) -> ir.TensorProtocol:
    """``fn(weight)`` as a tensor: computed now, or with ``defer`` a :func:`deferred` LazyTensor."""
    if defer:
        return deferred(source, fn, dtype, shape)
    result = source.apply(fn)
    return result if isinstance(result, ir.TensorProtocol) else ir.Tensor(result, dtype=dtype)


def symmetric_zero_point(qtype: qm.QuantType, shape: tuple[int, ...]) -> np.ndarray:
    """The zero points quant_math gives a symmetric range of parameter shape ``shape`` (they do not depend on it)."""
    zeros = np.zeros(shape, dtype=np.float64)
    return qm.scale_zero_point(zeros, zeros, qtype, symmetric=True)[1]
