"""ONNX Runtime sessions for validation and calibration.

Sessions used to *check* a rewrite run with ORT's graph optimizations disabled, so that
ORT cannot mask (or add) a rewrite; MatMulNBits accuracy level 0 keeps activations in
float where ORT would otherwise quantize them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import weakref
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
        fed = None if optimized else _fed_weights_session(model, options)
        if fed is not None:
            return fed
        with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return _session_from(str(path), options)
    return _session_from(ir.to_proto(model).SerializeToString(), options)


class FedWeightsSession:
    """An unoptimized session whose external-data weights are graph inputs, fed on every run from
    read-only maps of their files: no copy of the weights, no temporary model.

    ORT copies weights handed over as initializers (``add_external_initializers``) and rejects
    external data outside the model's directory, while it reads input arrays in place. With
    optimizations disabled an input and an initializer compute the same. ``get_inputs`` lists
    only the model's own inputs.
    """

    def __init__(self, session: ort.InferenceSession, weights: dict[str, np.ndarray], maps: list[np.memmap]):
        self._session = session
        self._weights = weights
        self._maps = maps
        self._inputs = [i for i in session.get_inputs() if i.name not in weights]

    def get_inputs(self):
        return self._inputs

    def run(self, output_names, input_feed, run_options=None):
        try:
            return self._session.run(output_names, {**input_feed, **self._weights}, run_options)
        finally:
            for mapped in self._maps:  # drop the pages from this process (they stay in the page cache)
                _forget_pages(mapped)

    def __getattr__(self, name):
        return getattr(self._session, name)


# One read-only map per data file, shared by every session that feeds from it and closed when
# the last one is gone (a page mapped twice would count twice in the resident set).
_FILE_MAPS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _forget_pages(mapped: np.memmap) -> None:
    """Unmap the resident pages of a read-only file map: the next read faults them back in from
    the page cache, and meanwhile they do not count in this process's resident set."""
    raw = getattr(mapped, "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        raw.madvise(mmap.MADV_DONTNEED)


def _file_map(path: str) -> np.memmap:
    info = os.stat(path)
    key = (os.path.realpath(path), info.st_ino, info.st_size, info.st_mtime_ns)
    mapped = _FILE_MAPS.get(key)
    if mapped is None:
        mapped = np.memmap(path, dtype=np.uint8, mode="r")
        _FILE_MAPS[key] = mapped
    return mapped


def _fed_weights_session(model: ir.Model, options: ort.SessionOptions) -> FedWeightsSession | None:
    """A :class:`FedWeightsSession` for ``model``: its main-graph external-data initializers become
    graph inputs mapped from their files; the rest (lazily computed weights included, one at a
    time) is written to a temporary model that ORT loads.

    ``None`` when that does not fit: external tensors in subgraphs or Constant nodes, or dtypes
    numpy cannot map (sub-byte or float8); the caller then writes the whole model.
    """
    external = {name: value for name, value in model.graph.initializers.items()
                if isinstance(value.const_value, ir.ExternalTensor)}
    if not external or _external_outside_main_graph(model):
        return None
    if any(v.const_value.dtype.bitwidth % 8 or v.const_value.dtype.numpy().kind == "V" for v in external.values()):
        return None
    weights, maps = {}, {}
    for name, value in external.items():
        tensor = value.const_value
        shape = tuple(tensor.shape.numpy())
        count = int(np.prod(shape, dtype=np.int64))
        mapped = maps.setdefault(tensor.path, _file_map(tensor.path))
        weights[name] = np.frombuffer(mapped, dtype=tensor.dtype.numpy(), count=count,
                                      offset=tensor.offset or 0).reshape(shape)
    options.enable_cpu_mem_arena = False  # freed run-time buffers (dequantized weights) go back at once
    with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        with _initializers_as_inputs(model.graph, list(external.values())):
            ir.save(model, path, external_data="model.onnx.data")
        return FedWeightsSession(_session_from(str(path), options), weights, list(maps.values()))


@contextlib.contextmanager
def _initializers_as_inputs(graph: ir.Graph, values: list[ir.Value]):
    """Within the block, ``values`` are graph inputs instead of initializers (their tensors detached);
    afterwards the graph is as it was, initializer order included."""
    order = list(graph.initializers.values())
    tensors = [v.const_value for v in values]
    for value in values:
        graph.initializers.pop(value.name)
        value.const_value = None
        graph.inputs.append(value)
    try:
        yield
    finally:
        for value, tensor in zip(values, tensors):
            graph.inputs.remove(value)
            value.const_value = tensor
        graph.initializers.clear()
        for value in order:
            graph.initializers.add(value)


def _external_outside_main_graph(model: ir.Model) -> bool:
    from .graph_walk import all_graphs

    for graph in all_graphs(model):
        if graph is not model.graph and any(isinstance(v.const_value, ir.ExternalTensor)
                                            for v in getattr(graph, "initializers", {}).values()):
            return True
    return any(node.op_type == "Constant" and isinstance(getattr(node.attributes.get("value"), "value", None),
                                                          ir.ExternalTensor)
               for node in ir.traversal.RecursiveGraphIterator(model.graph))


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
