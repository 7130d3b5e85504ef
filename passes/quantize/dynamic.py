"""quantize-dynamic: int8 weights, activations quantized at run time (no calibration).

``MatMul(x, W)`` and ``Gemm(x, W, C)`` become standard ONNX integer ops::

    xq, x_scale, x_zero = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(xq, Wq, x_zero), float) * (x_scale * w_scale)   [+ C]

which ONNX Runtime (level 2 optimizations) fuses into its DynamicQuantizeMatMul /
MatMulIntegerToFloat kernels, and which any ONNX runtime can execute. ``W`` is 8-bit,
symmetric, per output column by default: int8 where the target's u8s8 kernels accumulate in
int32 (VNNI, AMX, ARM), uint8 where they saturate (x86 without VNNI; see onnxopt/target.py); one DynamicQuantizeLinear serves every
quantized consumer of the same activation. Conv (ConvInteger, uint8 weights, per tensor:
all ORT's CPU kernel takes) is opt-in through ``ops``: measured slower than float on ORT
CPU. Weights are quantized once however many nodes share them. If/Loop/Scan bodies are
handled like the main graph; function bodies are left float and counted in ``fallbacks``.

A weight (or Gemm bias) stored as external data is not read by the pass: its integer
weight, weight scale and scaled bias become ``ir.LazyTensor``s computed from the
memory-mapped source when the model is saved (or handed to ORT), one tensor at a time, so
peak memory follows the largest tensor, not the model (see ``weights_lazy``). The
graph is the same as for in-memory weights, and so are the numbers: both paths quantize
with ``weights_lazy.quantize_array``, which equals ``math.quantize_weight``.
A Gemm weight stored transposed ([N, K]) is quantized per row and written transposed.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs
from onnxopt.opset import default_opset, ensure_opset, min_ir_version
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import NodeSelector, selector_field

from . import math as qm
from onnxopt.naming import Namer

from . import weights_lazy as lazy
from .placement import DEFAULT_DOMAINS, add_initializer, add_node, drop_if_unused, stored_tensor
from .weights import gather_bits_field, merge_gather_stats, quantize_gather_tables
from .weights_store import Store

NAME = "quantize-dynamic"
SUPPORTED = ("MatMul", "Gemm", "Conv")


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions:
    ops: tuple[str, ...] = _opt(("MatMul", "Gemm"), "op types to quantize: MatMul, Gemm, Conv (ConvInteger)")
    weight_type: Literal["auto", "int8", "uint8"] = _opt(
        "auto", "integer type of MatMul/Gemm weights (Conv: always uint8); auto: the target's, int8 where u8s8 "
        "accumulates in int32 (VNNI, AMX, ARM), uint8 where u8s8 saturates (x86 without VNNI: u8u8 is exact)")
    reduce_range: bool | None = _opt(
        None, "7-bit int8 weights (|q| <= 64), so u8s8 pair sums stay inside int16; none: the target's choice "
              "(true only for int8 weights on a target whose u8s8 kernels saturate)")
    per_channel: bool = _opt(True, "one weight scale per output column instead of per tensor")
    min_reduction: int = _opt(64, "leave float a node with fewer multiply-adds per output (K, or Cin*kh*kw)")
    pow2: bool = _opt(False, "power-of-two weight scales (2^-n); activation scales are computed at run time")
    gather_bits: Literal[0, 4, 8] = gather_bits_field()
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    partition: tuple[str, ...] = selector_field("partition")

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in SUPPORTED]
        if unknown or not self.ops:
            raise UsageError(f"{NAME}: ops must name some of {', '.join(SUPPORTED)}, got {list(self.ops)}")


class QuantizeDynamicPass(Pass):
    """int8 weights with activations quantized at run time (DynamicQuantizeLinear + MatMulInteger)."""

    name = NAME
    Options = QuantizeDynamicOptions
    fidelity_of = Fidelity.LOSSY
    measures_speed = True

    def target_defaults(self, target) -> dict:
        return target.dynamic_defaults(self.options.weight_type)

    def speed_ladder(self) -> list[tuple[dict, str]]:
        """Only the larger products: run-time quantization of a small one costs more than it saves."""
        return [({"min_reduction": k}, f"min_reduction={k}") for k in (256, 1024) if k > self.options.min_reduction]

    def call(self, model: ir.Model) -> PassResult:
        stats = {"nodes_quantized": 0, "weights_quantized": 0, "ops_quantized": {}, "fallbacks": {}}
        opts = self.options  # ``ops`` names what to quantize; the other selector fields filter nodes
        selector = NodeSelector(nodes=opts.nodes, exclude_nodes=opts.exclude_nodes, exclude_ops=opts.exclude_ops,
                                region=opts.region)
        chosen = None if selector.is_trivial else set(selector.select(model))
        fallbacks: collections.Counter = collections.Counter()
        plans = []
        for graph in all_graphs(model):
            if not isinstance(graph, ir.Graph):
                fallbacks["in_function"] += sum(1 for n in graph if n.op_type in self.options.ops)
                continue
            nodes = [n for n in graph if n.op_type in self.options.ops and n.domain in DEFAULT_DOMAINS
                     and (chosen is None or n in chosen)]
            for node in nodes:
                reason = self._refusal(node)
                if reason:
                    fallbacks[reason] += 1
                    if reason == "weight_not_finite":  # named: the user has a broken weight
                        stats.setdefault("left_float", {})[node.inputs[1].name] = "holds NaN or Inf"
                else:
                    plans.append((graph, node))
        stats["fallbacks"] = dict(fallbacks)
        if not plans:
            tables = quantize_gather_tables(model, opts, opts.gather_bits)
            merge_gather_stats(stats, tables)
            return PassResult(model, bool(tables), stats)
        if default_opset(model) < 11:  # DynamicQuantizeLinear is opset 11
            current = default_opset(model)
            ensure_opset(model, 11)  # replaces the graph objects: plan again
            stats["opset_upgraded"] = f"{current}->11"
            return self._after_upgrade(model, stats)
        self._rewrite(model, plans, stats)
        merge_gather_stats(stats, quantize_gather_tables(model, opts, opts.gather_bits))
        return PassResult(model, True, stats)

    def _after_upgrade(self, model: ir.Model, stats: dict) -> PassResult:
        result = self.call(model)
        result.stats["opset_upgraded"] = stats["opset_upgraded"]
        return PassResult(model, True, result.stats)

    def _refusal(self, node: ir.Node) -> str | None:
        ins = node.inputs
        if len(ins) < 2 or ins[0] is None or stored_tensor(ins[0]) is not None:
            return "no_activation_input"
        x_producer = ins[0].producer()
        if x_producer is not None and x_producer.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return "already_quantized"
        w = stored_tensor(ins[1])  # dtype and shape only: an external weight is not read here
        if w is None or w.dtype != ir.DataType.FLOAT:
            return "already_quantized" if ins[1].producer() is not None and \
                ins[1].producer().op_type == "DequantizeLinear" else "no_constant_weight"
        shape = _shape(w)
        if node.op_type == "MatMul" and len(shape) != 2:
            return "weight_rank"
        if node.op_type == "Gemm":
            attr = node.attributes.get("transA")
            if (attr is not None and attr.as_int()) or len(shape) != 2:
                return "gemm_layout"
            bias = ins[2] if len(ins) > 2 else None
            if bias is not None and stored_tensor(bias) is None:
                return "gemm_runtime_bias"
        if node.op_type == "Conv":
            group = node.attributes.get("group")
            if group is not None and group.as_int() != 1:
                return "grouped_conv"
        reduction = math.prod(shape[1:]) if node.op_type == "Conv" else _k(node, shape)
        if reduction < self.options.min_reduction:
            return "reduction_below_min"
        if not qm.all_finite(w):
            return "weight_not_finite"
        return None

    def _rewrite(self, model: ir.Model, plans: list[tuple[ir.Graph, ir.Node]], stats: dict) -> None:
        namer = Namer(model)
        dynamic: dict[tuple[int, ir.Value], tuple[ir.Value, ir.Value, ir.Value]] = {}
        weights: dict[tuple[ir.Value, str], tuple[ir.Value, ir.Value | None, np.ndarray]] = {}
        ops: collections.Counter = collections.Counter()
        for graph, node in plans:
            x = node.inputs[0]
            key = (id(graph), x)
            if key not in dynamic:
                producer = x.producer()
                dq = ir.node("DynamicQuantizeLinear", [x], num_outputs=3,
                             name=namer.fresh(f"{x.name}_DynamicQuantizeLinear"))
                for out, suffix in zip(dq.outputs, ("quantized", "scale", "zero_point")):
                    out.name = namer.fresh(f"{x.name}_{suffix}")
                if producer is not None and producer.graph is graph:
                    graph.insert_after(producer, dq)
                else:
                    graph.insert_before(graph[0], dq)
                dynamic[key] = tuple(dq.outputs)
            xq, x_scale, x_zero = dynamic[key]
            if node.op_type == "Conv":
                self._conv(graph, node, xq, x_scale, x_zero, namer, weights, stats)
            else:
                self._matmul(graph, node, xq, x_scale, x_zero, namer, weights, stats)
            ops[node.op_type] += 1
        stats["nodes_quantized"] = len(plans)
        stats["quantized_nodes"] = sorted({node.name for _, node in plans if node.name})
        stats["ops_quantized"] = dict(sorted(ops.items()))
        model.ir_version = max(model.ir_version, min_ir_version(default_opset(model)))

    def _weight(self, graph, node, axis: int | None, qtype: qm.QuantType, namer, weights, stats):
        """(quantized weight, zero point or None, its _WeightQuantizer), quantized once per weight and layout."""
        source = node.inputs[1]
        key = (source, f"{node.op_type}:{axis}:{qtype.name}:{_transposed(node)}")
        if key not in weights:
            reduce = bool(self.options.reduce_range) and qtype.signed
            quantizer = _WeightQuantizer(stored_tensor(source), qtype, axis, _transposed(node), self.options.pow2,
                                         reduce)
            producer = source.producer()
            owner = producer.graph if producer is not None else (source.graph or graph)
            base = source.name or "weight"
            q_value = _initializer(owner, namer, f"{base}_quantized", quantizer.quantized())
            zp_value = None if qtype.signed else _initializer(owner, namer, f"{base}_zero_point",
                                                              quantizer.zero_point())
            weights[key] = (q_value, zp_value, quantizer)
            stats["weights_quantized"] += 1
        return weights[key]

    def _matmul(self, graph, node, xq, x_scale, x_zero, namer, weights, stats) -> None:
        alpha = beta = 1.0
        if node.op_type == "Gemm":
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        qtype = qm.QuantType.parse(self.options.weight_type)
        wq, w_zero, quantizer = self._weight(graph, node, 1 if self.options.per_channel else None, qtype, namer,
                                             weights, stats)
        out = node.outputs[0]
        base = out.name or "matmul"
        inputs = [xq, wq, x_zero] + ([w_zero] if w_zero is not None else [])
        acc = add_node(graph, namer, "MatMulInteger", inputs, out=f"{base}_int32", before=node)
        acc_f = add_node(graph, namer, "Cast", [acc], {"to": ir.DataType.FLOAT}, out=f"{base}_int32_float", before=node)
        scale = _initializer(graph, namer, f"{base}_weight_scale", quantizer.scale(alpha))
        combined = add_node(graph, namer, "Mul", [x_scale, scale], out=f"{base}_scale", before=node)
        y = add_node(graph, namer, "Mul", [acc_f, combined], out=f"{base}_dequantized", before=node)
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            c = _initializer(graph, namer, f"{base}_bias", _scaled(stored_tensor(bias), beta))
            y = add_node(graph, namer, "Add", [y, c], out=f"{base}_biased", before=node)
        self._replace(graph, node, y)

    def _conv(self, graph, node, xq, x_scale, x_zero, namer, weights, stats) -> None:
        wq, w_zero, quantizer = self._weight(graph, node, None, qm.QuantType(8, False), namer, weights, stats)
        out = node.outputs[0]
        base = out.name or "conv"
        attrs = {k: v for k, v in node.attributes.items()}
        conv = ir.node("ConvInteger", [xq, wq, x_zero, w_zero], attrs, name=namer.fresh(f"{base}_ConvInteger"))
        conv.outputs[0].name = namer.fresh(f"{base}_int32")
        graph.insert_before(node, conv)
        acc_f = add_node(graph, namer, "Cast", [conv.outputs[0]], {"to": ir.DataType.FLOAT},
                         out=f"{base}_int32_float", before=node)
        scale = _initializer(graph, namer, f"{base}_weight_scale", quantizer.scale(1.0))
        combined = add_node(graph, namer, "Mul", [x_scale, scale], out=f"{base}_scale", before=node)
        y = add_node(graph, namer, "Mul", [acc_f, combined], out=f"{base}_dequantized", before=node)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            shape = add_initializer(graph, namer, f"{base}_bias_shape",
                                    np.array([-1] + [1] * (len(quantizer.shape) - 2), np.int64))
            bias = add_node(graph, namer, "Reshape", [node.inputs[2], shape], out=f"{base}_bias", before=node)
            y = add_node(graph, namer, "Add", [y, bias], out=f"{base}_biased", before=node)
        self._replace(graph, node, y)

    def _replace(self, graph: ir.Graph, node: ir.Node, y: ir.Value) -> None:
        out = node.outputs[0]
        name, y_shape = out.name, out.shape
        weights = [v for v in node.inputs[1:] if v is not None]
        out.replace_all_uses_with(y, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        y.name, y.shape, y.dtype = name, y_shape, ir.DataType.FLOAT
        for value in weights:
            drop_if_unused(value)


class _WeightQuantizer:
    """The integer weight, scales and zero point of one float weight: computed now, or at save time.

    ``axis`` is the per-column axis (1) of the [K, N] weight the integer op reads, or None
    (per tensor). A transposed Gemm weight is stored [N, K]: it is quantized per row and its
    integers written transposed, which gives the same numbers as quantizing its transpose.
    """

    def __init__(self, tensor: ir.TensorProtocol, qtype: qm.QuantType, axis: int | None, transposed: bool,
                 pow2: bool, reduce_range: bool = False):
        self.source = lazy.WeightSource(tensor)
        self.reduce_range = reduce_range  # twice the scale: |q| <= 64
        self.defer = isinstance(tensor, ir.ExternalTensor)  # in memory: quantized at once
        self.shape = _shape(tensor)
        self.qtype, self.transposed = qtype, transposed
        stored_axis = 1 - axis if transposed and axis is not None else axis
        self.args = (qtype, stored_axis, None, True, pow2)  # symmetric, no blocks, no clipping
        self.param_shape = lazy.param_shape(self.shape, stored_axis, None)
        self.stored_axis = stored_axis

    def _scale(self, w: np.ndarray) -> np.ndarray:
        scale = lazy.weight_params(w, *self.args)[0]
        return scale * np.float32(2) if self.reduce_range else scale

    def quantized(self) -> ir.TensorProtocol:
        def compute(w: np.ndarray) -> np.ndarray:
            if self.reduce_range:
                zero = np.zeros(self.param_shape, self.qtype.np_dtype)
                q = qm.quantize(w, self._scale(w), zero, self.qtype, self.stored_axis)
            else:
                q = lazy.quantize_array(w, *self.args)[0]
            return np.ascontiguousarray(q.T) if self.transposed else q

        shape = self.shape[::-1] if self.transposed else self.shape
        return lazy.payload(self.source, compute, self.qtype.ir_dtype, shape, self.defer)

    def scale(self, multiplier: float) -> ir.TensorProtocol:
        """The weight scale times ``multiplier`` (Gemm's alpha), in float32."""
        def compute(w: np.ndarray) -> np.ndarray:
            return np.asarray(self._scale(w) * np.float32(multiplier), dtype=np.float32)

        return lazy.payload(self.source, compute, ir.DataType.FLOAT, self.param_shape, self.defer)

    def zero_point(self) -> ir.TensorProtocol:
        return ir.tensor(lazy.symmetric_zero_point(self.qtype, self.param_shape), dtype=self.qtype.ir_dtype)


def _scaled(tensor: ir.TensorProtocol, factor: float) -> ir.TensorProtocol:
    """``tensor * factor`` in float32 (Gemm's beta * C), deferred when the tensor is external data."""
    return lazy.payload(lazy.WeightSource(tensor), lambda c: (c * np.float32(factor)).astype(np.float32),
                        ir.DataType.FLOAT, _shape(tensor), isinstance(tensor, ir.ExternalTensor))


def _shape(tensor: ir.TensorProtocol) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.shape.numpy())


def _initializer(graph: ir.Graph, namer: Namer, base: str, tensor: ir.TensorProtocol) -> ir.Value:
    return Store(graph, namer, as_nodes=False).const(base, tensor)


def _transposed(node: ir.Node) -> bool:
    attr = node.attributes.get("transB")
    return node.op_type == "Gemm" and attr is not None and bool(attr.as_int())


def _k(node: ir.Node, shape: tuple[int, ...]) -> int:
    return shape[1] if _transposed(node) else shape[0]
