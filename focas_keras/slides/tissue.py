"""Tissue detection on a slide thumbnail: a boolean mask and :class:`TissueMap` look-ups.

Tissue is where the (median-blurred) HSV saturation is above Otsu's threshold, never below a
floor that keeps a white, tissue-free slide empty; the mask is then closed, its holes filled and
its specks dropped. Every size is given in um (areas in um2) and converted with the mask's pixel
size, so the result does not depend on the thumbnail resolution.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import cv2
import numpy as np

from focas_keras.errors import InputError

BLUR_UM = 30.0


def _odd_at_least_3(size_px: float) -> int:
    return max(3, round(size_px) | 1)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fills the background regions of ``mask`` that do not touch its border.

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool, ``mask`` plus its holes.
    """
    height, width = mask.shape
    # A one-pixel frame joins every border-touching background region into one, so a single
    # flood fill from the corner reaches them all; what stays 0 is a hole.
    framed = np.zeros((height + 2, width + 2), np.uint8)
    framed[1:-1, 1:-1] = mask.astype(np.uint8) * 255
    flood = np.zeros((height + 4, width + 4), np.uint8)
    cv2.floodFill(framed, flood, (0, 0), 128)
    return mask | (framed[1:-1, 1:-1] == 0)


def _remove_small(mask: np.ndarray, min_area_px: float) -> np.ndarray:
    """Drops the 8-connected components of ``mask`` smaller than ``min_area_px`` px."""
    if min_area_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(
        mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_area_px
    keep[0] = False  # the background
    return keep[labels]


def tissue_mask(rgb: np.ndarray, mpp: float, min_saturation: float = 0.08,
                max_saturation: float = 0.2, close_um: float = 50.0, min_area_um2: float = 20000.0,
                fill_holes: bool = True) -> np.ndarray:
    """Where ``rgb`` shows tissue.

    Steps: HSV saturation (in [0, 1]); median blur over about 30 um (odd kernel, >= 3 px);
    threshold at Otsu clipped to [``min_saturation``, ``max_saturation``]; closing with a disk
    of radius ``close_um``; hole filling; removal of components smaller than ``min_area_um2``.

    Args:
        rgb: (H, W, 3) uint8 RGB, e.g. a slide thumbnail.
        mpp: pixel size of ``rgb``, um/px.
        min_saturation: lowest threshold on the saturation in [0, 1]; Otsu alone would split
            the noise of a tissue-free (white) image into "tissue".
        max_saturation: highest threshold: where tissue covers most of the image, Otsu
            splits pale from strongly stained tissue instead of tissue from glass (on four
            ICPR 2012 fields side by side it put the threshold near 0.35 and dropped whole
            pale fields, whose median saturation is ~0.42 and 5th percentile ~0.2; glass
            is below ~0.05).
        close_um: radius of the closing disk, um (0 disables closing).
        min_area_um2: smallest tissue component kept, um2 (0 keeps all).
        fill_holes: fill background enclosed by tissue.

    Returns:
        (H, W) bool, True on tissue.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be finite and > 0, got {mpp!r}")
    saturation = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2HSV)[..., 1]
    saturation = cv2.medianBlur(saturation, _odd_at_least_3(BLUR_UM / mpp))
    otsu, _ = cv2.threshold(saturation, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    threshold = min(max(otsu / 255.0, float(min_saturation)), float(max_saturation))
    mask = saturation > threshold * 255.0
    radius = round(close_um / mpp)
    if radius >= 1:
        disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        # OpenCV erodes as if tissue lay beyond the border, which would join tissue to a
        # nearby border; pad with background instead.
        padded = cv2.copyMakeBorder(mask.astype(np.uint8), radius, radius, radius, radius,
                                    cv2.BORDER_CONSTANT, value=0)
        closed = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, disk)
        mask = closed[radius:-radius, radius:-radius].astype(bool)
    if fill_holes:
        mask = _fill_holes(mask)
    return _remove_small(mask, min_area_um2 / (mpp * mpp))


def save_mask_png(mask: np.ndarray, path) -> None:
    """Writes ``mask`` ((H, W) bool) as a 0/255 uint8 PNG, atomically (temp file + rename).

    Raises:
        InputError: the PNG cannot be written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    image = np.asarray(mask, bool).astype(np.uint8) * 255
    try:
        ok = cv2.imwrite(str(tmp), image)
    except cv2.error as error:
        ok = False
        reason = " ".join(str(error).split())
    else:
        reason = "cv2.imwrite failed"
    if not ok:
        tmp.unlink(missing_ok=True)
        raise InputError(f"cannot write the tissue mask PNG ({reason})", path)
    os.replace(tmp, path)


@dataclasses.dataclass(frozen=True, eq=False)
class TissueMap:
    """A tissue mask with its scale to level-0 px.

    Mask pixel (row r, column c) covers level-0 ``[c / scale_x, (c + 1) / scale_x)`` x
    ``[r / scale_y, (r + 1) / scale_y)``.

    Attributes:
        mask: (H, W) bool, True on tissue.
        scale_x, scale_y: mask px per level-0 px along x and y.
    """

    mask: np.ndarray
    scale_x: float
    scale_y: float

    def fraction(self, x0: float, y0: float, x1: float, y1: float) -> float:
        """Tissue share of the level-0 rectangle ``[x0, x1) x [y0, y1)``.

        The rectangle is widened to whole mask pixels (floor / ceil), so a partly covered mask
        pixel counts fully, and clipped to the mask: the share is of its part inside the mask.

        Returns:
            In [0, 1]; 0.0 for an empty rectangle or one outside the mask.
        """
        height, width = self.mask.shape
        c0 = max(0, math.floor(x0 * self.scale_x))
        c1 = min(width, math.ceil(x1 * self.scale_x))
        r0 = max(0, math.floor(y0 * self.scale_y))
        r1 = min(height, math.ceil(y1 * self.scale_y))
        if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
            return 0.0
        return float(self.mask[r0:r1, c0:c1].mean())

    def contains(self, points_xy: np.ndarray) -> np.ndarray:
        """Whether level-0 points lie on tissue (the mask pixel holding each point).

        Args:
            points_xy: (M, 2) float, (x, y) in level-0 px.

        Returns:
            (M,) bool; False for points outside the mask (or not finite).
        """
        points = np.asarray(points_xy, np.float64).reshape(-1, 2)
        with np.errstate(invalid="ignore"):
            cols = np.floor(points[:, 0] * self.scale_x)
            rows = np.floor(points[:, 1] * self.scale_y)
        height, width = self.mask.shape
        inside = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        result = np.zeros(len(points), bool)
        result[inside] = self.mask[rows[inside].astype(np.int64), cols[inside].astype(np.int64)]
        return result

    def area_mm2(self, mpp_level0: float) -> float:
        """Tissue area, mm2, given the level-0 pixel size ``mpp_level0`` (um/px)."""
        pixel_um2 = (mpp_level0 / self.scale_x) * (mpp_level0 / self.scale_y)
        return float(np.count_nonzero(self.mask)) * pixel_um2 / 1e6


def tissue_map(reader, target_mpp: float = 8.0, detect: bool = True,
               **mask_kwargs) -> TissueMap:
    """The tissue of a whole slide, from its thumbnail at about ``target_mpp``.

    The thumbnail comes from the coarsest level fine enough; a slide without a pyramid is
    read from level 0 in strips (:meth:`SlideReader.thumbnail`), so memory stays bounded.

    Args:
        reader: an open :class:`focas_keras.slides.reader.SlideReader`.
        target_mpp: thumbnail pixel size, um/px.
        detect: False takes the whole slide as tissue (``--no-tissue-mask``), on the same grid;
            no pixel is read for it.
        **mask_kwargs: passed to :func:`tissue_mask` (``min_saturation``, ``close_um``, ...).

    Returns:
        The :class:`TissueMap` of the thumbnail.
    """
    if not detect:
        _, width, height = reader.thumbnail_size(target_mpp)
        return TissueMap(np.ones((height, width), bool), width / reader.width,
                         height / reader.height)
    rgb, scale_x, scale_y = reader.thumbnail(target_mpp)
    thumb_mpp = reader.mpp / math.sqrt(scale_x * scale_y)
    return TissueMap(tissue_mask(rgb, thumb_mpp, **mask_kwargs), scale_x, scale_y)
