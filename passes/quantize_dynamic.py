"""quantize-dynamic: int8 weights, activations quantized at run time (no calibration).

``MatMul(x, W)`` and ``Gemm(x, W, C)`` become standard ONNX integer ops::

    xq, x_scale, x_zero = DynamicQuantizeLinear(x)
    y = Cast(MatMulInteger(xq, Wq, x_zero), float) * (x_scale * w_scale)   [+ C]

which ONNX Runtime (level 2 optimizations) fuses into its DynamicQuantizeMatMul /
MatMulIntegerToFloat kernels, and which any ONNX runtime can execute. ``W`` is int8,
symmetric, per output column by default; one DynamicQuantizeLinear serves every
quantized consumer of the same activation. Conv (ConvInteger, uint8 weights, per tensor:
all ORT's CPU kernel takes) is opt-in through ``ops``: measured slower than float on ORT
CPU. Weights are quantized once however many nodes share them. If/Loop/Scan bodies are
handled like the main graph; function bodies are left float and counted in ``fallbacks``.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs
from onnxopt.opset import default_opset, ensure_opset, min_ir_version
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import NodeSelector, selector_field

from . import quant_math as qm
from onnxopt.naming import Namer

from .qdq_placement import DEFAULT_DOMAINS, add_initializer, add_node, constant_array, drop_if_unused

NAME = "quantize-dynamic"
SUPPORTED = ("MatMul", "Gemm", "Conv")


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class QuantizeDynamicOptions:
    ops: tuple[str, ...] = _opt(("MatMul", "Gemm"), "op types to quantize: MatMul, Gemm, Conv (ConvInteger)")
    weight_type: Literal["int8", "uint8"] = _opt(
        "uint8", "integer type of MatMul/Gemm weights (Conv: always uint8); int8 is faster on ORT CPU but its "
        "u8s8 kernels saturate on x86 without VNNI")
    per_channel: bool = _opt(True, "one weight scale per output column instead of per tensor")
    min_reduction: int = _opt(64, "leave float a node with fewer multiply-adds per output (K, or Cin*kh*kw)")
    pow2: bool = _opt(False, "power-of-two weight scales (2^-n); activation scales are computed at run time")
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")

    def __post_init__(self):
        unknown = [op for op in self.ops if op not in SUPPORTED]
        if unknown or not self.ops:
            raise UsageError(f"{NAME}: ops must name some of {', '.join(SUPPORTED)}, got {list(self.ops)}")


class QuantizeDynamicPass(Pass):
    """int8 weights with activations quantized at run time (DynamicQuantizeLinear + MatMulInteger)."""

    name = NAME
    Options = QuantizeDynamicOptions
    fidelity_of = Fidelity.LOSSY

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
                else:
                    plans.append((graph, node))
        stats["fallbacks"] = dict(fallbacks)
        if not plans:
            return PassResult(model, False, stats)
        if default_opset(model) < 11:  # DynamicQuantizeLinear is opset 11
            current = default_opset(model)
            ensure_opset(model, 11)  # replaces the graph objects: plan again
            stats["opset_upgraded"] = f"{current}->11"
            return self._after_upgrade(model, stats)
        self._rewrite(model, plans, stats)
        return PassResult(model, True, stats)

    def _after_upgrade(self, model: ir.Model, stats: dict) -> PassResult:
        result = self.call(model)
        result.stats["opset_upgraded"] = stats["opset_upgraded"]
        return PassResult(model, True, result.stats)

    def _refusal(self, node: ir.Node) -> str | None:
        ins = node.inputs
        if len(ins) < 2 or ins[0] is None or constant_array(ins[0]) is not None:
            return "no_activation_input"
        x_producer = ins[0].producer()
        if x_producer is not None and x_producer.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            return "already_quantized"
        w = constant_array(ins[1])
        if w is None or w.dtype != np.float32:
            return "already_quantized" if ins[1].producer() is not None and \
                ins[1].producer().op_type == "DequantizeLinear" else "no_constant_weight"
        if node.op_type == "MatMul" and w.ndim != 2:
            return "weight_rank"
        if node.op_type == "Gemm":
            attr = node.attributes.get("transA")
            if (attr is not None and attr.as_int()) or w.ndim != 2:
                return "gemm_layout"
            bias = ins[2] if len(ins) > 2 else None
            if bias is not None and constant_array(bias) is None:
                return "gemm_runtime_bias"
        if node.op_type == "Conv":
            group = node.attributes.get("group")
            if group is not None and group.as_int() != 1:
                return "grouped_conv"
        reduction = int(np.prod(w.shape[1:])) if node.op_type == "Conv" else _k(node, w)
        if reduction < self.options.min_reduction:
            return "reduction_below_min"
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

    def _weight(self, graph, node, w: np.ndarray, axis: int | None, qtype: qm.QuantType, namer, weights, stats):
        """(quantized weight, zero point or None, scale array), quantized once per weight and layout."""
        source = node.inputs[1]
        key = (source, f"{node.op_type}:{axis}:{qtype.name}:{_transposed(node)}")
        if key not in weights:
            q, scale, zp, _ = qm.quantize_weight(w, qtype, axis, symmetric=True, pow2=self.options.pow2)
            producer = source.producer()
            owner = producer.graph if producer is not None else (source.graph or graph)
            base = source.name or "weight"
            q_value = add_initializer(owner, namer, f"{base}_quantized", q)
            zp_value = None if qtype.signed else add_initializer(owner, namer, f"{base}_zero_point", zp)
            weights[key] = (q_value, zp_value, scale)
            stats["weights_quantized"] += 1
        return weights[key]

    def _matmul(self, graph, node, xq, x_scale, x_zero, namer, weights, stats) -> None:
        w = constant_array(node.inputs[1]).astype(np.float32)
        if _transposed(node):
            w = w.T.copy()
        alpha = beta = 1.0
        if node.op_type == "Gemm":
            alpha = node.attributes["alpha"].as_float() if "alpha" in node.attributes else 1.0
            beta = node.attributes["beta"].as_float() if "beta" in node.attributes else 1.0
        qtype = qm.QuantType.parse(self.options.weight_type)
        wq, w_zero, w_scale = self._weight(graph, node, w, 1 if self.options.per_channel else None, qtype, namer,
                                           weights, stats)
        out = node.outputs[0]
        base = out.name or "matmul"
        inputs = [xq, wq, x_zero] + ([w_zero] if w_zero is not None else [])
        acc = add_node(graph, namer, "MatMulInteger", inputs, out=f"{base}_int32", before=node)
        acc_f = add_node(graph, namer, "Cast", [acc], {"to": ir.DataType.FLOAT}, out=f"{base}_int32_float", before=node)
        scale = add_initializer(graph, namer, f"{base}_weight_scale", (w_scale * np.float32(alpha)).astype(np.float32))
        combined = add_node(graph, namer, "Mul", [x_scale, scale], out=f"{base}_scale", before=node)
        y = add_node(graph, namer, "Mul", [acc_f, combined], out=f"{base}_dequantized", before=node)
        bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            c = (constant_array(bias).astype(np.float32) * np.float32(beta)).astype(np.float32)
            y = add_node(graph, namer, "Add", [y, add_initializer(graph, namer, f"{base}_bias", c)],
                         out=f"{base}_biased", before=node)
        self._replace(graph, node, y)

    def _conv(self, graph, node, xq, x_scale, x_zero, namer, weights, stats) -> None:
        w = constant_array(node.inputs[1]).astype(np.float32)
        wq, w_zero, w_scale = self._weight(graph, node, w, None, qm.QuantType(8, False), namer, weights, stats)
        out = node.outputs[0]
        base = out.name or "conv"
        attrs = {k: v for k, v in node.attributes.items()}
        conv = ir.node("ConvInteger", [xq, wq, x_zero, w_zero], attrs, name=namer.fresh(f"{base}_ConvInteger"))
        conv.outputs[0].name = namer.fresh(f"{base}_int32")
        graph.insert_before(node, conv)
        acc_f = add_node(graph, namer, "Cast", [conv.outputs[0]], {"to": ir.DataType.FLOAT},
                         out=f"{base}_int32_float", before=node)
        scale = add_initializer(graph, namer, f"{base}_weight_scale", np.asarray(w_scale, np.float32))
        combined = add_node(graph, namer, "Mul", [x_scale, scale], out=f"{base}_scale", before=node)
        y = add_node(graph, namer, "Mul", [acc_f, combined], out=f"{base}_dequantized", before=node)
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            shape = add_initializer(graph, namer, f"{base}_bias_shape",
                                    np.array([-1] + [1] * (w.ndim - 2), np.int64))
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


def _transposed(node: ir.Node) -> bool:
    attr = node.attributes.get("transB")
    return node.op_type == "Gemm" and attr is not None and bool(attr.as_int())


def _k(node: ir.Node, w: np.ndarray) -> int:
    return int(w.shape[1] if _transposed(node) else w.shape[0])
