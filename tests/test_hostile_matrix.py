"""Every registered pass x every corpus model (hostile_corpus.py), through the API.

Each run either works — the rewritten model is written, ORT loads it, every output is still
there and validation passed — or is refused with a one-line typed error (at load, while
generating inputs, by the pass itself, or by the runner's reference run). A crash, a model
ORT cannot load, a structural break or a lossless pass changing outputs fails the test.
The registry is iterated, so passes added later join the matrix by themselves. Lossy passes
run with ``--budget none`` (fidelity is other tests' business; here only safety counts) and
every ``min_*`` size threshold lowered, so that they act on these tiny models.
"""

from __future__ import annotations

import onnx
import pytest

from onnxopt import OnnxoptError, api
from onnxopt.registry import default_registry

from helpers import ort_session
from hostile_corpus import CORPUS, FAST

PASSES = default_registry().names()

# Runner verdicts that mean the pass broke the model (caught by the safety net, but a bug).
BROKEN = ("structural check", "ORT cannot run the rewritten model", "a lossless pass changed outputs",
          "the pass reported no change but the model changed")

# (pass, model) -> why it is expected to fail; strict: the entry must go when the pass is fixed.
KNOWN: dict[tuple[str, str], str] = {}


def _cases(models):
    for model in models:
        for name in PASSES:
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN[(name, model)])] if (name, model) in KNOWN else []
            yield pytest.param(name, model, marks=marks, id=f"{name}-{model}")


def eager_spec(pass_name: str, proto: onnx.ModelProto | None = None) -> str:
    """The pass with every ``min_*`` size threshold lowered, so it acts on the corpus's tiny models;
    an empty ``tensors`` or ``ops`` list (split passes need one) is filled from ``proto``: the
    middle node's first output, every op type of the main graph."""
    import dataclasses

    options = []
    for field in dataclasses.fields(default_registry().get(pass_name).Options):
        if field.name.startswith("min_") and field.type in ("int", int):
            options.append(f"{field.name}=1")
        elif field.name.startswith("min_") and field.type in ("float", float):
            options.append(f"{field.name}=0")
        elif field.name in ("tensors", "ops") and proto is not None and not _default(field) and proto.graph.node:
            nodes = proto.graph.node
            picked = [nodes[len(nodes) // 2].output[0]] if field.name == "tensors" else \
                sorted({n.op_type for n in nodes if n.domain in ("", "ai.onnx")})
            options.append(f"{field.name}=[{','.join(picked)}]")
    return pass_name + (":" + ",".join(options) if options else "")


def _default(field):
    import dataclasses

    return field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default


def bad_scales(proto: onnx.ModelProto) -> list[str]:
    """Scale inputs of (De)QuantizeLinear and MatMulNBits/GatherBlockQuantized that are constant and
    hold a NaN, an Inf or a zero, in every graph and function."""
    import numpy as np
    import onnx_ir as ir

    model = ir.from_proto(proto)
    found = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        found += _node_scales(node)
    for function in model.functions.values():
        for node in function:
            found += _node_scales(node)
    return found


def _node_scales(node) -> list[str]:
    import numpy as np

    position = {"QuantizeLinear": 1, "DequantizeLinear": 1, "MatMulNBits": 2, "GatherBlockQuantized": 2}.get(node.op_type)
    if position is None or len(node.inputs) <= position or node.inputs[position] is None:
        return []
    scale = node.inputs[position]
    tensor = scale.const_value
    producer = scale.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        tensor = producer.attributes["value"].as_tensor()
    if tensor is None:
        return []
    values = np.asarray(tensor.numpy(), dtype=np.float64)
    if np.all(np.isfinite(values)) and np.all(values != 0):
        return []
    return [f"{node.op_type} '{node.name}' scale '{scale.name}'"]


def run_one(tmp_path, pass_name: str, model_name: str) -> str:
    """'ok' or 'refused: <line>'; fails the test on anything else."""
    path = tmp_path / f"{model_name}.onnx"
    proto = CORPUS[model_name]()
    onnx.save(proto, path)
    out = tmp_path / "out.onnx"
    out.unlink(missing_ok=True)
    try:
        result = api.optimize(path, out, [pass_name if ":" in pass_name else eager_spec(pass_name, proto)], budget="none", samples=2, dims={"seq": 4},
                              reproducer_dir=tmp_path / "crash")
    except OnnxoptError as exc:
        message = str(exc)
        assert message and "\n" not in message and "Traceback" not in message, message
        return f"refused: {message}"
    run = result.run
    assert run.crash is None, run.crash
    for step in run.steps:
        if step.status in ("failed", "rolled_back"):
            reason = step.reason or ""
            assert reason and "\n" not in reason, reason
            assert not reason.startswith(BROKEN), f"{pass_name} broke {model_name}: {reason}"
            assert not out.exists()
            return f"refused: {reason}"
    assert result.ok, api.failure_summary(run)
    assert out.exists()
    written = onnx.load(out)
    original = onnx.load(path)
    assert [o.name for o in written.graph.output] == [o.name for o in original.graph.output]
    bad = bad_scales(written)
    assert not bad, f"{pass_name} wrote NaN/Inf/zero quantization scales on {model_name}: {bad}"
    session = ort_session(written)  # ORT loads what was written
    assert [o.name for o in session.get_outputs()] == [o.name for o in original.graph.output]
    return "ok"


@pytest.mark.parametrize("pass_name, model_name", list(_cases(FAST)))
def test_pass_survives_hostile_model(tmp_path, pass_name, model_name):
    run_one(tmp_path, pass_name, model_name)


@pytest.mark.slow
@pytest.mark.parametrize("pass_name, model_name", list(_cases(m for m in CORPUS if m not in FAST)))
def test_pass_survives_hostile_model_slow(tmp_path, pass_name, model_name):
    run_one(tmp_path, pass_name, model_name)


# Non-default options that take other code paths (packed 4/2-bit storage and the opset upgrade,
# float16 I/O, int16 activations, int8 dynamic weights); run under slow.
VARIANTS = ("quantize-weights:bits=4,granularity=blocked,min_elements=1", "quantize-weights:bits=2,min_elements=1",
            "convert-float16:keep_io_types=false", "quantize-static:activation_type=int16,min_reduction=1,min_sqnr_db=0",
            "quantize-dynamic:weight_type=int8,min_reduction=1")


@pytest.mark.slow
@pytest.mark.parametrize("spec", VARIANTS)
@pytest.mark.parametrize("model_name", list(CORPUS))
def test_pass_variant_survives_hostile_model(tmp_path, spec, model_name):
    from onnxopt import parse_pipeline

    parse_pipeline([spec])  # a misspelt option would make every run a refusal
    run_one(tmp_path, spec, model_name)


def test_the_control_model_works_with_every_pass(tmp_path):
    """The matrix is not green by refusing everything: the plain MLP goes through every pass."""
    refused = {}
    for name in PASSES:
        outcome = run_one(tmp_path, name, "mlp")
        if outcome != "ok":
            refused[name] = outcome
    assert not refused, refused


def test_every_corpus_model_is_built_valid_or_is_a_deliberate_refusal(tmp_path):
    for name in CORPUS:
        outcome = run_one(tmp_path, "remove-unused", name)
        deliberate = {"huge_dim": "too large to generate", "folding_bomb": "cannot run even the original",
                      "custom_op": "ONNX Runtime cannot load"}
        if name in deliberate:
            assert deliberate[name] in outcome, outcome
        else:
            assert outcome == "ok", f"{name}: {outcome}"
