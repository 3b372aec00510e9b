"""AMi-Br layout: 128 px crops each centred on one mitotic figure, and ``labels.csv``.

``labels.csv`` has one row per crop: ``file, dataset, slide, scanner, mpp, x, y, ...`` where
``file`` names ``patches/<file>``, ``x, y`` place the crop's figure in its source image and
``mpp`` is the source image's pixel size (um/px). The table lists every labelled figure of the
source images, so a crop also holds every other figure of the same source slide whose source
position falls inside it. Every crop is a positive: the set has no negatives of its own.

Each crop is one image: ``image_id`` = file stem, ``slide_id`` = ``<dataset>/<slide>`` (slide
names repeat across datasets), ``mpp`` per crop, and ``scanner`` / ``dataset`` kept in the
images table. Figures are centroids, boxed as squares of ``box_um`` micrometres (10 um, the
40 px box of the ICPR 2012 reader at 0.2456 um/px), i.e. ``box_um / mpp`` px.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from focas_keras.datasets.annotations import (
    MITOSIS, AnnotationSet, clip_box, image_size, make_annotation_table, make_images_table,
    object_from_centroid)
from focas_keras.errors import InputError

LABELS_FILE = "labels.csv"
PATCH_DIR = "patches"
REQUIRED_COLUMNS = ("file", "dataset", "slide", "scanner", "mpp", "x", "y")
#: Side of the square box given to each figure, um (40 px at 0.2456 um/px).
BOX_UM = 40 * 0.2456


def read_labels(path) -> list[dict]:
    """Parses ``labels.csv``.

    Args:
        path: the labels file.

    Returns:
        One dict per row, in file order: ``file, dataset, slide, scanner`` (str), ``mpp``
        (float > 0), ``x, y`` (float, source-image pixels), ``line`` (file line number).

    Raises:
        InputError: a missing or unreadable file, a missing column, or a bad row (naming the
            file and line).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"no {LABELS_FILE} (the AMi-Br layout needs it)", path) from None
    except OSError as err:
        raise InputError(f"cannot read labels ({err.strerror or err})", path) from None
    except UnicodeDecodeError:
        raise InputError("labels file is not text", path) from None
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise InputError(f"missing column(s) {', '.join(missing)} in the header", path, 1)
    index = {name: header.index(name) for name in REQUIRED_COLUMNS}
    rows, seen = [], {}
    for number, fields in enumerate(reader, start=2):
        if not fields or all(not f.strip() for f in fields):
            continue
        if len(fields) < len(header):
            raise InputError(f"{len(fields)} fields, expected {len(header)}", path, number)
        row = {name: fields[i].strip() for name, i in index.items()}
        for name in ("file", "dataset", "slide", "scanner"):
            if not row[name]:
                raise InputError(f"empty '{name}'", path, number)
        for name in ("mpp", "x", "y"):
            try:
                row[name] = float(row[name])
            except ValueError:
                raise InputError(f"'{name}' is not a number: '{row[name]}'", path,
                                 number) from None
            if not math.isfinite(row[name]):
                raise InputError(f"'{name}' is not finite", path, number)
        if row["mpp"] <= 0:
            raise InputError(f"'mpp' must be > 0, got {row['mpp']:g}", path, number)
        if row["file"] in seen:
            raise InputError(f"duplicate file '{row['file']}' (also line {seen[row['file']]})",
                             path, number)
        seen[row["file"]] = number
        row["line"] = number
        rows.append(row)
    if not rows:
        raise InputError("no rows", path)
    return rows


def crop_figures(rows: list[dict], sizes: dict | None = None) -> dict[str, list]:
    """Where each crop's figures lie in the crop.

    A crop of ``width`` x ``height`` px is centred on its own figure (at ``width // 2``,
    ``height // 2``); any other row of the same dataset and slide whose source ``x, y`` falls
    inside the crop is a further figure at ``centre + (x_other - x, y_other - y)``.

    Args:
        rows: as from :func:`read_labels`.
        sizes: ``{file: (width, height)}`` of the crops; None (or a file not in it): 128 x 128.

    Returns:
        ``{file: [(x, y, other_file or None), ...]}`` crop pixels, the crop's own figure
        first (``None``), then the others sorted by file.
    """
    sizes = sizes or {}
    by_slide: dict[tuple, list] = {}
    for row in rows:
        by_slide.setdefault((row["dataset"], row["slide"]), []).append(row)
    out = {}
    for group in by_slide.values():
        xy = np.array([[r["x"], r["y"]] for r in group], np.float64)
        for i, row in enumerate(group):
            width, height = sizes.get(row["file"], (128, 128))
            cx, cy = width // 2, height // 2
            local = xy - xy[i] + np.array([cx, cy], np.float64)
            inside = ((local[:, 0] >= 0) & (local[:, 0] < width)
                      & (local[:, 1] >= 0) & (local[:, 1] < height))
            inside[i] = False
            others = sorted((group[j]["file"], j) for j in np.flatnonzero(inside))
            out[row["file"]] = [(float(cx), float(cy), None)] + [
                (float(local[j, 0]), float(local[j, 1]), name) for name, j in others]
    return out


def read_amibr(root, mpp: float | None = None, box_um: float = BOX_UM,
               label: str = MITOSIS, check_images: bool = True) -> AnnotationSet:
    """Reads a directory in the AMi-Br layout (``labels.csv`` + ``patches/*.png``).

    Args:
        root: dataset directory.
        mpp: pixel size forced on every crop (um/px); None: each row's own ``mpp``.
        box_um: side of the square box around each figure, um.
        label: label given to every figure.
        check_images: decode every crop now (size and integrity); False trusts the crops to
            be 128 x 128 and only checks that they exist (fast, for evaluation listings).

    Returns:
        The :class:`~focas_keras.datasets.annotations.AnnotationSet`; its images table carries
        ``scanner`` and ``dataset`` columns.

    Raises:
        InputError: no directory, no ``labels.csv``, a bad row, or a missing crop.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("dataset directory not found", root)
    if box_um <= 0:
        raise InputError(f"box size must be > 0 um, got {box_um:g}")
    labels = root / LABELS_FILE
    rows = read_labels(labels)
    image_rows, object_rows, sizes = [], [], {}
    for row in rows:
        path = root / PATCH_DIR / row["file"]
        if not path.is_file():
            raise InputError(f"crop {PATCH_DIR}/{row['file']} not found", labels, row["line"])
        sizes[row["file"]] = image_size(path) if check_images else (128, 128)
    figures = crop_figures(rows, sizes)
    for row in rows:
        path = root / PATCH_DIR / row["file"]
        width, height = sizes[row["file"]]
        image_id, slide = path.stem, f"{row['dataset']}/{row['slide']}"
        pixel = float(mpp if mpp is not None else row["mpp"])
        image_rows.append({"image_id": image_id, "image_path": str(path), "slide_id": slide,
                           "width": width, "height": height, "mpp": pixel,
                           "scanner": row["scanner"], "dataset": row["dataset"]})
        for x, y, _ in figures[row["file"]]:
            obj = clip_box(object_from_centroid(x, y, box_um / pixel), width, height)
            object_rows.append({"image_id": image_id, "image_path": str(path),
                                "slide_id": slide, "label": label, "mpp": pixel, **obj})
    return AnnotationSet(make_images_table(image_rows), make_annotation_table(object_rows),
                         source=str(root), fmt="amibr")
