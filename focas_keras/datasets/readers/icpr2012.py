"""ICPR 2012 MITOSIS layout: images each with a same-stem ``.csv`` of pixel lists.

Each CSV line is one mitosis, a flat ``x,y,x,y,...`` list of pixel coordinates (x = column,
y = row). The official training files list every pixel of the mitosis; the test-set files we
have list one pair, the centroid. Both are accepted: a single pair becomes a square box of
``box_size`` px around it, a pixel list becomes its centroid and pixel extent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from focas_keras.datasets.annotations import (
    ICPR2012_MPP, MITOSIS, AnnotationSet, check_inside, clip_box, image_size, list_images,
    make_annotation_table, make_images_table, object_from_centroid, object_from_pixels,
    slide_from_stem)
from focas_keras.errors import InputError


def parse_icpr_csv(csv_path, box_size: float = 40.0) -> list[tuple[int, dict]]:
    """Parses one ICPR annotation file.

    Args:
        csv_path: the ``.csv`` file.
        box_size: side of the square box given to centroid-only lines (px).

    Returns:
        ``(line_number, object)`` pairs, ``object`` as from
        :func:`~focas_keras.datasets.annotations.object_from_pixels` (or ``..._from_centroid``).
        An empty file gives an empty list (an image with no mitosis).
    """
    csv_path = Path(csv_path)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"cannot read annotation file ({err.strerror or err})", csv_path) from None
    except UnicodeDecodeError:
        raise InputError("annotation file is not text", csv_path) from None
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = [f.strip() for f in line.strip().rstrip(",").split(",")]
        if fields == [""]:
            continue
        try:
            values = [float(f) for f in fields]
        except ValueError:
            bad = next(f for f in fields if not _is_number(f))
            raise InputError(f"not a number: '{bad}'", csv_path, number) from None
        if len(values) % 2:
            raise InputError(f"odd number of coordinates ({len(values)}); expected x,y pairs",
                             csv_path, number)
        coords = np.asarray(values).reshape(-1, 2)
        if len(coords) == 1:
            obj = object_from_centroid(coords[0, 0], coords[0, 1], box_size)
        else:
            if not np.all(coords == np.round(coords)):
                raise InputError("pixel lists must hold integer coordinates", csv_path, number)
            obj = object_from_pixels(coords.astype(np.int64))
        objects.append((number, obj))
    return objects


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_icpr2012(root, mpp: float = ICPR2012_MPP, box_size: float = 40.0,
                  label: str = MITOSIS) -> AnnotationSet:
    """Reads a directory in the ICPR 2012 layout.

    Images are the ``.bmp/.png/.jpg/.tif`` files directly in ``root`` (or in ``root/images``
    when ``root`` holds none); each needs a same-stem ``.csv`` (an empty one means no mitosis).
    Slide id = the first three characters of the stem (``A03_01`` -> ``A03``).

    Args:
        root: dataset directory.
        mpp: pixel size in um/px (scanner A: 0.2456).
        box_size: box side for centroid-only lines, px (40 px ~ 10 um).
        label: label given to every object.

    Returns:
        The :class:`~focas_keras.datasets.annotations.AnnotationSet`.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset directory not found", root)
    files = list_images(root)
    if not files and (root / "images").is_dir():
        files = list_images(root / "images")
    if not files:
        raise InputError("no images (.bmp, .png, .jpg, .tif) found", root)
    image_rows, object_rows = [], []
    for path in files:
        csv_path = path.with_suffix(".csv")
        if not csv_path.is_file():
            raise InputError(f"missing annotation file {csv_path.name} for this image", path)
        width, height = image_size(path)
        slide = slide_from_stem(path.stem)
        image_rows.append({"image_id": path.stem, "image_path": str(path), "slide_id": slide,
                           "width": width, "height": height, "mpp": mpp})
        for number, obj in parse_icpr_csv(csv_path, box_size):
            check_inside(obj, width, height, csv_path, number)
            obj = clip_box(obj, width, height)
            object_rows.append({"image_id": path.stem, "image_path": str(path),
                                "slide_id": slide, "label": label, "mpp": mpp, **obj})
    return AnnotationSet(make_images_table(image_rows), make_annotation_table(object_rows),
                         source=str(root), fmt="icpr2012")
