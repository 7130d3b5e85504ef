"""NodeSelector: name, op and region filters over every graph; a selector that matches nothing fails."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import pytest
from helpers import model_from_text

from onnxopt.errors import UsageError
from onnxopt.options import build_options, describe_options
from onnxopt.selectors import (
    SELECTOR_FIELDS,
    NodeSelector,
    SelectorOptions,
    selector_field,
    selector_from_options,
)

TEXT = """<ir_version: 10, opset_import: ["" : 17]>
g (float[2,3] x, bool c) => (float[2,3] y, float[2,3] side) {
    [block1_relu] a = Relu (x)
    [block1_sig] b = Sigmoid (a)
    [side_neg] side = Neg (x)
    [block2_add] d = Add (b, a)
    [cond_if] y = If (c) <
        then_branch = t () => (float[2,3] t_out) { [inner_relu] t_out = Relu (d) },
        else_branch = e () => (float[2,3] e_out) { [inner_abs] e_out = Abs (d) }>
}"""


def _names(nodes):
    return [n.name for n in nodes]


def test_empty_selector_selects_every_node_of_every_graph():
    model = model_from_text(TEXT)
    selector = NodeSelector()
    assert selector.is_trivial
    assert sorted(_names(selector.select(model))) == sorted(
        ["block1_relu", "block1_sig", "side_neg", "block2_add", "cond_if", "inner_relu", "inner_abs"])


def test_nodes_regex_is_searched_in_names():
    model = model_from_text(TEXT)
    assert _names(NodeSelector(nodes=("^block1_",)).select(model)) == ["block1_relu", "block1_sig"]
    assert _names(NodeSelector(nodes=("relu$",)).select(model)) == ["block1_relu", "inner_relu"]


def test_exclude_nodes_and_ops_fields():
    model = model_from_text(TEXT)
    assert "side_neg" not in _names(NodeSelector(exclude_nodes=("side",)).select(model))
    assert _names(NodeSelector(ops=("Relu", "Abs")).select(model)) == ["block1_relu", "inner_relu", "inner_abs"]
    kept = _names(NodeSelector(exclude_ops=("Relu", "If")).select(model))
    assert "block1_relu" not in kept and "cond_if" not in kept and "inner_abs" in kept


def test_fields_combine_with_and():
    model = model_from_text(TEXT)
    selector = NodeSelector(nodes=("block",), ops=("Relu", "Add"), exclude_nodes=("add",))
    assert _names(selector.select(model)) == ["block1_relu"]
    node = next(n for n in model.graph if n.name == "block2_add")
    assert not selector.matches(node)


def test_region_selects_nodes_on_paths_between_two_tensors_with_their_subgraphs():
    model = model_from_text(TEXT)
    selector = NodeSelector(region=("a", "y"))
    names = _names(selector.select(model))
    # side_neg is off every path from a to y; block1_relu produces a, it is not after it
    assert names == ["block1_sig", "block2_add", "cond_if", "inner_relu", "inner_abs"]
    assert _names(NodeSelector(region=("x", "b")).select(model)) == ["block1_relu", "block1_sig"]
    assert _names(NodeSelector(region=("a", "y"), ops=("Relu",)).select(model)) == ["inner_relu"]


def test_region_follows_values_captured_by_subgraphs():
    model = model_from_text(TEXT)
    # d is used only inside the If branches: the If node is on the path from d to y
    assert _names(NodeSelector(region=("d", "y")).select(model)) == ["cond_if", "inner_relu", "inner_abs"]


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"nodes": ("nothing_like_this",)}, ["nodes", "nothing_like_this"]),
        ({"ops": ("Conv",)}, ["ops", "Conv"]),
        ({"ops": ("Relu",), "nodes": ("side",)}, ["ops", "Relu", "side"]),
        ({"exclude_ops": ("Relu", "Sigmoid", "Neg", "Add", "If", "Abs")}, ["exclude_ops"]),
    ],
)
def test_selector_that_matches_nothing_raises_naming_what_it_looked_for(kwargs, words):
    with pytest.raises(UsageError) as info:
        NodeSelector(**kwargs).select(model_from_text(TEXT))
    assert "matched no node" in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_region_errors_are_usage_errors():
    model = model_from_text(TEXT)
    with pytest.raises(UsageError, match="no tensor named 'nope'"):
        NodeSelector(region=("nope", "y")).select(model)
    with pytest.raises(UsageError, match="no path"):
        NodeSelector(region=("side", "y")).select(model)
    with pytest.raises(UsageError, match="two tensor names"):
        NodeSelector(region=("a",))
    with pytest.raises(UsageError, match="bad regular expression"):
        NodeSelector(nodes=("(",))


def test_options_dataclasses_share_field_names_and_help():
    @dataclasses.dataclass(frozen=True)
    class Options:
        bits: int = 8
        nodes: tuple[str, ...] = selector_field("nodes")
        ops: tuple[str, ...] = selector_field("ops")

    options = build_options(Options, {"ops": "[MatMul,Conv]", "nodes": "fc.*"}, owner="demo")
    selector = selector_from_options(options)
    assert selector == NodeSelector(nodes=("fc.*",), ops=("MatMul", "Conv"))
    rows = {row["name"]: row for row in describe_options(SelectorOptions)}
    assert list(rows) == list(SELECTOR_FIELDS)
    assert all(row["help"] and row["default"] == "[]" for row in rows.values())
    assert selector_from_options(SelectorOptions()).is_trivial


def test_matches_checks_region_membership_when_given():
    model = model_from_text(TEXT)
    selector = NodeSelector(region=("a", "y"))
    region = selector.region_nodes(model)
    side = next(n for n in model.graph if n.name == "side_neg")
    add = next(n for n in model.graph if n.name == "block2_add")
    assert selector.matches(add, region) and not selector.matches(side, region)
    assert isinstance(region, frozenset) and all(isinstance(n, ir.Node) for n in region)


def test_selection_covers_function_bodies_and_regions_inside_them():
    model = model_from_text("""<ir_version: 10, opset_import: ["" : 17, "local" : 1]>
        g (float[2] x) => (float[2] y) { [call] y = local.f(x) }
        <domain: "local", opset_import: ["" : 17]>
        f (a) => (b) { [f_relu] t = Relu(a)  [f_neg] b = Neg(t)  [f_abs] u = Abs(a) }""")
    assert _names(NodeSelector(nodes=("^f_",)).select(model)) == ["f_relu", "f_neg", "f_abs"]
    assert _names(NodeSelector(region=("a", "b")).select(model)) == ["f_relu", "f_neg"]
