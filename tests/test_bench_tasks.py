"""bench/tasks.py: task-level agreement metrics on hand-made arrays."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "tasks.py"
_SPEC = importlib.util.spec_from_file_location("bench_tasks", _PATH)
tasks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(tasks)


def one_hot_steps(labels: list[int], classes: int = 5) -> np.ndarray:
    """[1, T, C] scores whose per-step argmax is ``labels``."""
    scores = np.full((1, len(labels), classes), 0.01, np.float32)
    scores[0, np.arange(len(labels)), labels] = 0.9
    return scores


def test_argmax_agreement_counts_rows_across_samples():
    ref = [np.array([[0.9, 0.1], [0.2, 0.8]]), np.array([[0.6, 0.4]])]
    cand = [np.array([[0.7, 0.3], [0.6, 0.4]]), np.array([[0.55, 0.45]])]
    assert tasks.argmax_agreement(ref, cand) == pytest.approx(2 / 3)
    assert tasks.argmax_agreement(ref, ref) == 1.0


def test_ctc_decode_collapses_repeats_and_drops_blanks():
    assert tasks.ctc_greedy_decode(one_hot_steps([0, 3, 3, 0, 3, 2, 2, 0])[0]) == [(3, 3, 2)]
    assert tasks.ctc_greedy_decode(one_hot_steps([0, 0, 0])) == [()]


def test_ctc_agreement_is_exact_string_match_not_step_match():
    ref = [one_hot_steps([1, 1, 0, 2]), one_hot_steps([4, 0, 4])]
    # same string with different alignment: agrees; one label changed: disagrees
    cand = [one_hot_steps([1, 0, 2, 2]), one_hot_steps([4, 0, 3])]
    assert tasks.ctc_agreement(ref, cand) == 0.5


def test_components_are_eight_connected_and_bfs_matches():
    mask = np.zeros((6, 7), bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one component
    mask[4:6, 4:7] = True
    labels, count = tasks.label_components(mask)
    bfs_labels, bfs_count = tasks._label_bfs(mask)
    assert count == bfs_count == 2
    assert labels[0, 0] == labels[1, 1] and bfs_labels[0, 0] == bfs_labels[1, 1]
    assert (labels > 0).sum() == (bfs_labels > 0).sum() == mask.sum()


def test_boxes_from_map_applies_threshold_min_size_and_box_score():
    prob = np.zeros((20, 30))
    prob[2:8, 3:15] = 0.9    # a text box
    prob[12:14, 3:20] = 0.9  # 2 pixels tall: below min_size 3
    prob[12:18, 22:28] = 0.4  # above the 0.3 threshold but mean score below box_thresh 0.6
    assert tasks.boxes_from_map(prob) == [(2, 3, 8, 15)]


def test_iou_and_one_to_one_matching():
    assert tasks.iou((0, 0, 10, 10), (0, 5, 10, 15)) == pytest.approx(50 / 150)
    assert tasks.iou((0, 0, 2, 2), (5, 5, 6, 6)) == 0.0
    # two candidates overlap the same reference box: only one may match
    assert tasks.match_boxes([(0, 0, 10, 10)], [(0, 0, 10, 10), (0, 1, 10, 10)]) == 1
    assert tasks.match_boxes([(0, 0, 10, 10)], [(0, 0, 10, 4)]) == 0  # IoU 0.4 < 0.5


def test_detection_f1_counts_missed_and_extra_boxes_over_the_set():
    ref = np.zeros((1, 1, 20, 40), np.float32)
    ref[0, 0, 2:8, 2:12] = ref[0, 0, 2:8, 20:30] = 0.95
    cand = np.zeros_like(ref)
    cand[0, 0, 2:8, 2:12] = 0.95     # kept
    cand[0, 0, 12:18, 20:30] = 0.95  # the second box moved: one miss, one extra
    assert tasks.detection_f1([ref], [cand]) == pytest.approx(2 * 1 / (2 * 1 + 1 + 1))
    empty = np.zeros_like(ref)
    assert tasks.detection_f1([empty], [empty]) == 1.0
    assert tasks.detection_f1([ref], [empty]) == 0.0


def test_vad_agreement_compares_decisions_at_half():
    ref = [np.array([[0.9]]), np.array([[0.1]]), np.array([[0.52]])]
    cand = [np.array([[0.6]]), np.array([[0.2]]), np.array([[0.48]])]
    assert tasks.vad_agreement(ref, cand) == pytest.approx(2 / 3)


def test_neighbour_agreement_pools_sequences_and_finds_nearest_other():
    base = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.9, 0.1]])
    ref = [base[i][None, None].repeat(3, 1) for i in range(4)]  # 4 sequences of 3 tokens
    assert tasks.neighbour_agreement(ref, ref) == 1.0
    swapped = [ref[0], ref[2], ref[1], ref[3]]  # sample 1 now looks like sample 2
    assert tasks.nearest_neighbours(tasks.pooled(ref)).tolist() == [1, 0, 3, 2]
    assert tasks.neighbour_agreement(ref, swapped) < 1.0


def test_cosine_and_snr_are_over_the_whole_set():
    ref = [np.array([1.0, 0.0]), np.array([3.0, 4.0])]
    cand = [np.array([1.0, 1.0]), np.array([3.0, 4.0])]
    assert tasks.cosine(ref, cand) == pytest.approx(26 / (math.sqrt(26) * math.sqrt(27)))
    # one-value outputs: per-sample cosine would be 1 for any same-sign pair, the set's is not
    assert tasks.cosine([np.array([0.9]), np.array([0.1])], [np.array([0.1]), np.array([0.9])]) < 0.3
    assert tasks.snr_db(ref, cand) == pytest.approx(10 * math.log10(26 / 1))
    assert tasks.snr_db(ref, ref) == math.inf


def test_task_agreement_dispatches_and_rejects_unknown_tasks():
    ref = [np.array([[0.9, 0.1]])]
    assert tasks.task_agreement("classification", ref, ref) == ("argmax", 1.0)
    with pytest.raises(KeyError, match="regression"):
        tasks.task_agreement("regression", ref, ref)
