"""Helpers shared by several ``focas-keras`` command modules."""

from __future__ import annotations

import click


def _cascade_options(command):
    """The cascade settings shared by ``detect`` and ``export`` (all but ``--tile``)."""
    options = [
        click.option("--overlap", type=int, default=64, show_default=True,
                     help="Tile overlap (px)."),
        click.option("--tile-batch", type=int, default=8, show_default=True,
                     help="Tiles per batch."),
        click.option("--det-threshold", type=float, default=None,
                     help="Stage-1 candidate threshold (default: the pair the Mclass run chose "
                          "on whole validation fields, when it was mined with --include-val; "
                          "else the highest score that keeps the Mdet run's best validation "
                          "recall, at least its inference threshold 0.05; or use "
                          "`focas-keras calibrate`)."),
        click.option("--cls-threshold", type=float, default=None,
                     help="Stage-2 acceptance threshold (default: the Mclass run's whole-field "
                          "pair, as above; else its best-F1 value on patches, at least 0.5)."),
        click.option("--patch", type=int, default=None,
                     help="Crop side around each candidate (default: the Mclass run's, 112)."),
        click.option("--merge-px", type=float, default=30.0, show_default=True,
                     help="Accepted detections closer than this (px) to a better one are "
                          "merged."),
        click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False),
                     default=None,
                     help="A thresholds file from `calibrate --write` (or the demo): its "
                          "stage-1 and stage-2 thresholds and merge radius (and TTA, where it "
                          "records it) replace the defaults, and override the bundled model's; "
                          "--det-threshold, --cls-threshold and --merge-px given here still "
                          "win."),
        click.option("--which", type=click.Choice(["best", "model"]), default="best",
                     show_default=True, help="Use each run's best or final model."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _runs_options(command):
    """``--det`` and ``--cls``, both defaulting to the bundled cascade (see
    :func:`focas_keras.inference.loading.load_cascade`), for ``detect``, ``export`` and
    ``slide``."""
    command = click.option(
        "--cls", "cls_run", type=click.Path(), default=None,
        help="A train-cls run (default: the bundled pretrained cascade, with --det).")(command)
    return click.option(
        "--det", "det_run", type=click.Path(), default=None,
        help="A train-det run (default: the bundled pretrained cascade, with --cls).")(command)


def _given(ctx, name: str) -> bool:
    """Whether option ``name`` was set on the command line (or by its environment variable),
    not left at its default."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def _given_or_none(ctx, name: str, value):
    """``value`` where option ``name`` was given (:func:`_given`), else None ("not given": a
    thresholds file or the bundled model's card may set it)."""
    return value if _given(ctx, name) else None


def _image_files(inputs) -> list:
    """The image files INPUTS name (:func:`~focas_keras.inference.cascade.list_inputs`),
    each checked to be an image by its first bytes before any model loads."""
    from focas_keras.datasets.annotations import check_image_file
    from focas_keras.inference.cascade import list_inputs

    files = list_inputs(inputs)
    for path in files:
        check_image_file(path)
    return files


def _warn(message: str) -> None:
    """A warning line on stderr (the run goes on)."""
    click.echo(f"focas-keras: warning: {message}", err=True)


def _check_writable(out, into_parent: bool = False) -> None:
    """Refuses an output path that cannot be written, before any model loads.

    Probes by creating and removing a temporary file in the nearest existing directory of
    ``out`` (or of its parent where the command builds ``out`` aside and renames it there,
    ``into_parent``): no directory is created.

    Raises:
        InputError: ``out`` is a file, lies under a file, or its directory cannot be written.
    """
    import os
    import tempfile
    from pathlib import Path

    from focas_keras.errors import InputError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError("output exists and is not a directory", out)
    where = out.parent if into_parent else out
    where = where if str(where) else Path(".")
    probe = next((p for p in (where, *where.parents) if p.exists() or p == Path(p.anchor)),
                 Path("."))
    if not probe.is_dir():
        raise InputError(f"cannot create the output directory: {probe} is a file", out)
    try:
        handle, name = tempfile.mkstemp(prefix=".focas-keras-probe-", dir=probe)
        os.close(handle)
        os.unlink(name)
    except OSError as error:
        raise InputError(f"cannot write the output here ({probe}: "
                         f"{error.strerror or error})", out) from None


def _image_files_or_failures(inputs):
    """The image files INPUTS name, as :func:`_image_files`, except that a bad input (not
    found, not an image, unreadable) is set aside instead of stopping the others.

    Returns:
        (files, failures): the good files and ``[{"image", "path", "reason"}]`` for the bad
        ones (``image`` is the file stem, as in every output).

    Raises:
        InputError: every input is bad (a single bad input among them: its own one-line
            error), or two inputs share a file stem.
    """
    from pathlib import Path

    from focas_keras.datasets.annotations import check_image_file
    from focas_keras.errors import InputError
    from focas_keras.inference.cascade import list_inputs

    good, failures, first = [], [], None

    def fail(error, path):
        nonlocal first
        first = first or error
        path = str(getattr(error, "path", None) or path)
        failures.append({"image": Path(path).stem, "path": path, "reason": _reason(error)})

    for raw in inputs:
        try:
            list_inputs([raw])
        except InputError as error:
            fail(error, raw)
        else:
            good.append(raw)
    files = []
    for path in list_inputs(good) if good else []:
        try:
            check_image_file(path)
        except InputError as error:
            fail(error, path)
        else:
            files.append(path)
    if not files:
        raise first or InputError("no input images given")
    return files, failures


def _reason(error) -> str:
    """An InputError's message without the leading ``path: `` it names."""
    text = str(error)
    path = getattr(error, "path", None)
    if path and text.startswith(f"{path}: "):
        text = text[len(path) + 2:]
    return text


def _report_failures(ctx, failed: list, what: str, total: int) -> None:
    """After a run over several inputs: names those that failed (stderr) and exits with 1
    when there are any (the others' results are written)."""
    if not failed:
        return
    click.echo(f"focas-keras: {len(failed)} of {total} {what} failed (the rest ran):", err=True)
    for item in failed:
        click.echo(f"  {item['path']}: {item['reason']}", err=True)
    ctx.exit(1)


#: The hotspot, tissue, tiling, threshold and tile-error options ``slide`` and ``cohort`` share.
_SLIDE_OPTIONS = [
    click.option("--hotspot-mm2", type=float, default=2.0, show_default=True,
                  help="Area of the hotspot window (a circle), mm2."),
    click.option("--hpf", type=int, default=None,
                  help="Hotspot as this many microscope fields (with --field-diameter-mm), e.g. "
                       "10."),
    click.option("--field-diameter-mm", type=float, default=None,
                  help="The microscope's field diameter (mm) for --hpf and the score's cut-offs."),
    click.option("--no-tissue-mask", is_flag=True,
                  help="Run on every tile, tissue or not."),
    click.option("--min-tissue", type=float, default=0.01, show_default=True,
                  help="Skip tiles whose footprint holds less than this share of tissue."),
    click.option("--tile", type=int, default=1024, show_default=True,
                  help="Stage-1 tile side (px, multiple of 32, in Mdet's pixels)."),
    click.option("--overlap", type=int, default=64, show_default=True, help="Tile overlap (px)."),
    click.option("--det-threshold", type=float, default=None,
                  help="Stage-1 candidate threshold (default: the model's)."),
    click.option("--cls-threshold", type=float, default=None,
                  help="Stage-2 acceptance threshold (default: the model's)."),
    click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False), default=None,
                  help="A thresholds file from `calibrate --write`, as for detect."),
    click.option("--merge-px", type=float, default=30.0, show_default=True,
                  help="Accepted detections closer than this (px at 0.2456 um/px) to a better one "
                       "are merged."),
    click.option("--tta/--no-tta", default=None,
                  help="Mclass under its 8 rotations/flips (default: the model's)."),
    click.option("--which", type=click.Choice(["best", "model"]), default="best",
                  show_default=True, help="Use each run's best or final model."),
    click.option("--on-tile-error", type=click.Choice(["continue", "fail"]), default="continue",
                  show_default=True,
                  help="A tile that cannot be read: count it as unreadable and go on, or stop the "
                       "slide (a rerun resumes either way).")
]


def _slide_options(command):
    """Adds :data:`_SLIDE_OPTIONS` to a command (in the order they are listed)."""
    for option in reversed(_SLIDE_OPTIONS):
        command = option(command)
    return command
