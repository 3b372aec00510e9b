"""Choosing the tf.distribute strategy for a run."""

from __future__ import annotations

import json
import os

import tensorflow as tf

from focas_keras.errors import InputError


def make_strategy(devices=None) -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG names a cluster, Mirrored over ``devices`` or the
    visible GPUs, else the default (single-device) strategy.

    Args:
        devices: device names such as ``["/cpu:0", "/cpu:1"]`` or ``["/gpu:0", "/gpu:1"]``;
            None picks the visible GPUs.
    """
    tf_config = os.environ.get("TF_CONFIG")
    if tf_config:
        try:
            cluster = json.loads(tf_config).get("cluster", {})
        except json.JSONDecodeError as err:
            raise InputError(f"TF_CONFIG is not valid JSON ({err.msg})") from None
        if cluster:
            return tf.distribute.MultiWorkerMirroredStrategy()
    if devices:
        return tf.distribute.MirroredStrategy(devices=list(devices))
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    if len(gpus) == 1:
        return tf.distribute.OneDeviceStrategy(gpus[0].name)
    return tf.distribute.get_strategy()


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints and logs (worker 0, or the only process)."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return True
    return resolver.task_type in (None, "chief") or (
        resolver.task_type == "worker" and resolver.task_id == 0
        and "chief" not in resolver.cluster_spec().as_dict())


def split_cpu(count: int) -> list[str]:
    """Splits the CPU into ``count`` logical devices (before TF initialises); returns names."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])
    return [f"/cpu:{i}" for i in range(count)]
