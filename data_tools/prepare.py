"""Moved to :mod:`focas_keras.datasets.prepare`; this alias keeps old imports working."""

from focas_keras.datasets.prepare import *  # noqa: F401,F403
