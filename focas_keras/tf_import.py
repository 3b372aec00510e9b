"""Importing TensorFlow without its start-up chatter on stderr (no TensorFlow import here)."""

from __future__ import annotations

import os
import sys


def import_tensorflow() -> None:
    """Imports TensorFlow with its start-up chatter (CUDA probing, absl) kept off stderr.

    TensorFlow's C++ side prints those lines at import whatever TF_CPP_MIN_LOG_LEVEL says, and
    they would bury our one-line errors. Set FOCAS_KERAS_VERBOSE=1 to see them.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules or os.environ.get("FOCAS_KERAS_VERBOSE"):
        __import__("tensorflow")
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            import tensorflow

            tensorflow.config.list_physical_devices()  # probes CUDA (and complains) once, here
    finally:
        os.dup2(saved, 2)
        os.close(saved)
