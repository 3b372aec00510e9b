"""Geometry of the pyramid levels shared by the head, the losses and the decoder.

Head outputs are flattened over levels in increasing stride order (P3 first), each level in
row-major order (y, then x), and for the anchor branch the A anchors of a location last:
index = offset_l + (y * W_l + x) * A + a. A level's feature map for an input of H x W pixels
is ceil(H / stride) x ceil(W / stride); the location (x, y) has its centre at
((x + 0.5) * stride, (y + 0.5) * stride) in input pixels.
"""

from __future__ import annotations

import math

import tensorflow as tf


def level_shapes(height, width, strides) -> list[tuple[int, int]]:
    """(H_l, W_l) of every level for a python-int input size."""
    return [(math.ceil(height / s), math.ceil(width / s)) for s in strides]


def location_centers(height: int, width: int, stride: int):
    """Centres of one level's locations.

    Returns:
        float32 [H_l * W_l, 2] (x, y) pixel centres in row-major order.
    """
    h, w = math.ceil(height / stride), math.ceil(width / stride)
    ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32),
                         indexing="ij")
    centers = tf.stack([(tf.reshape(xs, [-1]) + 0.5) * stride,
                        (tf.reshape(ys, [-1]) + 0.5) * stride], axis=-1)
    return centers
