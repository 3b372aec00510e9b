"""Moved to :mod:`focas_keras.datasets.readers`; this alias keeps old imports working."""

from focas_keras.datasets.readers import *  # noqa: F401,F403
