"""Small shared test helpers: ONNX text in, ORT (optimizations disabled) numbers out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

import onnxopt


def model_from_text(text: str) -> ir.Model:
    """Parse ONNX textual syntax (graph plus optional functions) into an IR model."""
    return ir.from_proto(onnx.parser.parse_model(text))


def _proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return ir.to_proto(model) if isinstance(model, ir.Model) else model


def ort_session(model: ir.Model | onnx.ModelProto) -> ort.InferenceSession:
    """A CPU session with every ORT graph optimization disabled, so ORT cannot mask a rewrite."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    return ort.InferenceSession(
        _proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def run_ort(model: ir.Model | onnx.ModelProto, feeds: Mapping[str, Any] | Sequence[Any]) -> list:
    """Run ``model`` once; ``feeds`` maps input names to values, or lists them in input order."""
    session = ort_session(model)
    if not isinstance(feeds, Mapping):
        names = [i.name for i in session.get_inputs()]
        feeds = dict(zip(names, feeds))
    return session.run(None, dict(feeds))


def random_feeds(model: ir.Model | onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    """Random tensors for the model's real inputs (not initializers); unknown dims become 2."""
    graph = model.graph if isinstance(model, ir.Model) else ir.from_proto(model).graph
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in graph.inputs:
        if value.const_value is not None and value.is_initializer():
            continue
        if not isinstance(value.type, ir.TensorType):
            raise ValueError(f"cannot make a random feed for non-tensor input {value.name}")
        dtype = value.dtype.numpy()
        shape = tuple(d if isinstance(d, int) and d >= 0 else 2 for d in (value.shape or ()))
        if np.issubdtype(dtype, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[value.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[value.name] = rng.integers(0, 5, shape).astype(dtype)
    return feeds


def assert_same_outputs(
    before: ir.Model | onnx.ModelProto,
    after: ir.Model | onnx.ModelProto,
    feeds: Mapping[str, Any] | None = None,
    rtol: float = 1e-4,
    atol: float = 1e-5,
) -> None:
    """Both models give the same outputs in ORT (random feeds from ``before`` when none given)."""
    feeds = random_feeds(before) if feeds is None else feeds
    expected, actual = run_ort(before, feeds), run_ort(after, feeds)
    assert len(actual) == len(expected)
    for i, (want, got) in enumerate(zip(expected, actual)):
        want, got = np.asarray(want), np.asarray(got)
        assert got.dtype == want.dtype and got.shape == want.shape, f"output {i}"
        if want.dtype.kind in "OSUb":
            np.testing.assert_array_equal(got, want, err_msg=f"output {i}")
        else:
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"output {i}")


def op_types(model: ir.Model) -> list[str]:
    """Op types of every node, main graph first, then subgraphs and functions."""
    return [node.op_type for node in onnxopt.all_nodes(model)]
