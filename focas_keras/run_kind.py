"""Which command made a directory: a ``train-det`` run, a ``train-cls`` run, or shards.

Commands that take a run (``--det``, ``--cls``) check its kind first, so a run of the other
kind (say ``--det`` and ``--cls`` swapped) is named as such instead of failing later on a
config that does not fit.
"""

from __future__ import annotations

import json
from pathlib import Path

from focas_keras.errors import InputError

MDET, MCLASS, SHARDS = "mdet", "mclass", "shards"
#: The command that makes each kind of directory.
MADE_BY = {MDET: "train-det run", MCLASS: "train-cls run", SHARDS: "shard directory (from "
                                                                      "prepare)"}
#: Top-level keys only one of the two model configs has (``config.json``).
_CONFIG_KEYS = {MDET: {"backbone", "fpn", "head", "inference"}, MCLASS: {"model"}}


def _json_object(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def run_kind(run_dir) -> str | None:
    """The kind of a directory: :data:`MDET`, :data:`MCLASS` or :data:`SHARDS`, else None.

    A run's ``run.json`` names its kind (``"kind": "mdet"`` or ``"mclass"``); a run without
    one is told by its ``config.json`` keys; ``manifest.json`` marks prepared shards.
    Unreadable files count as unknown (the loader then reports what is wrong with them).
    """
    run_dir = Path(run_dir)
    run = _json_object(run_dir / "run.json") if (run_dir / "run.json").is_file() else None
    if run is not None and run.get("kind") in (MDET, MCLASS):
        return run["kind"]
    config = (_json_object(run_dir / "config.json")
              if (run_dir / "config.json").is_file() else None)
    if config is not None:
        for kind, keys in _CONFIG_KEYS.items():
            if keys & set(config):
                return kind
    if (run_dir / "manifest.json").is_file():
        return SHARDS
    return None


def check_run_kind(run_dir, expected: str, option: str) -> None:
    """Raises :class:`InputError` when ``run_dir`` is known to be other than ``expected``.

    Args:
        run_dir: the directory given.
        expected: :data:`MDET` or :data:`MCLASS`.
        option: the command-line option it came from, for the message (``--det``).

    Raises:
        InputError: e.g. ``DIR is a train-cls run; --det needs a train-det run``. A directory
            of unknown kind passes (the loader reports what it lacks).
    """
    kind = run_kind(run_dir)
    if kind is not None and kind != expected:
        raise InputError(f"{run_dir} is a {MADE_BY[kind]}; {option} needs a "
                         f"{MADE_BY[expected]}")
