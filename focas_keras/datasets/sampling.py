"""Where det tiles and cls patches are cut from one image (pure numpy, no I/O).

All functions draw from a caller-owned ``numpy.random.Generator`` so that a seed fixes every
position. Coordinates are pixels (x = column, y = row); boxes are x1, y1, x2, y2 with x2/y2
exclusive.
"""

from __future__ import annotations

import numpy as np


def crop(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """A ``size`` x ``size`` crop with top-left (x0, y0), reflect-padded where it leaves the image:
    :func:`focas_keras.inference.tiling.reflect_crop`, the one crop rule of training and
    inference."""
    from focas_keras.inference.tiling import reflect_crop

    return reflect_crop(image, x0, y0, size)


def boxes_in_tile(boxes: np.ndarray, x0: int, y0: int, size: int,
                  min_visible: float = 0.5, height: int | None = None,
                  dtype=np.float32) -> np.ndarray:
    """Boxes of a tile: shifted to tile coordinates, clipped, kept if enough remains visible.

    Args:
        boxes: (N, 4) image boxes.
        x0, y0: tile top-left in the image.
        size: tile side (its width, when ``height`` is given).
        min_visible: smallest share of a box's area that must lie inside the tile.
        height: tile height for a rectangular window; None: ``size`` (square).
        dtype: of the result (float64 for callers that shift the boxes further before
            storing them, so that they are rounded once).

    Returns:
        (M, 4) tile boxes, M <= N.
    """
    height = size if height is None else height
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    shifted = boxes - np.array([x0, y0, x0, y0], np.float64)
    clipped = np.clip(shifted, 0, np.array([size, height, size, height], np.float64))
    area = np.prod(shifted[:, 2:] - shifted[:, :2], axis=1)
    visible = np.prod(np.maximum(clipped[:, 2:] - clipped[:, :2], 0), axis=1)
    keep = visible >= min_visible * np.maximum(area, 1e-9)
    return clipped[keep].astype(dtype)


def tile_origin_around(cx: float, cy: float, size: int, width: int, height: int,
                       margin: int, rng: np.random.Generator) -> tuple[int, int]:
    """A random tile origin such that (cx, cy) lies at least ``margin`` px inside the tile.

    The tile is kept inside the image when the image is large enough.
    """
    lo_x, hi_x = cx - size + margin, cx - margin
    lo_y, hi_y = cy - size + margin, cy - margin
    if width >= size:
        lo_x, hi_x = max(lo_x, 0), min(hi_x, width - size)
    if height >= size:
        lo_y, hi_y = max(lo_y, 0), min(hi_y, height - size)
    x0 = rng.uniform(lo_x, hi_x) if hi_x > lo_x else (lo_x + hi_x) / 2
    y0 = rng.uniform(lo_y, hi_y) if hi_y > lo_y else (lo_y + hi_y) / 2
    return int(np.floor(x0)), int(np.floor(y0))


def grid_origins(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """Tile origins covering the whole image: every ``size`` px, the last row and column flush
    with the far border (so they may overlap their neighbours), row by row.

    An image side shorter than ``size`` gets one tile at 0 (reflect-padded by :func:`crop`).
    """
    def starts(length):
        if length <= size:
            return [0]
        return list(range(0, length - size, size)) + [length - size]

    return [(x0, y0) for y0 in starts(height) for x0 in starts(width)]


def random_empty_tile(boxes: np.ndarray, size: int, width: int, height: int,
                      rng: np.random.Generator, tries: int = 50):
    """A random tile origin whose tile touches none of ``boxes``, or None after ``tries``."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    for _ in range(tries):
        x0 = int(rng.integers(0, max(width - size, 0) + 1))
        y0 = int(rng.integers(0, max(height - size, 0) + 1))
        if not len(boxes):
            return x0, y0
        overlap = ((boxes[:, 0] < x0 + size) & (boxes[:, 2] > x0)
                   & (boxes[:, 1] < y0 + size) & (boxes[:, 3] > y0))
        if not overlap.any():
            return x0, y0
    return None


def positive_centers(obj_pixels, cx: float, cy: float, count: int, jitter: float,
                     rng: np.random.Generator) -> np.ndarray:
    """Patch centres for one mitosis: random pixels of it, or jittered centroids.

    Args:
        obj_pixels: (N, 2) pixel list or None when only the centroid is known.
        cx, cy: centroid.
        count: number of centres.
        jitter: max offset (px) from the centroid when there is no pixel list.
        rng: random generator.

    Returns:
        (count, 2) int64 centres (x, y).
    """
    if obj_pixels is not None and len(obj_pixels):
        picks = rng.integers(0, len(obj_pixels), size=count)
        return np.asarray(obj_pixels, np.int64)[picks]
    offsets = rng.uniform(-jitter, jitter, size=(count, 2))
    return np.round(np.array([cx, cy]) + offsets).astype(np.int64)


def background_centers(avoid_xy: np.ndarray, count: int, width: int, height: int,
                       min_distance: float, rng: np.random.Generator,
                       tries_per_center: int = 20) -> np.ndarray:
    """Random patch centres at least ``min_distance`` px from every point in ``avoid_xy``.

    Returns:
        (M, 2) int64 centres, M <= count (fewer when the image is crowded).
    """
    avoid_xy = np.asarray(avoid_xy, np.float64).reshape(-1, 2)
    found = []
    for _ in range(count * tries_per_center):
        if len(found) == count:
            break
        point = np.array([rng.integers(0, width), rng.integers(0, height)], np.int64)
        if len(avoid_xy):
            if np.min(np.hypot(*(avoid_xy - point).T)) < min_distance:
                continue
        found.append(point)
    return np.asarray(found, np.int64).reshape(-1, 2)
