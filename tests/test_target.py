"""Target CPUs: detection from /proc/cpuinfo text, and the kernel choices the quantize passes take from them."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import run_ort
from onnx import numpy_helper

from onnxopt import api, target
from onnxopt.cli import main
from onnxopt.errors import UsageError
from onnxopt.pass_base import PassContext
from onnxopt.passes.quantize.dynamic import QuantizeDynamicOptions, QuantizeDynamicPass
from onnxopt.passes.quantize.static import QuantizeStaticPass

EPYC_AVX2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme de pse sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2
"""
XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
ARM_DOT = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
"""

MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,96] x) => (float[N,24] y) {
    y = MatMul(x, w)
}"""


def matmul_model(seed: int = 0) -> ir.Model:
    proto = onnx.parser.parse_model(MATMUL)
    w = np.random.default_rng(seed).standard_normal((96, 24)).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return ir.from_proto(proto)


def centred_feeds(count: int = 4) -> list[dict[str, np.ndarray]]:
    """Activations spread around 0: uint8 zero point near 128 (where u8s8 saturates without VNNI)."""
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((2, 96)).astype(np.float32)} for _ in range(count)]


def context(name: str, feeds=None) -> PassContext:
    return PassContext(feeds, target=target.resolve(name))


def weight_dtypes(model: ir.Model, op: str) -> set[ir.DataType]:
    """The integer type of every weight an ``op`` reads (MatMulInteger's, or a DequantizeLinear's input)."""
    return {node.inputs[1 if op == "MatMulInteger" else 0].const_value.dtype
            for node in model.graph if node.op_type == op and
            node.inputs[1 if op == "MatMulInteger" else 0].const_value is not None}


@pytest.mark.parametrize("text, name, flag", [(EPYC_AVX2, "avx2", "avx2"), (XEON_AMX, "amx", "amx_int8"),
                                              (ARM_DOT, "arm-dotprod", "asimddp")])
def test_detect_names_the_target_of_a_cpuinfo_text(text, name, flag):
    chosen = target.detect(text)
    assert chosen.name == name and chosen.chosen_by == "auto" and flag in chosen.flags
    assert chosen.u8s8_saturates == (name == "avx2")


def test_detect_reads_the_model_name_and_knows_vnni_without_amx():
    chosen = target.detect(XEON_AMX.replace(" amx_tile amx_int8", ""))
    assert chosen.name == "avx512-vnni" and chosen.cpu.startswith("Intel(R) Xeon(R) Platinum")
    assert target.detect("").name == "generic"


def test_an_explicit_target_overrides_auto_and_unknown_names_are_refused():
    assert target.resolve("avx2", cpuinfo=XEON_AMX).name == "avx2"
    assert target.resolve("auto", cpuinfo=XEON_AMX).name == "amx"
    assert target.resolve("avx2", threads=4).threads == 4
    with pytest.raises(UsageError, match="unknown target 'sse9'.*avx512-vnni"):
        target.resolve("sse9")


def test_dynamic_weights_follow_the_target_and_an_explicit_option_wins():
    vnni = matmul_model()
    result = QuantizeDynamicPass(QuantizeDynamicOptions(min_reduction=0), context=context("avx512-vnni"))(vnni)
    assert weight_dtypes(vnni, "MatMulInteger") == {ir.DataType.INT8}
    avx2 = matmul_model()
    avx2_pass = QuantizeDynamicPass(QuantizeDynamicOptions(min_reduction=0), context=context("avx2"))
    avx2_pass(avx2)
    assert weight_dtypes(avx2, "MatMulInteger") == {ir.DataType.UINT8}
    assert avx2_pass.kernel_choices["weight_type"]["value"] == "uint8"
    assert avx2_pass.kernel_choices["weight_type"]["source"] == "target avx2"
    explicit = matmul_model()
    chosen = QuantizeDynamicPass(QuantizeDynamicOptions(min_reduction=0, weight_type="uint8"),
                                 context=context("avx512-vnni"))
    chosen(explicit)
    assert weight_dtypes(explicit, "MatMulInteger") == {ir.DataType.UINT8}
    assert chosen.kernel_choices["weight_type"]["source"] == "option" and result.modified


def test_int8_dynamic_weights_on_a_saturating_target_get_seven_bits():
    model, reference = matmul_model(), matmul_model()
    chosen = QuantizeDynamicPass(QuantizeDynamicOptions(min_reduction=0, weight_type="int8"), context=context("avx2"))
    chosen(model)
    weight = next(n for n in model.graph if n.op_type == "MatMulInteger").inputs[1].const_value.numpy()
    assert np.abs(weight).max() <= 64
    assert chosen.kernel_choices["reduce_range"] == {"value": "true", "source": "target avx2",
                                                     "why": "7-bit int8 weights keep u8s8 pair sums inside int16"}
    feed = centred_feeds(1)[0]
    got, want = run_ort(model, feed)[0], run_ort(reference, feed)[0]
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.03  # 7 bits: about 1% noise
    full = matmul_model()
    QuantizeDynamicPass(QuantizeDynamicOptions(min_reduction=0, weight_type="int8", reduce_range=False),
                        context=context("avx2"))(full)
    assert np.abs(next(n for n in full.graph if n.op_type == "MatMulInteger").inputs[1].const_value.numpy()).max() > 64


def test_static_weights_and_activations_follow_the_target():
    feeds = centred_feeds()
    avx2, vnni, arm, explicit = (matmul_model() for _ in range(4))
    QuantizeStaticPass(min_reduction=0, context=context("avx2", feeds))(avx2)
    QuantizeStaticPass(min_reduction=0, context=context("avx512-vnni", feeds))(vnni)
    QuantizeStaticPass(min_reduction=0, context=context("arm-dotprod", feeds))(arm)
    QuantizeStaticPass(min_reduction=0, weight_type="uint8", context=context("avx512-vnni", feeds))(explicit)
    assert weight_dtypes(avx2, "DequantizeLinear") == {ir.DataType.UINT8}  # centred activation: exact u8u8
    assert ir.DataType.INT8 in weight_dtypes(vnni, "DequantizeLinear")
    assert ir.DataType.UINT8 not in weight_dtypes(vnni, "DequantizeLinear")
    assert ir.DataType.UINT8 in weight_dtypes(explicit, "DequantizeLinear")
    activation = {n.outputs[0].dtype for n in arm.graph if n.op_type == "QuantizeLinear"}
    assert activation == {ir.DataType.INT8}  # ARM keeps int8 Q/DQ native (s8s8 on SDOT)
    assert {n.outputs[0].dtype for n in vnni.graph if n.op_type == "QuantizeLinear"} == {ir.DataType.UINT8}
    for model in (avx2, vnni, arm):
        np.testing.assert_allclose(run_ort(model, feeds[0])[0], run_ort(matmul_model(), feeds[0])[0], atol=0.3)


def test_static_choices_say_what_auto_weights_mean_on_each_target():
    avx2 = QuantizeStaticPass(context=context("avx2"))
    vnni = QuantizeStaticPass(activation_type="int8", context=context("avx512-vnni"))
    assert avx2.kernel_choices["weight_type"]["value"] == "uint8 where centred, else int8"
    assert target.choices_text(vnni.kernel_choices).startswith("activation_type=int8 (option); ")
    assert "weight_type=int8 (target avx512-vnni)" in target.choices_text(vnni.kernel_choices)


def test_without_a_runner_target_the_passes_assume_generic():
    pass_ = QuantizeDynamicPass(min_reduction=0)
    assert pass_.target.name == "generic" and pass_.options.weight_type == "uint8"


def test_the_report_and_table_name_the_target_and_each_choice(tmp_path, capsys):
    path = tmp_path / "mm.onnx"
    ir.save(matmul_model(), path)
    code = main(["optimize", str(path), "-o", str(tmp_path / "out.onnx"), "-p", "quantize-dynamic:min_reduction=0",
                 "--target", "avx512-vnni", "--report", str(tmp_path / "r.json"), "--budget", "none"])
    out = capsys.readouterr().out
    assert code == 0
    assert "target: avx512-vnni (--target)" in out
    assert "weight_type=int8, reduce_range=false (target avx512-vnni)" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"]["name"] == "avx512-vnni" and report["target"]["chosen_by"] == "--target"
    step = report["passes"][0]
    assert step["kernel_choices"]["weight_type"]["value"] == "int8"
    assert "the speed of the model before it (ORT, 1 thread)" in out and step["speed"]["threads"] == 1
    quantized = ir.load(tmp_path / "out.onnx")
    assert weight_dtypes(quantized, "MatMulInteger") == {ir.DataType.INT8}


def test_a_recipe_may_name_the_target_and_the_api_argument_wins(tmp_path):
    path = tmp_path / "mm.onnx"
    ir.save(matmul_model(), path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: avx2\npipeline:\n  - {pass: quantize-dynamic, options: {min_reduction: 0}}\n")
    from_recipe = api.optimize(path, None, recipe=recipe, budget="none")
    assert from_recipe.report["target"]["name"] == "avx2"
    assert weight_dtypes(from_recipe.model, "MatMulInteger") == {ir.DataType.UINT8}
    overridden = api.optimize(path, None, recipe=recipe, budget="none", target="amx")
    assert weight_dtypes(overridden.model, "MatMulInteger") == {ir.DataType.INT8}
    recipe.write_text("target: avx2\ncolour: red\npipeline: [quantize-dynamic]\n")
    with pytest.raises(UsageError, match="unknown keys \\['colour'\\]"):
        api.optimize(path, None, recipe=recipe)


def test_targets_lists_every_target_with_its_choices_and_marks_this_machine(capsys):
    assert main(["targets"]) == 0
    out = capsys.readouterr().out
    assert "  avx2 " in out and "quantize-dynamic weight_type: uint8" in out
    assert "* auto on this machine: " + target.resolve("auto").name in out
    table = target.target_table(cpuinfo=ARM_DOT)
    assert table["auto"]["name"] == "arm-dotprod"
    arm = next(row for row in table["targets"] if row["name"] == "arm-dotprod")
    assert arm["choices"]["quantize-static activation_type"] == "int8"
