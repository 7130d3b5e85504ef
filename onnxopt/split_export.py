"""Stage models from a partition-marked model, and the manifest that wires them.

Each stage is a standalone model: its nodes (in graph order), copies of the Constant nodes
and initializers it reads, graph inputs for every tensor it takes from the model's inputs or
an earlier stage, and graph outputs for every tensor a later stage or the model's outputs
need. A node with If/Loop/Scan bodies stays whole; the outer-scope values its bodies capture
become inputs of its stage. Marks must follow dependencies (a stage reads only earlier stages).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from .errors import InputError, UsageError
from .split_marks import is_free_constant, partition_of, stage_assignment

MANIFEST_FORMAT = "onnxopt-split"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass
class StagePlan:
    index: int
    partition: str
    nodes: list[ir.Node] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class SplitPlan:
    stages: list[StagePlan]
    model_inputs: list[str]
    model_outputs: list[str]
    producer: dict[str, int | str]  # tensor -> stage index, or "input"
    consumers: dict[str, list[int]]

    def wiring(self) -> list[dict]:
        """Every tensor that crosses a stage boundary or is model IO: where it comes from and goes."""
        names = [n for n in self.model_inputs]
        for stage in self.stages:
            names += [n for n in stage.outputs if n not in names]
        return [{"name": n, "from": self.producer[n], "to": self.consumers.get(n, []),
                 "model_input": n in self.model_inputs, "model_output": n in self.model_outputs} for n in names]


def _main_values(model: ir.Model):
    inputs = set(model.graph.inputs)
    initializers = set(model.graph.initializers.values())
    return inputs, initializers


def _reads(node: ir.Node, main: ir.Graph):
    """Main-graph values a node reads, directly or captured by its bodies."""
    from .graph_walk import node_subgraphs

    for value in node.inputs:
        if value is not None:
            yield value
    for body in node_subgraphs(node):
        for inner in body:
            for value in _reads(inner, main):
                producer = value.producer()
                if producer is not None and producer.graph is main:
                    yield value
                elif producer is None and _owned_by(value, main):
                    yield value


def _owned_by(value: ir.Value, graph: ir.Graph) -> bool:
    return value in graph.inputs or graph.initializers.get(value.name) is value


def plan_split(model: ir.Model) -> SplitPlan:
    """The stages described by the model's partition marks, with every tensor's wiring."""
    assignment = stage_assignment(model)
    graph = model.graph
    inputs, initializers = _main_values(model)
    units = [n for n in graph if not is_free_constant(n)]
    count = max((assignment[n] for n in units), default=-1) + 1
    if count == 0:
        raise UsageError("the model has no node to split")
    empty = sorted(set(range(count)) - {assignment[n] for n in units})
    if empty or min(assignment[n] for n in units) < 0:
        raise UsageError(f"partition marks leave stage {empty[0] if empty else -1} empty; stages must be 0..{count - 1}")
    stages = [StagePlan(k, "") for k in range(count)]
    for node in units:
        stage = stages[assignment[node]]
        stage.nodes.append(node)
        stage.partition = stage.partition or partition_of(node) or f"stage{stage.index}"
    producer: dict[str, int | str] = {v.name: "input" for v in graph.inputs if v not in initializers}
    consumers: dict[str, list[int]] = {}
    outputs = [v.name for v in graph.outputs]
    for output in graph.outputs:
        source = output.producer()
        if source is None and output not in inputs:
            raise UsageError(f"model output {output.name!r} is a constant; there is no stage to compute it")
        if source is not None and is_free_constant(source):
            raise UsageError(f"model output {output.name!r} comes from a Constant node; there is no stage to compute it")
    for unit in units:
        for out in unit.outputs:
            producer[out.name] = assignment[unit]
    for stage in stages:
        needed_constants: list[ir.Node] = []
        for node in stage.nodes:
            for value in _reads(node, graph):
                if value in initializers:
                    continue
                source = value.producer()
                if source is not None and is_free_constant(source):
                    if source not in needed_constants:
                        needed_constants.append(source)
                    continue
                origin = producer.get(value.name)
                if origin is None:
                    raise InputError(f"tensor {value.name!r} read by node {node.name!r} has no producer in the main graph")
                if origin == stage.index:
                    continue
                if origin != "input" and origin > stage.index:
                    raise UsageError(f"partition marks are not in dependency order: stage {stage.index} reads "
                                     f"{value.name!r} from stage {origin}")
                if value.name not in stage.inputs:
                    stage.inputs.append(value.name)
                users = consumers.setdefault(value.name, [])
                if stage.index not in users:
                    users.append(stage.index)
        order = {n: i for i, n in enumerate(graph)}
        stage.nodes = sorted(stage.nodes + needed_constants, key=order.__getitem__)
    for stage in stages:
        produced = {out.name for node in stage.nodes if not is_free_constant(node) for out in node.outputs}
        for name in list(consumers) + outputs:
            if name in produced and name not in stage.outputs and (name in outputs or
                                                                    any(k > stage.index for k in consumers[name])):
                stage.outputs.append(name)
    for name in outputs:
        if producer.get(name) == "input":
            consumers.setdefault(name, [])
    model_inputs = [v.name for v in graph.inputs if v not in initializers]
    return SplitPlan(stages, model_inputs, outputs, producer, consumers)


def stage_model(model: ir.Model, plan: SplitPlan, stage: StagePlan,
                types: dict[str, tuple[ir.TypeProtocol | None, ir.Shape | None]]) -> ir.Model:
    """A standalone model holding ``stage``: a clone of ``model`` cut down to the stage's nodes."""
    clone = model.clone()
    by_position = dict(zip(model.graph, clone.graph))
    keep = {by_position[n] for n in stage.nodes}
    values = {v.name: v for v in clone.graph.inputs}
    for node in clone.graph:
        for out in node.outputs:
            values[out.name] = out
    new_inputs = []
    for name in stage.inputs:
        old = values[name]
        if old.producer() is None:  # a model input: keep the value itself
            new_inputs.append(old)
            continue
        value_type, shape = types.get(name, (old.type, old.shape))
        fresh = ir.Value(name=name, type=value_type, shape=shape)
        old.replace_all_uses_with(fresh)
        old.name = f"{name}__onnxopt_cut"
        new_inputs.append(fresh)
    outputs = []
    for name in stage.outputs:
        value = values[name]
        if value.type is None and name in types:
            value.type, value.shape = types[name]
        outputs.append(value)
    clone.graph.outputs.clear()
    clone.graph.outputs.extend(outputs)
    clone.graph.inputs.clear()
    clone.graph.inputs.extend(new_inputs)
    drop = [n for n in clone.graph if n not in keep]
    for node in drop:  # detach first, bodies included: safe removal does not see uses from inside bodies
        _detach(node)
    clone.graph.remove(drop, safe=False)
    for name, value in list(clone.graph.initializers.items()):
        if not value.uses() and not value.is_graph_output():
            del clone.graph.initializers[name]
    clone.graph.name = f"{model.graph.name or 'model'}_stage{stage.index}"
    clone.metadata_props["onnxopt.split.stage"] = str(stage.index)
    clone.metadata_props["onnxopt.split.partition"] = stage.partition
    return clone


def _detach(node: ir.Node) -> None:
    from .graph_walk import node_subgraphs

    for body in node_subgraphs(node):
        for inner in body:
            _detach(inner)
    for index in range(len(node.inputs)):
        node.replace_input_with(index, None)


def value_types(model: ir.Model, shapes: dict[str, tuple[tuple[int, ...], np.dtype]] | None) -> dict:
    """name -> (type, shape) for main-graph tensors: onnx shape inference where it agrees with what
    ORT measured (``shapes``), the measured dtype with an unknown shape otherwise."""
    proto = ir.to_proto(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    except Exception:  # inference is a convenience here; ORT's measurement decides
        inferred = proto
    declared = {vi.name: vi for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                + list(inferred.graph.input)}
    result = {}
    names = {out.name for node in model.graph for out in node.outputs} | {v.name for v in model.graph.inputs}
    for name in names:
        measured = (shapes or {}).get(name)
        info = declared.get(name)
        graph_input = next((v for v in model.graph.inputs if v.name == name), None)
        if graph_input is not None and graph_input.type is not None:
            result[name] = (graph_input.type, graph_input.shape)
            continue
        value_type, shape = None, None
        if info is not None and info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            tensor_type = info.type.tensor_type
            value_type = ir.TensorType(ir.DataType(tensor_type.elem_type))
            if tensor_type.HasField("shape"):
                dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]
                shape = ir.Shape(dims)
        if measured is not None:
            dtype = ir.DataType.from_numpy(np.dtype(measured[1]))
            if value_type is None or value_type.dtype != dtype:
                value_type, shape = ir.TensorType(dtype), None
            elif shape is not None and not _agrees(shape, measured[0]):
                shape = None
        if shape is None and measured is not None:  # rank known, sizes left free (checkers want a shape)
            shape = ir.Shape([None] * len(measured[0]))
        if value_type is not None:
            result[name] = (value_type, shape)
    return result


def _agrees(shape: ir.Shape, measured: tuple[int, ...]) -> bool:
    if len(shape) != len(measured):
        return False
    return all(not isinstance(d, int) or d == m for d, m in zip(shape, measured))


def check_stage(model: ir.Model, index: int) -> None:
    """onnx's checker on a stage model; a failure is a bug in the exporter, said plainly."""
    try:
        onnx.checker.check_model(ir.to_proto(model))
    except onnx.checker.ValidationError as exc:
        raise InputError(f"stage {index} fails onnx's checker: {str(exc).splitlines()[0]}") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_dict(plan: SplitPlan, files: list[str], types: dict, source: dict, method: dict,
                  stage_stats: list[dict]) -> dict:
    def io(name):
        value_type, shape = types.get(name, (None, None))
        return {"name": name, "dtype": str(value_type.dtype) if value_type is not None else None,
                "shape": [d if isinstance(d, int) else (str(d) if d is not None else None) for d in shape]
                if shape is not None else None}

    return {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "source": source, "method": method,
        "inputs": [io(n) for n in plan.model_inputs], "outputs": [io(n) for n in plan.model_outputs],
        "stages": [{"index": s.index, "file": f, "partition": s.partition, "inputs": s.inputs, "outputs": s.outputs,
                    **stats} for s, f, stats in zip(plan.stages, files, stage_stats)],
        "tensors": plan.wiring(),
    }
