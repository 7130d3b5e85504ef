"""Fidelity metrics between reference and candidate outputs, and budgets over them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

# Direction of each metric: a budget value is a floor (>=) or a ceiling (<=).
FLOORS = {"cosine", "snr_db", "agreement", "sequence_agreement"}
CEILINGS = {"max_abs", "max_rel"}
METRICS = ("max_abs", "max_rel", "cosine", "snr_db", "agreement", "sequence_agreement")
# Keys about the whole model rather than one output (checked by the runner, not by breaches()):
# ``speedup``, the floor on float latency / candidate latency (onnxopt/speed.py).
MODEL_KEYS = ("speedup",)


def _as_float(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def looks_like_class_scores(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Float output of rank 2 ([N, C]) or 3 ([N, T, C]) whose last axis holds 2..100000 scores.

    Rank 4 and up is spatial (a detection map's last axis is the image width), not classes.
    """
    return np.issubdtype(dtype, np.floating) and 2 <= len(shape) <= 3 and 2 <= shape[-1] <= 100_000


def looks_like_probability(reference: np.ndarray) -> bool:
    """One score per sample (last axis 1, or a vector) with every value in [0, 1]: a sigmoid."""
    if not np.issubdtype(reference.dtype, np.floating) or reference.size == 0 or reference.ndim > 2:
        return False
    if reference.ndim == 2 and reference.shape[-1] != 1:
        return False
    finite = reference[np.isfinite(reference)]
    return finite.size == reference.size and float(finite.min()) >= 0.0 and float(finite.max()) <= 1.0


def output_metrics(reference: list[np.ndarray], candidate: list[np.ndarray],
                   decisions: bool = True) -> dict[str, float | None]:
    """Metrics over all samples of one output (lists are per sample).

    ``agreement`` counts equal decisions: the argmax of each score vector, or a
    probability's side of 0.5. ``sequence_agreement``, for score sequences [N, T, C]
    (CTC text recognition, token tagging), counts sequences whose every step agrees: a
    recognized string can only change where its argmax sequence does. With
    ``decisions=False`` (e.g. a recurrent state the model also takes as input) neither is
    measured.

    A decision the reference makes by less than ``TIE_FRACTION`` of the output's range (top-1
    minus top-2 score; a probability's distance from 0.5) is a tie: either answer agrees. A
    near-tie sample flips under float16 rounding already, and one such sample among 16 would
    otherwise fail any lossy pass.
    """
    ref_flat, cand_flat, agree, total = [], [], 0, 0
    same_sequences, sequences = 0, 0
    tie = TIE_FRACTION * _value_range(reference) if decisions else 0.0
    for ref, cand in zip(reference, candidate):
        if ref.shape != cand.shape:
            return {"max_abs": math.inf, "max_rel": math.inf, "cosine": 0.0, "snr_db": -math.inf,
                    "agreement": 0.0, "sequence_agreement": 0.0 if ref.ndim == 3 else None,
                    "shape_mismatch": f"{list(ref.shape)} vs {list(cand.shape)}"}
        if ref.dtype.kind in "OUS":
            same = float(np.mean(ref == cand)) if ref.size else 1.0
            return {"max_abs": 0.0 if same == 1.0 else math.inf, "max_rel": None, "cosine": None,
                    "snr_db": None, "agreement": same}
        ref_flat.append(_as_float(ref).ravel())
        cand_flat.append(_as_float(cand).ravel())
        if not decisions:
            continue
        if looks_like_class_scores(ref.shape, ref.dtype) and ref.size:
            r = ref.reshape(-1, ref.shape[-1])
            c = cand.reshape(-1, cand.shape[-1])
            equal = (np.argmax(r, axis=-1) == np.argmax(c, axis=-1)) | (_top2_margin(r) < tie)
            agree += int(np.sum(equal))
            total += r.shape[0]
            if ref.ndim == 3:
                same_sequences += int(np.sum(equal.reshape(ref.shape[:2]).all(axis=1)))
                sequences += ref.shape[0]
        elif looks_like_probability(ref):  # binary decisions at 0.5 (e.g. speech / no speech)
            agree += int(np.sum(((ref > 0.5) == (cand > 0.5)) | (np.abs(ref - 0.5) < tie)))
            total += ref.size
    r = np.concatenate(ref_flat) if ref_flat else np.zeros(0)
    c = np.concatenate(cand_flat) if cand_flat else np.zeros(0)
    return {
        "max_abs": _max_abs(r, c),
        "max_rel": _max_rel(r, c),
        "cosine": _cosine(r, c),
        "snr_db": _snr_db(r, c),
        "agreement": (agree / total) if total else None,
        "sequence_agreement": (same_sequences / sequences) if sequences else None,
    }


# Decisions closer than this fraction of the output's range are ties (see output_metrics).
TIE_FRACTION = 0.01


def _value_range(arrays: list[np.ndarray]) -> float:
    """max - min over the finite values of every sample (1.0 when there are none)."""
    finite = [a[np.isfinite(a)] for a in arrays if np.issubdtype(a.dtype, np.floating) and a.size]
    finite = [f for f in finite if f.size]
    if not finite:
        return 1.0
    return float(max(f.max() for f in finite) - min(f.min() for f in finite))


def _top2_margin(scores: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 score of each row of a [M, C] array."""
    top2 = np.partition(scores, -2, axis=-1)[:, -2:]
    return np.abs(top2[:, 1] - top2[:, 0]).astype(np.float64)


def _finite_mask(r: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Drop positions where both are the same non-finite value; report other non-finite mismatches."""
    both_same = (r == c) | (np.isnan(r) & np.isnan(c))
    nonfinite = ~np.isfinite(r) | ~np.isfinite(c)
    bad = bool(np.any(nonfinite & ~both_same))
    keep = ~nonfinite
    return r[keep], c[keep], bad


def _max_abs(r: np.ndarray, c: np.ndarray) -> float:
    r, c, bad = _finite_mask(r, c)
    if bad:
        return math.inf
    return float(np.max(np.abs(r - c))) if r.size else 0.0


def _max_rel(r: np.ndarray, c: np.ndarray) -> float:
    r, c, bad = _finite_mask(r, c)
    if bad:
        return math.inf
    if not r.size:
        return 0.0
    scale = max(float(np.max(np.abs(r))), 1e-12)
    return float(np.max(np.abs(r - c) / np.maximum(np.abs(r), 1e-6 * scale)))


def _cosine(r: np.ndarray, c: np.ndarray) -> float:
    r, c, bad = _finite_mask(r, c)
    if bad:
        return 0.0
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0.0 and nc == 0.0:
        return 1.0
    if nr == 0.0 or nc == 0.0:
        return 0.0
    return float(np.dot(r, c) / (nr * nc))


def _snr_db(r: np.ndarray, c: np.ndarray) -> float:
    r, c, bad = _finite_mask(r, c)
    if bad:
        return -math.inf
    noise = float(np.sum((r - c) ** 2))
    signal = float(np.sum(r**2))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


@dataclass(frozen=True)
class Tolerance:
    """What "equal within float rounding" means for a lossless pass."""

    rtol: float = 1e-4
    atol: float = 1e-5

    def allows(self, reference: list[np.ndarray], candidate: list[np.ndarray]) -> bool:
        for ref, cand in zip(reference, candidate):
            if ref.shape != cand.shape:
                return False
            if ref.dtype.kind in "OUS":
                if not np.array_equal(ref, cand):
                    return False
                continue
            if not np.allclose(_as_float(cand), _as_float(ref), rtol=self.rtol, atol=self.atol, equal_nan=True):
                return False
        return True


# The budget lossy passes get when the user names none (``--budget none`` turns it off):
# keep the output direction and, where outputs are class scores, 99% of the decisions and,
# for score sequences, 99% of whole sequences (a recognized text line is one decision).
DEFAULT_BUDGET = "cosine=0.99,agreement=0.99,sequence_agreement=0.99"


@dataclass(frozen=True)
class Budget:
    """Limits on the worst output's metrics, e.g. ``snr_db=30,cosine=0.999``."""

    limits: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> Budget:
        """``None`` means the default budget; ``"none"`` (or ``""``) means no budget."""
        if text is None:
            text = DEFAULT_BUDGET
        if not text or text.strip().lower() in ("none", "off"):
            return cls()
        limits = []
        for part in text.split(","):
            key, eq, value = part.partition("=")
            key = key.strip()
            if not eq or key not in METRICS + MODEL_KEYS:
                raise UsageError(f"bad budget '{part}': expected METRIC=VALUE with METRIC one of "
                                 f"{', '.join(METRICS + MODEL_KEYS)}")
            try:
                limits.append((key, float(value)))
            except ValueError:
                raise UsageError(f"bad budget '{part}': '{value}' is not a number") from None
        return cls(tuple(limits))

    def __bool__(self) -> bool:
        return bool(self.limits)

    def text(self) -> str:
        return ",".join(f"{k}={v:g}" for k, v in self.limits)

    def value(self, key: str) -> float | None:
        """The limit set for ``key`` (e.g. ``speedup``), or None."""
        return next((v for k, v in self.limits if k == key), None)

    def breaches(self, per_output: dict[str, dict[str, float | None]]) -> list[str]:
        """One message per (output, metric) outside the budget."""
        messages = []
        for output, metrics in per_output.items():
            for key, limit in self.limits:
                value = metrics.get(key)
                if value is None:
                    continue
                if key in FLOORS and not value >= limit:
                    messages.append(f"{output}: {key} {value:.6g} < {limit:g}")
                if key in CEILINGS and not value <= limit:
                    messages.append(f"{output}: {key} {value:.6g} > {limit:g}")
        return messages
