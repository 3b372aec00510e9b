"""Choosing the cascade's two thresholds on whole validation fields.

A training run's own thresholds come from its validation *patches* and *tiles*, which hold
neither stage 1's false positives on whole fields (mining touches training images only) nor
the 30 px merge of accepted points. Running the cascade with permissive thresholds over whole
validation fields and picking the best-F1 pair there gives thresholds that transfer; the
held-out fields are never used.

Both searches are exact and cheap because of one property of greedy suppression: the points a
greedy merge keeps among the rows scoring >= t are the survivors of the merge over all rows
(in the same score order) that score >= t. So, for a fixed stage-1 cut, one merge ranked by
the stage-2 score and one threshold sweep give the metrics at every stage-2 threshold.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from focas_keras.evaluation.evaluate import DEFAULT_RADIUS_PX, sweep
from focas_keras.inference.cascade import merge_points


def merged(preds: pd.DataFrame, score: str, merge_px: float) -> pd.DataFrame:
    """The rows that survive the cascade's greedy point merge, ranked by one score column.

    Args:
        preds: a detections table (``image``, ``x``, ``y``, ``det_score``, ``cls_score``...).
        score: ``det_score`` or ``cls_score``: the ranking of the merge.
        merge_px: merge radius (0: no merging).

    Returns:
        The surviving rows (``accepted`` set True), in input order.
    """
    keep = np.zeros(len(preds), bool)
    positions = np.arange(len(preds))
    for _, index in preds.groupby("image", sort=False).indices.items():
        rows = preds.iloc[index]
        keep[positions[index]] = merge_points(rows[["x", "y"]].to_numpy(np.float64),
                                              rows[score].to_numpy(np.float64),
                                              np.ones(len(rows), bool), merge_px)
    return preds[keep].assign(accepted=True)


def _result(best: dict, **thresholds) -> dict:
    return {**thresholds, **{k: best[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")}}


def calibrate_stage1(truth, preds: pd.DataFrame, radius_px: float = DEFAULT_RADIUS_PX,
                     merge_px: float = 30.0) -> dict:
    """The best-F1 stage-1 threshold for stage 1 alone (merged like the cascade's output).

    Returns:
        {"det_threshold", "tp", "fp", "fn", "precision", "recall", "f1"}; det_threshold is
        1.0 when no threshold finds a mitosis.
    """
    result = sweep(truth, merged(preds, "det_score", merge_px), radius_px, score="det")
    best = result["best"]
    return _result(best, det_threshold=1.0 if best["threshold"] is None else best["threshold"])


def calibrate_cascade(truth, preds: pd.DataFrame, radius_px: float = DEFAULT_RADIUS_PX,
                      merge_px: float = 30.0, det_grid: int = 40,
                      min_det_threshold: float = 0.0) -> dict:
    """The best-F1 (stage-1, stage-2) threshold pair of the cascade.

    Args:
        truth: a :class:`~focas_keras.evaluation.evaluate.Truth` or {image: (G, 2) points}.
        preds: every candidate of the fields, from a run with permissive thresholds (both
            scores present).
        radius_px: matching radius.
        merge_px: the cascade's merge radius.
        det_grid: stage-1 cuts tried: this many quantiles of the candidates' stage-1 scores
            (plus ``min_det_threshold``).
        min_det_threshold: the lowest stage-1 cut.

    Returns:
        {"det_threshold", "cls_threshold", "tp", "fp", "fn", "precision", "recall", "f1"}; ties
        keep the lower stage-1 cut (more candidates, the recall stage 1 is there for) and then
        the higher stage-2 threshold. Thresholds are 1.0 when no pair finds a mitosis.
    """
    det = preds["det_score"].to_numpy(np.float64)
    cuts = np.unique(np.concatenate([
        [min_det_threshold],
        np.quantile(det[det >= min_det_threshold], np.linspace(0, 1, det_grid, endpoint=False))
        if np.any(det >= min_det_threshold) else []]))
    best = None
    for cut in cuts:
        result = sweep(truth, merged(preds[det >= cut], "cls_score", merge_px), radius_px,
                       score="cls")["best"]
        if result["threshold"] is not None and (best is None or result["f1"] > best["f1"]):
            best = _result(result, det_threshold=float(cut), cls_threshold=result["threshold"])
    if best is None:
        empty = sweep(truth, preds.iloc[:0], radius_px, score="cls")["best"]
        best = _result(empty, det_threshold=1.0, cls_threshold=1.0)
    return best
