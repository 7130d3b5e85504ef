"""Gather tables (embeddings) for quantize-weights: dequantize only the gathered rows.

A float table read by ``Gather(table, ids)`` (axis 0, rank 2) is stored as integers with
one scale (and zero point) per row, or per block of ``block_size`` elements along the row,
and each Gather becomes either

* ``gather=contrib`` (the default): ORT's ``com.microsoft.GatherBlockQuantized`` on the
  packed table, which dequantizes the gathered rows only (8 bits as uint8, 4 bits as
  uint8 holding two values per byte, or as uint4 when the table is shared);
* ``gather=onnx``: standard ops, ``Gather`` of the integers, of the scales (and zero points),
  then a blocked ``DequantizeLinear`` (opset 21) over the gathered rows, or Cast/Sub/Mul for
  one scale per row (8 and 16 bits: ORT's Gather takes no int4).

Other consumers of the same table (a tied output projection ``MatMul(h, Transpose(table))``)
read one ``DequantizeLinear`` of the same integers, so the table is stored once. A signed
table is stored shifted by ``-qmin`` with that zero point (the contrib op takes unsigned
data), which dequantizes to the same values. Measured on ORT 1.32's CPU provider
(30522x384 table, 128 ids, 1 thread): float Gather 11 us, contrib 8-bit 19-21 us, 4-bit
packed 48 us, uint4 390 us, the standard-ops 8-bit form 61 us, and dequantizing the whole
table before the Gather (``gather=table``) 35 ms.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from . import math as qm
from . import weights_lazy as lazy
from .placement import DEFAULT_DOMAINS

FORMATS = ("contrib", "onnx", "table", "float")
CONTRIB = "com.microsoft"


@dataclasses.dataclass(frozen=True)
class Rows:
    """How one table's gathered rows are dequantized."""

    gathers: tuple[ir.Node, ...]  # the Gather nodes replaced
    fmt: str  # "contrib" or "onnx"
    block: int  # elements per scale along a row (>= the row length: one scale per row)
    per_tensor: bool
    storage: str  # "uint8", "packed4" (two 4-bit values per uint8), "uint4", or "int" (the quantized type)
    shared: bool  # other consumers read a DequantizeLinear of the same integers

    @property
    def opset(self) -> int:
        return 21 if self.shared or self.fmt == "onnx" else 1


def _row_gather(node: ir.Node, index: int) -> bool:
    if node.op_type != "Gather" or index != 0 or node.domain not in DEFAULT_DOMAINS:
        return False
    axis = node.attributes.get("axis")
    return axis is None or axis.as_int() in (0, -2)


def plan(fmt: str, uses, shape: tuple[int, ...], bits: int, granularity: str, block_size: int
         ) -> tuple[Rows | None, str | None]:
    """(rows plan, None), or (None, why the table is dequantized whole) for a weight with these uses."""
    if fmt not in ("contrib", "onnx"):
        return None, None
    gathers = tuple(dict.fromkeys(node for node, index in uses if _row_gather(node, index)))
    if not gathers:
        return None, None
    if len(shape) != 2:
        return None, f"rank-{len(shape)} table (rows are gathered from rank-2 tables)"
    if bits not in (4, 8, 16):
        return None, f"{bits}-bit rows have no Gather form"
    shared = len(gathers) < len({node for node, _ in uses})
    length = shape[1]
    per_row = max(16, 1 << (length - 1).bit_length())
    block = block_size if granularity == "blocked" else per_row
    if bits == 16 or (fmt == "contrib" and (block < 16 or block & (block - 1))):
        if bits == 4:
            return None, (f"4-bit blocks of {block} (GatherBlockQuantized takes powers of two >= 16; "
                          f"ORT's Gather takes no int4)")
        fmt = "onnx"  # GatherBlockQuantized takes 2/4/8 bits and power-of-two blocks >= 16
    if fmt == "onnx":
        if bits == 4:
            return None, "4-bit rows need gather=contrib (ORT's Gather takes no int4)"
        storage = "int"
    elif bits == 8:
        storage = "uint8"
    else:
        storage = "uint4" if shared or length % 2 else "packed4"
    return Rows(gathers, fmt, block, granularity == "per-tensor", storage, shared), None


# -- tensors --------------------------------------------------------------------------------
def _arrays(w: np.ndarray, rows: Rows, qtype: qm.QuantType, symmetric: bool, pow2: bool, clip: float | None):
    """(integers, scale [rows, blocks], zero point [rows, blocks]) in the working types of ``qtype``."""
    if rows.per_tensor:
        q, scale, zp, _ = lazy.quantize_array(w, qtype, None, None, symmetric, pow2, clip)
        full = (w.shape[0], 1)
        return q, np.full(full, scale, dtype=np.float32), np.full(full, zp, dtype=zp.dtype)
    q, scale, zp, _ = lazy.quantize_array(w, qtype, 1, rows.block, symmetric, pow2, clip)
    return q, scale, zp


def _stored(values: np.ndarray, rows: Rows, qtype: qm.QuantType) -> ir.TensorProtocol:
    """``values`` (integers or zero points, [rows, n]) in the storage of ``rows``."""
    if rows.storage == "int":
        return ir.Tensor(values.astype(qtype.np_dtype, copy=False), dtype=qtype.ir_dtype)
    shifted = (values.astype(np.int16) - qtype.qmin).astype(np.uint8)
    if rows.storage == "uint8":
        return ir.Tensor(shifted)
    if rows.storage == "uint4":
        return ir.PackedTensor(lazy.pack_low_bits(shifted, 4), ir.DataType.UINT4, shape=shifted.shape)
    if shifted.shape[1] % 2:  # packed4: low nibble first, a zero nibble pads an odd count of zero points
        shifted = np.concatenate([shifted, np.zeros((shifted.shape[0], 1), np.uint8)], axis=1)
    return ir.Tensor((shifted[:, 0::2] | (shifted[:, 1::2] << 4)).astype(np.uint8))


def tensors(tensor: ir.TensorProtocol, rows: Rows, qtype: qm.QuantType, symmetric: bool, pow2: bool,
            clip: float | None, defer: bool):
    """(integers, scale, zero point or None) tensors, computed now or deferred to save time."""
    source = lazy.WeightSource(tensor)
    shape = tuple(int(d) for d in tensor.shape.numpy())
    blocks = 1 if rows.per_tensor else -(-shape[1] // rows.block)
    args = (rows, qtype, symmetric, pow2, clip)
    dtype = {"int": qtype.ir_dtype, "uint8": ir.DataType.UINT8, "uint4": ir.DataType.UINT4,
             "packed4": ir.DataType.UINT8}[rows.storage]
    q_shape = (shape[0], shape[1] // 2) if rows.storage == "packed4" else shape
    z_shape = (shape[0], -(-blocks // 2)) if rows.storage == "packed4" else (shape[0], blocks)
    q = lazy.payload(source, lambda w: _stored(_arrays(w, *args)[0], rows, qtype), dtype, q_shape, defer)
    scale = lazy.payload(source, lambda w: _arrays(w, *args)[1], ir.DataType.FLOAT, (shape[0], blocks), defer)
    if rows.storage == "int" and symmetric and qtype.signed:
        return q, scale, None  # zero point 0, DequantizeLinear's default
    zp = lazy.payload(source, lambda w: _stored(_arrays(w, *args)[2], rows, qtype), dtype, z_shape, defer)
    return q, scale, zp


# -- rewriting ------------------------------------------------------------------------------
def _node(op_type: str, inputs, attrs: dict, name: str, domain: str = "") -> ir.Node:
    node = ir.node(op_type, inputs, attrs, domain=domain, name=name)
    node.outputs[0].name = f"{name}_out"
    return node


def replace_gathers(rows: Rows, q: ir.Value, scale: ir.Value, zp: ir.Value | None, namer) -> None:
    """Replace each Gather of ``rows`` by a dequantization of its rows only (same output name and node name)."""
    length = q.shape[1] * (2 if rows.storage == "packed4" else 1)
    for gather in rows.gathers:
        graph, ids, old = gather.graph, gather.inputs[1], gather.outputs[0]
        base = gather.name or namer.fresh("gather_rows")
        if rows.fmt == "contrib":
            bits = 8 if rows.storage == "uint8" else 4
            inputs = [q, ids, scale] + ([zp] if zp is not None else [])
            nodes = [_node("GatherBlockQuantized", inputs, {"gather_axis": 0, "quantize_axis": 1,
                           "block_size": rows.block, "bits": bits}, namer.fresh(f"{base}_rows"), CONTRIB)]
        else:
            parts = [_node("Gather", [t, ids], {}, namer.fresh(f"{base}_{what}"))
                     for t, what in ((q, "q"), (scale, "scale"), (zp, "zero_point")) if t is not None]
            nodes = parts + _dequantize_rows([p.outputs[0] for p in parts], rows.block, scale.shape[1] == 1,
                                             base, namer)
        out = nodes[-1].outputs[0]
        out.dtype = ir.DataType.FLOAT
        if ids.shape is not None:
            out.shape = ir.Shape([*ids.shape, length])
        ir.convenience.replace_nodes_and_values(graph, gather, [gather], nodes, [old], [out])
        if gather.name:
            nodes[-1].name = gather.name


def _dequantize_rows(gathered: list[ir.Value], block: int, per_row: bool, base: str, namer) -> list[ir.Node]:
    """Nodes computing ``(q - zero_point) * scale`` of gathered rows. One scale per row is applied
    with Cast/Sub/Mul, which broadcast: ORT reads a one-element scale (a single gathered row) as
    per tensor and then refuses DequantizeLinear's ``block_size``."""
    if not per_row:
        return [_node("DequantizeLinear", gathered, {"axis": -1, "block_size": block}, namer.fresh(f"{base}_rows"))]
    q, scale, zp = (gathered + [None])[:3]
    nodes = [_node("Cast", [q], {"to": ir.DataType.FLOAT}, namer.fresh(f"{base}_q_float"))]
    if zp is not None:
        nodes.append(_node("Cast", [zp], {"to": ir.DataType.FLOAT}, namer.fresh(f"{base}_zero_point_float")))
        nodes.append(_node("Sub", [nodes[0].outputs[0], nodes[1].outputs[0]], {}, namer.fresh(f"{base}_centred")))
    nodes.append(_node("Mul", [nodes[-1].outputs[0], scale], {}, namer.fresh(f"{base}_rows")))
    return nodes


def dequantize_table(rows: Rows, q: ir.Value, scale: ir.Value, zp: ir.Value | None, store, name: str) -> ir.Value:
    """The whole table dequantized from the shared integers, for the consumers that are not row Gathers."""
    inputs = [q, scale] + ([zp] if zp is not None else [])
    return store.op("DequantizeLinear", inputs, {"axis": 1, "block_size": rows.block}, name)
