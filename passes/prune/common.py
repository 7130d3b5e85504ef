"""Helpers shared by the prune passes: constants (initializers or Constant nodes) and shapes."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxopt.model_stats import value_shapes

PRUNABLE_OPS = frozenset({"Conv", "Gemm", "MatMul", "ConvTranspose"})


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The array of an initializer or of a Constant node's output; None for run-time values."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            return attr.as_tensor().numpy()
    return None


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace the tensor of an initializer or Constant-node output, keeping its name."""
    array = np.ascontiguousarray(array)
    producer = value.producer()
    if value.const_value is None and producer is not None and producer.op_type == "Constant":
        producer.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=value.name))
    else:
        value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)


def new_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """A fresh initializer of ``graph`` holding ``array``."""
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(np.ascontiguousarray(array), name=name))
    graph.register_initializer(value)
    return value


def static_shapes(model: ir.Model) -> dict[str, tuple]:
    """Shapes of the main graph's values by name (ints, or None for unknown dims)."""
    return value_shapes(model)


def is_constant_node(node: ir.Node) -> bool:
    return node.op_type == "Constant" and node.domain in ("", "ai.onnx")


def attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else attr.as_int()


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    attr = node.attributes.get(name)
    return None if attr is None else list(attr.as_ints())


def opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13))
