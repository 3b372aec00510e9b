"""What each step of the cohort pipeline does to one slide or one tile (no Beam here).

* :func:`plan_slide`: open the slide, check it against the model's domain, its tissue map
  and tile plan (:func:`~focas_keras.inference.engine.plan_tiles`), and what of it is done
  already (a complete directory is skipped; a journal of the same run resumes);
* :func:`read_task`: one tile's pixels (:func:`~focas_keras.inference.engine.read_tile`),
  reopening the slide and reading once more after a failed read, as ``slide`` does;
* :func:`run_batch`: both stages on a batch of tiles
  (:func:`~focas_keras.inference.engine.run_tiles`);
* :func:`finish_work`: assemble the slide's records and write its directory
  (:func:`~focas_keras.slides.run.finish_slide`, plus the journal), atomically.

The cascade comes from :func:`cascade_for`: :func:`~focas_keras.inference.load_cascade` with
the job's keyword arguments, once per process.
"""

from __future__ import annotations

import dataclasses
import threading
import time

from focas_keras.cohort import sources, store
from focas_keras.errors import InputError

_CASCADES: dict = {}
_CASCADE_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class CohortJob:
    """Everything a worker needs to run slides as ``focas-keras slide`` would (picklable).

    Attributes:
        out: the output directory (local path or URI).
        load: ``(name, value)`` pairs of :func:`~focas_keras.inference.load_cascade`'s keyword
            arguments (``det``, ``cls``, ``thresholds``, ``which``, ``tta``, settings).
        settings: the :class:`~focas_keras.slides.run.SlideSettings` (with the model's
            domain card).
        finest_mpp: the model's finest stage pixel size (um/px), for the pixel-size check;
            None: unknown (unchecked).
        mpp: level-0 pixel size override for every slide (``--mpp``), or None.
        overwrite: rerun slides whose directory is complete, or holds another run's tiles.
        batch_size: most tiles per ``RunInference`` batch.
    """

    out: str
    load: tuple
    settings: object
    finest_mpp: float | None = None
    mpp: float | None = None
    overwrite: bool = False
    batch_size: int = 1

    def __post_init__(self):
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise InputError(f"--batch-size must be an integer >= 1, got {self.batch_size!r}")

    def load_kwargs(self) -> dict:
        return dict(self.load)


def cascade_for(job: CohortJob):
    """The job's cascade, loaded once per process (thread-safe)."""
    with _CASCADE_LOCK:
        if job.load not in _CASCADES:
            from focas_keras.inference import load_cascade

            _CASCADES[job.load] = load_cascade(**job.load_kwargs())
        return _CASCADES[job.load]


@dataclasses.dataclass(frozen=True)
class TileTask:
    """One tile to run: its slide (name, source), the plan without its per-cell tables (all a
    tile needs), its cell and tissue share."""

    slide: str
    source: str
    plan: object
    cell: tuple
    share: float


@dataclasses.dataclass(frozen=True)
class SlideWork:
    """A planned slide, waiting for its tiles' records.

    Attributes:
        slide, source: its name and path/URI.
        plan: its full :class:`~focas_keras.inference.engine.TilePlan`.
        tissue: its :class:`~focas_keras.slides.tissue.TissueMap`.
        header: its journal header (:func:`~focas_keras.slides.run.journal_header`).
        records: records known at planning: the skipped tiles and those a journal of the
            same run already holds.
        seconds: time spent planning.
    """

    slide: str
    source: str
    plan: object
    tissue: object
    header: dict
    records: tuple
    seconds: float


def _same_header(lines: list[dict], header: dict) -> bool:
    import json

    from focas_keras.slides.run import Journal

    expected = json.loads(json.dumps(Journal("", header).header, sort_keys=True))
    return bool(lines) and lines[0] == expected


def plan_slide(job: CohortJob, source: str):
    """Plans one slide.

    Returns:
        ``("done", row)`` for a slide whose directory is complete for this run (its
        ``slides.csv`` row from its summary), else ``("work", SlideWork, [TileTask, ...])``
        (the tasks: tiles neither skipped nor already journaled).

    Raises:
        InputError: the slide cannot be opened, is coarser than the model (without
            ``allow_coarser``), its overview cannot be read, or its directory holds another
            run's tiles (without ``overwrite``).
    """
    from focas_keras import domain
    from focas_keras.inference.engine import plan_tiles
    from focas_keras.slides.batch import slides_row
    from focas_keras.slides.reader import SlideReadError
    from focas_keras.slides.run import journal_header
    from focas_keras.slides.tissue import tissue_map

    start = time.perf_counter()
    settings = job.settings
    with sources.open_source(source, job.mpp) as reader:
        domain.check_pixel_size(reader.mpp, job.finest_mpp, source, settings.allow_coarser)
        cascade = cascade_for(job)
        try:
            tissue = tissue_map(reader, settings.tissue_mpp, detect=settings.tissue_mask)
        except SlideReadError as error:
            raise InputError(f"cannot read the slide's overview for the tissue mask "
                             f"({error})", source) from None
        plan = plan_tiles(reader, cascade.det_mpp, cascade.cls_mpp, cascade.patch,
                          settings.tile, settings.overlap, tissue,
                          settings.min_tissue if settings.tissue_mask else 0.0)
    header = journal_header(cascade, plan, settings, cascade.model_key)
    done = {}
    if not job.overwrite:
        summary, lines = store.read_slide_state(job.out, plan.name)
        if lines and not _same_header(lines, header):
            raise InputError("holds the tiles of another run (other slide, model or tiling "
                             "settings); pass --overwrite or another --out",
                             sources.join(job.out, plan.name))
        if lines and summary is not None and summary.get("complete"):
            return "done", slides_row(summary)
        done = {tuple(r["cell"]): r for r in lines[1:] if r.get("status") == "done"}
    records = [dict(done[c]) if c in done else
               {"cell": list(c), "status": "skipped", "tissue": round(plan.tissue[c], 4)}
               for c in plan.cells if c in done or c in plan.skip]
    light = dataclasses.replace(plan, cells=(), skip={}, tissue={})
    tasks = [TileTask(plan.name, source, light, c, plan.tissue[c]) for c in plan.cells
             if c not in done and c not in plan.skip]
    work = SlideWork(plan.name, source, plan, tissue, header, tuple(records),
                     time.perf_counter() - start)
    return "work", work, tasks


def read_task(reader, task: TileTask):
    """``(pixels, region, origin, seconds)`` of a task's tile; after a failed read the slide
    is reopened (OpenSlide refuses every read of a handle after an error) and read once more.

    Raises:
        SlideReadError: the second read failed too.
    """
    from focas_keras.inference.engine import read_tile
    from focas_keras.slides.reader import SlideReadError

    start = time.perf_counter()
    try:
        pixels, region, origin = read_tile(reader, task.plan, task.cell)
    except SlideReadError:
        reader.reopen()
        pixels, region, origin = read_tile(reader, task.plan, task.cell)
    return pixels, region, origin, time.perf_counter() - start


def unreadable_record(task: TileTask, error) -> dict:
    """The journal record of a tile that could not be read (as ``slide`` writes it)."""
    return {"cell": list(task.cell), "status": "unreadable", "error": str(error)}


def run_batch(cascade, batch) -> list[tuple]:
    """Both stages on a batch of read tiles.

    Args:
        batch: ``(task, pixels, region, origin, read_seconds)`` per tile.

    Returns:
        ``(slide, (record, seconds))`` per tile, in order: its journal record (with its
        tissue share, as ``slide`` journals it) and the seconds spent reading and running it.
    """
    from focas_keras.inference.engine import run_tiles

    start = time.perf_counter()
    records = run_tiles(cascade, [(t.plan, t.cell, p, r, o) for t, p, r, o, _ in batch])
    each = (time.perf_counter() - start) / max(1, len(batch))
    out = []
    for (task, *_rest, read_seconds), record in zip(batch, records):
        record["tissue"] = round(task.share, 4)
        out.append((task.slide, (record, read_seconds + each)))
    return out


def finish_work(job: CohortJob, work: SlideWork, results) -> dict:
    """Writes one slide's directory from its records; returns its ``slides.csv`` row.

    Args:
        results: ``(record, seconds)`` of each tile that ran (``done`` or ``unreadable``).

    Raises:
        InputError: with ``on_tile_error="fail"``, a tile that could not be read; the slide
            cannot be reopened or its outputs cannot be drawn.
    """
    from focas_keras.inference.engine import assemble
    from focas_keras.slides.batch import slides_row
    from focas_keras.slides.run import JOURNAL, finish_slide

    start = time.perf_counter()
    by_cell = {tuple(r["cell"]): r for r in work.records}
    tile_seconds = 0.0
    for record, seconds in results:
        by_cell[tuple(record["cell"])] = record
        tile_seconds += seconds
    records = [by_cell[c] for c in work.plan.cells if c in by_cell]
    unreadable = {tuple(r["cell"]): r["error"] for r in records if r["status"] == "unreadable"}
    if unreadable and job.settings.on_tile_error == "fail":
        cell = min(unreadable)
        x0, y0 = work.plan.level0_origin(cell)
        raise InputError(f"tile ({cell[0]}, {cell[1]}) at x={x0}, y={y0} (level-0 px) cannot "
                         f"be read ({unreadable[cell]})", work.source)
    kept = [r for r in records if r["status"] != "unreadable"]
    cascade = cascade_for(job)
    table = assemble(cascade, work.plan, kept)

    def build(directory):
        with sources.open_source(work.source, job.mpp) as reader:
            seconds = work.seconds + tile_seconds + (time.perf_counter() - start)
            summary = finish_slide(reader, directory, job.settings, table, kept, unreadable,
                                   work.tissue, cascade, seconds)
        store.write_journal(directory / JOURNAL, work.header, records)
        return summary

    return slides_row(store.publish_slide(job.out, work.slide, build))


def cohort_job(out, det=None, cls=None, thresholds=None, *, which: str = "best", tta=None,
               settings=None, mpp: float | None = None, overwrite: bool = False,
               batch_size: int = 1, **cascade_settings) -> CohortJob:
    """A :class:`CohortJob` from ``load_cascade``'s arguments and the slide settings, checked
    before any worker starts (no model loads here).

    Args:
        out: output directory (local path or URI).
        det, cls, thresholds, which, tta, **cascade_settings: as
            :func:`~focas_keras.inference.load_cascade` takes them.
        settings: a :class:`~focas_keras.slides.run.SlideSettings` (None: the defaults); the
            model's domain card is added to it.

    Raises:
        InputError: one run only, an unknown bundled model, an unreadable thresholds file,
            a run directory that does not exist, or bad settings.
    """
    from pathlib import Path

    from focas_keras import domain
    from focas_keras.inference.loading import apply_thresholds_file, model_runs
    from focas_keras.slides.run import SlideSettings

    runs = model_runs(det, cls)
    for run, option in ((det, "--det"), (cls, "--cls")):
        if run is not None and not Path(run).is_dir():
            raise InputError(f"{option} run directory not found", run)
    if thresholds is not None:
        apply_thresholds_file(thresholds, {})  # readable and a thresholds file
    settings = SlideSettings() if settings is None else settings
    load = dict(cascade_settings, det=None if det is None else str(Path(det).resolve()),
                cls=None if cls is None else str(Path(cls).resolve()),
                thresholds=None if thresholds is None else str(Path(thresholds).resolve()),
                which=which, tta=tta)
    return CohortJob(out=str(out), load=tuple(sorted(load.items())),
                     settings=dataclasses.replace(settings, domain=domain.domain_of(runs.card)),
                     finest_mpp=domain.model_finest_mpp(runs.card, det, cls), mpp=mpp,
                     overwrite=overwrite, batch_size=batch_size)
