"""Helpers shared by several ``focas-keras`` command modules."""

from __future__ import annotations

import click



def _image_files(inputs) -> list:
    """The image files INPUTS name (:func:`~focas_keras.inference.cascade.list_inputs`),
    each checked to be an image by its first bytes before any model loads."""
    from data_tools.annotations import check_image_file
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

    from data_tools.annotations import check_image_file
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
