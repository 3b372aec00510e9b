"""Moved to :mod:`focas_keras.datasets.annotations`; this alias keeps old imports working."""

from focas_keras.datasets.annotations import *  # noqa: F401,F403
