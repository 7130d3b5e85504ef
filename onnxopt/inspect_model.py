"""`onnxopt inspect`: what a model is made of, without running it."""

from __future__ import annotations

from collections import Counter, defaultdict

import onnx_ir as ir

from .graph_walk import all_graphs, all_nodes
from .model_stats import op_key


def _shape_text(value: ir.Value) -> list | None:
    if value.shape is None:
        return None
    return [d if isinstance(d, int) else (str(d.value) if d.value else "?") for d in value.shape]


def _io(values) -> list[dict]:
    return [{"name": v.name, "dtype": v.dtype.name if v.dtype is not None else None, "shape": _shape_text(v)}
            for v in values]


def inspect_model(model: ir.Model) -> dict:
    params_by_dtype: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "elements": 0, "bytes": 0})
    external = []
    consumers: dict[str, int] = {}
    for graph in all_graphs(model):
        for value in getattr(graph, "initializers", {}).values():
            tensor = value.const_value
            if tensor is None:
                continue
            _count(params_by_dtype, tensor)
            if isinstance(tensor, ir.ExternalTensor):
                external.append({"tensor": value.name, "location": tensor.location, "bytes": tensor.nbytes})
            users = {id(node) for node, _ in value.uses()}
            if len(users) > 1:
                consumers[value.name] = len(users)
    for node in all_nodes(model):
        if node.op_type == "Constant" and node.domain == "":
            for attr in node.attributes.values():
                if attr.type == ir.AttributeType.TENSOR:
                    _count(params_by_dtype, attr.value)
    ops = Counter(op_key(n) for n in all_nodes(model))
    subgraphs = []
    for node in all_nodes(model):
        for attr in node.attributes.values():
            if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
                graphs = [attr.as_graph()] if attr.type == ir.AttributeType.GRAPH else list(attr.as_graphs())
                for sub in graphs:
                    subgraphs.append({"node": node.name, "op": node.op_type, "attribute": attr.name,
                                      "nodes": len(list(ir.traversal.RecursiveGraphIterator(sub)))})
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "inputs": _io(v for v in model.graph.inputs if v.name not in model.graph.initializers),
        "outputs": _io(model.graph.outputs),
        "nodes": sum(ops.values()),
        "ops": dict(ops.most_common()),
        "parameters": sum(v["elements"] for v in params_by_dtype.values()),
        "parameter_bytes": sum(v["bytes"] for v in params_by_dtype.values()),
        "parameters_by_dtype": dict(params_by_dtype),
        "shared_initializers": dict(sorted(consumers.items(), key=lambda kv: -kv[1])),
        "subgraphs": subgraphs,
        "functions": [f"{f.domain}::{f.name}" for f in model.functions.values()],
        "external_data": external,
    }


def _count(table, tensor) -> None:
    row = table[tensor.dtype.name]
    row["tensors"] += 1
    row["elements"] += tensor.size
    row["bytes"] += tensor.nbytes


def render_inspection(info: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.print(f"IR {info['ir_version']}  opsets {info['opsets']}  producer {info['producer'] or '-'}")
    io = Table(title="inputs / outputs")
    for column in ("kind", "name", "dtype", "shape"):
        io.add_column(column)
    for kind in ("inputs", "outputs"):
        for item in info[kind]:
            io.add_row(kind[:-1], item["name"], str(item["dtype"]), str(item["shape"]))
    console.print(io)
    params = Table(title=f"parameters: {info['parameters']:,} ({info['parameter_bytes']:,} bytes)")
    for column in ("dtype", "tensors", "elements", "bytes"):
        params.add_column(column)
    for dtype, row in info["parameters_by_dtype"].items():
        params.add_row(dtype, str(row["tensors"]), f"{row['elements']:,}", f"{row['bytes']:,}")
    console.print(params)
    console.print(f"nodes: {info['nodes']}  " + ", ".join(f"{k}×{v}" for k, v in list(info["ops"].items())[:25]))
    if info["shared_initializers"]:
        console.print("shared initializers: " + ", ".join(f"{k} ({v} users)" for k, v in info["shared_initializers"].items()))
    for sub in info["subgraphs"]:
        console.print(f"subgraph: {sub['op']} '{sub['node']}'.{sub['attribute']} with {sub['nodes']} nodes")
    if info["functions"]:
        console.print("functions: " + ", ".join(info["functions"]))
    for item in info["external_data"]:
        console.print(f"external: {item['tensor']} in {item['location']} ({item['bytes']:,} bytes)")
