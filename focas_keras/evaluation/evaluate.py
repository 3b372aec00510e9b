"""Scoring ``focas-keras detect`` output against ground-truth mitosis centroids.

Two matching rules (``matching``):

* ``one_to_one`` (the contest's rule, default): predictions are taken in descending score
  order (ties: file order); each takes the nearest ground truth not yet taken whose distance
  is ``<= radius``. TP = matched predictions, FP = other predictions, FN = unmatched ground
  truths. See :mod:`focas_keras.evaluation.matching`.
* ``nearest`` (the rule of the published FoCAS code, kept to reproduce its numbers; not
  one-to-one): a ground truth is a TP when its nearest prediction lies STRICTLY closer than
  ``radius`` (i.e. any prediction does), otherwise an FN; a prediction is an FP when no ground
  truth lies strictly within ``radius`` of it. One prediction may serve several ground truths,
  and a prediction near a ground truth is never an FP, so TP + FP need not equal the number
  of predictions. Scores play no part.

Precision = TP / (TP + FP), recall = TP / (TP + FN), F1 their harmonic mean (0 when undefined).
Metrics are pooled over images (counts summed, then the ratios).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from focas_keras.datasets.annotations import ICPR2012_MPP, MITOSIS
from focas_keras.errors import InputError
from focas_keras.evaluation.matching import Counts, count_matches, sweep_counts

PREDICTION_COLUMNS = ("image", "x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score",
                      "accepted")
SCORE_COLUMNS = {"cls": "cls_score", "det": "det_score"}
MATCHING_RULES = ("one_to_one", "nearest")
DEFAULT_RADIUS_PX = 20.0
_BOOLS = {"true": True, "1": True, "false": False, "0": False}


class Truth(NamedTuple):
    """Ground truth: ``points[image_id]`` is a (G, 2) float array of (x, y) mitosis centroids;
    ``mpp[image_id]`` the image's pixel size in um/px (None where unknown). Both are keyed by
    every known image, sorted by id."""

    points: dict
    mpp: dict


def _read_csv_rows(path, required):
    """Yields (line number, row dict) of a CSV with a header that has ``required`` columns."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            if not header:
                raise InputError("empty file (no header line)", path, 1)
            reader.fieldnames = header
            missing = [name for name in required if name not in header]
            if missing:
                raise InputError(f"missing column(s) {', '.join(missing)} "
                                 f"(header: {','.join(header)})", path, 1)
            for row in reader:
                if None in row:
                    raise InputError(f"more cells than header columns ({len(header)})",
                                     path, reader.line_num)
                yield reader.line_num, row
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise InputError(f"cannot read CSV ({getattr(err, 'strerror', None) or err})",
                         path) from None


def _number(row, name, path, line, blank_ok=False, finite=True) -> float:
    """The float in cell ``name``; blank gives NaN where ``blank_ok``."""
    text = (row.get(name) or "").strip()
    if not text and blank_ok:
        return math.nan
    try:
        value = float(text)
    except ValueError:
        raise InputError(f"{name} is not a number: '{text}'", path, line) from None
    if finite and not math.isfinite(value):
        raise InputError(f"{name} is not a finite number: '{text}'", path, line)
    return value


def read_truth(path, fmt: str | None = None) -> Truth:
    """Reads ground-truth mitosis centroids.

    Args:
        path: with ``fmt`` None, a centroid CSV with header ``image,x,y`` (other columns are
            ignored; a row with x and y both blank declares an image without mitoses). Only
            the images named in such a CSV are known, and their mpp is None (unknown).
            Otherwise a dataset readable by :func:`focas_keras.datasets.readers.read_dataset`.
        fmt: dataset format name, or None for a centroid CSV.

    Returns:
        A :class:`Truth`. For datasets, every image of the dataset is known (images without a
        mitosis get a (0, 2) array) and only ``mitosis`` annotations are kept.

    Raises:
        InputError: unreadable or malformed truth (naming file and line where there is one).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("ground truth not found", path)
    points: dict[str, list] = {}
    mpp: dict[str, float | None] = {}
    if fmt is None:
        if path.is_dir():
            raise InputError("is a directory; give a centroid CSV (image,x,y), or the "
                             "dataset's format (--format)", path)
        for line, row in _read_csv_rows(path, ("image", "x", "y")):
            image = (row["image"] or "").strip()
            if not image:
                raise InputError("blank image id", path, line)
            points.setdefault(image, [])
            mpp[image] = None
            if not (row["x"] or "").strip() and not (row["y"] or "").strip():
                continue
            points[image].append((_number(row, "x", path, line), _number(row, "y", path, line)))
    else:
        from focas_keras.datasets.readers import read_dataset
        try:
            dataset = read_dataset(fmt, path)
        except (OSError, ValueError, KeyError) as err:
            raise InputError(f"cannot read {fmt} ground truth ({err})", path) from None
        for image_id, image_mpp in zip(dataset.images.image_id, dataset.images.mpp):
            points[str(image_id)] = []
            mpp[str(image_id)] = None if pd.isna(image_mpp) else float(image_mpp)
        mitoses = dataset.annotations[dataset.annotations.label == MITOSIS]
        for image_id, x, y in zip(mitoses.image_id, mitoses.x, mitoses.y):
            points.setdefault(str(image_id), []).append((float(x), float(y)))
            mpp.setdefault(str(image_id), None)
    ids = sorted(points)
    return Truth({i: np.asarray(points[i], np.float64).reshape(-1, 2) for i in ids},
                 {i: mpp[i] for i in ids})


def read_predictions(path) -> pd.DataFrame:
    """Reads a ``detections.csv`` written by ``focas-keras detect``.

    Columns :data:`PREDICTION_COLUMNS` are required (others are ignored). ``x``/``y`` must be
    finite numbers; box and score cells must be numbers (blank reads as NaN; a NaN score never
    passes a threshold); ``accepted`` is True/False/1/0 (any case).

    Returns:
        DataFrame with those columns (``image`` str, ``accepted`` bool, the rest float64), in
        file order; empty (with the columns) for a header-only file.

    Raises:
        InputError: missing file or columns, or a bad cell (with its line number).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("predictions file not found", path)
    rows = []
    for line, row in _read_csv_rows(path, PREDICTION_COLUMNS):
        image = (row["image"] or "").strip()
        if not image:
            raise InputError("blank image id", path, line)
        record = {"image": image}
        for name in PREDICTION_COLUMNS[1:-1]:
            coordinate = name in ("x", "y")
            record[name] = _number(row, name, path, line, blank_ok=not coordinate,
                                   finite=coordinate)
        accepted = _BOOLS.get((row["accepted"] or "").strip().lower())
        if accepted is None:
            raise InputError(f"accepted is not True/False: '{row['accepted']}'", path, line)
        record["accepted"] = accepted
        rows.append(record)
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    return frame.astype({"image": str, "accepted": bool,
                         **{name: "float64" for name in PREDICTION_COLUMNS[1:-1]}})


#: The file beside ``detections.csv`` that lists every image ``detect`` processed.
COUNTS_FILE = "counts.csv"


def processed_images(pred_path) -> list[str] | None:
    """The images ``detect`` (or ``predict``) processed: the ``image`` column of
    :data:`COUNTS_FILE` beside the predictions file, in file order; None when there is none.

    Raises:
        InputError: an unreadable counts file, or one without an ``image`` column (naming it
            and the line).
    """
    counts = Path(pred_path).parent / COUNTS_FILE
    if not counts.is_file():
        return None
    images = []
    for line, row in _read_csv_rows(counts, ("image",)):
        image = (row["image"] or "").strip()
        if not image:
            raise InputError("blank image id", counts, line)
        images.append(image)
    return images


def truth_for_predictions(truth: Truth, pred_path) -> Truth:
    """The rule by which ``evaluate`` and ``calibrate`` decide which images count.

    Only the truth images listed in :data:`COUNTS_FILE` beside ``pred_path`` (those detect
    processed) count: the rest of the truth was never looked at, so its mitoses are not
    missed ones. Without that file, every truth image counts (its predictions file may be
    hand-made).

    Args:
        truth: the ground truth (:func:`read_truth`).
        pred_path: the predictions file (``detections.csv``).

    Returns:
        ``truth`` restricted to the processed images (all of it without a counts file).

    Raises:
        InputError: a counts file that names no image of the truth (the wrong --truth?).
    """
    processed = processed_images(pred_path)
    if processed is None:
        return truth
    keep = set(processed)
    points = {k: v for k, v in truth.points.items() if k in keep}
    if not points and truth.points:
        counts = Path(pred_path).parent / COUNTS_FILE
        raise InputError(f"none of its {len(keep)} processed image(s) is in the ground truth "
                         f"(e.g. '{processed[0]}' is not)" if processed else
                         "lists no processed image", counts)
    return Truth(points, {k: truth.mpp[k] for k in points})


def radius_from(radius_px: float | None = None, radius_um: float | None = None,
                mpp: float | None = ICPR2012_MPP) -> float:
    """The matching radius in pixels.

    Args:
        radius_px: radius in pixels.
        radius_um: radius in micrometres, converted with ``mpp`` (5 um at 0.2456 um/px is
            20.36 px; the contest uses 20 px).
        mpp: the truth's pixel size (um/px); None means the ICPR 2012 scanner A's 0.2456.

    Returns:
        ``radius_px``, or ``radius_um / mpp``, or 20 px when neither is given.

    Raises:
        InputError: both given, or a radius/mpp that is not a positive number.
    """
    if radius_px is not None and radius_um is not None:
        raise InputError("give the radius in pixels or in micrometres, not both")
    mpp = ICPR2012_MPP if mpp is None else float(mpp)
    if radius_um is not None and not (math.isfinite(mpp) and mpp > 0):
        raise InputError(f"pixel size must be positive, got {mpp}")
    radius = (DEFAULT_RADIUS_PX if radius_px is None else float(radius_px)) \
        if radius_um is None else float(radius_um) / mpp
    if not (math.isfinite(radius) and radius > 0):
        raise InputError("matching radius must be positive, got "
                         + (f"{radius_um} um" if radius_um is not None else f"{radius} px"))
    return radius


def truth_mpp(truth: Truth) -> float | None:
    """The truth's common pixel size (None where unknown); InputError when images differ."""
    values = sorted({m for m in truth.mpp.values() if m is not None})
    if len(values) > 1:
        raise InputError(f"ground-truth images have different pixel sizes ({values[0]}..."
                         f"{values[-1]} um/px); give the radius in pixels")
    return values[0] if values else None


def _as_points(truth) -> dict:
    """``points`` of a :class:`Truth`, or a plain {image_id: (G, 2)} dict."""
    points = truth.points if isinstance(truth, Truth) else truth
    return {str(k): np.asarray(v, np.float64).reshape(-1, 2) for k, v in points.items()}


def _check_args(points, preds, score, matching="one_to_one", radius_px=1.0) -> str:
    """Validates the arguments; returns the score column."""
    if score not in SCORE_COLUMNS:
        raise InputError(f"unknown score '{score}' (known: {', '.join(SCORE_COLUMNS)})")
    if matching not in MATCHING_RULES:
        raise InputError(f"unknown matching '{matching}' (known: {', '.join(MATCHING_RULES)})")
    if not (math.isfinite(radius_px) and radius_px > 0):
        raise InputError(f"matching radius must be positive, got {radius_px} px")
    unknown = sorted(set(preds["image"].astype(str)) - set(points))
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        raise InputError(f"predictions name {len(unknown)} image(s) not in the ground truth: "
                         f"{', '.join(unknown[:5])}{more}")
    return SCORE_COLUMNS[score]


def nearest_counts(pred_xy, gt_xy, radius: float) -> Counts:
    """TP/FP/FN of one image under the published code's ``nearest`` rule (module docstring)."""
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    if not len(pred_xy) or not len(gt_xy):
        return Counts(tp=0, fp=len(pred_xy), fn=len(gt_xy))
    within = np.hypot(gt_xy[:, None, 0] - pred_xy[None, :, 0],
                      gt_xy[:, None, 1] - pred_xy[None, :, 1]) < radius
    tp = int(within.any(axis=1).sum())
    return Counts(tp=tp, fp=int((~within.any(axis=0)).sum()), fn=len(gt_xy) - tp)


def evaluate(truth, preds: pd.DataFrame, radius_px: float = DEFAULT_RADIUS_PX,
             score: str = "cls", matching: str = "one_to_one", accepted_only: bool = True,
             threshold: float | None = None) -> dict:
    """Pooled and per-image detection metrics.

    Args:
        truth: a :class:`Truth` or {image_id: (G, 2) centroids}.
        preds: :func:`read_predictions` frame.
        radius_px: matching radius in pixels.
        score: ``cls`` (cls_score) or ``det`` (det_score): ranks predictions for the greedy
            one-to-one matching, and is the column ``threshold`` applies to.
        matching: ``one_to_one`` or ``nearest`` (the published code's rule).
        accepted_only: keep only rows with ``accepted`` True (the cascade's output).
        threshold: if given, keep rows with score >= threshold instead (``accepted`` ignored).

    Returns:
        JSON-ready dict: matching, rule, radius_px, score, selection, n_images, n_predictions,
        tp, fp, fn, precision, recall, f1, and ``per_image`` (one dict per truth image, sorted
        by id: image, tp, fp, fn, precision, recall, f1). Truth images without predictions
        count all their mitoses as FN.

    Raises:
        InputError: predictions naming images unknown to the truth (up to 5 listed), or a bad
            score/matching/radius.
    """
    points = _as_points(truth)
    column = _check_args(points, preds, score, matching, radius_px)
    if threshold is not None:
        preds, selection = preds[preds[column] >= threshold], f"{column} >= {threshold:g}"
    elif accepted_only:
        preds, selection = preds[preds["accepted"].astype(bool)], "accepted"
    else:
        selection = "all"
    groups = {str(k): g for k, g in preds.groupby("image", sort=False)}
    total, per_image = Counts(), []
    for image, gt_xy in points.items():
        rows = groups.get(image)
        xy = np.zeros((0, 2)) if rows is None else rows[["x", "y"]].to_numpy(np.float64)
        if matching == "nearest":
            counts = nearest_counts(xy, gt_xy, radius_px)
        else:
            scores = np.zeros(0) if rows is None else rows[column].to_numpy(np.float64)
            counts = count_matches(xy, scores, gt_xy, radius_px)
        total = total + counts
        per_image.append({"image": image, **counts.as_dict()})
    rule = ("one-to-one greedy by descending score, distance <= radius"
            if matching == "one_to_one" else
            "published code's rule: per ground truth, nearest prediction at distance < radius "
            "(not one-to-one)")
    return {"matching": matching, "rule": rule, "radius_px": float(radius_px), "score": column,
            "selection": selection, "n_images": len(points), "n_predictions": int(len(preds)),
            **total.as_dict(), "per_image": per_image}


def sweep(truth, preds: pd.DataFrame, radius_px: float = DEFAULT_RADIUS_PX,
          score: str = "cls") -> dict:
    """One-to-one metrics at every distinct score threshold (``accepted`` ignored).

    Greedy matching by descending score is monotone: the greedy matching of the predictions
    scoring >= t is the prefix of the full greedy matching. So predictions are processed once,
    in descending score order over all images (ties: file order, as in :func:`evaluate`),
    each taking its image's nearest free ground truth within ``radius_px``; the cumulative
    TP/FP at the end of each score group equal ``evaluate(..., threshold=t)`` exactly.
    Rows with a NaN score never pass a threshold and are skipped.

    Returns:
        {"thresholds" (descending), "precision", "recall", "f1" (lists, one per threshold),
        "best": {"threshold", "precision", "recall", "f1", "tp", "fp", "fn"}}. ``best`` is the
        highest threshold with the maximal F1; with no prediction or no TP at any threshold
        its threshold is None and its counts are those with no prediction.
    """
    points = _as_points(truth)
    column = _check_args(points, preds, score, radius_px=radius_px)
    scores = preds[column].to_numpy(np.float64)
    keep = ~np.isnan(scores)
    scores, xy = scores[keep], preds[["x", "y"]].to_numpy(np.float64)[keep]
    images = preds["image"].astype(str).to_numpy()[keep]
    n_gt = sum(len(gt) for gt in points.values())
    per_image = [(xy[images == image], scores[images == image], gt)
                 for image, gt in points.items()]
    thresholds, curve = sweep_counts(per_image, radius_px)
    best_threshold, best = None, Counts(fn=n_gt)
    for threshold, counts in zip(thresholds, curve):
        if counts.f1 > best.f1:
            best_threshold, best = threshold, counts
    return {"thresholds": thresholds, "precision": [c.precision for c in curve],
            "recall": [c.recall for c in curve], "f1": [c.f1 for c in curve],
            "best": {"threshold": best_threshold, **best.as_dict()}}


def format_table(result: dict) -> str:
    """A fixed-width text table of an :func:`evaluate` result: per-image rows, then pooled."""
    width = max([5] + [len(r["image"]) for r in result["per_image"]])
    header = f"{'image':<{width}} {'tp':>5} {'fp':>5} {'fn':>5} {'prec':>6} {'recall':>6} {'f1':>6}"
    rule = f"matching: {result['matching']} ({result.get('rule', '')}), radius " \
           f"{result['radius_px']:.2f} px, predictions: {result.get('selection', '?')}"

    def row(name, r):
        return (f"{name:<{width}} {r['tp']:>5d} {r['fp']:>5d} {r['fn']:>5d} "
                f"{r['precision']:>6.3f} {r['recall']:>6.3f} {r['f1']:>6.3f}")

    rows = [row(r["image"], r) for r in result["per_image"]]
    return "\n".join([rule, header, "-" * len(header), *rows, "-" * len(header),
                      row("all", result)])
