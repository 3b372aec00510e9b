"""MIDOG-style COCO JSON: ``images``, ``categories`` and ``annotations`` with pixel boxes.

* ``images``: ``[{id, file_name, width, height}]``; ``file_name`` is resolved against the image
  root (default: the JSON's directory), then against ``<image_root>/images/``. The images are
  not read (MIDOG images are whole-slide sized); only their existence is checked and the size
  is taken from the JSON.
* ``categories``: ``[{id, name}]``; names are matched case-insensitively with ``_``/``-`` read
  as spaces (see :data:`LABEL_NAMES`): ``mitotic figure`` -> ``mitosis``; ``hard negative``,
  ``non-mitotic figure``, ``imposter`` -> ``hard_negative``. Other names are an error.
* ``annotations``: ``[{image_id, category_id, bbox}]``; ``bbox`` is ``[x, y, w, h]`` in pixels
  (COCO), or ``[x1, y1, x2, y2]`` with ``bbox_format="xyxy"`` (as in the MIDOG 2021 release).

The centroid is the box centre; it must lie inside the image, and a box crossing the border is
clipped. MIDOG has one image per slide (case), so the slide id is the image stem.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from focas_keras.datasets.annotations import (
    HARD_NEGATIVE, MITOSIS, AnnotationSet, clip_box, make_annotation_table,
    make_images_table)
from focas_keras.errors import InputError

#: Normalized category / label names and the label they stand for.
LABEL_NAMES = {
    "mitosis": MITOSIS, "mitoses": MITOSIS, "mitotic figure": MITOSIS,
    "mitotic figures": MITOSIS,
    "hard negative": HARD_NEGATIVE, "hard negatives": HARD_NEGATIVE,
    "non mitotic figure": HARD_NEGATIVE, "non mitotic figures": HARD_NEGATIVE,
    "nonmitotic figure": HARD_NEGATIVE, "imposter": HARD_NEGATIVE,
    "impostor": HARD_NEGATIVE, "mitotic figure lookalike": HARD_NEGATIVE,
}
BBOX_FORMATS = ("xywh", "xyxy")


def normalize_name(name: str) -> str:
    """Lower case, ``_`` and ``-`` as spaces, runs of blanks collapsed (``Non-Mitotic  Figure``
    -> ``non mitotic figure``)."""
    return " ".join(str(name).lower().replace("_", " ").replace("-", " ").split())


def _load_json(json_path: Path):
    """The parsed JSON object of ``json_path``."""
    try:
        text = json_path.read_text(encoding="utf-8-sig")
    except OSError as err:
        raise InputError(f"cannot read JSON file ({err.strerror or err})", json_path) from None
    except UnicodeDecodeError:
        raise InputError("JSON file is not UTF-8 text", json_path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", json_path, err.lineno) from None
    if not isinstance(data, dict):
        raise InputError("expected a JSON object with images, categories, annotations",
                         json_path)
    return data


def _records(data: dict, key: str, json_path: Path) -> list:
    """The list ``data[key]``, each item a JSON object."""
    if key not in data:
        raise InputError(f"missing key '{key}'", json_path)
    items = data[key]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        raise InputError(f"'{key}' must be a list of objects", json_path)
    return items


def _field(record: dict, key: str, where: str, json_path: Path):
    """``record[key]``; ids must be numbers or strings."""
    if key not in record:
        raise InputError(f"{where}: missing key '{key}'", json_path)
    value = record[key]
    if isinstance(value, (list, dict)) and key in ("id", "image_id", "category_id"):
        raise InputError(f"{where}: '{key}' must be a number or string", json_path)
    return value


def _positive_int(value, what: str, json_path: Path) -> int:
    """``value`` as an int, refusing anything but a positive whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
            or value <= 0:
        raise InputError(f"{what} must be a positive integer, got {value!r}", json_path)
    return int(value)


def _resolve_image(file_name: str, image_root: Path, json_path: Path) -> Path:
    """The image file: ``image_root/file_name``, else ``image_root/images/file_name``."""
    candidates = [image_root / file_name, image_root / "images" / file_name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise InputError(f"image file not found: {candidates[0]} (also tried {candidates[1]})",
                     json_path)


def _parse_images(data: dict, json_path: Path, image_root: Path, mpp: float) -> dict:
    """Image rows by COCO image id."""
    images, stems = {}, {}
    for index, record in enumerate(_records(data, "images", json_path)):
        where = f"images[{index}]"
        image_id = _field(record, "id", where, json_path)
        file_name = _field(record, "file_name", where, json_path)
        if not isinstance(file_name, str) or not file_name.strip():
            raise InputError(f"{where}: 'file_name' must be a non-empty string", json_path)
        width = _positive_int(_field(record, "width", where, json_path), f"{where} width",
                              json_path)
        height = _positive_int(_field(record, "height", where, json_path), f"{where} height",
                               json_path)
        if image_id in images:
            raise InputError(f"{where}: duplicate image id {image_id!r}", json_path)
        stem = Path(file_name).stem
        if stem in stems:
            raise InputError(f"{where}: duplicate image stem '{stem}' ({file_name} and "
                             f"{stems[stem]})", json_path)
        stems[stem] = file_name
        path = _resolve_image(file_name, image_root, json_path)
        images[image_id] = {"image_id": stem, "image_path": str(path), "slide_id": stem,
                            "width": width, "height": height, "mpp": mpp}
    return images


def _parse_categories(data: dict, json_path: Path) -> dict:
    """Labels by COCO category id."""
    labels = {}
    for index, record in enumerate(_records(data, "categories", json_path)):
        where = f"categories[{index}]"
        category_id = _field(record, "id", where, json_path)
        name = _field(record, "name", where, json_path)
        label = LABEL_NAMES.get(normalize_name(name))
        if label is None:
            known = ", ".join(sorted(LABEL_NAMES))
            raise InputError(f"{where}: unknown category name {name!r} (known: {known})",
                             json_path)
        labels[category_id] = label
    return labels


def _box(record: dict, where: str, bbox_format: str, json_path: Path) -> tuple:
    """(x1, y1, x2, y2) of an annotation, checked for size."""
    bbox = _field(record, "bbox", where, json_path)
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in bbox):
        raise InputError(f"{where}: bbox must be a list of 4 numbers, got {bbox!r}", json_path)
    x1, y1, a, b = (float(v) for v in bbox)
    x2, y2 = (x1 + a, y1 + b) if bbox_format == "xywh" else (a, b)
    if x2 <= x1 or y2 <= y1:
        raise InputError(f"{where}: bbox {bbox} has non-positive size ({bbox_format})",
                         json_path)
    return x1, y1, x2, y2


def _parse_annotation(record: dict, index: int, images: dict, labels: dict,
                      bbox_format: str, json_path: Path) -> dict:
    """The annotation-table row of one COCO annotation."""
    where = f"annotation {record['id']!r}" if "id" in record else f"annotations[{index}]"
    image_key = _field(record, "image_id", where, json_path)
    category = _field(record, "category_id", where, json_path)
    if image_key not in images:
        raise InputError(f"{where}: unknown image id {image_key!r}", json_path)
    if category not in labels:
        raise InputError(f"{where}: unknown category id {category!r}", json_path)
    x1, y1, x2, y2 = _box(record, where, bbox_format, json_path)
    image = images[image_key]
    obj = {"x": (x1 + x2) / 2.0, "y": (y1 + y2) / 2.0, "x1": x1, "y1": y1, "x2": x2,
           "y2": y2, "pixels": None}
    width, height = image["width"], image["height"]
    if not (0 <= obj["x"] < width and 0 <= obj["y"] < height):
        raise InputError(f"{where}: bbox {record['bbox']} is outside the {width}x{height} "
                         f"image {image['image_id']} (centre ({obj['x']:g}, {obj['y']:g}))",
                         json_path)
    obj = clip_box(obj, width, height)
    return {**{k: image[k] for k in ("image_id", "image_path", "slide_id", "mpp")},
            "label": labels[category], **obj}


def read_coco(json_path, image_root=None, mpp: float = 0.25,
              bbox_format: str = "xywh") -> AnnotationSet:
    """Reads a MIDOG-style COCO JSON file (see the module docstring).

    Args:
        json_path: the ``.json`` file.
        image_root: directory the ``file_name`` entries are relative to; default the JSON's
            directory (``<image_root>/images/`` is tried too).
        mpp: pixel size in um/px (MIDOG 2021: about 0.25).
        bbox_format: ``xywh`` (COCO ``[x, y, w, h]``) or ``xyxy`` (``[x1, y1, x2, y2]``).

    Returns:
        The :class:`~focas_keras.datasets.annotations.AnnotationSet` (all images, with or without
        annotations; no pixel lists).

    Raises:
        InputError: invalid JSON, missing keys, a missing image file, an unknown category name,
            an annotation with a bad bbox or an unknown image / category id, duplicate stems.
    """
    json_path = Path(json_path)
    if bbox_format not in BBOX_FORMATS:
        raise InputError(f"unknown bbox format '{bbox_format}' (known: "
                         f"{', '.join(BBOX_FORMATS)})")
    if not json_path.is_file():
        raise InputError("COCO JSON file not found", json_path)
    data = _load_json(json_path)
    root = Path(image_root) if image_root is not None else json_path.parent
    images = _parse_images(data, json_path, root, mpp)
    labels = _parse_categories(data, json_path)
    objects = [_parse_annotation(record, index, images, labels, bbox_format, json_path)
               for index, record in enumerate(_records(data, "annotations", json_path))]
    return AnnotationSet(make_images_table(images.values()), make_annotation_table(objects),
                         source=str(json_path), fmt="coco")
