"""`onnxopt reduce`: shrink a failing model to a small subgraph that still fails.

A candidate is a set of main-graph nodes (Constant nodes come along with their consumers).
Its model takes as graph inputs every value it reads and does not compute, and outputs
every value it computes that nothing inside it reads, or that the rest of the model or the
original's outputs use. Inputs are fed with the values the original computes on several
input samples, captured by running just their ancestors (ORT runs every node of a session,
so a failing node elsewhere does not stop the capture).

The search first bisects over the nodes in topological order (the shortest failing prefix,
then the latest start that still fails), then removes nodes one at a time while the
candidate still fails. The failure predicate is one of:

- ``--check CMD``: a shell command given the candidate's path for ``{}``; nonzero exit = failing;
- ``--budget`` with ``--against REF``: inputs are fed from REF's values (the model's own
  where REF has no tensor of that name), outputs compared with REF's values of the same
  name; a budget breach, or an ORT error, is failing;
- ``--budget`` alone: ORT cannot load or run the candidate (the model's own values feed it).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from . import ort_run
from .calibration import _value_dtypes
from .errors import InputError
from .metrics import Budget, output_metrics

Feed = dict[str, np.ndarray]
MAX_LINEAR_CHECKS = 400


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        used.update(n for n in node.input if n)
        for attr in node.attribute:
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                used |= _outer_names(sub)
        defined.update(node.output)
    used.update(o.name for o in graph.output)
    return used - defined


class Extractor:
    """Builds standalone models from sets of main-graph nodes of one model."""

    def __init__(self, model: ir.Model):
        self.proto = ir.to_proto(model)
        graph = self.proto.graph
        self.dtypes = {name: dtype.value for name, dtype in _value_dtypes(model).items()}
        self.shaped = _inferred_types(self.proto)
        self.initializers = {t.name: t for t in graph.initializer}
        self.graph_inputs = [v.name for v in graph.input if v.name not in self.initializers]
        self.graph_outputs = {o.name for o in graph.output}
        self.nodes = list(graph.node)
        self.uses: list[list[str]] = []
        for node in self.nodes:
            names = [n for n in node.input if n]
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    names += sorted(_outer_names(sub))
            self.uses.append(names)
        self.producer = {o: i for i, node in enumerate(self.nodes) for o in node.output if o}
        self.constants = {i for i, n in enumerate(self.nodes) if n.op_type == "Constant" and n.domain in ("", "ai.onnx")}
        self.work = [i for i in range(len(self.nodes)) if i not in self.constants]  # topological order
        self.readers: dict[str, set[int]] = {}
        for i, names in enumerate(self.uses):
            for n in names:
                self.readers.setdefault(n, set()).add(i)

    def ancestors(self, names: list[str]) -> list[int]:
        """Work nodes needed to compute ``names`` from the graph inputs."""
        seen: set[int] = set()
        stack = [self.producer[n] for n in names if n in self.producer]
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            stack.extend(self.producer[n] for n in self.uses[i] if n in self.producer)
        return sorted(i for i in seen if i not in self.constants)

    def boundary(self, nodes: list[int]) -> tuple[list[str], list[str]]:
        """(inputs, outputs) of the candidate made of work nodes ``nodes``."""
        chosen = set(nodes)
        constants = {self.producer[n] for i in nodes for n in self.uses[i]
                     if n in self.producer and self.producer[n] in self.constants}
        produced = {o for i in chosen | constants for o in self.nodes[i].output if o}
        inputs, seen = [], set()
        for i in sorted(chosen):
            for n in self.uses[i]:
                if n not in produced and n not in self.initializers and n not in seen:
                    seen.add(n)
                    inputs.append(n)
        outputs = []
        for i in sorted(chosen):
            for o in self.nodes[i].output:
                readers = self.readers.get(o, set())
                if o and (not readers & chosen or readers - chosen or o in self.graph_outputs):
                    outputs.append(o)
        return inputs, outputs

    def build(self, nodes: list[int], outputs: list[str] | None = None, input_types: dict[str, onnx.TypeProto] | None = None,
              output_types: dict[str, onnx.TypeProto] | None = None) -> tuple[onnx.ModelProto, list[str], list[str]]:
        """The model of work nodes ``nodes`` (with the Constants they read); explicit ``outputs``
        restrict what it returns. Outputs get only their element type unless ``output_types``
        gives more. Raises InputError when a boundary value has no known type."""
        inputs, natural = self.boundary(nodes)
        outputs = natural if outputs is None else outputs
        chosen = set(nodes) | {self.producer[n] for i in nodes for n in self.uses[i]
                               if n in self.producer and self.producer[n] in self.constants}
        used = {n for i in chosen for n in self.uses[i]}
        input_types = input_types or {}
        graph = helper.make_graph(
            [self.nodes[i] for i in sorted(chosen)], "reduced",
            [self._value_info(n, input_types.get(n)) for n in inputs],
            [self._value_info(n, (output_types or {}).get(n)) for n in outputs],
            [self.initializers[n] for n in sorted(used) if n in self.initializers])
        model = helper.make_model(graph, opset_imports=list(self.proto.opset_import), ir_version=self.proto.ir_version)
        model.functions.extend(self.proto.functions)
        return model, inputs, outputs

    def _value_info(self, name: str, given: onnx.TypeProto | None = None) -> onnx.ValueInfoProto:
        info = onnx.ValueInfoProto(name=name)
        if given is not None:
            info.type.CopyFrom(given)
        elif name in self.dtypes:
            info.type.tensor_type.elem_type = self.dtypes[name]
        else:
            raise InputError(f"the type of tensor {name!r} is unknown (shape inference could not tell)")
        return info


def _inferred_types(proto: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Tensor types with a shape from onnx shape inference (best effort), by value name."""
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=False)
    except Exception:  # noqa: BLE001 - without inference, types come from captured values
        return {}
    graph = inferred.graph
    return {v.name: v.type for v in [*graph.input, *graph.value_info, *graph.output]
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def _type_of(arrays: list[np.ndarray]) -> onnx.TypeProto:
    """A tensor type from captured values: fixed where every sample agrees, symbolic elsewhere."""
    first = arrays[0]
    dims = [d if all(a.shape[k] == d for a in arrays) else None for k, d in enumerate(first.shape)]
    return helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(first.dtype), dims)


@dataclass
class Candidate:
    nodes: list[int]
    failing: bool
    why: str = ""


@dataclass
class Reducer:
    """The search; ``predicate(model_proto, inputs, outputs) -> (failing, why)``."""

    extractor: Extractor
    values: "ValueSource | None"
    predicate: object
    checks: int = 0
    log: list[dict] = field(default_factory=list)

    def fails(self, nodes: list[int]) -> Candidate:
        self.checks += 1
        if not nodes:
            return Candidate(nodes, False, "empty")
        try:
            inputs, outputs = self.extractor.boundary(nodes)
            if self.values is not None:
                types, out_types = {n: _type_of(self.values.get(n)) for n in inputs}, None
            else:  # a command sees checker-valid candidates: shapes from inference
                types = {n: self.extractor.shaped[n] for n in inputs if n in self.extractor.shaped}
                out_types = {n: self.extractor.shaped[n] for n in outputs if n in self.extractor.shaped}
            model, inputs, outputs = self.extractor.build(nodes, input_types=types, output_types=out_types)
            failing, why = self.predicate(model, inputs, outputs)
        except InputError as exc:  # the candidate cannot be built or fed: it does not show the failure
            failing, why = False, f"not evaluable: {exc}"
        self.log.append({"nodes": len(nodes), "failing": failing, "why": why})
        return Candidate(nodes, failing, why)

    def run(self) -> Candidate:
        order = self.extractor.work
        whole = self.fails(order)
        if not whole.failing:
            raise InputError(f"the model does not fail the check ({whole.why or 'it passes'}): nothing to reduce")
        lo, hi = 1, len(order)  # the shortest failing prefix
        while lo < hi:
            mid = (lo + hi) // 2
            if self.fails(order[:mid]).failing:
                hi = mid
            else:
                lo = mid + 1
        end = hi
        lo, hi = 0, end - 1  # the latest start that still fails
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fails(order[mid:end]).failing:
                lo = mid
            else:
                hi = mid - 1
        best = self.fails(order[lo:end])
        if not best.failing:  # the failure is not monotone in the prefix: start from the whole model
            best = whole
        current = list(best.nodes)
        for node in list(current):
            if len(current) == 1 or self.checks >= MAX_LINEAR_CHECKS:
                break
            trial = self.fails([n for n in current if n != node])
            if trial.failing:
                current, best = trial.nodes, trial
        return best


class ValueSource:
    """Values of named tensors on the feeds, from the reference first, else the model itself;
    each computed once by running only its ancestors."""

    def __init__(self, feeds: list[Feed], *extractors: Extractor):
        self.feeds, self.extractors = feeds, extractors
        self.cache: dict[str, list[np.ndarray]] = {}

    def get(self, name: str) -> list[np.ndarray]:
        if name not in self.cache:
            self.cache[name] = self._compute(name)
        return self.cache[name]

    def has(self, name: str, index: int = 0) -> bool:
        extractor = self.extractors[index]
        return name in extractor.producer or name in extractor.graph_inputs

    def _compute(self, name: str) -> list[np.ndarray]:
        for extractor in self.extractors:
            if name in extractor.graph_inputs:
                return [np.asarray(f[name]) for f in self.feeds]
            if name in extractor.producer:
                model, inputs, _ = extractor.build(extractor.ancestors([name]), outputs=[name])
                session = ort_run.make_session(ir.from_proto(model))
                return [ort_run.run(session, {n: f[n] for n in inputs})[name] for f in self.feeds]
        raise InputError(f"no model computes tensor {name!r}")


def _run_candidate(model: onnx.ModelProto, inputs: list[str], values: ValueSource, wanted: list[str]):
    """(error or None, {output: [array per sample]}) of the candidate on the captured inputs."""
    got: dict[str, list[np.ndarray]] = {o: [] for o in wanted}
    try:
        session = ort_run.make_session(ir.from_proto(model))
        for k in range(len(values.feeds)):
            result = ort_run.run(session, {n: values.get(n)[k] for n in inputs})
            for o in wanted:
                got[o].append(result[o])
    except InputError as exc:
        return str(exc), got
    return None, got


def ort_failure(values: ValueSource):
    """Failing when ORT cannot load or run the candidate on the captured inputs."""

    def predicate(model, inputs, outputs):
        for n in inputs:
            values.get(n)  # a boundary value the model cannot compute: not evaluable (raises)
        error, _ = _run_candidate(model, inputs, values, [])
        return (True, error) if error else (False, "runs")

    return predicate


def budget_failure(values: ValueSource, budget: Budget):
    """Failing when ORT fails, or when an output breaks ``budget`` against the reference's value."""

    def predicate(model, inputs, outputs):
        for n in inputs:
            values.get(n)
        comparable = [o for o in outputs if values.has(o)] if budget else []
        error, got = _run_candidate(model, inputs, values, comparable)
        if error:
            return True, error
        if not comparable:
            return False, "runs; no output the reference computes" if budget else "runs"
        metrics = {o: output_metrics(values.get(o), got[o], decisions=False) for o in comparable}
        breaches = budget.breaches(metrics)
        return bool(breaches), "; ".join(breaches[:2]) or "within budget"

    return predicate


def command_failure(command: str):
    """Failing when ``command`` (with ``{}`` replaced by the candidate's path) exits nonzero."""

    def predicate(model, inputs, outputs):
        with tempfile.TemporaryDirectory(prefix="onnxopt-reduce-") as tmp:
            path = os.path.join(tmp, "candidate.onnx")
            onnx.save(model, path)
            text = command.replace("{}", shlex.quote(path)) if "{}" in command else f"{command} {shlex.quote(path)}"
            proc = subprocess.run(text, shell=True, capture_output=True, text=True)
            return proc.returncode != 0, f"exit {proc.returncode}"

    return predicate


def reduce_model(model: ir.Model, feeds: list[Feed], *, budget: Budget | None = None,
                 against: ir.Model | None = None, check: str | None = None
                 ) -> tuple[onnx.ModelProto, dict, dict[str, list[np.ndarray]]]:
    """The smallest failing subgraph found, a summary of the search, and the captured values
    of its inputs per sample (empty with ``check``)."""
    extractor = Extractor(model)
    if check:
        values, predicate = None, command_failure(check)
    else:
        sources = ([Extractor(against)] if against is not None else []) + [extractor]
        values = ValueSource(feeds, *sources)
        predicate = budget_failure(values, budget or Budget()) if against is not None else ort_failure(values)
    reducer = Reducer(extractor, values, predicate)
    best = reducer.run()
    boundary_inputs = extractor.boundary(best.nodes)[0]
    types = ({n: _type_of(values.get(n)) for n in boundary_inputs} if values is not None else
             {n: extractor.shaped[n] for n in boundary_inputs if n in extractor.shaped})
    reduced, inputs, outputs = extractor.build(best.nodes, input_types=types,
                                               output_types=_output_types(extractor, best.nodes, values))
    summary = {"nodes_before": len(extractor.work), "nodes_after": len(best.nodes),
               "nodes": [extractor.nodes[i].name or f"{extractor.nodes[i].op_type}#{i}" for i in best.nodes],
               "ops": [extractor.nodes[i].op_type for i in best.nodes], "inputs": inputs, "outputs": outputs,
               "checks": reducer.checks, "why": best.why}
    samples = {n: values.get(n) for n in inputs} if values is not None else {}
    if values is not None:
        summary["samples"] = len(feeds)
    return reduced, summary, samples


def _output_types(extractor: Extractor, nodes: list[int], values: ValueSource | None) -> dict[str, onnx.TypeProto]:
    """Shaped output types for the written model (the checker wants a shape): the captured
    values where the model computes them (ORT's shapes), else shape inference's."""
    types = {}
    for name in extractor.boundary(nodes)[1]:
        if values is not None:
            try:
                types[name] = _type_of(values.get(name))
                continue
            except InputError:  # e.g. the failing node's own output: ORT cannot compute it
                pass
        if name in extractor.shaped:
            types[name] = extractor.shaped[name]
    return types


def save_reduced(model: onnx.ModelProto, path: str | Path) -> Path:
    """Check (ONNX checker) and write the reduced model."""
    from .model_io import save_model

    onnx.checker.check_model(model)
    return save_model(ir.from_proto(model), Path(path))
