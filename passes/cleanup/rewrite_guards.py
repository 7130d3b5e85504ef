"""Rule-specific guards for rewrite-patterns: where an onnxscript 0.7 rule's own check is too weak.

Each guard sees a rewrite the rule proposes (its matched nodes and new nodes) and returns
why it must not be applied, or None. ``GUARDS`` maps ``id(rule)`` to its guard.

* ``cast_cast``: ``Cast(Cast(x, FLOAT), FLOAT16)`` becomes ``Cast(x, FLOAT16)``; equal only
  when the first cast is exact, so ``x`` must be a type float holds exactly (not double,
  where rounding twice can differ from rounding once, nor int32/int64).
* ``cast_constant_of_shape``: the fused ConstantOfShape must have a type its opset allows
  (bfloat16 needs opset 20; float8/int4 need 21).
* ``collapse_slice2``: trusts that the slice's output shape equals its input's; symbolic
  dims that share a name are not proof, so only fully static shapes count.
* ``batchnorm``: only an inference-mode BatchNormalization folds (no ``training_mode``,
  ``is_test=0`` or per-activation ``spatial=0``), and only when the convolution and the
  norm's parameters share one type (a float16 conv with float32 norm parameters would get
  float32 weights).
* ``gemm``: ``Add(MatMul(a, b), c)`` is a Gemm only when ``c`` broadcasts into the
  ``[M, N]`` product without growing it (rank <= 2, each dim 1 or equal) and the type is
  one Gemm takes.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter.rules import common as rules

GUARDS: dict[int, object] = {}

_T = ir.DataType
_EXACT_IN_FLOAT = {_T.FLOAT, _T.FLOAT16, _T.BFLOAT16, _T.INT8, _T.UINT8, _T.INT16, _T.UINT16, _T.BOOL}
_CONSTANT_OF_SHAPE_TYPES = {_T.FLOAT16, _T.FLOAT, _T.DOUBLE, _T.INT8, _T.INT16, _T.INT32, _T.INT64,
                            _T.UINT8, _T.UINT16, _T.UINT32, _T.UINT64, _T.BOOL}
_GEMM_TYPES = {_T.FLOAT, _T.FLOAT16, _T.DOUBLE}


def _guard(*guarded_rules):
    def register(function):
        for rule in guarded_rules:
            GUARDS[id(rule)] = function
        return function

    return register


def _matched(delta, op_type: str) -> ir.Node | None:
    return next((n for n in delta.match.nodes if n.op_type == op_type), None)


def _default_opset(model: ir.Model, graph) -> int:
    imports = graph.opset_imports if isinstance(graph, ir.Function) else model.opset_imports
    return imports.get("", imports.get("ai.onnx", 0))


@_guard(rules.cast_cast_rule)
def _cast_cast(model, graph, delta) -> str | None:
    casts = [n for n in delta.match.nodes if n.op_type == "Cast"]
    inner = next(n for n in casts if any(user in casts for user, _ in n.outputs[0].uses()))
    if inner.inputs[0].dtype not in _EXACT_IN_FLOAT:
        return "the first cast may round"
    return None


@_guard(rules.cast_constant_of_shape_rule, rules.cast_constant_of_shape_without_value_rule)
def _cast_constant_of_shape(model, graph, delta) -> str | None:
    cast = _matched(delta, "Cast")
    if _T(cast.attributes.get_int("to", 0)) not in _CONSTANT_OF_SHAPE_TYPES:
        return "ConstantOfShape cannot hold that type in every opset"
    return None


def _static(shape: ir.Shape | None) -> bool:
    return shape is not None and all(isinstance(d, int) for d in shape)


@_guard(rules.collapse_slice2_rule)
def _collapse_slice(model, graph, delta) -> str | None:
    node = _matched(delta, "Slice")
    if not (_static(node.inputs[0].shape) and _static(node.outputs[0].shape)):
        return "slice shapes are not static"
    return None


@_guard(rules.fuse_batchnorm_into_conv_rule, rules.fuse_batchnorm_into_conv_transpose_rule,
        rules.fuse_batchnorm_into_gemm_rule)
def _batchnorm(model, graph, delta) -> str | None:
    norm = _matched(delta, "BatchNormalization")
    inbound = next(n for n in delta.match.nodes if n is not norm)
    attributes = norm.attributes
    if (attributes.get_int("training_mode", 0) != 0 or attributes.get_int("is_test", 1) != 1
            or attributes.get_int("spatial", 1) != 1):
        return "batch normalization is not in inference mode"
    params = [inbound.inputs[1], *norm.inputs[1:5]] + list(inbound.inputs[2:3])
    if any(p is None or p.dtype != inbound.inputs[1].dtype for p in params):
        return "parameters of mixed types"
    return None


@_guard(rules.matmul_add_to_gemm_rule, rules.transpose_a_matmul_add_to_gemm_rule,
        rules.transpose_b_matmul_add_to_gemm_rule, rules.transpose_ab_matmul_add_to_gemm_rule)
def _gemm(model, graph, delta) -> str | None:
    add, matmul = _matched(delta, "Add"), _matched(delta, "MatMul")
    addend = next(v for v in add.inputs if v is not matmul.outputs[0])
    types = _GEMM_TYPES | ({_T.BFLOAT16} if _default_opset(model, graph) >= 13 else set())
    if addend.dtype not in types:
        return "Gemm does not take that type"
    gemm = delta.new_nodes[-1]
    a, b = gemm.inputs[0], gemm.inputs[1]
    if addend.shape is None or len(addend.shape) > 2 or a.shape is None or b.shape is None:
        return "addend shape unknown or of rank > 2"
    rows = a.shape[1] if gemm.attributes.get_int("transA", 0) else a.shape[0]
    cols = b.shape[0] if gemm.attributes.get_int("transB", 0) else b.shape[1]
    for dim, out in zip(reversed(tuple(addend.shape)), (cols, rows)):
        if dim != 1 and not (isinstance(dim, int) and dim == out):
            return "addend could grow the product by broadcasting"
    return None
