"""``python -m focas_keras``: the ``focas-keras`` command."""

from focas_keras.cli import main

if __name__ == "__main__":  # pragma: no cover
    main()
