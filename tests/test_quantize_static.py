"""quantize-static: op lists before/after, placement for ORT's integer kernels, ORT numerics, refusals."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run_ort
from onnx import numpy_helper

from onnxopt import PassContext, all_nodes, ort_run
from onnxopt.errors import UsageError
from onnxopt.models import builders, bundled_model_path, sample_feeds
from onnxopt.opset import default_opset
from onnxopt.passes.quantize.static import QuantizeStaticPass
from onnxopt.passes.quantize.weights import QuantizeWeightsPass

CONV = """<ir_version: 8, opset_import: ["" : OPSET]>
g (float[N,8,6,6] x) => (float[N,16,6,6] y) {
    c = Conv<pads = [1,1,1,1]>(x, w, b)
    y = Relu(c)
}"""

MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,32] x) => (float[N,16] y) {
    mm = MatMul(x, w)
    logits = Add(mm, b)
    y = Softmax<axis = -1>(logits)
}"""


def with_weights(text: str, opset: int = 17, seed: int = 0, **shapes) -> ir.Model:
    proto = onnx.parser.parse_model(text.replace("OPSET", str(opset)))
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        array = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]) if len(shape) > 1 else 10)).astype(np.float32)
        proto.graph.initializer.append(numpy_helper.from_array(array, name))
    return ir.from_proto(proto)


def conv_model(opset: int = 17) -> ir.Model:
    return with_weights(CONV, opset, w=(16, 8, 3, 3), b=(16,))


def samples(shape, count=6, seed=1, name="x"):
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def quantize(model: ir.Model, feeds, **options):
    options.setdefault("min_reduction", 0)
    return QuantizeStaticPass(context=PassContext(feeds), **options)(model)


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def worst_cosine(before: ir.Model, after: ir.Model, feeds, optimized: bool) -> float:
    ref, got = ort_run.make_session(before), ort_run.make_session(after, optimized=optimized)
    worst = 1.0
    for feed in feeds:
        for a, b in zip(ort_run.run(ref, feed).values(), ort_run.run(got, feed).values()):
            worst = min(worst, cosine(a, b))
    return worst


def producer_op(value: ir.Value) -> str | None:
    return value.producer().op_type if value.producer() is not None else None


def test_conv_gets_qdq_around_it_and_uint8_weight_and_int32_bias():
    model = conv_model()
    feeds = samples((2, 8, 6, 6))
    result = quantize(model, feeds)
    assert result.modified
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear",
                               "Conv", "Relu", "QuantizeLinear", "DequantizeLinear"]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    x_dq, w_dq, b_dq = (v.producer() for v in conv.inputs)
    assert w_dq.attributes["axis"].as_int() == 0
    # x is centred (zero point 128): int8 weights would saturate ORT's u8s8 kernels on AVX2
    assert w_dq.inputs[0].const_value.dtype == ir.DataType.UINT8 and set(w_dq.inputs[2].const_value.numpy()) == {128}
    assert b_dq.inputs[0].const_value.dtype == ir.DataType.INT32
    x_scale = x_dq.inputs[1].const_value.numpy()
    np.testing.assert_allclose(b_dq.inputs[1].const_value.numpy(), x_scale * w_dq.inputs[1].const_value.numpy(),
                               rtol=1e-6)
    assert model.graph.outputs[0].name == "y" and producer_op(model.graph.outputs[0]) == "DequantizeLinear"
    assert result.stats["ops_quantized"] == {"Conv": 1} and result.stats["biases_quantized"] == 1


def test_matmul_on_3d_activations_quantizes_inputs_only_and_leaves_add_and_softmax_float():
    model = with_weights(MATMUL.replace("float[N,32] x", "float[N,5,32] x").replace("float[N,16] y", "float[N,5,16] y"),
                         w=(32, 16), b=(16,))
    result = quantize(model, samples((3, 5, 32)))
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add", "Softmax"]
    weight_dq = next(n for n in model.graph if n.op_type == "MatMul").inputs[1].producer()
    assert weight_dq.attributes["axis"].as_int() == 1  # one scale per output column
    assert result.stats["tensors_quantized"] == 1


def test_matmul_and_bias_on_2d_activations_become_a_gemm_with_int32_bias():
    model = with_weights(MATMUL, w=(32, 16), b=(16,))
    before = model.clone()
    feeds = samples((3, 32))
    result = quantize(model, feeds)
    assert op_types(model) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "DequantizeLinear",
                               "Gemm", "Softmax"]
    gemm = next(n for n in model.graph if n.op_type == "Gemm")
    assert gemm.outputs[0].name == "logits" and gemm.inputs[2].producer().inputs[0].dtype == ir.DataType.INT32
    assert result.stats["matmul_adds_to_gemm"] == 1 and result.stats["ops_quantized"] == {"MatMul": 1}
    assert worst_cosine(before, model, feeds, optimized=True) >= 0.99


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_quantized_builders_run_in_ort_with_and_without_optimizations(name):
    model = ir.from_proto(builders.BUILDERS[name]())
    before = model.clone()
    feeds = sample_feeds(name, 8)
    assert quantize(model, feeds).modified
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.99


def test_ort_cpu_placement_leaves_softmax_layernorm_and_attention_float():
    model = ir.from_proto(builders.build_transformer())
    quantize(model, sample_feeds("transformer", 4))
    for node in model.graph:
        if node.op_type in ("Softmax", "LayerNormalization", "Erf"):
            assert all(producer_op(v) != "DequantizeLinear" for v in node.inputs if v is not None)
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    quantized = [n for n in matmuls if producer_op(n.inputs[1]) == "DequantizeLinear"]
    assert len(matmuls) == 8 and len(quantized) == 6  # scores and context MatMuls stay float
    assert all(producer_op(n.inputs[0]) == "DequantizeLinear" for n in quantized)


def test_placement_all_quantizes_every_supported_op():
    model = with_weights(MATMUL, w=(32, 16), b=(16,))
    result = quantize(model, samples((3, 32)), placement="all")
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    assert producer_op(softmax.inputs[0]) == "DequantizeLinear"
    assert result.stats["ops_quantized"] == {"MatMul": 1, "Softmax": 1}
    assert [use.node.op_type for use in softmax.outputs[0].uses()] == ["QuantizeLinear"]


def test_concat_inputs_and_output_share_one_scale_and_neighbours_run_on_integers():
    model = ir.from_proto(builders.build_cnn())
    result = quantize(model, sample_feeds("cnn", 6))
    concat = next(n for n in model.graph if n.op_type == "Concat")
    scales = {id(v.producer().inputs[1]) for v in concat.inputs}
    quant = next(iter(concat.outputs[0].uses())).node
    assert quant.op_type == "QuantizeLinear" and scales == {id(quant.inputs[1])}
    ops = result.stats["ops_quantized"]
    assert ops["Conv"] == 5 and ops["Concat"] == 1 and ops["Add"] == 1 and ops["MaxPool"] == 1
    assert result.stats["affine_ops_folded"] == 1 and "BatchNormalization" not in op_types(model)


def test_auto_weight_type_is_int8_after_relu_and_follows_an_explicit_choice():
    feeds = sample_feeds("cnn", 4)
    for weight_type, expect in (("auto", ir.DataType.INT8), ("uint8", ir.DataType.UINT8)):
        model = ir.from_proto(builders.build_cnn())
        quantize(model, feeds, weight_type=weight_type)
        res1 = next(n for n in model.graph if n.op_type == "Conv" and n.outputs[0].name.startswith("r1"))
        assert res1.inputs[1].producer().inputs[0].const_value.dtype == expect
    model = conv_model()
    quantize(model, samples((2, 8, 6, 6)), weight_type="int8", reduce_range=True)
    weight = next(n for n in model.graph if n.op_type == "Conv").inputs[1].producer().inputs[0].const_value.numpy()
    assert weight.dtype == np.int8 and np.abs(weight.astype(int)).max() == 64  # 7-bit range


def test_min_reduction_leaves_small_convs_float_by_default():
    model = ir.from_proto(builders.build_cnn())  # stem: 3*3*3 = 27, branch_a: 16 multiply-adds per output
    result = QuantizeStaticPass(context=PassContext(sample_feeds("cnn", 4)))(model)
    assert result.stats["ops_quantized"]["Conv"] == 3
    assert result.stats["fallbacks"]["reduction_below_min"] == 3


def test_second_run_and_weight_only_models_are_not_quantized_again():
    model = conv_model()
    feeds = samples((2, 8, 6, 6))
    quantize(model, feeds)
    again = quantize(model, feeds)
    assert not again.modified and again.stats["fallbacks"] == {"already_quantized": 1}
    weight_only = conv_model()
    QuantizeWeightsPass(min_elements=0)(weight_only)
    result = quantize(weight_only, feeds)
    assert not result.modified and result.stats["fallbacks"] == {"already_quantized": 1}


def test_opset_11_model_is_upgraded_for_per_channel_or_kept_per_tensor():
    model = conv_model(opset=11)
    before = model.clone()
    feeds = samples((2, 8, 6, 6))
    result = quantize(model, feeds)
    assert result.stats["opset_upgraded"] == "11->13" and default_opset(model) == 13
    assert worst_cosine(before, model, feeds, optimized=True) >= 0.99
    per_tensor = conv_model(opset=11)
    quantize(per_tensor, feeds, per_channel=False)
    assert default_opset(per_tensor) == 11
    assert worst_cosine(before, per_tensor, feeds, optimized=False) >= 0.99
    with pytest.raises(UsageError, match="opset 13"):
        quantize(conv_model(opset=11), feeds, upgrade_opset=False)


def test_if_and_loop_bodies_are_quantized():
    model = ir.from_proto(builders.build_control_flow())
    before = model.clone()
    feeds = sample_feeds("control_flow", 8)
    result = quantize(model, feeds)
    assert result.stats["ops_quantized"] == {"MatMul": 3}
    bodies = [n for n in all_nodes(model) if n.graph is not model.graph and n.op_type == "MatMul"]
    assert len(bodies) == 3 and all(producer_op(n.inputs[1]) == "DequantizeLinear" for n in bodies)
    assert len([v for v in model.graph.initializers if v.endswith("_quantized")]) == 2  # shared weight: once
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.99


def test_a_tensor_quantized_in_the_main_graph_feeds_an_if_body():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,32] x, bool flag) => (float[N,32] y) {
        a = MatMul(x, w1)
        b = MatMul(a, w2)
        y = If(flag) <then_branch = t () => (float[N,32] t_out) { t_out = MatMul(a, w3) },
                      else_branch = e () => (float[N,32] e_out) { e_out = Add(b, b) }>
    }"""
    model = with_weights(text, w1=(32, 32), w2=(32, 32), w3=(32, 32))
    before = model.clone()
    feeds = [dict(f, flag=np.array(i % 2 == 0)) for i, f in enumerate(samples((3, 32)))]
    result = quantize(model, feeds)
    assert result.stats["ops_quantized"] == {"MatMul": 3}
    for optimized in (False, True):
        assert worst_cosine(before, model, feeds, optimized) >= 0.99


def test_node_selectors_exclude_by_name_and_refuse_to_match_nothing():
    proto = builders.build_mlp()
    for i, node in enumerate(proto.graph.node):
        node.name = f"n{i}_{node.op_type}"
    feeds = sample_feeds("mlp", 4)
    model = ir.from_proto(proto)
    result = quantize(model, feeds, exclude_nodes=("^n3_MatMul$",))
    assert result.stats["ops_quantized"] == {"MatMul": 2}
    skipped = next(n for n in model.graph if n.name == "n3_MatMul")
    assert producer_op(skipped.inputs[0]) != "DequantizeLinear" and skipped.inputs[1].const_value is not None
    with pytest.raises(UsageError, match="matched no node"):
        quantize(ir.from_proto(proto), feeds, nodes=("no_such_node",))


def test_no_calibration_data_is_a_usage_error():
    with pytest.raises(UsageError, match="calibration samples"):
        QuantizeStaticPass()(conv_model())


def test_a_tensor_too_quiet_for_its_range_stays_float():
    model = conv_model()
    feeds = samples((1, 8, 6, 6), count=4)
    feeds[0]["x"] *= 1e-3  # a near-silent sample next to loud ones
    result = quantize(model, feeds)
    assert not result.modified and result.stats["fallbacks"] == {"low_sqnr": 1}
    assert quantize(conv_model(), feeds, min_sqnr_db=0).modified


def test_weights_from_constant_nodes_and_tied_weights_are_quantized_once():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,32] x) => (float[N,32] y) {
        w = Constant<value = float[32,32] {%s}>()
        a = MatMul(x, w)
        r = Relu(a)
        y = MatMul(r, w)
    }""" % ",".join(str(v) for v in np.random.default_rng(0).normal(0, 0.2, 32 * 32).round(4))
    model = ir.from_proto(onnx.parser.parse_model(text))
    result = quantize(model, samples((2, 32)), weight_type="int8")  # auto would pick per consumer
    assert result.stats["weights_quantized"] == 1 and result.stats["ops_quantized"] == {"MatMul": 2}
    assert "Constant" not in op_types(model)
    counts = collections.Counter(op_types(model))
    assert counts["DequantizeLinear"] == 4 and counts["QuantizeLinear"] == 2


def test_int16_activations_and_pow2_scales():
    model = conv_model()
    before = model.clone()
    feeds = samples((2, 8, 6, 6))
    result = quantize(model, feeds, activation_type="int16", pow2=True)
    assert default_opset(model) == 21 and result.stats["opset_upgraded"] == "17->21"
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            scale = node.inputs[1].const_value.numpy()
            np.testing.assert_array_equal(np.exp2(np.round(np.log2(scale))), scale)
    assert worst_cosine(before, model, feeds, optimized=False) >= 0.999


def test_percentile_calibration_clips_an_outlier_sample():
    model = with_weights(MATMUL, w=(32, 16), b=(16,))
    feeds = samples((64, 32), count=8)
    feeds[3]["x"][0, 0] = 80.0
    quantize(model, feeds, calibration="percentile", percentile=99.9)
    scale = next(n for n in model.graph if n.op_type == "QuantizeLinear").inputs[1].const_value.numpy()
    assert float(scale) * 255 < 20  # minmax would span the outlier at 80


@pytest.mark.slow
@pytest.mark.zoo
def test_bundled_ppocr_classifier_keeps_its_decisions():
    model = ir.load(bundled_model_path("ppocr_cls"))
    before = model.clone()
    feeds = sample_feeds("ppocr_cls", 24)
    result = QuantizeStaticPass(context=PassContext(feeds[:16]), calibration="percentile")(model)
    assert result.modified and result.stats["opset_upgraded"] == "11->13"
    evaluation = feeds[16:]
    want = [run_ort(before, f)[0] for f in evaluation]
    got_session = ort_run.make_session(model, optimized=True)
    got = [ort_run.run(got_session, f)[next(iter(got_session.get_outputs())).name] for f in evaluation]
    assert all(np.argmax(a) == np.argmax(b) for a, b in zip(want, got))
    assert min(cosine(a, b) for a, b in zip(want, got)) >= 0.99


def _zoo_params():
    slow = pytest.mark.slow
    yield pytest.param("silero_vad", marks=pytest.mark.zoo, id="silero_vad")
    for name in ("ppocr_det_v4", "ppocr_rec_v4"):
        yield pytest.param(name, marks=[pytest.mark.zoo, slow], id=name)


@pytest.mark.parametrize("name", list(_zoo_params()))
def test_zoo_models_keep_their_task_outputs(name):
    from onnxopt.models import zoo

    path = zoo.cached_path(name)
    if path is None:
        pytest.skip(f"{name} not fetched; run `onnxopt zoo fetch {name}`")
    model = ir.load(path)
    before = model.clone()
    feeds = sample_feeds(name, 32)
    result = QuantizeStaticPass(context=PassContext(feeds[:16]))(model)
    assert result.modified
    ref, got = ort_run.make_session(before), ort_run.make_session(model, optimized=True)
    pairs = [(ort_run.run(ref, f), ort_run.run(got, f)) for f in feeds[16:]]
    first = ref.get_outputs()[0].name
    if name == "silero_vad":  # everything lives in If bodies
        assert any(n.graph is not model.graph and n.op_type == "QuantizeLinear" for n in all_nodes(model))
        assert all((a[first] > 0.5) == (b[first] > 0.5) for a, b in pairs)
        assert max(float(np.abs(a[first] - b[first]).max()) for a, b in pairs) < 0.1
    else:  # the bare pass, no budget: rec's int8 weights alone cost it 20 dB (the runner's fallback fixes that)
        assert min(cosine(a[first], b[first]) for a, b in pairs) >= {"ppocr_det_v4": 0.99, "ppocr_rec_v4": 0.95}[name]
