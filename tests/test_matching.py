"""One-to-one centroid matching on hand-made cases."""

import numpy as np
import pytest

from focas_keras.evaluation.matching import (Counts, best_f1_threshold, count_matches, match_points,
                                             max_recall_threshold)


def test_two_predictions_near_one_gt_one_is_fp():
    matched = match_points([[10, 10], [12, 10]], [0.6, 0.9], [[11, 10]], radius=20)
    assert matched.tolist() == [-1, 0]  # the higher score takes the ground truth
    assert count_matches([[10, 10], [12, 10]], [0.6, 0.9], [[11, 10]], 20) == Counts(1, 1, 0)


def test_distance_exactly_radius_matches_and_beyond_does_not():
    assert match_points([[20, 0]], [1.0], [[0, 0]], radius=20).tolist() == [0]
    assert match_points([[20.001, 0]], [1.0], [[0, 0]], radius=20).tolist() == [-1]


def test_ties_take_nearest_free_gt():
    # Equal scores: input order decides; each prediction takes its nearest free GT.
    matched = match_points([[0, 0], [0, 0]], [0.5, 0.5], [[5, 0], [15, 0]], radius=20)
    assert matched.tolist() == [0, 1]


def test_empty_cases():
    assert count_matches(np.zeros((0, 2)), [], [[1, 1]], 20) == Counts(0, 0, 1)
    assert count_matches([[1, 1]], [1.0], np.zeros((0, 2)), 20) == Counts(0, 1, 0)
    assert Counts().f1 == 0.0


def test_best_f1_threshold():
    per_image = [([[0, 0], [100, 100], [200, 200]], [0.9, 0.3, 0.8], [[0, 0], [200, 200]])]
    threshold, counts = best_f1_threshold(per_image, 20)
    assert threshold == 0.8 and counts == Counts(2, 0, 0)


def test_sweep_equals_brute_force_at_every_threshold():
    from focas_keras.evaluation.matching import sweep_counts

    rng = np.random.default_rng(0)
    per_image = []
    for _ in range(6):
        gt = rng.uniform(0, 200, (rng.integers(0, 5), 2))
        preds = rng.uniform(0, 200, (rng.integers(0, 12), 2))
        scores = rng.choice([0.1, 0.3, 0.5, 0.7, 0.9], len(preds))  # many ties
        per_image.append((preds, scores, gt))
    thresholds, counts = sweep_counts(per_image, 30.0)
    assert thresholds == sorted(thresholds, reverse=True)
    for threshold, total in zip(thresholds, counts):
        brute = Counts()
        for p, s, g in per_image:
            keep = s >= threshold
            brute = brute + count_matches(p[keep], s[keep], g, 30.0)
        assert total == brute


def test_max_recall_threshold_is_the_loosest_cut_keeping_best_recall():
    gt = np.array([[10.0, 10.0], [100.0, 100.0]])
    preds = np.array([[11.0, 10.0], [300.0, 300.0], [100.0, 101.0], [500.0, 500.0]])
    scores = np.array([0.9, 0.8, 0.4, 0.1])
    assert max_recall_threshold([(preds, scores, gt)], 20.0) == pytest.approx(0.4)
    # Only the first GT is ever found: the cut right at its score.
    assert max_recall_threshold([(preds[:2], scores[:2], gt)], 20.0) == pytest.approx(0.9)
    assert max_recall_threshold([(preds[1:2], scores[1:2], gt)], 20.0) == 0.0
    assert max_recall_threshold([], 20.0) == 0.0
