"""Sparse tensors made dense when a model is loaded, and said so.

onnx_ir reads neither ``graph.sparse_initializer`` (it would drop the tensor and leave its
users reading an undefined value) nor ``sparse_value``/``sparse_tensor`` attributes (it
refuses the whole graph). Each one becomes the equivalent dense initializer or attribute
tensor before onnx_ir sees the model, in every graph, subgraph and function; the note
returned for each goes into the report. A tensor whose dense form would exceed
``MAX_DENSE_BYTES`` is refused rather than materialized.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import InputError

MAX_DENSE_BYTES = 1 << 30


def densify_sparse(proto: onnx.ModelProto, base_dir: Path, where: str) -> list[str]:
    """Replace every sparse tensor of ``proto`` in place by a dense one; one note per tensor."""
    notes: list[str] = []
    _graph(proto.graph, base_dir, where, notes)
    for function in proto.functions:
        for node in function.node:
            _node(node, base_dir, where, notes)
    return notes


def _graph(graph: onnx.GraphProto, base_dir: Path, where: str, notes: list[str]) -> None:
    for sparse in graph.sparse_initializer:
        dense = dense_tensor(sparse, base_dir, where)
        graph.initializer.append(dense)
        notes.append(f"densified sparse initializer '{dense.name}' {list(sparse.dims)} "
                     f"({_stored(sparse)} of {math.prod(sparse.dims)} values stored): onnxopt keeps no sparse tensors")
    del graph.sparse_initializer[:]
    for node in graph.node:
        _node(node, base_dir, where, notes)


def _node(node: onnx.NodeProto, base_dir: Path, where: str, notes: list[str]) -> None:
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
            dense = dense_tensor(attr.sparse_tensor, base_dir, where)
            label = node.name or node.op_type
            notes.append(f"densified sparse attribute '{attr.name}' of node '{label}' {list(attr.sparse_tensor.dims)}")
            attr.ClearField("sparse_tensor")
            attr.t.CopyFrom(dense)
            attr.type = onnx.AttributeProto.TENSOR
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and attr.name == "sparse_value":
                attr.name = "value"
        elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
            raise InputError(f"{where}: node '{node.name or node.op_type}' attribute '{attr.name}' holds a list of "
                             "sparse tensors, which onnxopt cannot read")
        if attr.HasField("g"):
            _graph(attr.g, base_dir, where, notes)
        for sub in attr.graphs:
            _graph(sub, base_dir, where, notes)


def _stored(sparse: onnx.SparseTensorProto) -> int:
    return math.prod(sparse.values.dims) if sparse.values.dims else 0


def dense_tensor(sparse: onnx.SparseTensorProto, base_dir: Path, where: str) -> onnx.TensorProto:
    """The dense TensorProto of ``sparse`` (named like its values), checking its indices."""
    name = sparse.values.name or "(unnamed)"
    dims = list(sparse.dims)
    try:
        values = numpy_helper.to_array(sparse.values, base_dir=str(base_dir)).reshape(-1)
        indices = numpy_helper.to_array(sparse.indices, base_dir=str(base_dir)).astype(np.int64)
    except Exception as exc:  # onnx raises several types on a malformed tensor
        raise InputError(f"{where}: sparse tensor '{name}' cannot be read: {exc}") from None
    size = math.prod(dims)
    if size * values.dtype.itemsize > MAX_DENSE_BYTES:
        raise InputError(f"{where}: sparse tensor '{name}' {dims} would take {size * values.dtype.itemsize:,} bytes "
                         f"dense (limit {MAX_DENSE_BYTES:,}); onnxopt keeps no sparse tensors, so it refuses the model")
    if indices.ndim == 2 and indices.shape == (values.size, len(dims)):
        bad = bool(np.any((indices < 0) | (indices >= np.array(dims, dtype=np.int64))))
        flat = None if bad else np.ravel_multi_index(tuple(indices.T), dims) if values.size else indices.reshape(-1)
    elif indices.ndim == 1 and indices.size == values.size:
        flat, bad = indices, bool(np.any((indices < 0) | (indices >= size)))
    else:
        raise InputError(f"{where}: sparse tensor '{name}' has indices of shape {list(indices.shape)} "
                         f"for {values.size} values of a {dims} tensor")
    if bad:
        raise InputError(f"{where}: sparse tensor '{name}' has an index outside its shape {dims}")
    dense = np.zeros(size, dtype=values.dtype)
    dense[flat] = values
    return numpy_helper.from_array(dense.reshape(dims), name=sparse.values.name)
