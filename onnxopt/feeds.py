"""Validation and calibration inputs ("feeds"): one dict of input name -> array per sample.

Data files:
- an ``.npz`` whose arrays are keyed by input name and stacked on a new leading sample
  axis (array ``x`` of shape ``[S, *input_shape]`` gives S feeds);
- a directory of ``.npz`` files, one feed each (arrays keyed by input name, no sample axis),
  read in sorted file-name order.

Without data, inputs are generated from the model's declared types and shapes with a
fixed seed. A symbolic dimension takes its value from ``dims`` (``--dim name=value``,
matched by the dimension's name, or by ``input.axis`` such as ``x.2``); otherwise the
leading dimension defaults to 1 and any other symbolic dimension to 32.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputError

DEFAULT_LEADING_DIM = 1
DEFAULT_OTHER_DIM = 32
DEFAULT_SAMPLE_COUNT = 4


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None


def input_specs(model: ir.Model) -> list[InputSpec]:
    """The model's real inputs (not initializers listed as inputs), with numpy dtypes."""
    specs = []
    for value in model.graph.inputs:
        if value.const_value is not None and value.name in model.graph.initializers:
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        shape = None
        if value.shape is not None:
            shape = tuple(_dim(d) for d in value.shape)
        specs.append(InputSpec(value.name, np.dtype(dtype), shape))
    return specs


def _dim(dim) -> int | str | None:
    """A fixed size, a symbolic name, or None (unknown; exporters also write -1 for it)."""
    if isinstance(dim, int):
        return dim if dim >= 0 else None
    return dim.value or None


def load_data(path: str | Path, specs: list[InputSpec], limit: int | None = None) -> list[dict[str, np.ndarray]]:
    """Read feeds from an .npz (leading sample axis) or a directory of .npz feeds."""
    path = Path(path)
    if path.is_dir():
        feeds = [_read_npz(f) for f in sorted(path.glob("*.npz"))[:limit]]
        if not feeds:
            raise InputError(f"data directory {path} holds no .npz files")
    elif path.is_file():
        feeds = list(_split_samples(_read_npz(path), path))[:limit]
    else:
        raise InputError(f"data path not found: {path}")
    for index, feed in enumerate(feeds):
        _check_feed(feed, specs, f"{path} sample {index}")
    return feeds


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"cannot read data file {path}: {exc}") from None


def _split_samples(arrays: dict[str, np.ndarray], path: Path) -> Iterator[dict[str, np.ndarray]]:
    if not arrays:
        raise InputError(f"data file {path} holds no arrays")
    counts = {name: (a.shape[0] if a.ndim else None) for name, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1:
        raise InputError(
            f"data file {path}: arrays must share a leading sample axis; got {', '.join(f'{k}{list(arrays[k].shape)}' for k in arrays)}"
        )
    for index in range(next(iter(counts.values()))):
        yield {name: np.asarray(array[index]) for name, array in arrays.items()}  # 0-d stays an array


def _check_feed(feed: dict[str, np.ndarray], specs: list[InputSpec], where: str) -> None:
    expected = {s.name: s for s in specs}
    missing = expected.keys() - feed.keys()
    if missing:
        raise InputError(f"{where}: no array for model input(s) {', '.join(sorted(missing))}")
    unknown = feed.keys() - expected.keys()
    if unknown:
        raise InputError(f"{where}: arrays {', '.join(sorted(unknown))} match no model input; inputs are {', '.join(expected)}")
    for name, array in feed.items():
        spec = expected[name]
        if array.dtype != spec.dtype:
            raise InputError(f"{where}: input '{name}' is {array.dtype}, the model wants {spec.dtype}")
        if spec.shape is not None:
            if array.ndim != len(spec.shape):
                raise InputError(f"{where}: input '{name}' has rank {array.ndim}, the model wants {len(spec.shape)} {list(spec.shape)}")
            for axis, (got, want) in enumerate(zip(array.shape, spec.shape)):
                if isinstance(want, int) and got != want:
                    raise InputError(f"{where}: input '{name}' axis {axis} is {got}, the model wants {want}")


def parse_dims(items: list[str] | None) -> dict[str, int]:
    """``["batch=2", "x.2=64"]`` -> ``{"batch": 2, "x.2": 64}``."""
    dims: dict[str, int] = {}
    for item in items or []:
        for part in item.split(","):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise InputError(f"bad --dim '{part}': expected name=value")
            try:
                dims[name.strip()] = int(value)
            except ValueError:
                raise InputError(f"bad --dim '{part}': '{value}' is not an integer") from None
            if dims[name.strip()] <= 0:
                raise InputError(f"bad --dim '{part}': a dimension must be positive")
    return dims


def concrete_shape(spec: InputSpec, dims: dict[str, int]) -> tuple[int, ...]:
    if spec.shape is None:
        raise InputError(f"input '{spec.name}' has no declared shape; give data with --data")
    shape = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in dims:
            shape.append(dims[dim])
        elif f"{spec.name}.{axis}" in dims:
            shape.append(dims[f"{spec.name}.{axis}"])
        else:
            shape.append(DEFAULT_LEADING_DIM if axis == 0 else DEFAULT_OTHER_DIM)
    return tuple(shape)


def generate_feeds(specs: list[InputSpec], count: int = DEFAULT_SAMPLE_COUNT, seed: int = 0,
                   dims: dict[str, int] | None = None) -> list[dict[str, np.ndarray]]:
    """Seeded random feeds honouring dtypes and shapes: floats ~ N(0, 1), integers in [0, 4), bools."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape = concrete_shape(spec, dims)
            feed[spec.name] = _random_array(rng, spec.dtype, shape)
        feeds.append(feed)
    return feeds


def _random_array(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return np.asarray(rng.random(shape) < 0.5)  # a 0-d array, not a numpy scalar ORT refuses
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 4, size=shape).astype(dtype)
    if np.issubdtype(dtype, np.floating) or dtype.kind == "V":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "US" or dtype == object:
        return np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
    raise InputError(f"cannot generate inputs of type {dtype}; give data with --data")


def describe_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, list]:
    """Shapes and dtypes of the first feed, for the report."""
    if not feeds:
        return {}
    return {name: [list(a.shape), str(a.dtype)] for name, a in feeds[0].items()}
