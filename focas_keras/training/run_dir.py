"""Run directories: the saved config, refusing a directory that holds a different run, logs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import keras

from focas_keras.errors import InputError
from focas_keras.io import write_json_atomic
from focas_keras.runs import RUN_FILE, read_identity


def claim_run_dir(run_dir, identity: dict) -> bool:
    """Creates ``run_dir`` for a run, or accepts it when it holds the same run.

    Args:
        run_dir: the run directory.
        identity: what makes a run the same run (config, data, package); saved as run.json.

    Returns:
        True when an earlier, interrupted run of the same identity is there (resume).

    Raises:
        InputError: the directory holds another run, or files that are not a run.
    """
    run_dir = Path(run_dir)
    saved = read_identity(run_dir)
    if saved is not None:
        if saved != json.loads(json.dumps(identity)):
            differing = sorted(k for k in set(saved) | set(identity)
                               if saved.get(k) != json.loads(json.dumps(identity.get(k))))
            raise InputError("output directory holds a different run (differs in "
                             f"{', '.join(differing)}); choose another --out", run_dir)
        return True
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise InputError("output directory is not empty and holds no run.json; choose another "
                         "--out", run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_FILE, identity)
    return False


def save_model_atomic(model: keras.Model, path) -> None:
    """Saves a ``.keras`` file under a temporary name, then renames it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.keras")
    model.save(tmp)
    os.replace(tmp, path)


class CsvLog:
    """Appends one row per epoch to a CSV file (header written once)."""

    def __init__(self, path):
        self.path = Path(path)

    def append(self, row: dict) -> None:
        new = not self.path.is_file()
        with self.path.open("a", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            if new:
                writer.writeheader()
            writer.writerow(row)
