"""What ``focas-keras slide`` writes for a pathologist: tables, QuPath GeoJSON, the thumbnail
with tissue outline, mitoses, density heatmap and hotspot, ``summary.json`` and the printed
summary. Every file goes through a temporary name and a rename; ``summary.json`` comes last, so
its presence means the slide's outputs are complete. Coordinates are level-0 slide pixels.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from focas_keras.inference.outputs import _write_atomic, detections_table, geojson_features
from focas_keras.io import write_json_atomic
from focas_keras.slides import hotspot as hs

HOTSPOT_CLASS = {"name": "Hotspot", "color": [220, 0, 0]}
TISSUE_BGR = (255, 128, 0)
MITOSIS_BGR = (0, 170, 0)
HOTSPOT_BGR = (0, 0, 230)
THUMBNAIL_SIDE = 1600
THUMBNAIL_MIN_MPP = 2.0


def circle_ring(x: float, y: float, radius: float, vertices: int = 128) -> list:
    """A closed polygon ring approximating a circle (level-0 px), counter-clockwise."""
    angles = np.linspace(0.0, 2.0 * math.pi, vertices, endpoint=False)
    ring = [[round(x + radius * math.cos(a), 2), round(y + radius * math.sin(a), 2)]
            for a in angles]
    return ring + [ring[0]]


def window_ring(summary_hotspot: dict, width: int, height: int) -> list:
    """The hotspot circle as a 128-gon in level-0 px, clipped to the slide ``[0, width] x
    [0, height]`` (the window never runs off the slide)."""
    h = summary_hotspot
    ring = hs.clip_ring(circle_ring(h["x_px"], h["y_px"], h["radius_px"]), 0.0, 0.0,
                        float(width), float(height))
    return [[round(x, 2), round(y, 2)] for x, y in ring]


def hotspot_summary(spot, mpp: float, size_px, area_mm2: float, tissue_mm2: float,
                    counted: int) -> dict:
    """The ``hotspot`` entry of ``summary.json``.

    Args:
        spot: the :class:`~focas_keras.slides.hotspot.Hotspot` (None: no counted mitosis, or
            the window does not fit the tissue).
        mpp: level-0 pixel size, um/px.
        size_px: (width, height) of the slide, level-0 px.
        area_mm2: the window's area; tissue_mm2: the tissue's.
        counted: mitoses counted on the whole slide (inside the tissue mask).

    Returns:
        ``fits`` False where the tissue is smaller than the window: the count is then over all
        tissue (``window: "all tissue"``, ``area_mm2`` the tissue's, with a ``note``).
        Otherwise the window (count, per mm2, centre and radius in um and px) with
        ``area_in_slide_mm2``, its area inside the slide (it is clipped to the slide).
    """
    radius_um = hs.circle_radius_um(area_mm2)
    if tissue_mm2 < area_mm2:
        return {"fits": False, "window": "all tissue", "count": int(counted),
                "area_mm2": float(tissue_mm2),
                "per_mm2": counted / tissue_mm2 if tissue_mm2 > 0 else 0.0,
                "window_mm2": float(area_mm2), "radius_um": radius_um,
                "note": (f"the tissue ({tissue_mm2:.2f} mm2) is smaller than the "
                         f"{area_mm2:.2f} mm2 window: the count is over all tissue and no "
                         "score is given")}
    if spot is None:
        return {"fits": True, "window": "circle", "count": 0, "radius_um": radius_um,
                "area_mm2": float(area_mm2), "per_mm2": 0.0}
    out = dict(spot.to_dict(mpp), fits=True, window="circle")
    out.pop("members", None)
    ring = window_ring(out, *size_px)
    out["area_in_slide_mm2"] = round(hs.ring_area(ring) * (mpp / 1000.0) ** 2, 4)
    return out


def score_entry(hotspot: dict, qc: dict, score_anyway: bool = False) -> dict:
    """The ``score`` entry of ``summary.json``: the Nottingham mitosis score of the hotspot,
    or ``score: None`` with the ``reason`` where the window does not fit the tissue (never
    scored) or the slide is flagged (scored only with ``score_anyway``; the score then lists
    the ``flags``)."""
    from focas_keras.domain import FLAG_SMALL_TISSUE

    if not hotspot["fits"]:
        return {"score": None, "reason": hotspot["note"]}
    score = hs.nottingham_score(hotspot["count"], hotspot["area_mm2"])
    flags = [f for f in qc["flags"] if f != FLAG_SMALL_TISSUE]
    if flags and not score_anyway:
        return {"score": None, "rule": score["rule"], "source": score["source"],
                "reason": (f"not given: the slide is flagged ({', '.join(flags)}); check the "
                           "flags, or pass --score-anyway to print it")}
    if flags:
        score["flagged"] = flags
    return score


def hotspot_feature(slide: str, summary_hotspot: dict, width: int, height: int) -> dict:
    """The hotspot window as a QuPath annotation (a 128-gon in level-0 px, clipped to the
    slide of ``width`` x ``height`` px)."""
    h = summary_hotspot
    return {
        "type": "Feature",
        "geometry": {"type": "Polygon",
                     "coordinates": [window_ring(h, width, height)]},
        "properties": {
            "objectType": "annotation",
            "classification": dict(HOTSPOT_CLASS, color=list(HOTSPOT_CLASS["color"])),
            "isLocked": True,
            "measurements": {"mitoses": int(h["count"]), "area_mm2": round(h["area_mm2"], 4),
                             "mitoses_per_mm2": round(h["per_mm2"], 4)},
            "image": slide,
        },
    }


def density_map(shape, points_thumb: np.ndarray, sigma_px: float, pixel_mm2: float
                ) -> np.ndarray:
    """Mitoses per mm2 on the thumbnail grid: the points' counts smoothed by a Gaussian of
    ``sigma_px`` (which keeps their sum), divided by a thumbnail pixel's area.

    The blur runs on a grid coarse enough that sigma is at most 4 of its cells (a hotspot-sized
    sigma is hundreds of thumbnail px), then is resized back to the thumbnail.

    Args:
        shape: (H, W) of the thumbnail.
        points_thumb: (N, 2) x, y in thumbnail px.
        sigma_px: the Gaussian's sigma, thumbnail px.
        pixel_mm2: area of one thumbnail pixel, mm2.

    Returns:
        float32 (H, W).
    """
    height, width = shape
    factor = max(1.0, sigma_px / 4.0)  # thumbnail px per grid cell
    grid_h, grid_w = max(1, math.ceil(height / factor)), max(1, math.ceil(width / factor))
    counts = np.zeros((grid_h, grid_w), np.float32)
    if len(points_thumb):
        cols = np.clip(np.floor(points_thumb[:, 0] / factor).astype(np.int64), 0, grid_w - 1)
        rows = np.clip(np.floor(points_thumb[:, 1] / factor).astype(np.int64), 0, grid_h - 1)
        np.add.at(counts, (rows, cols), 1.0)
    blurred = cv2.GaussianBlur(counts, (0, 0), sigmaX=max(sigma_px / factor, 0.5),
                               borderType=cv2.BORDER_CONSTANT)
    density = blurred / np.float32(pixel_mm2 * factor * factor)
    if (grid_h, grid_w) != (height, width):
        density = cv2.resize(density, (width, height), interpolation=cv2.INTER_LINEAR)
    return density


def draw_thumbnail(thumb: np.ndarray, scale: tuple[float, float], tissue,
                   accepted_xy: np.ndarray, summary: dict, mpp: float) -> np.ndarray:
    """The slide with the density heatmap blended over the tissue, the tissue outline (blue),
    each accepted mitosis (green dot) and the hotspot (red circle), and a caption.

    Args:
        thumb: uint8 (H, W, 3) RGB of the whole slide at any scale.
        scale: (x, y) ``thumb`` px per level-0 px.
        tissue: the :class:`~focas_keras.slides.tissue.TissueMap` (resampled to ``thumb``).
        accepted_xy: (N, 2) accepted mitoses, level-0 px.
        summary: the slide's summary (hotspot, score, mitoses).
        mpp: level-0 pixel size, um/px.

    Returns:
        uint8 RGB, the size of ``thumb``.
    """
    height, width = thumb.shape[:2]
    if tissue.mask.shape != (height, width):
        from focas_keras.slides.tissue import TissueMap

        mask = cv2.resize(tissue.mask.astype(np.uint8), (width, height),
                          interpolation=cv2.INTER_NEAREST).astype(bool)
        tissue = TissueMap(mask, *scale)
    sx, sy = tissue.scale_x, tissue.scale_y
    thumb_mpp = mpp / math.sqrt(sx * sy)
    points = np.asarray(accepted_xy, np.float64).reshape(-1, 2) * np.array([sx, sy])
    spot = summary["hotspot"]
    radius_px = spot["radius_um"] / thumb_mpp
    density = density_map((height, width), points, radius_px / 2.0, (thumb_mpp / 1000.0) ** 2)
    out = cv2.cvtColor(thumb, cv2.COLOR_RGB2BGR)
    peak = float(density.max())
    if peak > 0:
        level = np.clip(density / peak * 255.0, 0, 255).astype(np.uint8)
        colour = cv2.applyColorMap(level, cv2.COLORMAP_JET)
        show = tissue.mask & (density > 0.02 * peak)
        out[show] = (0.55 * out[show] + 0.45 * colour[show]).astype(np.uint8)
    contours, _ = cv2.findContours(tissue.mask.astype(np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, TISSUE_BGR, 1, cv2.LINE_AA)
    for x, y in points:
        cv2.circle(out, (int(round(x)), int(round(y))), 2, MITOSIS_BGR, -1, cv2.LINE_AA)
    if spot.get("x_px") is not None:
        centre = (int(round(spot["x_px"] * sx)), int(round(spot["y_px"] * sy)))
        cv2.circle(out, centre, max(2, int(round(radius_px))), HOTSPOT_BGR, 2, cv2.LINE_AA)
    given = summary["score"]["score"]
    flags = (summary.get("qc") or {}).get("flags") or []
    captions = [f"{summary['mitoses']} mitoses; "
                + (f"hotspot {spot['count']} in " if spot.get("fits", True) else
                   f"all tissue ({spot['count']}) in ")
                + f"{spot['area_mm2']:.2f} mm2; "
                + (f"score {given}" if given is not None else "no score")
                + f"; peak density {peak:.1f}/mm2"]
    captions += [f"FLAGGED: {flag}" for flag in flags]  # one per line: a narrow slide cuts
    scale = max(0.35, min(1.0, width / 1400.0))
    y = 0
    for caption in captions:
        (tw, th), base = cv2.getTextSize(caption, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        cv2.rectangle(out, (0, y), (min(width, tw + 8), y + th + base + 8), (255, 255, 255), -1)
        cv2.putText(out, caption, (4, y + th + 4), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (0, 0, 0) if caption is captions[0] else (0, 0, 200), 1, cv2.LINE_AA)
        y += th + base + 8
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def _write_png(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise OSError(f"cannot encode {path}")
    _write_atomic(path, data.tobytes())


def write_slide_outputs(out_dir, reader, table: pd.DataFrame, summary: dict, spot,
                        tissue) -> None:
    """Writes a slide's ``detections.csv``, ``detections.geojson``, ``tissue_mask.png``,
    ``thumbnail.png`` and, last, ``summary.json``.

    ``table`` holds every candidate with ``in_tissue`` and ``counted`` (accepted and in
    tissue) columns; only counted mitoses go into the GeoJSON and the thumbnail."""
    from focas_keras.slides.tissue import save_mask_png

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    named = table.assign(image=reader.name)
    # every candidate, with whether it lies in the tissue mask and is counted
    csv = detections_table(named).assign(in_tissue=named["in_tissue"].astype(bool).to_numpy(),
                                         counted=named["counted"].astype(bool).to_numpy())
    _write_atomic(out_dir / "detections.csv", csv.to_csv(index=False, lineterminator="\n"))
    features = geojson_features(reader.name, named.assign(accepted=named["counted"]))
    if spot is not None:
        features.append(hotspot_feature(reader.name, summary["hotspot"], reader.width,
                                        reader.height))
    _write_atomic(out_dir / "detections.geojson",
                  json.dumps({"type": "FeatureCollection", "features": features},
                             allow_nan=False) + "\n")
    save_mask_png(tissue.mask, out_dir / "tissue_mask.png")
    accepted = table[table["counted"].astype(bool)][["x", "y"]].to_numpy(np.float64)
    # The picture: about THUMBNAIL_SIDE px along the slide's long side, not the mask's coarse
    # grid, so that a small slide stays legible; never finer than THUMBNAIL_MIN_MPP (a small
    # slide would otherwise be read whole at full resolution just for its picture).
    long_um = max(reader.width, reader.height) * reader.mpp
    picture, px, py = reader.thumbnail(max(reader.mpp, THUMBNAIL_MIN_MPP,
                                           long_um / THUMBNAIL_SIDE))
    _write_png(out_dir / "thumbnail.png",
               draw_thumbnail(picture, (px, py), tissue, accepted, summary, reader.mpp))
    write_json_atomic(out_dir / "summary.json", summary)


def write_slides_csv(path, rows: list[dict], columns: list[str]) -> None:
    """``slides.csv``: one row per slide."""
    _write_atomic(path, pd.DataFrame(rows, columns=columns).to_csv(index=False,
                                                                    lineterminator="\n"))


def summary_text(summary: dict, out_dir) -> str:
    """What the pathologist reads first: count, hotspot, score, tiles, where the files are."""
    spot, score, tiles = summary["hotspot"], summary["score"], summary["tiles"]
    per_tissue = summary["per_mm2_tissue"]
    outside = summary.get("accepted_outside_tissue", 0)
    lines = [
        f"{summary['slide']}: {summary['mitoses']} mitoses in {summary['tissue_mm2']:.2f} mm2 "
        f"of tissue" + (f" ({per_tissue:.2f} per mm2)" if per_tissue is not None else "")
        + (f"; {outside} accepted outside the tissue mask, not counted" if outside else ""),
    ]
    qc = summary.get("qc")
    if qc is not None:
        if qc["flags"]:
            lines.append(f"  qc: FLAGGED ({', '.join(qc['flags'])})")
            lines += [f"    {reason}" for reason in qc["reasons"]]
        else:
            lines.append("  qc: ok (pixel size, stain and density within the model's domain)")
    if not spot.get("fits", True):
        lines.append(f"  hotspot: {spot['note']}; {spot['count']} mitoses in "
                     f"{spot['area_mm2']:.2f} mm2 of tissue")
    elif spot.get("x_px") is not None:
        window = (f"{spot['hpf']} HPF of {spot['field_diameter_mm']:g} mm"
                  if spot.get("hpf") else "circle")
        lines.append(f"  hotspot: {spot['count']} mitoses in {spot['area_mm2']:.2f} mm2 "
                     f"({spot['per_mm2']:.2f} per mm2; {window}, radius "
                     f"{spot['radius_um']:.0f} um, centre x={spot['x_px']:.0f}, "
                     f"y={spot['y_px']:.0f} level-0 px)")
    else:
        lines.append(f"  hotspot: no accepted mitosis in tissue (count 0 in "
                     f"{spot['area_mm2']:.2f} mm2)")
    if score["score"] is None:
        lines.append(f"  Nottingham mitosis score: none ({score['reason']})")
    else:
        lines.append(f"  Nottingham mitosis score {score['score']} ({score['rule']})"
                     + (" -- FLAGGED slide, given because of --score-anyway"
                        if score.get("flagged") else ""))
    unreadable = (f", {tiles['unreadable']} UNREADABLE (results incomplete)"
                  if tiles["unreadable"] else "")
    lines.append(f"  tiles: {tiles['processed']} processed, {tiles['skipped']} skipped "
                 f"({tiles['skip_rule']}){unreadable}; {summary['seconds']:.0f} s")
    lines.append(f"  {out_dir}/: summary.json, detections.csv (every candidate; counted = "
                 f"accepted and in tissue), detections.geojson (QuPath), thumbnail.png, "
                 f"tissue_mask.png")
    return "\n".join(lines)
