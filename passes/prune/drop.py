"""drop-pruned-initializers: remove what pruning left dead, and fold ops that became trivial.

In every graph (If/Loop bodies too):

- ``MatMul(x, W)`` with an all-zero constant 2-D ``W`` becomes zeros of shape
  ``x.shape[:-1] + [N]`` (Shape/Slice/Concat/ConstantOfShape, so dynamic shapes work);
  ``Gemm`` with an all-zero ``B`` and no ``C`` likewise (``[M, N]``);
- ``Add``/``Sub`` of an all-zero constant and ``Mul``/``Div`` by an all-one constant are
  bypassed when the constant cannot broadcast the other input to a larger shape (every dim
  of the constant is 1, or the input's dims are known and equal) and the output keeps the
  input's type;
- then nodes whose outputs nobody reads, initializers nobody reads, and initializers listed
  as graph inputs that nothing reads are removed (graph outputs and inputs that are not
  initializers are kept).

Lossless for finite inputs (``x * 0`` is 0; an inf or nan in ``x`` would have given nan).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.graph_walk import all_graphs
from onnxopt.model_stats import value_shapes
from onnxopt.naming import Namer
from onnxopt.pass_base import Pass, PassResult

from .common import constant_array

NAME = "drop-pruned-initializers"
NEUTRAL = {"Add": 0.0, "Sub": 0.0, "Mul": 1.0, "Div": 1.0}


class DropPrunedInitializersPass(Pass):
    """Remove initializers and nodes made dead by pruning; fold MatMul by zeros, Add of zeros, Mul by one."""

    name = NAME

    def call(self, model: ir.Model) -> PassResult:
        stats = {"matmuls_folded": 0, "identities_bypassed": 0, "nodes_removed": 0, "initializers_dropped": 0,
                 "bytes_saved": 0, "graph_inputs_dropped": 0}
        namer = Namer(model)
        shapes = value_shapes(model)
        for graph in list(all_graphs(model)):
            for node in list(graph):
                if node.domain not in ("", "ai.onnx"):
                    continue
                if node.op_type in ("MatMul", "Gemm") and _fold_zero_product(graph, node, namer):
                    stats["matmuls_folded"] += 1
                elif node.op_type in NEUTRAL and _bypass_neutral(graph, node, shapes):
                    stats["identities_bypassed"] += 1
        for graph in list(all_graphs(model)):
            _remove_dead(graph, stats)
        modified = any(stats[k] for k in ("matmuls_folded", "identities_bypassed", "nodes_removed",
                                          "initializers_dropped", "graph_inputs_dropped"))
        return PassResult(model, modified, stats)


def _all_zero(value: ir.Value | None) -> bool:
    array = constant_array(value)
    return array is not None and array.size > 0 and not np.any(array)


def _fold_zero_product(graph, node: ir.Node, namer: Namer) -> bool:
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if not _all_zero(weight) or constant_array(weight).ndim != 2:
        return False
    out = node.outputs[0]
    if out.is_graph_output():
        return False
    x = node.inputs[0]
    n_cols = constant_array(weight).shape[1]
    new: list[ir.Node] = []

    def const(name, array):
        c = ir.node("Constant", [], {"value": ir.tensor(array)}, name=namer.fresh(f"{node.name or 'fold'}_{name}"))
        c.outputs[0].name = namer.fresh(c.name)
        new.append(c)
        return c.outputs[0]

    def op(op_type, inputs, attrs=None):
        n = ir.node(op_type, inputs, attrs or {}, name=namer.fresh(f"{node.name or 'fold'}_{op_type}"))
        n.outputs[0].name = namer.fresh(n.name)
        new.append(n)
        return n.outputs[0]

    shape = op("Shape", [x])
    if node.op_type == "MatMul":
        rows = op("Slice", [shape, const("start", np.array([0], np.int64)), const("stop", np.array([-1], np.int64))])
    else:
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return False
        trans_a = node.attributes.get("transA")
        trans_b = node.attributes.get("transB")
        if trans_b is not None and trans_b.as_int():
            n_cols = constant_array(weight).shape[0]
        axis = 1 if trans_a is not None and trans_a.as_int() else 0
        rows = op("Slice", [shape, const("start", np.array([axis], np.int64)), const("stop", np.array([axis + 1], np.int64))])
    target = op("Concat", [rows, const("cols", np.array([n_cols], np.int64))], {"axis": 0})
    dtype = constant_array(weight).dtype
    zeros = op("ConstantOfShape", [target], {"value": ir.tensor(np.zeros(1, dtype))})
    zeros.shape, zeros.dtype = out.shape, ir.DataType.from_numpy(dtype)
    graph.insert_before(node, new)
    out.replace_all_uses_with(zeros)
    return True


def _bypass_neutral(graph, node: ir.Node, shapes: dict) -> bool:
    if len(node.inputs) != 2:
        return False
    a, b = node.inputs
    neutral = NEUTRAL[node.op_type]
    sides = [(b, a)] if node.op_type in ("Sub", "Div") else [(b, a), (a, b)]
    out = node.outputs[0]
    if out.is_graph_output():
        return False
    for const, other in sides:
        array = constant_array(const)
        if array is None or other is None or not np.all(array == neutral):
            continue
        if constant_array(other) is not None:
            continue  # constant folding's job
        if not _no_broadcast(array.shape, _shape(other, shapes)) or (other.dtype is not None and out.dtype not in (None, other.dtype)):
            continue
        out.replace_all_uses_with(other)
        return True
    return False


def _shape(value: ir.Value, shapes: dict) -> tuple | None:
    if value.name in shapes:
        return shapes[value.name]
    return None if value.shape is None else tuple(d if isinstance(d, int) else None for d in value.shape)


def _no_broadcast(const_shape: tuple, other: tuple | None) -> bool:
    """The constant cannot make the output larger than a value of shape ``other``."""
    if all(d == 1 for d in const_shape):
        return other is not None and len(other) >= len(const_shape)
    if other is None or len(other) < len(const_shape):
        return False
    tail = list(other)[len(other) - len(const_shape):]
    return all(c == 1 or (isinstance(t, int) and t == c) for c, t in zip(const_shape, tail))


def _remove_dead(graph, stats: dict) -> None:
    outputs = set(graph.outputs)
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph)):
            if any(o in outputs or o.uses() for o in node.outputs):
                continue
            if node.op_type in ("If", "Loop", "Scan") and any(o.uses() for o in node.outputs):
                continue
            graph.remove(node, safe=True)
            stats["nodes_removed"] += 1
            changed = True
    if not isinstance(graph, ir.Graph):
        return
    for name, value in list(graph.initializers.items()):
        if value.uses() or value in outputs:
            continue
        if value in graph.inputs:
            graph.inputs.remove(value)
            stats["graph_inputs_dropped"] += 1
        graph.initializers.pop(name)
        stats["initializers_dropped"] += 1
        stats["bytes_saved"] += value.const_value.nbytes if value.const_value is not None else 0
