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
