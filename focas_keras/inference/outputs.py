"""What ``focas-keras detect`` writes: detections (CSV, GeoJSON), counts, overlays.

Every file is written under a temporary name and renamed into place, so a reader never sees a
partial file. Coordinates are input-image pixels (x = column, y = row, x2/y2 exclusive).
Overlays show the rejected candidates thin and red under the accepted ones, thick and green,
with a legend of both counts (:func:`draw_overlay`).

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
                 "per_mm2", "qc"]
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


def _box(row) -> tuple[tuple[int, int], tuple[int, int]]:
    x1, y1 = int(round(row.x1)), int(round(row.y1))
    return (x1, y1), (max(x1, int(round(row.x2)) - 1), max(y1, int(round(row.y2)) - 1))


def _legend_lines(n_accepted: int, n_rejected: int, rejected: bool) -> list:
    lines = [(f"accepted (mitoses): {n_accepted}", ACCEPTED_RGB)]
    lines.append((f"rejected candidates: {n_rejected}" + ("" if rejected else " (not drawn)"),
                  REJECTED_RGB))
    return lines


def _draw_legend(out: np.ndarray, lines: list, boxes: list) -> None:
    """Draws the legend box in the image corner that overlaps the fewest candidate boxes (ties:
    top left, top right, bottom left, bottom right), before the boxes, which are drawn over
    it; skipped where it would take over half the width or a quarter of the height."""
    height, width = out.shape[:2]
    scale = min(1.2, max(0.35, max(height, width) / 2500.0))
    thickness = 1 if scale < 0.7 else 2
    font = cv2.FONT_HERSHEY_SIMPLEX
    sizes = [cv2.getTextSize(text, font, scale, thickness) for text, _ in lines]
    line_h = max(h + base for (_, h), base in sizes) + max(2, int(4 * scale))
    pad = max(3, int(8 * scale))
    box_w = max(w for (w, _), _ in sizes) + 2 * pad
    box_h = line_h * len(lines) + 2 * pad
    if box_w > width // 2 or box_h > height // 4:  # would cover too much of a small image
        return
    corners = [(0, 0), (width - box_w, 0), (0, height - box_h), (width - box_w, height - box_h)]

    def hidden(corner):
        x0, y0 = corner
        return sum(x1 < x0 + box_w and x2 >= x0 and y1 < y0 + box_h and y2 >= y0
                   for (x1, y1), (x2, y2) in boxes)

    x0, y0 = min(corners, key=hidden)
    region = out[y0:y0 + box_h, x0:x0 + box_w]
    region[:] = (region.astype(np.uint16) * 3 // 10).astype(np.uint8)  # darkened, 70 %
    for k, ((text, color), ((_, text_h), _)) in enumerate(zip(lines, sizes)):
        baseline = y0 + pad + k * line_h + text_h
        cv2.putText(out, text, (x0 + pad, baseline), font, scale, color, thickness,
                    cv2.LINE_AA)


def draw_overlay(image: np.ndarray, df: pd.DataFrame, scores: bool = True,
                 rejected: bool = True, legend: bool = True) -> np.ndarray:
    """A copy of a uint8 RGB image with the candidates drawn.

    Rejected candidates are drawn first, thin (1 px, red), so the accepted ones (green, 2 px
    thick, 3 px on images over 2000 px, with their cls_score above when ``scores``) stay
    readable on top of them; lines lie on the box edges (x2/y2 exclusive).

    Args:
        image: uint8 (H, W, 3) RGB; not modified.
        df: :meth:`Cascade.run`'s table (x1..y2, cls_score, accepted).
        scores: write each accepted box's cls_score above it.
        rejected: draw the rejected candidates (``detect --no-rejected``: not).
        legend: draw a legend (the two colours with their counts) in the corner that
            overlaps the fewest boxes; left out on images too small to hold it.

    Returns:
        The drawn copy, same shape and dtype.
    """
    out = np.ascontiguousarray(np.array(image, np.uint8, copy=True))
    height, width = out.shape[:2]
    thickness = 3 if max(height, width) > 2000 else 2
    accepted_mask = df["accepted"].astype(bool).to_numpy()
    rejected_rows = list(df[~accepted_mask].itertuples(index=False))
    accepted_rows = list(df[accepted_mask].itertuples(index=False))
    drawn = (rejected_rows if rejected else []) + accepted_rows
    if legend:
        _draw_legend(out, _legend_lines(len(accepted_rows), len(rejected_rows), rejected),
                     [_box(row) for row in drawn])
    if rejected:
        for row in rejected_rows:
            cv2.rectangle(out, *_box(row), REJECTED_RGB, 1)
    for row in accepted_rows:
        (x1, y1), corner = _box(row)
        cv2.rectangle(out, (x1, y1), corner, ACCEPTED_RGB, thickness)
        if scores:
            cv2.putText(out, f"{row.cls_score:.2f}", (x1, max(y1 - 2 * thickness, 10)),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.4 * thickness / 2, ACCEPTED_RGB, 1,
                        cv2.LINE_AA)
    return out


def write_overlay(image: np.ndarray, df: pd.DataFrame, path, quality: int = 90,
                  rejected: bool = True) -> None:
    """Writes :func:`draw_overlay` (with its legend) as PNG or JPEG (by the file suffix).

    Args:
        image: uint8 (H, W, 3) RGB.
        df: the image's candidates (:meth:`Cascade.run`'s table).
        path: ``.png``, ``.jpg`` or ``.jpeg``; written via a temporary name.
        quality: JPEG quality.
        rejected: also draw the rejected candidates (thin, under the accepted ones).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".png", ".jpg", ".jpeg"):
        raise ValueError(f"overlay must be .png, .jpg or .jpeg, got {path.name}")
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if suffix != ".png" else []
    bgr = cv2.cvtColor(draw_overlay(image, df, rejected=rejected), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(suffix, bgr, params)
    if not ok:
        raise ValueError(f"could not encode {path.name}")
    _write_atomic(path, encoded.tobytes())


def count_row(image_id: str, df: pd.DataFrame, width: int, height: int, mpp: float,
              qc: dict | None = None) -> dict:
    """One image's entry for :func:`counts_table`; ``qc``: its domain-check record
    (:func:`focas_keras.domain.qc_block`), written as ``ok``, the flags joined by ``;``, or
    ``unchecked`` where none was made."""
    from focas_keras.domain import qc_text

    return {"image": str(image_id), "accepted": int(df["accepted"].astype(bool).sum()),
            "candidates": int(len(df)), "width_px": int(width), "height_px": int(height),
            "mpp": float(mpp), "qc": qc_text(qc)}


def counts_table(rows) -> pd.DataFrame:
    """Per-image counts and densities.

    Args:
        rows: dicts with ``image, accepted, candidates, width_px, height_px, mpp`` and
            optionally ``qc`` (see :func:`count_row`).

    Returns:
        :data:`COUNT_COLUMNS`; ``area_mm2`` = width * height * mpp^2 / 1e6 and ``per_mm2`` =
        accepted / area_mm2 (mitoses per mm^2 of image); ``qc`` ``unchecked`` where a row has
        none.
    """
    table = pd.DataFrame(list(rows), columns=COUNT_COLUMNS[:6] + ["qc"])
    table["qc"] = table["qc"].fillna("unchecked").astype(str)
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


def write_outputs(out_dir, results: dict, overlays: bool = True,
                  rejected: bool = True, qc: dict | None = None) -> pd.DataFrame:
    """Writes every output of a set of images into ``out_dir``.

    Args:
        out_dir: created if needed; files there of the same names are replaced.
        results: ``{image_id: (df from Cascade.run, uint8 RGB image, mpp)}``.
        overlays: also write ``overlays/<image_id>.jpg``.
        rejected: draw the rejected candidates on the overlays.
        qc: optional ``{image_id: qc record}`` for the ``qc`` column of ``counts.csv``.

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
        rows.append(count_row(image_id, df, image.shape[1], image.shape[0], mpp,
                              (qc or {}).get(image_id)))
        if overlays:
            write_overlay(image, df, out_dir / "overlays" / f"{image_id}.jpg",
                          rejected=rejected)
    return _write_tables(out_dir, frames, rows)


def _beside_progress_bar(emit):
    """``emit``, called so that its line does not break into a tqdm progress bar on
    stderr (the bar is cleared, the line written, the bar redrawn)."""
    from tqdm import tqdm

    def write(message):
        with tqdm.external_write_mode():
            emit(message)

    return write


def detect_to_dir(cascade, inputs, out_dir, overlays: bool = True, progress: bool = True,
                  overwrite: bool = False, extra: dict | None = None, rejected: bool = True,
                  warn=None, qc=None, failed: list | None = None) -> pd.DataFrame:
    """Runs the cascade on images and writes :func:`write_outputs`' files plus ``detect.json``.

    Images are processed one at a time (only tables are kept in memory). The output directory
    is assembled aside and renamed into place when complete, so a failure leaves nothing.
    ``detect.json`` holds the settings (``max_candidates_per_mm2`` and ``tta`` among them),
    the resolved thresholds and pixel sizes, and under ``stage1_cap`` each image's stage-1
    candidates and cap (:attr:`Cascade.stage1_info`) and the ``cap_bound_images``, whose
    candidates the per-area cap may have cut (raise ``--max-candidates-per-mm2`` for those),
    and ``grayscale_images``, the inputs without colour (the first one is warned about).

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade`.
        inputs: image files and/or directories (see :func:`list_inputs`).
        out_dir: the output directory; an existing non-empty one is refused unless
            ``overwrite``.
        overlays: write ``overlays/<image_id>.jpg``.
        progress: show a progress bar over images.
        overwrite: replace an existing output directory.
        extra: more keys for ``detect.json`` (e.g. which bundled model ran).
        rejected: draw the rejected candidates on the overlays (thin, under the accepted).
        warn: callable taking a warning message (default: printed on stderr); called once,
            for the first input without colour.
        qc: callable ``(image, df) -> qc record`` (:func:`focas_keras.domain.image_qc`):
            each image's domain check, in ``detect.json`` (``qc``) and ``counts.csv``.
        failed: None: an image that cannot be read stops the run (nothing is written). A
            list: the inputs already set aside (``{"image", "path", "reason"}``, see
            ``commands.common._image_files_or_failures``), to which each image that cannot
            be read is added while the rest run; ``detect.json`` lists them under
            ``failed``, and ``counts.csv`` and the other tables hold only the images
            processed (so ``evaluate`` scores only those). Where no image can be read, the
            last one's error is raised (nothing is written).

    Returns:
        The counts table (one row per image).

    Raises:
        InputError: bad inputs (see :func:`list_inputs`), an unreadable image, or an output
            directory in the way.
    """
    import dataclasses

    from tqdm import tqdm

    from focas_keras.datasets.annotations import (ColourCheck, _stderr_warning, check_image_file,
                                        load_image)
    from focas_keras import __version__
    from focas_keras.errors import InputError
    from focas_keras.inference.cascade import list_inputs
    from focas_keras.io import atomic_output_dir, write_json_atomic

    files = list_inputs(inputs)
    for path in files:  # a non-image fails now, before any image is processed
        check_image_file(path)
    mpp = float(cascade.settings.mpp)
    done = []
    colour = ColourCheck(_beside_progress_bar(warn or _stderr_warning))
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        frames, rows, stage1, checks = {}, [], {}, {}
        for path in tqdm(files, desc="detect", unit="image", disable=not progress):
            try:
                image = load_image(path, warn=colour)
            except InputError as error:
                if failed is None or (path == files[-1] and not done):
                    raise
                failed.append({"image": path.stem, "path": str(path),
                               "reason": str(error).removeprefix(f"{path}: ")})
                continue
            done.append(path)
            df = cascade.run(image)
            info = getattr(cascade, "stage1_info", None)
            if info is not None:
                stage1[path.stem] = dict(info)
            frames[path.stem] = df
            checks[path.stem] = qc(image, df) if qc is not None else None
            rows.append(count_row(path.stem, df, image.shape[1], image.shape[0], mpp,
                                  checks[path.stem]))
            if overlays:
                write_overlay(image, df, tmp / "overlays" / f"{path.stem}.jpg",
                              rejected=rejected)
        counts = _write_tables(tmp, frames, rows)
        write_json_atomic(tmp / "detect.json", {
            "package_version": __version__,
            "settings": dataclasses.asdict(cascade.settings),
            "resolved": {"det_threshold": cascade.det_threshold,
                         "cls_threshold": cascade.cls_threshold,
                         "nms_iou": cascade.nms_iou, "patch": cascade.patch,
                         "det_mpp": cascade.det_mpp, "cls_mpp": cascade.cls_mpp},
            "images": {path.stem: str(path) for path in done},
            "totals": {"images": len(done), "candidates": int(counts.candidates.sum()),
                       "accepted": int(counts.accepted.sum())},
            "failed": list(failed or []),
            "stage1_cap": {
                "max_candidates_per_mm2": getattr(cascade.settings, "max_candidates_per_mm2",
                                                  None),
                "cap_bound_images": [name for name, info in stage1.items()
                                     if info["cap_bound"]],
                "images": stage1,
            },
            **colour.summary(),
            **({"qc": checks} if qc is not None else {}),
            **(extra or {}),
        })
    return counts
