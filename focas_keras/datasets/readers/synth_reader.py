"""Reader for ``focas-keras synth`` output: the ICPR 2012 layout plus ``hard_negatives.csv``."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from focas_keras.datasets.annotations import (
    ANNOTATION_COLUMNS, HARD_NEGATIVE, ICPR2012_MPP, AnnotationSet, make_annotation_table)
from focas_keras.datasets.readers.icpr2012 import read_icpr2012
from focas_keras.errors import InputError

HARD_NEGATIVE_COLUMNS = ("image", "x", "y", "x1", "y1", "x2", "y2")


def read_synth(root, mpp: float = ICPR2012_MPP) -> AnnotationSet:
    """Reads a synthetic dataset: mitoses from the ICPR CSVs, look-alikes as hard negatives.

    Args:
        root: directory written by :func:`focas_keras.datasets.synth.write_dataset`.
        mpp: pixel size in um/px.

    Returns:
        An :class:`~focas_keras.datasets.annotations.AnnotationSet` with ``mitosis`` and
        ``hard_negative`` rows.
    """
    root = Path(root)
    base = read_icpr2012(root, mpp=mpp)
    neg_path = root / "hard_negatives.csv"
    if not neg_path.is_file():
        raise InputError("missing hard_negatives.csv (not a focas-keras synth dataset?)", root)
    images = base.images.set_index("image_id")
    rows = []
    with neg_path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in HARD_NEGATIVE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"missing columns {', '.join(missing)}", neg_path, 1)
        for number, record in enumerate(reader, start=2):
            image_id = record["image"]
            if image_id not in images.index:
                raise InputError(f"unknown image '{image_id}'", neg_path, number)
            try:
                values = {k: float(record[k]) for k in HARD_NEGATIVE_COLUMNS[1:]}
            except (TypeError, ValueError):
                raise InputError("coordinates must be numbers", neg_path, number) from None
            info = images.loc[image_id]
            if not (0 <= values["x"] < info.width and 0 <= values["y"] < info.height):
                raise InputError(
                    f"coordinate ({values['x']:g}, {values['y']:g}) outside the "
                    f"{info.width}x{info.height} image", neg_path, number)
            rows.append({"image_id": image_id, "image_path": info.image_path,
                         "slide_id": info.slide_id, "label": HARD_NEGATIVE, "mpp": mpp,
                         "pixels": None, **values})
    negatives = make_annotation_table(rows)
    annotations = make_annotation_table(
        pd.concat([base.annotations, negatives], ignore_index=True)[ANNOTATION_COLUMNS]
        .to_dict("records"))
    return AnnotationSet(base.images, annotations, source=str(root), fmt="synth")
