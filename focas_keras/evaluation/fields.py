"""Scoring candidates on whole validation fields: what model selection should look at.

Validation tiles are cut around mitoses and validation patches hold no stage-1 false
positives, so metrics on them say little about whole fields (tile F1 0.9 next to whole-field
F1 0.3 on real HPFs). These functions score stage 1, or the cascade, on whole fields with the
same point merge and thresholds search as :mod:`focas_keras.evaluation.calibrate`. Distances
are given in micrometres and converted with each split's pixel size, so a model trained at
half resolution is judged by the same 5 um rule as one at full resolution.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from focas_keras.datasets.annotations import ICPR2012_MPP
from focas_keras.evaluation.calibrate import calibrate_cascade, calibrate_stage1

#: The contest's match radius: 20 px at 0.2456 um/px (about 5 um).
MATCH_UM = 20.0 * ICPR2012_MPP
#: The cascade's default point merge: 30 px at 0.2456 um/px.
MERGE_UM = 30.0 * ICPR2012_MPP


def candidate_table(per_image: dict) -> pd.DataFrame:
    """A detections table from ``{image_id: (centres (D, 2), det_scores (D,), cls_scores (D,)
    or None)}``; ``cls_score`` copies ``det_score`` where stage 2 did not run."""
    frames = []
    for image_id, (centres, det_scores, cls_scores) in per_image.items():
        centres = np.asarray(centres, np.float64).reshape(-1, 2)
        det_scores = np.asarray(det_scores, np.float64).reshape(-1)
        cls_scores = det_scores if cls_scores is None else np.asarray(cls_scores, np.float64)
        frames.append(pd.DataFrame({"image": image_id, "x": centres[:, 0], "y": centres[:, 1],
                                    "det_score": det_scores, "cls_score": cls_scores,
                                    "accepted": True}))
    columns = ["image", "x", "y", "det_score", "cls_score", "accepted"]
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns]


def _near(truth: dict, preds: pd.DataFrame, radius_px: float):
    """Per image with mitoses: ``(near, det_scores)``, ``near`` bool (G, D): mitosis g has
    candidate d within ``radius_px``; an image without candidates gives a (G, 0) matrix."""
    for image_id, points in truth.items():
        points = np.asarray(points, np.float64).reshape(-1, 2)
        if not len(points):
            continue
        rows = preds[preds["image"] == image_id]
        xy = rows[["x", "y"]].to_numpy(np.float64).reshape(-1, 2)
        d = np.hypot(points[:, None, 0] - xy[None, :, 0], points[:, None, 1] - xy[None, :, 1])
        yield d <= radius_px, rows["det_score"].to_numpy(np.float64)


def candidate_recall(truth: dict, preds: pd.DataFrame, radius_px: float) -> tuple[int, int]:
    """(mitoses with at least one candidate within ``radius_px``, mitoses): not one-to-one."""
    total = sum(len(np.asarray(p).reshape(-1, 2)) for p in truth.values())
    found = sum(int(near.any(axis=1).sum()) for near, _ in _near(truth, preds, radius_px))
    return found, total


def recall_keeping_threshold(truth: dict, preds: pd.DataFrame, radius_px: float) -> float | None:
    """The highest stage-1 threshold that keeps every mitosis that has a candidate at all: the
    smallest, over those mitoses, of their best nearby candidate's score (None: none found)."""
    best = [float(scores[row].max()) for near, scores in _near(truth, preds, radius_px)
            for row in near if row.any()]
    return min(best) if best else None


def stage1_metrics(truth: dict, preds: pd.DataFrame, mpp: float, areas_mm2: float,
                   prefix: str = "val_field_") -> dict:
    """Stage 1 alone on whole fields.

    Args:
        truth: ``{image_id: (G, 2) centroids}`` in the fields' pixels.
        preds: :func:`candidate_table` of every field (all of stage 1's candidates).
        mpp: the fields' pixel size (um/px).
        areas_mm2: total area of the fields.
        prefix: key prefix.

    Returns:
        ``f1``, ``precision``, ``recall`` and ``det_threshold`` of the best-F1 stage-1 cut with
        the point merge (:func:`calibrate_stage1`), ``candidate_recall`` (share of mitoses
        with a candidate within 5 um), ``recall_threshold`` (:func:`recall_keeping_threshold`;
        0.0 when no mitosis has a candidate: no cut beyond the inference threshold) and
        ``candidates_per_mm2``, each key prefixed.
    """
    radius, merge = MATCH_UM / mpp, MERGE_UM / mpp
    best = calibrate_stage1(truth, preds, radius, merge)
    found, total = candidate_recall(truth, preds, radius)
    keep = recall_keeping_threshold(truth, preds, radius)
    return {f"{prefix}{k}": v for k, v in {
        "f1": best["f1"], "precision": best["precision"], "recall": best["recall"],
        "det_threshold": best["det_threshold"],
        "candidate_recall": found / total if total else 0.0,
        "recall_threshold": 0.0 if keep is None else keep,
        "candidates_per_mm2": len(preds) / areas_mm2 if areas_mm2 > 0 else 0.0}.items()}


def cascade_metrics(truth: dict, preds: pd.DataFrame, mpp: float,
                    prefix: str = "val_cascade_") -> dict:
    """The cascade on whole fields: the best-F1 (stage-1, stage-2) threshold pair with the
    point merge (:func:`calibrate_cascade`) over candidates carrying both scores.

    Returns:
        ``f1``, ``precision``, ``recall``, ``det_threshold``, ``cls_threshold``, ``tp``, ``fp``,
        ``fn``, each key prefixed.
    """
    radius, merge = MATCH_UM / mpp, MERGE_UM / mpp
    min_det = float(preds["det_score"].min()) if len(preds) else 0.0
    best = calibrate_cascade(truth, preds, radius, merge, min_det_threshold=min_det)
    return {f"{prefix}{k}": best[k] for k in ("f1", "precision", "recall", "det_threshold",
                                              "cls_threshold", "tp", "fp", "fn")}
