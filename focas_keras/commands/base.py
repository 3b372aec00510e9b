"""What every ``focas-keras`` command shares: the group class that turns user errors into one
line and an exit code, the Ctrl-C message, and the quiet TensorFlow import.

:mod:`focas_keras.cli` builds the ``main`` group from :class:`_Group` and adds each command
module's ``COMMANDS``; command modules import from here (and :mod:`.common`), never from
:mod:`focas_keras.cli`, so the imports go one way.
"""

from __future__ import annotations

import click

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
    """The names in a comma-separated option value (empty: none)."""
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else ()
