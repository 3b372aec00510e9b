"""Resampling an image to a model's pixel size: one definition for the Python cascade, hard-
negative mining and the exported SavedModel graph, so all three see the same pixels.

Shrinking uses TensorFlow's area resize (each output pixel is the area-weighted mean of the
input pixels it covers, as OpenCV's ``INTER_AREA``, which ``prepare --target-mpp`` uses; the
two differ by at most one grey level), rounded half to even. The exported graph runs the very
same ops, which is what lets an export with stage 1 at half resolution match the Python
cascade. Enlarging uses OpenCV's bilinear resize (Python only; the export never enlarges).
"""

from __future__ import annotations

import cv2
import numpy as np
import tensorflow as tf


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(height, width) of an image resized by ``factor``: sides rounded (half to even), >= 1."""
    return max(1, int(round(height * factor))), max(1, int(round(width * factor)))


def shrink(image, height, width):
    """Area resize of a uint8 [H, W, 3] tensor to ``height`` x ``width`` (uint8).

    Works eagerly and inside a traced graph (sizes may be tensors).
    """
    resized = tf.image.resize(tf.cast(image, tf.float32)[None], tf.stack([height, width]),
                              method="area")[0]
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def graph_scaled_size(height, width, factor: float):
    """:func:`scaled_size` on int32 tensors, with the same float64 arithmetic and rounding."""
    def side(length):
        value = tf.round(tf.cast(length, tf.float64) * tf.constant(float(factor), tf.float64))
        return tf.maximum(tf.cast(value, tf.int32), 1)

    return side(height), side(width)


def resize_by(image: np.ndarray, factor: float) -> tuple[np.ndarray, float, float]:
    """``image`` (uint8 (H, W, 3)) resized by ``factor``.

    Returns:
        (the resized image, x factor, y factor): the exact factors new side / old side. A
        factor of 1 returns the image itself.
    """
    if factor == 1.0:
        return image, 1.0, 1.0
    height, width = image.shape[:2]
    new_h, new_w = scaled_size(height, width, factor)
    if factor < 1.0:
        resized = shrink(tf.constant(image), new_h, new_w).numpy()
    else:
        resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    return resized, new_w / width, new_h / height


def resize_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (uint8 (H, W, 3)) resized to exactly ``height`` x ``width`` by
    :func:`resize_by`'s rule: the area shrink where neither side grows, else OpenCV's bilinear
    (a region of a slide read at a level near a stage's pixel size)."""
    if image.shape[:2] == (height, width):
        return image
    if height <= image.shape[0] and width <= image.shape[1]:
        return shrink(tf.constant(image), height, width).numpy()
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
