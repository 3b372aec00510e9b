"""Convolutional Block Attention Module (Woo et al., 2018)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="focas_keras")
class CBAM(keras.layers.Layer):
    """Channel attention followed by spatial attention.

    Channel attention: a shared MLP of two 1x1 convolutions (``C -> hidden``, ReLU,
    ``hidden -> C``, both with bias) is applied to the global average-pooled and the global
    max-pooled features (each ``[B, 1, 1, C]``); the two results are summed and passed
    through a sigmoid, giving ``Mc`` of shape ``[B, 1, 1, C]``; ``x' = Mc * x``.

    Spatial attention: the channel-wise mean and max of ``x'`` are concatenated
    (``[B, H, W, 2]``, mean first), convolved with a ``spatial_kernel x spatial_kernel``
    convolution (1 filter, ``"same"`` padding, with bias) and passed through a sigmoid,
    giving ``Ms`` of shape ``[B, H, W, 1]``; the output is ``Ms * x'``.

    ``hidden = max(C // ratio, min_hidden)``. Works for any (also unknown) ``H`` and ``W``
    and under mixed precision (the sub-layers follow this layer's dtype policy).

    Args:
        ratio: int, channel reduction ratio of the MLP (default 16).
        spatial_kernel: int, kernel size of the spatial-attention convolution (default 7).
        min_hidden: int, lower bound on the MLP's hidden channels (default 8).
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Input shape:
        ``[B, H, W, C]`` (channels_last; ``C`` must be known).

    Output shape:
        ``[B, H, W, C]``.
    """

    def __init__(self, ratio=16, spatial_kernel=7, min_hidden=8, **kwargs):
        super().__init__(**kwargs)
        if int(ratio) < 1 or int(spatial_kernel) < 1 or int(min_hidden) < 1:
            raise ValueError(
                "`ratio`, `spatial_kernel` and `min_hidden` must be positive integers, got "
                f"{ratio}, {spatial_kernel}, {min_hidden}."
            )
        self.ratio = int(ratio)
        self.spatial_kernel = int(spatial_kernel)
        self.min_hidden = int(min_hidden)
        self.supports_masking = False
        self.mlp_conv1 = None
        self.mlp_conv2 = None
        self.spatial_conv = None

    def build(self, input_shape):
        channels = input_shape[-1]
        if channels is None:
            raise ValueError(f"CBAM needs a known channel dimension, got {input_shape}.")
        channels = int(channels)
        hidden = max(channels // self.ratio, self.min_hidden)
        policy = self.dtype_policy
        self.mlp_conv1 = keras.layers.Conv2D(
            hidden, 1, activation="relu", use_bias=True, dtype=policy, name="mlp_conv1")
        self.mlp_conv2 = keras.layers.Conv2D(
            channels, 1, use_bias=True, dtype=policy, name="mlp_conv2")
        self.spatial_conv = keras.layers.Conv2D(
            1, self.spatial_kernel, padding="same", use_bias=True, dtype=policy,
            name="spatial_conv")
        self.mlp_conv1.build((None, 1, 1, channels))
        self.mlp_conv2.build((None, 1, 1, hidden))
        self.spatial_conv.build((None, None, None, 2))
        self.built = True

    def _mlp(self, x):
        return self.mlp_conv2(self.mlp_conv1(x))

    def call(self, inputs):
        avg = ops.mean(inputs, axis=(1, 2), keepdims=True)
        mx = ops.max(inputs, axis=(1, 2), keepdims=True)
        channel_att = ops.sigmoid(self._mlp(avg) + self._mlp(mx))
        x = inputs * channel_att
        pooled = ops.concatenate(
            [ops.mean(x, axis=-1, keepdims=True), ops.max(x, axis=-1, keepdims=True)],
            axis=-1)
        spatial_att = ops.sigmoid(self.spatial_conv(pooled))
        return x * spatial_att

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update({
            "ratio": self.ratio,
            "spatial_kernel": self.spatial_kernel,
            "min_hidden": self.min_hidden,
        })
        return config
