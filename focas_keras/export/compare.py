"""Comparing the exported graph's detections with the Python cascade's.

The graph and the Python cascade run the same operations, but not bit for bit the same
arithmetic: TensorFlow optimises (fuses) the exported graph differently from the Python
side's own ``tf.function``, and Mclass sees the crops in other batches. Scores then differ in
the last bits (~1e-6). That is harmless, except where two numbers were nearly equal and the
order decides: two candidates of almost the same stage-1 score swap rows, an NMS near-tie
keeps the other of two overlapping boxes, a score next to a threshold or to the
``max_detections`` cut falls on the other side, a merge near-tie keeps the other of two close
points. :func:`compare_tables` therefore matches candidates by their boxes, not by row, and
lets through exactly those differences that scores within :data:`SCORE_TOLERANCE` can cause;
anything else (a box moved, a score off, a candidate missing or added, an acceptance flipped
away from any near-tie) is a mismatch.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: Largest box coordinate difference (px) of one candidate in both tables.
BOX_TOLERANCE = 1e-2
#: Largest score difference (stage 1 or stage 2) of one candidate in both tables.
SCORE_TOLERANCE = 1e-4

_BOX = ["x1", "y1", "x2", "y2"]


class ExportError(Exception):
    """The export failed its own check (a mismatch with the Python cascade); the CLI prints
    it as one line and exits with code 1."""


def _iou(box, boxes):
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _match(got_boxes, want_boxes, got_det, want_det):
    """One-to-one pairs (i in want, j in got) of boxes within BOX_TOLERANCE, closest score."""
    pairs, taken = [], np.zeros(len(got_boxes), bool)
    for i, box in enumerate(want_boxes):
        if not len(got_boxes):
            break
        close = ~taken & (np.max(np.abs(got_boxes - box), axis=1) <= BOX_TOLERANCE)
        if close.any():
            candidates = np.nonzero(close)[0]
            j = candidates[np.argmin(np.abs(got_det[candidates] - want_det[i]))]
            taken[j] = True
            pairs.append((i, j))
    return pairs


def compare_tables(got: pd.DataFrame, want: pd.DataFrame, what: str, settings,
                   cut: int | None = None) -> int:
    """Checks the graph's table ``got`` against the Python cascade's ``want``.

    Args:
        got, want: ``Cascade.run``-style tables (x1, y1, x2, y2, det_score, cls_score,
            accepted), each capped at ``settings.max_detections`` rows.
        what: names the comparison in the error.
        settings: the :class:`~focas_keras.export.graph.GraphSettings` both ran with
            (thresholds, NMS IoU, merge distance, max detections).
        cut: the most candidates this image may have (``min(max_detections, the image's
            candidate cap)``, where a near-tie at the cut is let through); None:
            ``settings.max_detections``.

    Returns:
        The number of differences let through as near-ties (0 when the tables agree row by
        row).

    Raises:
        ExportError: the first difference that score noise cannot explain.
    """
    tol = SCORE_TOLERANCE
    gb, wb = got[_BOX].to_numpy(np.float64), want[_BOX].to_numpy(np.float64)
    gd, wd = got["det_score"].to_numpy(np.float64), want["det_score"].to_numpy(np.float64)
    gc, wc = got["cls_score"].to_numpy(np.float64), want["cls_score"].to_numpy(np.float64)
    ga, wa = got["accepted"].to_numpy(bool), want["accepted"].to_numpy(bool)
    pairs = _match(gb, wb, gd, wd)
    for i, j in pairs:
        for name, a, b in (("det_score", wd[i], gd[j]), ("cls_score", wc[i], gc[j])):
            if abs(a - b) > tol:
                raise ExportError(f"{what}: the candidate at {_where(wb[i])} has {name} "
                                  f"{b:.6f}, the Python cascade {a:.6f}")
    lone_want = sorted(set(range(len(wb))) - {i for i, _ in pairs})
    lone_got = sorted(set(range(len(gb))) - {j for _, j in pairs})
    cut = settings.max_detections if cut is None else int(cut)

    def borderline(box, score, boxes_other, scores_other, lone_other, full):
        if score <= settings.det_threshold + tol:  # at the stage-1 threshold
            return True
        if full and score <= min(wd.min(initial=1.0), gd.min(initial=1.0)) + tol:
            return True  # at the cut
        for k in lone_other:  # an NMS near-tie: the other table kept an overlapping box
            if abs(scores_other[k] - score) <= 2 * tol and _iou(
                    box, boxes_other[k][None])[0] >= settings.nms_iou - 1e-3:
                return True
        return False

    full = len(want) >= cut or len(got) >= cut
    for i in lone_want:
        if not borderline(wb[i], wd[i], gb, gd, lone_got, full):
            raise ExportError(f"{what}: the Python cascade's candidate at {_where(wb[i])} "
                              f"(stage-1 score {wd[i]:.6f}) is missing")
    for j in lone_got:
        if not borderline(gb[j], gd[j], wb, wd, lone_want, full):
            raise ExportError(f"{what}: an extra candidate at {_where(gb[j])} (stage-1 score "
                              f"{gd[j]:.6f}) that the Python cascade does not have")
    # Acceptance: a flip needs a stage-2 score at the threshold, or (for a candidate above it
    # in both) a merge near-tie: a close point (within merge_px) that is itself uncertain,
    # missing on one side, flipped, or of an almost equal stage-2 score.
    centres = (wb[:, :2] + wb[:, 2:]) / 2.0
    lone_centres = np.concatenate([centres[lone_want], (gb[lone_got, :2] + gb[lone_got, 2:])
                                   / 2.0]).reshape(-1, 2)
    uncertain = np.abs(wc - settings.cls_threshold) <= tol
    flips = 0
    for i, j in pairs:
        if ga[j] == wa[i]:
            continue
        flips += 1
        if uncertain[i]:
            continue
        if wc[i] < settings.cls_threshold:  # below the threshold in both: no merge accepts it
            raise ExportError(f"{what}: the candidate at {_where(wb[i])} is accepted, but its "
                              f"stage-2 score {wc[i]:.6f} is below the threshold")
        near = np.hypot(*(centres - centres[i]).T) <= settings.merge_px + BOX_TOLERANCE
        near[i] = False
        near_lone = (np.hypot(*(lone_centres - centres[i]).T) <= settings.merge_px + 1).any() \
            if len(lone_centres) else False
        if settings.merge_px > 0 and (near_lone or (near & (uncertain | (np.abs(
                wc - wc[i]) <= 2 * tol) | _flipped(pairs, ga, wa, len(wb)))).any()):
            continue
        raise ExportError(f"{what}: the candidate at {_where(wb[i])} is "
                          f"{'accepted' if ga[j] else 'rejected'}, the Python cascade "
                          f"{'accepts' if wa[i] else 'rejects'} it (stage-2 score {wc[i]:.6f})")
    order_swaps = sum(1 for i, j in pairs if i != j)
    return len(lone_want) + len(lone_got) + flips + (1 if order_swaps else 0)


def _flipped(pairs, ga, wa, n) -> np.ndarray:
    """Which rows of ``want`` are accepted differently in the two tables."""
    flipped = np.zeros(n, bool)
    for i, j in pairs:
        flipped[i] = ga[j] != wa[i]
    return flipped


def _where(box) -> str:
    return f"x {(box[0] + box[2]) / 2:.1f}, y {(box[1] + box[3]) / 2:.1f}"
