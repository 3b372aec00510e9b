"""The ``focas-keras`` subcommands, one module per area. Each module defines click commands
(``@click.command``) and lists them in a module-level ``COMMANDS``; :mod:`focas_keras.cli`
adds them to its ``main`` group. Command modules import what they share from :mod:`.base`
and :mod:`.common`, never from :mod:`focas_keras.cli` or from another command module."""
