"""The crop-size study of paper Table 2: stage 2 rerun on the same stage-1 candidates with
crops of several sizes (resized to the Mclass input), P/R/F1 for each."""

from __future__ import annotations

import numpy as np

from focas_keras.datasets.annotations import ColourCheck, load_image
from focas_keras.evaluation.matching import Counts, count_matches
from focas_keras.inference.cascade import crop_patches

PAPER_SIZES = (64, 112, 128, 256)


def patch_size_study(cascade, image_paths, truth_points: dict, sizes=PAPER_SIZES,
                     radius_px: float = 20.0, warn=None) -> list[dict]:
    """Runs stage 1 once per image, then stage 2 with each crop size.

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade` (its stage-2 threshold
            decides acceptance for every size).
        image_paths: images; their stems must be keys of ``truth_points``.
        truth_points: image id -> (G, 2) ground-truth centroids in input pixels.
        sizes: crop sides (px, in Mclass's pixels).
        radius_px: one-to-one match radius.
        warn: callable taking a warning message (default: printed on stderr); called once,
            for the first image without colour.

    Returns:
        One dict per size: ``patch``, ``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``.
    """
    totals = {size: Counts() for size in sizes}
    colour = ColourCheck(warn)
    for path in image_paths:
        gt = np.asarray(truth_points.get(path.stem, np.zeros((0, 2))), np.float64)
        image = load_image(path, warn=colour)
        boxes, _ = cascade.stage1(image)
        resized, sx, sy = cascade.model_image(image, "cls")
        centres_input = (np.asarray(boxes, np.float64)[:, :2] + boxes[:, 2:]) / 2.0
        centres = centres_input * np.array([sx, sy])
        for size in sizes:
            scores = (cascade.classify_patches(crop_patches(resized, centres, size))
                      if len(centres) else np.zeros((0,)))
            keep = np.asarray(scores).reshape(-1) >= cascade.cls_threshold
            totals[size] = totals[size] + count_matches(
                centres_input[keep], np.asarray(scores).reshape(-1)[keep], gt, radius_px)
    return [{"patch": size, **totals[size].as_dict()} for size in sizes]
