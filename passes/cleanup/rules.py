"""Rewrite rules onnxscript 0.7 lacks, written in its pattern language for rewrite-patterns.

* ``neutral_element_rules``: ``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``1 * x``, ``x / 1``
  become ``Identity(x)``. onnxscript's own no-op rules match only scalar constants and
  compare with a tolerance (``x * 1.000001`` matches); these need every element to be
  exactly neutral and accept any constant that broadcasting cannot grow ``x`` by.
* ``conv_bias_rules``: ``Add(Conv(x, w[, b]), c)`` (also ``ConvTranspose``) with a
  per-channel or scalar constant ``c`` becomes ``Conv(x, w, b + c)``.
* ``reshape_shape_rules``: a ``Reshape`` whose shape is a ``Concat`` of constants and of
  slices of the data's own ``Shape`` gets a constant shape, copied dimensions written as 0.
  With ``infer_dim`` one remaining unknown element becomes -1; Reshape cannot infer a -1
  from an empty tensor, so that variant assumes the data is never empty.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter._basics import MatchResult
from onnxscript.rewriter._rewrite_rule import RewriteRuleClassBase


def _constant(value: ir.Value | None, max_size: int = 4096) -> np.ndarray | None:
    """The value's numpy array if it is a true constant (not an overridable graph input) of
    at most ``max_size`` elements (no rule here needs a weight's data read from disk)."""
    tensor = None if value is None or value.is_graph_input() else value.const_value
    if tensor is None or tensor.size > max_size:
        return None
    try:
        return tensor.numpy()
    except Exception:  # external data that is not there: not usable as a constant
        return None


def _static_shape(value: ir.Value | None) -> tuple | None:
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    return None if value.shape is None else tuple(value.shape)


# ranks and lengths ----------------------------------------------------------------------
# What onnx shape inference cannot say once a Reshape had a computed shape: the rank a value
# has, worked out from its producers (a rewrite earlier in the same sweep may have given a
# Reshape a constant shape). Only ops whose output rank follows from their inputs' ranks.

_SAME_RANK = frozenset({
    "Abs", "Acos", "Asin", "Atan", "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil",
    "Clip", "Conv", "ConvTranspose", "Cos", "CumSum", "Dropout", "Elu", "Erf", "Exp", "Floor",
    "Gelu", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity",
    "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization", "LeakyRelu", "Log",
    "LogSoftmax", "LpNormalization", "MaxPool", "Mish", "Neg", "Not", "PRelu", "Reciprocal",
    "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Slice", "Softmax", "Softplus", "Softsign",
    "Sqrt", "Tan", "Tanh", "ThresholdedRelu", "Trilu",
})
_BROADCAST = frozenset({
    "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual",
    "Max", "Mean", "Min", "Mod", "Mul", "Or", "Pow", "Sub", "Sum", "Where", "Xor",
})
_REDUCE = frozenset({
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
})


def rank(value: ir.Value | None, _memo: dict | None = None, _depth: int = 0) -> int | None:
    """The rank of ``value`` if it is known or follows from its producers' inputs."""
    if value is None or _depth > 200:
        return None
    if value.shape is not None:
        return len(value.shape)
    memo = {} if _memo is None else _memo
    if id(value) not in memo:
        memo[id(value)] = None  # also cuts a cycle short
        memo[id(value)] = _derived_rank(value, memo, _depth)
    return memo[id(value)]


def _derived_rank(value: ir.Value, memo: dict, depth: int) -> int | None:
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or value is not node.outputs[0]:
        return None
    op = node.op_type
    ranks = [rank(v, memo, depth + 1) for v in node.inputs[:1 if op in _SAME_RANK else None] if v is not None]
    if op in _SAME_RANK or (op in _REDUCE and node.attributes.get_int("keepdims", 1) == 1):
        return ranks[0] if ranks else None
    if op == "Concat":
        return next((r for r in ranks if r is not None), None)
    if op in _BROADCAST:
        return None if not ranks or None in ranks else max(ranks)
    if op == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return len(perm) if perm is not None else ranks[0]
    if op == "Reshape":
        target = _static_shape(node.inputs[1])
        return target[0] if target is not None and len(target) == 1 and isinstance(target[0], int) else None
    if op == "MatMul" and len(ranks) == 2 and None not in ranks:
        a, b = ranks
        return max(a, b) if min(a, b) >= 2 else a + b - 2
    if op == "Shape":
        return 1
    return None


def length(value: ir.Value | None, _depth: int = 0) -> int | None:
    """The static length of a 1-D integer value such as a computed shape, if it follows."""
    if value is None or _depth > 200:
        return None
    shape = _static_shape(value)
    if shape is not None and (len(shape) != 1 or isinstance(shape[0], int)):
        return shape[0] if len(shape) == 1 else None
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in ("Cast", "Identity"):
        return length(node.inputs[0], _depth + 1)
    if node.op_type == "Shape" and not node.attributes:
        return rank(node.inputs[0])
    if node.op_type == "Slice" and len(node.inputs) >= 3:
        size, starts, ends = length(node.inputs[0], _depth + 1), _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if size is None or None in (starts, ends) or len(starts) != 1 or axes not in ([0], [-1]) or steps != [1]:
            return None
        start, end = (min(max(v + size if v < 0 else v, 0), size) for v in (starts[0], ends[0]))
        return max(end - start, 0)
    return None


# neutral elements -----------------------------------------------------------------------


class _NeutralElement(RewriteRuleClassBase):
    def __init__(self, op_type: str, neutral: int, constant_first: bool):
        side = "left" if constant_first else "right"
        super().__init__(f"{op_type}By{neutral}{side.title()}")
        self._op_type, self._neutral, self._constant_first = op_type, neutral, constant_first

    def pattern(self, op, x, c):
        node = getattr(op, self._op_type)
        return node(c, x) if self._constant_first else node(x, c)

    def check(self, context, x: ir.Value, c: ir.Value) -> MatchResult:
        result = MatchResult()
        array = _constant(c)
        if array is None or array.size == 0 or array.dtype.kind not in "fiuc":
            return result.fail("not a numeric constant")
        if not np.all(array == self._neutral):
            return result.fail("not every element is neutral")
        if c.dtype is None or (x.dtype is not None and c.dtype != x.dtype):
            return result.fail("types differ")
        if array.ndim == 0:  # a scalar cannot grow x, whatever x's rank
            return result
        x_rank = rank(x)
        if x_rank is None or array.ndim > x_rank:
            return result.fail("broadcasting could add dimensions")
        dims = tuple(x.shape) if x.shape is not None else (None,) * x_rank
        for size, dim in zip(reversed(array.shape), reversed(dims)):
            if size != 1 and size != dim:
                return result.fail("broadcasting could grow x")
        return result

    def rewrite(self, op, x, c):
        return op.Identity(x)


def neutral_element_rules() -> list:
    return [_NeutralElement.rule(op_type, neutral, first) for op_type, neutral, first in
            (("Add", 0, False), ("Add", 0, True), ("Sub", 0, False), ("Mul", 1, False),
             ("Mul", 1, True), ("Div", 1, False))]


# conv bias ------------------------------------------------------------------------------


class _ConvBias(RewriteRuleClassBase):
    def __init__(self, conv_type: str, constant_first: bool):
        super().__init__(f"{conv_type}AddBias{'Left' if constant_first else ''}")
        self._conv_type, self._constant_first = conv_type, constant_first

    def pattern(self, op, x, w, c):
        conv = getattr(op, self._conv_type)(x, w, _allow_other_inputs=True, _outputs=["conv_out"])
        return op.Add(c, conv) if self._constant_first else op.Add(conv, c)

    def _channels(self, node: ir.Node, weight_shape: tuple) -> int | None:
        if self._conv_type == "Conv":
            channels = weight_shape[0]
        else:
            group = node.attributes.get_int("group", 1)
            channels = weight_shape[1] * group if isinstance(weight_shape[1], int) else None
        return channels if isinstance(channels, int) else None

    def check(self, context, x: ir.Value, w: ir.Value, c: ir.Value, conv_out: ir.Value) -> MatchResult:
        result = MatchResult()
        node = conv_out.producer()
        if node.domain not in ("", "ai.onnx"):
            return result.fail("not an ONNX convolution")
        addend = _constant(c)
        weight_shape = _static_shape(w)
        if addend is None or weight_shape is None or len(weight_shape) < 3:
            return result.fail("addend not constant or weight rank unknown")
        channels = self._channels(node, weight_shape)
        if channels is None or c.dtype != w.dtype or addend.ndim > len(weight_shape):
            return result.fail("channel count or type unknown")
        padded = (1,) * (len(weight_shape) - addend.ndim) + addend.shape
        if padded[0] != 1 or padded[1] not in (1, channels) or any(d != 1 for d in padded[2:]):
            return result.fail("addend is not per-channel")
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and (_constant(bias) is None or _constant(bias).shape != (channels,)):
            return result.fail("existing bias is not a constant of one value per channel")
        self._new_bias = np.broadcast_to(addend.reshape(-1), (channels,)).astype(addend.dtype)
        if bias is not None:
            self._new_bias = (_constant(bias) + self._new_bias).astype(addend.dtype)
        return result

    def rewrite(self, op, x, w, c, conv_out):
        node = conv_out.producer()
        name = f"{conv_out.name or 'conv'}_fused_bias"
        bias = op.initializer(ir.tensor(self._new_bias, name=name), name=name)
        return op.op(self._conv_type, x, w, bias, **node.attributes)


def conv_bias_rules() -> list:
    return [_ConvBias.rule(conv, first) for conv in ("Conv", "ConvTranspose") for first in (False, True)]


# reshape shapes -------------------------------------------------------------------------


def _ints(value: ir.Value | None) -> list[int] | None:
    array = _constant(value)
    if array is None or array.dtype.kind not in "iu" or array.ndim > 1:
        return None
    return [int(v) for v in array.reshape(-1)]


def _is_onnx(node: ir.Node | None, op_type: str) -> bool:
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def _shape_of(value: ir.Value, data: ir.Value) -> bool:
    node = value.producer()
    return _is_onnx(node, "Shape") and node.inputs[0] is data and not node.attributes


def _copied_range(piece: ir.Value, data: ir.Value, rank: int) -> tuple[int, int] | None:
    """The [start, end) of data's dimensions ``piece`` is, if it is one; None otherwise."""
    if _shape_of(piece, data):
        return 0, rank
    node = piece.producer()
    if _is_onnx(node, "Slice") and len(node.inputs) >= 3 and _shape_of(node.inputs[0], data):
        starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
        axes = _ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [0]
        steps = _ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if None in (starts, ends, axes, steps) or len(starts) != 1 or axes not in ([0], [-1]) or steps != [1]:
            return None
        start, end = starts[0] + rank if starts[0] < 0 else starts[0], ends[0] + rank if ends[0] < 0 else ends[0]
        end = min(end, rank)
        return (start, end) if 0 <= start < end else None
    if _is_onnx(node, "Unsqueeze"):
        axes = _ints(node.inputs[1]) if len(node.inputs) > 1 else list(node.attributes.get_ints("axes", []))
        gather = node.inputs[0].producer()
        if axes != [0] or not _is_onnx(gather, "Gather") or gather.attributes.get_int("axis", 0) != 0:
            return None
        index = _constant(gather.inputs[1])
        if index is None or index.ndim != 0 or not _shape_of(gather.inputs[0], data):
            return None
        index = int(index) + rank if int(index) < 0 else int(index)
        return (index, index + 1) if 0 <= index < rank else None
    return None


class _ReshapeShape(RewriteRuleClassBase):
    def __init__(self, infer_dim: bool):
        super().__init__("ReshapeShapeInferDim" if infer_dim else "ReshapeShapeCopyDims")
        self._infer_dim = infer_dim

    def pattern(self, op, data, shape):
        return op.Reshape(data, shape, _outputs=["reshaped"])

    def check(self, context, data: ir.Value, shape: ir.Value, reshaped: ir.Value) -> MatchResult:
        result = MatchResult()
        concat = shape.producer()
        if reshaped.producer().attributes.get_int("allowzero", 0) != 0:
            return result.fail("allowzero: a 0 would not mean 'copy'")
        if not _is_onnx(concat, "Concat") or concat.attributes.get_int("axis", 0) not in (0, -1):
            return result.fail("shape is not a Concat")
        data_rank = rank(data)
        entries: list[int | None] = []  # None: the unknown element
        for piece in concat.inputs:
            values = _ints(piece)
            copied = None if values is not None or data_rank is None else _copied_range(piece, data, data_rank)
            if values is not None:
                entries += values
            elif copied is not None and copied[0] == len(entries):
                entries += [0] * (copied[1] - copied[0])
            elif (size := length(piece)) is not None and size <= 1:
                entries += [None] * size
            else:
                return result.fail("a piece of the shape is neither constant nor a copied dimension")
        unknown = entries.count(None)
        if unknown and not self._infer_dim:
            return result.fail("a dimension is neither constant nor copied")
        if unknown > 1 or (unknown and -1 in entries):
            return result.fail("more unknown dimensions than the one -1 Reshape infers")
        self._shape = np.array([-1 if e is None else e for e in entries], dtype=np.int64)
        return result

    def rewrite(self, op, data, shape, reshaped):
        name = f"{reshaped.name or 'reshape'}_shape"
        constant = op.initializer(ir.tensor(self._shape, name=name), name=name)
        return op.Reshape(data, constant, **reshaped.producer().attributes)


def reshape_shape_rules(infer_dim: bool) -> list:
    return [_ReshapeShape.rule(infer_dim)]
