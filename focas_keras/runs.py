"""Training run directories: their layout, and every read of one.

A ``train-det`` or ``train-cls`` run directory holds ``run.json`` (what makes it that run,
with its ``kind`` and ``data_mpp``), ``config.json`` (the model config), ``best.json`` (the
best validation epoch's metrics), ``metrics.json`` (the last epoch's), and the checkpoints
``best.keras`` and ``model.keras``. The trainer writes them (through the names here); this
module is the one place that reads them: which kind of run a directory is, which checkpoint to
use, the values a run found on its validation data (thresholds) and the pixel size its shards
were prepared at, and the models with their configs.

Importing this module is light (no TensorFlow, Keras or NumPy); the model loaders import
Keras when called.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from focas_keras.errors import InputError

#: The files of a run directory.
RUN_FILE, CONFIG_FILE, BEST_FILE, METRICS_FILE = ("run.json", "config.json", "best.json",
                                                  "metrics.json")
#: The checkpoints: the best validation epoch's and the final weights.
BEST, FINAL = "best", "model"
#: The shard directory's marker (written by ``prepare``), told apart from runs.
SHARDS_MANIFEST = "manifest.json"

MDET, MCLASS, SHARDS = "mdet", "mclass", "shards"
#: The command that makes each kind of directory.
MADE_BY = {MDET: "train-det run", MCLASS: "train-cls run", SHARDS: "shard directory (from "
                                                                      "prepare)"}
#: Top-level keys only one of the two model configs has (``config.json``).
_CONFIG_KEYS = {MDET: {"backbone", "fpn", "head", "inference"}, MCLASS: {"model"}}

#: Floor of a stage-2 threshold taken from a run. A run's best-F1 threshold comes from its
#: validation patches (mitoses, background, annotated look-alikes), which lack stage 1's own
#: false positives (those are mined from training images only); there it can fall to ~0.01
#: and, applied to real candidates, accept nearly all of them. Batches are balanced, so 0.5 is
#: the classifier's own decision boundary. An explicit threshold is never raised.
MIN_AUTO_CLS_THRESHOLD = 0.5


# ---------------------------------------------------------------------------- JSON files


def read_json(path):
    """A JSON file; InputError naming the file (and line) when it cannot be read or parsed."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path, err.lineno) from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"cannot read ({getattr(err, 'strerror', None) or err})",
                         path) from None


def _json_object(path: Path):
    """A JSON object file, or None when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_identity(run_dir) -> dict | None:
    """What ``run.json`` says makes the run that run (None without one); InputError when it
    is not valid JSON. The trainer compares it before resuming into ``run_dir``."""
    path = Path(run_dir) / RUN_FILE
    return read_json(path) if path.is_file() else None


def best_score(run_dir) -> float | None:
    """The score of the best epoch so far (``best.json``), None before the first."""
    path = Path(run_dir) / BEST_FILE
    return float(read_json(path)["score"]) if path.is_file() else None


# ---------------------------------------------------------------------------- kinds


def run_kind(run_dir) -> str | None:
    """The kind of a directory: :data:`MDET`, :data:`MCLASS` or :data:`SHARDS`, else None.

    A run's ``run.json`` names its kind (``"kind": "mdet"`` or ``"mclass"``); a run without
    one is told by its ``config.json`` keys; ``manifest.json`` marks prepared shards.
    Unreadable files count as unknown (the loader then reports what is wrong with them).
    """
    run_dir = Path(run_dir)
    run = _json_object(run_dir / RUN_FILE) if (run_dir / RUN_FILE).is_file() else None
    if run is not None and run.get("kind") in (MDET, MCLASS):
        return run["kind"]
    config = _json_object(run_dir / CONFIG_FILE) if (run_dir / CONFIG_FILE).is_file() else None
    if config is not None:
        for kind, keys in _CONFIG_KEYS.items():
            if keys & set(config):
                return kind
    if (run_dir / SHARDS_MANIFEST).is_file():
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


# ---------------------------------------------------------------------------- values


def run_metric(run_dir, key: str, which: str = BEST, default: float = 0.5) -> float:
    """A score threshold a training run found on its validation data.

    ``best.json``'s ``metrics[key]`` for ``which="best"``; for ``"model"`` (the final weights)
    the last epoch's value in ``metrics.json``, else ``best.json``'s. ``default`` when the run
    has neither (no validation data) or the value is not in [0, 1].
    """
    run_dir = Path(run_dir)
    candidates = []
    if which == FINAL and (run_dir / METRICS_FILE).is_file():
        last = read_json(run_dir / METRICS_FILE).get("last") or {}
        candidates.append(last.get(key))
    if (run_dir / BEST_FILE).is_file():
        metrics = read_json(run_dir / BEST_FILE).get("metrics") or {}
        candidates.append(metrics.get(key))
    for value in candidates:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
            return float(value)
    return float(default)


def run_cls_threshold(cls_run, which: str = BEST, default: float = 0.5) -> float:
    """The acceptance threshold of a ``train-cls`` run: its validation best-F1 threshold."""
    return run_metric(cls_run, "val_best_threshold", which, default)


def run_det_threshold(det_run, which: str = BEST, default: float = 0.0) -> float:
    """The candidate threshold of a ``train-det`` run: the highest stage-1 score threshold
    that keeps its best validation recall (``val_recall_threshold``)."""
    return run_metric(det_run, "val_recall_threshold", which, default)


def run_field_thresholds(cls_run, which: str = BEST) -> tuple[float, float] | None:
    """The (stage-1, stage-2) pair a ``train-cls`` run chose by the cascade's F1 on whole
    validation fields (``mine --include-val``), or None when it had no such candidates."""
    det = run_metric(cls_run, "val_cascade_det_threshold", which, default=-1.0)
    cls_ = run_metric(cls_run, "val_cascade_cls_threshold", which, default=-1.0)
    return None if det < 0 or cls_ < 0 else (det, cls_)


def run_data_mpp(run_dir) -> float | None:
    """The pixel size (um/px) a training run's shards were rescaled to (``prepare
    --target-mpp``), from its ``run.json``; None when they kept the images' own.

    Raises:
        InputError: ``run.json`` is not valid JSON, or its ``data_mpp`` is not a positive
            number.
    """
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    value = read_json(path).get("data_mpp")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"data_mpp must be a positive number, got {value!r}", path)
    return float(value)


# ---------------------------------------------------------------------------- checkpoints


def pick_checkpoint(run_dir, which: str) -> str:
    """The checkpoint to load: ``best`` where asked for and present, else ``model``.

    Raises:
        InputError: ``which`` is neither, or ``run_dir`` is not a directory.
    """
    if which not in (BEST, FINAL):
        raise InputError(f"checkpoint must be 'best' or 'model', got {which!r}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError("run directory not found", run_dir)
    return BEST if which == BEST and (run_dir / f"{BEST}.keras").is_file() else FINAL


def checkpoint_path(run_dir, which: str) -> Path:
    """The ``.keras`` file :func:`pick_checkpoint` chooses."""
    return Path(run_dir) / f"{pick_checkpoint(run_dir, which)}.keras"


def _load_keras(path: Path):
    import keras

    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, OSError) as err:
        raise InputError(f"cannot load the model ({err})", path) from None


def load_mdet_run(run_dir, which: str = FINAL):
    """The trained model and config of a ``train-det`` run directory.

    Args:
        run_dir: the run directory.
        which: ``model`` (final) or ``best`` (best validation epoch); exactly that file.

    Returns:
        (keras.Model, MdetConfig).

    Raises:
        InputError: no config or checkpoint, or a directory of another kind (a train-cls
            run, shards).
    """
    from focas_keras.models.mdet_config import MdetConfig

    run_dir = Path(run_dir)
    check_run_kind(run_dir, MDET, "--det")
    path, config_path = run_dir / f"{which}.keras", run_dir / CONFIG_FILE
    if not config_path.is_file():
        raise InputError("not a train-det run (no config.json)", run_dir)
    if not path.is_file():
        raise InputError(f"no {which}.keras (training unfinished?)", run_dir)
    config = MdetConfig.from_dict(read_json(config_path))
    return _load_keras(path), config


def load_mclass_run(run_dir, which: str = FINAL):
    """The trained model and config of a ``train-cls`` run directory (``which`` as for
    :func:`load_mdet_run`).

    Returns:
        (keras.Model, MclassConfig), the config validated.

    Raises:
        InputError: no config or checkpoint, an invalid config, a model that does not load,
            or a directory of another kind.
    """
    from focas_keras.models.mclass_config import MclassConfig

    run_dir = Path(run_dir)
    check_run_kind(run_dir, MCLASS, "--cls")
    config_path, path = run_dir / CONFIG_FILE, run_dir / f"{which}.keras"
    if not config_path.is_file():
        raise InputError("not a train-cls run (no config.json)", run_dir)
    config = MclassConfig.from_dict(read_json(config_path)).validate()
    if not path.is_file():
        raise InputError(f"no {which}.keras (training unfinished?)", run_dir)
    return _load_keras(path), config


# ---------------------------------------------------------------------------- a cascade's runs


@dataclasses.dataclass(frozen=True)
class CascadeRuns:
    """What a ``train-det`` and a ``train-cls`` run give a cascade (:func:`load_cascade_runs`).

    Attributes:
        det_run, cls_run: the run directories.
        det_model, det_config: Mdet (as saved; not folded) and its MdetConfig.
        cls_model, cls_config: Mclass and its MclassConfig.
        det_threshold, cls_threshold: the thresholds the runs chose (the defaults where the
            settings give none): the pair chosen on whole validation fields where the cls run
            has one, else the det run's recall threshold and the cls run's best-F1 threshold
            (at least :data:`MIN_AUTO_CLS_THRESHOLD`).
        det_mpp, cls_mpp: the pixel size each run's shards were prepared at (None: unknown).
        det_file, cls_file: the checkpoints loaded.
        model_key: ``{"det": sha256, "cls": sha256}`` of those two files.
    """

    det_run: Path
    cls_run: Path
    det_model: object
    det_config: object
    cls_model: object
    cls_config: object
    det_threshold: float
    cls_threshold: float
    det_mpp: float | None
    cls_mpp: float | None
    det_file: Path
    cls_file: Path
    model_key: dict


def load_cascade_runs(det_run, cls_run, which: str = BEST) -> CascadeRuns:
    """Loads a ``train-det`` and a ``train-cls`` run directory.

    Both kinds are checked before any model loads; then Mdet, then Mclass.

    Args:
        det_run, cls_run: the run directories.
        which: ``best`` (``best.keras``, falling back to ``model.keras`` where a run has no
            best checkpoint) or ``model`` (the final weights).

    Raises:
        InputError: a missing directory, config or checkpoint, an unreadable file, or a run
            of the other kind (:func:`check_run_kind`).
    """
    from focas_keras.io import sha256_file

    det_run, cls_run = Path(det_run), Path(cls_run)
    check_run_kind(det_run, MDET, "--det")  # both before any model loads
    check_run_kind(cls_run, MCLASS, "--cls")
    det_which = pick_checkpoint(det_run, which)
    det_model, det_config = load_mdet_run(det_run, det_which)
    cls_which = pick_checkpoint(cls_run, which)
    cls_model, cls_config = load_mclass_run(cls_run, cls_which)
    field_pair = run_field_thresholds(cls_run, cls_which)
    if field_pair is not None:  # chosen on whole validation fields: used as they are
        det_default, cls_default = field_pair
    else:
        det_default = run_det_threshold(det_run, det_which)
        cls_default = max(MIN_AUTO_CLS_THRESHOLD, run_cls_threshold(cls_run, cls_which))
    det_file, cls_file = det_run / f"{det_which}.keras", cls_run / f"{cls_which}.keras"
    return CascadeRuns(det_run, cls_run, det_model, det_config, cls_model, cls_config,
                       det_default, cls_default, run_data_mpp(det_run), run_data_mpp(cls_run),
                       det_file, cls_file,
                       {"det": sha256_file(det_file), "cls": sha256_file(cls_file)})
