"""The hybrid detection head: RetinaNet anchor branch + FSAF anchor-free branch on shared towers."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="focas_keras")
class HybridHead(keras.layers.Layer):
    """Classification and box towers shared across levels, with two sets of output convs.

    The anchor branch predicts, per location, ``num_anchors`` x ``num_classes`` logits and
    ``num_anchors`` x 4 box deltas; the anchor-free branch predicts ``num_classes`` logits and 4
    non-negative normalised (top, bottom, left, right) distances. Classification biases start
    at the focal-loss prior ``-log((1 - p) / p)``.

    Args:
        num_classes: K.
        num_anchors: A, anchors per location (anchor branch).
        channels: width of the tower convs.
        tower_depth: 3x3 conv + ReLU layers per tower.
        use_anchor: build the anchor branch.
        use_free: build the anchor-free branch.
        prior_prob: p of the classification bias prior.
        kernel_initializer: initializer of all convs (RetinaNet: normal, stddev 0.01).

    Call arguments:
        features: list of feature maps [B, H_l, W_l, C], levels in stride order.

    Returns:
        dict with (for the enabled branches) ``anchor_cls`` [B, N, K], ``anchor_box`` [B, N, 4],
        ``free_cls`` [B, L, K], ``free_box`` [B, L, 4], flattened as described in
        :mod:`focas_keras.models.levels` (N = sum H_l W_l A, L = sum H_l W_l).
    """

    def __init__(self, num_classes=1, num_anchors=9, channels=256, tower_depth=4,
                 use_anchor=True, use_free=True, prior_prob=0.01,
                 kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        if not (use_anchor or use_free):
            raise ValueError("the head needs at least one branch")
        self.num_classes = num_classes
        self.num_anchors = num_anchors
        self.channels = channels
        self.tower_depth = tower_depth
        self.use_anchor = use_anchor
        self.use_free = use_free
        self.prior_prob = prior_prob
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or keras.initializers.RandomNormal(stddev=0.01))
        bias = keras.initializers.Constant(-math.log((1 - prior_prob) / prior_prob))

        def conv(filters, name, bias_init="zeros"):
            return keras.layers.Conv2D(
                filters, 3, padding="same", name=name, dtype=self.dtype_policy,
                kernel_initializer=keras.initializers.get(
                    keras.initializers.serialize(self.kernel_initializer)),
                bias_initializer=bias_init)

        self.cls_tower = [conv(channels, f"cls_tower_{i}") for i in range(tower_depth)]
        self.box_tower = [conv(channels, f"box_tower_{i}") for i in range(tower_depth)]
        if use_anchor:
            self.anchor_cls_conv = conv(num_anchors * num_classes, "anchor_cls", bias)
            self.anchor_box_conv = conv(num_anchors * 4, "anchor_box")
        if use_free:
            self.free_cls_conv = conv(num_classes, "free_cls", bias)
            self.free_box_conv = conv(4, "free_box")

    def build(self, input_shape):
        shape = tuple(input_shape[0])
        for layer in self.cls_tower + self.box_tower:
            layer.build(shape)
            shape = shape[:-1] + (self.channels,)
        tower_shape = tuple(input_shape[0])[:-1] + (self.channels,)
        for name in ("anchor_cls_conv", "anchor_box_conv", "free_cls_conv", "free_box_conv"):
            if hasattr(self, name):
                getattr(self, name).build(tower_shape)

    @staticmethod
    def _flatten(x, last):
        return ops.reshape(x, (ops.shape(x)[0], -1, last))

    def call(self, features):
        outputs = {key: [] for key in ("anchor_cls", "anchor_box", "free_cls", "free_box")}
        for feature in features:
            cls, box = feature, feature
            for layer in self.cls_tower:
                cls = ops.relu(layer(cls))
            for layer in self.box_tower:
                box = ops.relu(layer(box))
            if self.use_anchor:
                outputs["anchor_cls"].append(
                    self._flatten(self.anchor_cls_conv(cls), self.num_classes))
                outputs["anchor_box"].append(self._flatten(self.anchor_box_conv(box), 4))
            if self.use_free:
                outputs["free_cls"].append(self._flatten(self.free_cls_conv(cls),
                                                         self.num_classes))
                outputs["free_box"].append(self._flatten(ops.relu(self.free_box_conv(box)), 4))
        return {key: ops.concatenate(value, axis=1) for key, value in outputs.items() if value}

    def get_config(self):
        config = super().get_config()
        config.update({
            "num_classes": self.num_classes,
            "num_anchors": self.num_anchors,
            "channels": self.channels,
            "tower_depth": self.tower_depth,
            "use_anchor": self.use_anchor,
            "use_free": self.use_free,
            "prior_prob": self.prior_prob,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
