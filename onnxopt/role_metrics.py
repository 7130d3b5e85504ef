"""The metrics of each output role (roles.py), over all samples of one output.

Every role gets the numeric metrics (max abs and relative error, cosine, SNR over all
values). Roles that carry a decision add its agreement:

* ``scores``: top-1 agreement per score vector (last axis);
* ``sequence``: per-step agreement and ``sequence_agreement`` (whole [T] sequences equal, or
  with ``decode=ctc`` their greedy CTC strings);
* ``probability``: the same side of ``threshold``;
* ``embedding``: per-vector cosine, worst (``cosine_worst``) and mean, and ``nn_agreement``:
  each sample's nearest other sample (cosine, vectors mean-pooled over middle axes) is the
  same under reference and candidate (needs 3 vectors or more);
* ``boxes``: ``box_f1`` of the candidate's detections against the reference's at IoU
  ``match_iou`` (same class), both decoded the same way: score threshold, then per-class NMS.

A decision the reference makes by less than ``TIE_FRACTION`` of its range is a tie and agrees
either way (a top-1 margin, a probability's or box score's distance from the threshold, a
nearest neighbour's lead): such samples flip under float16 rounding already.
"""

from __future__ import annotations

import math

import numpy as np

from .metrics import TIE_FRACTION, _as_float, _cosine, _max_abs, _max_rel, _snr_db, _top2_margin, _value_range
from .roles import ROLE_METRICS, OutputRole

# A nearest neighbour that leads the candidate's choice by less than this cosine similarity is a tie.
NN_TIE = 0.01


def measure(role: OutputRole, reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    """Numeric metrics and the role's own, over all samples (lists are per sample)."""
    result: dict = {key: None for key in ROLE_METRICS[role.role]}
    for ref, cand in zip(reference, candidate):
        if ref.shape != cand.shape:
            mismatch = {"max_abs": math.inf, "max_rel": math.inf, "cosine": 0.0, "snr_db": -math.inf,
                        "shape_mismatch": f"{list(ref.shape)} vs {list(cand.shape)}"}
            return result | {k: 0.0 for k in ROLE_METRICS[role.role]} | mismatch
        if ref.dtype.kind in "OUS":
            same = float(np.mean(ref == cand)) if ref.size else 1.0
            return {"max_abs": 0.0 if same == 1.0 else math.inf, "max_rel": None, "cosine": None,
                    "snr_db": None, "agreement": same}
    result |= numeric(reference, candidate)
    if reference and reference[0].dtype.kind == "f":
        result |= ROLE_MEASURES.get(role.role, lambda *_: {})(role, reference, candidate)
    return result


def numeric(reference: list[np.ndarray], candidate: list[np.ndarray]) -> dict:
    r = np.concatenate([_as_float(a).ravel() for a in reference]) if reference else np.zeros(0)
    c = np.concatenate([_as_float(a).ravel() for a in candidate]) if candidate else np.zeros(0)
    return {"max_abs": _max_abs(r, c), "max_rel": _max_rel(r, c), "cosine": _cosine(r, c), "snr_db": _snr_db(r, c)}


def _scores(role, reference, candidate) -> dict:
    """Top-1 agreement per row of the last axis; for rank 3, also whole sequences."""
    tie = TIE_FRACTION * _value_range(reference)
    agree = total = same_sequences = sequences = 0
    for ref, cand in zip(reference, candidate):
        if not ref.size or ref.ndim < 1 or ref.shape[-1] < 2:
            continue
        r, c = ref.reshape(-1, ref.shape[-1]), cand.reshape(-1, cand.shape[-1])
        equal = (np.argmax(r, axis=-1) == np.argmax(c, axis=-1)) | (_top2_margin(r) < tie)
        agree += int(np.sum(equal))
        total += r.shape[0]
        if role.role == "sequence" and ref.ndim >= 2:
            steps = ref.shape[-2]
            same = equal.reshape(-1, steps).all(axis=1)
            if role.param("decode") == "ctc":
                same |= _same_ctc_strings(r.reshape(-1, steps, r.shape[-1]), c.reshape(-1, steps, c.shape[-1]),
                                          int(role.param("blank")))
            same_sequences += int(np.sum(same))
            sequences += same.size
    out = {"agreement": agree / total if total else None}
    if role.role == "sequence":
        out["sequence_agreement"] = same_sequences / sequences if sequences else None
    return out


def _same_ctc_strings(reference: np.ndarray, candidate: np.ndarray, blank: int) -> np.ndarray:
    """Per sequence of [M, T, C] scores: the greedy CTC decodes are equal."""
    def decode(steps: np.ndarray) -> tuple[int, ...]:
        keep = np.ones(steps.shape, bool)
        keep[1:] = steps[1:] != steps[:-1]
        return tuple(int(s) for s in steps[keep & (steps != blank)])

    ref_steps, cand_steps = np.argmax(reference, axis=-1), np.argmax(candidate, axis=-1)
    return np.array([decode(r) == decode(c) for r, c in zip(ref_steps, cand_steps)], bool)


def _probability(role, reference, candidate) -> dict:
    threshold = float(role.param("threshold"))
    tie = TIE_FRACTION * _value_range(reference)
    agree = total = 0
    for ref, cand in zip(reference, candidate):
        r, c = _as_float(ref), _as_float(cand)
        agree += int(np.sum(((r > threshold) == (c > threshold)) | (np.abs(r - threshold) < tie)))
        total += r.size
    return {"agreement": agree / total if total else None}


def _embedding(role, reference, candidate) -> dict:
    r = np.concatenate([_as_float(a).reshape(-1, a.shape[-1]) for a in reference])
    c = np.concatenate([_as_float(a).reshape(-1, a.shape[-1]) for a in candidate])
    nr, nc = np.linalg.norm(r, axis=1), np.linalg.norm(c, axis=1)
    dot = np.sum(r * c, axis=1)
    both_zero = (nr == 0) & (nc == 0)
    per_vector = np.where(both_zero, 1.0, dot / np.maximum(nr * nc, 1e-300))
    return {"cosine_worst": float(per_vector.min()) if per_vector.size else None,
            "cosine_mean": float(per_vector.mean()) if per_vector.size else None,
            "nn_agreement": neighbour_agreement(reference, candidate)}


def pooled(outputs: list[np.ndarray]) -> np.ndarray:
    """One vector per sample row: ``[B, D]`` as is, ``[B, ..., D]`` mean-pooled; stacked."""
    vectors = []
    for out in outputs:
        out = _as_float(out)
        if out.ndim > 2:
            vectors.append(out.reshape(out.shape[0], -1, out.shape[-1]).mean(axis=1))
        else:
            vectors.append(out.reshape(-1, out.shape[-1]))
    return np.concatenate(vectors)


def _similarities(vectors: np.ndarray) -> np.ndarray:
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-30)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity


def neighbour_agreement(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float | None:
    """Share of vectors whose nearest other vector is the same (None below 3 vectors: with two,
    each is the other's nearest whatever the model does)."""
    ref, cand = pooled(reference), pooled(candidate)
    if ref.shape[0] < 3:
        return None
    ref_sim = _similarities(ref)
    ref_nn, cand_nn = np.argmax(ref_sim, axis=1), np.argmax(_similarities(cand), axis=1)
    rows = np.arange(ref.shape[0])
    lead = ref_sim[rows, ref_nn] - ref_sim[rows, cand_nn]
    return float(np.mean((ref_nn == cand_nn) | (lead < NN_TIE)))


# ---------------------------------------------------------------------------------------------
# Boxes


def _box_table(sample: np.ndarray, layout: str) -> tuple[np.ndarray, np.ndarray]:
    """(boxes [B, A, 4], class scores [B, A, C]) of one sample under the layout."""
    table = _as_float(sample)
    if table.ndim == 2:
        table = table[None]
    if layout == "cxa":
        table = table.transpose(0, 2, 1)
    boxes = table[..., :4]
    if layout == "aoc":
        objectness = table[..., 4:5]
        scores = objectness * table[..., 5:] if table.shape[-1] > 5 else objectness
    else:
        scores = table[..., 4:]
    return boxes, scores


def _xyxy(boxes: np.ndarray, form: str) -> np.ndarray:
    if form == "xyxy":
        return boxes
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def _iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)  # noqa: E731
    union = area(box) + area(others) - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-300), 0.0)


def detections(boxes: np.ndarray, scores: np.ndarray, role: OutputRole, floor: float):
    """(xyxy boxes, scores, classes) of one image: best class per anchor, score >= floor, then
    greedy NMS per class, at most ``max_boxes``."""
    if scores.shape[-1] == 0:
        return np.zeros((0, 4)), np.zeros(0), np.zeros(0, int)
    classes = np.argmax(scores, axis=-1)
    best = scores[np.arange(scores.shape[0]), classes]
    keep = best >= floor
    xyxy, best, classes = _xyxy(boxes[keep], str(role.param("box"))), best[keep], classes[keep]
    order = np.argsort(-best, kind="stable")
    chosen: list[int] = []
    limit, nms_iou = int(role.param("max_boxes")), float(role.param("nms_iou"))
    while order.size and len(chosen) < limit:
        first, rest = order[0], order[1:]
        chosen.append(int(first))
        same_class = classes[rest] == classes[first]
        overlap = _iou(xyxy[first], xyxy[rest]) > nms_iou
        order = rest[~(same_class & overlap)]
    chosen_index = np.array(chosen, int)
    return xyxy[chosen_index], best[chosen_index], classes[chosen_index]


def _boxes(role, reference, candidate) -> dict:
    layout = str(role.param("layout"))
    if layout == "auto":
        from .roles import _box_layout

        found = _box_layout(reference)
        layout = found[0] if found else "cxa"
    threshold, match_iou = float(role.param("score_threshold")), float(role.param("match_iou"))
    margin = TIE_FRACTION  # scores live in [0, 1]
    tp = fp = fn = present = 0
    for ref, cand in zip(reference, candidate):
        ref_boxes, ref_scores = _box_table(ref, layout)
        cand_boxes, cand_scores = _box_table(cand, layout)
        for image in range(ref_boxes.shape[0]):
            r = detections(ref_boxes[image], ref_scores[image], role, threshold - margin)
            c = detections(cand_boxes[image], cand_scores[image], role, threshold - margin)
            hits, ref_left, cand_left = _match(r, c, match_iou, threshold)
            present += int(np.sum(r[1] >= threshold))
            tp += hits
            fn += int(np.sum(r[1][ref_left] >= threshold + margin))
            fp += int(np.sum(c[1][cand_left] >= threshold + margin))
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return {"box_f1": f1, "boxes_reference": present}


def _match(ref, cand, match_iou: float, threshold: float) -> tuple[int, list[int], list[int]]:
    """Greedy one-to-one matches of the same class at IoU >= match_iou, highest IoU first.
    Returns true positives (pairs where either side clears the threshold; a pair of two
    near-threshold boxes counts nothing) and the unmatched indices of each side."""
    pairs = []
    for i in range(len(ref[0])):
        if not len(cand[0]):
            break
        ious = _iou(ref[0][i], cand[0])
        for j in np.nonzero((ious >= match_iou) & (cand[2] == ref[2][i]))[0]:
            pairs.append((float(ious[j]), i, int(j)))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    used_ref, used_cand, hits = set(), set(), 0
    for _, i, j in pairs:
        if i in used_ref or j in used_cand:
            continue
        used_ref.add(i)
        used_cand.add(j)
        hits += int(ref[1][i] >= threshold or cand[1][j] >= threshold)
    ref_left = [i for i in range(len(ref[0])) if i not in used_ref]
    cand_left = [j for j in range(len(cand[0])) if j not in used_cand]
    return hits, ref_left, cand_left


ROLE_MEASURES = {"scores": _scores, "sequence": _scores, "probability": _probability, "embedding": _embedding,
                 "boxes": _boxes}
