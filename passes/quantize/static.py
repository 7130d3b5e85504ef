"""quantize-static: calibrated QDQ quantization placed where ONNX Runtime runs integer kernels.

Activations get QuantizeLinear/DequantizeLinear pairs whose ranges come from calibration
(the core's streamed statistics over the calibration samples, asked for through the pass
context); weights become 8-bit (per output channel by default) behind DequantizeLinear;
Conv and Gemm biases become int32 with scale ``x_scale * w_scale``. Placement follows
:mod:`.placement`: a Conv's BatchNormalization/Mul/Add chain is folded into the Conv
it quantizes, and MatMul+bias on 2-D activations becomes a Gemm (QGemm in ORT). A tensor
whose quietest calibration sample would drown in the quantization step is left float.
Nodes already behind DequantizeLinear, and QLinear/MatMulNBits/integer ops, are left as
they are. If/Loop/Scan bodies are planned like the main graph. Model-local functions are
inlined first (onnx_ir's InlinePass, as ORT would inline them) so that calibration sees
their tensors; with ``inline_functions=false`` their bodies stay float and are counted in
``fallbacks``.

``promote_nodes`` is the mixed-precision fallback's middle step: the activations those
nodes read and write get int16 Q/DQ (opset 21). A tensor has one Q/DQ pair, so one shared
with an unpromoted node, or a Concat group sharing a scale with a promoted member, is int16
for every consumer. ORT 1.32's CPU provider runs int16 QDQ as float ops between Q/DQ pairs
and loads int16 activations with int8 weights for Conv, MatMul and Gemm. Measured there:
a Conv keeps int8 weights (int16 Conv weights are right without graph optimizations but
wrong with them, 48.6 -> 10.7 dB on PP-OCRv4 det); a MatMul/Gemm gets int16 weights,
because its default session folds an int8 weight DQ into MatMulNBits, whose default
accuracy level 4 requantizes the activation to 8 bits (38.7 -> 11.1 dB in the tests).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from onnxopt import calibration as calib
from onnxopt.errors import UsageError
from onnxopt.graph_walk import all_graphs, all_nodes
from onnxopt.opset import default_opset, min_ir_version, require_opset
from onnxopt.pass_base import Fidelity, Pass, PassResult
from onnxopt.selectors import NameFilter, promote_field, promote_filter, selector_field, selector_from_options

from . import math as qm
from onnxopt.naming import Namer

from .placement import (CORE, Placer, Plan, Unit, add_initializer, add_node, bias_vector,
                            channel_affine, constant_array, drop_if_unused)
from .weights import gather_bits_field, merge_gather_stats, quantize_gather_tables

NAME = "quantize-static"


def _opt(default, help_text):
    return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class QuantizeStaticOptions:
    activation_type: Literal["auto", "uint8", "int8", "int16"] = _opt(
        "auto", "integer type of activations; auto: the target's (uint8 on x86, whose kernels take uint8 and convert "
        "int8 Q/DQ to it; int8 on ARM, which runs s8s8 natively)")
    weight_type: Literal["auto", "int8", "uint8"] = _opt(
        "auto", "integer type of weights (symmetric); auto: int8, except on targets whose u8s8 kernels saturate "
        "(x86 without VNNI: avx2, avx512, generic), where a centred uint8 activation (zero point above 64) gets "
        "uint8 weights (exact u8u8 kernels); int16 for a MatMul/Gemm reading int16 activations (ORT would fold "
        "int8 ones into MatMulNBits, which requantizes the activation to 8 bits by default)")
    reduce_range: bool | None = _opt(None, "7-bit int8 weights, for u8s8 kernels that saturate int16 pair sums "
                                           "(x86 without VNNI); none: the target's choice (false everywhere)")
    per_channel: bool = _opt(True, "one weight scale per output channel (needs opset 13) instead of per tensor")
    symmetric_activations: bool | None = _opt(None, "symmetric activation ranges (zero point 0 for int8/int16); "
                                                    "none: the target's choice (asymmetric)")
    calibration: Literal["minmax", "percentile", "entropy", "mse"] = _opt(
        "minmax", "how activation ranges are chosen from the calibration statistics")
    percentile: float = _opt(99.99, "mass kept by calibration=percentile, in percent")
    pow2: bool = _opt(False, "power-of-two scales 2^-n (fixed-point targets)")
    placement: Literal["ort-cpu", "all"] = _opt(
        "ort-cpu", "ort-cpu: only node units ORT's CPU provider runs on integers; all: every supported op")
    min_reduction: int = _opt(128, "placement=ort-cpu: leave float a Conv/MatMul/Gemm with fewer multiply-adds per "
                                   "output (Cin*kh*kw or K); ORT's int8 kernels lose to float below that")
    min_island: int = _opt(1, "leave float a group of quantized ops joined by shared Q/DQ tensors holding fewer "
                              "than this many Conv/MatMul/Gemm: a lone quantized op between float ops pays for its "
                              "Q/DQ and breaks ORT's float fusions around it (the speed search raises it)")
    min_sqnr_db: float = _opt(20.0, "leave float a node whose activations would keep less than this estimated "
                                    "SQNR (dB) on the quietest calibration sample; 0 disables the check")
    gather_bits: Literal[0, 4, 8] = gather_bits_field()
    quantize_bias: bool = _opt(True, "store Conv/Gemm biases as int32 with scale x_scale*w_scale")
    upgrade_opset: bool = _opt(True, "upgrade the opset when the options need it (per-channel 13, int16 21)")
    bins: int = _opt(calib.DEFAULT_BINS, "histogram bins of percentile/entropy/mse calibration")
    nodes: tuple[str, ...] = selector_field("nodes")
    exclude_nodes: tuple[str, ...] = selector_field("exclude_nodes")
    ops: tuple[str, ...] = selector_field("ops")
    exclude_ops: tuple[str, ...] = selector_field("exclude_ops")
    region: tuple[str, ...] = selector_field("region")
    partition: tuple[str, ...] = selector_field("partition")
    promote_nodes: tuple[str, ...] = promote_field()
    inline_functions: bool = _opt(True, "inline model-local functions first, so their nodes are calibrated and "
                                        "quantized like the main graph's (false: leave function bodies float)")

    def __post_init__(self):
        if not 50 < self.percentile <= 100:
            raise UsageError(f"{NAME}: percentile must be in (50, 100], got {self.percentile}")
        if self.bins < 256:
            raise UsageError(f"{NAME}: bins must be at least 256, got {self.bins}")
        if self.promote_nodes and self.activation_type == "int16":
            raise UsageError(f"{NAME}: promote_nodes has no higher precision to give: activation_type is int16")
        NameFilter(self.promote_nodes)  # a bad regular expression fails here, before any model is read


def weight_axis(node: ir.Node, rank: int) -> int:
    """The output-channel axis of the weight of a Conv, ConvTranspose ([C_in, C_out/group, k...]),
    MatMul or Gemm."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "ConvTranspose":
        return 1
    if node.op_type == "Gemm":
        trans = node.attributes.get("transB")
        return 0 if trans is not None and trans.as_int() else 1
    return rank - 1


def output_channel_scales(node: ir.Node, w_scale: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """A weight's scales by output channel, and the channel count: a grouped ConvTranspose's
    weight holds C_out/group channels, which every group repeats."""
    if node.op_type != "ConvTranspose":
        return w_scale, shape[weight_axis(node, len(shape))]
    group = node.attributes["group"].as_int() if "group" in node.attributes else 1
    return (np.tile(w_scale, group) if np.ndim(w_scale) else w_scale), shape[1] * group


class QuantizeStaticPass(Pass):
    """Calibrated QDQ quantization of activations and weights, placed for ORT's integer kernels."""

    name = NAME
    Options = QuantizeStaticOptions
    fidelity_of = Fidelity.LOSSY
    measures_speed = True

    def target_defaults(self, target) -> dict:
        return target.static_defaults()

    def speed_ladder(self) -> list[tuple[dict, str]]:
        """Fewer, larger quantized islands: each rung leaves float the islands of fewer ops."""
        return [({"min_island": n}, f"min_island={n}") for n in (2, 4, 8) if n > self.options.min_island]

    def promotion_ladder(self) -> list[tuple[dict, str]]:
        """What ``promote_nodes`` can get: int16 activations, unless every activation is int16 already."""
        return [] if self.options.activation_type == "int16" else [({}, "int16 activations")]

    def call(self, model: ir.Model) -> PassResult:
        opts = self.options
        if not self.context.feeds:
            raise UsageError(f"{NAME} needs calibration samples (give --data)")
        inlined = inline_local_functions(model) if opts.inline_functions else 0
        promote = promote_filter(model, opts.promote_nodes, NAME)
        stats = self._statistics(model, inlined)
        result = {"tensors_calibrated": len(stats), "nodes_quantized": 0, "weights_quantized": 0,
                  "biases_quantized": 0, "tensors_quantized": 0, "affine_ops_folded": 0,
                  "ops_quantized": {}, "fallbacks": {}, "promoted_nodes": []}
        if inlined:
            result["functions_inlined"] = inlined
        plans = self._plan(model, stats, result, promote)
        if not any(plan.units for _, plan in plans):
            tables = quantize_gather_tables(model, opts, opts.gather_bits, ops_selector=True)
            merge_gather_stats(result, tables)
            return PassResult(model, bool(inlined or tables), result)
        promoted = any(_promoted_values(plan, promote) for _, plan in plans)
        need = max(13 if opts.per_channel else 10, 21 if opts.activation_type == "int16" or promoted else 10)
        upgraded = require_opset(
            model, need, allow_upgrade=opts.upgrade_opset,
            refusal=f"{NAME}: these options need opset {{needed}} (per-channel weights need 13, int16 activations "
                    f"and promote_nodes 21) and the model has opset {{current}}; allow upgrade_opset=true or use "
                    f"per_channel=false")
        if upgraded:  # the upgrade replaced the graph objects: plan again
            result["opset_upgraded"] = upgraded
            plans = self._plan(model, stats, result, promote)
        result["promoted_nodes"] = sorted({u.node.name for _, plan in plans for u in plan.units
                                           if promote.matches(u.node) and u.node.name})
        # ranges by group, taken before any rewrite renames a tensor
        group_ranges = self._group_ranges(plans, stats, promote)
        namer, weights = Namer(model), {}
        for (graph, plan), graph_ranges in zip(plans, group_ranges):
            _Rewriter(graph, plan, graph_ranges, opts, namer, result, weights, self.target.u8s8_saturates).run()
        merge_gather_stats(result, quantize_gather_tables(model, opts, opts.gather_bits, ops_selector=True))
        model.ir_version = max(model.ir_version, min_ir_version(default_opset(model)))
        return PassResult(model, True, result)

    def _statistics(self, model: ir.Model, inlined: int) -> dict:
        """The core's calibration statistics of ``model`` as it is now (after inlining, whose
        tensors a cached analysis of the model as given would not have)."""
        histogram = self.options.calibration != "minmax"
        bins = self.options.bins if histogram else 0
        key = ("calibration-statistics", histogram, bins) + (("functions-inlined",) if inlined else ())
        return self.context.analysis(
            key, lambda: calib.collect_statistics(model, self.context.feeds, histogram=histogram, bins=self.options.bins,
                                                  progress=self.context.progress))

    def _activation_type(self, wide: bool) -> qm.QuantType:
        return qm.QuantType(16, signed=True) if wide else qm.QuantType.parse(self.options.activation_type)

    def _group_ranges(self, plans: list[tuple[ir.Graph, Plan]], stats: dict, promote: NameFilter) -> list[list]:
        """Per graph, per group: (lo, hi, name for its scale and zero point, activation type); a
        group read or written by a promoted unit is int16, with ranges chosen for int16 levels.
        Promoted groups are not clipped by ``calibration=percentile``: clipping trades outliers
        for resolution, and int16 has resolution to spare; the outliers are what hurt."""
        wide = [[bool(_promoted_values(plan, promote).intersection(g)) for g in plan.groups] for _, plan in plans]
        ranges = {}
        for flag in (False, True):
            names = [v.name for (_, plan), flags in zip(plans, wide) for g, f in zip(plan.groups, flags) if f == flag
                     for v in g]
            method = self.options.calibration
            if flag and method == "percentile" and self.options.activation_type != "int16":
                method = "minmax"
            ranges[flag] = calib.ranges_from_statistics(
                stats, method, tensors=names, percentile=self.options.percentile,
                levels=2 ** self._activation_type(flag).bits, symmetric=self.options.symmetric_activations)
        return [[(min(ranges[f][v.name][0] for v in g if v.name in ranges[f]),
                  max(ranges[f][v.name][1] for v in g if v.name in ranges[f]), g[0].name, self._activation_type(f))
                 for g, f in zip(plan.groups, flags)] for (_, plan), flags in zip(plans, wide)]

    def _plan(self, model: ir.Model, stats: dict, result: dict,
              promote: NameFilter) -> list[tuple[ir.Graph, Plan]]:
        selector = selector_from_options(self.options)
        chosen = None if selector.is_trivial else set(selector.select(model))
        fallbacks: collections.Counter = collections.Counter()
        near_promoted = {v for n in all_nodes(model) if promote.matches(n) for v in (*n.inputs, *n.outputs)}

        left_float = result.setdefault("left_float", {})

        def problem(value: ir.Value) -> str | None:
            if value.dtype is not None and value.dtype != ir.DataType.FLOAT:
                return "not_float32"
            if value.name not in stats:
                return "uncalibrated"
            s = stats[value.name]
            if not s.count or not all(np.isfinite(s.range())):  # statistics keep finite values only
                left_float[value.name] = "no finite value in calibration (all NaN or Inf)"
                return "range_not_finite"
            levels = 2 ** self._activation_type(value in near_promoted).bits
            if self.options.min_sqnr_db > 0 and s.worst_sqnr_db(*s.range(), levels) < self.options.min_sqnr_db:
                return "low_sqnr"
            return None

        plans = []
        for graph in all_graphs(model):
            if not isinstance(graph, ir.Graph):
                fallbacks["in_function"] += sum(1 for n in graph if n.op_type in CORE)
                continue
            nonfinite = _nonfinite_weight_nodes(graph, left_float)
            placer = Placer(graph, problem, lambda n: (chosen is None or n in chosen) and n not in nonfinite,
                            self.options.placement, absorb=not self.options.symmetric_activations,
                            min_reduction=self.options.min_reduction,
                            rank=lambda v: stats[v.name].rank if v.name in stats else None,
                            min_island=self.options.min_island)
            plan = placer.plan()
            fallbacks.update(plan.fallbacks)
            plans.append((graph, plan))
        if nonfinite_total := sum(1 for reason in left_float.values() if reason.startswith("weight")):
            fallbacks["weight_not_finite"] += nonfinite_total
        result["fallbacks"] = dict(fallbacks)
        return plans


def _nonfinite_weight_nodes(graph: ir.Graph, left_float: dict) -> set[ir.Node]:
    """Nodes of ``graph`` whose constant float inputs hold NaN or Inf (named in ``left_float``)."""
    nodes = set()
    for node in graph:
        if node.op_type not in CORE:
            continue
        for value in node.inputs[1:]:
            array = constant_array(value) if value is not None else None
            if array is not None and array.dtype.kind == "f" and not qm.all_finite(array):
                left_float[value.name] = "weight holds NaN or Inf"
                nodes.add(node)
    return nodes


def inline_local_functions(model: ir.Model) -> int:
    """Inline every call of a model-local function (onnx_ir's InlinePass); returns how many calls."""
    if not model.functions:
        return 0
    inlined = InlinePass()(model)
    return sum(inlined.id_count.values())


def _promoted_values(plan: Plan, promote: NameFilter) -> set[ir.Value]:
    """The quantized tensors promoted units read and write."""
    if not promote:
        return set()
    values = set()
    for unit in plan.units:
        if promote.matches(unit.node):
            values.update(unit.node.inputs[i] for i in unit.inputs)
            if unit.quantize_output:
                values.add(unit.output)
    return values


class _Rewriter:
    """Applies one graph's plan: fold BatchNorms, quantize weights and biases, insert Q/DQ."""

    def __init__(self, graph: ir.Graph, plan: Plan, ranges: list, opts: QuantizeStaticOptions, namer: Namer,
                 stats: dict, weights: dict, saturates: bool = True):
        self.graph, self.plan, self.ranges, self.opts, self.namer, self.stats = graph, plan, ranges, opts, namer, stats
        self.saturates = saturates  # the target's u8s8 kernels saturate: centred activations get uint8 weights
        self.ranges = ranges  # per group: (lo, hi, name for its scale and zero point, activation type)
        self.weights = weights  # (weight, axis, type) -> ([q, scale, zero point] initializers, scale array)
        self.alias: dict[ir.Value, ir.Value] = {}
        self.params: dict[int, tuple[ir.Value, ir.Value, np.ndarray]] = {}
        self.group_of: dict[ir.Value, int] = {}

    def run(self) -> None:
        ops = collections.Counter(unit.node.op_type for unit in self.plan.units)
        for unit in self.plan.units:
            if unit.node.op_type == "Conv":
                self._fold_affine(unit)
            elif unit.node.op_type == "MatMul" and unit.tail and unit.tail[0].op_type == "Add":
                self._matmul_add_to_gemm(unit)
        for index, group in enumerate(self.plan.groups):
            for value in group:
                self.group_of[self.alias.get(value, value)] = index
        for unit in self.plan.units:
            self._localize_inputs(unit)
            if unit.weighted:
                self._quantize_weights(unit)
        for index, group in enumerate(self.plan.groups):
            for value in group:
                self._insert_qdq(self.alias.get(value, value), index)
        self.stats["nodes_quantized"] += len(self.plan.units)
        self.stats["quantized_nodes"] = sorted(
            set(self.stats.get("quantized_nodes", [])) | {u.node.name for u in self.plan.units if u.node.name})
        merged = collections.Counter(self.stats["ops_quantized"]) + ops
        self.stats["ops_quantized"] = dict(sorted(merged.items()))

    # -- parameters ---------------------------------------------------------------------------
    def _group_params(self, index: int) -> tuple[ir.Value, ir.Value, np.ndarray]:
        if index not in self.params:
            lo, hi, base, act_type = self.ranges[index]
            scale, zp = qm.scale_zero_point(lo, hi, act_type, self.opts.symmetric_activations, self.opts.pow2)
            self.params[index] = (add_initializer(self.graph, self.namer, f"{base}_scale", scale),
                                  add_initializer(self.graph, self.namer, f"{base}_zero_point", zp), scale)
        return self.params[index]

    def _localize_inputs(self, unit: Unit) -> None:
        """An input an enclosing graph already dequantizes gets a DequantizeLinear of its own in
        this graph: ORT fuses node units graph by graph."""
        for i in unit.inputs:
            producer = unit.node.inputs[i].producer()
            if producer is not None and producer.op_type == "DequantizeLinear" and producer.graph is not self.graph:
                dq = add_node(self.graph, self.namer, "DequantizeLinear", list(producer.inputs),
                              {k: v for k, v in producer.attributes.items()},
                              out=f"{producer.outputs[0].name}_local", before=unit.node)
                dq.dtype, dq.shape = ir.DataType.FLOAT, producer.outputs[0].shape
                unit.node.replace_input_with(i, dq)

    def _input_params(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero point of a unit's activation input (an enclosing graph may have
        quantized it already: then its DequantizeLinear says)."""
        value = node.inputs[0]
        if value in self.group_of:
            scale, zp, _ = self._group_params(self.group_of[value])
        else:
            scale, zp = value.producer().inputs[1], value.producer().inputs[2]
        return scale.const_value.numpy(), zp.const_value.numpy()

    # -- rewrites -----------------------------------------------------------------------------
    def _fold_affine(self, unit: Unit) -> None:
        """Conv(x, W, b) -> BN/Mul/Add chain  ==>  Conv(x, W * k, b * k + c) per output channel."""
        conv = unit.node
        weight = constant_array(conv.inputs[1])
        has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
        bias = constant_array(conv.inputs[2]) if has_bias else np.zeros(weight.shape[0], np.float32)
        if bias is None:
            return  # a run-time bias cannot be folded: leave the chain float
        k, c = np.ones(weight.shape[0]), np.zeros(weight.shape[0])
        folded = []
        while unit.tail and unit.tail[0].op_type in ("BatchNormalization", "Mul", "Add"):
            node = unit.tail.pop(0)
            nk, nc = channel_affine(node, (folded[-1] if folded else conv).outputs[0], weight.shape[0], weight.ndim)
            k, c = k * nk, c * nk + nc
            folded.append(node)
        if not folded:
            return
        new_w = (weight.astype(np.float64) * k.reshape(-1, *[1] * (weight.ndim - 1))).astype(np.float32)
        new_b = (bias.astype(np.float64) * k + c).astype(np.float32)
        base = conv.inputs[1].name or "weight"
        old = [conv.inputs[1], conv.inputs[2] if has_bias else None]
        if not has_bias:
            conv.resize_inputs(3)
        conv.replace_input_with(1, add_initializer(self.graph, self.namer, f"{base}_folded", new_w))
        conv.replace_input_with(2, add_initializer(self.graph, self.namer, f"{base}_folded_bias", new_b))
        out, conv_out = folded[-1].outputs[0], conv.outputs[0]
        name = out.name
        out.replace_all_uses_with(conv_out, replace_graph_outputs=True)
        for node in reversed(folded):
            consts = [v for v in node.inputs if v is not None and constant_array(v) is not None]
            self.graph.remove(node, safe=True)
            old += consts
        for value in old:
            if value is not None:
                drop_if_unused(value)
        conv_out.name = name
        self.alias[out] = conv_out
        self.stats["affine_ops_folded"] += len(folded)

    def _matmul_add_to_gemm(self, unit: Unit) -> None:
        """MatMul(x, W) -> Add(b) on 2-D x  ==>  Gemm(x, W, b): with an int32 bias ORT runs it as
        QGemm, where its own MatMul+Add fusion would leave a float-bias Gemm it cannot quantize."""
        matmul, add = unit.node, unit.tail.pop(0)
        bias = bias_vector(add, matmul.outputs[0], constant_array(matmul.inputs[1]).shape[-1])
        base = matmul.inputs[1].name or "weight"
        gemm = ir.node("Gemm", [matmul.inputs[0], matmul.inputs[1],
                                add_initializer(self.graph, self.namer, f"{base}_bias", bias)],
                       name=matmul.name or self.namer.fresh(f"{base}_Gemm"))
        self.graph.insert_before(matmul, gemm)
        out, name = add.outputs[0], add.outputs[0].name
        consts = [v for v in add.inputs if v is not None and constant_array(v) is not None]
        out.replace_all_uses_with(gemm.outputs[0], replace_graph_outputs=True)
        self.graph.remove([add, matmul], safe=True)
        for value in consts:
            drop_if_unused(value)
        gemm.outputs[0].name, gemm.outputs[0].dtype = name, ir.DataType.FLOAT
        self.alias[out] = gemm.outputs[0]
        unit.node = gemm
        self.stats["matmul_adds_to_gemm"] = self.stats.get("matmul_adds_to_gemm", 0) + 1

    def _quantize_weights(self, unit: Unit) -> None:
        """Weight -> DequantizeLinear(int weight); a weight shared by several nodes is stored once,
        in the graph that holds it."""
        node = unit.node
        weight = node.inputs[1]
        w = constant_array(weight).astype(np.float32)
        axis = weight_axis(node, w.ndim) if self.opts.per_channel else None
        wtype = self._weight_type(node)
        key = (weight, axis, wtype)
        if key not in self.weights:
            lo, hi, _ = qm.weight_ranges(w, axis)
            if self.opts.reduce_range and wtype.signed:
                lo, hi = 2 * lo, 2 * hi  # |q| <= 64: u8 * s8 pair sums stay within int16
            w_scale, w_zp = qm.scale_zero_point(lo, hi, wtype, symmetric=True, pow2=self.opts.pow2)
            q = qm.quantize(w, w_scale, w_zp, wtype, axis)
            producer = weight.producer()
            owner = producer.graph if producer is not None else (weight.graph or self.graph)
            base = weight.name or "weight"
            self.weights[key] = ([add_initializer(owner, self.namer, f"{base}_quantized", q),
                                  add_initializer(owner, self.namer, f"{base}_scale", w_scale),
                                  add_initializer(owner, self.namer, f"{base}_zero_point", w_zp)], w_scale)
            self.stats["weights_quantized"] += 1
            types = self.stats.setdefault("weight_types", {})
            types[wtype.name] = types.get(wtype.name, 0) + 1
        inputs, w_scale = self.weights[key]
        attrs = {} if axis is None else {"axis": axis}
        dq = add_node(self.graph, self.namer, "DequantizeLinear", inputs, attrs,
                      out=f"{weight.name or 'weight'}_dequantized", before=node)
        dq.dtype, dq.shape = ir.DataType.FLOAT, ir.Shape(w.shape)
        node.replace_input_with(1, dq)
        drop_if_unused(weight)
        if node.op_type in ("Conv", "ConvTranspose", "Gemm") and len(node.inputs) > 2 and self.opts.quantize_bias:
            self._quantize_bias(unit, *output_channel_scales(node, w_scale, w.shape))

    def _weight_type(self, node: ir.Node) -> qm.QuantType:
        if self.opts.weight_type != "auto":
            return qm.QuantType.parse(self.opts.weight_type)
        zero_point = self._input_params(node)[1]
        if zero_point.dtype == np.int16 and node.op_type in ("MatMul", "Gemm"):
            return qm.QuantType(16)  # int8 would let ORT fold it into MatMulNBits, which requantizes x to 8 bits
        centred = zero_point.dtype == np.uint8 and int(zero_point) > 64
        return qm.QuantType(8, signed=not (centred and self.saturates))

    def _quantize_bias(self, unit: Unit, w_scale: np.ndarray, n: int) -> None:
        node = unit.node
        bias = node.inputs[2]
        b = constant_array(bias)
        if b is None or b.dtype != np.float32:
            return
        if node.op_type == "Gemm":
            beta = node.attributes.get("beta")
            alpha = node.attributes.get("alpha")
            if (beta is not None and beta.as_float() != 1.0) or (alpha is not None and alpha.as_float() != 1.0):
                return
            if b.size == 1 or b.shape in ((n,), (1, n)):
                b = np.broadcast_to(b.reshape(-1), (n,))
            else:
                return
        x_scale = self._input_params(node)[0]
        b_scale = (np.float32(x_scale) * w_scale).astype(np.float32)
        q = np.rint(b.astype(np.float64) / b_scale.astype(np.float64))
        if np.abs(q).max(initial=0) >= 2**31 - 1:
            self.stats["fallbacks"]["bias_overflow"] = self.stats["fallbacks"].get("bias_overflow", 0) + 1
            return
        base = bias.name or "bias"
        inputs = [add_initializer(self.graph, self.namer, f"{base}_quantized", q.astype(np.int32)),
                  add_initializer(self.graph, self.namer, f"{base}_scale", b_scale)]
        attrs = {"axis": 0} if np.ndim(b_scale) == 1 else {}
        dq = add_node(self.graph, self.namer, "DequantizeLinear", inputs, attrs, out=f"{base}_dequantized",
                      before=node)
        dq.dtype, dq.shape = ir.DataType.FLOAT, ir.Shape(b.shape)
        node.replace_input_with(2, dq)
        drop_if_unused(bias)
        self.stats["biases_quantized"] += 1

    def _insert_qdq(self, value: ir.Value, index: int) -> None:
        scale, zp, _ = self._group_params(index)
        producer = value.producer()
        after = producer if producer is not None and producer.graph is self.graph else None
        original = self.plan.groups[index]
        fused = value in self.plan.fused or any(self.alias.get(v) is value for v in self.plan.fused
                                                if v in original)
        if fused:
            name = value.name
            value.name = self.namer.fresh(f"{name}_float")
            dq_node = ir.node("DequantizeLinear", [None, scale, zp], name=self.namer.fresh(f"{name}_DequantizeLinear"))
            dq = dq_node.outputs[0]
            value.replace_all_uses_with(dq, replace_graph_outputs=True)
            dq.name = name
            q = add_node(self.graph, self.namer, "QuantizeLinear", [value, scale, zp], out=f"{name}_quantized",
                         after=after)
            dq_node.replace_input_with(0, q)
            self.graph.insert_after(q.producer(), dq_node)
        else:  # only the quantized consumers read the DQ (an outer graph may already have quantized it)
            readers = [(u.node, i) for u in self.plan.units for i in u.inputs if u.node.inputs[i] is value]
            if not readers:
                return
            q = add_node(self.graph, self.namer, "QuantizeLinear", [value, scale, zp],
                         out=f"{value.name}_quantized", after=after)
            dq = add_node(self.graph, self.namer, "DequantizeLinear", [q, scale, zp],
                          out=f"{value.name}_dequantized", after=q.producer())
            for node, i in readers:
                node.replace_input_with(i, dq)
        q.dtype, q.shape = self.ranges[index][3].ir_dtype, value.shape
        dq.dtype, dq.shape = ir.DataType.FLOAT, value.shape
        self.stats["tensors_quantized"] += 1
