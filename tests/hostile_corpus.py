"""A corpus of small unusual models, built with onnx.helper (no binary fixtures).

Each entry is ``name -> builder() -> ModelProto``. Together they cover what exporters and
hand edits write that ordinary models do not: strings, sparse initializers, zero-size
tensors, NaN/Inf/denormal weights, If/Loop bodies reading outer scope, local and nested
functions, symbolic and huge dims, exotic dtypes, already-quantized QDQ graphs, Constant-node
weights, unnamed and duplicate-named nodes, outputs that are inputs or initializers, old
opsets, custom ops and folding bombs. ``test_hostile_matrix.py`` runs every registered pass
over every entry. ``FAST`` is the subset the default test run uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper, numpy_helper

RNG = np.random.default_rng(0)


def _w(name: str, *shape, dtype=np.float32, values=None) -> onnx.TensorProto:
    array = RNG.standard_normal(shape).astype(dtype) if values is None else np.asarray(values, dtype)
    return numpy_helper.from_array(array, name)


def _vi(name, dtype, shape):
    return helper.make_tensor_value_info(name, dtype, shape)


def _model(nodes, inputs, outputs, inits=(), opset=17, functions=(), extra_opsets=(), **kw) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, kw.pop("name", "g"), inputs, outputs, list(inits), **kw)
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(graph, opset_imports=opsets, functions=list(functions))


def _node(op, inputs, outputs, name=None, **attrs):
    return helper.make_node(op, inputs, outputs, name=name or f"{op.lower()}_{outputs[0]}", **attrs)


def mlp() -> onnx.ModelProto:
    """A plain control: MatMul+Add, Relu, Gemm."""
    return _model([_node("MatMul", ["x", "w1"], ["h"]), _node("Add", ["h", "b1"], ["hb"]), _node("Relu", ["hb"], ["r"]),
                   _node("Gemm", ["r", "w2", "b2"], ["y"], transB=1)],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4])],
                  [_w("w1", 8, 16), _w("b1", 16), _w("w2", 4, 16), _w("b2", 4)])


def conv_constant_weights() -> onnx.ModelProto:
    """PaddleOCR-style: Conv weights in Constant nodes, BatchNormalization, global pooling."""
    const = lambda name, *shape: helper.make_node("Constant", [], [name], value=_w(name + "_v", *shape))
    return _model([const("k", 4, 3, 3, 3), const("scale", 4), const("bias", 4), const("mean", 4),
                   helper.make_node("Constant", [], ["var"], value=_w("var_v", values=np.full(4, 0.5))),
                   _node("Conv", ["x", "k"], ["c"], pads=[1, 1, 1, 1]),
                   _node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["bn"]),
                   _node("Relu", ["bn"], ["r"]), _node("GlobalAveragePool", ["r"], ["y"])],
                  [_vi("x", T.FLOAT, [1, 3, 8, 8])], [_vi("y", T.FLOAT, [1, 4, 1, 1])])


def strings() -> onnx.ModelProto:
    """A string Constant through Identity into Concat with a string input, beside a float path."""
    words = numpy_helper.from_array(np.array(["a", "bb"], dtype=object), "words_v")
    return _model([helper.make_node("Constant", [], ["words"], value=words), _node("Identity", ["words"], ["w2"]),
                   _node("Concat", ["w2", "s"], ["joined"], axis=0), _node("MatMul", ["x", "w"], ["y"])],
                  [_vi("s", T.STRING, [2]), _vi("x", T.FLOAT, [2, 8])],
                  [_vi("joined", T.STRING, [4]), _vi("y", T.FLOAT, [2, 4])], [_w("w", 8, 4)])


def sparse_initializer() -> onnx.ModelProto:
    values = numpy_helper.from_array(np.array([1.5, -2.0, 3.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0, 9, 31], np.int64), "S_idx")
    sparse = helper.make_sparse_tensor(values, indices, [8, 4])
    return _model([_node("MatMul", ["x", "S"], ["y"])], [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4])],
                  sparse_initializer=[sparse])


def zero_size() -> onnx.ModelProto:
    """A zero-size input and an empty initializer concatenated onto a real one."""
    return _model([_node("MatMul", ["x", "w"], ["y0"]), _node("Concat", ["w", "empty"], ["wc"], axis=0),
                   _node("MatMul", ["v", "wc"], ["y1"])],
                  [_vi("x", T.FLOAT, [0, 8]), _vi("v", T.FLOAT, [2, 8])],
                  [_vi("y0", T.FLOAT, [0, 4]), _vi("y1", T.FLOAT, [2, 4])],
                  [_w("w", 8, 4), numpy_helper.from_array(np.zeros((0, 4), np.float32), "empty")])


def nonfinite_weights() -> onnx.ModelProto:
    """Weights holding NaN, +-Inf and denormals; one output stays finite through a Where."""
    w = RNG.standard_normal((8, 4)).astype(np.float32)
    w[0, 0], w[1, 1], w[2, 2] = np.nan, np.inf, -np.inf
    w[3, :] = np.float32(1e-42)
    denormal = np.full((8, 4), 1e-40, np.float32)
    return _model([_node("MatMul", ["x", "w"], ["raw"]), _node("IsNaN", ["raw"], ["bad"]),
                   _node("IsInf", ["raw"], ["inf"]), _node("Or", ["bad", "inf"], ["either"]),
                   _node("Where", ["either", "zero", "raw"], ["y"]), _node("MatMul", ["x", "tiny"], ["z"])],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4]), _vi("z", T.FLOAT, [2, 4])],
                  [numpy_helper.from_array(w, "w"), numpy_helper.from_array(denormal, "tiny"),
                   numpy_helper.from_array(np.array(0.0, np.float32), "zero")])


def if_outer_scope() -> onnx.ModelProto:
    """If branches computing with an outer input and an outer initializer; the condition is a 0-d bool input."""
    then = helper.make_graph([_node("MatMul", ["x", "w"], ["t"])], "then", [], [_vi("t", T.FLOAT, [2, 4])])
    other = helper.make_graph([_node("MatMul", ["x", "w"], ["m"]), _node("Neg", ["m"], ["e"])], "else", [],
                              [_vi("e", T.FLOAT, [2, 4])])
    return _model([_node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                  [_vi("c", T.BOOL, []), _vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4])], [_w("w", 8, 4)])


def loop_outer_scope() -> onnx.ModelProto:
    """A Loop whose body multiplies its carried state by an outer-scope weight, 3 iterations."""
    body = helper.make_graph(
        [_node("MatMul", ["h_in", "w"], ["hm"]), _node("Tanh", ["hm"], ["h_out"]), _node("Identity", ["cond_in"], ["cond_out"])],
        "body", [_vi("i", T.INT64, []), _vi("cond_in", T.BOOL, []), _vi("h_in", T.FLOAT, [2, 8])],
        [_vi("cond_out", T.BOOL, []), _vi("h_out", T.FLOAT, [2, 8])])
    return _model([_node("Loop", ["trips", "", "x"], ["y"], body=body)], [_vi("x", T.FLOAT, [2, 8])],
                  [_vi("y", T.FLOAT, [2, 8])],
                  [_w("w", 8, 8), numpy_helper.from_array(np.array(3, np.int64), "trips")])


def local_functions() -> onnx.ModelProto:
    """A local function calling another local function (nested), used twice."""
    inner = helper.make_function("local", "scale_relu", ["a", "s"], ["b"],
                                 [helper.make_node("Mul", ["a", "s"], ["m"]), helper.make_node("Relu", ["m"], ["b"])],
                                 [helper.make_opsetid("", 17)])
    outer = helper.make_function("local", "dense", ["a", "w", "s"], ["b"],
                                 [helper.make_node("MatMul", ["a", "w"], ["mm"]),
                                  helper.make_node("scale_relu", ["mm", "s"], ["b"], domain="local")],
                                 [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    return _model([_node("dense", ["x", "w1", "s"], ["h"], domain="local"), _node("dense", ["h", "w2", "s"], ["y"], domain="local")],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 8])],
                  [_w("w1", 8, 8), _w("w2", 8, 8), _w("s", values=[0.5])], functions=[inner, outer],
                  extra_opsets=[helper.make_opsetid("local", 1)])


def symbolic_dims() -> onnx.ModelProto:
    return _model([_node("MatMul", ["x", "w"], ["h"]), _node("Softmax", ["h"], ["y"], axis=-1)],
                  [_vi("x", T.FLOAT, ["batch", "seq", 8])], [_vi("y", T.FLOAT, ["batch", "seq", 4])], [_w("w", 8, 4)])


def huge_dim() -> onnx.ModelProto:
    """A declared dimension of 2^62: inputs cannot be generated (refused in one line)."""
    return _model([_node("Relu", ["x"], ["y"])], [_vi("x", T.FLOAT, [2**62])], [_vi("y", T.FLOAT, [2**62])])


def folding_bomb() -> onnx.ModelProto:
    """ConstantOfShape of 2^40 elements into a reduction: ORT cannot run even the original."""
    shape = numpy_helper.from_array(np.array([2**20, 2**20], np.int64), "shape")
    return _model([_node("ConstantOfShape", ["shape"], ["big"], value=numpy_helper.from_array(np.ones(1, np.float32))),
                   _node("ReduceSum", ["big"], ["total"], keepdims=0), _node("Add", ["x", "total"], ["y"])],
                  [_vi("x", T.FLOAT, [1])], [_vi("y", T.FLOAT, [1])], [shape])


def exotic_dtypes() -> onnx.ModelProto:
    """bfloat16 and float8 inputs cast to float, an int4 weight dequantized into a MatMul (opset 21)."""
    int4 = helper.make_tensor("w4", T.INT4, [8, 4], RNG.integers(-8, 8, 32).tolist())
    return _model([_node("Cast", ["xb"], ["xf"], to=T.FLOAT), _node("Cast", ["x8"], ["x8f"], to=T.FLOAT),
                   _node("Add", ["xf", "x8f"], ["xs"]), _node("DequantizeLinear", ["w4", "s4"], ["wf"]),
                   _node("MatMul", ["xs", "wf"], ["y"]), _node("Cast", ["y"], ["yb"], to=T.BFLOAT16)],
                  [_vi("xb", T.BFLOAT16, [2, 8]), _vi("x8", T.FLOAT8E4M3FN, [2, 8])],
                  [_vi("y", T.FLOAT, [2, 4]), _vi("yb", T.BFLOAT16, [2, 4])],
                  [int4, _w("s4", values=0.1)], opset=21)


def float16_model() -> onnx.ModelProto:
    return _model([_node("MatMul", ["x", "w"], ["h"]), _node("Add", ["h", "b"], ["y"])],
                  [_vi("x", T.FLOAT16, [2, 8])], [_vi("y", T.FLOAT16, [2, 4])],
                  [_w("w", 8, 4, dtype=np.float16), _w("b", 4, dtype=np.float16)])


def qdq_quantized() -> onnx.ModelProto:
    """An already-quantized QDQ graph: int8 weight with per-tensor scale, activations through Q/DQ."""
    weight = numpy_helper.from_array(RNG.integers(-127, 128, (8, 4)).astype(np.int8), "w_q")
    return _model([_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]), _node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
                   _node("DequantizeLinear", ["w_q", "ws"], ["wd"]), _node("MatMul", ["xd", "wd"], ["y"])],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4])],
                  [weight, _w("ws", values=0.02), _w("xs", values=0.05),
                   numpy_helper.from_array(np.array(0, np.uint8), "xz")], opset=13)


def odd_names_and_outputs() -> onnx.ModelProto:
    """Unnamed and duplicate-named nodes; one output is the input itself, one an initializer."""
    return _model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"], name="same"),
                   helper.make_node("Neg", ["r"], ["y"], name="same")],
                  [_vi("x", T.FLOAT, [2, 8])],
                  [_vi("y", T.FLOAT, [2, 4]), _vi("x", T.FLOAT, [2, 8]), _vi("w", T.FLOAT, [8, 4])], [_w("w", 8, 4)])


def old_opset() -> onnx.ModelProto:
    """Opset 9: Upsample, and Unsqueeze/Squeeze with attribute axes."""
    return _model([_node("Unsqueeze", ["x"], ["u"], axes=[0]), _node("Squeeze", ["u"], ["s"], axes=[0]),
                   _node("Conv", ["s", "k"], ["c"]), _node("Upsample", ["c", "scales"], ["y"], mode="nearest")],
                  [_vi("x", T.FLOAT, [1, 2, 4, 4])], [_vi("y", T.FLOAT, [1, 3, 4, 4])],
                  [_w("k", 3, 2, 3, 3), _w("scales", values=[1, 1, 2, 2])], opset=9)


def custom_op() -> onnx.ModelProto:
    """An op from a domain neither onnx nor ORT knows: the original cannot run (refused in one line)."""
    return _model([_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mystery", ["h"], ["y"], domain="vendor.x")],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [2, 4])], [_w("w", 8, 4)],
                  extra_opsets=[helper.make_opsetid("vendor.x", 1)])


def sequences() -> onnx.ModelProto:
    """Sequence-typed values inside the graph (SequenceConstruct -> ConcatFromSequence)."""
    return _model([_node("MatMul", ["x", "w"], ["a"]), _node("Relu", ["a"], ["b"]),
                   _node("SequenceConstruct", ["a", "b"], ["seq"]), _node("ConcatFromSequence", ["seq"], ["y"], axis=0)],
                  [_vi("x", T.FLOAT, [2, 8])], [_vi("y", T.FLOAT, [4, 4])], [_w("w", 8, 4)])


def bert_like() -> onnx.ModelProto:
    """input_ids / token_type_ids (2-row table) / attention_mask feeding a tiny attention block."""
    nodes = [_node("Gather", ["word", "input_ids"], ["we"]), _node("Gather", ["types", "token_type_ids"], ["te"]),
             _node("Add", ["we", "te"], ["h"]), _node("MatMul", ["h", "wq"], ["q"]),
             _node("Transpose", ["h"], ["kt"], perm=[0, 2, 1]), _node("MatMul", ["q", "kt"], ["s"]),
             _node("Cast", ["attention_mask"], ["mf"], to=T.FLOAT), _node("Sub", ["one", "mf"], ["inv"]),
             _node("Mul", ["inv", "neg"], ["b2"]), _node("Unsqueeze", ["b2", "ax1"], ["bias"]),
             _node("Add", ["s", "bias"], ["sb"]), _node("Softmax", ["sb"], ["p"], axis=-1),
             _node("MatMul", ["p", "h"], ["y"])]
    ints = [_vi(n, T.INT64, [1, 6]) for n in ("input_ids", "token_type_ids", "attention_mask")]
    return _model(nodes, ints, [_vi("y", T.FLOAT, [1, 6, 8])],
                  [_w("word", 30, 8), _w("types", 2, 8), _w("wq", 8, 8), _w("one", values=1.0), _w("neg", values=-1e4),
                   numpy_helper.from_array(np.array([1], np.int64), "ax1")])


CORPUS: dict[str, Callable[[], onnx.ModelProto]] = {
    "mlp": mlp, "conv_constant_weights": conv_constant_weights, "strings": strings,
    "sparse_initializer": sparse_initializer, "zero_size": zero_size, "nonfinite_weights": nonfinite_weights,
    "if_outer_scope": if_outer_scope, "loop_outer_scope": loop_outer_scope, "local_functions": local_functions,
    "symbolic_dims": symbolic_dims, "huge_dim": huge_dim, "folding_bomb": folding_bomb, "exotic_dtypes": exotic_dtypes,
    "float16_model": float16_model, "qdq_quantized": qdq_quantized, "odd_names_and_outputs": odd_names_and_outputs,
    "old_opset": old_opset, "custom_op": custom_op, "sequences": sequences, "bert_like": bert_like,
}

# The default run's subset (the rest runs under -m slow): one of each kind of trouble.
FAST = ("mlp", "strings", "sparse_initializer", "zero_size", "nonfinite_weights", "if_outer_scope", "loop_outer_scope",
        "local_functions", "exotic_dtypes", "qdq_quantized", "odd_names_and_outputs", "huge_dim", "folding_bomb")
