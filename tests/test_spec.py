"""Pipeline spec parsing, canonical text round trip, recipes and registry errors."""

from __future__ import annotations

import json

import pytest

from onnxopt import UsageError, parse_pipeline, parse_recipe, pipeline_text
from onnxopt.registry import Registry
from onnxopt.spec import recipe_data
from tests.core_passes import PerturbWeightsPass, RenameNodesPass, core_registry

REG = core_registry()


def test_spec_text_round_trips_through_the_parser():
    specs = parse_pipeline(["perturb-weights:scale=0.5", "name-nodes"], REG)
    text = pipeline_text(specs)
    assert text == "perturb-weights:scale=0.5 name-nodes"
    assert parse_pipeline([text], REG) == specs


def test_default_options_print_as_the_bare_name():
    specs = parse_pipeline(["perturb-weights:scale=0.01"], REG)
    assert pipeline_text(specs) == "perturb-weights"


def test_family_expands_to_its_members():
    assert [s.name for s in parse_pipeline(["tidy"], REG)] == ["name-nodes"]


def test_family_takes_no_options():
    with pytest.raises(UsageError, match="family"):
        parse_pipeline(["tidy:x=1"], REG)


def test_unknown_pass_lists_valid_names_and_suggests():
    with pytest.raises(UsageError) as err:
        parse_pipeline(["perturb-weight"], REG)
    assert "did you mean 'perturb-weights'" in str(err.value)
    assert "name-nodes" in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(UsageError, match="no option 'scal'; valid options: scale"):
        parse_pipeline(["perturb-weights:scal=1"], REG)


def test_bad_option_value_names_the_option():
    with pytest.raises(UsageError, match="option 'scale'"):
        parse_pipeline(["perturb-weights:scale=lots"], REG)


def test_malformed_option_text():
    with pytest.raises(UsageError, match="key=value"):
        parse_pipeline(["perturb-weights:scale"], REG)
    with pytest.raises(UsageError, match="unbalanced"):
        parse_pipeline(["perturb-weights:scale=[1"], REG)


def test_json_and_yaml_recipes_parse_to_the_same_specs_as_cli_text(tmp_path):
    cli = parse_pipeline(["perturb-weights:scale=0.5", "name-nodes"], REG)
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(recipe_data(cli)))
    yaml_path = tmp_path / "r.yaml"
    yaml_path.write_text("- pass: perturb-weights\n  options: {scale: 0.5}\n- pass: name-nodes\n")
    assert parse_recipe(json_path, REG) == cli
    assert parse_recipe(yaml_path, REG) == cli


def test_recipe_errors_are_usage_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- pass: perturb-weights\n  options: {nope: 1}\n")
    with pytest.raises(UsageError, match="valid options: scale"):
        parse_recipe(bad, REG)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(UsageError, match="not valid JSON"):
        parse_recipe(broken, REG)


def core_registry_refuses_duplicate_and_bad_names():
    with pytest.raises(ValueError, match="twice"):
        Registry([RenameNodesPass, RenameNodesPass])
    with pytest.raises(ValueError, match="unknown passes"):
        Registry([PerturbWeightsPass], {"fam": ["missing"]})


def test_list_options_round_trip():
    from onnxopt.options import convert_value, format_value

    value = convert_value(tuple[str, ...], "[Conv,MatMul]")
    assert value == ("Conv", "MatMul")
    assert convert_value(tuple[str, ...], format_value(value)) == value


def test_dispatch_name_routes_by_option_and_prints_the_pass_itself():
    registry = Registry([RenameNodesPass, PerturbWeightsPass], dispatch={
        "noise": ("mode", "weights", {"weights": "perturb-weights", "names": "name-nodes"})})
    specs = parse_pipeline(["noise:mode=weights,scale=0.5", "noise:mode=names", "noise"], registry)
    assert pipeline_text(specs) == "perturb-weights:scale=0.5 name-nodes perturb-weights"
    with pytest.raises(UsageError, match="must be one of weights, names"):
        parse_pipeline(["noise:mode=bogus"], registry)


def test_quantize_dispatches_to_the_quantization_passes():
    text = pipeline_text(parse_pipeline(["quantize:mode=static,calibration=percentile", "quantize:mode=weights,bits=4"]))
    assert text == "quantize-static:calibration=percentile quantize-weights:bits=4"
