"""Conformance replay: every ONNX backend case that ORT passes still passes after rewriting.

The ~1,900 node cases of ``onnx.backend.test`` are built in memory (model, reference inputs
and outputs, tolerances). A case counts when ONNX Runtime (CPU, graph optimizations disabled)
matches the reference on the original model (1,525 do); the rewritten model must match the
reference too, and must give the original's outputs on inputs onnxopt generates (feeds.py:
every dtype ORT takes, 0-d inputs, table indices). Rewrites replayed: the whole ``cleanup``
family, and each lossless pass of the registry on its own. Most node cases hold one op, so
the 140 small multi-node models the package ships as files (``simple``,
``pytorch-converted``, ``pytorch-operator``) are replayed with cleanup as well.

Default run: cleanup over every case on the reference data; on generated inputs a 1-in-8
slice, and each lossless pass over a 1-in-48 slice. ``-m slow`` replays everything.
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
MIN_GENERATED = 1350  # of those, cases ORT also runs on generated inputs (1,372 measured)
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


def _rewritten(proto: onnx.ModelProto, pipeline: tuple[str, ...] = ("cleanup",)) -> onnx.ModelProto:
    model = ir.from_proto(onnx.load_from_string(proto.SerializeToString()))  # cases are shared
    for spec in onnxopt.parse_pipeline(list(pipeline)):
        spec.make_pass()(model)
    return ir.to_proto(model)


def _cleaned(proto: onnx.ModelProto) -> onnx.ModelProto:
    return _rewritten(proto)


def _passes_in_ort(case) -> bool:
    try:
        _check_case(case.model, case)
    except Exception:  # ORT cannot run or match this case even before any rewrite
        return False
    return True


def _replay(cases, label=lambda case: case.name, pipeline=("cleanup",), known_good=False) -> tuple[int, list[str]]:
    """Replay every case ORT passes before the rewrite; returns the count and the cases it broke.
    A pass refusing a case with a typed error leaves it unchanged, which counts as kept."""
    replayed, broken = 0, []
    for case in cases:
        if not known_good and not _passes_in_ort(case):
            continue
        replayed += 1
        try:
            _check_case(_rewritten(case.model, pipeline), case)
        except onnxopt.OnnxoptError:
            continue
        except Exception as exc:
            broken.append(f"{label(case)}: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return replayed, broken


def _replay_generated(cases, pipeline=("cleanup",)) -> tuple[int, list[str]]:
    """The same cases on inputs onnxopt generates (feeds.py: every dtype, 0-d, table indices):
    the rewritten model must give the original's outputs wherever ORT runs the original."""
    from onnxopt import ort_run
    from onnxopt.feeds import generate_feeds, input_specs

    replayed, broken = 0, []
    for case in cases:
        try:
            original = ir.from_proto(case.model)
            feed = generate_feeds(input_specs(original), count=1)[0]
            expected = ort_run.run(ort_run.make_session(original), feed)
        except Exception:  # onnxopt.InputError mostly: ORT rejects generated values some ops constrain
            continue
        replayed += 1
        try:
            actual = ort_run.run(ort_run.make_session(ir.from_proto(_rewritten(case.model, pipeline))), feed)
            for name, want in expected.items():
                _assert_same(want, actual[name], case)
        except onnxopt.OnnxoptError as exc:
            if str(exc).startswith("ONNX Runtime"):
                broken.append(f"{case.name}: {str(exc)[:300]}")
        except Exception as exc:
            broken.append(f"{case.name}: {type(exc).__name__}: {str(exc).strip()[:300]}")
    return replayed, broken


def _assert_same(want, got, case) -> None:
    want, got = np.asarray(want), np.asarray(got)
    assert want.shape == got.shape and want.dtype == got.dtype, f"{want.dtype}{want.shape} vs {got.dtype}{got.shape}"
    if want.dtype.kind in "OSUb" or want.size == 0:
        np.testing.assert_array_equal(got, want)
    else:  # 16-bit floats: a lossless rewrite may round in another order (two fp16 ulps)
        low = want.dtype.kind in "fV" and want.dtype.itemsize <= 2
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=2e-2 if low else max(case.rtol, 1e-5),
                                   atol=2e-3 if low else max(case.atol, 1e-6), equal_nan=True)


def _lossless_passes() -> list[str]:
    from onnxopt.registry import default_registry

    registry = default_registry()
    return [name for name in registry.names() if registry.get(name)().fidelity == onnxopt.Fidelity.LOSSLESS]


@pytest.fixture(scope="module")
def ort_passing(node_cases):
    """The node cases ORT matches on the original model (computed once: about 1,525)."""
    return [case for case in node_cases if _passes_in_ort(case)]


def test_cleanup_keeps_every_ort_passing_backend_node_case_passing(ort_passing):
    replayed, broken = _replay(ort_passing, known_good=True)
    assert replayed >= MIN_REPLAYED, f"only {replayed} cases replayed"
    assert not broken, f"{len(broken)} of {replayed} cases broken by cleanup:\n" + "\n".join(broken)


def test_cleanup_keeps_outputs_on_generated_inputs_slice(ort_passing):
    replayed, broken = _replay_generated(ort_passing[::GENERATED_SAMPLE])
    assert replayed >= MIN_GENERATED // GENERATED_SAMPLE - 5, f"only {replayed} cases ran on generated inputs"
    assert not broken, f"{len(broken)} of {replayed} cases broken by cleanup on generated inputs:\n" + "\n".join(broken)


@pytest.mark.slow
def test_cleanup_keeps_outputs_on_generated_inputs(ort_passing):
    replayed, broken = _replay_generated(ort_passing)
    assert replayed >= MIN_GENERATED, f"only {replayed} cases ran on generated inputs"
    assert not broken, f"{len(broken)} of {replayed} cases broken by cleanup on generated inputs:\n" + "\n".join(broken)


# Each lossless pass on its own: a fixed 1-in-SAMPLE slice by default (a different slice per
# pass), every case under -m slow. Passes added to the registry later join by themselves.
SAMPLE = 48
GENERATED_SAMPLE = 8


@pytest.mark.parametrize("pass_name", _lossless_passes())
def test_each_lossless_pass_keeps_a_slice_of_the_cases_passing(ort_passing, pass_name):
    offset = _lossless_passes().index(pass_name) % SAMPLE
    cases = ort_passing[offset::SAMPLE]
    replayed, broken = _replay(cases, pipeline=(pass_name,), known_good=True)
    generated, broken_generated = _replay_generated(cases, pipeline=(pass_name,))
    assert replayed >= MIN_REPLAYED // SAMPLE and generated >= MIN_GENERATED // SAMPLE - 8
    assert not broken + broken_generated, f"{pass_name} broke:\n" + "\n".join(broken + broken_generated)


@pytest.mark.slow
@pytest.mark.parametrize("pass_name", _lossless_passes())
def test_each_lossless_pass_keeps_every_case_passing(ort_passing, pass_name):
    replayed, broken = _replay(ort_passing, pipeline=(pass_name,), known_good=True)
    generated, broken_generated = _replay_generated(ort_passing, pipeline=(pass_name,))
    assert replayed >= MIN_REPLAYED and generated >= MIN_GENERATED
    assert not broken + broken_generated, f"{pass_name} broke:\n" + "\n".join(broken + broken_generated)


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
