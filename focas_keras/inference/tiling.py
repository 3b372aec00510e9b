"""One tiling for stage 1 and one crop rule for stage 2, shared by ``detect`` (the Python
cascade), the export graph's Python twin, hard-negative mining and whole slides.

Stage 1 tiles an image (or a whole slide, in Mdet's pixels) with :class:`TileGrid`: tiles every
``tile - overlap`` px, the last flush with the end, each *owning* the box centres up to the
middle of its overlaps with its neighbours. An object no larger than the overlap is thus taken
from a tile that holds it whole, never as a copy cut by a tile edge; :func:`merge_candidates`
then clips, thresholds, runs class-agnostic NMS in image coordinates and applies the image's
candidate cap. An image shorter than a tile is mirrored into the padding (as Mdet pads whole
images) and every tile shares its valid part.

Stage 2 takes ``size`` px crops around candidate centres, reflect-padded where they leave the
image (:func:`reflect_crop`, :func:`crop_patches`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import cv2
import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along one axis: every ``tile - overlap`` px, the last flush with the end.

    A length up to ``tile`` gives one tile at 0 (padded by the caller when shorter).
    """
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    starts.append(length - tile)
    return starts


def ownership(starts: list[int], tile: int) -> list[tuple[float, float]]:
    """Half-open ``[lo, hi)`` centre range each tile keeps: up to the middle of each overlap."""
    bounds = []
    for i, start in enumerate(starts):
        lo = -math.inf if i == 0 else (starts[i - 1] + tile + start) / 2.0
        hi = math.inf if i == len(starts) - 1 else (start + tile + starts[i + 1]) / 2.0
        bounds.append((lo, hi))
    return bounds


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """The stage-1 tiles of a ``height`` x ``width`` image (px in Mdet's pixels).

    Attributes:
        height, width: the image.
        tile, overlap: tile side and overlap of neighbours (px).
        ys, xs: tile origins along each axis (of the padded image where it is shorter than a
            tile).
        y_own, x_own: each row's / column's owned centre range ``[lo, hi)``.
        valid: (height, width) of every tile's part that is image where the image is shorter
            than a tile along some axis (the rest is mirrored padding); None otherwise.
    """

    height: int
    width: int
    tile: int
    overlap: int

    @property
    def padded_size(self) -> tuple[int, int]:
        return max(self.height, self.tile), max(self.width, self.tile)

    @functools.cached_property
    def ys(self) -> list[int]:
        return tile_starts(self.padded_size[0], self.tile, self.overlap)

    @functools.cached_property
    def xs(self) -> list[int]:
        return tile_starts(self.padded_size[1], self.tile, self.overlap)

    @functools.cached_property
    def y_own(self) -> list[tuple[float, float]]:
        return ownership(self.ys, self.tile)

    @functools.cached_property
    def x_own(self) -> list[tuple[float, float]]:
        return ownership(self.xs, self.tile)

    @property
    def valid(self) -> tuple[int, int] | None:
        if self.height >= self.tile and self.width >= self.tile:
            return None
        return min(self.height, self.tile), min(self.width, self.tile)

    def cells(self) -> list[tuple[int, int]]:
        """Every tile's (row, column) index, in raster order."""
        return [(i, j) for i in range(len(self.ys)) for j in range(len(self.xs))]

    def origin(self, cell: tuple[int, int]) -> tuple[int, int]:
        """(x0, y0) of a tile in image pixels."""
        i, j = cell
        return self.xs[j], self.ys[i]

    def pad(self, image: np.ndarray) -> np.ndarray:
        """The whole image (H, W, C) that :meth:`cut` slices: mirrored up to a tile where it
        is shorter than one (:func:`pad_to_tile`), else itself."""
        height, width = image.shape[:2]
        if (height, width) != (self.height, self.width):
            raise ValueError(f"image is {height}x{width}, the grid {self.height}x{self.width}")
        return image if self.valid is None else pad_to_tile(image, self.tile)

    def cut(self, padded: np.ndarray, cell: tuple[int, int]) -> np.ndarray:
        """The ``tile`` x ``tile`` pixels of a cell from :meth:`pad`'s image."""
        x0, y0 = self.origin(cell)
        return padded[y0:y0 + self.tile, x0:x0 + self.tile]

    def keep(self, cell: tuple[int, int], boxes, scores) -> tuple[np.ndarray, np.ndarray]:
        """A tile's detections in image pixels, only those it owns.

        Args:
            cell: the tile.
            boxes: float (D, 4) x1, y1, x2, y2 in the tile's pixels.
            scores: float (D,).

        Returns:
            (boxes float32 (K, 4) in image pixels, scores float32 (K,)): those whose centre
            lies in the tile's owned range and inside the image (a box mostly in mirrored
            padding is dropped, as Mdet's decoding does for a padded image).
        """
        x0, y0 = self.origin(cell)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4) + np.array(
            [x0, y0, x0, y0], np.float32)
        scores = np.asarray(scores, np.float32).reshape(-1)
        cx = (boxes[:, 0] + boxes[:, 2]) / 2.0
        cy = (boxes[:, 1] + boxes[:, 3]) / 2.0
        (ylo, yhi), (xlo, xhi) = self.y_own[cell[0]], self.x_own[cell[1]]
        own = ((cx >= xlo) & (cx < xhi) & (cy >= ylo) & (cy < yhi)
               & (cx <= self.width) & (cy <= self.height))
        return boxes[own], scores[own]


def pad_to_tile(image: np.ndarray, tile: int) -> np.ndarray:
    """``image`` mirrored up to at least ``tile`` px along each side, by Mdet's own mirror
    (:func:`~focas_keras.models.mdet.mirror_indices`)."""
    from focas_keras.models.mdet import mirror_indices

    height, width = image.shape[:2]
    rows = mirror_indices(height, max(height, tile))
    cols = mirror_indices(width, max(width, tile))
    return image[rows][:, cols]


def merge_candidates(found, height: float, width: float, det_threshold: float,
                     nms_iou: float, cap: int
                     ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """The image's stage-1 candidates from its tiles' owned detections.

    Boxes are clipped to the image, empty ones and those under ``det_threshold`` dropped,
    class-agnostic NMS (``tf.image.non_max_suppression``) merges what still overlaps, and the
    best ``cap`` are kept.

    Args:
        found: iterable of (boxes (D, 4) image px, scores (D,)), e.g. :meth:`TileGrid.keep`'s.
        height, width: the image (px).
        det_threshold, nms_iou: stage-1 threshold and NMS IoU.
        cap: the most candidates kept.

    Returns:
        (boxes float32 (K, 4), scores float32 (K,), how many survived NMS before the cap,
        int64 (K,) index of each kept box in ``found``'s concatenation), best first.
    """
    import tensorflow as tf

    found = list(found)
    boxes = np.concatenate([np.asarray(b, np.float32).reshape(-1, 4) for b, _ in found]
                           + [np.zeros((0, 4), np.float32)])
    scores = np.concatenate([np.asarray(s, np.float32).reshape(-1) for _, s in found]
                            + [np.zeros((0,), np.float32)])
    boxes = np.stack([np.clip(boxes[:, 0], 0, width), np.clip(boxes[:, 1], 0, height),
                      np.clip(boxes[:, 2], 0, width), np.clip(boxes[:, 3], 0, height)], 1)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]) & (scores >= det_threshold)
    index = np.flatnonzero(keep)
    boxes, scores = boxes[keep].astype(np.float32), scores[keep].astype(np.float32)
    order = np.zeros((0,), np.int64)
    if len(boxes):
        order = tf.image.non_max_suppression(boxes[:, [1, 0, 3, 2]], scores,
                                             max_output_size=len(boxes),
                                             iou_threshold=nms_iou).numpy()
    kept = order[:cap]  # NMS returns the best first
    return (boxes[kept].reshape(-1, 4), scores[kept].reshape(-1), int(len(order)),
            index[kept].astype(np.int64))


def reflect_crop(image: np.ndarray, x0: int, y0: int, size: int) -> np.ndarray:
    """A ``size`` x ``size`` crop with top-left (x0, y0), reflect-padded where it leaves the image.

    Args:
        image: uint8 (H, W, 3).
        x0, y0: top-left corner, may be negative or past the border.
        size: side of the crop.

    Returns:
        uint8 (size, size, 3).
    """
    height, width = image.shape[:2]
    x1, y1 = x0 + size, y0 + size
    if x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height:
        return np.ascontiguousarray(image[y0:y1, x0:x1])
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x1, width), min(y1, height)
    if cx0 >= cx1 or cy0 >= cy1:
        raise ValueError(f"crop at ({x0}, {y0}) size {size} misses the {width}x{height} image")
    inner = image[cy0:cy1, cx0:cx1]
    pads = (cy0 - y0, y1 - cy1, cx0 - x0, x1 - cx1)
    # BORDER_REFLECT_101 needs the pad to be smaller than the inner size; repeat if not.
    while any(pads):
        step = [min(p, max(1, s - 1)) for p, s in
                zip(pads, (inner.shape[0],) * 2 + (inner.shape[1],) * 2)]
        inner = cv2.copyMakeBorder(inner, *step, cv2.BORDER_REFLECT_101)
        pads = tuple(p - s for p, s in zip(pads, step))
    return np.ascontiguousarray(inner)


def crop_patches(image: np.ndarray, centres, size: int) -> np.ndarray:
    """``size`` px crops centred on ``centres``, reflect-padded where they leave the image.

    Args:
        image: uint8 (H, W, 3).
        centres: (N, 2) x, y pixels; rounded to the nearest pixel and clamped into the image.
        size: crop side; the centre pixel lands at row and column ``size // 2``.

    Returns:
        uint8 (N, size, size, 3).
    """
    height, width = image.shape[:2]
    centres = np.round(np.asarray(centres, np.float64).reshape(-1, 2)).astype(np.int64)
    if not len(centres):
        return np.zeros((0, size, size, 3), np.uint8)
    centres[:, 0] = np.clip(centres[:, 0], 0, width - 1)
    centres[:, 1] = np.clip(centres[:, 1], 0, height - 1)
    half = size // 2
    return np.stack([reflect_crop(image, int(cx) - half, int(cy) - half, size)
                     for cx, cy in centres])
