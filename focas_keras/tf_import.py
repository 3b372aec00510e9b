"""Importing TensorFlow without its start-up chatter on stderr (no TensorFlow import here)."""

from __future__ import annotations


def import_tensorflow() -> None:
    """Imports TensorFlow with its start-up chatter (CUDA probing, absl) kept off stderr.

    TensorFlow's C++ side prints those lines at import whatever TF_CPP_MIN_LOG_LEVEL says, and
    they would bury our one-line errors. The quiet import itself is the finder that
    :func:`focas_keras.import_hooks.install` puts in place at ``import focas_keras`` (it also
    covers a user's own ``import tensorflow``); this only makes sure it is there and imports.
    Set FOCAS_KERAS_VERBOSE=1 to see the chatter.
    """
    from focas_keras import import_hooks

    import_hooks.install()
    __import__("tensorflow")
