"""The ``focas-keras`` command line: a thin layer over the library.

User errors (:class:`~focas_keras.errors.InputError`, unreadable shards) print one line on
stderr and exit with code 2; nothing else is printed for them. The subcommands live in
:mod:`focas_keras.commands` (data, training, detection, scoring, slides, and cohort where it
is installed), each a thin layer over the library that lists its click commands in a
module-level ``COMMANDS``; this module builds :data:`main` and adds them. Imports go one way:
commands never import this module (what they share is in :mod:`focas_keras.commands.base`).
Nothing here or in a command module imports TensorFlow, Keras, pandas or OpenCV at module
level (they load inside the command that runs), so ``--help``, ``--version`` and usage errors
answer in well under a second. Ctrl-C prints what the command keeps
(:func:`~focas_keras.commands.base.on_interrupt`) and exits with 130.
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from focas_keras import __version__
from focas_keras.commands import data, detection, scoring, slides, training
from focas_keras.commands.base import EXIT_INPUT, INTERRUPT_KEY, _Group  # noqa: F401  (API)

#: Command modules that may be absent (added when the file exists).
OPTIONAL_COMMANDS = ("focas_keras.commands.cohort",)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="focas-keras")
def main():
    """FoCasNet mitosis detection: data, training of both stages, detection, evaluation."""


def _command_modules() -> list:
    modules = [data, training, detection, scoring, slides]
    for name in OPTIONAL_COMMANDS:
        if importlib.util.find_spec(name) is not None:  # present: its import errors surface
            modules.append(importlib.import_module(name))
    return modules


for _module in _command_modules():
    for _command in _module.COMMANDS:
        main.add_command(_command)

if __name__ == "__main__":  # pragma: no cover
    main()
