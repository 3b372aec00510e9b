"""Building the cascade the way ``detect``, ``slide`` and ``export`` build it.

:func:`load_cascade` owns the choices a user's options leave open: the bundled model when no
runs are given (its card's thresholds, merge distance and TTA, its final weights), a
thresholds file from ``calibrate --write`` (what it sets, what the caller's explicit values
override), and the defaults for a user's own runs (thresholds from the runs, TTA off).
A pipeline worker calls it with the same keyword arguments the command line used and gets
the same cascade.

Importing this module is light (no TensorFlow); the models load when it is called.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

from focas_keras.errors import InputError

#: Cascade settings a thresholds file may set (``tta`` only where it records it).
THRESHOLDS_FILE_KEYS = ("det_threshold", "cls_threshold", "merge_px", "tta")


@dataclasses.dataclass(frozen=True)
class ModelRuns:
    """Where a cascade's two runs are, known before any model loads (:func:`model_runs`).

    Attributes:
        det, cls: the ``train-det`` and ``train-cls`` run directories.
        card: the bundled model's card (``card.json``), None for a user's runs.
    """

    det: Path
    cls: Path
    card: dict | None

    @property
    def bundled(self) -> bool:
        return self.card is not None


def model_runs(det=None, cls=None, bundle: str | None = None) -> ModelRuns:
    """The runs :func:`load_cascade` would load, without loading or verifying them (for
    checks that must come before any model loads, such as the input's pixel size).

    Args:
        det, cls: ``train-det`` / ``train-cls`` run directories; both None: the bundled model.
        bundle: which bundled model (None: :data:`focas_keras.pretrained.DEFAULT`).

    Raises:
        InputError: only one of ``det`` and ``cls`` is given, or there is no such bundled
            model.
    """
    from focas_keras import pretrained

    if det is None and cls is None:
        name = bundle or pretrained.DEFAULT
        card = pretrained.load_card(name)
        root = pretrained.model_dir(name)
        return ModelRuns(root / "det", root / "cls", card)
    if det is None or cls is None:
        raise InputError("give both --det and --cls, or neither (the bundled model)")
    return ModelRuns(Path(det), Path(cls), None)


def bundled_announcement(card: dict) -> str:
    """The line that names the bundled model when it is used."""
    return (f"using the bundled model {card['name']} (ICPR 2012 scanner A, cross-validated F1 "
            f"{card['cv_estimate']['pooled']['f1']:.2f}; `focas-keras models` shows its card)")


def apply_thresholds_file(path, values: dict) -> dict | None:
    """Fills ``values`` (cascade settings, None meaning "not given") from a thresholds file.

    The file's ``det_threshold``, ``cls_threshold``, ``merge_px`` and (where ``values`` has
    the key) ``tta`` are used where ``values`` holds None; a value given wins.

    Args:
        path: a thresholds file (``calibrate --write``), or None (nothing changes).
        values: the settings, changed in place.

    Returns:
        What ``detect.json`` records of the file: ``{"path", "sha256", "used" (the values it
        set), "command_line_won" (names it had but a given value kept), "chosen_on"}``; None
        without a file.

    Raises:
        InputError: the file cannot be read or is not a thresholds file.
    """
    if path is None:
        return None
    from focas_keras.evaluation.calibrate import read_thresholds
    from focas_keras.io import sha256_file

    data = read_thresholds(path)
    used, kept = {}, []
    for name in THRESHOLDS_FILE_KEYS:
        if name not in values or data.get(name) is None:
            continue
        if values[name] is not None:
            kept.append(name)
        else:
            values[name] = used[name] = data[name]
    return {"path": str(path), "sha256": sha256_file(path), "used": used,
            "command_line_won": kept, "chosen_on": data.get("chosen_on")}


def thresholds_runs_warning(record: dict | None, det_run, cls_run) -> str | None:
    """The warning when a thresholds file was chosen on the candidates of other runs (None
    when it names no runs, or these)."""
    chosen = ((record or {}).get("chosen_on") or {}).get("detect") or {}
    runs = chosen.get("runs") if isinstance(chosen, dict) else None
    if not isinstance(runs, dict):
        return None
    now = {"det": str(Path(det_run).resolve()), "cls": str(Path(cls_run).resolve())}
    if all(runs.get(k) in (None, now[k]) for k in now):
        return None
    return (f"{record['path']} was chosen on the candidates of --det {runs.get('det')} --cls "
            f"{runs.get('cls')}, not of these runs; its thresholds may not fit them")


def load_cascade(det=None, cls=None, thresholds=None, *, which: str = "best", tta=None,
                 announce=None, warn=None, bundle: str | None = None, **settings):
    """The cascade of two training runs, or of the bundled model, ready to run.

    Precedence of each setting: a value given here, then the thresholds file, then the
    bundled model's card (bundled model only), then the runs' own (thresholds) or the
    :class:`~focas_keras.inference.cascade.CascadeSettings` default.

    Args:
        det, cls: ``train-det`` / ``train-cls`` run directories; both None: the bundled model
            (verified against its card's sha256 first; its final weights, whatever ``which``).
        thresholds: a thresholds file (``calibrate --write``, what ``--thresholds`` takes), or
            None.
        which: ``best`` or ``model``: each user run's checkpoint.
        tta: Mclass test-time augmentation; None: the card's for the bundled model, off for a
            user's runs.
        announce: optional ``callable(str)`` given the one line naming the bundled model.
        warn: optional ``callable(str)`` given warnings (a thresholds file chosen on other
            runs); None: :func:`warnings.warn`.
        bundle: which bundled model when no runs are given (None: the default one).
        **settings: :class:`~focas_keras.inference.cascade.CascadeSettings` fields (e.g.
            ``det_threshold``, ``cls_threshold``, ``mpp``, ``det_mpp``, ``tile``,
            ``merge_px``); None means "not given".

    Returns:
        A :class:`~focas_keras.inference.cascade.Cascade` with, besides its settings:
        ``card`` (the bundled card, None for a user's runs), ``model_key`` (``{"det": sha256,
        "cls": sha256}`` of the checkpoints loaded: the slide journal's model key), ``runs``
        (the :class:`ModelRuns`) and ``thresholds_file`` (:func:`apply_thresholds_file`'s
        record, None without a file).

    Raises:
        InputError: only one run given, an unknown setting, a bad thresholds file or
            setting value, a run that is missing, incomplete or of the other kind, or a
            damaged bundled model.
    """
    from focas_keras import pretrained
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    known = {f.name for f in dataclasses.fields(CascadeSettings)} - {"tta"}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown cascade setting(s): {', '.join(unknown)}")
    values = {**dict.fromkeys(THRESHOLDS_FILE_KEYS), **settings, "tta": tta}
    record = apply_thresholds_file(thresholds, values)
    if det is None and cls is None:
        name = bundle or pretrained.DEFAULT
        card = pretrained.load_card(name)
        if announce is not None:
            announce(bundled_announcement(card))
        source = pretrained.runs(name)
    elif det is None or cls is None:
        raise InputError("give both --det and --cls, or neither (the bundled model)")
    else:
        source = contextlib.nullcontext((det, cls, None))
    with source as (det_run, cls_run, card):
        message = thresholds_runs_warning(record, det_run, cls_run)
        if message is not None:
            _warn(warn, message)
        given = {k: v for k, v in values.items() if v is not None}
        if card is None:
            given["tta"] = bool(values["tta"])
            cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings(**given),
                                        which=which)
        else:
            cascade = Cascade.from_runs(det_run, cls_run,
                                        pretrained.settings_from_card(card, **given),
                                        which="model")
    cascade.card = card
    cascade.runs = ModelRuns(Path(det_run), Path(cls_run), card)
    cascade.thresholds_file = record
    return cascade


def load_stage1(det, *, which: str = "model", **settings):
    """Stage 1 alone, from a ``train-det`` run: what ``mine`` runs on whole training images.

    The returned cascade's :meth:`~focas_keras.inference.cascade.Cascade.stage1` and
    :meth:`~focas_keras.inference.cascade.Cascade.detect_resized` run Mdet exactly as in
    :func:`load_cascade`'s cascade (the engine's
    :func:`~focas_keras.inference.engine.detect_field`); its stage 2 raises.

    Args:
        det: the ``train-det`` run directory.
        which: ``model`` (final weights) or ``best``.
        **settings: :class:`~focas_keras.inference.cascade.CascadeSettings` fields; an
            unset ``det_threshold`` is the run config's ``inference.score_threshold`` (every
            candidate, not the run's validation-chosen threshold) and an unset ``det_mpp``
            the run's training pixel size.

    Raises:
        InputError: an unknown setting, a bad value, or a missing, incomplete or other-kind
            run.
    """
    from focas_keras.inference.cascade import Cascade, CascadeSettings
    from focas_keras.models.fold import fold_weight_standardization
    from focas_keras.runs import load_mdet_run, run_data_mpp

    known = {f.name for f in dataclasses.fields(CascadeSettings)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InputError(f"unknown cascade setting(s): {', '.join(unknown)}")
    model, config = load_mdet_run(det, which)
    given = {k: v for k, v in settings.items() if v is not None}
    return Cascade(fold_weight_standardization(model), config, None, None,
                   CascadeSettings(**given), det_mpp_default=run_data_mpp(det))


def _warn(warn, message: str) -> None:
    if warn is not None:
        warn(message)
        return
    import warnings

    warnings.warn(message, UserWarning, stacklevel=3)
