"""The command line: exit codes, one-line errors, and the README's main command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.cli import main


def test_readme_main_command_on_the_bundled_model(tmp_path, capsys, cls_path):
    out, report = tmp_path / "out" / "cls_int8.onnx", tmp_path / "out" / "report.json"
    code = main(["optimize", str(cls_path), "-o", str(out), "-p", "cleanup", "-p", "quantize-weights:bits=8",
                 "--dim", "x.2=48", "--dim", "x.3=192", "--budget", "cosine=0.999", "--report", str(report)])
    assert code == 0
    table = capsys.readouterr().out
    assert "quantize-weights" in table and "fold-constants" in table
    data = json.loads(report.read_text())
    assert data["ok"] and data["passes"][-1]["fidelity_metrics"]
    assert out.stat().st_size < cls_path.stat().st_size * 0.5


def test_unknown_pass_fails_before_the_model_is_read(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "fold-constant"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'fold-constant'" in err and "did you mean 'fold-constants'" in err
    assert "missing.onnx" not in err


def test_unknown_option_lists_valid_ones(tmp_path, capsys, cls_path):
    assert main(["optimize", str(cls_path), "-o", str(tmp_path / "o.onnx"), "-p", "quantize-weights:bitz=4"]) == 2
    assert "valid options: bits," in capsys.readouterr().err


def test_bad_usage_is_one_line_exit_2(capsys):
    assert main(["optimize"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("onnxopt: error:")


def test_recipe_and_cli_text_give_the_same_pipeline(tmp_path, cls_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- pass: remove-unused\n- pass: quantize-weights\n  options: {bits: 4, granularity: blocked}\n")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    main(["optimize", str(cls_path), "-o", str(tmp_path / "a.onnx"), "--recipe", str(recipe), "--report", str(a),
          "--quiet", "--validate", "off"])
    main(["optimize", str(cls_path), "-o", str(tmp_path / "b.onnx"), "-p", "remove-unused",
          "-p", "quantize-weights:bits=4,granularity=blocked", "--report", str(b), "--quiet", "--validate", "off"])
    assert json.loads(a.read_text())["pipeline"] == json.loads(b.read_text())["pipeline"] \
        == "remove-unused quantize-weights:bits=4,granularity=blocked"


def test_budget_failure_exits_1_and_keep_going_exits_0(tmp_path, capsys, cls_path):
    args = ["optimize", str(cls_path), "-o", str(tmp_path / "o.onnx"), "-p", "quantize-weights:bits=2",
            "--budget", "max_abs=0", "--dim", "x.2=48", "--dim", "x.3=192", "--quiet"]
    assert main(args) == 1
    assert "rolled back" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
    assert main(args + ["--keep-going"]) == 0
    assert (tmp_path / "o.onnx").exists()


def test_validate_command_exit_codes(tmp_path, capsys, cls_path):
    assert main(["validate", str(cls_path), str(cls_path), "--dim", "x.2=48", "--dim", "x.3=192"]) == 0
    model = onnx.load(cls_path)
    constant = next(n for n in model.graph.node if n.op_type == "Constant" and len(n.attribute[0].t.dims) == 4)
    weights = numpy_helper.to_array(constant.attribute[0].t)
    constant.attribute[0].t.CopyFrom(numpy_helper.from_array(weights * -1.0, constant.attribute[0].t.name))
    changed = tmp_path / "changed.onnx"
    onnx.save(model, changed)
    capsys.readouterr()
    assert main(["validate", str(cls_path), str(changed), "--dim", "x.2=48", "--dim", "x.3=192"]) == 1
    assert "validation failed" in capsys.readouterr().err
    assert main(["validate", str(cls_path), str(changed), "--dim", "x.2=48", "--dim", "x.3=192",
                 "--budget", "cosine=0.0"]) == 0


def test_inspect_json(capsys, cls_path):
    assert main(["inspect", str(cls_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opsets"] == {"": 11} and info["inputs"][0]["name"] == "x"
    assert info["ops"]["Conv"] == 53 and info["parameters"] > 100_000


def test_passes_lists_every_registered_pass_with_options(capsys):
    assert main(["passes", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in listing["passes"]]
    assert "fold-constants" in names and "quantize-weights" in names
    quant = next(p for p in listing["passes"] if p["name"] == "quantize-weights")
    assert {"name": "bits", "type": "int", "default": "8"}.items() <= next(
        o for o in quant["options"] if o["name"] == "bits").items()
    assert "cleanup" in listing["families"]


def test_in_place_needs_the_same_path_and_then_overwrites(tmp_path, cls_path):
    model = tmp_path / "m.onnx"
    shutil.copy(cls_path, model)
    assert main(["optimize", str(model), "-o", str(tmp_path / "x.onnx"), "-p", "remove-unused", "--in-place"]) == 2
    assert main(["optimize", str(model), "-o", str(model), "-p", "cleanup", "--in-place", "--quiet",
                 "--dim", "x.2=48", "--dim", "x.3=192"]) == 0
    assert len(onnx.load(model).graph.node) < 566


def test_data_npz_with_wrong_input_name_is_exit_2(tmp_path, capsys, cls_path):
    data = tmp_path / "d.npz"
    np.savez(data, image=np.zeros((2, 1, 3, 48, 192), np.float32))
    assert main(["optimize", str(cls_path), "-o", str(tmp_path / "o.onnx"), "-p", "remove-unused",
                 "--data", str(data), "--quiet"]) == 2
    assert "no array for model input(s) x" in capsys.readouterr().err


def test_model_that_fails_on_generated_inputs_says_how_to_give_real_ones(tmp_path, capsys):
    from tests.helpers import model_from_text
    from onnxopt.model_io import save_model

    # a reflect pad of 40 needs more than the 32 elements a generated symbolic dim gets
    model = model_from_text("""
        <ir_version: 8, opset_import: ["" : 18]>
        g (float[1, n] x) => (float[1, m] y) {
            pads = Constant<value = int64[4] {0, 40, 0, 40}>()
            y = Pad<mode = "reflect">(x, pads)
        }""")
    save_model(model, tmp_path / "m.onnx")
    args = ["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "o.onnx"), "-p", "quantize-weights", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--dim NAME=VALUE" in err and "inputs were generated" in err
    assert main(args + ["--dim", "x.1=64"]) == 0
