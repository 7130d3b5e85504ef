"""Stitch-back: run stage models in sequence with ORT and compare with the original; merge stages.

A manifest (``manifest.json``, written by ``onnxopt split``) names each stage's file, its
inputs and outputs; tensors flow by name from the model inputs and earlier stages. Sessions
run without ORT's graph optimizations, like every check in onnxopt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from . import ort_run
from .errors import InputError
from .metrics import Tolerance, output_metrics
from .model_io import read_proto
from .split_export import MANIFEST_FORMAT, MANIFEST_VERSION


def read_manifest(path: str | Path) -> dict:
    """A split manifest, checked for shape: format, version, stages with files inside its directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"manifest not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not a JSON manifest: {exc}") from None
    problem = _manifest_problem(manifest, path.parent)
    if problem:
        raise InputError(f"malformed manifest {path}: {problem}")
    manifest["_dir"] = str(path.parent)
    return manifest


def _manifest_problem(manifest, directory: Path) -> str | None:
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return f"'format' is not {MANIFEST_FORMAT!r}"
    if manifest.get("version") != MANIFEST_VERSION:
        return f"version {manifest.get('version')!r} is not {MANIFEST_VERSION}"
    stages = manifest.get("stages")
    if not isinstance(stages, list) or not stages:
        return "no stages"
    for key in ("inputs", "outputs"):
        if not isinstance(manifest.get(key), list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                                              for i in manifest[key]):
            return f"'{key}' must be a list of {{name: ...}}"
    known = {i["name"] for i in manifest["inputs"]}
    for position, stage in enumerate(stages):
        if not isinstance(stage, dict) or stage.get("index") != position:
            return f"stage {position} is missing or out of order"
        name = stage.get("file")
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or "/" in name:
            return f"stage {position} file {name!r} must be a plain file name inside the manifest's directory"
        if not (directory / name).is_file():
            return f"stage {position} file {name!r} not found"
        for key in ("inputs", "outputs"):
            if not isinstance(stage.get(key), list) or not all(isinstance(n, str) for n in stage[key]):
                return f"stage {position} '{key}' must be a list of tensor names"
        missing = [n for n in stage["inputs"] if n not in known]
        if missing:
            return f"stage {position} reads {missing[0]!r}, which no model input or earlier stage provides"
        known.update(stage["outputs"])
    missing = [o["name"] for o in manifest["outputs"] if o["name"] not in known]
    if missing:
        return f"model output {missing[0]!r} is produced by no stage"
    return None


def stage_paths(manifest: dict) -> list[Path]:
    return [Path(manifest["_dir"]) / s["file"] for s in manifest["stages"]]


@dataclass
class StageChain:
    """ORT sessions for the stages of a manifest, run in order on one feed at a time."""

    manifest: dict
    sessions: list = field(default_factory=list)

    def __post_init__(self):
        if not self.sessions:
            self.sessions = [ort_run.make_session(path) for path in stage_paths(self.manifest)]

    def run(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = dict(feed)
        for stage, session in zip(self.manifest["stages"], self.sessions):
            outputs = ort_run.run(session, {name: env[name] for name in stage["inputs"]})
            env.update(outputs)
        return {o["name"]: env[o["name"]] for o in self.manifest["outputs"]}

    def outputs(self, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
        per_output: dict[str, list[np.ndarray]] = {o["name"]: [] for o in self.manifest["outputs"]}
        for feed in feeds:
            for name, array in self.run(feed).items():
                per_output[name].append(array)
        return per_output


@dataclass
class StitchCheck:
    """Chained stages against a reference: per-output metrics and whether all are equal within rounding."""

    equal: bool
    metrics: dict[str, dict]
    against: str

    def as_dict(self) -> dict:
        return {"equal": self.equal, "against": self.against, "metrics": self.metrics}


def compare_outputs(reference: dict[str, list[np.ndarray]], candidate: dict[str, list[np.ndarray]],
                    tolerance: Tolerance | None, against: str) -> StitchCheck:
    tolerance = tolerance or Tolerance()
    metrics, equal = {}, True
    for name, arrays in reference.items():
        got = candidate.get(name)
        if got is None:
            return StitchCheck(False, {name: {"error": "missing from the stages' outputs"}}, against)
        metrics[name] = output_metrics(arrays, got, decisions=False)
        equal &= tolerance.allows(arrays, got)
    return StitchCheck(equal, metrics, against)


def model_outputs(model: ir.Model | str | Path, feeds: list[dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    session = ort_run.make_session(model)
    names = [o.name for o in session.get_outputs()]
    per_output: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feed in feeds:
        outputs = ort_run.run(session, {k: v for k, v in feed.items() if k in {i.name for i in session.get_inputs()}})
        for name in names:
            per_output[name].append(outputs[name])
    return per_output


def merge_stages(manifest: dict) -> ir.Model:
    """One model from a manifest's stages: nodes in stage order, copied Constants and initializers
    kept once (they must be identical), the manifest's inputs and outputs.

    onnx.compose.merge_models is not used: it refuses the names stages share on purpose (copied
    initializers and Constants) and drops an io-mapped output a later stage still reads.
    """
    protos = [read_proto(p) for p in stage_paths(manifest)]
    first = protos[0]
    graph = onnx.GraphProto(name=(first.graph.name.rsplit("_stage", 1)[0] or "merged"))
    produced: dict[str, bytes] = {}
    initializers: dict[str, onnx.TensorProto] = {}
    inputs: dict[str, onnx.ValueInfoProto] = {}
    infos: dict[str, onnx.ValueInfoProto] = {}
    opsets: dict[str, int] = {}
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    for index, proto in enumerate(protos):
        _load_external(proto, stage_paths(manifest)[index])
        for opset in proto.opset_import:
            opsets[opset.domain] = max(opsets.get(opset.domain, 0), opset.version)
        for function in proto.functions:
            functions.setdefault((function.domain, function.name), function)
        for init in proto.graph.initializer:
            if init.name in initializers:
                if initializers[init.name].SerializeToString() != init.SerializeToString():
                    raise InputError(f"stages {index} and an earlier one hold different initializers named {init.name!r}")
                continue
            initializers[init.name] = init
        for value in proto.graph.input:
            inputs.setdefault(value.name, value)
        for value in list(proto.graph.value_info) + list(proto.graph.output):
            infos.setdefault(value.name, value)
        for node in proto.graph.node:
            key = node.SerializeToString()
            outs = [o for o in node.output if o]
            if outs and all(o in produced for o in outs):
                if all(produced[o] == key for o in outs):
                    continue  # a Constant copied into several stages
                raise InputError(f"stage {index} recomputes tensor {outs[0]!r} differently from an earlier stage")
            for o in outs:
                produced[o] = key
            graph.node.append(node)
    graph.initializer.extend(initializers.values())
    graph.input.extend(inputs[i["name"]] for i in manifest["inputs"])
    output_names = [o["name"] for o in manifest["outputs"]]
    graph.output.extend(infos.get(n) or inputs.get(n) or onnx.ValueInfoProto(name=n) for n in output_names)
    graph.value_info.extend(v for n, v in infos.items() if n not in output_names and n not in inputs)
    graph.value_info.extend(v for n, v in inputs.items() if n not in {i["name"] for i in manifest["inputs"]})
    merged = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()],
                                    ir_version=max(p.ir_version for p in protos))
    merged.functions.extend(functions.values())
    for prop in first.metadata_props:
        if not prop.key.startswith("onnxopt.split."):
            merged.metadata_props.append(prop)
    merged.producer_name = first.producer_name
    merged.producer_version = first.producer_version
    model = ir.serde.deserialize_model(merged)
    for node in model.graph:
        for key in ("onnxopt.stage", "onnxopt.partition"):
            node.metadata_props.pop(key, None)
    return model


def _load_external(proto: onnx.ModelProto, path: Path) -> None:
    from onnx.external_data_helper import load_external_data_for_model, uses_external_data

    if any(uses_external_data(t) for t in proto.graph.initializer):
        load_external_data_for_model(proto, str(path.parent))


