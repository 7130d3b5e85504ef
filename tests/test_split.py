"""Split passes, stage export, stitch-back and merge on small built models (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import api, cli
from onnxopt.errors import InputError, UsageError
from onnxopt.models import builders
from onnxopt.pass_base import PassContext
from onnxopt.passes.split import SplitAtTensorsPass, SplitStagesPass, SplitSupportedOpsPass
from onnxopt.passes.split.partition import balanced_stages
from onnxopt.split_marks import partition_of, stage_of
from onnxopt.stitch import StageChain, read_manifest

from helpers import model_from_text, run_ort


def _save(tmp_path: Path, builder, name: str) -> Path:
    path = tmp_path / f"{name}.onnx"
    onnx.save(builder(), path)
    return path


def _check_split_dir(outdir: Path, original: Path) -> dict:
    """Every stage checker-valid, the manifest wires every stage input, and the chain equals the original."""
    manifest = read_manifest(outdir / "manifest.json")
    produced = {i["name"] for i in manifest["inputs"]}
    for stage in manifest["stages"]:
        proto = onnx.load(outdir / stage["file"])
        onnx.checker.check_model(proto, full_check=True)
        assert [i.name for i in proto.graph.input] == stage["inputs"]
        assert [o.name for o in proto.graph.output] == stage["outputs"]
        assert set(stage["inputs"]) <= produced
        produced |= set(stage["outputs"])
    wired = {t["name"] for t in manifest["tensors"]}
    assert all(n in wired for s in manifest["stages"] for n in s["inputs"] + s["outputs"])
    model = ir.from_proto(onnx.load(original))
    feeds = api.make_feeds(model, None, samples=2)[0]
    chain = StageChain(manifest)
    for feed in feeds:
        expected = run_ort(onnx.load(original), feed)
        got = chain.run(feed)
        for out, want in zip(manifest["outputs"], expected):
            np.testing.assert_allclose(got[out["name"]], want, rtol=1e-6, atol=1e-6)
    return manifest


def test_balanced_stages_minimizes_the_largest_contiguous_run():
    assert balanced_stages([1, 1, 1, 1, 4], 2) == [0, 0, 0, 0, 1]
    costs = [5, 1, 1, 1, 1, 1]
    labels = balanced_stages(costs, 3)
    assert labels == sorted(labels) and max(sum(c for c, s in zip(costs, labels) if s == k) for k in range(3)) == 5
    labels = balanced_stages([0, 0, 0, 0], 3)  # no cost at all: still three non-empty stages
    assert sorted(set(labels)) == [0, 1, 2] and labels == sorted(labels)


def test_split_stages_by_params_cnn_chains_back_and_merges(tmp_path):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    result = api.split(path, tmp_path / "out", stages=3, by="params")
    assert result.ok and len(result.manifest["stages"]) == 3
    info = result.as_dict()
    assert info["balance"]["by"] == "params" and len(info["balance"]["stage_costs"]) == 3
    assert sum(s["params"] for s in info["stages"]) == sum(info["balance"]["stage_costs"])  # no weight shared here
    _check_split_dir(tmp_path / "out", path)
    merged = api.merge(tmp_path / "out" / "manifest.json", tmp_path / "merged.onnx")
    assert merged.ok and merged.against_original is not None and merged.against_original.equal
    onnx.checker.check_model(onnx.load(tmp_path / "merged.onnx"), full_check=True)
    assert len(onnx.load(tmp_path / "merged.onnx").graph.node) == len(onnx.load(path).graph.node)


def test_split_at_tensors_cuts_where_asked(tmp_path):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    result = api.split(path, tmp_path / "out", at=["res", "joined"])
    stages = result.manifest["stages"]
    assert result.ok and len(stages) == 3
    assert stages[0]["outputs"] == ["res"] and stages[1]["inputs"] == ["res"] and stages[2]["inputs"] == ["joined"]
    _check_split_dir(tmp_path / "out", path)


def test_split_keeps_if_and_loop_whole_and_their_captures_become_stage_inputs(tmp_path):
    path = _save(tmp_path, builders.build_control_flow, "cf")
    result = api.split(path, tmp_path / "out", at=["branch_out"])
    stage0, stage1 = result.manifest["stages"]
    assert "x" in stage0["inputs"]  # captured by the If bodies only
    assert stage0["ops"]["If"] == 1 and stage1["ops"]["Loop"] == 1
    assert "x" in stage1["inputs"]  # the final Add reads x again: wired from the model input
    _check_split_dir(tmp_path / "out", path)
    assert api.merge(tmp_path / "out", tmp_path / "m.onnx").ok


def test_shared_constant_is_copied_into_each_reading_stage(tmp_path):
    model = model_from_text("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) {
            c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
            a = Add(x, c)
            r = Relu(a)
            y = Mul(r, c)
        }""")
    path = tmp_path / "shared.onnx"
    ir.save(model, path)
    result = api.split(path, tmp_path / "out", at=["r"])
    assert result.ok
    for stage in result.manifest["stages"]:
        assert stage["ops"].get("Constant") == 1 and "c" not in stage["inputs"]
    assert api.merge(tmp_path / "out", tmp_path / "m.onnx").ok
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node] == ["Constant", "Add", "Relu", "Mul"]


def test_split_supported_ops_makes_islands_and_fallback_parts(tmp_path):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    result = api.split(path, tmp_path / "out", supported_ops=["Conv", "Relu", "Add", "MaxPool"])
    partitions = [s["partition"] for s in result.manifest["stages"]]
    assert result.ok and partitions == ["accelerator", "fallback", "accelerator", "fallback"]
    for stage in result.manifest["stages"]:
        ops = set(stage["ops"]) - {"Constant"}
        supported = ops <= {"Conv", "Relu", "Add", "MaxPool"}
        assert supported == (stage["partition"] == "accelerator")
    _check_split_dir(tmp_path / "out", path)


def test_supported_ops_versions_and_subgraphs():
    model = ir.from_proto(builders.build_control_flow())
    # Loop's body has Tanh, which is not listed: the whole Loop falls back; the If's bodies are covered.
    ops = ["If", "MatMul", "Identity", "Relu", "Mul", "Add", "Constant", "Loop@1-10"]
    result = SplitSupportedOpsPass(ops=tuple(ops))(model)
    marks = {n.op_type: partition_of(n) for n in model.graph}
    assert marks["If"] == "accelerator" and marks["Loop"] == "fallback" and result.stats["islands"] >= 1
    SplitSupportedOpsPass(ops=("If", "MatMul", "Identity", "Relu", "Mul", "Add", "Constant", "Tanh",
                               "Loop@11-21"))(model)
    assert {n.op_type: partition_of(n) for n in model.graph}["Loop"] == "accelerator"  # Loop's op version is 11 or later
    with pytest.raises(UsageError, match="bad op"):
        SplitSupportedOpsPass(ops=("Conv@x",))(model)


def test_split_pass_is_lossless_and_reports_modified_honestly():
    model = ir.from_proto(builders.build_cnn())
    before = run_ort(ir.to_proto(model), {"image": np.ones((1, 3, 32, 32), np.float32)})
    first = SplitStagesPass(stages=2)(model)
    assert first.modified and {stage_of(n) for n in model.graph} == {0, 1}
    assert not SplitStagesPass(stages=2)(model).modified  # same marks again: nothing changed
    after = run_ort(ir.to_proto(model), {"image": np.ones((1, 3, 32, 32), np.float32)})
    np.testing.assert_array_equal(before[0], after[0])


@pytest.mark.parametrize("by", ["flops", "memory", "latency"])
def test_split_stages_by_measured_costs(by, tmp_path):
    model = ir.from_proto(builders.build_cnn())
    context = PassContext(api.make_feeds(model, None, samples=1)[0])
    result = SplitStagesPass(stages=3, by=by, context=context)(model)
    costs = result.stats["stage_costs"]
    assert len(costs) == 3 and all(c > 0 for c in costs)
    assert result.stats["max_over_ideal"] >= 1.0


def test_quantize_limited_to_accelerator_partition_only_touches_islands(tmp_path):
    path = _save(tmp_path, builders.build_cnn, "cnn")

    def quantized_nodes(passes):
        """Nodes that run on int8: a dequantized input and an output that is quantized again."""
        result = api.optimize(path, tmp_path / "q.onnx", passes, budget="none", validate="end")
        assert result.ok
        found = []
        for node in result.model.graph:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                continue
            reads_dq = any(v is not None and v.producer() is not None and v.producer().op_type == "DequantizeLinear"
                           for v in node.inputs)
            requantized = any(use.node.op_type == "QuantizeLinear" for out in node.outputs for use in out.uses())
            if reads_dq and requantized:
                found.append(node)
        return found

    limited = quantized_nodes(["split-supported-ops:ops=[Conv,Relu]", "quantize-static:partition=[accelerator]"])
    assert limited and all(partition_of(n) == "accelerator" for n in limited)
    everywhere = quantized_nodes(["split-supported-ops:ops=[Conv,Relu]", "quantize-static"])
    assert any(partition_of(n) == "fallback" for n in everywhere)  # MaxPool: the selector did the limiting


def test_partition_selector_needs_marks_and_known_names(tmp_path):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    unmarked = api.optimize(path, tmp_path / "q.onnx", ["quantize-static:partition=[accelerator]"], budget="none")
    assert not unmarked.ok and "no partition marks" in api.failure_summary(unmarked.run)
    unknown = api.optimize(path, tmp_path / "q.onnx", ["split-stages:stages=2", "quantize-static:partition=[gpu]"],
                           budget="none")
    assert not unknown.ok and "no partition named 'gpu'" in api.failure_summary(unknown.run)


def test_split_refusals_exit_2_and_write_nothing(tmp_path, capsys):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    out = tmp_path / "out"
    cases = [
        ["--at", "no_such_tensor"],
        ["--at", "image"],
        ["--at", "joined,res"],
        ["--stages", "99"],
        ["--stages", "0"],
        ["--stages", "2", "--at", "res"],
        [],
        ["--supported-ops", str(tmp_path / "missing.txt")],
    ]
    for extra in cases:
        assert cli.main(["split", str(path), "-o", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err.strip()
        assert err.startswith("onnxopt: error:") and "\n" not in err
        assert not out.exists()
    cf = _save(tmp_path, builders.build_control_flow, "cf")
    assert cli.main(["split", str(cf), "-o", str(out), "--at", "t_mm"]) == 2
    assert "never split internally" in capsys.readouterr().err
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli.main(["split", str(path), "-o", str(out), "--stages", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli.main(["split", str(path), "-o", str(out), "--stages", "2", "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == [
        "keep.txt", "manifest.json", "stage0.onnx", "stage1.onnx"]


def test_merge_refuses_malformed_manifests(tmp_path, capsys):
    path = _save(tmp_path, builders.build_cnn, "cnn")
    out = tmp_path / "out"
    assert api.split(path, out, stages=2).ok
    manifest = json.loads((out / "manifest.json").read_text())
    bad = [
        {**manifest, "format": "other"},
        {**manifest, "version": 99},
        {**manifest, "stages": [dict(manifest["stages"][0], file="../cnn.onnx")] + manifest["stages"][1:]},
        {**manifest, "stages": manifest["stages"][1:]},
    ]
    for index, broken in enumerate(bad):
        target = out / f"bad{index}.json"
        target.write_text(json.dumps(broken))
        assert cli.main(["merge", str(target), "-o", str(tmp_path / "m.onnx")]) == 2
        assert "malformed manifest" in capsys.readouterr().err
    (out / "bad.json").write_text("{not json")
    assert cli.main(["merge", str(out / "bad.json"), "-o", str(tmp_path / "m.onnx")]) == 2
    assert not (tmp_path / "m.onnx").exists()
    with pytest.raises(UsageError, match="stage file"):
        api.merge(out / "manifest.json", out / "stage0.onnx")


def test_stitch_back_failure_exits_1(tmp_path, monkeypatch, capsys):
    """A stage exporter that breaks a stage is caught by the stitch-back check (exit 1)."""
    import onnxopt.split_run as split_run

    real = split_run.stage_model

    def broken(model, plan, stage, types):
        staged = real(model, plan, stage, types)
        for node in staged.graph:
            if node.op_type == "Relu":
                node.op_type = "Sigmoid"
        return staged

    monkeypatch.setattr(split_run, "stage_model", broken)
    path = _save(tmp_path, builders.build_cnn, "cnn")
    assert cli.main(["split", str(path), "-o", str(tmp_path / "out"), "--stages", "2"]) == 1
    assert "stitch-back failed" in capsys.readouterr().err


def test_share_weights_stores_a_weight_read_by_two_stages_once(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    model = ir.from_proto(onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("MatMul", ["x", "w"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["r"]),
         onnx.helper.make_node("MatMul", ["r", "w"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.numpy_helper.from_array(w, "w")]), opset_imports=[onnx.helper.make_opsetid("", 17)]))
    path = tmp_path / "tied.onnx"
    ir.save(model, path)
    copied = api.split(path, tmp_path / "copied", at=["a"])
    shared = api.split(path, tmp_path / "shared", at=["a"], share_weights=True)
    assert copied.ok and shared.ok
    assert shared.manifest["shared_weights"]["tensors"] == 1
    assert shared.manifest["shared_weights"]["bytes_saved"] == w.nbytes
    assert (tmp_path / "shared" / "weights.data").stat().st_size == w.nbytes
    for stage in ("stage0.onnx", "stage1.onnx"):
        proto = onnx.load(tmp_path / "shared" / stage, load_external_data=False)
        assert proto.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL
        assert (tmp_path / "shared" / stage).stat().st_size < (tmp_path / "copied" / stage).stat().st_size
    assert api.merge(tmp_path / "shared", tmp_path / "m.onnx").ok
