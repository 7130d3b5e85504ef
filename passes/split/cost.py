"""Per-node costs for balancing stages: parameters, FLOPs, memory; latency comes measured.

``params`` counts the elements of constant tensors a node reads (initializers and Constant
outputs, shared ones divided among their readers), bodies included. ``flops`` is an estimate
from ORT-measured tensor shapes: 2*MACs for Conv/ConvTranspose/MatMul/Gemm (``node_macs`` of
onnxopt.model_stats, shared with its whole-model estimate) and the recurrent ops, one per output element for everything else; a node with bodies costs what its body
nodes would at the sizes known (2 per weight element where shapes are unknown).
``memory`` is the bytes of the constants a node holds plus the bytes of the tensors it produces.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxopt.graph_walk import node_subgraphs
from onnxopt.model_stats import node_macs
from onnxopt.split_marks import is_free_constant

from .partition import read_values


def constant_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor behind an initializer or a Constant node's output, else None."""
    if value.const_value is not None:
        return value.const_value
    producer = value.producer()
    if producer is not None and is_free_constant(producer):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.value
    return None


def _constant_reads(unit: ir.Node) -> list[ir.Value]:
    seen, found = set(), []
    for value in read_values(unit):
        if value not in seen and constant_tensor(value) is not None:
            seen.add(value)
            found.append(value)
    return found


def constant_shares(units: list[ir.Node]) -> dict[ir.Node, list[tuple[ir.Value, float]]]:
    """unit -> (constant value, this unit's share of it) for every constant the unit reads."""
    reads = {u: _constant_reads(u) for u in units}
    readers: dict[ir.Value, int] = {}
    for values in reads.values():
        for value in values:
            readers[value] = readers.get(value, 0) + 1
    return {u: [(v, 1.0 / readers[v]) for v in values] for u, values in reads.items()}


def params_costs(units: list[ir.Node]) -> list[float]:
    shares = constant_shares(units)
    return [sum(_size(constant_tensor(v)) * share for v, share in shares[u]) for u in units]


def memory_costs(units: list[ir.Node], shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[float]:
    shares = constant_shares(units)
    costs = []
    for unit in units:
        weights = sum(constant_tensor(v).nbytes * share for v, share in shares[unit])
        produced = 0
        for out in unit.outputs:
            if out.name in shapes:
                shape, dtype = shapes[out.name]
                produced += math.prod(shape) * np.dtype(dtype).itemsize
        costs.append(float(weights + produced))
    return costs


def flops_costs(units: list[ir.Node], shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> list[float]:
    return [float(node_flops(u, shapes)) for u in units]


def _size(tensor) -> int:
    return math.prod(tensor.shape) if tensor is not None and tensor.shape is not None else 0


def _shape(value: ir.Value | None, shapes) -> tuple[int, ...] | None:
    if value is None:
        return None
    if value.name in shapes:
        return tuple(shapes[value.name][0])
    tensor = constant_tensor(value)
    if tensor is not None:
        return tuple(tensor.shape)
    if value.shape is not None and all(isinstance(d, int) for d in value.shape):
        return tuple(value.shape)
    return None


def node_flops(node: ir.Node, shapes) -> int:
    """Estimated floating-point operations of one node (see the module docstring)."""
    bodies = node_subgraphs(node)
    if bodies:
        total = 0
        for body in bodies:
            total += sum(node_flops(inner, shapes) for inner in body)
        return total
    ins = [_shape(v, shapes) for v in node.inputs]
    out = _shape(node.outputs[0], shapes) if node.outputs else None
    op = node.op_type
    known = {v.name: shape for v, shape in zip(list(node.inputs) + list(node.outputs[:1]), ins + [out])
             if v is not None and shape is not None}
    macs = node_macs(node, known)
    if macs is not None:
        return 2 * macs
    if op in ("LSTM", "GRU", "RNN") and len(ins) > 2 and ins[0] and ins[1] and ins[2]:
        seq, batch = ins[0][0], ins[0][1]
        w, r = ins[1], ins[2]
        return 2 * seq * batch * (math.prod(w) + math.prod(r))
    if out is not None:
        return math.prod(out)
    # no measured size (a body node): weights give a floor, else one op
    return max(1, 2 * sum(_size(constant_tensor(v)) for v in node.inputs if v is not None))
