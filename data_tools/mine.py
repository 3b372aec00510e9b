"""Moved to :mod:`focas_keras.training.mine`; this alias keeps old imports working."""

from focas_keras.training.mine import *  # noqa: F401,F403
