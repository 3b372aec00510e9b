"""The cascade over one whole slide, tile by tile, resumable; :func:`run_slides` for several.

The tiles are planned, read, run and assembled by the engine
(:mod:`focas_keras.inference.engine`: :func:`plan_tiles`, :func:`read_tile`, :func:`run_tile`,
:func:`assemble`); this module adds the journal, the read-ahead, retries, per-tile failures
and the slide's outputs (:func:`finish_slide`).

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

from focas_keras.errors import InputError
from focas_keras.inference.engine import TilePlan, assemble, plan_tiles, read_tile, run_tile
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
    try:
        tissue = tissue_map(reader, settings.tissue_mpp, detect=settings.tissue_mask)
    except SlideReadError as error:
        raise InputError(f"cannot read the slide's overview for the tissue mask ({error})",
                         reader.path) from None
    plan = plan_tiles(reader, cascade.det_mpp, cascade.cls_mpp, cascade.patch, settings.tile,
                      settings.overlap, tissue,
                      settings.min_tissue if settings.tissue_mask else 0.0)
    journal = Journal(out_dir / JOURNAL, journal_header(cascade, plan, settings, model))
    done = journal.load(overwrite=overwrite)
    todo = [c for c in plan.cells if c not in done]
    failed = {}
    bar = tqdm(total=len(plan.cells), initial=len(plan.cells) - len(todo), desc=reader.name,
               unit="tile", disable=not progress, dynamic_ncols=True)
    finished = 0
    try:
        with ThreadPoolExecutor(max_workers=2) as pool:
            queue = collections.deque()
            pending = iter(todo)

            def submit() -> None:
                for cell in pending:
                    if cell in plan.skip:
                        queue.append((cell, None))
                    else:
                        queue.append((cell, pool.submit(read_tile, reader, plan, cell)))
                        return

            def recover(entries):
                """OpenSlide refuses every read after an error: let the reads in flight end,
                reopen the slide, and read again those that failed."""
                for entry in entries:
                    if entry[1] is not None:
                        entry[1].exception()
                reader.reopen()
                return collections.deque(
                    (c, f if f is None or f.exception() is None else
                     pool.submit(read_tile, reader, plan, c))
                    for c, f in entries)

            for _ in range(settings.prefetch):
                submit()
            while queue:
                cell, future = queue.popleft()
                share = plan.tissue[cell]
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
                            pixels, region, origin = read_tile(reader, plan, cell)
                    except SlideReadError as error:
                        queue = recover(queue)
                        x0, y0 = plan.level0_origin(cell)
                        where = (f"tile ({cell[0]}, {cell[1]}) at x={x0}, y={y0} (level-0 px)")
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
                        record = run_tile(cascade, plan, cell, pixels, region, origin)
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
    records = [done[c] for c in plan.cells if c in done]
    table = assemble(cascade, plan, records)
    seconds = time.perf_counter() - start
    return finish_slide(reader, out_dir, settings, table, records, failed, tissue, cascade,
                        seconds)


def journal_header(cascade, plan: TilePlan, settings: SlideSettings,
                   model: dict | None = None) -> dict:
    """What a slide's tiles depend on (the slide, each stage's view, the tiling, tissue and
    stage settings, the models' key): the first line of its journal; a journal with another
    header belongs to another run."""
    return {"slide": {"name": plan.name, "size": list(plan.size), "mpp": plan.mpp},
            "det": dataclasses.asdict(plan.det), "cls": dataclasses.asdict(plan.cls),
            "tile": settings.tile, "overlap": settings.overlap,
            "tissue": [settings.tissue_mask, settings.min_tissue, settings.tissue_mpp],
            "stage1": {"det_threshold": cascade.det_threshold, "nms_iou": cascade.nms_iou,
                       "per_mm2": cascade.settings.max_candidates_per_mm2},
            "stage2": {"patch": cascade.patch, "tta": bool(cascade.settings.tta)},
            "model": _key(model or {})}


def finish_slide(reader, out_dir, settings, table, records, failed, tissue, cascade,
                 seconds) -> dict:
    """Counting, hotspot, domain checks, score, and every output file of one slide
    (summary.json last); returns the summary.

    Args:
        reader: the open slide (:class:`~focas_keras.slides.reader.SlideReader`).
        out_dir: the slide's output directory.
        settings: the :class:`SlideSettings`.
        table: :func:`~focas_keras.inference.engine.assemble`'s table (level-0 px).
        records: every tile's record (``done`` or ``skipped``; unreadable ones are in
            ``failed``).
        failed: ``{cell: error}`` of the tiles that could not be read.
        tissue: the slide's :class:`~focas_keras.slides.tissue.TissueMap`.
        cascade: the cascade that ran (its pixel sizes and thresholds are reported).
        seconds: the slide's wall time.

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
