"""Arrays of dtypes numpy has no native type for, to and from ONNX Runtime.

ORT's numpy binding takes and returns the standard numpy dtypes only. bfloat16, the
float8 family, float8e8m0 and the packed int4/uint4/int2/uint2 types are held here as
``ml_dtypes`` arrays (what ``onnx_ir`` uses) and cross into ORT as ``OrtValue``s built
from their raw bytes; outputs of those types are read back from the ``OrtValue``'s
buffer. (ORT's numpy path would
return float8 outputs as raw ``uint8`` and refuses bfloat16.)
"""

from __future__ import annotations

import ctypes

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

# dtypes ORT's numpy binding converts itself.
_NATIVE = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
                                 np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.complex64, np.complex128)}


def is_native(dtype: np.dtype) -> bool:
    return np.dtype(dtype) in _NATIVE or np.dtype(dtype).kind in "OUS"


def ort_type_dtype(type_text: str) -> ir.DataType | None:
    """``'tensor(bfloat16)'`` -> ``ir.DataType.BFLOAT16``; None for non-tensors or unknown names."""
    if not type_text.startswith("tensor(") or not type_text.endswith(")"):
        return None
    return _BY_ORT_NAME.get(type_text[len("tensor("):-1])


_BY_ORT_NAME = {dtype.name.lower(): dtype for dtype in ir.DataType if dtype != ir.DataType.UNDEFINED}
_BY_ORT_NAME["float"] = ir.DataType.FLOAT


def to_ort(array: np.ndarray):
    """``array`` itself when ORT takes it as numpy, else an ``OrtValue`` of its ONNX type."""
    array = np.asarray(array)
    if is_native(array.dtype):
        return array
    dtype = ir.DataType.from_numpy(array.dtype)
    packed = np.frombuffer(ir.tensor(array).tobytes(), np.uint8)
    if dtype.bitwidth >= 8:
        buffer = packed.view(np.dtype(f"u{dtype.itemsize:.0f}")).reshape(array.shape)
    else:  # ORT takes the shape from the array and copies the packed bytes from its start
        buffer = np.zeros(array.shape, np.uint8)
        buffer.reshape(-1)[: packed.size] = packed
    return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(np.ascontiguousarray(buffer), int(dtype))


def from_ort(value: ort.OrtValue) -> np.ndarray:
    """The ``OrtValue``'s tensor as numpy, ``ml_dtypes`` for the types numpy lacks."""
    dtype = ort_type_dtype(value.data_type())
    if dtype is None or is_native(dtype.numpy()):
        return value.numpy()
    size = value.tensor_size_in_bytes()
    raw = np.frombuffer(bytes((ctypes.c_uint8 * size).from_address(value.data_ptr())) if size else b"", np.uint8)
    return np.asarray(ir.PackedTensor(raw, dtype, shape=ir.Shape(value.shape())).numpy()) if dtype.bitwidth < 8 \
        else raw.view(dtype.numpy()).reshape(value.shape())


def needs_ort_values(session: ort.InferenceSession) -> bool:
    """Whether some output is a tensor type ORT cannot hand back as numpy of its own type."""
    return any((d := ort_type_dtype(o.type)) is not None and not is_native(d.numpy()) for o in session.get_outputs())
