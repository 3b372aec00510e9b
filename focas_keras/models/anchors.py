"""Anchors of Mdet's anchor-based (RetinaNet-style) branch, box deltas and IoU.

Anchor geometry follows :mod:`focas_keras.models.levels` exactly: levels in increasing stride
order (P3 first), each level's locations in row-major order (y, then x), the A anchors of a
location last, so anchor ``offset_l + (y * W_l + x) * A + a`` is centred on
``((x + 0.5) * stride_l, (y + 0.5) * stride_l)``. Within a location the anchors are ordered
ratio-major, then scale: ``a = ratio_index * len(scales) + scale_index``.

Default sizes (chosen for mitoses): ICPR 2012 mitoses are about 26-68 px wide at
0.2456 um/px (the centroid-derived boxes are 40 px). With ``scales = (1, 2^(1/3), 2^(2/3))``
the square anchors of P3 (base 24) are 24, 30.2 and 38.1 px and those of P4 (base 48) 48,
60.5 and 76.2 px. Two concentric squares of sizes s <= t have IoU (s / t)^2, so the largest
size gap (38.1 -> 48, ratio 1.26) still gives IoU >= 0.63 concentric; the worst grid offset
(half a stride in x and y) lowers this at the small end: a 24 px box centred between four P3
centres has IoU 0.53 with the 24 px anchor and 0.56 with the 30.2 px one. Hence every square
mitosis of 24-76 px, anywhere in the image, has some anchor with IoU >= 0.56
(``tests/test_anchors.py`` checks >= 0.5); boxes up to 1.5:1 elongated keep IoU >= 0.5 via
the 0.5 / 2 ratios. P5-P7 (96-610 px) are kept for the generic detector and clusters.

Deltas use the standard (Faster R-CNN / RetinaNet) parametrisation in xyxy pixel boxes::

    dx = (cx - acx) / aw / vx    dy = (cy - acy) / ah / vy
    dw = log(w / aw) / vw        dh = log(h / ah) / vh

which is ``keras.utils.bounding_boxes.encode_box_to_deltas(..., encoding_format=
"center_xywh")``. It is written out here (a few lines) because keras' decoder does not clip
dw / dh before ``exp`` (a large regression output then gives inf boxes) and because its
batched-input handling is shape-specific; the tests check agreement with keras' encoder and
``compute_iou``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from focas_keras.models.levels import level_shapes

# Largest dw / dh fed to exp when decoding (Detectron's bbox_xform_clip).
DELTA_CLIP = math.log(1000.0 / 16.0)


@dataclasses.dataclass(frozen=True)
class AnchorConfig:
    """Anchor layout of every FPN level.

    Attributes:
        strides: stride of each level in input pixels (P3..P7).
        base_sizes: side of the level's square, scale-1 anchor in pixels.
        scales: size multipliers; an anchor has area (base * scale)^2.
        ratios: aspect ratios h / w.
    """

    strides: tuple = (8, 16, 32, 64, 128)
    base_sizes: tuple = (24, 48, 96, 192, 384)
    scales: tuple = (1.0, 2 ** (1 / 3), 2 ** (2 / 3))
    ratios: tuple = (0.5, 1.0, 2.0)

    def __post_init__(self):
        if len(self.strides) != len(self.base_sizes):
            raise ValueError(f"{len(self.strides)} strides but "
                             f"{len(self.base_sizes)} base sizes")

    @property
    def num_anchors(self) -> int:
        """A: anchors per location (len(ratios) * len(scales))."""
        return len(self.ratios) * len(self.scales)


def cell_anchors(base_size: float, config: AnchorConfig) -> np.ndarray:
    """The A anchor shapes of one location, centred on (0, 0).

    Returns:
        float64 [A, 4] (x1, y1, x2, y2), ratio-major then scale.
    """
    out = []
    for ratio in config.ratios:
        for scale in config.scales:
            size = base_size * scale
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            out.append((-w / 2, -h / 2, w / 2, h / 2))
    return np.asarray(out, np.float64)


def anchors_per_level(height: int, width: int, config: AnchorConfig = AnchorConfig()) -> list:
    """Number of anchors of every level: H_l * W_l * A with the ceil rule of levels.py."""
    return [h * w * config.num_anchors
            for h, w in level_shapes(height, width, config.strides)]


def generate_anchors(height: int, width: int,
                     config: AnchorConfig = AnchorConfig()) -> tf.Tensor:
    """All anchors of an input of height x width pixels (python ints), in head order.

    Args:
        height: input height in pixels.
        width: input width in pixels.
        config: anchor layout.

    Returns:
        float32 constant [N, 4] (x1, y1, x2, y2) pixels, N = sum(anchors_per_level(...)).
    """
    chunks = []
    for stride, base, (h, w) in zip(config.strides, config.base_sizes,
                                    level_shapes(height, width, config.strides)):
        ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                             indexing="ij")
        cx, cy = (xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride
        centers = np.stack([cx, cy, cx, cy], axis=-1)                       # [H_l*W_l, 4]
        chunks.append((centers[:, None, :] + cell_anchors(base, config)[None]).reshape(-1, 4))
    return tf.constant(np.concatenate(chunks, axis=0), tf.float32)


def _center_size(boxes):
    """(cx, cy, w, h), each [...], of xyxy boxes [..., 4]."""
    x1, y1, x2, y2 = tf.unstack(boxes, 4, axis=-1)
    return (x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1


def encode_deltas(anchors, boxes, variance=(1.0, 1.0, 1.0, 1.0)):
    """Regression targets of boxes relative to anchors.

    Args:
        anchors: [..., 4] xyxy anchors, broadcastable against ``boxes`` (e.g. [N, 4]).
        boxes: [..., 4] xyxy boxes with positive width and height (e.g. [B, N, 4]).
        variance: 4 divisors of (dx, dy, dw, dh).

    Returns:
        float32 [..., 4] deltas (dx, dy, dw, dh), broadcast shape of the inputs.
    """
    acx, acy, aw, ah = _center_size(tf.cast(anchors, tf.float32))
    cx, cy, w, h = _center_size(tf.cast(boxes, tf.float32))
    deltas = tf.stack([(cx - acx) / aw, (cy - acy) / ah,
                       tf.math.log(w / aw), tf.math.log(h / ah)], axis=-1)
    return deltas / tf.constant(variance, tf.float32)


def decode_deltas(anchors, deltas, variance=(1.0, 1.0, 1.0, 1.0)):
    """Inverse of :func:`encode_deltas`; dw and dh are clipped at log(1000 / 16) first.

    Args:
        anchors: [..., 4] xyxy anchors, broadcastable against ``deltas``.
        deltas: [..., 4] (dx, dy, dw, dh).
        variance: the variance used for encoding.

    Returns:
        float32 [..., 4] xyxy boxes.
    """
    acx, acy, aw, ah = _center_size(tf.cast(anchors, tf.float32))
    d = tf.cast(deltas, tf.float32) * tf.constant(variance, tf.float32)
    dx, dy, dw, dh = tf.unstack(d, 4, axis=-1)
    cx, cy = acx + dx * aw, acy + dy * ah
    w = aw * tf.exp(tf.minimum(dw, DELTA_CLIP))
    h = ah * tf.exp(tf.minimum(dh, DELTA_CLIP))
    return tf.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], axis=-1)


def pairwise_iou(a, b):
    """IoU of every box of ``a`` with every box of ``b`` (x2 / y2 exclusive, no +1).

    Args:
        a: [N, 4] xyxy boxes.
        b: [M, 4] xyxy boxes; M may be 0.

    Returns:
        float32 [N, M]; 0 where the union is empty (degenerate boxes).
    """
    ax1, ay1, ax2, ay2 = tf.unstack(tf.cast(a, tf.float32)[:, None, :], 4, axis=-1)  # [N, 1]
    bx1, by1, bx2, by2 = tf.unstack(tf.cast(b, tf.float32)[None], 4, axis=-1)      # [1, M]
    inter = (tf.maximum(tf.minimum(ax2, bx2) - tf.maximum(ax1, bx1), 0.0)
             * tf.maximum(tf.minimum(ay2, by2) - tf.maximum(ay1, by1), 0.0))       # [N, M]
    area_a = tf.maximum(ax2 - ax1, 0.0) * tf.maximum(ay2 - ay1, 0.0)
    area_b = tf.maximum(bx2 - bx1, 0.0) * tf.maximum(by2 - by1, 0.0)
    return tf.math.divide_no_nan(inter, area_a + area_b - inter)
