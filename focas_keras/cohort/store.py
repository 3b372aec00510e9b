"""A cohort's output directory: per-slide directories as ``slide`` writes them, the cohort
tables, and the reads a rerun needs; every write atomic.

Layout under ``--out`` (a local directory or a URI Beam's ``FileSystems`` can write)::

    <slide>/      detections.csv, detections.geojson, tissue_mask.png, thumbnail.png,
                  summary.json (the same files and schemas as ``focas-keras slide``) and
                  tiles.jsonl (its journal: the header says which model and settings made it)
    slides.csv    one row per slide (:data:`~focas_keras.slides.batch.SLIDE_COLUMNS`), failed
                  ones included (``status`` failed, ``reason``)
    failures.csv  the slides that could not be run: slide, path, reason

A slide's directory is built aside and renamed into place (locally), or uploaded file by
file with ``summary.json`` last (remote; its old ``summary.json`` is deleted first), so a
retried or interrupted bundle never leaves a directory that reads as complete but is not.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from focas_keras.cohort.sources import is_remote, join, local_path

SUMMARY = "summary.json"
SLIDES_TABLE = "slides.csv"
FAILURES_TABLE = "failures.csv"
FAILURE_COLUMNS = ["slide", "path", "reason"]


def read_text(path: str) -> str | None:
    """A local or remote text file's content; None where it does not exist."""
    if is_remote(path):
        from apache_beam.io.filesystems import FileSystems

        if not FileSystems.exists(path):
            return None
        with FileSystems.open(path) as handle:
            return handle.read().decode("utf-8")
    path = Path(local_path(path))
    return path.read_text(encoding="utf-8") if path.is_file() else None


def journal_lines(text: str | None) -> list[dict]:
    """The JSON lines of a journal, up to a torn or unparsable one (dropped, as ``slide``
    drops a line an interrupt tore)."""
    lines = []
    for raw in (text or "").split("\n")[:-1]:  # the part after the last newline is torn
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            break
    return lines


def read_slide_state(out: str, name: str) -> tuple[dict | None, list[dict]]:
    """(``summary.json`` of ``out/name`` or None, its journal's lines, header first)."""
    from focas_keras.slides.run import JOURNAL

    text = read_text(join(out, name, SUMMARY))
    try:
        summary = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        summary = None
    return summary, journal_lines(read_text(join(out, name, JOURNAL)))


def write_journal(path, header: dict, records) -> None:
    """A complete ``tiles.jsonl``: the header line (as :class:`~focas_keras.slides.run.
    Journal` writes it), then one line per record."""
    from focas_keras.slides.run import Journal

    lines = [Journal(path, header).header, *records]
    Path(path).write_text("".join(json.dumps(line, sort_keys=True) + "\n" for line in lines),
                          encoding="utf-8")


def publish_slide(out: str, name: str, build) -> dict:
    """Writes ``out/name`` atomically: ``build(directory)`` fills a local directory, which
    then replaces ``out/name`` (a rename locally; remote: uploaded, ``summary.json`` last).

    Returns:
        What ``build`` returned.
    """
    from focas_keras.io import atomic_output_dir

    if not is_remote(out):
        with atomic_output_dir(join(out, name), overwrite=True) as directory:
            return build(Path(directory))
    with tempfile.TemporaryDirectory(prefix="focas-keras-cohort-out-") as directory:
        result = build(Path(directory))
        _upload(Path(directory), join(out, name))
        return result


def _upload(directory: Path, target: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    summary = join(target, SUMMARY)
    if FileSystems.exists(summary):
        FileSystems.delete([summary])  # the directory reads as incomplete until the end
    names = sorted(p.name for p in directory.iterdir() if p.is_file())
    for file_name in sorted(names, key=lambda n: n == SUMMARY):
        _put(directory / file_name, join(target, file_name))


def _put(source: Path, target: str) -> None:
    from apache_beam.io.filesystems import FileSystems

    partial = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    with open(source, "rb") as local, FileSystems.create(partial) as remote:
        shutil.copyfileobj(local, remote, 1 << 22)
    if FileSystems.exists(target):
        FileSystems.delete([target])
    FileSystems.rename([partial], [target])


def write_tables(out: str, rows: list[dict]) -> None:
    """``slides.csv`` (every row) and ``failures.csv`` (the failed ones) under ``out``."""
    import pandas as pd

    from focas_keras.slides.batch import SLIDE_COLUMNS

    failed = [r for r in rows if r.get("status") == "failed"]
    tables = {SLIDES_TABLE: pd.DataFrame(rows, columns=SLIDE_COLUMNS),
              FAILURES_TABLE: pd.DataFrame(failed, columns=FAILURE_COLUMNS)}
    for file_name, table in tables.items():
        text = table.to_csv(index=False, lineterminator="\n")
        if is_remote(out):
            with tempfile.TemporaryDirectory() as directory:
                path = Path(directory, file_name)
                path.write_text(text, encoding="utf-8")
                _put(path, join(out, file_name))
        else:
            path = Path(local_path(out), file_name)
            partial = path.with_name(f".{file_name}.tmp-{os.getpid()}")
            partial.write_text(text, encoding="utf-8")
            os.replace(partial, path)
