"""Confinement checks for external-data references, done before any tensor is read.

A reference may only name a regular file inside the model's directory (or below it),
reached without symlinks, that is not a hard link to a file elsewhere, and whose
offset/length lie inside the file. Unknown or repeated keys in a tensor's ``external_data``
entries are refused (onnx would ignore them with a warning).
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import onnx

from .errors import InputError, UnsafeExternalDataError


def iter_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, Constant/attribute tensors, sparse, functions."""
    yield from _graph_tensors(proto.graph)
    for function in proto.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t
        yield from attr.tensors
        if attr.HasField("sparse_tensor"):
            yield attr.sparse_tensor.values
            yield attr.sparse_tensor.indices
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for sub in attr.graphs:
            yield from _graph_tensors(sub)


def _expected_bytes(tensor: onnx.TensorProto) -> int | None:
    try:
        np_dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    count = math.prod(tensor.dims)
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    for name in ("INT2", "UINT2"):
        if getattr(onnx.TensorProto, name, None) == tensor.data_type:
            bits = 2
    if bits:
        return (count * bits + 7) // 8
    return count * np_dtype.itemsize


# The keys of a TensorProto's external_data entries (onnx's ExternalDataInfo).
EXTERNAL_DATA_KEYS = frozenset({"location", "offset", "length", "checksum", "basepath"})


def check_external_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    base = Path(os.path.realpath(base_dir))
    for tensor in iter_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        keys = [entry.key for entry in tensor.external_data]
        unknown = sorted(set(keys) - EXTERNAL_DATA_KEYS)
        if unknown:
            raise InputError(f"tensor '{tensor.name or '(unnamed)'}' external data has unknown key(s) "
                             f"{', '.join(repr(k) for k in unknown)}; valid keys: {', '.join(sorted(EXTERNAL_DATA_KEYS))}")
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise InputError(f"tensor '{tensor.name or '(unnamed)'}' external data repeats key(s) "
                             f"{', '.join(repr(k) for k in repeated)}")
        _check_one(tensor.name or "(unnamed)", info, base, _expected_bytes(tensor))


def _check_one(name: str, info: dict[str, str], base: Path, expected: int | None) -> None:
    location = info.get("location", "")
    if not location:
        raise InputError(f"tensor '{name}' is marked external but names no location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or (len(location) > 1 and location[1] == ":"):
        raise UnsafeExternalDataError(f"tensor '{name}' external data path '{location}' is absolute; refusing to read outside the model's directory")
    parts = Path(location.replace("\\", "/")).parts
    if ".." in parts:
        raise UnsafeExternalDataError(f"tensor '{name}' external data path '{location}' leaves the model's directory; refusing to read it")
    current = base
    for part in parts:
        current = current / part
        if current.is_symlink():
            raise UnsafeExternalDataError(f"tensor '{name}' external data path '{location}' goes through a symlink; refusing to read it")
    full = base.joinpath(*parts)
    if not str(os.path.realpath(full)).startswith(str(base) + os.sep):
        raise UnsafeExternalDataError(f"tensor '{name}' external data path '{location}' resolves outside the model's directory")
    try:
        info_stat = full.stat()
    except FileNotFoundError:
        raise InputError(f"tensor '{name}' external data file '{location}' is missing") from None
    if not stat.S_ISREG(info_stat.st_mode):
        raise InputError(f"tensor '{name}' external data '{location}' is not a regular file")
    if info_stat.st_nlink > 1:
        raise UnsafeExternalDataError(f"tensor '{name}' external data file '{location}' is a hard link ({info_stat.st_nlink} links); refusing to read it")
    _check_range(name, location, info, info_stat.st_size, expected)


def _check_range(name: str, location: str, info: dict[str, str], size: int, expected: int | None) -> None:
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise InputError(f"tensor '{name}' has a non-numeric external data offset/length") from None
    if offset < 0 or (length is not None and length < 0):
        raise InputError(f"tensor '{name}' has a negative external data offset/length")
    if offset > size or (offset == size and (length or expected)):
        raise InputError(f"tensor '{name}' external data offset {offset} lies past the end of '{location}' "
                         f"(the file has {size} bytes)")
    stated = length is not None
    if length is None:
        length = size - offset if expected is None else expected
    if offset + length > size:
        what = f"length {length}" if stated else f"size {length} (from its shape and type, no length given)"
        raise InputError(f"tensor '{name}' external data {what} from offset {offset} runs past the end of "
                         f"'{location}' (ends at byte {offset + length}; the file has {size} bytes)")
    if expected is not None and length != expected:
        raise InputError(
            f"tensor '{name}' external data length {length} does not match its shape and type ({expected} bytes)"
        )
