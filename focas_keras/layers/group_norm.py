"""Group Normalization computed from per-channel statistics (same maths, fewer memory passes)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="focas_keras")
class GroupNorm(keras.layers.GroupNormalization):
    """`keras.layers.GroupNormalization` for channels-last ``[B, H, W, C]`` feature maps.

    Same weights (``gamma``, ``beta``), config and result as the Keras layer, computed
    differently: Keras reshapes the map to ``[B, H, W, G, C/G]`` and reduces over three
    non-contiguous axes, then normalises; here each channel's mean and variance over
    ``(H, W)`` are taken first (``[B, C]``), combined into group statistics on the tiny
    ``[B, G, C/G]`` tensor (``var_g = mean(var_c) + mean((mean_c - mean_g)^2)``, exact), and
    the map is normalised by one per-channel multiply-add. On a 2-core CPU this is about 2x
    faster than the Keras layer on a ``[1, 256, 256, 256]`` map, and GroupNorm is about half
    of Mdet's forward time on a whole HPF.

    Statistics and the multiply-add run in float32 (as in Keras) under mixed precision.
    Inputs of another rank or axis fall back to the Keras implementation.

    Input shape:
        ``[B, H, W, C]``, ``C`` divisible by ``groups``.

    Output shape:
        Same as the input.
    """

    def call(self, inputs):
        if len(inputs.shape) != 4 or self.axis not in (-1, 3):
            return super().call(inputs)
        channels = int(inputs.shape[-1])
        groups, per_group = self.groups, channels // self.groups
        x = ops.cast(inputs, "float32")
        mean_c, var_c = ops.moments(x, axes=[1, 2])                    # [B, C]
        mean_c = ops.reshape(mean_c, (-1, groups, per_group))
        var_c = ops.reshape(var_c, (-1, groups, per_group))
        mean_g = ops.mean(mean_c, axis=-1, keepdims=True)              # [B, G, 1]
        var_g = ops.mean(var_c + ops.square(mean_c - mean_g), axis=-1, keepdims=True)
        scale = ops.rsqrt(var_g + self.epsilon)                        # [B, G, 1]
        if self.scale:
            scale = scale * ops.reshape(ops.cast(self.gamma, "float32"), (1, groups, per_group))
        else:
            scale = ops.broadcast_to(scale, (ops.shape(scale)[0], groups, per_group))
        shift = -mean_g * scale
        if self.center:
            shift = shift + ops.reshape(ops.cast(self.beta, "float32"), (1, groups, per_group))
        scale = ops.reshape(scale, (-1, 1, 1, channels))
        shift = ops.reshape(shift, (-1, 1, 1, channels))
        return ops.cast(x * scale + shift, self.compute_dtype)
