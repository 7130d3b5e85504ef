"""Compare intermediate tensors of two models, a bounded chunk of tensors at a time.

Each chunk exposes a set of main-graph values as the only outputs of a copy of each
model, runs both ORT sessions (graph optimizations disabled) on every feed, folds each
pair of arrays into fixed-size error statistics and drops the arrays before the next
chunk. Chunk sizes adapt to the bytes the first chunk exposed per feed (both models' arrays are
alive together), so memory is bounded by ``memory_budget_mb`` plus the largest single
tensor, not by the model.
Tensors are paired by name in each model (``pairs``), so values matched by structure
under different names are compared too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from . import ort_run
from .calibration import _value_dtypes
from .errors import InputError
from .metrics import Tolerance

Feed = dict[str, np.ndarray]


class TensorErrors:
    """Running error statistics of one tensor over feeds: max abs/rel error, cosine, SNR.
    Fixed size whatever the feeds.

    ``equal`` is float rounding at the tensor's own scale: ``max_abs <= atol + rtol * max|ref|``.
    Element-wise closeness would flag rounding of near-zero elements of large intermediates
    (a folded BatchNormalization), which are not a divergence."""

    __slots__ = ("tolerance", "samples", "max_abs", "max_rel", "dot", "ref_sq", "got_sq", "noise",
                 "nonfinite_mismatch", "shape_mismatch", "exact", "ref_max", "different")

    def __init__(self, tolerance: Tolerance):
        self.tolerance = tolerance
        self.samples = 0
        self.different = False  # strings or shapes that differ
        self.exact = True
        self.ref_max = 0.0
        self.max_abs = self.max_rel = self.dot = self.ref_sq = self.got_sq = self.noise = 0.0
        self.nonfinite_mismatch = False
        self.shape_mismatch: str | None = None

    def update(self, ref: np.ndarray, got: np.ndarray) -> None:
        self.samples += 1
        if ref.shape != got.shape:
            self.different, self.exact = True, False
            self.shape_mismatch = self.shape_mismatch or f"{list(ref.shape)} vs {list(got.shape)}"
            return
        if ref.dtype.kind in "OUS" or got.dtype.kind in "OUS":
            same = np.array_equal(ref, got)
            self.different |= not same
            self.exact &= same
            self.max_abs = max(self.max_abs, 0.0 if same else math.inf)
            return
        work = np.float32 if ref.dtype in (np.float32, np.float16) and got.dtype in (np.float32, np.float16) \
            else np.float64
        r, c = np.asarray(ref, work).ravel(), np.asarray(got, work).ravel()
        if not r.size:
            return
        d = r - c
        finite = np.isfinite(d)
        if not finite.all():  # drop positions where both hold the same inf or nan; others are a mismatch
            same = (r == c) | (np.isnan(r) & np.isnan(c))
            if np.any(~finite & ~same):
                self.nonfinite_mismatch = True
            r, c, d = r[finite], c[finite], d[finite]
            self.exact = False if self.nonfinite_mismatch else self.exact
            if not r.size:
                return
        abs_r = np.abs(r)
        scale = max(float(abs_r.max()), 1e-12)
        self.ref_max = max(self.ref_max, scale)
        ref_sq = float(np.dot(r, r))
        self.ref_sq += ref_sq
        if not d.any():
            self.dot += ref_sq
            self.got_sq += ref_sq
            return
        self.exact = False
        abs_d = np.abs(d)
        self.max_abs = max(self.max_abs, float(abs_d.max()))
        self.max_rel = max(self.max_rel, float(np.max(abs_d / np.maximum(abs_r, 1e-6 * scale))))
        self.dot += float(np.dot(r, c))
        self.got_sq += float(np.dot(c, c))
        self.noise += float(np.dot(d, d))

    @property
    def equal(self) -> bool:
        if self.exact:
            return True
        if self.different or self.nonfinite_mismatch:
            return False
        return self.max_abs <= self.tolerance.atol + self.tolerance.rtol * self.ref_max

    def metrics(self) -> dict:
        if self.shape_mismatch:
            return {"max_abs": math.inf, "max_rel": math.inf, "cosine": 0.0, "snr_db": -math.inf,
                    "shape_mismatch": self.shape_mismatch}
        if self.nonfinite_mismatch:
            return {"max_abs": math.inf, "max_rel": math.inf, "cosine": 0.0, "snr_db": -math.inf}
        nr, nc = math.sqrt(self.ref_sq), math.sqrt(self.got_sq)
        if nr == 0.0 and nc == 0.0:
            cosine = 1.0
        elif nr == 0.0 or nc == 0.0:
            cosine = 0.0
        else:
            cosine = self.dot / (nr * nc)
        if self.noise == 0.0:
            snr = math.inf
        elif self.ref_sq == 0.0:
            snr = -math.inf
        else:
            snr = 10.0 * math.log10(self.ref_sq / self.noise)
        return {"max_abs": self.max_abs, "max_rel": self.max_rel, "cosine": cosine, "snr_db": snr}


def tensor_values(model: ir.Model) -> dict[str, ir.Value]:
    """Every named node output of the main graph that holds a tensor, by name."""
    return {o.name: o for node in model.graph for o in node.outputs
            if o.name and (o.type is None or isinstance(o.type, ir.TensorType))}


def _exposed(model: ir.Model, names: Sequence[str], dtypes: dict[str, ir.DataType]) -> tuple[ir.Model, list[str]]:
    """A copy of ``model`` whose outputs are exactly the values ``names`` (typed where the IR is not)."""
    copy = model.clone()
    values = tensor_values(copy)
    outputs, out_names = [], []
    for name in names:
        value = values[name]
        if value.dtype is None:
            value.type = ir.TensorType(dtypes[name])
        if value in outputs:  # two names paired with one value: expose it twice through an Identity
            ident = ir.node("Identity", [value])
            copy.graph.append(ident)
            value = ident.outputs[0]
            value.name = f"onnxopt_capture_{len(outputs)}"
            value.type = ir.TensorType(dtypes[name])
        outputs.append(value)
        out_names.append(value.name)
    copy.graph.outputs.clear()
    copy.graph.outputs.extend(outputs)
    return copy, out_names


def comparable_names(model: ir.Model) -> tuple[list[str], dict[str, ir.DataType]]:
    """Main-graph node outputs ORT can expose (known tensor type; not Constant), in graph order."""
    dtypes = _value_dtypes(model)
    names = [o.name for node in model.graph if node.op_type != "Constant" for o in node.outputs
             if o.name and (o.dtype is not None or o.name in dtypes) and (o.type is None or isinstance(o.type, ir.TensorType))]
    return names, dtypes


def compare_tensors(a: ir.Model, b: ir.Model, pairs: Sequence[tuple[str, str]], feeds: Sequence[Feed],
                    tolerance: Tolerance | None = None, *, memory_budget_mb: float = 256, first_chunk: int = 32,
                    progress=None) -> dict[str, TensorErrors]:
    """Error statistics of B's tensor against A's for every ``(name in A, name in B)`` pair,
    keyed by A's name. Arrays live only for one feed of one chunk."""
    tolerance = tolerance or Tolerance()
    _, dtypes_a = comparable_names(a)
    _, dtypes_b = comparable_names(b)
    inputs_b = {v.name for v in b.graph.inputs}
    results: dict[str, TensorErrors] = {}
    pending, chunk = list(pairs), first_chunk
    task = progress.add(f"diff tensors ({len(feeds)} samples)", len(pending)) if progress else None
    while pending:
        part, pending = pending[:chunk], pending[chunk:]
        model_a, outs_a = _exposed(a, [p[0] for p in part], dtypes_a)
        model_b, outs_b = _exposed(b, [p[1] for p in part], dtypes_b)
        session_a, session_b = ort_run.make_session(model_a), ort_run.make_session(model_b)
        del model_a, model_b
        local = {p[0]: TensorErrors(tolerance) for p in part}
        peak = 0
        for feed in feeds:
            got_a = ort_run.run(session_a, feed)
            got_b = ort_run.run(session_b, {k: v for k, v in feed.items() if k in inputs_b})
            peak = max(peak, sum(x.nbytes for x in got_a.values()) + sum(x.nbytes for x in got_b.values()))
            for (name, _), out_a, out_b in zip(part, outs_a, outs_b):
                local[name].update(got_a[out_a], got_b[out_b])
            del got_a, got_b
        results.update(local)
        del session_a, session_b
        per_tensor = peak / max(len(part), 1)
        chunk = int(min(1024, max(4, memory_budget_mb * 2**20 / max(per_tensor, 1.0))))
        if task is not None:
            progress.advance(task, len(part))
    if task is not None:
        progress.done(task)
    return results


def capture_values(model: ir.Model, names: Sequence[str], feeds: Sequence[Feed]) -> dict[str, list[np.ndarray]]:
    """The values ``names`` take on each feed (graph inputs come from the feeds). Kept whole:
    for the few boundary tensors of a reduced subgraph, not for every tensor of a model."""
    inputs = {v.name for v in model.graph.inputs}
    computed = [n for n in names if n not in inputs]
    found: dict[str, list[np.ndarray]] = {n: [np.asarray(f[n]) for f in feeds] for n in names if n in inputs}
    if computed:
        _, dtypes = comparable_names(model)
        missing = [n for n in computed if n not in tensor_values(model) or
                   (tensor_values(model)[n].dtype is None and n not in dtypes)]
        if missing:
            raise InputError(f"cannot capture tensor {missing[0]!r}: no typed node output of that name")
        exposed, outs = _exposed(model, computed, dtypes)
        session = ort_run.make_session(exposed)
        found.update({n: [] for n in computed})
        for feed in feeds:
            result = ort_run.run(session, {k: v for k, v in feed.items() if k in inputs})
            for name, out in zip(computed, outs):
                found[name].append(result[out])
    return found
