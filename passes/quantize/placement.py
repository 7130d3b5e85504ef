"""Where Q/DQ pairs go so that ONNX Runtime's CPU provider runs integer kernels.

Measured on ORT 1.32 (sessions with all optimizations), ORT's QDQ transformer turns
``DQ -> op -> Q`` node units into: Conv -> QLinearConv (float or int32 bias; a Relu, or a
Clip from 0, between Conv and Q is absorbed when the Q zero point is the type's minimum);
MatMul -> QLinearMatMul, or MatMulIntegerToFloat when no Q follows; Gemm -> QGemm (float
output only with an int32 bias); Add/Mul -> QLinearAdd/QLinearMul; Concat -> QLinearConcat;
AveragePool/GlobalAveragePool/Sigmoid/LeakyRelu -> their QLinear ops. MaxPool, Reshape,
Transpose, Flatten, Squeeze, Unsqueeze, Slice, Gather, DepthToSpace, Expand, Tile and
nearest Resize run on integers when the Q/DQ around them share one scale. Tanh,
HardSigmoid, Pad, Sub, a lone Relu/Clip, linear Resize stay float: Q/DQ around them only
adds work, so ``ort-cpu`` placement leaves them alone. ConvTranspose stays float too: ORT
1.32 keeps ``DQ -> ConvTranspose -> Q`` as a float ConvTranspose (its com.microsoft
QLinearConvTranspose has a schema but no CPU kernel), so only placement ``all`` quantizes
it (weight per channel along axis 1, counted as ``no_integer_kernel`` under ``ort-cpu``).

Placement ``ort-cpu``: weighted Conv/MatMul/Gemm (a float activation times a constant
weight) are the anchors; their activation inputs are quantized, and so is a Conv's
output (QLinearConv needs it). A fusable neighbour is quantized when all its float inputs
are quantized and its output reaches a quantized consumer. Placement ``all`` quantizes
every float input and output of every op in ``ALL_OPS``.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.naming import Namer

CORE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
FUSED = ("Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu")
PASS_THROUGH = ("MaxPool", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather",
                "DepthToSpace", "Expand", "Tile", "Resize")
ALL_OPS = CORE + FUSED + PASS_THROUGH + ("Softmax", "Relu", "Clip", "Sub", "Div", "Tanh", "HardSigmoid",
                                        "Pad", "ReduceMean", "Where", "Sqrt", "Pow", "Erf")
DEFAULT_DOMAINS = ("", "ai.onnx")


def stored_tensor(value: ir.Value | None) -> ir.TensorProtocol | None:
    """The tensor of an initializer or of a Constant's ``value`` (not an overridable graph
    input), without reading its data. (Not ir.convenience.get_const_tensor: it renames a
    Constant's tensor, changing the model.)"""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    attr = node.attributes.get("value")
    return attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR else None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or Constant output (not an overridable graph input)."""
    tensor = stored_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_float_weight(value: ir.Value | None) -> bool:
    array = constant_array(value)
    return array is not None and array.dtype == np.float32


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _dequantized(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return producer is not None and producer.op_type == "DequantizeLinear"


def _reduction(node: ir.Node, weight: np.ndarray) -> int:
    """Multiply-adds per output element of a Conv, MatMul or Gemm with this weight."""
    if node.op_type == "Conv":
        return int(np.prod(weight.shape[1:]))
    if node.op_type == "Gemm":
        return int(weight.shape[1 if _int_attr(node, "transB", 0) else 0])
    return int(weight.shape[-2])


@dataclasses.dataclass
class Unit:
    """A quantized node plus what runs fused behind it (BN/Mul/Add folded into a Conv, a MatMul's
    bias Add, an absorbed Relu/Clip)."""

    node: ir.Node
    inputs: list[int]  # indices of activation inputs read through DQ
    tail: list[ir.Node] = dataclasses.field(default_factory=list)
    quantize_output: bool = False

    @property
    def output(self) -> ir.Value:
        return (self.tail[-1] if self.tail else self.node).outputs[0]

    @property
    def weighted(self) -> bool:
        """A Conv/ConvTranspose/MatMul/Gemm whose second input is a float weight (not an activation x
        activation MatMul)."""
        return self.node.op_type in CORE and len(self.node.inputs) > 1 and is_float_weight(self.node.inputs[1])


@dataclasses.dataclass
class Plan:
    units: list[Unit]
    groups: list[list[ir.Value]]  # each group shares one scale and zero point
    fused: set[ir.Value]  # produced by a quantized unit: every use reads the DQ
    fallbacks: collections.Counter


class _UnionFind:
    def __init__(self):
        self.parent: dict[ir.Value, ir.Value] = {}

    def find(self, v: ir.Value) -> ir.Value:
        self.parent.setdefault(v, v)
        while self.parent[v] is not v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: ir.Value, b: ir.Value) -> None:
        self.parent[self.find(a)] = self.find(b)

    def groups(self) -> list[list[ir.Value]]:
        out: dict[ir.Value, list[ir.Value]] = {}
        for v in self.parent:
            out.setdefault(self.find(v), []).append(v)
        return list(out.values())


class Placer:
    """Plans one graph. ``problem(v)`` is None when tensor ``v`` can be quantized, else why not
    (never calibrated, too little resolution); ``selected(node)`` applies the node selector to
    the ops a unit is made of (what folds behind them, BN or Relu, follows its unit)."""

    def __init__(self, graph: ir.Graph, problem: Callable[[ir.Value], str | None],
                 selected: Callable[[ir.Node], bool], placement: str, absorb: bool, min_reduction: int = 0,
                 rank: Callable[[ir.Value], int | None] = lambda v: None, min_island: int = 1):
        self.graph, self.problem, self.selected, self.rank = graph, problem, selected, rank
        self.placement, self.absorb, self.min_reduction = placement, absorb, min_reduction
        self.min_island = min_island
        self.fallbacks: collections.Counter = collections.Counter()

    def observed(self, value: ir.Value) -> bool:
        return self.problem(value) is None

    # -- node tests ---------------------------------------------------------------------------
    def _activation(self, value: ir.Value | None) -> bool:
        """A tensor computed at run time (not a weight) that is not already dequantized."""
        return value is not None and constant_array(value) is None and not _dequantized(value)

    def _core(self, node: ir.Node) -> Unit | None:
        ins = node.inputs
        if node.op_type == "ConvTranspose" and self.placement == "ort-cpu":
            self.fallbacks["no_integer_kernel"] += 1
            return None
        if node.op_type == "MatMul" and len(ins) == 2 and self._activation(ins[0]) and self._activation(ins[1]):
            return Unit(node, [0, 1]) if self.placement == "all" and all(map(self.observed, ins)) else None
        if len(ins) < 2 or not self._activation(ins[0]):
            self.fallbacks["already_quantized" if _dequantized(ins[0]) else "no_activation_input"] += 1
            return None
        if not is_float_weight(ins[1]):
            self.fallbacks["already_quantized" if _dequantized(ins[1]) else "weight_not_float32"
                           if constant_array(ins[1]) is not None else "no_constant_weight"] += 1
            return None
        array = constant_array(ins[1])
        if node.op_type == "Gemm" and (_int_attr(node, "transA", 0) or array.ndim != 2):
            self.fallbacks["gemm_layout"] += 1
            return None
        if node.op_type == "MatMul" and array.ndim < 2:
            self.fallbacks["weight_rank"] += 1
            return None
        if self.placement == "ort-cpu":
            if node.op_type == "Conv" and _int_attr(node, "group", 1) != 1:
                self.fallbacks["grouped_conv_faster_in_float"] += 1
                return None
            if _reduction(node, array) < self.min_reduction:
                self.fallbacks["reduction_below_min"] += 1
                return None
        if self.problem(ins[0]):
            self.fallbacks[self.problem(ins[0])] += 1
            return None
        return Unit(node, [0])

    def _neighbor(self, node: ir.Node) -> Unit | None:
        op = node.op_type
        if op == "Resize" and "mode" in node.attributes and node.attributes["mode"].as_string() != "nearest":
            return None
        if len(node.outputs) != 1:
            return None
        if op in PASS_THROUGH:
            data = [0]
        elif self.placement == "all":  # every calibrated float input computed at run time
            data = [i for i, v in enumerate(node.inputs)
                    if v is not None and constant_array(v) is None and self.problem(v) != "uncalibrated"]
        else:  # ORT's QLinear ops want every input quantized
            data = [i for i, v in enumerate(node.inputs) if v is not None]
        if not data or not all(self._activation(node.inputs[i]) for i in data):
            return None
        return Unit(node, data)

    def _tail(self, unit: Unit) -> None:
        """Fold a Conv's per-channel BatchNormalization/Mul/Add chain, or the bias Add of a
        MatMul on 2-D activations (to become a Gemm), then an absorbable Relu/Clip(0, ...)."""
        value = unit.node.outputs[0]
        while unit.node.op_type == "Conv" and unit.weighted:
            nxt = next((n for op in ("BatchNormalization", "Mul", "Add")
                        if (n := self._sole_consumer(value, op)) is not None), None)
            weight = constant_array(unit.node.inputs[1])
            if nxt is None or channel_affine(nxt, value, *weight.shape[:1], weight.ndim) is None:
                break
            unit.tail.append(nxt)
            value = nxt.outputs[0]
        if unit.node.op_type == "MatMul" and unit.weighted and self.rank(unit.node.inputs[0]) == 2:
            add = self._sole_consumer(value, "Add")  # ORT would fuse MatMul+Add into a float-bias Gemm
            n = constant_array(unit.node.inputs[1]).shape[-1]
            if add is not None and bias_vector(add, value, n) is not None:
                unit.tail.append(add)
                value = add.outputs[0]
        if not self.absorb or unit.node.op_type in PASS_THROUGH:
            return
        act = self._sole_consumer(value, "Relu") or self._sole_consumer(value, "Clip")
        if act is None or not self.observed(act.outputs[0]):
            return
        if act.op_type == "Clip":
            lo = _clip_bound(act, 1, "min")
            if lo is None or lo != 0.0:
                return
        unit.tail.append(act)

    def _sole_consumer(self, value: ir.Value, op: str) -> ir.Node | None:
        uses = list(value.uses())
        if len(uses) != 1 or value.is_graph_output():
            return None
        node = uses[0].node
        if node.op_type != op or node.domain not in DEFAULT_DOMAINS or node.graph is not self.graph:
            return None
        return node

    # -- planning -----------------------------------------------------------------------------
    def plan(self) -> Plan:
        units: dict[ir.Node, Unit] = {}
        nodes = [n for n in self.graph if n.domain in DEFAULT_DOMAINS and self.selected(n)]
        for node in nodes:
            unit = self._core(node) if node.op_type in CORE else None
            if unit is not None:
                self._tail(unit)
                unit.quantize_output = node.op_type == "Conv" or self.placement == "all"
                if unit.quantize_output and self.problem(unit.output):
                    self.fallbacks[self.problem(unit.output)] += 1
                    continue
                units[node] = unit
        wanted = {unit.node.inputs[i] for unit in units.values() for i in unit.inputs}
        for unit in units.values():  # MatMul/Gemm: a Q on the output only when integers consume it
            unit.quantize_output = unit.quantize_output or (unit.output in wanted and self.observed(unit.output))
        ready = wanted | {unit.output for unit in units.values() if unit.quantize_output}
        ops = ALL_OPS if self.placement == "all" else FUSED + PASS_THROUGH
        candidates: dict[ir.Node, Unit] = {}
        absorbed = {t for unit in units.values() for t in unit.tail}
        for node in nodes:  # forward: every float input is quantized or comes from a candidate
            if node.op_type not in ops or node in units or node in absorbed:
                continue
            unit = self._neighbor(node)
            if unit is None:
                continue
            inputs = [node.inputs[i] for i in unit.inputs]
            if not all(v in ready or (self.placement == "all" and self.observed(v)) for v in inputs):
                continue
            self._tail(unit)
            if node.op_type not in PASS_THROUGH and not self.observed(unit.output):
                continue
            candidates[node] = unit
            absorbed |= set(unit.tail)
            ready.add(unit.output)
        keep = candidates if self.placement == "all" else self._prune(candidates, units)
        for node, unit in keep.items():
            unit.quantize_output = True
            units[node] = unit
        if self.min_island > 1:
            units = self._drop_small_islands(units)
        return self._groups(units)

    def _drop_small_islands(self, units: dict[ir.Node, Unit]) -> dict[ir.Node, Unit]:
        """Leave float every island (units joined by the quantized tensors they share) with fewer
        than ``min_island`` weighted units: a lone quantized op between float ops pays for its
        Q/DQ and breaks the float fusions ORT would otherwise make around it."""
        uf = _UnionFind()
        for unit in units.values():
            values = [unit.node.inputs[i] for i in unit.inputs] + ([unit.output] if unit.quantize_output else [])
            for value in values[1:]:
                uf.union(values[0], value)
        weighted: collections.Counter = collections.Counter(
            uf.find(unit.node.inputs[unit.inputs[0]]) for unit in units.values() if unit.weighted)
        kept = {}
        for node, unit in units.items():
            if weighted[uf.find(unit.node.inputs[unit.inputs[0]])] >= self.min_island:
                kept[node] = unit
            elif unit.weighted:
                self.fallbacks["island_below_min"] += 1
        return kept

    def _prune(self, candidates: dict[ir.Node, Unit], units: dict[ir.Node, Unit]) -> dict[ir.Node, Unit]:
        """Keep the neighbours whose output reaches a weighted unit through kept neighbours
        (consumers come later in graph order, so one reverse sweep decides)."""
        keep: dict[ir.Node, Unit] = {}
        for node in reversed(list(candidates)):
            unit = candidates[node]
            for use in unit.output.uses():
                consumer = units.get(use.node) or keep.get(use.node)
                if consumer is not None and use.idx in consumer.inputs:
                    keep[node] = unit
                    break
        return {n: keep[n] for n in candidates if n in keep}

    def _groups(self, units: dict[ir.Node, Unit]) -> Plan:
        uf = _UnionFind()
        fused: set[ir.Value] = set()
        for unit in units.values():
            for i in unit.inputs:
                uf.find(unit.node.inputs[i])
            if unit.quantize_output:
                uf.find(unit.output)
                fused.add(unit.output)
            op = unit.node.op_type
            if unit.quantize_output and (op in PASS_THROUGH or op == "Concat"):
                for i in unit.inputs:
                    uf.union(unit.node.inputs[i], unit.output)
        return Plan(list(units.values()), uf.groups(), fused, self.fallbacks)


def channel_affine(node: ir.Node, x: ir.Value, channels: int, rank: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(k, c)`` with ``node(x) == x * k + c`` per channel, ``x`` of rank ``rank`` with channels on
    axis 1: an inference BatchNormalization, or a Mul/Add by a scalar or per-channel constant."""
    if node.op_type == "BatchNormalization":
        params = [constant_array(v) for v in node.inputs[1:5]]
        if len(node.outputs) != 1 or _int_attr(node, "training_mode", 0) or any(p is None for p in params):
            return None
        gamma, beta, mean, var = (p.astype(np.float64).reshape(-1) for p in params)
        eps = node.attributes["epsilon"].as_float() if "epsilon" in node.attributes else 1e-5
        k = gamma / np.sqrt(var + eps)
        return k, beta - mean * k
    if len(node.inputs) != 2 or x not in node.inputs or node.inputs[0] is node.inputs[1]:
        return None
    other = constant_array(node.inputs[1] if node.inputs[0] is x else node.inputs[0])
    if other is None or other.dtype != np.float32 or other.ndim > rank:
        return None
    if other.size != 1:  # per channel: [C, 1, ...] aligned with axis 1 of x, every other dim 1
        dims = (1,) * (rank - other.ndim) + other.shape
        if dims[1] != channels or other.size != channels:
            return None
    vector = np.broadcast_to(other.astype(np.float64).reshape(-1), (channels,))
    if node.op_type == "Mul":
        return vector, np.zeros(channels)
    return np.ones(channels), vector


def bias_vector(add: ir.Node, x: ir.Value, n: int) -> np.ndarray | None:
    """The ``[n]`` bias ``add`` adds to ``x`` (a scalar or ``[n]``/``[1, n]`` constant), else None."""
    if len(add.inputs) != 2 or x not in add.inputs or add.inputs[0] is add.inputs[1]:
        return None
    other = constant_array(add.inputs[1] if add.inputs[0] is x else add.inputs[0])
    if other is None or other.dtype != np.float32 or (other.size != 1 and other.shape not in ((n,), (1, n))):
        return None
    return np.broadcast_to(other.reshape(-1), (n,)).astype(np.float32)


def _clip_bound(node: ir.Node, index: int, attr: str) -> float | None:
    if len(node.inputs) > index and node.inputs[index] is not None:
        array = constant_array(node.inputs[index])
        return None if array is None else float(array)
    value = node.attributes.get(attr)
    if value is not None:
        return value.as_float()
    return -np.inf if attr == "min" else np.inf


def clip_max(node: ir.Node) -> float | None:
    """The upper bound of a Clip node (inf when it has none; None when it is not constant)."""
    return _clip_bound(node, 2, "max")


def add_initializer(graph: ir.Graph, namer: Namer, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` (a subgraph may hold initializers too)."""
    tensor = ir.tensor(array, name=namer.fresh(base))
    value = ir.Value(name=tensor.name, const_value=tensor, type=ir.TensorType(tensor.dtype),
                     shape=ir.Shape(array.shape))
    graph.register_initializer(value)
    return value


def add_node(graph: ir.Graph, namer: Namer, op: str, inputs, attrs=None, *, out: str,
             before: ir.Node | None = None, after: ir.Node | None = None, domain: str = "") -> ir.Value:
    """Insert one single-output node next to ``before``/``after`` (default: at the graph start)."""
    node = ir.node(op, inputs, attrs or {}, domain=domain, name=namer.fresh(f"{out}_{op}"))
    node.outputs[0].name = namer.fresh(out)
    if after is not None:
        graph.insert_after(after, node)
    elif before is not None:
        graph.insert_before(before, node)
    elif len(graph):
        graph.insert_before(graph[0], node)
    else:
        graph.append(node)
    return node.outputs[0]


def drop_if_unused(value: ir.Value) -> None:
    """Remove a weight initializer or Constant node once nothing reads it."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        producer.graph.remove(producer, safe=True)
    elif value.is_initializer() and value.graph is not None and not value.is_graph_input():
        value.graph.initializers.pop(value.name)
