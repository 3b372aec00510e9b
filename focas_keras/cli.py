"""The ``focas-keras`` command line: a thin layer over the library.

User errors (:class:`~focas_keras.errors.InputError`, unreadable shards) print one line on
stderr and exit with code 2; nothing else is printed for them. The subcommands live in
:mod:`focas_keras.commands` (data, training, detection, scoring), each a thin layer over the
library, registered on :data:`main` when this module is imported. Nothing here or in a command
module imports TensorFlow, Keras, pandas or OpenCV at module level (they load inside the
command that runs), so ``--help``, ``--version`` and usage errors answer in well under a second.
Ctrl-C prints what the command keeps (:func:`on_interrupt`) and exits with 130.
"""

from __future__ import annotations

import click

from focas_keras import __version__
from focas_keras.errors import InputError

EXIT_INPUT = 2
#: Where a command keeps what an interrupt leaves behind (:func:`on_interrupt`).
INTERRUPT_KEY = "focas_keras.interrupt"


class _Group(click.Group):
    """Turns user errors raised anywhere below into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"focas-keras: error: {err}", err=True)
            ctx.exit(EXIT_INPUT)
        except KeyboardInterrupt:
            kept = ctx.meta.get(INTERRUPT_KEY)
            kept = kept() if callable(kept) else kept
            click.echo("focas-keras: interrupted" + (f": {kept}" if kept else ""), err=True)
            ctx.exit(130)
        except Exception as err:  # corrupt TFRecords surface from inside TensorFlow
            if type(err).__name__ == "TrainingError":
                click.echo(f"focas-keras: error: {err}", err=True)
                ctx.exit(1)
            if type(err).__name__ == "DataLossError":
                first = str(getattr(err, "message", err)).splitlines()[0]
                click.echo(f"focas-keras: error: corrupt shard ({first})", err=True)
                ctx.exit(EXIT_INPUT)
            raise


def on_interrupt(kept) -> None:
    """Says what the running command keeps if Ctrl-C stops it: ``kept`` (a string, or a
    callable giving one when the interrupt comes) follows "focas-keras: interrupted: " on
    stderr. A command that sets nothing gets the bare "focas-keras: interrupted"."""
    click.get_current_context().meta[INTERRUPT_KEY] = kept


def _import_tensorflow():
    """TensorFlow, imported quietly (see :func:`focas_keras.tf_import.import_tensorflow`).
    Commands call it inside their function, never at module level, so that ``--help`` and
    usage errors answer without it (importing ``focas_keras`` does not import TensorFlow)."""
    from focas_keras.tf_import import import_tensorflow

    import_tensorflow()


def _slides(value: str) -> tuple:
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else ()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="focas-keras")
def main():
    """FoCasNet mitosis detection: data, training of both stages, detection, evaluation."""


# Registers the subcommands on ``main`` (each module decorates its commands with it).
from focas_keras.commands import data, detection, scoring, slides, training  # noqa: E402,F401

if __name__ == "__main__":  # pragma: no cover
    # Run as ``python -m focas_keras.cli``, this file is ``__main__``, a second copy of the
    # module: the commands registered themselves on ``focas_keras.cli.main``, so run that one.
    from focas_keras.cli import main as registered

    registered()
