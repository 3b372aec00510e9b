"""One-to-one matching of predicted centres to ground-truth centroids (the contest's rule).

A prediction is a true positive when its centre lies within ``radius`` px of a ground-truth
centroid that no higher-scored prediction has taken; each ground truth and each prediction
counts at most once. Predictions are taken in descending score order (ties: input order), each
taking its nearest unmatched ground truth.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Counts:
    """Pooled detection counts and the derived metrics."""

    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn)

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict:
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1}


def match_points(pred_xy, scores, gt_xy, radius: float) -> np.ndarray:
    """Greedy one-to-one matching.

    Args:
        pred_xy: (P, 2) predicted centres.
        scores: (P,) confidence (higher first).
        gt_xy: (G, 2) ground-truth centroids.
        radius: a match needs distance <= radius.

    Returns:
        (P,) int array: index of the matched ground truth, or -1.
    """
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    matched = np.full(len(pred_xy), -1, np.int64)
    if not len(pred_xy) or not len(gt_xy):
        return matched
    distances = np.hypot(pred_xy[:, None, 0] - gt_xy[None, :, 0],
                         pred_xy[:, None, 1] - gt_xy[None, :, 1])
    taken = np.zeros(len(gt_xy), bool)
    for p in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        candidates = np.where(~taken & (distances[p] <= radius))[0]
        if len(candidates):
            g = candidates[np.argmin(distances[p, candidates])]
            taken[g] = True
            matched[p] = g
    return matched


def count_matches(pred_xy, scores, gt_xy, radius: float) -> Counts:
    """TP/FP/FN of one image under :func:`match_points`."""
    matched = match_points(pred_xy, scores, gt_xy, radius)
    tp = int((matched >= 0).sum())
    return Counts(tp=tp, fp=len(matched) - tp, fn=len(np.asarray(gt_xy).reshape(-1, 2)) - tp)


def sweep_counts(per_image, radius: float) -> tuple[list[float], list[Counts]]:
    """Counts at every distinct score threshold, in one pass.

    Greedy matching by descending score is monotone: the matching of the predictions scoring
    >= t is a prefix of the full greedy matching. So predictions are taken once, in descending
    score order over all images (ties: input order within an image), each taking its image's
    nearest free ground truth within ``radius``; the cumulative counts at the end of each score
    group equal :func:`count_matches` at that threshold exactly.

    Args:
        per_image: iterable of (pred_xy (P, 2), scores (P,), gt_xy (G, 2)).
        radius: matching radius.

    Returns:
        (thresholds, descending; the pooled :class:`Counts` at each).
    """
    per_image = [(np.asarray(p, np.float64).reshape(-1, 2), np.asarray(s, np.float64).reshape(-1),
                  np.asarray(g, np.float64).reshape(-1, 2)) for p, s, g in per_image]
    n_gt = sum(len(g) for _, _, g in per_image)
    image_of = np.concatenate([np.full(len(s), i) for i, (_, s, _) in enumerate(per_image)]
                              + [np.zeros(0, int)]).astype(int)
    index_in = np.concatenate([np.arange(len(s)) for _, s, _ in per_image]
                              + [np.zeros(0, int)]).astype(int)
    scores = np.concatenate([s for _, s, _ in per_image] + [np.zeros(0)])
    taken = [np.zeros(len(g), bool) for _, _, g in per_image]
    order = np.lexsort((index_in, image_of, -scores))
    thresholds, counts = [], []
    tp = fp = 0
    for k, q in enumerate(order):
        pred_xy, _, gt = per_image[image_of[q]]
        free = taken[image_of[q]]
        x, y = pred_xy[index_in[q]]
        distances = np.hypot(gt[:, 0] - x, gt[:, 1] - y)
        candidates = np.where(~free & (distances <= radius))[0]
        if len(candidates):
            free[candidates[np.argmin(distances[candidates])]] = True
            tp += 1
        else:
            fp += 1
        if k + 1 == len(order) or scores[order[k + 1]] != scores[q]:
            thresholds.append(float(scores[q]))
            counts.append(Counts(tp=tp, fp=fp, fn=n_gt - tp))
    return thresholds, counts


def best_f1_threshold(per_image, radius: float) -> tuple[float, Counts]:
    """The score threshold with the best pooled F1 (the highest one among equals).

    Args:
        per_image: iterable of (pred_xy (P, 2), scores (P,), gt_xy (G, 2)).
        radius: matching radius.

    Returns:
        (threshold, counts at that threshold); (1.0, counts with no prediction) when nothing
        matches.
    """
    per_image = list(per_image)
    thresholds, counts = sweep_counts(per_image, radius)
    best = (1.0, Counts(fn=sum(len(np.asarray(g).reshape(-1, 2)) for _, _, g in per_image)))
    for threshold, total in zip(thresholds, counts):
        if total.f1 > best[1].f1:
            best = (threshold, total)
    return best


def max_recall_threshold(per_image, radius: float) -> float:
    """The highest score threshold that still reaches the best recall of any threshold.

    A cascade's stage 1 should pass on every mitosis it can find and as little else as
    possible: this is the loosest cut that loses no mitosis found at the lowest score.

    Args:
        per_image: iterable of (pred_xy (P, 2), scores (P,), gt_xy (G, 2)).
        radius: matching radius.

    Returns:
        The threshold; 0.0 when nothing matches (keep everything).
    """
    thresholds, counts = sweep_counts(per_image, radius)
    if not counts or counts[-1].tp == 0:
        return 0.0
    best_tp = max(c.tp for c in counts)
    return float(next(t for t, c in zip(thresholds, counts) if c.tp == best_tp))
