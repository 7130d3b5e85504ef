"""Loading and saving: bad input gets one clear line and exit 2, nothing is written or overwritten."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt import InputError, UsageError
from onnxopt.cli import main
from onnxopt.model_io import load_model, save_model

TINY = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,3] x) => (float[2,3] y) { a = Relu(x)  y = Neg(a) }"""


def _tiny(tmp_path, text=TINY, name="m.onnx"):
    path = tmp_path / name
    onnx.save(onnx.parser.parse_model(text), path)
    return path


def _cli_fails_cleanly(capsys, tmp_path, model, expected: str, code: int = 2):
    out = tmp_path / "out.onnx"
    before = sorted(os.listdir(tmp_path))
    assert main(["optimize", str(model), "-o", str(out), "-p", "remove-unused", "--quiet"]) == code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    assert expected in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written


def _external_model(tmp_path, location="w.bin", offset=0, length=None, write=True):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    tensor = numpy_helper.from_array(weight, "w")
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entries = {"location": location, "offset": str(offset), "length": str(length if length is not None else weight.nbytes)}
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,3] x) => (float[2,3] y) { y = Add(x, w) }""")
    model.graph.initializer.append(tensor)
    if write:
        (tmp_path / "w.bin").write_bytes(weight.tobytes())
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    return path


def test_load_reads_external_data_lazily_and_correctly(tmp_path):
    model = load_model(_external_model(tmp_path))
    np.testing.assert_array_equal(model.graph.initializers["w"].const_value.numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x08\x07\x12\xff\xff\xff", "not a valid ONNX protobuf"),
    (b"hello world, not a model at all", "not"),
])
def test_garbage_files_are_refused(tmp_path, capsys, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    _cli_fails_cleanly(capsys, tmp_path, path, message)


def test_truncated_model_is_refused(tmp_path, capsys, cls_path):
    data = cls_path.read_bytes()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    _cli_fails_cleanly(capsys, tmp_path, path, "not a valid ONNX protobuf")


def test_directory_and_fifo_are_refused(tmp_path, capsys):
    (tmp_path / "dir.onnx").mkdir()
    _cli_fails_cleanly(capsys, tmp_path, tmp_path / "dir.onnx", "is a directory")
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    _cli_fails_cleanly(capsys, tmp_path, fifo, "not a regular file")


def test_missing_model_file(tmp_path, capsys):
    _cli_fails_cleanly(capsys, tmp_path, tmp_path / "nope.onnx", "not found")


@pytest.mark.parametrize("text, message", [
    ("""<ir_version: 8, opset_import: ["" : 17]>
       g (float[2] x) => (float[2] y) { a = Relu(x)  a = Neg(x)  y = Abs(a) }""", "defined more than once"),
    ("""<ir_version: 8, opset_import: ["" : 17]>
       g (float[2] x) => (float[2] y) { a = Relu(b)  b = Neg(a)  y = Abs(a) }""", "cycle"),
    ("""<ir_version: 8, opset_import: ["" : 17]>
       g (float[2] x) => (float[2] y) { y = Relu(nowhere) }""", "undefined input 'nowhere'"),
    ("""<ir_version: 8, opset_import: ["" : 99]>
       g (float[2] x) => (float[2] y) { y = Relu(x) }""", "opset 99, newer than"),
])
def test_malformed_graphs_are_refused(tmp_path, capsys, text, message):
    model = onnx.parser.parse_model(text)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    _cli_fails_cleanly(capsys, tmp_path, path, message)


def test_external_data_missing_file(tmp_path, capsys):
    _cli_fails_cleanly(capsys, tmp_path, _external_model(tmp_path, write=False), "is missing")


def test_external_data_range_outside_file(tmp_path, capsys):
    _cli_fails_cleanly(capsys, tmp_path, _external_model(tmp_path, offset=16), "length 24 from offset 16 runs past the end")


def test_external_data_length_must_match_shape(tmp_path):
    with pytest.raises(InputError, match="does not match its shape"):
        load_model(_external_model(tmp_path, length=8))


@pytest.mark.parametrize("location, message", [
    ("../secret.bin", "leaves the model's directory"),
    ("/etc/passwd", "absolute"),
    ("sub/../../secret.bin", "leaves the model's directory"),
])
def test_external_data_escaping_the_directory_is_refused(tmp_path, capsys, location, message):
    inner = tmp_path / "inner"
    inner.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 24)
    path = _external_model(inner, location=location)
    out = inner / "out.onnx"
    assert main(["optimize", str(path), "-o", str(out), "-p", "remove-unused", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_external_data_through_symlink_or_hard_link_is_refused(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    inner = tmp_path / "inner"
    inner.mkdir()
    path = _external_model(inner, write=False)
    os.symlink(outside / "w.bin", inner / "w.bin")
    with pytest.raises(InputError, match="symlink"):
        load_model(path)
    os.unlink(inner / "w.bin")
    os.link(outside / "w.bin", inner / "w.bin")
    with pytest.raises(InputError, match="hard link"):
        load_model(path)


def test_save_is_atomic_and_refuses_the_input_path(tmp_path):
    source = _tiny(tmp_path)
    original = source.read_bytes()
    model = load_model(source)
    with pytest.raises(UsageError, match="refusing to overwrite the input model"):
        save_model(model, source, protect=(source,))
    assert source.read_bytes() == original
    target = tmp_path / "copy.onnx"
    save_model(model, target, protect=(source,))
    assert onnx.load(target).graph.node[0].op_type == "Relu"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_failed_save_leaves_the_old_output_untouched(tmp_path, monkeypatch):
    source = _tiny(tmp_path)
    target = tmp_path / "out.onnx"
    target.write_bytes(b"previous")
    model = load_model(source)

    def explode(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("onnxopt.model_io._save_inline", explode)
    with pytest.raises(RuntimeError):
        save_model(model, target)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "out.onnx"]


def test_cli_refuses_to_overwrite_input_without_in_place(tmp_path, capsys):
    source = _tiny(tmp_path)
    original = source.read_bytes()
    assert main(["optimize", str(source), "-o", str(source), "-p", "remove-unused", "--quiet"]) == 2
    assert "refusing to overwrite the input model" in capsys.readouterr().err
    assert source.read_bytes() == original


def test_save_with_external_data_round_trips(tmp_path):
    model = load_model(_external_model(tmp_path))
    out = tmp_path / "ext_out.onnx"
    save_model(model, out, external_data=True)
    assert (tmp_path / "ext_out.onnx.data").exists()
    again = load_model(out)
    np.testing.assert_array_equal(again.graph.initializers["w"].const_value.numpy(),
                                  np.arange(6, dtype=np.float32).reshape(2, 3))


def test_inline_save_embeds_external_tensors(tmp_path):
    model = load_model(_external_model(tmp_path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    save_model(model, elsewhere / "m.onnx")
    proto = onnx.load(elsewhere / "m.onnx")
    assert proto.graph.initializer[0].data_location == onnx.TensorProto.DEFAULT
    shutil.rmtree(elsewhere)


def test_models_past_the_protobuf_limit_save_with_external_data(tmp_path, monkeypatch):
    """Weights over the threshold (about 1.8 GB; lowered here) go to <name>.data beside the model."""
    import onnxopt.model_io as model_io
    from onnxopt.models import builders

    source = tmp_path / "mlp.onnx"
    onnx.save(builders.build_mlp(), source)
    model = load_model(source)
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "big.onnx"
    save_model(model, out)
    proto = onnx.load(out, load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and (tmp_path / "big.onnx.data").stat().st_size >= sum(
        np.prod(t.dims) * 4 for t in external)
    reloaded = load_model(out)
    np.testing.assert_array_equal(reloaded.graph.initializers["fc1_weight"].const_value.numpy(),
                                  model.graph.initializers["fc1_weight"].const_value.numpy())
