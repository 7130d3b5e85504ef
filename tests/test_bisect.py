"""`onnxopt bisect`: the first breaking pass of a pipeline and the first node it breaks."""

from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import Pass, PassResult, api
from onnxopt.cli import main
from onnxopt.models import builders
from onnxopt.registry import Registry

from core_passes import CrashPass, PerturbWeightsPass, RenameNodesPass


@dataclasses.dataclass(frozen=True)
class TargetOptions:
    node: str = ""


class BreakOneNodePass(Pass):
    """Claims to be lossless, but flips the sign of one node's weight (the planted bug)."""

    name = "break-one-node"
    Options = TargetOptions

    def call(self, model):
        node = next(n for n in model.graph if n.name == self.options.node)
        weight = next(v for v in node.inputs if v is not None and v.const_value is not None)
        weight.const_value = ir.tensor(-weight.const_value.numpy(), name=weight.name)
        return PassResult(model, True, {})


REGISTRY = Registry([RenameNodesPass, BreakOneNodePass, PerturbWeightsPass, CrashPass], {})


def _cnn(tmp_path):
    path = tmp_path / "cnn.onnx"
    model = builders.build_cnn()
    for i, node in enumerate(model.graph.node):
        node.name = f"{node.op_type.lower()}_{i}"
    onnx.save(model, path)
    return path, model


def test_bisect_names_the_broken_pass_and_its_first_divergent_node(tmp_path):
    path, model = _cnn(tmp_path)
    target = next(n for n in model.graph.node if n.output[0] == "r2")  # the residual block's second Conv
    result = api.bisect(path, ["name-nodes", f"break-one-node:node={target.name}", "name-nodes"],
                        registry=REGISTRY, save_dir=tmp_path / "saved")
    assert result["broken"]
    assert result["breaking_pass"]["index"] == 1 and result["breaking_pass"]["status"] == "failed"
    assert "lossless pass changed outputs" in result["breaking_pass"]["reason"]
    first = result["first_divergence"]
    assert (first["node"], first["op"], first["tensor"]) == (target.name, "Conv", "r2")
    upstream = [r for r in result["tensors"]["rows"] if r["index"] < first["index"]]
    assert upstream and all(r["exact"] for r in upstream)
    assert [s["status"] for s in result["steps"]] == ["ok", "failed", "skipped"]
    before, after = (onnx.load(p) for p in result["saved"])
    assert not np.array_equal(*(onnx.numpy_helper.to_array(next(t for t in m.graph.initializer
                                                                 if t.name == "res2_weight")) for m in (before, after)))


def test_bisect_exits_1_on_a_budget_breach_and_0_when_nothing_breaks(tmp_path, capsys, monkeypatch):
    path, _ = _cnn(tmp_path)
    monkeypatch.setattr(api, "bisect", functools.partial(api.bisect, registry=REGISTRY))
    assert main(["bisect", str(path), "-p", "name-nodes", "-p", "perturb-weights:scale=0.05",
                 "--budget", "cosine=0.99999"]) == 1
    out = capsys.readouterr().out
    assert "first breaking pass: #1 perturb-weights" in out and "rolled back" in out
    assert "first divergent node: 'conv_0' (Conv), output 'stem'" in out  # the first weight it touches
    assert main(["bisect", str(path), "-p", "name-nodes", "-p", "perturb-weights:scale=0.0001",
                 "--budget", "cosine=0.9", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["broken"] is False and document["first_divergence"] is None


def test_bisect_reports_a_crashing_pass_without_a_divergence(tmp_path):
    path, _ = _cnn(tmp_path)
    result = api.bisect(path, ["name-nodes", "crash"], registry=REGISTRY, reproducer_dir=tmp_path / "crash")
    assert result["broken"] and result["breaking_pass"]["index"] == 1
    assert "crashed" in result["breaking_pass"]["reason"] and result["first_divergence"] is None
    assert (tmp_path / "crash" / "model_before.onnx").exists()
