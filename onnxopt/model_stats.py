"""Size and shape facts about a model, cheap enough to take before and after every pass."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import onnx_ir as ir

from .graph_walk import all_graphs, all_nodes


@dataclass
class ModelStats:
    nodes: int = 0
    initializers: int = 0
    initializer_bytes: int = 0
    constant_bytes: int = 0
    ops: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> tuple:
        return (self.nodes, self.initializers, self.initializer_bytes, self.constant_bytes, tuple(sorted(self.ops.items())))


def op_key(node: ir.Node) -> str:
    return f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type


def model_stats(model: ir.Model) -> ModelStats:
    stats = ModelStats()
    ops: Counter[str] = Counter()
    for node in all_nodes(model):
        stats.nodes += 1
        ops[op_key(node)] += 1
        if node.op_type == "Constant" and node.domain == "":
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    stats.constant_bytes += attr.value.nbytes
    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            stats.initializers += 1
            if value.const_value is not None:
                stats.initializer_bytes += value.const_value.nbytes
    stats.ops = dict(sorted(ops.items()))
    return stats


def op_delta(before: ModelStats, after: ModelStats) -> dict[str, int]:
    """Op-type histogram change, only the ops whose count changed."""
    keys = set(before.ops) | set(after.ops)
    delta = {k: after.ops.get(k, 0) - before.ops.get(k, 0) for k in sorted(keys)}
    return {k: v for k, v in delta.items() if v}


# -- parameters, bytes and a FLOPs estimate ------------------------------------------------------

_MAC_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


def value_shapes(model: ir.Model, input_shapes: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Shapes of the main graph's values by name (ints, None for unknown dims), from the IR and
    onnx shape inference (run on the model without its big initializers). ``input_shapes``
    fixes the graph inputs' shapes first (a feed's), so symbolic dims get numbers."""
    import onnx

    shapes: dict[str, tuple] = {}
    try:
        from onnx_ir.passes.common._c_api_utils import call_onnx_api

        def infer(proto):
            del proto.graph.value_info[:]  # declared shapes can be wrong or symbolic: infer afresh
            for info in proto.graph.input:
                if input_shapes and info.name in input_shapes:
                    dims = info.type.tensor_type.shape.dim
                    for dim, size in zip(dims, input_shapes[info.name]):
                        dim.dim_value = int(size)
            return onnx.shape_inference.infer_shapes(proto, data_prop=True)

        proto = call_onnx_api(infer, model)
        for info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
            tt = info.type.tensor_type
            if info.type.HasField("tensor_type") and tt.HasField("shape"):
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else None
                                          for d in tt.shape.dim)
    except Exception:  # noqa: BLE001 - inference is best effort; IR shapes below still count
        pass
    graph = model.graph
    for value in [*graph.inputs, *(o for n in graph for o in n.outputs)]:
        if value.shape is not None and value.name not in shapes:
            shapes[value.name] = tuple(d if isinstance(d, int) and d >= 0 else None for d in value.shape)
    for value in graph.initializers.values():
        if value.const_value is not None:
            shapes[value.name] = tuple(value.const_value.shape)
    return shapes


def _weight_size(value: ir.Value | None, shapes: dict[str, tuple]) -> int | None:
    shape = shapes.get(value.name) if value is not None else None
    if shape is None or any(d is None for d in shape):
        return None
    size = 1
    for d in shape:
        size *= d
    return size


def compute_estimate(model: ir.Model, input_shapes: dict[str, tuple] | None = None) -> dict:
    """Parameters (elements of float initializers and Constant tensors), their bytes, and an
    estimate of the main graph's FLOPs: 2 x multiply-accumulates of Conv, ConvTranspose, Gemm
    and MatMul (other ops are ignored). ``flops`` is None when a shape it needs is unknown."""
    parameters = nbytes = 0
    for graph in all_graphs(model):
        tensors = [v.const_value for v in getattr(graph, "initializers", {}).values() if v.const_value is not None]
        tensors += [a.value for n in graph if n.op_type == "Constant" for a in n.attributes.values()
                    if a.type == ir.AttributeType.TENSOR]
        for tensor in tensors:
            nbytes += tensor.nbytes
            if tensor.dtype.is_floating_point() or tensor.dtype in (ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT4, ir.DataType.UINT4):
                parameters += tensor.size
    shapes = value_shapes(model, input_shapes)
    flops: int | None = 0
    for node in model.graph:
        if node.op_type not in _MAC_OPS or node.domain not in ("", "ai.onnx"):
            continue
        macs = node_macs(node, shapes)
        if macs is None:
            flops = None
            break
        flops += 2 * macs
    return {"parameters": parameters, "bytes": nbytes, "flops": flops}


def node_macs(node: ir.Node, shapes: dict[str, tuple]) -> int | None:
    """Multiply-accumulates of one Conv, ConvTranspose, Gemm or MatMul node from value shapes by
    name (None dims unknown); None for other ops or when a shape it needs is unknown."""
    if node.op_type not in _MAC_OPS or node.domain not in ("", "ai.onnx") or not node.outputs:
        return None
    out = _weight_size(node.outputs[0], shapes)
    if node.op_type in ("Conv", "ConvTranspose"):
        w = shapes.get(node.inputs[1].name) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if w is None or any(d is None for d in w) or out is None:
            return None
        kernel = 1
        for d in w[2:]:
            kernel *= d
        if node.op_type == "Conv":
            return out * w[1] * kernel
        x = _weight_size(node.inputs[0], shapes)
        return None if x is None else x * w[1] * kernel
    a = shapes.get(node.inputs[0].name) if node.inputs and node.inputs[0] is not None else None
    k = None if a is None or not a else a[-1 if node.op_type == "MatMul" or not _trans(node, "transA") else 0]
    return None if k is None or out is None else out * k


def _trans(node: ir.Node, name: str) -> bool:
    attr = node.attributes.get(name)
    return attr is not None and attr.as_int() == 1
