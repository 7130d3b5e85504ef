"""Streaming statistics of activations and the ranges derived from them.

Every statistic holds fixed-size state, whatever the number of samples. Range methods:
``minmax``, ``percentile`` (two-sided, ``percentile`` of the mass kept), ``entropy``
(TensorRT-style KL-divergence threshold) and ``mse`` (the range minimizing the expected
quantization error). The histogram has a fixed number of bins of width ``2**e`` on a grid
anchored at zero; when new data falls outside, pairs of bins merge exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from .errors import UsageError

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_BINS = 4096


class MinMaxStats:
    """Running min and max of the finite values seen, and the smallest nonzero mean square of
    one sample (what a per-tensor scale must still resolve); fixed size."""

    __slots__ = ("min", "max", "count", "min_power", "rank")

    def __init__(self):
        self.min, self.max, self.count, self.min_power = math.inf, -math.inf, 0, math.inf
        self.rank = None  # the rank every sample had, -1 when it varied

    def update(self, x: np.ndarray) -> None:
        x = self._observe(x)
        if x.size:
            self.min, self.max = min(self.min, float(x.min())), max(self.max, float(x.max()))
            self.count += x.size

    def _observe(self, x) -> np.ndarray:
        x = np.asarray(x)
        self.rank = x.ndim if self.rank in (None, x.ndim) else -1
        x = _finite(x)
        power = float(np.dot(x, x)) / x.size if x.size else 0.0
        if power > 0:
            self.min_power = min(self.min_power, power)
        return x

    def range(self) -> tuple[float, float]:
        return self.min, self.max

    def worst_sqnr_db(self, lo: float, hi: float, levels: int) -> float:
        """Estimated SQNR (dB) of the quietest sample when ``[lo, hi]`` maps to ``levels`` values."""
        step = (max(hi, 0.0) - min(lo, 0.0)) / max(levels - 1, 1)
        if step <= 0 or not math.isfinite(self.min_power):
            return math.inf
        return 10 * math.log10(self.min_power / (step * step / 12))


class HistogramStats(MinMaxStats):
    """A fixed-size histogram: bin ``i`` covers ``[(k0 + i) * 2**e, (k0 + i + 1) * 2**e)``."""

    __slots__ = ("bins", "counts", "exponent", "k0")

    def __init__(self, bins: int = DEFAULT_BINS):
        super().__init__()
        if bins < 16:
            raise ValueError("a histogram needs at least 16 bins")
        self.bins, self.counts, self.exponent, self.k0 = bins, np.zeros(bins, np.int64), 0, 0

    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def _span(self, lo: float, hi: float, delta: int = 0) -> int:
        """Bins ``[lo, hi]`` covers at width ``2**(exponent + delta)``."""
        e = -(self.exponent + delta)
        return math.floor(math.ldexp(hi, e)) - math.floor(math.ldexp(lo, e)) + 1

    def update(self, x: np.ndarray) -> None:
        x = self._observe(x)
        if not x.size:
            return
        lo, hi = min(self.min, float(x.min())), max(self.max, float(x.max()))
        if self.count == 0:
            if hi > lo:  # the finest power-of-two width that fits [lo, hi] in the bins
                self.exponent = math.frexp((hi - lo) / (self.bins - 2))[1]
                self.exponent -= self._span(lo, hi, -1) <= self.bins
            else:
                self.exponent = math.frexp(max(abs(lo), 1e-30))[1] - 20
            self.k0 = math.floor(math.ldexp(lo, -self.exponent))
        while self._span(lo, hi) > self.bins:  # merge pairs of bins: exact on a zero-anchored grid
            merged = np.zeros(self.bins, np.int64)
            new_k0 = self.k0 // 2
            np.add.at(merged, (self.k0 + np.arange(self.bins)) // 2 - new_k0, self.counts)
            self.counts, self.k0, self.exponent = merged, new_k0, self.exponent + 1
        new_k0 = math.floor(math.ldexp(lo, -self.exponent))
        if new_k0 < self.k0:
            shift = self.k0 - new_k0
            self.counts = np.concatenate([np.zeros(shift, np.int64), self.counts[: self.bins - shift]])
            self.k0 = new_k0
        scaled = x * x.dtype.type(math.ldexp(1.0, -self.exponent))  # exact: a power-of-two scaling
        np.floor(scaled, out=scaled)
        index = scaled.astype(np.int64)
        index -= self.k0
        np.clip(index, 0, self.bins - 1, out=index)
        self.counts += np.bincount(index, minlength=self.bins)
        self.min, self.max, self.count = lo, hi, self.count + x.size

    def edges(self) -> np.ndarray:
        return (self.k0 + np.arange(self.bins + 1)) * self.width

    def magnitudes(self) -> np.ndarray:
        """Counts of ``|x|`` on bins ``[i * 2**e, (i + 1) * 2**e)`` (exact: the grid is anchored at 0)."""
        k = self.k0 + np.arange(self.bins)
        folded = np.where(k >= 0, k, -k - 1)
        used = self.counts > 0
        size = int(folded[used].max()) + 1 if used.any() else 1
        return np.bincount(folded[used], weights=self.counts[used], minlength=size)


def _finite(x) -> np.ndarray:
    x = np.asarray(x).reshape(-1)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float32)
    return x if np.isfinite(x).all() else x[np.isfinite(x)]


# -- ranges from statistics --------------------------------------------------------------------


def _quantile(hist: HistogramStats, q: float) -> float:
    cdf = np.concatenate([[0.0], np.cumsum(hist.counts, dtype=np.float64)])
    return float(np.interp(q * cdf[-1], cdf, hist.edges()))


def _kl_divergence(m: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) of keeping the first ``i`` bins: P folds the tail into bin i-1, Q is P's
    first ``i`` bins merged into ``levels`` groups and spread back over their nonzero bins."""
    p = m[:i].astype(np.float64)
    p[-1] += m[i:].sum()
    starts = (np.arange(levels) * i) // levels
    nonzero = m[:i] > 0
    sums = np.add.reduceat(m[:i], starts)
    counts = np.add.reduceat(nonzero.astype(np.float64), starts)
    per_bin = np.divide(sums, counts, out=np.zeros(levels), where=counts > 0)
    q = np.repeat(per_bin, np.diff(np.append(starts, i))) * nonzero
    p, q = p / p.sum(), q / max(q.sum(), 1e-300)
    keep = p > 0
    return float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))


def _kl_threshold(m: np.ndarray, levels: int, max_bins: int = 2048) -> tuple[int, int]:
    """TensorRT's entropy calibration on magnitude counts ``m``: ``(bins kept, merge factor)``.

    Bins are first merged in pairs down to ``max_bins`` (exact); a coarse search over 128
    thresholds is refined around the best one.
    """
    factor = 1
    while len(m) > max_bins:
        m = np.add.reduceat(m, np.arange(0, len(m), 2))
        factor *= 2
    n = len(m)
    if n <= levels:
        return n, factor
    coarse = np.unique(np.linspace(levels, n, min(128, n - levels + 1)).astype(int))
    kl = {int(i): _kl_divergence(m, int(i), levels) for i in coarse}
    best = min(kl, key=kl.get)
    step = int(coarse[1] - coarse[0]) if len(coarse) > 1 else 1
    for i in range(max(levels, best - step + 1), min(n, best + step - 1) + 1):
        if i not in kl:
            kl[i] = _kl_divergence(m, i, levels)
    best = min(kl, key=kl.get)
    return best, factor


def _tail_errors(centers, counts, candidates, right: bool) -> np.ndarray:
    """Sum of count * (center - t)^2 over the centers beyond each candidate t (right or left tail)."""
    s0, s1, s2 = (np.concatenate([[0.0], np.cumsum(counts * centers**k)]) for k in range(3))
    if right:
        idx = np.searchsorted(centers, candidates, side="right")
        a0, a1, a2 = s0[-1] - s0[idx], s1[-1] - s1[idx], s2[-1] - s2[idx]
    else:
        idx = np.searchsorted(centers, candidates, side="left")
        a0, a1, a2 = s0[idx], s1[idx], s2[idx]
    return np.maximum(a2 - 2 * candidates * a1 + candidates**2 * a0, 0.0), a0


def _mse_range(hist: HistogramStats, steps: int) -> tuple[float, float]:
    """The zero-including range minimizing clipping plus rounding error (coordinate descent)."""
    edges = hist.edges()
    centers, counts = (edges[:-1] + edges[1:]) / 2, hist.counts.astype(np.float64)
    total = counts.sum()
    los = np.unique(np.append(np.clip(edges, min(hist.min, 0.0), 0.0), min(hist.min, 0.0)))
    his = np.unique(np.append(np.clip(edges, 0.0, max(hist.max, 0.0)), max(hist.max, 0.0)))
    left, left_n = _tail_errors(centers, counts, los, right=False)
    right, right_n = _tail_errors(centers, counts, his, right=True)
    i, j = 0, len(his) - 1
    for _ in range(32):
        inside = total - left_n[i] - right_n
        j_new = int(np.argmin(right + inside * ((his - los[i]) / steps) ** 2 / 12))
        inside = total - left_n - right_n[j_new]
        i_new = int(np.argmin(left + inside * ((his[j_new] - los) / steps) ** 2 / 12))
        if (i_new, j_new) == (i, j):
            break
        i, j = i_new, j_new
    return float(los[i]), float(his[j])


def _symmetric_mse(m: np.ndarray, width: float, steps: int) -> float:
    centers, edges = (np.arange(len(m)) + 0.5) * width, np.arange(1, len(m) + 1) * width
    tail, _ = _tail_errors(centers, m.astype(np.float64), edges, right=True)
    inside = np.cumsum(m)
    return float(edges[int(np.argmin(tail + inside * (edges / steps) ** 2 / 12))])


def tensor_range(stats: MinMaxStats, method: str = "minmax", *, percentile: float = 99.99,
                 levels: int = 256, symmetric: bool = False) -> tuple[float, float]:
    """The calibrated ``(lo, hi)`` of one tensor; ``levels`` is the target's number of integer values."""
    lo, hi = stats.range()
    if method == "minmax":
        return lo, hi
    if not isinstance(stats, HistogramStats):
        raise UsageError(f"calibration method '{method}' needs histogram statistics")
    one_sided = lo >= 0 or hi <= 0
    if method == "percentile":
        if not 50 < percentile <= 100:
            raise UsageError(f"percentile must be in (50, 100], got {percentile}")
        if symmetric or one_sided:
            m = stats.magnitudes()
            cdf = np.cumsum(m) / m.sum()
            k = int(np.searchsorted(cdf, percentile / 100.0))
            t = min((k + 1) * stats.width, max(-lo, hi))
            return max(lo, -t), min(hi, t)
        tail = (1.0 - percentile / 100.0) / 2
        return max(lo, min(_quantile(stats, tail), 0.0)), min(hi, max(_quantile(stats, 1.0 - tail), 0.0))
    if method == "entropy":
        quant_levels = levels if one_sided and not symmetric else levels // 2
        kept, factor = _kl_threshold(stats.magnitudes(), max(quant_levels, 2))
        t = kept * factor * stats.width
        return max(lo, -t), min(hi, t)
    if method == "mse":
        if symmetric:
            t = _symmetric_mse(stats.magnitudes(), stats.width, max(levels // 2 - 1, 1))
            return max(lo, -t), min(hi, t)
        return _mse_range(stats, max(levels - 1, 1))
    raise UsageError(f"unknown calibration method '{method}'; valid: {', '.join(METHODS)}")


def ranges_from_statistics(stats: dict[str, MinMaxStats], method: str = "minmax",
                           tensors: Iterable[str] | None = None, **options) -> dict[str, tuple[float, float]]:
    """``tensor_range`` of every observed tensor (of ``tensors`` only, when given)."""
    names = stats if tensors is None else [n for n in dict.fromkeys(tensors) if n in stats]
    return {name: tensor_range(stats[name], method, **options) for name in names if stats[name].count}


# -- streaming tensors out of ORT ---------------------------------------------------------------
