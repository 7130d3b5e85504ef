"""Exact, deterministic 1-D k-means: sorted values, a fixed start, Lloyd steps on prefix sums.

In one dimension every cluster of a Lloyd-stable assignment is a run of the sorted values,
so a step is one ``searchsorted`` and prefix-sum differences: O(k log n) per iteration after
one sort, no randomness. The start is ``linear`` (k evenly spaced values from min to max, as
Deep Compression found best: it keeps entries for the rare large weights that matter most)
or ``quantile`` (the k quantile midpoints; runs of equal values are topped up with the value
farthest from every centre). On PP-OCR's classifier, 4-bit per tensor, linear gives output
cosine >= 0.996 where quantile gives 0.95.
"""

from __future__ import annotations

import numpy as np


def kmeans_1d(values: np.ndarray, k: int, iterations: int = 200, init: str = "linear") -> tuple[np.ndarray, np.ndarray]:
    """(codebook float32 [k], index of each value's nearest codebook entry) for ``values``.

    Entries are ascending; when there are at most ``k`` distinct values the codebook holds
    them exactly (padded by repeating the largest), so clustering is lossless.
    """
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return np.zeros(k, np.float32), np.zeros(0, np.int64)
    distinct = np.unique(flat)
    if distinct.size <= k:
        codebook = np.concatenate([distinct, np.repeat(distinct[-1:], k - distinct.size)])
    else:
        codebook = _lloyd(np.sort(flat).astype(np.float64), k, iterations, init).astype(np.float32)
    return codebook, nearest(flat, codebook)


def _start(x: np.ndarray, k: int, init: str) -> np.ndarray:
    n = x.size
    if init == "linear":
        return np.linspace(x[0], x[-1], k)
    centres = np.unique(x[(2 * np.arange(k) + 1) * n // (2 * k)])
    while centres.size < k:
        gaps = np.min(np.abs(x[:, None] - centres[None, :]), axis=1) if n * centres.size <= 1 << 24 else None
        far = x[int(np.argmax(gaps))] if gaps is not None else x[np.searchsorted(x, centres[-1], "right") % n]
        centres = np.unique(np.append(centres, far))
        if gaps is not None and gaps.max() == 0:
            break
    return centres


def _lloyd(x: np.ndarray, k: int, iterations: int, init: str) -> np.ndarray:
    sums = np.concatenate([[0.0], np.cumsum(x)])
    centres = _start(x, k, init)
    for _ in range(iterations):
        cuts = np.searchsorted(x, (centres[:-1] + centres[1:]) / 2, side="right")
        starts, ends = np.concatenate([[0], cuts]), np.concatenate([cuts, [x.size]])
        counts = ends - starts
        moved = np.where(counts > 0, (sums[ends] - sums[starts]) / np.maximum(counts, 1), centres)
        moved = np.sort(moved)
        if np.array_equal(moved, centres):
            break
        centres = moved
    if centres.size < k:
        centres = np.concatenate([centres, np.repeat(centres[-1:], k - centres.size)])
    return centres


def nearest(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest entry of an ascending ``codebook`` for every value (ties: the lower)."""
    flat = np.asarray(values, dtype=np.float32).reshape(-1).astype(np.float64)
    book = codebook.astype(np.float64)
    upper = np.clip(np.searchsorted(book, flat), 1, book.size - 1) if book.size > 1 else np.zeros(flat.size, int)
    if book.size == 1:
        return upper.astype(np.int64)
    lower = upper - 1
    pick_lower = np.abs(flat - book[lower]) <= np.abs(flat - book[upper])
    return np.where(pick_lower, lower, upper).astype(np.int64)
