"""Moved to :mod:`focas_keras.datasets.synth`; this alias keeps old imports working."""

from focas_keras.datasets.synth import *  # noqa: F401,F403
