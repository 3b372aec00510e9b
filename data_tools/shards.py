"""Moved to :mod:`focas_keras.datasets.shards`; this alias keeps old imports working."""

from focas_keras.datasets.shards import *  # noqa: F401,F403
