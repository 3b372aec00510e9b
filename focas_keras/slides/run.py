"""The cascade over one whole slide, tile by tile, resumable; :func:`run_slides` for several.

Stage 1 tiles the slide in Mdet's pixels with the very :class:`~focas_keras.inference.tiling.
TileGrid` that ``detect --tile`` uses (origins, centre ownership, mirrored padding where the
slide is shorter than a tile) and merges the tiles' owned candidates with the same
:func:`~focas_keras.inference.tiling.merge_candidates` (clip, threshold, class-agnostic NMS,
cap). Each stage reads the pyramid level nearest to its own pixel size without going coarser
(:meth:`SlideReader.level_for_mpp`) and resizes the rest as ``detect`` does (area shrink;
bilinear where the slide is coarser than the stage). Stage 2's crops come from a region of that
level around the tile's candidates, reflect-padded only at the slide's edge, as ``detect``
pads at an image's edge.

Tiles whose footprint holds less than ``min_tissue`` of tissue (by the low-resolution mask)
are skipped. Reading runs ahead of computing in a small thread pool (OpenSlide releases the
GIL), and each finished tile is appended to ``tiles.jsonl`` in the slide's output directory
(one JSON line, flushed and fsynced) before the next starts. Memory is one tile's pixels plus
the candidates' coordinates, whatever the slide's size. A rerun after Ctrl-C or a crash reads
the journal, drops a torn last line, skips the finished tiles and retries the unreadable ones;
the final files come from the journal alone, so they equal an uninterrupted run's.

A tile OpenSlide cannot read is retried once after reopening the slide (OpenSlide refuses
every read of a handle after an error; the reads in flight are redone), then reported with its
position and, by default, counted as
``unreadable`` while the slide goes on (``summary.json`` then says ``complete: false``);
``on_tile_error="fail"`` stops the slide instead (the journal keeps the finished tiles).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from focas_keras.errors import InputError
from focas_keras.inference.tiling import TileGrid, merge_candidates, pad_to_tile
from focas_keras.slides import hotspot as hs

JOURNAL = "tiles.jsonl"
JOURNAL_VERSION = 1
#: The files a finished slide directory holds (``summary.json`` is written last).
OUTPUT_FILES = ("detections.csv", "detections.geojson", "tissue_mask.png", "thumbnail.png",
                "summary.json")
#: Columns of ``slides.csv`` (one row per slide).


@dataclasses.dataclass(frozen=True)
class SlideSettings:
    """How ``focas-keras slide`` runs; validated on construction (:class:`InputError`).

    Attributes:
        tile: stage-1 tile side in Mdet's pixels (multiple of 32).
        overlap: overlap of neighbouring tiles (px, < ``tile``).
        tissue_mask: skip tiles by the tissue mask (False: run everywhere).
        min_tissue: least share of a tile's footprint on tissue for it to run.
        tissue_mpp: pixel size of the thumbnail the mask is computed on (um/px).
        hotspot_mm2: area of the hotspot window (a circle), mm2; replaced by ``hpf`` fields of
            ``field_diameter_mm`` where those are given.
        hpf, field_diameter_mm: the hotspot as ``hpf`` microscope fields of this diameter.
        on_tile_error: ``continue`` (count the tile as unreadable, go on) or ``fail``.
        prefetch: tiles read ahead of the one computing.
        allow_coarser: the caller allowed a slide coarser than the model (flagged either way).
        score_anyway: give the Nottingham score of a flagged slide (default: withheld).
        domain: the model's :class:`~focas_keras.domain.DomainCard` (None: stain unchecked).
    """

    tile: int = 1024
    overlap: int = 64
    tissue_mask: bool = True
    min_tissue: float = 0.01
    tissue_mpp: float = 8.0
    hotspot_mm2: float = 2.0
    hpf: int | None = None
    field_diameter_mm: float | None = None
    on_tile_error: str = "continue"
    prefetch: int = 4
    allow_coarser: bool = False
    score_anyway: bool = False
    domain: object = None

    def __post_init__(self):
        def finite(v, low=0.0):
            return isinstance(v, (int, float)) and math.isfinite(v) and v > low

        checks = [
            ("--tile", self.tile, isinstance(self.tile, int) and self.tile >= 64
             and self.tile % 32 == 0, "a multiple of 32, at least 64"),
            ("--overlap", self.overlap, isinstance(self.overlap, int)
             and 0 <= self.overlap < self.tile, "an integer >= 0 below the tile"),
            ("--min-tissue", self.min_tissue, isinstance(self.min_tissue, (int, float))
             and 0.0 <= self.min_tissue <= 1.0, "a share in [0, 1]"),
            ("--tissue-mpp", self.tissue_mpp, finite(self.tissue_mpp), "> 0 um/px"),
            ("--hotspot-mm2", self.hotspot_mm2, finite(self.hotspot_mm2), "> 0 mm2"),
            ("--on-tile-error", self.on_tile_error, self.on_tile_error in ("continue", "fail"),
             "continue or fail"),
            ("prefetch", self.prefetch, isinstance(self.prefetch, int) and self.prefetch >= 1,
             ">= 1"),
        ]
        for name, value, ok, what in checks:
            if not ok:
                raise InputError(f"{name} must be {what}, got {value!r}")
        if (self.hpf is None) != (self.field_diameter_mm is None):
            raise InputError("give --hpf and --field-diameter-mm together")
        if self.hpf is not None and not (isinstance(self.hpf, int) and self.hpf >= 1
                                         and finite(self.field_diameter_mm)):
            raise InputError(f"--hpf must be >= 1 and --field-diameter-mm > 0, got "
                             f"{self.hpf!r}, {self.field_diameter_mm!r}")

    @property
    def hotspot_area_mm2(self) -> float:
        """The hotspot window's area, mm2."""
        if self.hpf is not None:
            return hs.hpf_area_mm2(self.hpf, self.field_diameter_mm)
        return float(self.hotspot_mm2)


@dataclasses.dataclass(frozen=True)
class StageView:
    """One stage's view of a slide: the level it reads and the slide's size in its pixels.

    Attributes:
        mpp: the stage's pixel size, um/px.
        level: the pyramid level read; level_mpp its pixel size.
        width, height: the slide in the stage's pixels (as ``detect`` would resize it).
    """

    mpp: float
    level: int
    level_mpp: float
    width: int
    height: int

    @classmethod
    def of(cls, reader, stage_mpp: float) -> StageView:
        from focas_keras.inference.resize import scaled_size

        level = reader.level_for_mpp(stage_mpp)
        height, width = scaled_size(reader.height, reader.width, reader.mpp / stage_mpp)
        return cls(float(stage_mpp), level, reader.level_mpp(level), width, height)

    def read(self, reader, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """The stage-pixel rectangle ``[x0, x0 + width) x [y0, y0 + height)`` (inside the slide)
        as uint8 (height, width, 3): read from :attr:`level`, resized to the stage's pixels."""
        from focas_keras.inference.resize import resize_to

        level_w, level_h = reader.level_dimensions[self.level]
        down = reader.level_downsamples[self.level]
        # stage px -> level px along each axis, with the slide's exact side ratios
        fx, fy = level_w / self.width, level_h / self.height
        lx0, ly0 = int(round(x0 * fx)), int(round(y0 * fy))
        lx1 = min(level_w, max(lx0 + 1, int(round((x0 + width) * fx))))
        ly1 = min(level_h, max(ly0 + 1, int(round((y0 + height) * fy))))
        region = reader.read(int(round(lx0 * down)), int(round(ly0 * down)), lx1 - lx0,
                             ly1 - ly0, self.level)
        return resize_to(region, height, width)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class Journal:
    """``tiles.jsonl``: a header line, then one line per finished tile.

    Args:
        path: the journal file.
        header: what the tiles depend on (slide, pixel sizes, model, stage-1 settings); a
            journal with another header belongs to another run.
    """

    def __init__(self, path: Path, header: dict):
        self.path = Path(path)
        self.header = dict(header, journal=JOURNAL_VERSION)

    def load(self, overwrite: bool = False) -> dict:
        """The finished tiles' records ``{(row, col): record}`` (unreadable ones excluded, so
        they are retried); starts a new journal where there is none (or ``overwrite``).

        Raises:
            InputError: the journal was written by another run (other model, settings or
                slide) and ``overwrite`` is not set.
        """
        records = {}
        if self.path.exists() and not overwrite:
            good_bytes, lines = 0, []
            with open(self.path, "rb") as handle:
                for raw in handle:
                    if not raw.endswith(b"\n"):
                        break  # torn by an interrupt: dropped
                    try:
                        lines.append(json.loads(raw))
                    except json.JSONDecodeError:
                        break
                    good_bytes += len(raw)
            if lines and lines[0] != self.header:
                raise InputError("holds the tiles of another run (other slide, model or "
                                 "tiling settings); pass --overwrite or another --out",
                                 self.path.parent)
            if lines:
                with open(self.path, "r+b") as handle:
                    handle.truncate(good_bytes)
                for record in lines[1:]:
                    if record.get("status") in ("done", "skipped"):
                        records[tuple(record["cell"])] = record
                return records
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as handle:
            handle.write(json.dumps(self.header, sort_keys=True) + "\n")
        return records

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _read_tile(reader, det: StageView, cls: StageView, grid: TileGrid, cell, patch: int):
    """Stage 1's tile (uint8 (tile, tile, 3)) and stage 2's region around it (uint8, with its
    stage-2 origin): what a prefetch thread reads."""
    tile = grid.tile
    x0, y0 = grid.origin(cell)
    width, height = min(tile, det.width - x0), min(tile, det.height - y0)
    pixels = det.read(reader, x0, y0, width, height)
    if (height, width) != (tile, tile):  # a slide side shorter than a tile: mirrored
        pixels = pad_to_tile(pixels, tile)
    # Stage 2: the tile's footprint in its pixels plus half a crop, clipped to the slide.
    sx, sy = cls.width / det.width, cls.height / det.height
    margin = patch // 2 + 2
    cx0 = max(0, int(math.floor(x0 * sx)) - margin)
    cy0 = max(0, int(math.floor(y0 * sy)) - margin)
    cx1 = min(cls.width, int(math.ceil((x0 + width) * sx)) + margin)
    cy1 = min(cls.height, int(math.ceil((y0 + height) * sy)) + margin)
    region = cls.read(reader, cx0, cy0, cx1 - cx0, cy1 - cy0)
    return pixels, region, (cx0, cy0)


def _tile_record(cascade, reader, det, cls, grid, cell, pixels, region, origin) -> dict:
    """Both stages on one tile: its owned candidates in level-0 px with their scores."""
    tile_cap = cascade.candidate_cap(grid.tile, grid.tile)
    batch = pixels[None].astype(np.float32) / 255.0
    boxes, scores, full = cascade._detect_capped(batch, tile_cap, grid.valid)[0]
    boxes, scores = grid.keep(cell, boxes, scores)
    keep = scores >= cascade.det_threshold
    boxes, scores = boxes[keep], scores[keep]
    sx, sy = cls.width / det.width, cls.height / det.height
    cls_boxes = boxes.astype(np.float64) * np.array([sx, sy, sx, sy])
    cls_boxes -= np.array([origin[0], origin[1], origin[0], origin[1]], np.float64)
    cls_scores = (cascade._stage2_model(region, cls_boxes) if len(boxes)
                  else np.zeros((0,), np.float32))
    to0 = np.array([reader.width / det.width, reader.height / det.height] * 2)
    boxes0 = boxes.astype(np.float64) * to0
    return {"cell": list(cell), "status": "done", "at_cap": bool(full),
            "boxes": [[float(v) for v in b] for b in boxes0],
            "det": [float(v) for v in scores], "cls": [float(v) for v in cls_scores]}


def _assemble(cascade, reader, det: StageView, records) -> pd.DataFrame:
    """The slide's candidates from its tiles' records: :func:`merge_candidates` in level-0 px,
    then acceptance and the point merge, as :meth:`Cascade.run` does."""
    from focas_keras.inference.cascade import RESULT_COLUMNS, merge_points

    found, cls_all = [], []
    for record in records:
        if record.get("status") != "done":
            continue
        found.append((np.asarray(record["boxes"], np.float32).reshape(-1, 4),
                      np.asarray(record["det"], np.float32)))
        cls_all.append(np.asarray(record["cls"], np.float64))
    cap = cascade.candidate_cap(det.height, det.width)
    boxes, det_scores, _, index = merge_candidates(
        found, reader.height, reader.width, cascade.det_threshold, cascade.nms_iou, cap)
    cls_scores = np.concatenate(cls_all + [np.zeros((0,))])[index]
    order = np.argsort(-det_scores, kind="stable")
    boxes = boxes[order].astype(np.float64)
    det_scores, cls_scores = det_scores[order], cls_scores[order]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    # merge_px is in the cascade's input pixels (settings.mpp): the same distance in um
    radius = cascade.settings.merge_px * cascade.settings.mpp / reader.mpp
    accepted = merge_points(centres, cls_scores, cls_scores >= cascade.cls_threshold, radius)
    return pd.DataFrame({
        "x": centres[:, 0], "y": centres[:, 1], "x1": boxes[:, 0], "y1": boxes[:, 1],
        "x2": boxes[:, 2], "y2": boxes[:, 3], "det_score": det_scores.astype(np.float64),
        "cls_score": cls_scores, "accepted": accepted}, columns=RESULT_COLUMNS)


def run_slide(cascade, reader, out_dir, settings: SlideSettings = SlideSettings(),
              model: dict | None = None, progress: bool = True, overwrite: bool = False,
              warn=None, _after_tile=None) -> dict:
    """The cascade on one slide; writes :data:`OUTPUT_FILES` into ``out_dir``.

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade` (its stage pixel sizes,
            thresholds, NMS, cap, crop size, TTA and merge radius are used).
        reader: an open :class:`~focas_keras.slides.reader.SlideReader`.
        out_dir: the slide's output directory (created; ``tiles.jsonl`` resumes a run).
        settings: tiling, tissue and hotspot settings.
        model: what identifies the models (part of the journal's header).
        progress: a tqdm bar over tiles on stderr.
        overwrite: discard a journal of another run instead of refusing it.
        warn: callable for warnings (default: stderr).
        _after_tile: test hook called with the number of tiles finished in this call.

    Returns:
        The summary (also ``summary.json``).

    Raises:
        InputError: a journal of another run, or (``on_tile_error="fail"``) a tile that
            cannot be read.
    """
    from tqdm import tqdm

    from focas_keras.slides.reader import SlideReadError
    from focas_keras.slides.tissue import tissue_map

    warn = warn or _stderr
    start = time.perf_counter()
    out_dir = Path(out_dir)
    det, cls = StageView.of(reader, cascade.det_mpp), StageView.of(reader, cascade.cls_mpp)
    grid = TileGrid(det.height, det.width, settings.tile, settings.overlap)
    try:
        tissue = tissue_map(reader, settings.tissue_mpp, detect=settings.tissue_mask)
    except SlideReadError as error:
        raise InputError(f"cannot read the slide's overview for the tissue mask ({error})",
                         reader.path) from None
    header = {"slide": {"name": reader.name, "size": [reader.width, reader.height],
                        "mpp": reader.mpp},
              "det": dataclasses.asdict(det), "cls": dataclasses.asdict(cls),
              "tile": settings.tile, "overlap": settings.overlap,
              "tissue": [settings.tissue_mask, settings.min_tissue, settings.tissue_mpp],
              "stage1": {"det_threshold": cascade.det_threshold, "nms_iou": cascade.nms_iou,
                         "per_mm2": cascade.settings.max_candidates_per_mm2},
              "stage2": {"patch": cascade.patch, "tta": bool(cascade.settings.tta)},
              "model": _key(model or {})}
    journal = Journal(out_dir / JOURNAL, header)
    done = journal.load(overwrite=overwrite)
    to0 = (reader.width / det.width, reader.height / det.height)

    def footprint_tissue(cell) -> float:
        x0, y0 = grid.origin(cell)
        x1, y1 = min(x0 + grid.tile, det.width), min(y0 + grid.tile, det.height)
        return tissue.fraction(x0 * to0[0], y0 * to0[1], x1 * to0[0], y1 * to0[1])

    cells = grid.cells()
    todo = [c for c in cells if c not in done]
    failed = {}
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc=reader.name,
               unit="tile", disable=not progress, dynamic_ncols=True)
    finished = 0
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            queue = collections.deque()
            pending = iter(todo)

            def submit() -> None:
                for cell in pending:
                    share = footprint_tissue(cell)
                    if settings.tissue_mask and share < settings.min_tissue:
                        queue.append((cell, share, None))
                    else:
                        queue.append((cell, share, pool.submit(
                            _read_tile, reader, det, cls, grid, cell, cascade.patch)))
                        return

            def recover(entries):
                """OpenSlide refuses every read after an error: let the reads in flight end,
                reopen the slide, and read again those that failed."""
                for entry in entries:
                    if entry[2] is not None:
                        entry[2].exception()
                reader.reopen()
                return collections.deque(
                    (c, sh, f if f is None or f.exception() is None else
                     pool.submit(_read_tile, reader, det, cls, grid, c, cascade.patch))
                    for c, sh, f in entries)

            for _ in range(settings.prefetch):
                submit()
            while queue:
                cell, share, future = queue.popleft()
                if future is None:
                    record = {"cell": list(cell), "status": "skipped",
                              "tissue": round(share, 4)}
                else:
                    submit()
                    try:
                        try:
                            pixels, region, origin = future.result()
                        except SlideReadError:
                            queue = recover(queue)
                            pixels, region, origin = _read_tile(reader, det, cls, grid, cell,
                                                                cascade.patch)
                    except SlideReadError as error:
                        queue = recover(queue)
                        x0, y0 = grid.origin(cell)
                        where = (f"tile ({cell[0]}, {cell[1]}) at x={round(x0 * to0[0])}, "
                                 f"y={round(y0 * to0[1])} (level-0 px)")
                        if settings.on_tile_error == "fail":
                            raise InputError(f"{where} cannot be read ({error}); the "
                                             "finished tiles are kept for a rerun",
                                             reader.path) from None
                        warn(f"{reader.path}: {where} cannot be read, counted as unreadable; "
                             f"the slide goes on ({error})")
                        failed[cell] = str(error)
                        record = {"cell": list(cell), "status": "unreadable",
                                  "error": str(error)}
                    else:
                        record = _tile_record(cascade, reader, det, cls, grid, cell, pixels,
                                              region, origin)
                        record["tissue"] = round(share, 4)
                journal.append(record)
                if record["status"] != "unreadable":
                    done[cell] = record
                bar.update(1)
                finished += 1
                if _after_tile is not None:
                    _after_tile(finished)
    finally:
        bar.close()
    records = [done[c] for c in cells if c in done]
    table = _assemble(cascade, reader, det, records)
    seconds = time.perf_counter() - start
    return _finish(reader, out_dir, settings, table, records, failed, tissue, cascade,
                   seconds)


def _finish(reader, out_dir, settings, table, records, failed, tissue, cascade,
            seconds) -> dict:
    """Counting, hotspot, domain checks, score, and every output file of one slide
    (summary.json last).

    One rule: only accepted detections inside the tissue mask are counted (the slide's
    mitoses, per mm2 of tissue, and the hotspot); the others stay in ``detections.csv`` with
    ``in_tissue`` false. Where the tissue is smaller than the window, the count is over all
    tissue and there is no score; a flagged slide (``summary["qc"]``) gets no score unless
    ``settings.score_anyway``.
    """
    from focas_keras import domain
    from focas_keras.slides import report

    table = table.assign(in_tissue=tissue.contains(table[["x", "y"]].to_numpy(np.float64)))
    table["counted"] = table["accepted"].astype(bool) & table["in_tissue"]
    counted = table[table["counted"]]
    points_um = counted[["x", "y"]].to_numpy(np.float64) * reader.mpp
    area = settings.hotspot_area_mm2
    tissue_mm2 = tissue.area_mm2(reader.mpp)
    n_counted = int(len(counted))

    def in_tissue(centres_um):
        return tissue.contains(np.asarray(centres_um, np.float64) / reader.mpp)

    spot = (hs.find_hotspot(points_um, hs.circle_radius_um(area), in_tissue)
            if len(points_um) and tissue_mm2 >= area else None)
    hotspot = report.hotspot_summary(spot, reader.mpp, (reader.width, reader.height), area,
                                     tissue_mm2, n_counted)
    hotspot.update(hpf=settings.hpf, field_diameter_mm=settings.field_diameter_mm)
    qc = domain.slide_qc(reader, tissue, settings.domain,
                         min(cascade.det_mpp, cascade.cls_mpp), n_counted, tissue_mm2, hotspot)
    statuses = collections.Counter(r["status"] for r in records)
    summary = {
        "slide": reader.name, "path": str(reader.path), "vendor": reader.vendor,
        "size_px": [reader.width, reader.height], "mpp": reader.mpp,
        "mpp_source": reader.mpp_source,
        "levels": {"det": {"mpp": cascade.det_mpp, "level": reader.level_for_mpp(
                       cascade.det_mpp)},
                   "cls": {"mpp": cascade.cls_mpp, "level": reader.level_for_mpp(
                       cascade.cls_mpp)}},
        "mitoses": n_counted, "candidates": int(len(table)),
        "accepted_outside_tissue": int(table["accepted"].astype(bool).sum()) - n_counted,
        "counted_in": ("tissue mask" if settings.tissue_mask
                       else "whole slide (--no-tissue-mask)"),
        "tissue_mm2": round(tissue_mm2, 4),
        "per_mm2_tissue": round(n_counted / tissue_mm2, 4) if tissue_mm2 > 0 else None,
        "hotspot": hotspot,
        "score": report.score_entry(hotspot, qc, settings.score_anyway),
        "qc": qc,
        "tiles": {"total": len(records) + len(failed),
                  "processed": statuses.get("done", 0),
                  "skipped": statuses.get("skipped", 0), "unreadable": len(failed),
                  "unreadable_cells": [list(c) for c in sorted(failed)],
                  "at_cap": sum(bool(r.get("at_cap")) for r in records),
                  "skip_rule": (f"tissue < {settings.min_tissue:g} of the tile's footprint"
                                if settings.tissue_mask else "none (--no-tissue-mask)")},
        "complete": not failed,
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k != "domain"},
        "thresholds": {"det": cascade.det_threshold, "cls": cascade.cls_threshold,
                       "tta": bool(cascade.settings.tta),
                       "merge_um": cascade.settings.merge_px * cascade.settings.mpp},
        "seconds": round(seconds, 1),
    }
    report.write_slide_outputs(out_dir, reader, table, summary, spot, tissue)
    return summary


def _stderr(message: str) -> None:
    import sys

    from tqdm import tqdm

    with tqdm.external_write_mode():
        print(f"focas-keras: warning: {message}", file=sys.stderr)


# The batch over several slides lives in batch.py (kept here under its old names).
from focas_keras.slides.batch import (  # noqa: E402,F401
    SLIDE_COLUMNS, failed_row, open_slides, run_slides, slides_row)
