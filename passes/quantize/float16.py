"""convert-float16: run a float32 model in float16 (or bfloat16) where the target can.

Every float32 initializer and Constant becomes half precision unless its magnitude
would overflow (``keep_ranges_over``). Each node then runs in half precision if it is
selected, not in ``op_block_list``, its ONNX schema allows the type, and (with
``target=ort-cpu``) ONNX Runtime's CPU provider has a kernel for it; every other node
keeps float32 and Cast nodes are inserted at the boundaries, so the model still loads.
On ORT CPU few compute ops have half kernels: the effect there is mostly half-size
weights cast back to float32 before use. Cast ``to``, ``dtype`` and ConstantOfShape
``value`` attributes of half nodes are patched. If/Loop/Scan bodies are converted too;
their interfaces and If/Loop/Scan themselves stay float32. Function bodies are left in
float32 (counted in ``functions_left_float32``); calls to them get float32 inputs.

The selected nodes it converted (run in half, or read half-stored weights) are listed in
``stats["quantized_nodes"]``, so the runner's mixed precision can keep the most
sensitive of them in float32 (through ``exclude_nodes``) when the budget breaks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs
from onnxopt.naming import Namer
from onnxopt.opset import default_opset, require_opset
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import selector_field, selector_from_options

NAME = "convert-float16"
_OPEN = 1 << 31
# Default-domain ops with a float16 / bfloat16 kernel in ONNX Runtime's CPU provider
# (ORT 1.32, x86-64: from onnxruntime.capi._pybind_state.get_all_opkernel_def()), as
# (first, last) schema since-version. Arm64 builds have more; use target=any there.
_ORT_CPU = {
    "float16": {
        "Attention": (23, _OPEN), "Cast": (6, _OPEN), "Celu": (28, _OPEN), "Clip": (12, _OPEN),
        "Compress": (9, _OPEN), "Concat": (4, _OPEN), "ConstantOfShape": (9, _OPEN),
        "DequantizeLinear": (19, _OPEN), "Dropout": (7, 11), "Expand": (8, _OPEN), "Flatten": (1, _OPEN),
        "Gather": (1, _OPEN), "GatherElements": (11, _OPEN), "GatherND": (11, _OPEN), "Identity": (1, _OPEN),
        "IsInf": (20, _OPEN), "IsNaN": (9, _OPEN), "LayerNormalization": (1, _OPEN), "Max": (12, _OPEN),
        "Min": (12, _OPEN), "Mod": (10, _OPEN), "QuantizeLinear": (19, _OPEN), "RMSNormalization": (23, _OPEN),
        "RandomNormalLike": (1, _OPEN), "RandomUniformLike": (1, _OPEN), "Reshape": (1, _OPEN),
        "ReverseSequence": (10, _OPEN), "RotaryEmbedding": (23, _OPEN), "Round": (11, _OPEN),
        "Scatter": (9, 10), "ScatterElements": (11, _OPEN), "ScatterND": (11, _OPEN), "Shape": (1, _OPEN),
        "Shrink": (9, _OPEN), "Sign": (9, _OPEN), "Slice": (1, _OPEN), "Split": (2, _OPEN),
        "Squeeze": (1, _OPEN), "Transpose": (1, _OPEN), "Unsqueeze": (1, _OPEN),
    },
    "bfloat16": {
        "Cast": (6, _OPEN), "Celu": (28, _OPEN), "Compress": (9, _OPEN), "Concat": (4, _OPEN),
        "ConstantOfShape": (9, _OPEN), "Einsum": (28, _OPEN), "Flatten": (1, _OPEN), "Gather": (1, _OPEN),
        "GatherElements": (11, _OPEN), "GatherND": (11, _OPEN), "Identity": (1, _OPEN), "IsInf": (20, _OPEN),
        "IsNaN": (20, _OPEN), "LayerNormalization": (1, _OPEN), "OneHot": (28, _OPEN), "Pad": (21, _OPEN),
        "RandomNormalLike": (1, _OPEN), "RandomUniformLike": (1, _OPEN), "Reshape": (1, _OPEN),
        "ReverseSequence": (10, _OPEN), "Scatter": (9, 10), "ScatterElements": (11, _OPEN),
        "ScatterND": (11, _OPEN), "Shape": (1, _OPEN), "Shrink": (9, _OPEN), "Sign": (9, _OPEN),
        "Slice": (1, _OPEN), "Split": (2, _OPEN), "Squeeze": (1, _OPEN), "Transpose": (1, _OPEN),
        "Unique": (28, _OPEN), "Unsqueeze": (1, _OPEN),
    },
}
_CONTROL_FLOW = {"If", "Loop", "Scan"}
_CONSTANT_KINDS = {"value_float": ir.DataType.FLOAT, "value_floats": ir.DataType.FLOAT,
                   "value_int": ir.DataType.INT64, "value_ints": ir.DataType.INT64,
                   "value_string": ir.DataType.STRING, "value_strings": ir.DataType.STRING}
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16}


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class ConvertFloat16Options:
    dtype: Literal["float16", "bfloat16"] = _opt("float16", "half-precision type to convert float32 to")
    keep_io_types: bool = _opt(True, "keep graph inputs and outputs float32 (Casts inside the graph)")
    target: Literal["ort-cpu", "any"] = _opt(
        "ort-cpu", "ort-cpu: keep float32 every op ORT's CPU provider lacks a half kernel for; any: schema only")
    op_block_list: tuple[str, ...] = _opt((), "op types always kept float32 (in addition to the target's)")
    keep_ranges_over: float | None = _opt(
        None, "keep initializers/constants with |x| above this in float32 (default: the type's max, 65504)")
    store_weights: bool = _opt(True, "store weights of float32-kept nodes in half too, Cast back at run time")
    upgrade_opset: bool = _opt(True, "dtype=bfloat16: upgrade a model older than opset 13 (else refuse)")
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    ops: tuple[str, ...] = selector_field("ops")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    partition: tuple[str, ...] = selector_field("partition")

    def __post_init__(self):
        if self.dtype == "bfloat16" and not self.keep_io_types:
            raise UsageError(f"{NAME}: dtype=bfloat16 needs keep_io_types=true: numpy and ORT's Python API cannot "
                             "feed or fetch bfloat16 tensors, so the result could not be validated or used from Python")


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, opset: int):
    """(since_version, input params, output params, {param: allowed dtypes}) or None."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return None
    allowed = {t.type_param_str: frozenset(t.allowed_type_strs) for t in schema.type_constraints}
    ins = [(p.type_str, p.option.name == "Variadic") for p in schema.inputs]
    outs = [(p.type_str, p.option.name == "Variadic") for p in schema.outputs]
    return schema.since_version, ins, outs, allowed


def _slot(formals, index: int) -> str | None:
    if index < len(formals):
        return formals[index][0]
    return formals[-1][0] if formals and formals[-1][1] else None


def _type_str(dtype: ir.DataType) -> str:
    return f"tensor({'float' if dtype == ir.DataType.FLOAT else dtype.name.lower()})"


_DTYPE_BY_STR = {_type_str(d): d for d in ir.DataType if d != ir.DataType.UNDEFINED}


class ConvertFloat16Pass(Pass):
    """Convert float32 tensors and ops to float16/bfloat16, keeping unsupported ops float32 with Casts."""

    name = NAME
    Options = ConvertFloat16Options
    fidelity_of = Fidelity.LOSSY

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        self.half = ir.DataType.FLOAT16 if opts.dtype == "float16" else ir.DataType.BFLOAT16
        self.np_half = np.float16 if opts.dtype == "float16" else ml_dtypes.bfloat16
        upgraded = None
        if self.half == ir.DataType.BFLOAT16:
            upgraded = require_opset(model, 13, allow_upgrade=opts.upgrade_opset,
                                     refusal=f"{NAME}: dtype=bfloat16 needs opset {{needed}} (Cast to bfloat16); the "
                                             "model has {current}; allow upgrade_opset=true")
        self.opset = default_opset(model)
        limit = float(ml_dtypes.finfo(self.np_half).max)
        self.limit = min(opts.keep_ranges_over, limit) if opts.keep_ranges_over is not None else limit
        selector = selector_from_options(opts)
        self.selected = None if selector.is_trivial else set(selector.select(model))
        self.cur: dict[ir.Value, ir.DataType] = {}
        self.orig: dict[ir.Value, ir.DataType | None] = {}
        self.casts: dict[tuple, ir.Value] = {}
        self.namer = Namer(model)
        self.stats = {"nodes_half": 0, "nodes_kept_float32": 0, "casts_inserted": 0, "tensors_converted": 0,
                      "bytes_saved": 0, "kept_float32_range": {}, "attributes_patched": 0,
                      "functions_left_float32": len(model.functions)}
        self.touched: list[str] = []
        self.changed = upgraded is not None
        if upgraded:
            self.stats["opset_upgraded"] = upgraded
        for graph in all_graphs(model):
            if isinstance(graph, ir.Graph):
                self._convert_sources(graph)
        self._convert_graph(model.graph, main=True)
        if self.changed:
            self.stats["quantized_nodes"] = self.touched  # what mixed precision may keep in float32
        return PassResult(model, self.changed, self.stats)

    # -- decisions --------------------------------------------------------------------------
    def _orig(self, value: ir.Value | None) -> ir.DataType | None:
        if value is None:
            return None
        return self.orig[value] if value in self.orig else value.dtype

    def _dtype(self, value: ir.Value | None) -> ir.DataType | None:
        return self.cur[value] if value in self.cur else self._orig(value)

    def _can_run_half(self, node: ir.Node) -> bool:
        """Static: selected, not blocked, and the schema (and the target's kernels) allow half."""
        opts = self.options
        if node.domain not in ("", "ai.onnx") or node.op_type in _CONTROL_FLOW or node.op_type == "Constant":
            return False
        if node.op_type in opts.op_block_list or (self.selected is not None and node not in self.selected):
            return False
        info = _schema(node.op_type, self.opset)
        if info is None or not any(_type_str(self.half) in a for a in info[3].values()):
            return False
        if opts.target == "ort-cpu":
            first, last = _ORT_CPU[opts.dtype].get(node.op_type, (_OPEN, 0))
            return first <= info[0] <= last
        return True

    def _runs_half(self, node: ir.Node, float_inputs: list[ir.Value]) -> bool:
        """With target=ort-cpu a capable node runs half only when all its float inputs already are
        (no float32 activation is narrowed just to feed a data-movement op); target=any converts all."""
        if not self._can_run_half(node) or any(v is not None and self._dtype(v) is None for v in node.inputs):
            return False  # an input of unknown type (custom op output) might be float32
        if self.options.target == "any":
            return True
        return bool(float_inputs) and all(self._dtype(v) == self.half for v in float_inputs)

    def _convert_sources(self, graph: ir.Graph) -> None:
        """Initializers and Constant nodes of ``graph`` to half, where they fit and are wanted."""
        for value in list(graph.initializers.values()):
            if value.const_value is not None and not value.is_graph_input() and not value.is_graph_output():
                tensor = self._half_tensor(value.name, value.const_value, value)
                if tensor is not None:
                    value.const_value = tensor
                    self._set(value, self.half)
        for node in graph:
            if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
                continue
            out, attr = node.outputs[0], node.attributes.get("value")
            if self._orig(out) is None and node.attributes:
                kind = next(iter(node.attributes))
                self.orig[out] = attr.as_tensor().dtype if attr is not None else _CONSTANT_KINDS.get(kind)
            if attr is not None:
                if out.is_graph_output():
                    continue
                tensor = self._half_tensor(out.name, attr.as_tensor(), out)
                if tensor is not None:
                    node.attributes["value"] = ir.AttrTensor("value", tensor)
                    self._set(out, self.half)

    def _half_tensor(self, name, tensor, value: ir.Value):
        if tensor.dtype != ir.DataType.FLOAT:
            return None
        consumers = [u.node for u in value.uses()]
        if not consumers or any(self._needs_float32(u.node, u.idx) for u in value.uses()):
            return None
        wanted = any(self._can_run_half(n) for n in consumers) or (
            self.options.store_weights and (self.selected is None or all(n in self.selected for n in consumers)))
        if not wanted:
            return None
        array = tensor.numpy()
        peak = float(np.nanmax(np.abs(array))) if array.size else 0.0
        if peak > self.limit:
            self.stats["kept_float32_range"][name] = peak
            return None
        self.stats["tensors_converted"] += 1
        self.stats["bytes_saved"] += array.nbytes // 2
        return ir.tensor(array.astype(self.np_half), dtype=self.half, name=tensor.name)

    def _needs_float32(self, node: ir.Node, index: int) -> bool:
        """The schema fixes this input to float32 (Resize scales, ...): narrowing it would change meaning."""
        info = _schema(node.op_type, self.opset) if node.domain in ("", "ai.onnx") else None
        return info is not None and _slot(info[1], index) == "tensor(float)"

    def _set(self, value: ir.Value, dtype: ir.DataType) -> None:
        if self._dtype(value) == dtype:
            return
        self.orig.setdefault(value, self._orig(value))
        self.cur[value] = dtype
        value.type = ir.TensorType(dtype)  # a new object: Model.clone() shares type objects
        self.changed = True

    # -- rewriting ---------------------------------------------------------------------------
    def _convert_graph(self, graph: ir.Graph, main: bool = False) -> None:
        if main and not self.options.keep_io_types:
            for value in graph.inputs:
                if value.dtype == ir.DataType.FLOAT and not value.is_initializer():
                    self._set(value, self.half)
        for node in list(graph):
            for attr in node.attributes.values():
                if isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPH:
                    self._convert_graph(attr.as_graph())
                elif isinstance(attr, ir.Attr) and attr.type == ir.AttributeType.GRAPHS:
                    for sub in attr.as_graphs():
                        self._convert_graph(sub)
            if node.op_type != "Constant":
                self._convert_node(graph, node)
        want = self.half if main and not self.options.keep_io_types else ir.DataType.FLOAT
        for index, value in enumerate(list(graph.outputs)):
            have = self._dtype(value)
            if have in _FLOATS and have != want and not value.is_graph_input() and not value.is_initializer():
                original = value.name
                value.name = self.namer.fresh(f"{original}_{have.name.lower()}")
                cast = ir.node("Cast", [value], {"to": want}, name=self.namer.fresh(f"{original}_Cast"))
                out = cast.outputs[0]
                out.name, out.dtype, out.shape = original, want, value.shape
                graph.append(cast)
                graph.outputs[index] = out
                self.stats["casts_inserted"] += 1
                self.changed = True

    def _convert_node(self, graph, node: ir.Node) -> None:
        info = _schema(node.op_type, self.opset) if node.domain in ("", "ai.onnx") else None
        self._infer_outputs(node, info)
        float_in = [v for v in node.inputs if self._dtype(v) in _FLOATS]
        if not float_in and not any(self._orig(v) in _FLOATS for v in node.outputs):
            return
        if node.op_type == "Cast" and float_in:
            return  # a float-to-float Cast is a deliberate precision boundary (the model's or ours)
        half = self._runs_half(node, float_in)
        self.stats["nodes_half" if half else "nodes_kept_float32"] += 1
        if node.name and (self.selected is None or node in self.selected):
            self.touched.append(node.name)  # excluding it keeps it, and the weights only it reads, float32
        ins = [_slot(info[1], i) if info else None for i in range(len(node.inputs))]
        outs = [_slot(info[2], i) if info else None for i in range(len(node.outputs))]
        targets = self._param_targets(node, half, ins, outs, info)
        for index, value in enumerate(node.inputs):
            have, param = self._dtype(value), ins[index]
            if have not in _FLOATS:
                continue
            if param is None:
                want = ir.DataType.FLOAT
            elif param.startswith("tensor("):
                want = ir.DataType.FLOAT if param == "tensor(float)" else None
            else:
                want = targets.get(param)
            if want is not None and want != have:
                node.replace_input_with(index, self._cast(graph, node, value, want))
        patched = half and self._patch_attributes(node)
        for index, value in enumerate(node.outputs):
            if self._orig(value) not in _FLOATS:
                continue
            param = outs[index]
            if param in targets:
                self._set(value, targets[param])
            elif half and patched and param and not param.startswith("tensor("):
                self._set(value, self.half)  # type chosen by an attribute (Cast to, ConstantOfShape value)

    def _infer_outputs(self, node: ir.Node, info) -> None:
        """Record the original dtype of outputs the model leaves untyped (schema or attribute rules)."""
        for index, value in enumerate(node.outputs):
            if self._orig(value) is not None:
                continue
            dtype = None
            attr = node.attributes.get("to" if node.op_type == "Cast" else "dtype")
            if node.op_type in _CONTROL_FLOW:
                dtype = self._branch_output_dtype(node, index)
            elif attr is not None and attr.type == ir.AttributeType.INT:
                dtype = ir.DataType(attr.as_int())
            elif node.op_type == "ConstantOfShape":
                value_attr = node.attributes.get("value")
                dtype = value_attr.as_tensor().dtype if value_attr is not None else ir.DataType.FLOAT
            elif node.op_type in ("RandomNormal", "RandomUniform"):
                dtype = ir.DataType.FLOAT
            elif info is not None:
                param = _slot(info[2], index)
                if param and param.startswith("tensor("):
                    dtype = _DTYPE_BY_STR.get(param)
                elif param:
                    for in_param, in_value in zip((_slot(info[1], i) for i in range(len(node.inputs))), node.inputs):
                        if in_param == param and self._orig(in_value) is not None:
                            dtype = self._orig(in_value)
                            break
            if dtype is not None:
                self.orig[value] = dtype

    def _branch_output_dtype(self, node: ir.Node, index: int) -> ir.DataType | None:
        key, offset = {"If": ("then_branch", 0), "Loop": ("body", 1), "Scan": ("body", 0)}[node.op_type]
        attr = node.attributes.get(key)
        if attr is None or index + offset >= len(attr.as_graph().outputs):
            return None
        return self._orig(attr.as_graph().outputs[index + offset])

    def _param_targets(self, node, half: bool, ins, outs, info) -> dict[str, ir.DataType]:
        """The float type each type parameter of ``node`` bound to a float input gets."""
        targets: dict[str, ir.DataType] = {}
        if info is None:
            return targets
        bound: dict[str, set[ir.DataType]] = {}
        for param, value in zip(ins, node.inputs):
            if param and not param.startswith("tensor(") and self._dtype(value) in _FLOATS:
                bound.setdefault(param, set()).add(self._dtype(value))
        for param, have in bound.items():
            if not half or _type_str(self.half) not in info[3].get(param, ()):
                targets[param] = ir.DataType.FLOAT
            elif param in outs or self.half in have or len(have) > 1:
                targets[param] = self.half
            # else: an input-only parameter of one type (Shape's, Cast's input) is left as it is
        return targets

    def _patch_attributes(self, node: ir.Node) -> bool:
        patched = False
        for key in ("to", "dtype"):
            attr = node.attributes.get(key)
            if attr is not None and attr.type == ir.AttributeType.INT and attr.as_int() == ir.DataType.FLOAT:
                node.attributes[key] = ir.AttrInt64(key, int(self.half))
                patched = True
        if node.op_type == "ConstantOfShape":
            attr = node.attributes.get("value")
            tensor = attr.as_tensor() if attr is not None else ir.tensor(np.zeros(1, np.float32))
            if tensor.dtype == ir.DataType.FLOAT:
                array = tensor.numpy().astype(self.np_half)
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, dtype=self.half))
                patched = True
        if patched:
            self.stats["attributes_patched"] += 1
            self.changed = True
        return patched

    def _cast(self, graph, before: ir.Node, value: ir.Value, to: ir.DataType) -> ir.Value:
        key = (value, to, id(graph))
        if key not in self.casts:
            base = value.name or "value"
            cast = ir.node("Cast", [value], {"to": to}, name=self.namer.fresh(f"{base}_Cast_{to.name.lower()}"))
            out = cast.outputs[0]
            out.name, out.dtype, out.shape = self.namer.fresh(f"{base}_{to.name.lower()}"), to, value.shape
            graph.insert_before(before, cast)
            self.cur[out] = to
            self.casts[key] = out
            self.stats["casts_inserted"] += 1
            self.changed = True
        return self.casts[key]


