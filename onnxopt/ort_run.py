"""ONNX Runtime sessions for validation and calibration.

Sessions used to *check* a rewrite run with ORT's graph optimizations disabled, so that
ORT cannot mask (or add) a rewrite; MatMulNBits accuracy level 0 keeps activations in
float where ORT would otherwise quantize them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from .errors import InputError
from .model_io import has_deferred_tensors, weights_bytes
from .ort_values import from_ort, needs_ort_values, to_ort

# Models whose serialized protobuf would exceed this are handed to ORT as files.
_IN_MEMORY_LIMIT = 1_500_000_000


def session_options(optimized: bool = False, threads: int | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    options.log_severity_level = 4  # failures surface as one-line InputErrors, not ORT's log
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return options


def make_session(
    model: ir.Model | str | os.PathLike,
    *,
    optimized: bool = False,
    threads: int | None = None,
) -> ort.InferenceSession:
    """An ORT CPU session for an IR model or a model file."""
    options = session_options(optimized, threads)
    if isinstance(model, (str, os.PathLike)):
        return _session_from(str(model), options)
    if has_deferred_tensors(model) or weights_bytes(model) > _IN_MEMORY_LIMIT:
        with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return _session_from(str(path), options)
    return _session_from(ir.to_proto(model).SerializeToString(), options)


def _session_from(source, options: ort.SessionOptions) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own exception types without a common base
        raise InputError(f"ONNX Runtime cannot load the model: {_first_line(exc)}") from None


def _cast_float_inputs(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    wanted = {i.name: _FLOAT_INPUTS.get(i.type) for i in session.get_inputs()}
    return {name: array.astype(wanted[name]) if wanted.get(name) is not None and array.dtype != wanted[name]
            and np.issubdtype(array.dtype, np.floating) else array for name, array in feed.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ORT input type -> numpy dtype, for float inputs a rewrite may retype (convert-float16 keep_io_types=false).
_FLOAT_INPUTS = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


def run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one feed; returns outputs by name. Extra feed keys the model lacks are an error.

    Feeds are checked against the original model when they are loaded; a float input the
    rewritten model takes in another float type (float16 IO) is cast to it here.
    """
    feed = _cast_float_inputs(session, feed)
    input_names = {i.name for i in session.get_inputs()}
    missing = input_names - feed.keys()
    if missing:
        raise InputError(f"data has no array for model input(s): {', '.join(sorted(missing))}")
    unknown = feed.keys() - input_names
    if unknown:
        raise InputError(f"data has arrays the model has no input for: {', '.join(sorted(unknown))}")
    names = [o.name for o in session.get_outputs()]
    feed = {name: to_ort(array) for name, array in feed.items()}
    try:
        if needs_ort_values(session):  # an output numpy has no type for (bfloat16, int4, ...)
            values = [from_ort(v) for v in session.run_with_ort_values(names, feed)]
        else:
            values = session.run(names, feed)
    except Exception as exc:
        raise InputError(f"ONNX Runtime failed to run the model: {_first_line(exc)}") from None
    return dict(zip(names, values))
