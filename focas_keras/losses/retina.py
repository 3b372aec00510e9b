"""Anchor assignment and the RetinaNet loss of Mdet's anchor-based branch.

Everything is in-graph (tf ops only, no python-side state), so it runs eagerly, inside
``tf.function`` / XLA and per replica under ``tf.distribute``. The batch is handled with
``tf.map_fn`` (one image at a time: images have different numbers of valid boxes).
"""

from __future__ import annotations

import math

import tensorflow as tf

from focas_keras.losses.focal import sigmoid_focal_loss
from focas_keras.models.anchors import encode_deltas, pairwise_iou


def retina_prior_bias(p: float = 0.01) -> float:
    """Initial bias of the classification logits so that sigmoid(bias) = p: -log((1-p)/p)."""
    return -math.log((1.0 - p) / p)


def assign_anchors(anchors, gt_boxes, gt_mask, pos_iou: float = 0.5, neg_iou: float = 0.4):
    """Labels every anchor of one image as positive, negative or ignored.

    Rules (RetinaNet): an anchor whose best IoU over the valid boxes is >= ``pos_iou`` is
    positive, < ``neg_iou`` negative, in between ignored. In addition every valid box keeps
    its best anchor (first argmax) as a positive matched to it, whatever that IoU, as long as
    it is > 0, even if that anchor overlaps another box more. Where several boxes share the
    same best anchor, the box with the highest IoU with it wins (ties: the lower index) and
    the others get no forced anchor. Padded boxes (``gt_mask`` False) never match; with no
    valid box every anchor is negative. Deterministic (no scatter with duplicate indices).

    Args:
        anchors: [N, 4] xyxy anchors, N >= 1.
        gt_boxes: [M, 4] xyxy boxes (padded), M >= 0.
        gt_mask: [M] bool, True for real boxes.
        pos_iou: IoU threshold of positives.
        neg_iou: IoU below which anchors are negatives.

    Returns:
        labels: int32 [N]: 1 positive, 0 negative, -1 ignored.
        matched_gt_index: int32 [N] index into ``gt_boxes`` of the matched box; meaningful
            for positives only (others get their best-IoU box, possibly a padded one, or 0
            when M == 0).
    """
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    num_gt = tf.shape(gt_boxes)[0]
    # A padded dummy box keeps argmax defined when M == 0 (argmax of an empty axis fails).
    gt_boxes = tf.concat([gt_boxes, tf.zeros([1, 4])], axis=0)             # [M+1, 4]
    gt_mask = tf.concat([tf.cast(gt_mask, tf.bool), [False]], axis=0)       # [M+1]
    iou = tf.where(gt_mask[None, :], pairwise_iou(anchors, gt_boxes), -1.0)  # [N, M+1]
    num_anchors = tf.shape(iou)[0]
    best_gt = tf.argmax(iou, axis=1, output_type=tf.int32)                  # [N]
    best_iou = tf.gather(iou, best_gt, axis=1, batch_dims=1)
    labels = tf.where(best_iou >= pos_iou, 1, tf.where(best_iou < neg_iou, 0, -1))

    # Low-quality matches, resolved in box space ([M+1] / [M+1, M+1], cheap): box j keeps its
    # best anchor unless a box with the same best anchor has a higher IoU (ties: lower index).
    best_anchor = tf.argmax(iou, axis=0, output_type=tf.int32)              # [M+1]
    gt_index = tf.range(tf.shape(iou)[1])
    value = tf.gather_nd(iou, tf.stack([best_anchor, gt_index], axis=1))    # [M+1]
    ok = gt_mask & (value > 0.0)
    beaten = ((best_anchor[:, None] == best_anchor[None, :]) & ok[None, :]
              & ((value[None, :] > value[:, None])
                 | ((value[None, :] == value[:, None]) & (gt_index[None, :] < gt_index[:, None]))))
    winner = ok & ~tf.reduce_any(beaten, axis=1)                            # [M+1]
    # Winners have distinct anchors, so a segment max picks exactly one box per anchor.
    forced_gt = tf.math.unsorted_segment_max(tf.where(winner, gt_index, -1), best_anchor,
                                             num_anchors)                    # [N]
    forced = forced_gt >= 0
    labels = tf.where(forced, 1, labels)
    matched = tf.where(forced, forced_gt, best_gt)
    matched = tf.minimum(matched, tf.maximum(num_gt - 1, 0))  # the dummy box -> a real one
    return tf.cast(labels, tf.int32), matched


def _box_regression(pred, target, box_loss: str, beta: float):
    """Elementwise box loss [N, 4]: smooth L1 (quadratic below ``beta``) or L1."""
    diff = tf.abs(pred - target)
    if box_loss == "l1":
        return diff
    if box_loss == "smooth_l1":
        return tf.where(diff < beta, 0.5 * tf.square(diff) / beta, diff - 0.5 * beta)
    raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")


def retina_loss(anchor_cls, anchor_box, anchors, gt_boxes, gt_mask, box_loss: str = "smooth_l1",
                alpha: float = 0.25, gamma: float = 2.0, smooth_l1_beta: float = 1.0 / 9.0,
                pos_iou: float = 0.5, neg_iou: float = 0.4, variance=(1.0, 1.0, 1.0, 1.0)):
    """Per-image RetinaNet losses of the anchor branch.

    cls: sigmoid focal loss summed over all non-ignored anchors and all K class channels,
    divided by max(1, number of positive anchors). The boxes carry no class, so every class
    channel of a positive anchor has target 1 (Mdet has K = 1).
    box: smooth L1 (or L1) between ``anchor_box`` and the :func:`encode_deltas` targets of the
    matched boxes, summed over the 4 coordinates and the positive anchors, divided by
    max(1, positives); 0 for an image without boxes. ``smooth_l1_beta`` = 1/9 is Detectron's
    RetinaNet value (quadratic below 1/9, i.e. about 11 % of the anchor size).

    Args:
        anchor_cls: [B, N, K] logits (any float dtype; computed in float32).
        anchor_box: [B, N, 4] predicted deltas (dx, dy, dw, dh).
        anchors: [N, 4] xyxy anchors (:func:`focas_keras.models.anchors.generate_anchors`).
        gt_boxes: [B, M, 4] xyxy boxes in pixels, padded.
        gt_mask: [B, M] bool, True for real boxes.
        box_loss: "smooth_l1" or "l1".
        alpha: focal loss alpha.
        gamma: focal loss gamma.
        smooth_l1_beta: transition point of the smooth L1 loss.
        pos_iou: IoU threshold of positive anchors.
        neg_iou: IoU below which anchors are negative.
        variance: delta divisors, as in :func:`encode_deltas`.

    Returns:
        dict with "cls" and "box": float32 [B] losses of every image.
    """
    if box_loss not in ("smooth_l1", "l1"):
        raise ValueError(f"box_loss must be 'smooth_l1' or 'l1', got {box_loss!r}")
    anchor_cls = tf.cast(anchor_cls, tf.float32)
    anchor_box = tf.cast(anchor_box, tf.float32)
    anchors = tf.cast(anchors, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_mask = tf.cast(gt_mask, tf.bool)

    def per_image(args):
        cls, box, boxes, mask = args
        labels, matched_index = assign_anchors(anchors, boxes, mask, pos_iou, neg_iou)
        positive = labels == 1
        num_pos = tf.reduce_sum(tf.cast(positive, tf.float32))
        norm = tf.maximum(1.0, num_pos)

        target = tf.broadcast_to(tf.cast(positive, tf.float32)[:, None], tf.shape(cls))
        focal = sigmoid_focal_loss(target, cls, alpha, gamma)               # [N, K]
        cls_loss = tf.reduce_sum(tf.where((labels >= 0)[:, None], focal, 0.0)) / norm

        # Non-positive anchors regress onto themselves (target 0): never log(0) or NaN.
        boxes = tf.concat([boxes, tf.constant([[0.0, 0.0, 1.0, 1.0]])], axis=0)
        matched = tf.gather(boxes, matched_index)                           # [N, 4]
        matched = tf.where(positive[:, None], matched, anchors)
        targets = tf.stop_gradient(encode_deltas(anchors, matched, variance))
        reg = _box_regression(box, targets, box_loss, smooth_l1_beta)       # [N, 4]
        box_value = tf.reduce_sum(tf.where(positive[:, None], reg, 0.0)) / norm
        return cls_loss, box_value

    cls_loss, box_value = tf.map_fn(
        per_image, (anchor_cls, anchor_box, gt_boxes, gt_mask),
        fn_output_signature=(tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32)))
    return {"cls": cls_loss, "box": box_value}
