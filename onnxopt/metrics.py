"""Fidelity metrics between reference and candidate outputs, and budgets over them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

# Direction of each metric: a budget value is a floor (>=) or a ceiling (<=). Metrics of one
# output (per role, role_metrics.py) and of the whole model (e.g. a measured speed-up) both
# register here; ``register_metric`` adds one.
_DIRECTIONS: dict[str, str] = {
    "max_abs": "ceiling", "max_rel": "ceiling", "cosine": "floor", "snr_db": "floor",
    "agreement": "floor", "sequence_agreement": "floor",
    "cosine_worst": "floor", "cosine_mean": "floor", "nn_agreement": "floor", "box_f1": "floor",
}
_MODEL_METRICS: set[str] = set()


def register_metric(key: str, direction: str, *, scope: str = "output") -> None:
    """Make ``key`` a budget key: ``direction`` is "floor" or "ceiling"; ``scope`` "output"
    (checked on every output that reports it) or "model" (``Budget.breaches(model_metrics=)``)."""
    if direction not in ("floor", "ceiling") or scope not in ("output", "model"):
        raise ValueError(f"bad metric registration {key!r}: {direction!r}, {scope!r}")
    _DIRECTIONS[key] = direction
    if scope == "model":
        _MODEL_METRICS.add(key)


def metric_direction(key: str) -> str | None:
    return _DIRECTIONS.get(key)


def metric_keys() -> tuple[str, ...]:
    return tuple(_DIRECTIONS)


# Keys about the whole model rather than one output: ``speedup``, the floor on float latency /
# candidate latency (onnxopt/speed.py), checked by the runner.
MODEL_KEYS = ("speedup",)
for _key in MODEL_KEYS:
    register_metric(_key, "floor", scope="model")


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
                   decisions: bool = True, role=None) -> dict[str, float | None]:
    """Metrics over all samples of one output (lists are per sample), by its role
    (``roles.OutputRole``; role_metrics.py has each role's metrics).

    Without a role, the shape decides as it always did: class scores (rank 2 or 3, a last axis
    of 2..100000) get top-1 ``agreement`` (and, rank 3, ``sequence_agreement``); a probability
    per sample gets agreement at 0.5; ``decisions=False`` measures neither. The validator
    passes each output's declared or inferred role instead.
    """
    from .role_metrics import measure
    from .roles import OutputRole

    if role is None:
        kind = "raw"
        if decisions and reference and looks_like_class_scores(reference[0].shape, reference[0].dtype):
            kind = "sequence" if reference[0].ndim == 3 else "scores"
        elif decisions and reference and looks_like_probability(reference[0]):
            kind = "probability"
        role = OutputRole(kind)
    return {"agreement": None, "sequence_agreement": None} | measure(role, reference, candidate)


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


# The budget lossy passes get when the user names none (``--budget none`` turns it off): each
# output's role decides its floors (roles.ROLE_FLOORS): cosine 0.99 for all, and 99% of the
# decisions where the output carries one (top-1 scores, probabilities, sequences, boxes,
# nearest neighbours and the worst vector of an embedding).
DEFAULT_BUDGET = "default"


@dataclass(frozen=True)
class Budget:
    """Limits on the outputs' metrics, e.g. ``snr_db=30,cosine=0.999``.

    ``role_defaults`` adds each output's role floors (the default budget; ``default`` in the
    text); explicit keys override a role floor of the same key, and floors declared with an
    output's role (``--output-role out=embedding:nn_agreement=0.95``) override both.
    """

    limits: tuple[tuple[str, float], ...] = ()
    role_defaults: bool = False

    @classmethod
    def parse(cls, text: str | None) -> Budget:
        """``None`` means the default budget; ``"none"`` (or ``""``) means no budget."""
        if text is None:
            text = DEFAULT_BUDGET
        if not text or text.strip().lower() in ("none", "off"):
            return cls()
        limits, defaults = [], False
        for part in text.split(","):
            key, eq, value = part.partition("=")
            key = key.strip()
            if key == "default" and not eq:
                defaults = True
                continue
            if not eq or key not in _DIRECTIONS:
                raise UsageError(f"bad budget '{part}': expected METRIC=VALUE (or 'default') with METRIC one of "
                                 f"{', '.join(_DIRECTIONS)}")
            try:
                limits.append((key, float(value)))
            except ValueError:
                raise UsageError(f"bad budget '{part}': '{value}' is not a number") from None
        return cls(tuple(limits), defaults)

    def __bool__(self) -> bool:
        return bool(self.limits) or self.role_defaults

    def text(self) -> str:
        parts = ["default"] if self.role_defaults else []
        return ",".join(parts + [f"{k}={v:g}" for k, v in self.limits])

    def value(self, key: str) -> float | None:
        """The limit set for ``key`` (e.g. ``speedup``), or None."""
        return next((v for k, v in self.limits if k == key), None)

    def limits_for(self, role=None) -> dict[str, float]:
        """The limits one output is held to, given its role (an ``OutputRole`` or None)."""
        from .roles import BASE_FLOORS, ROLE_FLOORS

        if not self:
            return {}
        limits: dict[str, float] = {}
        if self.role_defaults:
            kind = role.role if role is not None else None
            limits |= BASE_FLOORS
            limits |= ROLE_FLOORS[kind] if kind else {"agreement": 0.99, "sequence_agreement": 0.99}
        limits |= {k: v for k, v in self.limits if k not in _MODEL_METRICS}
        if role is not None:
            limits |= role.floors
        return limits

    def breaches(self, per_output: dict[str, dict[str, float | None]], roles: dict | None = None,
                 model_metrics: dict[str, float | None] | None = None) -> list[str]:
        """One message per (output, metric) outside the budget, then per model-level metric."""
        messages = []
        for output, metrics in per_output.items():
            for key, limit in self.limits_for((roles or {}).get(output)).items():
                message = _breach(key, metrics.get(key), limit)
                if message:
                    messages.append(f"{output}: {message}")
        for key, limit in self.limits:
            if key in _MODEL_METRICS and model_metrics:
                message = _breach(key, model_metrics.get(key), limit)
                if message:
                    messages.append(message)
        return messages


def _breach(key: str, value, limit: float) -> str | None:
    if value is None or not isinstance(value, (int, float)):
        return None
    if _DIRECTIONS[key] == "floor" and not value >= limit:
        return f"{key} {value:.6g} < {limit:g}"
    if _DIRECTIONS[key] == "ceiling" and not value <= limit:
        return f"{key} {value:.6g} > {limit:g}"
    return None
