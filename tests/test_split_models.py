"""Split, stitch-back and merge on real pretrained models (the bundled classifier and the zoo)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt import api
from onnxopt.model_io import load_model
from onnxopt.models import bundled_model_path
from onnxopt.models.feeds import sample_feeds
from onnxopt.models.zoo import cached_path
from onnxopt.split_run import split_model, split_spec
from onnxopt.stitch import StageChain, model_outputs, read_manifest


def _zoo(name: str) -> Path:
    path = cached_path(name)
    if path is None:
        pytest.skip(f"{name} is not cached; run `onnxopt zoo fetch {name}`")
    return path


def _split_and_merge(path: Path, name: str, tmp_path: Path, **mode):
    feeds = sample_feeds(name, count=2)
    result = split_model(load_model(path), path, tmp_path / "out", split_spec(**mode), feeds)
    assert result.ok, result.stitch.metrics
    manifest = read_manifest(tmp_path / "out")
    for stage in manifest["stages"]:
        onnx.checker.check_model(onnx.load(tmp_path / "out" / stage["file"]))
    chained = StageChain(manifest).outputs(feeds)
    reference = model_outputs(path, feeds)
    for output, arrays in reference.items():
        for want, got in zip(arrays, chained[output]):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    (tmp_path / "feeds").mkdir()
    for index, feed in enumerate(feeds):  # one file per feed: sample sizes may differ
        np.savez(tmp_path / "feeds" / f"{index}.npz", **feed)
    merged = api.merge(tmp_path / "out", tmp_path / "merged.onnx", data=tmp_path / "feeds")
    assert merged.ok and merged.against_original is not None and merged.against_original.equal
    return result


def test_bundled_classifier_three_stages_by_params(tmp_path):
    result = _split_and_merge(bundled_model_path("ppocr_cls"), "ppocr_cls", tmp_path, stages=3, by="params")
    assert result.pass_stats["max_over_ideal"] <= 1.1
    stages = result.manifest["stages"]
    # PaddleOCR keeps weights in Constant nodes: each stage holds its own, none is passed between stages
    assert all(not any(n.endswith("Constant_output_0") for n in s["inputs"]) for s in stages)
    assert sum(s["params"] for s in stages) >= sum(result.pass_stats["stage_costs"]) * 0.99


@pytest.mark.zoo
def test_silero_vad_if_model_splits_around_its_if(tmp_path):
    result = _split_and_merge(_zoo("silero_vad"), "silero_vad", tmp_path, stages=2, by="params")
    ifs = [s for s in result.manifest["stages"] if s["ops"].get("If")]
    assert len(ifs) == 1  # the If holding the network stays whole, in one stage


@pytest.mark.zoo
@pytest.mark.slow
def test_silero_vad_op15_supported_ops_islands(tmp_path):
    ops = ["Conv", "Relu", "Add", "Mul", "Sigmoid", "Tanh", "Concat", "Slice", "Unsqueeze", "Squeeze", "Constant"]
    result = _split_and_merge(_zoo("silero_vad_op15"), "silero_vad_op15", tmp_path, supported_ops=ops)
    kinds = {s["partition"] for s in result.manifest["stages"]}
    assert kinds == {"accelerator", "fallback"} and result.pass_stats["islands"] == len(
        [s for s in result.manifest["stages"] if s["partition"] == "accelerator"])


@pytest.mark.zoo
@pytest.mark.slow
@pytest.mark.parametrize("name", ["ppocr_det_v4", "ppocr_rec_v4"])
def test_ppocr_four_stages_by_flops(name, tmp_path):
    result = _split_and_merge(_zoo(name), name, tmp_path, stages=4, by="flops")
    assert result.pass_stats["max_over_ideal"] <= 1.1
