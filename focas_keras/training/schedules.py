"""Learning-rate schedule: linear warm-up, then step decay."""

from __future__ import annotations

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="focas_keras")
class WarmupStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr rises linearly from ``warmup_ratio * base`` to ``base`` over ``warmup_steps``, then is
    multiplied by ``factor`` at each of ``boundaries`` (steps).

    Args:
        base: peak learning rate.
        warmup_steps: steps of linear warm-up (0: none).
        boundaries: increasing step numbers of the decays.
        factor: decay factor.
        warmup_ratio: starting fraction of ``base``.
    """

    def __init__(self, base, warmup_steps=0, boundaries=(), factor=0.1, warmup_ratio=0.001):
        self.base = float(base)
        self.warmup_steps = int(warmup_steps)
        self.boundaries = tuple(int(b) for b in boundaries)
        self.factor = float(factor)
        self.warmup_ratio = float(warmup_ratio)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        decays = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] + [0.0])
        lr = self.base * tf.pow(self.factor, decays)
        if self.warmup_steps:
            progress = tf.minimum(step / self.warmup_steps, 1.0)
            lr = lr * (self.warmup_ratio + (1.0 - self.warmup_ratio) * progress)
        return lr

    def get_config(self):
        return {"base": self.base, "warmup_steps": self.warmup_steps,
                "boundaries": list(self.boundaries), "factor": self.factor,
                "warmup_ratio": self.warmup_ratio}
