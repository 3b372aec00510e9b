"""GZMH layout: ``root/image/<stem>.<ext>`` images with ``root/label/<stem>.<ext>`` masks.

Each mask is a binary image the size of its image (8-bit 0/255 or 0/1, grayscale or colour,
any of the readable image formats; the mask's extension may differ from the image's). A pixel
is foreground when any channel is > 0, or > 127 for JPEG masks, whose compression noise would
otherwise turn the background into objects. Objects are the 8-connected components of the
foreground with at least ``min_area`` pixels; each keeps its full pixel list.

Slide id: the part of the stem before the first ``_`` or ``-`` (``S03_0012`` -> ``S03``,
``case7-a`` -> ``case7``), or the whole stem when it has neither.

Masks without an image are ignored; an image without a mask is an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np

from focas_keras.datasets.annotations import (
    ICPR2012_MPP, MITOSIS, AnnotationSet, image_size, list_images, load_image,
    make_annotation_table, make_images_table, object_from_pixels)
from focas_keras.errors import InputError

#: Threshold for lossy (JPEG) masks: foreground is > this value.
JPEG_THRESHOLD = 127
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def gzmh_slide_id(stem: str) -> str:
    """The slide id of a GZMH image: the stem up to its first ``_`` or ``-``.

    Args:
        stem: image file stem.

    Returns:
        The prefix before the first underscore or dash, or ``stem`` when it has neither
        (or when it starts with one, which would leave an empty id).
    """
    prefix = re.split(r"[_-]", stem, maxsplit=1)[0]
    return prefix or stem


def mask_foreground(mask_path) -> np.ndarray:
    """Reads a mask file as a boolean (H, W) foreground array.

    Args:
        mask_path: mask image file.

    Returns:
        True where any channel exceeds 0 (127 for JPEG files).
    """
    mask_path = Path(mask_path)
    image = load_image(mask_path)
    threshold = JPEG_THRESHOLD if mask_path.suffix.lower() in _JPEG_SUFFIXES else 0
    return image.max(axis=2) > threshold


def mask_objects(foreground: np.ndarray, min_area: int = 10) -> list[dict]:
    """The 8-connected components of a foreground mask as objects.

    Args:
        foreground: boolean (H, W) mask.
        min_area: smallest component kept, in pixels.

    Returns:
        One dict per kept component, as from
        :func:`~focas_keras.datasets.annotations.object_from_pixels` (centroid, box, pixel list).
    """
    binary = np.ascontiguousarray(foreground, dtype=np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(binary, connectivity=8)
    objects = []
    for index in range(1, count):
        left, top, width, height, area = stats[index]
        if area < min_area:
            continue
        window = labels[top:top + height, left:left + width] == index
        ys, xs = np.nonzero(window)
        pixels = np.stack([xs + left, ys + top], axis=1)
        objects.append(object_from_pixels(pixels))
    return objects


def _find_masks(label_dir: Path) -> dict[str, Path]:
    """Mask files of ``label_dir`` by stem."""
    if not label_dir.is_dir():
        raise InputError("mask directory 'label/' not found", label_dir)
    return {path.stem: path for path in list_images(label_dir)}


def read_gzmh(root, mpp: float = ICPR2012_MPP, min_area: int = 10) -> AnnotationSet:
    """Reads a dataset in the GZMH layout (see the module docstring).

    Args:
        root: dataset directory holding ``image/`` and ``label/``.
        mpp: pixel size in um/px.
        min_area: smallest connected component counted as a mitosis, in pixels.

    Returns:
        The :class:`~focas_keras.datasets.annotations.AnnotationSet`; every object is a ``mitosis``
        with its pixel list, and images whose mask is empty are listed without objects.

    Raises:
        InputError: missing ``image/`` or ``label/`` directory, no images, an image without a
            mask, a mask whose size differs from its image, duplicate stems, unreadable files.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset directory not found", root)
    image_dir = root / "image"
    if not image_dir.is_dir():
        raise InputError("image directory 'image/' not found (expected GZMH layout "
                         "image/<stem>.* and label/<stem>.*)", image_dir)
    files = list_images(image_dir)
    if not files:
        raise InputError("no images (.bmp, .png, .jpg, .tif) found", image_dir)
    masks = _find_masks(root / "label")
    image_rows, object_rows = [], []
    for path in files:
        mask_path = masks.get(path.stem)
        if mask_path is None:
            raise InputError(f"mask is missing: no label/{path.stem}.* for this image", path)
        width, height = image_size(path)
        foreground = mask_foreground(mask_path)
        if foreground.shape != (height, width):
            raise InputError(
                f"mask is {foreground.shape[1]}x{foreground.shape[0]} but its image "
                f"{path.name} is {width}x{height}", mask_path)
        slide = gzmh_slide_id(path.stem)
        common = {"image_id": path.stem, "image_path": str(path), "slide_id": slide,
                  "mpp": mpp}
        image_rows.append({**common, "width": width, "height": height})
        for obj in mask_objects(foreground, min_area):
            object_rows.append({**common, "label": MITOSIS, **obj})
    return AnnotationSet(make_images_table(image_rows), make_annotation_table(object_rows),
                         source=str(root), fmt="gzmh")
