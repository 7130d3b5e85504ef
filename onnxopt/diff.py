"""`onnxopt diff`: how two models differ in structure and, optionally, tensor by tensor.

Nodes are matched by name (same op type), then by structure where names differ: same
domain and op type, and inputs that are matched values or constants with the same content
(hash of dtype, shape and bytes). Identity nodes one side dropped pass their input on. The
tensor comparison pairs every main-graph value present in both models (by name, else
through the node matching), streams them through ORT a bounded chunk at a time
(``tensor_capture``), walks them in A's topological order and names the first node whose
output diverges beyond tolerance.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .metrics import Tolerance
from .model_stats import model_stats, op_delta, op_key
from .tensor_capture import comparable_names, compare_tensors

_LIST_LIMIT = 50


def _initializer_table(model: ir.Model) -> dict[str, tuple[str, tuple]]:
    return {name: (v.const_value.dtype.name if v.const_value is not None else "?",
                   tuple(v.const_value.shape) if v.const_value is not None else ())
            for name, v in model.graph.initializers.items()}


def _signature(values) -> list[tuple[str, str, str]]:
    return [(v.name, v.dtype.name if v.dtype else "?", str(v.shape)) for v in values]


def tensor_hash(tensor) -> str:
    """Content hash of a tensor: dtype, shape and bytes."""
    digest = hashlib.blake2b(digest_size=12)
    digest.update(f"{tensor.dtype.name}{tuple(tensor.shape)}".encode())
    digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    return digest.hexdigest()


def _constant_hash(value: ir.Value, cache: dict[int, str | None]) -> str | None:
    """Content hash of an initializer or Constant-node output; None for run-time values."""
    key = id(value)
    if key not in cache:
        tensor = value.const_value
        producer = value.producer()
        if tensor is None and producer is not None and producer.op_type == "Constant" and producer.domain == "":
            attr = producer.attributes.get("value")
            tensor = attr.value if attr is not None and attr.type == ir.AttributeType.TENSOR else None
        cache[key] = tensor_hash(tensor) if tensor is not None else None
    return cache[key]


def _attr_text(node: ir.Node) -> dict[str, str]:
    texts = {}
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.GRAPH:
            texts[name] = f"graph of {len(list(attr.as_graph()))} nodes"
        elif attr.type == ir.AttributeType.TENSOR:
            texts[name] = tensor_hash(attr.value)
        else:
            texts[name] = repr(attr.value)
    return texts


@dataclass
class Matching:
    """Which node of B stands for each node of A, and which value of B for each value of A."""

    nodes: list[tuple[ir.Node, ir.Node, str]] = field(default_factory=list)  # (a, b, "name" | "structure")
    values: dict[int, ir.Value] = field(default_factory=dict)  # id(value of A) -> value of B
    unmatched_a: list[ir.Node] = field(default_factory=list)
    unmatched_b: list[ir.Node] = field(default_factory=list)


def _through_identity(value: ir.Value) -> ir.Value:
    while value is not None and value.producer() is not None and value.producer().op_type == "Identity" \
            and value.producer().domain == "" and value.producer().inputs:
        value = value.producer().inputs[0]
    return value


def match_nodes(a: ir.Model, b: ir.Model) -> Matching:
    """Match the main-graph nodes of A to those of B, walking A in topological order."""
    m = Matching()
    hashes: dict[int, str | None] = {}
    inputs_b = {v.name: v for v in b.graph.inputs}
    for value in a.graph.inputs:
        if value.name in inputs_b:
            m.values[id(value)] = inputs_b[value.name]

    def token_b(value):
        if value is None:
            return ("none",)
        value = _through_identity(value)
        h = _constant_hash(value, hashes)
        return ("const", h) if h is not None else ("value", id(value))

    values_b = {o.name: o for n in b.graph for o in n.outputs if o.name}
    values_b.update(inputs_b)

    def token_a(value):
        if value is None:
            return ("none",)
        h = _constant_hash(value, hashes)
        if h is not None:
            return ("const", h)
        mapped = m.values.get(id(value))
        if mapped is None and value.name in values_b:  # a node B fused away kept its output's name
            mapped = m.values[id(value)] = values_b[value.name]
        return ("value", id(_through_identity(mapped))) if mapped is not None else None

    def loose(tokens):  # run-time inputs only: a fold may rewrite a weight or add a bias
        return tuple(t for t in tokens if t[0] == "value")

    by_name: dict[str, list[ir.Node]] = defaultdict(list)
    by_key: dict[tuple, list[ir.Node]] = defaultdict(list)
    by_loose_key: dict[tuple, list[ir.Node]] = defaultdict(list)
    for node in b.graph:
        if node.name:
            by_name[node.name].append(node)
        if node.op_type == "Constant":
            by_key[("const", _constant_hash(node.outputs[0], hashes))].append(node)
        else:
            tokens = tuple(token_b(v) for v in node.inputs)
            by_key[(node.domain, node.op_type, tokens)].append(node)
            by_loose_key[(node.domain, node.op_type, loose(tokens))].append(node)
    used: set[int] = set()

    def take(candidates: list[ir.Node]) -> ir.Node | None:
        for node in candidates:
            if id(node) not in used:
                used.add(id(node))
                return node
        return None

    for node in a.graph:
        found = take([n for n in by_name.get(node.name, ()) if n.op_type == node.op_type]) if node.name else None
        how = "name"
        if found is None:
            how = "structure"
            if node.op_type == "Constant":
                key = ("const", _constant_hash(node.outputs[0], hashes))
            else:
                tokens = tuple(token_a(v) for v in node.inputs)
                key = None if None in tokens else (node.domain, node.op_type, tokens)
            found = take(by_key.get(key, [])) if key is not None else None
            if found is None and key is not None and node.op_type != "Constant" and \
                    any(t[0] == "value" for t in tokens):
                found = take(by_loose_key.get((node.domain, node.op_type, loose(tokens)), []))
        if found is None:
            m.unmatched_a.append(node)
            if node.op_type == "Identity" and node.inputs and id(node.inputs[0]) in m.values:
                m.values[id(node.outputs[0])] = m.values[id(node.inputs[0])]  # B dropped it: an alias
            continue
        m.nodes.append((node, found, how))
        for out_a, out_b in zip(node.outputs, found.outputs):
            m.values[id(out_a)] = out_b
    m.unmatched_b = [n for n in b.graph if id(n) not in used]
    return m


def _label(node: ir.Node, index: int) -> str:
    return node.name or f"{op_key(node)}#{index}"


def _initializer_diff(a: ir.Model, b: ir.Model) -> dict:
    inits_a, inits_b = _initializer_table(a), _initializer_table(b)
    common = inits_a.keys() & inits_b.keys()
    changed = sorted(n for n in common if inits_a[n] != inits_b[n])
    hash_a = {n: tensor_hash(v.const_value) for n, v in a.graph.initializers.items() if v.const_value is not None}
    hash_b = {n: tensor_hash(v.const_value) for n, v in b.graph.initializers.items() if v.const_value is not None}
    values_changed = sorted(n for n in common if n not in changed and hash_a.get(n) != hash_b.get(n))
    only_a, only_b = sorted(inits_a.keys() - inits_b.keys()), sorted(inits_b.keys() - inits_a.keys())
    owners_b: dict[str, list[str]] = defaultdict(list)
    for n in only_b:
        owners_b[hash_b.get(n, "")].append(n)
    renamed = []
    for n in only_a:
        candidates = owners_b.get(hash_a.get(n, "?"))
        if candidates:
            renamed.append([n, candidates.pop(0)])
    moved = {x for pair in renamed for x in pair}
    constants_a, constants_b = _constant_node_hashes(a), _constant_node_hashes(b)
    lifted = [n for n in only_b if n not in moved and hash_b.get(n) in constants_a]
    inlined = [n for n in only_a if n not in moved and hash_a.get(n) in constants_b]
    moved.update(lifted, inlined)
    return {"initializers_removed": [n for n in only_a if n not in moved],
            "initializers_added": [n for n in only_b if n not in moved],
            "constants_lifted": lifted, "initializers_inlined": inlined,
            "initializers_changed": changed, "initializers_values_changed": values_changed,
            "initializers_renamed": renamed}


def _constant_node_hashes(model: ir.Model) -> set[str]:
    found = set()
    for node in model.graph:
        attr = node.attributes.get("value") if node.op_type == "Constant" and node.domain == "" else None
        if attr is not None and attr.type == ir.AttributeType.TENSOR:
            found.add(tensor_hash(attr.value))
    return found


def structural_diff(a: ir.Model, b: ir.Model, matching: Matching | None = None) -> dict:
    stats_a, stats_b = model_stats(a), model_stats(b)
    matching = matching or match_nodes(a, b)
    index_a = {id(n): i for i, n in enumerate(a.graph)}
    index_b = {id(n): i for i, n in enumerate(b.graph)}
    renamed, changed = [], []
    for node_a, node_b, how in matching.nodes:
        if how == "structure" and node_a.name != node_b.name:
            renamed.append([_label(node_a, index_a[id(node_a)]), _label(node_b, index_b[id(node_b)])])
        attrs_a, attrs_b = _attr_text(node_a), _attr_text(node_b)
        if attrs_a != attrs_b:
            keys = sorted(k for k in attrs_a.keys() | attrs_b.keys() if attrs_a.get(k) != attrs_b.get(k))
            changed.append({"node": _label(node_a, index_a[id(node_a)]), "attributes": keys})
    sig = {"inputs": [_signature(a.graph.inputs), _signature(b.graph.inputs)],
           "outputs": [_signature(a.graph.outputs), _signature(b.graph.outputs)]}
    return {
        "nodes": [stats_a.nodes, stats_b.nodes],
        "initializer_bytes": [stats_a.initializer_bytes + stats_a.constant_bytes,
                              stats_b.initializer_bytes + stats_b.constant_bytes],
        "op_histogram": [stats_a.ops, stats_b.ops],
        "op_delta": op_delta(stats_a, stats_b),
        "opsets": [dict(a.opset_imports), dict(b.opset_imports)] if a.opset_imports != b.opset_imports else None,
        "io_signature": sig,
        "inputs_changed": sig["inputs"][0] != sig["inputs"][1],
        "outputs_changed": sig["outputs"][0] != sig["outputs"][1],
        **_initializer_diff(a, b),
        "nodes_matched": dict(Counter(how for _, _, how in matching.nodes)),
        "nodes_renamed": renamed[:_LIST_LIMIT],
        "nodes_changed": changed[:_LIST_LIMIT],
        "constant_nodes": [sum(n.op_type == "Constant" for n in a.graph), sum(n.op_type == "Constant" for n in b.graph)],
        "nodes_removed": [_label(n, index_a[id(n)]) for n in matching.unmatched_a if n.op_type != "Constant"][:_LIST_LIMIT],
        "nodes_added": [_label(n, index_b[id(n)]) for n in matching.unmatched_b if n.op_type != "Constant"][:_LIST_LIMIT],
    }


def structurally_equal(structure: dict) -> bool:
    """True when the structural diff found no difference at all."""
    keys = ("op_delta", "opsets", "inputs_changed", "outputs_changed", "initializers_removed", "initializers_added",
            "initializers_changed", "initializers_values_changed", "initializers_renamed", "constants_lifted",
            "initializers_inlined", "nodes_renamed",
            "nodes_changed", "nodes_removed", "nodes_added")
    return not any(structure.get(k) for k in keys)


def tensor_pairs(a: ir.Model, b: ir.Model, matching: Matching) -> list[tuple[str, str, ir.Node, int]]:
    """(name in A, name in B, A's producer, A's topological index) for every comparable tensor."""
    names_a, _ = comparable_names(a)
    names_b, _ = comparable_names(b)
    wanted_a, known_b = set(names_a), set(names_b)
    all_a = {o.name for n in a.graph for o in n.outputs} | {v.name for v in a.graph.inputs}
    pairs, seen_b = [], set()
    for index, node in enumerate(a.graph):
        for out in node.outputs:
            if out.name not in wanted_a:
                continue
            partner = out.name if out.name in known_b else None
            if partner is None and id(out) in matching.values:
                mapped = matching.values[id(out)].name
                # B's value under a name A gives another tensor is a fusion's output (Conv+BN): not comparable
                partner = mapped if mapped in known_b and mapped not in all_a and mapped not in seen_b else None
            if partner is not None:
                pairs.append((out.name, partner, node, index))
                seen_b.add(partner)
    return pairs


def tensor_diff(a: ir.Model, b: ir.Model, feeds: list[dict[str, np.ndarray]],
                tolerance: Tolerance | None = None, progress=None, matching: Matching | None = None,
                memory_budget_mb: float = 256) -> dict:
    """Per-tensor comparison in A's topological order; ``first_divergence`` is the first beyond tolerance."""
    tolerance = tolerance or Tolerance()
    matching = matching or match_nodes(a, b)
    pairs = tensor_pairs(a, b, matching)
    stats = compare_tensors(a, b, [(p[0], p[1]) for p in pairs], feeds, tolerance,
                            memory_budget_mb=memory_budget_mb, progress=progress)
    rows, first = [], None
    for name_a, name_b, node, index in pairs:
        errors = stats[name_a]
        row = {"index": index, "tensor": name_a, "node": node.name or f"{op_key(node)}#{index}", "op": node.op_type,
               "equal": errors.equal, "exact": errors.exact, **errors.metrics()}
        if name_b != name_a:
            row["tensor_b"] = name_b
        rows.append(row)
        if not errors.equal and first is None:
            first = row
    return {"compared": len(rows), "samples": len(feeds), "tolerance": {"rtol": tolerance.rtol, "atol": tolerance.atol},
            "first_divergence": first, "diverged": sum(1 for r in rows if not r["equal"]),
            "worst": sorted((r for r in rows if not r["equal"]), key=_sort_key)[:20], "rows": rows}


def _sort_key(row: dict) -> float:
    snr = row.get("snr_db")
    return float(snr) if isinstance(snr, (int, float)) else float("inf")


def render_diff(result: dict, console=None) -> None:
    """The human summary: structure lines, then the first divergence and the worst tensors."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=130)
    s = result["structure"]
    out = lambda text: console.print(text, markup=False, highlight=False)  # noqa: E731 - model strings are data
    out(f"nodes {s['nodes'][0]} -> {s['nodes'][1]}, weights {s['initializer_bytes'][0]:,} -> "
        f"{s['initializer_bytes'][1]:,} bytes; matched {s['nodes_matched'].get('name', 0)} by name, "
        f"{s['nodes_matched'].get('structure', 0)} by structure")
    if structurally_equal(s):
        out("structure: no differences")
    if s["op_delta"]:
        out("ops: " + ", ".join(f"{op} {n:+d}" for op, n in s["op_delta"].items()))
    if s["opsets"]:
        out(f"opsets: {s['opsets'][0]} -> {s['opsets'][1]}")
    for key in ("inputs", "outputs"):
        if s[f"{key}_changed"]:
            out(f"{key} changed: {s['io_signature'][key][0]} -> {s['io_signature'][key][1]}")
    for key in ("initializers_removed", "initializers_added", "initializers_changed", "initializers_values_changed",
                "initializers_renamed", "constants_lifted", "initializers_inlined", "nodes_removed", "nodes_added",
                "nodes_renamed", "nodes_changed"):
        items = s[key]
        if items:
            shown = [" -> ".join(i) if isinstance(i, list) else (f"{i['node']} ({', '.join(i['attributes'])})"
                     if isinstance(i, dict) else i) for i in items[:10]]
            out(f"{key.replace('_', ' ')} ({len(items)}{'+' if len(items) >= _LIST_LIMIT else ''}): "
                f"{', '.join(shown)}{' ...' if len(items) > 10 else ''}")
    if "tensors" not in result:
        return
    t = result["tensors"]
    first = t["first_divergence"]
    out(f"tensors compared: {t['compared']} on {t['samples']} samples, {t['diverged']} beyond tolerance "
        f"(rtol {t['tolerance']['rtol']:g}, atol {t['tolerance']['atol']:g})")
    if not first:
        out("no tensor diverges beyond tolerance")
        return
    out(f"first divergence: '{first['tensor']}' from {first['op']} node '{first['node']}' "
        f"(max_abs {first['max_abs']:.3g}, cosine {first['cosine']:.6f}, snr {first['snr_db']:.1f} dB)")
    table = Table(title="worst tensors (lowest SNR)", title_justify="left")
    for column in ("#", "tensor", "op", "max_abs", "cosine", "snr_db"):
        table.add_column(column, justify="right" if column in ("#", "max_abs", "cosine", "snr_db") else "left")
    for row in t["worst"][:10]:
        table.add_row(str(row["index"]), _escape(row["tensor"]), row["op"], f"{row['max_abs']:.3g}",
                      f"{row['cosine']:.6f}", f"{row['snr_db']:.1f}")
    console.print(table)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
