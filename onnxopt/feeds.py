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

import math
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputError
from .feed_rules import value_rule

DEFAULT_LEADING_DIM = 1
DEFAULT_OTHER_DIM = 32
DEFAULT_SAMPLE_COUNT = 4
DEFAULT_INT_LOW, DEFAULT_INT_HIGH = 0, 4
# Generated inputs larger than this in total (all samples of one input) are refused.
MAX_GENERATED_BYTES = 2 << 30


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None
    # Value rule for generated inputs (feed_rules.py): integers in [low, high), or all ones.
    low: int | None = None
    high: int | None = None
    ones: bool = False
    rule: str = ""


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
        specs.append(InputSpec(value.name, np.dtype(dtype), shape, **value_rule(value, np.dtype(dtype))))
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
    """Seeded random feeds honouring dtypes, shapes and each input's value rule (feed_rules.py):
    floats ~ N(0, 1), integers in [0, 4) or inside the table they index, masks all ones."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    shapes = {spec.name: concrete_shape(spec, dims) for spec in specs}
    for spec in specs:
        _check_generated_size(spec, shapes[spec.name], count)
    feeds = []
    for _ in range(count):
        feeds.append({spec.name: _random_array(rng, spec, shapes[spec.name]) for spec in specs})
    return feeds


def _check_generated_size(spec: InputSpec, shape: tuple[int, ...], count: int) -> None:
    elements = math.prod(shape)
    nbytes = elements * _itemsize(spec.dtype)
    if nbytes * count > MAX_GENERATED_BYTES:
        raise InputError(
            f"input '{spec.name}' has shape {list(shape)}: {elements:,} elements ({_human(nbytes)} per sample) is "
            f"too large to generate (limit {_human(MAX_GENERATED_BYTES)} for {count} samples); give real inputs "
            "with --data, or smaller sizes with --dim for symbolic axes")


def _itemsize(dtype: np.dtype) -> float:
    if dtype == object:
        return 8.0
    try:
        return ir.DataType.from_numpy(dtype).itemsize
    except TypeError:
        return float(dtype.itemsize)


def _human(nbytes: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PiB"


def _random_array(rng: np.random.Generator, spec: InputSpec, shape: tuple[int, ...]) -> np.ndarray:
    """One array (0-d included) of ``spec.dtype``; ml_dtypes arrays for bfloat16, float8, int4, int2."""
    dtype = spec.dtype
    if dtype.kind in "US" or dtype == object:
        return np.array(rng.choice(["a", "b", "c"], size=shape), dtype=object)
    try:
        ir_dtype = ir.DataType.from_numpy(dtype)
    except TypeError:
        raise InputError(f"cannot generate inputs of type {dtype} for '{spec.name}'; give data with --data") from None
    if spec.ones:
        return np.ones(shape, dtype)
    if ir_dtype == ir.DataType.BOOL:
        return np.asarray(rng.random(shape) < 0.5)
    if ir_dtype.is_integer():
        low, high = integer_range(ir_dtype, spec.low, spec.high)
        return np.asarray(rng.integers(low, high, size=shape)).astype(dtype)
    if ir_dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128):
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if ir_dtype.is_floating_point():
        values = rng.standard_normal(shape)
        if ir_dtype == ir.DataType.FLOAT8E8M0:  # an exponent-only type: powers of two, no sign
            values = np.exp2(np.round(values * 4))
        return np.asarray(values).astype(dtype)
    raise InputError(f"cannot generate inputs of type {ir_dtype.name} for '{spec.name}'; give data with --data")


def integer_range(dtype: ir.DataType, low: int | None, high: int | None) -> tuple[int, int]:
    """[low, high) for a generated integer input: [0, 4) unless a rule says otherwise, inside the type."""
    low = DEFAULT_INT_LOW if low is None else low
    high = DEFAULT_INT_HIGH if high is None else high
    if dtype.bitwidth < 8:
        top = 1 << (dtype.bitwidth - (1 if dtype.is_signed() else 0))
        high = min(high, top)
    return low, max(high, low + 1)


def describe_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, list]:
    """Shapes and dtypes of the first feed, for the report."""
    if not feeds:
        return {}
    return {name: [list(a.shape), str(a.dtype)] for name, a in feeds[0].items()}


def reference_failure(message: str) -> str | None:
    """One line for an ORT run of the *original* model that failed to allocate memory
    (a constant-folding bomb such as ConstantOfShape of 2^40 elements), else None."""
    size = re.search(r"requested buffer of size (\d+)", message)
    if not size:
        return None
    node = re.search(r"running (\w+) node\. Name:'([^']*)'", message)
    where = f" in {node.group(1)} node '{node.group(2)}'" if node and node.group(2) else (
        f" in a {node.group(1)} node" if node else "")
    return (f"ONNX Runtime cannot run even the original model: it fails to allocate {int(size.group(1)):,} bytes "
            f"({_human(int(size.group(1)))}){where}; rerun with --validate off to rewrite it without running it")
