"""What ``focas-keras detect`` writes: detections (CSV, GeoJSON), counts, overlays.

Every file is written under a temporary name and renamed into place, so a reader never sees a
partial file. Coordinates are input-image pixels (x = column, y = row, x2/y2 exclusive).

GeoJSON: one ``Feature`` per *accepted* detection, its box as a closed ``Polygon`` ring in pixel
coordinates, which is what QuPath's GeoJSON import expects (File > Import objects, or drag
the file onto the image). The objects are QuPath *detections* (``objectType: "detection"``):
read-only, light, counted per class in QuPath's summaries and never edited by accident; they
can be converted into annotations in QuPath where editing is wanted. Each carries the
``Mitosis`` class, both scores as measurements and the image name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

#: Columns of ``detections.csv``.
DETECTION_COLUMNS = ["image", "x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score",
                     "accepted"]
#: Columns of ``counts.csv``.
COUNT_COLUMNS = ["image", "accepted", "candidates", "width_px", "height_px", "mpp", "area_mm2",
                 "per_mm2"]
MITOSIS_CLASS = {"name": "Mitosis", "color": [0, 200, 0]}
ACCEPTED_RGB = (0, 255, 0)
REJECTED_RGB = (255, 0, 0)
_COORDS = ["x", "y", "x1", "y1", "x2", "y2"]


def _write_atomic(path, data) -> None:
    """Writes bytes or text via ``<name>.tmp`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="")
        else:
            tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def detections_table(df_all: pd.DataFrame) -> pd.DataFrame:
    """The detections with exactly :data:`DETECTION_COLUMNS`, coordinates rounded to 0.01 px
    and scores to 4 decimals."""
    missing = [c for c in DETECTION_COLUMNS if c not in df_all.columns]
    if missing:
        raise ValueError(f"detections lack column(s) {', '.join(missing)}")
    table = df_all[DETECTION_COLUMNS].copy()
    table["image"] = table["image"].astype(str)
    table[_COORDS] = table[_COORDS].astype(np.float64).round(2)
    table[["det_score", "cls_score"]] = table[["det_score", "cls_score"]].astype(
        np.float64).round(4)
    table["accepted"] = table["accepted"].astype(bool)
    return table.reset_index(drop=True)


def write_detections_csv(df_all: pd.DataFrame, path) -> None:
    """Writes ``detections.csv`` (one row per candidate, :data:`DETECTION_COLUMNS`)."""
    _write_atomic(path, detections_table(df_all).to_csv(index=False, lineterminator="\n"))


def geojson_features(image_id: str, df: pd.DataFrame) -> list[dict]:
    """QuPath-readable GeoJSON Features of one image's accepted detections.

    Args:
        image_id: the image name, stored as the ``image`` property.
        df: :meth:`Cascade.run`'s table (x1..y2, det_score, cls_score, accepted).

    Returns:
        One Feature per accepted row: a closed, counter-clockwise (in x, y numbers) Polygon
        ring ``[[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]``.
    """
    features = []
    for row in df[df["accepted"].astype(bool)].itertuples(index=False):
        x1, y1, x2, y2 = (round(float(v), 2) for v in (row.x1, row.y1, row.x2, row.y2))
        ring = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
        features.append({
            "type": "Feature",
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {
                "objectType": "detection",
                "classification": dict(MITOSIS_CLASS, color=list(MITOSIS_CLASS["color"])),
                "isLocked": False,
                "measurements": {"det_score": round(float(row.det_score), 4),
                                 "cls_score": round(float(row.cls_score), 4)},
                "image": str(image_id),
            },
        })
    return features


def write_geojson(df_all: pd.DataFrame, path) -> None:
    """Writes a FeatureCollection of the accepted detections of every image in ``df_all``."""
    features = []
    for image_id, df in df_all.groupby("image", sort=False):
        features += geojson_features(image_id, df)
    text = json.dumps({"type": "FeatureCollection", "features": features}, allow_nan=False)
    _write_atomic(path, text + "\n")


def draw_overlay(image: np.ndarray, df: pd.DataFrame, scores: bool = True) -> np.ndarray:
    """A copy of a uint8 RGB image with the candidates drawn.

    Accepted boxes in green (with their cls_score above when ``scores``), rejected ones in
    red underneath; lines 2 px thick (3 px on images over 2000 px), on the box edges.
    """
    out = np.ascontiguousarray(np.array(image, np.uint8, copy=True))
    height, width = out.shape[:2]
    thickness = 3 if max(height, width) > 2000 else 2
    for accepted, color in ((False, REJECTED_RGB), (True, ACCEPTED_RGB)):
        rows = df[df["accepted"].astype(bool) == accepted]
        for row in rows.itertuples(index=False):
            x1, y1 = int(round(row.x1)), int(round(row.y1))
            x2, y2 = max(x1, int(round(row.x2)) - 1), max(y1, int(round(row.y2)) - 1)
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness)
            if accepted and scores:
                cv2.putText(out, f"{row.cls_score:.2f}", (x1, max(y1 - 2 * thickness, 10)),
                            cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness / 2, color, 1,
                            cv2.LINE_AA)
    return out


def write_overlay(image: np.ndarray, df: pd.DataFrame, path, quality: int = 90) -> None:
    """Writes :func:`draw_overlay` as PNG or JPEG (by the file suffix)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"overlay must be .png, .jpg or .jpeg, got {path.name}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if suffix != ".png" else []
    bgr = cv2.cvtColor(draw_overlay(image, df), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise ValueError(f"could not encode {path.name}")
    _write_atomic(path, encoded.tobytes())


def count_row(image_id: str, df: pd.DataFrame, width: int, height: int, mpp: float) -> dict:
    """One image's entry for :func:`counts_table`."""
    return {"image": str(image_id), "accepted": int(df["accepted"].astype(bool).sum()),
            "candidates": int(len(df)), "width_px": int(width), "height_px": int(height),
            "mpp": float(mpp)}


def counts_table(rows) -> pd.DataFrame:
    """Per-image counts and densities.

    Args:
        rows: dicts with ``image, accepted, candidates, width_px, height_px, mpp`` (see
            :func:`count_row`).

    Returns:
        :data:`COUNT_COLUMNS`; ``area_mm2`` = width * height * mpp^2 / 1e6 and ``per_mm2`` =
        accepted / area_mm2 (mitoses per mm^2 of image).
    """
    table = pd.DataFrame(list(rows), columns=COUNT_COLUMNS[:6])
    table = table.astype({"image": str, "accepted": "int64", "candidates": "int64",
                          "width_px": "int64", "height_px": "int64", "mpp": "float64"})
    table["area_mm2"] = table.width_px * table.height_px * table.mpp ** 2 / 1e6
    table["per_mm2"] = table.accepted / table.area_mm2
    return table[COUNT_COLUMNS]


def write_counts_csv(counts: pd.DataFrame, path) -> None:
    """Writes ``counts.csv`` (area to 1e-6 mm^2, density to 0.001 per mm^2)."""
    table = counts[COUNT_COLUMNS].copy()
    table["area_mm2"] = table["area_mm2"].round(6)
    table["per_mm2"] = table["per_mm2"].round(3)
    _write_atomic(path, table.to_csv(index=False, lineterminator="\n"))


def _concat(frames: dict) -> pd.DataFrame:
    parts = [df.assign(image=str(image_id)) for image_id, df in frames.items()]
    if not parts:
        return pd.DataFrame(columns=DETECTION_COLUMNS)
    return pd.concat(parts, ignore_index=True)[DETECTION_COLUMNS]


def _write_tables(out_dir: Path, frames: dict, rows: list) -> pd.DataFrame:
    df_all = _concat(frames)
    write_detections_csv(df_all, out_dir / "detections.csv")
    write_geojson(df_all, out_dir / "detections.geojson")
    for image_id, df in frames.items():
        write_geojson(df.assign(image=str(image_id)), out_dir / "geojson" / f"{image_id}.geojson")
    counts = counts_table(rows)
    write_counts_csv(counts, out_dir / "counts.csv")
    return counts


def write_outputs(out_dir, results: dict, overlays: bool = True) -> pd.DataFrame:
    """Writes every output of a set of images into ``out_dir``.

    Args:
        out_dir: created if needed; files there of the same names are replaced.
        results: ``{image_id: (df from Cascade.run, uint8 RGB image, mpp)}``.
        overlays: also write ``overlays/<image_id>.jpg``.

    Writes ``detections.csv``, ``detections.geojson`` (all images),
    ``geojson/<image_id>.geojson`` (one per image, for QuPath's per-image import),
    ``counts.csv`` and the overlays.

    Returns:
        The counts table.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, rows = {}, []
    for image_id, (df, image, mpp) in results.items():
        frames[image_id] = df
        rows.append(count_row(image_id, df, image.shape[1], image.shape[0], mpp))
        if overlays:
            write_overlay(image, df, out_dir / "overlays" / f"{image_id}.jpg")
    return _write_tables(out_dir, frames, rows)


def detect_to_dir(cascade, inputs, out_dir, overlays: bool = True, progress: bool = True,
                  overwrite: bool = False, extra: dict | None = None) -> pd.DataFrame:
    """Runs the cascade on images and writes :func:`write_outputs`' files plus ``detect.json``.

    Images are processed one at a time (only tables are kept in memory). The output directory
    is assembled aside and renamed into place when complete, so a failure leaves nothing.
    ``detect.json`` holds the settings (``max_candidates_per_mm2`` and ``tta`` among them),
    the resolved thresholds and pixel sizes, and under ``stage1_cap`` each image's stage-1
    candidates and cap (:attr:`Cascade.last_stage1_info`) and the ``cap_bound_images``, whose
    candidates the per-area cap may have cut (raise ``--max-candidates-per-mm2`` for those).

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade`.
        inputs: image files and/or directories (see :func:`list_inputs`).
        out_dir: the output directory; an existing non-empty one is refused unless
            ``overwrite``.
        overlays: write ``overlays/<image_id>.jpg``.
        progress: show a progress bar over images.
        overwrite: replace an existing output directory.
        extra: more keys for ``detect.json`` (e.g. which bundled model ran).

    Returns:
        The counts table (one row per image).

    Raises:
        InputError: bad inputs (see :func:`list_inputs`), an unreadable image, or an output
            directory in the way.
    """
    import dataclasses

    from tqdm import tqdm

    from data_tools.annotations import load_image
    from focas_keras import __version__
    from focas_keras.inference.cascade import list_inputs
    from focas_keras.io import atomic_output_dir, write_json_atomic

    files = list_inputs(inputs)
    mpp = float(cascade.settings.mpp)
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        frames, rows, stage1 = {}, [], {}
        for path in tqdm(files, desc="detect", unit="image", disable=not progress):
            image = load_image(path)
            df = cascade.run(image)
            info = getattr(cascade, "last_stage1_info", None)
            if info is not None:
                stage1[path.stem] = dict(info)
            frames[path.stem] = df
            rows.append(count_row(path.stem, df, image.shape[1], image.shape[0], mpp))
            if overlays:
                write_overlay(image, df, tmp / "overlays" / f"{path.stem}.jpg")
        counts = _write_tables(tmp, frames, rows)
        write_json_atomic(tmp / "detect.json", {
            "package_version": __version__,
            "settings": dataclasses.asdict(cascade.settings),
            "resolved": {"det_threshold": cascade.det_threshold,
                         "cls_threshold": cascade.cls_threshold,
                         "nms_iou": cascade.nms_iou, "patch": cascade.patch,
                         "det_mpp": cascade.det_mpp, "cls_mpp": cascade.cls_mpp},
            "images": {path.stem: str(path) for path in files},
            "totals": {"images": len(files), "candidates": int(counts.candidates.sum()),
                       "accepted": int(counts.accepted.sum())},
            "stage1_cap": {
                "max_candidates_per_mm2": getattr(cascade.settings, "max_candidates_per_mm2",
                                                  None),
                "cap_bound_images": [name for name, info in stage1.items()
                                     if info["cap_bound"]],
                "images": stage1,
            },
            **(extra or {}),
        })
    return counts
