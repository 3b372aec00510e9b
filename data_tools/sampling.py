"""Moved to :mod:`focas_keras.datasets.sampling`; this alias keeps old imports working."""

from focas_keras.datasets.sampling import *  # noqa: F401,F403
