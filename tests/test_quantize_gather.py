"""quantize-weights on Gather tables: only the gathered rows are dequantized (passes/quantize/gather.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from helpers import op_types, run_ort
from onnx import numpy_helper

from onnxopt.passes.quantize import math as qm
from onnxopt.passes.quantize.weights import QuantizeWeightsPass

EMBED = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[2,5] ids) => (float[2,5,64] y) { y = Gather(table, ids) }"""
TIED = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[2,5] ids) => (float[2,5,64] y, float[2,5,100] logits) {
    y = Gather(table, ids)
    t = Transpose(table)
    logits = MatMul(y, t)
}"""
IDS = np.array([[0, 5, 99, 3, 3], [1, 2, 3, 4, 98]], dtype=np.int64)


def with_table(text: str, shape=(100, 64), seed: int = 0) -> ir.Model:
    proto = onnx.parser.parse_model(text)
    table = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    proto.graph.initializer.append(numpy_helper.from_array(table, "table"))
    return ir.from_proto(proto)


def table_of(model: ir.Model) -> np.ndarray:
    return model.graph.initializers["table"].const_value.numpy()


def quantize(model: ir.Model, **options):
    return QuantizeWeightsPass(min_elements=0, **options)(model)


@pytest.mark.parametrize("options, qtype, axis, block", [
    ({}, qm.QuantType(8), 0, None),
    ({"signed": False, "symmetric": False}, qm.QuantType(8, False), 0, None),
    ({"bits": 4}, qm.QuantType(4), 0, None),
    ({"bits": 4, "granularity": "blocked", "block_size": 16}, qm.QuantType(4), 1, 16),
    ({"gather": "onnx"}, qm.QuantType(8), 0, None),
])
def test_gathered_rows_equal_the_dequantized_table_rows_exactly(options, qtype, axis, block):
    model = with_table(EMBED)
    table = table_of(model)
    result = quantize(model, **options)
    assert result.stats["gather_rows"] == {"Gather_0": options.get("gather", "contrib")}
    assert "DequantizeLinear" not in op_types(model) or options.get("gather") == "onnx"
    q, scale, zp, _ = qm.quantize_weight(table, qtype, axis, block, options.get("symmetric", True))
    expected = qm.dequantize(q, scale, zp, qtype, axis, block)[IDS]
    np.testing.assert_array_equal(run_ort(model, {"ids": IDS})[0], expected)


def test_rows_and_whole_table_forms_give_the_same_numbers_and_the_file_shrinks():
    rows, table = with_table(EMBED), with_table(EMBED)
    size = ir.to_proto(rows).ByteSize()
    quantize(rows)
    quantize(table, gather="table")
    assert op_types(table) == ["DequantizeLinear", "Gather"] and op_types(rows) == ["GatherBlockQuantized"]
    assert rows.opset_imports["com.microsoft"] == 1
    np.testing.assert_array_equal(run_ort(rows, {"ids": IDS})[0], run_ort(table, {"ids": IDS})[0])
    assert ir.to_proto(rows).ByteSize() < 0.3 * size
    four = with_table(EMBED)
    quantize(four, bits=4)
    assert four.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.UINT8  # two per byte
    assert ir.to_proto(four).ByteSize() < 0.17 * size


def test_a_tied_output_projection_shares_the_quantized_table():
    model = with_table(TIED)
    before = model.clone()
    result = quantize(model)
    assert sorted(result.stats["quantized_nodes"]) == ["Gather_0", "MatMul_0"]
    assert "table" not in model.graph.initializers
    stored = [name for name in model.graph.initializers if name.startswith("table_quantized")]
    assert stored == ["table_quantized"]  # quantized once, read by both consumers
    assert sorted(op_types(model)) == ["DequantizeLinear", "GatherBlockQuantized", "MatMul", "Transpose"]
    rows, logits = run_ort(model, {"ids": IDS})
    q, scale, zp, _ = qm.quantize_weight(table_of(before), qm.QuantType(8), 0)
    dequantized = qm.dequantize(q, scale, zp, qm.QuantType(8), 0)
    np.testing.assert_array_equal(rows, dequantized[IDS])
    np.testing.assert_allclose(logits, rows @ dequantized.T, rtol=1e-5, atol=1e-4)
    want = run_ort(before, {"ids": IDS})[1]
    assert np.abs(logits - want).max() < 0.02 * np.abs(want).max()
    four = with_table(TIED)
    quantize(four, bits=4)  # shared 4-bit: uint4, which DequantizeLinear reads too
    assert four.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.UINT4
    rows4, logits4 = run_ort(four, {"ids": IDS})
    assert np.abs(logits4 - want).max() < 0.25 * np.abs(want).max()


def test_a_gather_inside_an_if_body_reads_the_outer_table_rows():
    model = with_table("""<ir_version: 8, opset_import: ["" : 17]>
        g (bool c, int64[2,5] ids) => (float[2,5,64] y) {
            y = If(c) <then_branch = t () => (float[2,5,64] a) { a = Gather(table, ids) },
                       else_branch = e () => (float[2,5,64] b) { b = Gather(table, ids) }>
        }""")
    before = model.clone()
    result = quantize(model)
    assert len(result.stats["gather_rows"]) == 2
    assert op_types(model).count("GatherBlockQuantized") == 2 and "table" not in model.graph.initializers
    for flag in (True, False):
        feeds = {"c": np.array(flag), "ids": IDS}
        want, got = run_ort(before, feeds)[0], run_ort(model, feeds)[0]
        assert np.abs(got - want).max() < 0.02 * np.abs(want).max()


def test_gather_float_keeps_tables_and_formats_without_a_row_form_are_noted():
    model = with_table(EMBED)
    result = quantize(model, gather="float")
    assert not result.modified and op_types(model) == ["Gather"]
    two = with_table(EMBED)
    result = quantize(two, bits=2)
    assert op_types(two) == ["DequantizeLinear", "Gather"]
    assert "2-bit rows have no Gather form" in result.stats["skipped"]["table (rows)"]
    indices_table = with_table("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[3] ids) => (float[100,3] y) { y = Gather<axis=1>(table, ids) }""")
    quantize(indices_table)
    assert op_types(indices_table) == ["DequantizeLinear", "Gather"]  # columns: the whole-table form


def test_promoted_16_bit_rows_use_standard_gathers():
    model = with_table(EMBED)
    result = quantize(model, promote_nodes=("Gather_0",), bits=8)
    assert result.stats["gather_rows"] == {"Gather_0": "onnx"}
    assert model.graph.initializers["table_quantized"].const_value.dtype == ir.DataType.INT16
    want = table_of(with_table(EMBED))[IDS]
    assert np.abs(run_ort(model, {"ids": IDS})[0] - want).max() < 1e-3


ENCODER = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[2,5] ids) => (float[2,5,64] y) { e = Gather(table, ids)  y = MatMul(e, w) }"""


def encoder() -> ir.Model:
    proto = onnx.parser.parse_model(ENCODER)
    rng = np.random.default_rng(0)
    for name, shape, scale in (("table", (100, 64), 1.0), ("w", (64, 64), 0.125)):
        proto.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
    return ir.from_proto(proto)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_dynamic_and_static_quantize_gather_tables_by_default_and_gather_bits_0_keeps_them(mode):
    from onnxopt import PassContext
    from onnxopt.passes.quantize import QuantizeDynamicPass, QuantizeStaticPass

    def run(**options):
        model = encoder()
        if mode == "dynamic":
            return model, QuantizeDynamicPass(**options)(model)
        feeds = [{"ids": np.random.default_rng(i).integers(0, 100, (2, 5))} for i in range(4)]
        return model, QuantizeStaticPass(context=PassContext(feeds), **options)(model)

    before = encoder()
    model, result = run()
    assert "GatherBlockQuantized" in op_types(model) and "table" not in model.graph.initializers
    assert "Gather_0" in result.stats["quantized_nodes"]  # mixed precision can keep it float
    assert result.stats["gather_tables"]["gather_rows"] == {"Gather_0": "contrib"}
    want, got = run_ort(before, {"ids": IDS})[0], run_ort(model, {"ids": IDS})[0]
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    kept, result = run(gather_bits=0)
    assert "Gather" in op_types(kept) and "table" in kept.graph.initializers
    excluded, result = run(exclude_nodes=("^Gather_0$",))  # what the fallback passes to keep it float
    assert "table" in excluded.graph.initializers and "gather_tables" not in result.stats


def test_a_gather_in_a_local_function_imports_the_contrib_domain_there():
    model = ir.from_proto(onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17, "local" : 1]>
        g (int64[2,5] ids) => (float[2,5,64] y) { y = local.Embed(ids) }
        <domain: "local", opset_import: ["" : 17]>
        Embed (ids) => (y) { table = Constant<value = float[40,32] {""" + ", ".join(["0.5", "-1.5"] * 640) + """}>()
                             y = Gather(table, ids) }"""))
    before = model.clone()
    result = quantize(model)
    function = next(iter(model.functions.values()))
    assert result.stats["gather_rows"] and function.opset_imports["com.microsoft"] == 1
    ids = IDS % 40
    np.testing.assert_allclose(run_ort(model, {"ids": ids})[0], run_ort(before, {"ids": ids})[0], atol=0.01)


@pytest.mark.parametrize("fmt", ["contrib", "onnx"])
def test_one_gathered_row_and_negative_ids(fmt):
    # one row's scale has one element, which ORT would read as a per-tensor DequantizeLinear scale
    model = with_table("""<ir_version: 8, opset_import: ["" : 17]>
        g (int64[1,1] ids, int64 one) => (float[1,1,64] y, float[64] z) { y = Gather(table, ids)  z = Gather(table, one) }""")
    table = table_of(model)
    quantize(model, gather=fmt)
    q, scale, zp, _ = qm.quantize_weight(table, qm.QuantType(8), 0)
    dequantized = qm.dequantize(q, scale, zp, qm.QuantType(8), 0)
    y, z = run_ort(model, {"ids": np.array([[-1]]), "one": np.array(-3)})
    np.testing.assert_array_equal(y, dequantized[[[-1]]])
    np.testing.assert_array_equal(z, dequantized[-3])
