"""Task-level agreement between a reference model's outputs and a candidate's.

Each function takes two lists with one array per evaluation sample (the reference's and the
candidate's value of the same output) and returns a rate in [0, 1], 1 meaning the candidate
makes the same decisions as the reference on every sample:

* classification: argmax over the last axis, per row;
* ctc: greedy CTC decode of ``[N, T, C]`` scores (argmax per step, collapse repeats, drop the
  blank class 0), exact string match per sequence;
* detection_map: boxes from a ``[N, 1, H, W]`` probability map (threshold, 8-connected
  components, PaddleOCR's DB post-processing filters ``min_size`` and ``box_thresh``), F1 of
  the candidate's boxes against the reference's at IoU >= 0.5, over the whole set;
* vad: speech decision (probability > 0.5) per chunk;
* embedding: nearest-neighbour agreement across the set: each pooled vector's nearest other
  vector (cosine) is the same under reference and candidate.

``cosine`` and ``snr_db`` are the output-level metrics that go with them, over the whole set.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from onnxopt.role_metrics import pooled  # one vector per sequence, as the embedding role pools

Arrays = list[np.ndarray]
Box = tuple[int, int, int, int]  # y0, x0, y1, x1, half-open

DET_THRESHOLD = 0.3
DET_BOX_THRESHOLD = 0.6
DET_MIN_SIZE = 3
IOU_MATCH = 0.5
VAD_THRESHOLD = 0.5


def argmax_agreement(reference: Arrays, candidate: Arrays) -> float:
    same = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        r = np.argmax(ref.reshape(-1, ref.shape[-1]), axis=-1)
        c = np.argmax(cand.reshape(-1, cand.shape[-1]), axis=-1)
        same += int(np.sum(r == c))
        total += r.size
    return same / total if total else 1.0


def ctc_greedy_decode(scores: np.ndarray, blank: int = 0) -> list[tuple[int, ...]]:
    """Greedy CTC decode of ``[T, C]`` or ``[N, T, C]`` scores: one label tuple per sequence."""
    scores = np.asarray(scores)
    if scores.ndim == 2:
        scores = scores[None]
    decoded = []
    for steps in np.argmax(scores, axis=-1):
        keep = np.ones(steps.shape, bool)
        keep[1:] = steps[1:] != steps[:-1]
        keep &= steps != blank
        decoded.append(tuple(int(s) for s in steps[keep]))
    return decoded


def ctc_agreement(reference: Arrays, candidate: Arrays, blank: int = 0) -> float:
    same = total = 0
    for ref, cand in zip(reference, candidate, strict=True):
        for r, c in zip(ctc_greedy_decode(ref, blank), ctc_greedy_decode(cand, blank), strict=True):
            same += r == c
            total += 1
    return same / total if total else 1.0


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: (labels 1..n, 0 for background; n)."""
    try:
        from scipy import ndimage
    except ImportError:
        return _label_bfs(mask)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), int))
    return labels, int(count)


def _label_bfs(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """label_components without scipy: breadth-first flood fill."""
    mask = np.asarray(mask, bool)
    labels = np.zeros(mask.shape, np.int32)
    height, width = mask.shape
    count = 0
    for y, x in zip(*np.nonzero(mask)):
        if labels[y, x]:
            continue
        count += 1
        labels[y, x] = count
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for ny in range(max(cy - 1, 0), min(cy + 2, height)):
                for nx in range(max(cx - 1, 0), min(cx + 2, width)):
                    if mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = count
                        queue.append((ny, nx))
    return labels, count


def boxes_from_map(prob: np.ndarray, threshold: float = DET_THRESHOLD, box_thresh: float = DET_BOX_THRESHOLD,
                   min_size: int = DET_MIN_SIZE) -> list[Box]:
    """Axis-aligned text boxes from a 2-D probability map, as DB post-processing finds them:
    components of ``prob > threshold`` whose shorter side is at least ``min_size`` pixels and
    whose mean probability is at least ``box_thresh``."""
    prob = np.asarray(prob, np.float64)
    labels, count = label_components(prob > threshold)
    boxes = []
    for index in range(1, count + 1):
        ys, xs = np.nonzero(labels == index)
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        if min(y1 - y0, x1 - x0) < min_size:
            continue
        if float(prob[ys, xs].mean()) < box_thresh:
            continue
        boxes.append((y0, x0, y1, x1))
    return boxes


def iou(a: Box, b: Box) -> float:
    inter_h = min(a[2], b[2]) - max(a[0], b[0])
    inter_w = min(a[3], b[3]) - max(a[1], b[1])
    if inter_h <= 0 or inter_w <= 0:
        return 0.0
    inter = inter_h * inter_w
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area


def match_boxes(reference: list[Box], candidate: list[Box], threshold: float = IOU_MATCH) -> int:
    """True positives: one-to-one matches at IoU >= threshold, greedily by highest IoU."""
    pairs = sorted(((iou(r, c), i, j) for i, r in enumerate(reference) for j, c in enumerate(candidate)),
                   reverse=True)
    used_ref, used_cand, matched = set(), set(), 0
    for value, i, j in pairs:
        if value < threshold:
            break
        if i in used_ref or j in used_cand:
            continue
        used_ref.add(i)
        used_cand.add(j)
        matched += 1
    return matched


def detection_f1(reference: Arrays, candidate: Arrays, **box_options) -> float:
    """F1 of the candidate's boxes against the reference's over all maps (1.0 if neither has any)."""
    tp = fp = fn = 0
    for ref, cand in zip(reference, candidate, strict=True):
        ref_maps = np.asarray(ref).reshape(-1, *ref.shape[-2:])
        cand_maps = np.asarray(cand).reshape(-1, *cand.shape[-2:])
        for r, c in zip(ref_maps, cand_maps, strict=True):
            ref_boxes, cand_boxes = boxes_from_map(r, **box_options), boxes_from_map(c, **box_options)
            hits = match_boxes(ref_boxes, cand_boxes)
            tp += hits
            fp += len(cand_boxes) - hits
            fn += len(ref_boxes) - hits
    return 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)


def vad_agreement(reference: Arrays, candidate: Arrays, threshold: float = VAD_THRESHOLD) -> float:
    ref = np.concatenate([np.ravel(r) for r in reference]) > threshold
    cand = np.concatenate([np.ravel(c) for c in candidate]) > threshold
    return float(np.mean(ref == cand)) if ref.size else 1.0


def nearest_neighbours(vectors: np.ndarray) -> np.ndarray:
    """Index of each row's nearest other row by cosine similarity."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.maximum(norms, 1e-30)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def neighbour_agreement(reference: Arrays, candidate: Arrays) -> float:
    ref, cand = pooled(reference), pooled(candidate)
    if ref.shape[0] < 2:
        return 1.0
    return float(np.mean(nearest_neighbours(ref) == nearest_neighbours(cand)))


def worst_cosine(reference: Arrays, candidate: Arrays) -> float:
    """The lowest cosine similarity of one pooled vector (one sentence) with its reference."""
    ref, cand = pooled(reference), pooled(candidate)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)
    return float(np.min(np.sum(ref * cand, axis=1) / np.maximum(norms, 1e-30)))


def cosine(reference: Arrays, candidate: Arrays) -> float:
    """Cosine similarity of all samples' values together (a per-sample cosine of a one-value
    output, such as a speech probability, would always be 1)."""
    r = np.concatenate([np.ravel(a) for a in reference]).astype(np.float64)
    c = np.concatenate([np.ravel(a) for a in candidate]).astype(np.float64)
    nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
    if nr == 0.0 and nc == 0.0:
        return 1.0
    if nr == 0.0 or nc == 0.0:
        return 0.0
    return float(r @ c) / (nr * nc)


def snr_db(reference: Arrays, candidate: Arrays) -> float:
    """Signal-to-noise ratio over all samples together, in dB (inf when identical)."""
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(c, np.float64)) ** 2))
                for r, c in zip(reference, candidate, strict=True))
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


AGREEMENT = {
    "classification": ("argmax", argmax_agreement),
    "ctc": ("ctc_string", ctc_agreement),
    "detection_map": ("box_f1", detection_f1),
    "vad": ("decision", vad_agreement),
    "embedding": ("nn", neighbour_agreement),
}


def task_agreement(task: str, reference: Arrays, candidate: Arrays) -> tuple[str, float]:
    """(metric name, value) of the task's agreement metric."""
    if task not in AGREEMENT:
        raise KeyError(f"no agreement metric for task {task!r}; known: {', '.join(AGREEMENT)}")
    name, metric = AGREEMENT[task]
    return name, metric(reference, candidate)
