"""fold-constants: onnxscript's constant folder, guarded where onnxscript 0.7 mishandles a node.

Guards (each refusal leaves the node as it was and counts in ``folds_refused``):

* ``CastLike`` carrying ``saturate``: the folder rewrites it to ``Cast`` and drops the
  attribute, so ``saturate=0`` float8 casts would saturate.
* ``Bernoulli``: random, but missing from the folder's list of non-deterministic ops, so a
  constant input would freeze one random draw into an initializer.
* ``If`` in a function with a branch holding initializers: the folder inlines the taken
  branch and moves its initializers onto the function, which cannot hold any.
* ``SplitToSequence`` whose ``split`` is neither constant nor a static 1-D value: the
  folder's rule dereferences a missing value and crashes the whole pass.
* A node whose output would exceed ``output_size_limit`` elements more than its constant
  inputs hold (judged from inferred shapes *before* evaluating it; an expanding op such as
  ``Expand``/``Tile``/``Range`` whose output size is unknown is refused): the folder itself
  checks only after computing the array, so ``Expand`` to 2^40 elements would allocate it.
* String results are stored as ``ir.StringTensor`` (the folder's ``ir.Tensor`` of bytes
  cannot be serialized and crashed the pass).
* A replacement whose new nodes do not check against the opsets the model imports: the
  folder writes opset-13/18 forms (``Unsqueeze``/``Squeeze``/``Split`` with axes or split
  as inputs, ``Split num_outputs``) into older-opset graphs. The folder's opset-12
  ``Constant<value_ints>`` (and ``value_int``, ``value_float(s)``) is first rewritten to
  ``Constant<value=tensor>``, which every opset has, so opset-11 models still fold shapes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.optimizer import _constant_folding as folding

import onnxopt

from .snapshot import Snapshot, census_delta


def _is_onnx(node: ir.Node, *op_types: str) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in op_types


def _refused_before_folding(node: ir.Node, is_function: bool) -> bool:
    if _is_onnx(node, "CastLike") and "saturate" in node.attributes:
        return True
    if _is_onnx(node, "Bernoulli"):
        return True
    if is_function and _is_onnx(node, "If"):
        branches = [a.as_graph() for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
        return any(branch.initializers for branch in branches)
    if _is_onnx(node, "SplitToSequence") and len(node.inputs) > 1 and node.inputs[1] is not None:
        split = node.inputs[1]
        shape = split.shape
        static_1d = shape is not None and shape.is_static() and len(shape) == 1
        return split.const_value is None and not static_1d
    return False


_LIST_CONSTANTS = {"value_int": np.int64, "value_ints": np.int64,
                   "value_float": np.float32, "value_floats": np.float32}


def _make_portable(node: ir.Node) -> None:
    """Rewrite an opset-12 ``Constant<value_ints=...>`` as ``Constant<value=tensor>``."""
    if _is_onnx(node, "Constant") and len(node.attributes) == 1:
        (name, attr), = node.attributes.items()
        if name in _LIST_CONSTANTS and not attr.is_ref():
            array = np.array(attr.value, dtype=_LIST_CONSTANTS[name])
            del node.attributes[name]
            node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array))


def _names(values) -> list[str]:
    """Value names for a checkable NodeProto; values the folder just made have none yet."""
    return ["" if v is None else v.name or f"_unnamed_{i}" for i, v in enumerate(values)]


def checks_in(node: ir.Node, opsets: dict[str, int], ir_version: int) -> bool:
    """Whether ``node`` passes onnx's node checker under these opset imports."""
    context = onnx.checker.C.CheckerContext()
    context.ir_version = ir_version
    context.opset_imports = dict(opsets)
    proto = onnx.NodeProto(
        op_type=node.op_type, domain=node.domain, input=_names(node.inputs), output=_names(node.outputs)
    )
    proto.attribute.extend(ir.serde.serialize_attribute(a) for a in node.attributes.values())
    try:
        onnx.checker.check_node(proto, context)
    except onnx.checker.ValidationError:
        return False
    return True


# Ops whose output can be far larger than their constant inputs (a folding bomb).
_EXPANDING = {"ConstantOfShape", "Expand", "Tile", "Range", "Pad", "Resize", "Upsample", "OneHot", "CenterCropPad",
              "Col2Im", "MaxUnpool", "EyeLike", "RandomNormal", "RandomUniform"}


def _elements(value: ir.Value | None) -> int | None:
    if value is None:
        return 0
    if value.const_value is not None:
        return value.const_value.size
    shape = value.shape
    if shape is None or not shape.is_static():
        return None
    return int(np.prod([int(d) for d in shape], dtype=object))


def _values(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None or value.const_value.size > 64:
        return None
    return np.asarray(value.const_value.numpy()).reshape(-1)


def _expanded_elements(node: ir.Node) -> int | None:
    """The output size of an expanding op, from its (small) constant inputs; None if unknown."""
    inputs = list(node.inputs) + [None] * 3
    data = inputs[0].const_value.shape if inputs[0] is not None and inputs[0].const_value is not None else None
    try:
        if node.op_type == "ConstantOfShape" and (shape := _values(inputs[0])) is not None:
            return int(np.prod([int(d) for d in shape], dtype=object))
        if node.op_type == "Range" and all(_values(v) is not None and _values(v).size for v in inputs[:3]):
            start, limit, delta = (float(_values(v)[0]) for v in inputs[:3])
            return max(int(np.ceil((limit - start) / delta)), 0) if delta else None
        if node.op_type == "Expand" and data is not None and (shape := _values(inputs[1])) is not None:
            return int(np.prod(np.broadcast_shapes(tuple(data), tuple(int(d) for d in shape)), dtype=object))
        if node.op_type == "Tile" and data is not None and (repeats := _values(inputs[1])) is not None:
            return int(np.prod([int(d) * int(r) for d, r in zip(data, repeats)], dtype=object))
    except (ValueError, OverflowError, ZeroDivisionError):
        return None
    return None


def _too_large(node: ir.Node, limit: int) -> bool:
    """Whether folding ``node`` would compute an output above ``limit`` elements that its
    constant inputs do not already hold, judged from shapes before anything is evaluated.
    An expanding op whose output size cannot be told counts as too large."""
    outputs = [_elements(v) for v in node.outputs]
    if any(size is None for size in outputs):
        if node.op_type not in _EXPANDING:
            return False
        outputs = [_expanded_elements(node)]
        if outputs[0] is None:
            return True
    held = sum(_elements(v) or 0 for v in node.inputs)
    return max(outputs, default=0) > limit and sum(outputs) > held


def _as_string_tensor(tensor: ir.Tensor | None) -> ir.Tensor | ir.StringTensor | None:
    """The folder wraps every result in ``ir.Tensor``, which cannot serialize strings."""
    if tensor is None or tensor.dtype != ir.DataType.STRING:
        return tensor
    array = np.asarray(tensor.numpy())
    strings = [s.encode() if isinstance(s, str) else bytes(s) for s in array.reshape(-1)]
    return ir.StringTensor(np.array(strings, dtype=object).reshape(array.shape), name=tensor.name)


class _GuardedFolder(folding.FoldConstantsPass):
    """onnxscript's folder with the guards above around each node it would replace."""

    def call(self, model: ir.Model):
        self.refused = 0
        self._ir_version = model.ir_version
        return super().call(model)

    def _prepare_folded_tensor(self, node, output_name, output_array):
        return _as_string_tensor(super()._prepare_folded_tensor(node, output_name, output_array))

    def process_node(self, node: ir.Node, is_function: bool):
        if _refused_before_folding(node, is_function):
            self.refused += 1
            return None
        if all(v is None or v.const_value is not None for v in node.inputs) and not _is_onnx(node, "Constant"):
            if self.shape_inference and not folding._is_control_flow_op(node):
                self._do_inference(node)
            if _too_large(node, self.output_size_limit):
                self.refused += 1
                return None
        replacement = super().process_node(node, is_function)
        if replacement is None or _is_onnx(node, "If"):
            return replacement  # an inlined If branch holds the model's own nodes
        if self._opset_imports.get("", 0) < 12:
            for new_node in replacement.new_nodes:
                _make_portable(new_node)
        if all(checks_in(n, self._opset_imports, self._ir_version) for n in replacement.new_nodes):
            return replacement
        self.refused += 1
        return None


def _all_values(model: ir.Model):
    for graph in onnxopt.all_graphs(model):
        yield from graph.inputs
        if isinstance(graph, ir.Graph):
            yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs


class FoldConstantsPass(onnxopt.Pass):
    """Replace what can be computed from constants by initializers; simplify shape arithmetic."""

    name = "fold-constants"

    @dataclasses.dataclass(frozen=True)
    class Options:
        input_size_limit: int = field(
            default=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
            metadata={"help": "skip a node with a constant input of more elements than this"},
        )
        output_size_limit: int = field(
            default=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            metadata={"help": "keep a node whose folded output has more elements than this, "
                              "unless folding frees as many"},
        )
        shape_inference: bool = field(
            default=True, metadata={"help": "infer node output shapes while folding (finds more folds)"}
        )
        max_rounds: int = field(
            default=3, metadata={"help": "rerun the folder while a round changes nodes, at most this often"}
        )

        def __post_init__(self):
            if self.input_size_limit < 0 or self.output_size_limit < 0:
                raise ValueError("size limits must be >= 0")
            if self.max_rounds < 1:
                raise ValueError("max_rounds must be >= 1")

    def call(self, model: ir.Model) -> onnxopt.PassResult:
        before = Snapshot(model)
        tagged = [v for v in _all_values(model) if folding.FOLDED_FROM_KEY in v.metadata_props]
        tagged_ids = {id(v) for v in tagged}
        folder = _GuardedFolder(
            shape_inference=self.options.shape_inference,
            input_size_limit=self.options.input_size_limit,
            output_size_limit=self.options.output_size_limit,
        )
        after = before
        for _ in range(self.options.max_rounds):  # a round's new nodes (an inlined If branch) can fold further
            folder(model)
            for value in _all_values(model):  # the folder's provenance notes are not model content
                if id(value) not in tagged_ids:
                    value.metadata_props.pop(folding.FOLDED_FROM_KEY, None)
            previous, after = after, Snapshot(model)
            # A round that only annotated shapes unlocks nothing: the folder infers a value's
            # shape before it visits the value's users (after 135 such rounds among the
            # backend node cases and zoo models, a second round never folded anything).
            if after.key == previous.key:
                break
        delta = census_delta(before, after)
        stats = {
            "nodes_removed": delta["nodes_removed"],
            "initializers_added": -delta["initializers_removed"],
            "bytes_added": -delta["bytes_saved"],
            "folds_refused": folder.refused,  # in the last round
        }
        return onnxopt.PassResult(model, before != after, stats)
