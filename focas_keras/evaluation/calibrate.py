"""Choosing the cascade's two thresholds on whole validation fields.

A training run's own thresholds come from its validation *patches* and *tiles*, which hold
neither stage 1's false positives on whole fields (mining touches training images only) nor
the 30 px merge of accepted points. Running the cascade with permissive thresholds over whole
validation fields and picking the best-F1 pair there gives thresholds that transfer; the
held-out fields are never used.

The chosen pair travels as a small JSON file (:func:`thresholds_record`,
:func:`write_thresholds`; ``calibrate --write``) that ``detect --thresholds`` reads
(:func:`read_thresholds`).

Both searches are exact and cheap because of one property of greedy suppression: the points a
greedy merge keeps among the rows scoring >= t are the survivors of the merge over all rows
(in the same score order) that score >= t. So, for a fixed stage-1 cut, one merge ranked by
the stage-2 score and one threshold sweep give the metrics at every stage-2 threshold.
"""

from __future__ import annotations

from pathlib import Path

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


# ---------------------------------------------------------------------- thresholds files

#: ``written_by`` of a thresholds file, and what :func:`read_thresholds` recognises.
THRESHOLDS_KIND = "focas-keras thresholds"
_METRICS = ("tp", "fp", "fn", "precision", "recall", "f1")


def thresholds_record(cascade: dict, merge_px: float, chosen_on: dict,
                      stage1: dict | None = None, tta: bool | None = None,
                      written_by: str = "focas-keras calibrate") -> dict:
    """The content of a thresholds file (``calibrate --write``, the demo's).

    Args:
        cascade: :func:`calibrate_cascade`'s result (the pair and its metrics).
        merge_px: the merge radius the pair was chosen with (detect must use the same).
        chosen_on: what the pair was chosen on: ``truth``, ``format``, ``pred`` (None when the
            candidates never were a file), ``images`` (ids), ``mitoses``, ``radius_px`` and,
            where known, ``detect`` (the runs and settings that scored the candidates).
        stage1: :func:`calibrate_stage1`'s result, kept for reference.
        tta: whether stage 2 scored the candidates with TTA (None: unknown); a pair chosen on
            TTA scores belongs to TTA scoring.
        written_by: the command that wrote it.

    Returns:
        JSON-ready dict: ``det_threshold``, ``cls_threshold``, ``merge_px``, ``tta``,
        ``validation`` (the cascade's metrics at the pair), ``stage1_alone``, ``chosen_on``,
        ``kind``, ``written_by``, ``package_version``.
    """
    from focas_keras import __version__

    record = {"kind": THRESHOLDS_KIND, "written_by": written_by,
              "package_version": __version__,
              "det_threshold": float(cascade["det_threshold"]),
              "cls_threshold": float(cascade["cls_threshold"]),
              "merge_px": float(merge_px), "tta": None if tta is None else bool(tta),
              "validation": {k: cascade[k] for k in _METRICS},
              "chosen_on": dict(chosen_on)}
    if stage1 is not None:
        record["stage1_alone"] = dict(stage1)
    return record


def write_thresholds(path, record: dict) -> None:
    """Writes a :func:`thresholds_record` to ``path`` atomically (a temporary file, renamed)."""
    from focas_keras.errors import InputError
    from focas_keras.io import write_json_atomic

    path = Path(path)
    if path.is_dir():
        raise InputError("is a directory; --write needs a file name (thresholds.json)", path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, record)
    except OSError as err:
        raise InputError(f"cannot write the thresholds ({err.strerror or err})", path) from None


def read_thresholds(path) -> dict:
    """Reads a thresholds file (:func:`write_thresholds`, or a hand-written one).

    Needs a JSON object with ``det_threshold`` and ``cls_threshold`` (numbers in [0, 1]);
    ``merge_px`` (a number >= 0) and ``tta`` (true/false) are used where present; other keys
    are kept as they are.

    Returns:
        The object, ``merge_px`` and ``tta`` set to None where absent.

    Raises:
        InputError: a missing or unreadable file, invalid JSON, or a missing or bad value
            (naming the file).
    """
    import json
    import math

    from focas_keras.errors import InputError

    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("thresholds file not found", path) from None
    except json.JSONDecodeError as err:
        raise InputError(f"not a thresholds file (invalid JSON: {err.msg})", path,
                         err.lineno) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read the thresholds file "
                         f"({getattr(err, 'strerror', None) or err})", path) from None
    if not isinstance(data, dict):
        raise InputError("not a thresholds file (expected a JSON object with det_threshold "
                         "and cls_threshold, as `calibrate --write` writes)", path)

    def number(name, low, high):
        value = data.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or not low <= value <= high:
            raise InputError(f"{name} must be a number in [{low:g}, {high:g}], got "
                             f"{json.dumps(value)}", path)
        return float(value)

    for name in ("det_threshold", "cls_threshold"):
        if name not in data:
            raise InputError(f"not a thresholds file (no {name}; `calibrate --write` writes "
                             "one)", path)
        data[name] = number(name, 0.0, 1.0)
    data["merge_px"] = None if data.get("merge_px") is None \
        else number("merge_px", 0.0, math.inf)
    if data.get("tta") is not None and not isinstance(data["tta"], bool):
        raise InputError(f"tta must be true, false or null, got {json.dumps(data['tta'])}",
                         path)
    data.setdefault("tta", None)
    return data
