"""What a training run directory says about inference: its validation thresholds and the
pixel size its shards were prepared at (read by :meth:`Cascade.from_runs
<focas_keras.inference.cascade.Cascade.from_runs>`)."""

from __future__ import annotations

import json
from pathlib import Path

from focas_keras.errors import InputError


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise InputError(f"invalid JSON: {err.msg}", path, err.lineno) from None
    except OSError as err:
        raise InputError(f"cannot read ({err.strerror or err})", path) from None


#: Floor of a stage-2 threshold taken from a run. A run's best-F1 threshold comes from its
#: validation patches (mitoses, background, annotated look-alikes), which lack stage 1's own
#: false positives (those are mined from training images only); there it can fall to ~0.01
#: and, applied to real candidates, accept nearly all of them. Batches are balanced, so 0.5 is
#: the classifier's own decision boundary. An explicit threshold is never raised.
MIN_AUTO_CLS_THRESHOLD = 0.5


def run_metric(run_dir, key: str, which: str = "best", default: float = 0.5) -> float:
    """A score threshold a training run found on its validation data.

    ``best.json``'s ``metrics[key]`` for ``which="best"``; for ``"model"`` (the final weights)
    the last epoch's value in ``metrics.json``, else ``best.json``'s. ``default`` when the run
    has neither (no validation data) or the value is not in [0, 1].
    """
    run_dir = Path(run_dir)
    candidates = []
    if which == "model" and (run_dir / "metrics.json").is_file():
        last = _read_json(run_dir / "metrics.json").get("last") or {}
        candidates.append(last.get(key))
    if (run_dir / "best.json").is_file():
        metrics = _read_json(run_dir / "best.json").get("metrics") or {}
        candidates.append(metrics.get(key))
    for value in candidates:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1:
            return float(value)
    return float(default)


def run_cls_threshold(cls_run, which: str = "best", default: float = 0.5) -> float:
    """The acceptance threshold of a ``train-cls`` run: its validation best-F1 threshold."""
    return run_metric(cls_run, "val_best_threshold", which, default)


def run_det_threshold(det_run, which: str = "best", default: float = 0.0) -> float:
    """The candidate threshold of a ``train-det`` run: the highest stage-1 score threshold
    that keeps its best validation recall (``val_recall_threshold``)."""
    return run_metric(det_run, "val_recall_threshold", which, default)


def run_field_thresholds(cls_run, which: str = "best") -> tuple[float, float] | None:
    """The (stage-1, stage-2) pair a ``train-cls`` run chose by the cascade's F1 on whole
    validation fields (``mine --include-val``), or None when it had no such candidates."""
    det = run_metric(cls_run, "val_cascade_det_threshold", which, default=-1.0)
    cls_ = run_metric(cls_run, "val_cascade_cls_threshold", which, default=-1.0)
    return None if det < 0 or cls_ < 0 else (det, cls_)


def run_data_mpp(run_dir) -> float | None:
    """The pixel size (um/px) a training run's shards were rescaled to (``prepare
    --target-mpp``), from its ``run.json``; None when they kept the images' own."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        return None
    value = _read_json(path).get("data_mpp")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InputError(f"data_mpp must be a positive number, got {value!r}", path)
    return float(value)
