"""Conformance replay: every ONNX backend case that ORT passes still passes after `cleanup`.

The ~1,900 node cases of ``onnx.backend.test`` are built in memory (model, reference inputs
and outputs, tolerances). A case counts when ONNX Runtime (CPU, graph optimizations disabled)
matches the reference on the original model; the cleanup pipeline is then applied and the
serialized result must match the reference too. Most node cases hold one op, so the 140
small multi-node models the package ships as files (``simple``, ``pytorch-converted``,
``pytorch-operator``) are replayed the same way. The full replay takes well under a minute
here, so it runs in the default suite.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx.backend.test.runner import Runner

import onnxopt

from helpers import ort_session

# onnx 1.23 + onnxruntime 1.32 on CPU: 1,525 of 1,884 node cases pass on the original model,
# and 100 of the 140 model cases.
MIN_REPLAYED = 1500
MIN_MODELS_REPLAYED = 95
MODEL_KINDS = ("simple", "pytorch-converted", "pytorch-operator")


@pytest.fixture(scope="module")
def node_cases():
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators warn about deliberate overflows
        return load_model_tests(kind="node")


def _array(value):
    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else value


def _check_case(proto: onnx.ModelProto, case) -> None:
    """Raise unless ORT reproduces the reference outputs of every data set of ``case``."""
    session = ort_session(proto)
    names = [i.name for i in session.get_inputs()]
    for inputs, expected in case.data_sets:
        actual = session.run(None, dict(zip(names, map(_array, inputs))))
        Runner.assert_similar_outputs(
            [_array(e) for e in expected], actual, rtol=case.rtol, atol=case.atol
        )


def _cleaned(proto: onnx.ModelProto) -> onnx.ModelProto:
    model = ir.from_proto(onnx.load_from_string(proto.SerializeToString()))  # cases are shared
    for spec in onnxopt.parse_pipeline(["cleanup"]):
        spec.make_pass()(model)
    return ir.to_proto(model)


def _replay(cases, label=lambda case: case.name) -> tuple[int, list[str]]:
    """Replay every case ORT passes before cleanup; returns the count and the cases cleanup broke."""
    replayed, broken = 0, []
    for case in cases:
        try:
            _check_case(case.model, case)
        except Exception:  # ORT cannot run or match this case even before cleanup
            continue
        replayed += 1
        try:
            _check_case(_cleaned(case.model), case)
        except Exception as exc:
            broken.append(f"{label(case)}: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return replayed, broken


def test_cleanup_keeps_every_ort_passing_backend_node_case_passing(node_cases):
    replayed, broken = _replay(node_cases)
    assert replayed >= MIN_REPLAYED, f"only {replayed} cases replayed"
    assert not broken, f"{len(broken)} of {replayed} cases broken by cleanup:\n" + "\n".join(broken)


def _model_case(case):
    """A file-backed case with its model and data sets read (the loader leaves them None)."""
    directory = Path(case.model_dir)
    data_sets = []
    for folder in sorted(directory.glob("test_data_set_*")):
        def tensors(prefix: str) -> list:
            return [onnx.numpy_helper.to_array(onnx.load_tensor(str(f))) for f in sorted(folder.glob(f"{prefix}_*.pb"))]

        data_sets.append((tensors("input"), tensors("output")))
    return dataclasses.replace(case, model=onnx.load(directory / "model.onnx"), data_sets=data_sets)


def test_cleanup_keeps_every_ort_passing_backend_model_case_passing():
    from onnx.backend.test.loader import load_model_tests

    replayed, broken = 0, []
    for kind in MODEL_KINDS:
        count, failures = _replay(map(_model_case, load_model_tests(kind=kind)), lambda c, k=kind: f"{k}/{c.name}")
        replayed += count
        broken += failures
    assert replayed >= MIN_MODELS_REPLAYED, f"only {replayed} model cases replayed"
    assert not broken, f"{len(broken)} of {replayed} model cases broken by cleanup:\n" + "\n".join(broken)


def test_replay_check_catches_a_wrong_output(node_cases):
    """The comparison the replay relies on fails when an output changes."""
    case = next(c for c in node_cases if c.name == "test_relu")
    _check_case(case.model, case)
    inputs, expected = case.data_sets[0]
    wrong = dataclasses.replace(case, data_sets=[(inputs, [np.asarray(expected[0]) + 1])])
    with pytest.raises(AssertionError):
        _check_case(case.model, wrong)
