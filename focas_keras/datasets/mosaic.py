"""Det tiles built from images smaller than a tile (pure numpy, no I/O).

AMi-Br's crops are 128 px at 0.23-0.25 um/px: about 60-65 px at Mdet's 0.4912 um/px, a
third of a 224 px tile. Padding one crop to a tile shows Mdet a border it never meets on whole
fields; a mosaic fills the tile with tissue instead: a k x k grid of cells, each showing a
window of one crop, with k one more than the fewest cells whose sides fit inside the smallest
crop (5 for those crops), so that windows are smaller than their crops and can move.

Every crop of that set is centred on its figure, so a detector could learn "the centre of a
piece of tissue" rather than the figure. The mosaic breaks that: the cells' widths and heights
are drawn at random (summing to the tile side), and each window sits at a random offset in its
crop, so a figure lands anywhere in its cell, partly cut off at times (a box is kept when
``min_visible`` of it shows, as for tiles cut from fields). Every labelled figure of a crop
keeps its box; everything else in the crop is background, as in a whole field.
"""

from __future__ import annotations

import math

import numpy as np

from focas_keras.datasets.sampling import boxes_in_tile


def partition(total: int, parts: int, most: int, rng: np.random.Generator) -> np.ndarray:
    """``parts`` random integer lengths that sum to ``total``, each in [least, ``most``].

    ``least`` is as far below the mean length as ``most`` is above it (at least 1), so the
    draw is symmetric around ``total / parts``.

    Raises:
        ValueError: ``parts * most < total`` (the lengths cannot cover ``total``).
    """
    if parts < 1 or parts * most < total:
        raise ValueError(f"{parts} parts of at most {most} cannot cover {total}")
    least = max(1, 2 * (total // parts) - most)
    sizes = []
    remaining = total
    for left in range(parts, 1, -1):
        low = max(least, remaining - (left - 1) * most)
        high = min(most, remaining - (left - 1) * least)
        size = int(rng.integers(low, high + 1))
        sizes.append(size)
        remaining -= size
    sizes.append(remaining)
    return np.asarray(sizes, np.int64)


def grid_side(size: int, crop_sides, extra: int = 1) -> int:
    """Cells per tile side: ``extra`` more than the fewest whose mean side fits inside the
    smallest crop side."""
    return max(1, math.ceil(size / int(min(crop_sides)))) + extra


def mosaic_tile(crops, crop_boxes, size: int, rng: np.random.Generator,
                min_visible: float = 0.5):
    """One mosaic tile from k x k crops.

    Args:
        crops: k*k uint8 images (h_i, w_i, 3), every side >= the cell sides drawn (see
            :func:`grid_side`).
        crop_boxes: per crop, its figures' boxes (n_i, 4) x1, y1, x2, y2 in crop pixels.
        size: tile side T.
        rng: random generator.
        min_visible: smallest visible share of a box for it to be kept.

    Returns:
        (tile uint8 (T, T, 3), boxes float32 (M, 4) in tile pixels).
    """
    k = math.isqrt(len(crops))
    if k * k != len(crops) or k == 0:
        raise ValueError(f"a mosaic needs a square number of crops, got {len(crops)}")
    most_w = int(min(c.shape[1] for c in crops))
    most_h = int(min(c.shape[0] for c in crops))
    widths, heights = partition(size, k, most_w, rng), partition(size, k, most_h, rng)
    xs, ys = np.concatenate([[0], np.cumsum(widths)]), np.concatenate([[0], np.cumsum(heights)])
    tile = np.zeros((size, size, 3), np.uint8)
    boxes = []
    for index, (crop, cb) in enumerate(zip(crops, crop_boxes)):
        row, col = divmod(index, k)
        width, height = int(widths[col]), int(heights[row])
        ox = int(rng.integers(0, crop.shape[1] - width + 1))
        oy = int(rng.integers(0, crop.shape[0] - height + 1))
        tile[ys[row]:ys[row] + height, xs[col]:xs[col] + width] = \
            crop[oy:oy + height, ox:ox + width]
        kept = boxes_in_tile(cb, ox, oy, width, min_visible, height=height,
                             dtype=np.float64)
        boxes.append(kept + np.array([xs[col], ys[row], xs[col], ys[row]], np.float64))
    return tile, np.concatenate(boxes).astype(np.float32).reshape(-1, 4)


def mosaic_tiles(crops, crop_boxes, size: int, per_crop: int, rng: np.random.Generator,
                 min_visible: float = 0.5) -> list:
    """Mosaic tiles in which every crop appears about ``per_crop`` times (each time another
    window, cell and neighbours).

    Args:
        crops: uint8 images (h_i, w_i, 3), all smaller than or equal to the tile.
        crop_boxes: per crop, its figures' boxes (n_i, 4) in crop pixels.
        size: tile side T.
        per_crop: appearances of each crop.
        rng: random generator.
        min_visible: as for :func:`mosaic_tile`.

    Returns:
        list of (tile uint8 (T, T, 3), boxes float32 (M, 4)); empty without crops or with
        ``per_crop`` 0.
    """
    if not crops or per_crop <= 0:
        return []
    k = grid_side(size, [min(c.shape[:2]) for c in crops])
    cells = k * k
    count = math.ceil(len(crops) * per_crop / cells)
    order = np.concatenate([rng.permutation(len(crops))
                            for _ in range(math.ceil(count * cells / len(crops)))])
    return [mosaic_tile([crops[i] for i in order[t * cells:(t + 1) * cells]],
                        [crop_boxes[i] for i in order[t * cells:(t + 1) * cells]],
                        size, rng, min_visible) for t in range(count)]
