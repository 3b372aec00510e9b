"""The ``focas-keras`` subcommands, one module per area; importing a module registers its
commands on :data:`focas_keras.cli.main`."""
