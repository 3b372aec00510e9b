"""``slide`` over several slides: open them all first, run each under the output directory's
lock, and keep one ``slides.csv`` row per slide, failed ones included.

A slide that cannot be opened, or fails while it runs (its overview cannot be read, its
directory holds another run's journal, a tile cannot be read with ``on_tile_error="fail"``),
is recorded in ``slides.csv`` with ``status`` ``failed`` and its ``reason``, and the next one
runs; the caller learns which from the ``failed`` list. With ``failed=None`` the first error
stops the batch instead (the library default).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from focas_keras.errors import InputError

#: ``status``: ``done`` (``complete`` False where tiles were unreadable) or ``failed`` (then
#: ``reason`` says why and the counts are empty).
SLIDE_COLUMNS = ["slide", "path", "status", "reason", "mpp", "tissue_mm2", "mitoses",
                 "per_mm2_tissue", "hotspot_count", "hotspot_mm2", "hotspot_per_mm2",
                 "hotspot_x", "hotspot_y", "score", "field_diameter_mm", "tiles_processed", "tiles_skipped",
                 "tiles_unreadable", "complete", "seconds", "qc"]


def slides_row(summary: dict) -> dict:
    """One ``slides.csv`` row of a slide's summary."""
    spot, tiles = summary["hotspot"], summary["tiles"]
    return {"slide": summary["slide"], "path": summary["path"], "status": "done",
            "reason": "", "mpp": summary["mpp"],
            "tissue_mm2": summary["tissue_mm2"], "mitoses": summary["mitoses"],
            "per_mm2_tissue": summary["per_mm2_tissue"], "hotspot_count": spot["count"],
            "hotspot_mm2": round(spot["area_mm2"], 4),
            "hotspot_per_mm2": round(spot["per_mm2"], 4),
            "hotspot_x": spot.get("x_px"), "hotspot_y": spot.get("y_px"),
            "score": summary["score"]["score"],
            "field_diameter_mm": spot.get("field_diameter_mm"),
            "tiles_processed": tiles["processed"], "tiles_skipped": tiles["skipped"],
            "tiles_unreadable": tiles["unreadable"], "complete": summary["complete"],
            "seconds": summary["seconds"], "qc": ";".join(summary["qc"]["flags"]) or "ok"}


def failed_row(path, reason: str) -> dict:
    """The ``slides.csv`` row of a slide that could not be run (``status`` ``failed``)."""
    return {"slide": Path(path).stem, "path": str(path), "status": "failed",
            "reason": reason}


def open_slides(paths, mpp: float | None = None, failed: list | None = None) -> list:
    """Opens every slide before any runs, so a bad file fails before any model loads.

    Args:
        paths: slide or image files.
        mpp: the ``--mpp`` override (None: each slide's own).
        failed: None: a bad file raises. A list: each bad file is appended as its
            :func:`failed_row` and the others are opened; where none can be opened, the
            first error is raised all the same.

    Raises:
        InputError: a path that is not a readable slide or image, no pixel size, or two
            slides with the same file stem (the stem names the output directory).
    """
    from focas_keras.slides.reader import SlideReader

    readers, seen, first = [], {}, None
    try:
        for path in paths:
            try:
                reader = SlideReader.open(path, mpp=mpp)
            except InputError as error:
                if failed is None:
                    raise
                first = first or error
                failed.append(failed_row(path, str(error).removeprefix(f"{path}: ")))
                continue
            readers.append(reader)
            if reader.name in seen:
                raise InputError(f"two slides named '{reader.name}' (also {seen[reader.name]})",
                                 path)
            seen[reader.name] = path
        if first is not None and not readers:
            raise first
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def run_slides(cascade, slides, out_dir, settings=None,
               mpp: float | None = None, model: dict | None = None, progress: bool = True,
               overwrite: bool = False, warn=None, echo=None, failed: list | None = None,
               locked: bool = False) -> list[dict]:
    """:func:`run_slide` on several slides: ``out_dir/<slide>/`` each and ``out_dir/slides.csv``
    (rewritten after each slide), under ``out_dir``'s lock (:mod:`focas_keras.slides.lock`).

    Args:
        settings: a :class:`~focas_keras.slides.run.SlideSettings` (None: the defaults).
        slides: paths (opened with :func:`open_slides` and ``mpp``, closed at the end), or
            the readers :func:`open_slides` returned (closed at the end too).
        echo: callable given each slide's printed summary (:func:`report.summary_text`).
        failed: None: a slide that fails stops the run (its error is raised). A list: the
            slides already set aside (:func:`open_slides`' ``failed`` rows); a slide that
            fails while it runs (a bad input, an unreadable overview, a journal of another
            run) is added to it with its reason and the next one runs. Every failed slide has
            a ``slides.csv`` row with ``status`` ``failed``.
        locked: the caller already holds ``out_dir``'s lock.

    Returns:
        The summaries of the slides that finished, in the order given.

    Raises:
        InputError: another run holds ``out_dir``; without ``failed``, any slide's error.
    """
    from focas_keras.slides import report
    from focas_keras.slides.lock import out_dir_lock
    from focas_keras.slides.reader import SlideReader, SlideReadError
    from focas_keras.slides.run import SlideSettings, _stderr, run_slide

    settings = SlideSettings() if settings is None else settings
    slides = list(slides)
    readers = (slides if slides and all(isinstance(s, SlideReader) for s in slides)
               else open_slides(slides, mpp, failed))
    out_dir = Path(out_dir)
    summaries, rows = [], [dict(row) for row in (failed or [])]
    try:
        with (contextlib.nullcontext() if locked else out_dir_lock(out_dir, warn or _stderr)):
            if rows:
                report.write_slides_csv(out_dir / "slides.csv", rows, SLIDE_COLUMNS)
            for reader in readers:
                try:
                    summary = run_slide(cascade, reader, out_dir / reader.name, settings,
                                        model=model, progress=progress, overwrite=overwrite,
                                        warn=warn)
                except (InputError, SlideReadError) as error:
                    if failed is None and isinstance(error, InputError):
                        raise
                    if failed is None:  # e.g. the thumbnail of the outputs: one line, exit 2
                        raise InputError(f"cannot be read ({error})", reader.path) from None
                    row = failed_row(reader.path, str(error).removeprefix(f"{reader.path}: "))
                    failed.append(row)
                    rows.append(row)
                    (warn or _stderr)(f"{reader.path}: failed, the next slide runs "
                                      f"({row['reason']})")
                else:
                    summaries.append(summary)
                    rows.append(slides_row(summary))
                    if echo is not None:
                        echo(report.summary_text(summary, out_dir / reader.name))
                report.write_slides_csv(out_dir / "slides.csv", rows, SLIDE_COLUMNS)
    finally:
        for reader in readers:
            reader.close()
    return summaries
