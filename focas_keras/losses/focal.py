"""Sigmoid focal loss (Lin et al., 2017), elementwise.

``keras.losses.BinaryFocalCrossentropy(apply_class_balancing=True, from_logits=True,
reduction=None)`` computes the same quantity but always averages over the last axis, so it
cannot give the per-anchor, per-class values the detector losses need; this module computes
them directly (``tests/test_retina_loss.py`` checks agreement up to that axis mean).
"""

from __future__ import annotations

import tensorflow as tf


def sigmoid_focal_loss(labels, logits, alpha: float = 0.25, gamma: float = 2.0):
    """Elementwise focal loss of sigmoid logits, no reduction.

    FL = -alpha_t * (1 - p_t)^gamma * log(p_t), with p = sigmoid(logits),
    p_t = y * p + (1 - y) * (1 - p) and alpha_t = y * alpha + (1 - y) * (1 - alpha).
    The log term is ``tf.nn.sigmoid_cross_entropy_with_logits`` (stable for any logit);
    everything is computed in float32 whatever the input dtype (mixed precision).

    Args:
        labels: [...] targets in [0, 1], any numeric dtype.
        logits: [...] raw scores, same shape as ``labels``.
        alpha: weight of the positive class (negatives get 1 - alpha); None for none.
        gamma: focusing exponent (>= 0); 0 gives (alpha-weighted) cross-entropy.

    Returns:
        float32 [...] loss of every element.
    """
    labels = tf.cast(labels, tf.float32)
    logits = tf.cast(logits, tf.float32)
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
    p = tf.sigmoid(logits)
    one_minus_pt = labels * (1.0 - p) + (1.0 - labels) * p
    loss = ce if gamma == 0 else ce * tf.pow(one_minus_pt, gamma)
    if alpha is not None:
        loss = loss * (labels * alpha + (1.0 - labels) * (1.0 - alpha))
    return loss
