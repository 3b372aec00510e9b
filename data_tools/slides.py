"""Moved to :mod:`focas_keras.datasets.slides`; this alias keeps old imports working."""

from focas_keras.datasets.slides import *  # noqa: F401,F403
