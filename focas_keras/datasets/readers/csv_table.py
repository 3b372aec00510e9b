"""Generic CSV table: one row per object, header ``image,x,y[,label][,slide]``.

* ``image``: a path relative to the image root (default: the CSV's directory), or a stem
  (``<image_root>/<stem>.<ext>`` for the known image extensions).
* ``x``, ``y``: centroid in pixels (x = column). A row with both blank only declares an image
  without objects (the images table is exactly the images named in the CSV).
* ``label`` (optional; blank = ``mitosis``): ``mitosis``, ``mitotic figure``, ``1`` ->
  ``mitosis``; ``hard_negative``, ``hard negative``, ``negative``, ``non-mitotic figure``,
  ``imposter``, ``0`` -> ``hard_negative`` (case-insensitive, ``_``/``-`` read as spaces).
* ``slide`` (optional): the slide id; where absent or blank the id comes from ``slide_from``.

Other columns are ignored. Each object gets a square box of ``box_size`` px around its
centroid, clipped to the image. Errors name the CSV file and line (the header is line 1).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from focas_keras.datasets.annotations import (
    HARD_NEGATIVE, ICPR2012_MPP, IMAGE_EXTENSIONS, MITOSIS, AnnotationSet, check_inside,
    clip_box, image_size, make_annotation_table, make_images_table, object_from_centroid,
    slide_from_stem)
from focas_keras.datasets.readers.coco import LABEL_NAMES, normalize_name
from focas_keras.datasets.readers.gzmh import gzmh_slide_id
from focas_keras.errors import InputError

REQUIRED_COLUMNS = ("image", "x", "y")
#: Label spellings accepted in the ``label`` column (normalized with ``normalize_name``).
CSV_LABELS = {**LABEL_NAMES, "1": MITOSIS, "0": HARD_NEGATIVE, "negative": HARD_NEGATIVE}
#: How the slide id is derived from the image stem when no ``slide`` value is given.
SLIDE_RULES = {
    "stem": lambda stem: stem,                  # the whole stem
    "icpr": slide_from_stem,                    # first three characters (A03_01 -> A03)
    "prefix": gzmh_slide_id,                    # up to the first _ or - (S03_0012 -> S03)
}


def _parse_label(value: str | None, csv_path: Path, line: int) -> str:
    """The label a ``label`` cell stands for (blank: ``mitosis``)."""
    if value is None or not value.strip():
        return MITOSIS
    label = CSV_LABELS.get(normalize_name(value))
    if label is None:
        raise InputError(f"unknown label '{value}' (accepted: {', '.join(sorted(CSV_LABELS))})",
                         csv_path, line)
    return label


def _parse_coordinate(name: str, value: str, csv_path: Path, line: int) -> float:
    """A finite coordinate from a cell."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{name} is not a number: '{value}'", csv_path, line)
    return number


def resolve_image(value: str, image_root: Path, csv_path: Path, line: int) -> Path:
    """The image file a CSV ``image`` value names.

    Args:
        value: a path relative to ``image_root`` (or absolute), or a stem.
        image_root: directory relative paths and stems are looked up in.
        csv_path: the CSV file (for messages).
        line: the CSV line (for messages).

    Returns:
        The existing image file.
    """
    exact = image_root / value
    if exact.is_file():
        return exact
    found = []
    for ext in IMAGE_EXTENSIONS:
        for suffix in dict.fromkeys((ext, ext.upper())):
            candidate = image_root / f"{value}{suffix}"
            if candidate.is_file() and candidate not in found:
                found.append(candidate)
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise InputError(f"image '{value}' is ambiguous ({names})", csv_path, line)
    if not found:
        raise InputError(f"image file not found: '{value}' (looked in {image_root})",
                         csv_path, line)
    return found[0]


class _Images:
    """The images named so far, each resolved and sized once."""

    def __init__(self, image_root: Path, csv_path: Path, mpp: float, slide_rule):
        self.image_root, self.csv_path, self.mpp = image_root, csv_path, mpp
        self.slide_rule = slide_rule
        self.by_value, self.rows, self.by_stem = {}, {}, {}

    def get(self, value: str, slide: str, line: int) -> dict:
        """The images-table row of ``value`` (added on first use)."""
        path = self.by_value.get(value)
        if path is None:
            path = resolve_image(value, self.image_root, self.csv_path, line)
            self.by_value[value] = path
        key = path.resolve()
        row = self.rows.get(key)
        if row is None:
            row = self._add(path, key, slide, line)
        elif slide and slide != row["slide_id"]:
            raise InputError(f"slide '{slide}' differs from the slide '{row['slide_id']}' given "
                             f"earlier for image {path.name}", self.csv_path, line)
        return row

    def _add(self, path: Path, key: Path, slide: str, line: int) -> dict:
        stem = path.stem
        if stem in self.by_stem:
            raise InputError(f"duplicate image stem '{stem}' ({path} and "
                             f"{self.by_stem[stem]})", self.csv_path, line)
        try:
            width, height = image_size(path)
        except InputError as err:
            raise InputError(str(err), self.csv_path, line) from None
        self.by_stem[stem] = path
        row = {"image_id": stem, "image_path": str(path),
               "slide_id": slide or self.slide_rule(stem), "width": width, "height": height,
               "mpp": self.mpp}
        self.rows[key] = row
        return row


def _read_rows(csv_path: Path):
    """Yields ``(line, record)`` for each non-blank data row, after checking the header."""
    try:
        handle = csv_path.open(newline="", encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"cannot read CSV file ({err.strerror or err})", csv_path) from None
    with handle:
        reader = csv.reader(handle, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                raise InputError("empty CSV file (expected a header image,x,y[,label])",
                                 csv_path, 1)
            columns = {}
            for index, name in enumerate(header):
                columns.setdefault(name.strip().lower(), index)   # first of duplicates wins
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise InputError(f"missing header column(s) {', '.join(missing)} (expected "
                                 "image,x,y[,label][,slide])", csv_path, 1)
            start = reader.line_num + 1      # a quoted field may span lines: report the first
            for fields in reader:
                if any(field.strip() for field in fields):
                    record = {name: fields[i].strip() if i < len(fields) else ""
                              for name, i in columns.items()}
                    yield start, record
                start = reader.line_num + 1
        except (csv.Error, UnicodeDecodeError) as err:
            raise InputError(f"malformed CSV ({err})", csv_path, start) from None


def read_csv_table(csv_path, image_root=None, mpp: float = ICPR2012_MPP,
                   box_size: float = 40.0, slide_from: str = "stem") -> AnnotationSet:
    """Reads a CSV table of object centroids (see the module docstring).

    Args:
        csv_path: the ``.csv`` file.
        image_root: directory image paths / stems are relative to; default the CSV's.
        mpp: pixel size in um/px.
        box_size: side of the square box around each centroid, px.
        slide_from: slide id where the ``slide`` column is absent or blank: ``stem`` (the image
            stem), ``icpr`` (its first three characters) or ``prefix`` (up to the first
            ``_`` or ``-``).

    Returns:
        The :class:`~focas_keras.datasets.annotations.AnnotationSet` of the images named in the CSV.

    Raises:
        InputError: (with file and line) missing header columns, non-numeric or out-of-image
            coordinates, an unknown label, a missing image file.
    """
    csv_path = Path(csv_path)
    if slide_from not in SLIDE_RULES:
        raise InputError(f"unknown slide rule '{slide_from}' (known: {', '.join(SLIDE_RULES)})")
    if not csv_path.is_file():
        raise InputError("CSV file not found", csv_path)
    root = Path(image_root) if image_root is not None else csv_path.parent
    images = _Images(root, csv_path, mpp, SLIDE_RULES[slide_from])
    objects = []
    for line, record in _read_rows(csv_path):
        if not record["image"]:
            raise InputError("empty image name", csv_path, line)
        image = images.get(record["image"], record.get("slide", ""), line)
        x_text, y_text = record["x"], record["y"]
        if not x_text and not y_text:
            continue
        x = _parse_coordinate("x", x_text, csv_path, line)
        y = _parse_coordinate("y", y_text, csv_path, line)
        label = _parse_label(record.get("label"), csv_path, line)
        obj = object_from_centroid(x, y, box_size)
        check_inside(obj, image["width"], image["height"], csv_path, line)
        obj = clip_box(obj, image["width"], image["height"])
        objects.append({**{k: image[k] for k in ("image_id", "image_path", "slide_id", "mpp")},
                        "label": label, **obj})
    return AnnotationSet(make_images_table(images.rows.values()),
                         make_annotation_table(objects), source=str(csv_path), fmt="csv")
