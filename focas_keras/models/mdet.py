"""Mdet: backbone + FPN + hybrid head, its loss, and decoding to boxes."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from focas_keras.losses.fsaf import decode_tblr, fsaf_loss, level_layout
from focas_keras.losses.retina import retina_loss
from focas_keras.models import levels
from focas_keras.models.anchors import AnchorConfig, decode_deltas, generate_anchors
from focas_keras.models.backbone import build_backbone
from focas_keras.models.fpn import FPN
from focas_keras.models.head import HybridHead
from focas_keras.models.mdet_config import MdetConfig


def anchor_config(config: MdetConfig) -> AnchorConfig:
    """The anchor settings of a config, one base size per FPN level."""
    strides = config.strides
    return AnchorConfig(strides=strides, base_sizes=tuple(config.head.base_sizes[:len(strides)]),
                        scales=tuple(config.head.scales), ratios=tuple(config.head.ratios))


def build_mdet(config: MdetConfig) -> keras.Model:
    """Builds Mdet for images of any size (multiples of the largest stride are exact).

    Input: float32 [B, H, W, 3] RGB in [0, 1]. Outputs: the :class:`HybridHead` dict
    (``anchor_cls``/``anchor_box`` when the head is ``anchor`` or ``hybrid``,
    ``free_cls``/``free_box`` when it is ``free`` or ``hybrid``).
    """
    bb, fpn_cfg, head_cfg = config.backbone, config.fpn, config.head
    inputs = keras.Input((None, None, 3), name="image")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_unit_range")(inputs)
    backbone = build_backbone(depth=bb.depth, norm=bb.norm, ws=bb.ws, cbam=bb.cbam,
                              width=bb.width, resnext=bb.resnext, name="backbone")
    features = backbone(x)
    input_levels = tuple(level for level in (3, 4, 5) if level >= fpn_cfg.min_level)
    pyramid = FPN(channels=fpn_cfg.channels, min_level=fpn_cfg.min_level,
                  max_level=fpn_cfg.max_level, input_levels=input_levels, name="fpn")(
        {f"C{level}": features[f"C{level}"] for level in input_levels})
    head = HybridHead(num_classes=1, num_anchors=anchor_config(config).num_anchors,
                      channels=fpn_cfg.channels, tower_depth=head_cfg.tower_depth,
                      use_anchor=head_cfg.head in ("anchor", "hybrid"),
                      use_free=head_cfg.head in ("free", "hybrid"),
                      prior_prob=head_cfg.prior_prob, name="head")
    outputs = head([pyramid[f"P{level}"]
                    for level in range(fpn_cfg.min_level, fpn_cfg.max_level + 1)])
    return keras.Model(inputs, outputs, name="mdet")


def mdet_loss(outputs: dict, gt_boxes, gt_mask, height: int, width: int,
              config: MdetConfig) -> dict:
    """Per-image losses of both branches.

    Args:
        outputs: the model's output dict for a batch of B images of height x width.
        gt_boxes: float32 [B, M, 4] x1, y1, x2, y2 pixels.
        gt_mask: bool [B, M] real boxes.
        height, width: python ints, the input size.
        config: the run's config.

    Returns:
        dict of float32 [B] tensors: ``anchor_cls``, ``anchor_box``, ``free_cls``, ``free_box``
        (those of the enabled branches) and ``total`` = L_anchor + free_weight * L_free.
    """
    head = config.head
    losses = {}
    total = 0.0
    if "anchor_cls" in outputs:
        anchors = generate_anchors(height, width, anchor_config(config))
        part = retina_loss(outputs["anchor_cls"], outputs["anchor_box"], anchors, gt_boxes,
                           gt_mask, box_loss=head.box_loss, alpha=head.alpha, gamma=head.gamma,
                           pos_iou=head.pos_iou, neg_iou=head.neg_iou)
        losses["anchor_cls"], losses["anchor_box"] = part["cls"], part["box"]
        total += part["cls"] + part["box"]
    if "free_cls" in outputs:
        part = fsaf_loss(outputs["free_cls"], outputs["free_box"], gt_boxes, gt_mask, height,
                         width, strides=config.strides, effective=head.effective,
                         ignore=head.ignore, alpha=head.alpha, gamma=head.gamma)
        losses["free_cls"], losses["free_box"] = part["cls"], part["box"]
        weight = head.free_weight if "anchor_cls" in outputs else 1.0
        total += weight * (part["cls"] + part["box"])
    losses["total"] = total
    return losses


def _level_topk(scores, boxes, sizes, k):
    """Top-k per level of flattened [B, N] scores / [B, N, 4] boxes."""
    kept_scores, kept_boxes = [], []
    start = 0
    for size in sizes:
        level_scores = scores[:, start:start + size]
        level_boxes = boxes[:, start:start + size]
        top = tf.math.top_k(level_scores, k=min(k, size))
        kept_scores.append(top.values)
        kept_boxes.append(tf.gather(level_boxes, top.indices, batch_dims=1))
        start += size
    return kept_scores, kept_boxes


def decode_detections(outputs: dict, height: int, width: int, config: MdetConfig,
                      valid_height=None, valid_width=None, score_threshold=None,
                      max_detections=None) -> dict:
    """Decodes both branches, keeps top-k per level, merges, runs class-agnostic NMS.

    Args:
        outputs: the model's output dict for B images of the (padded) size height x width.
        height, width: python ints.
        config: gives the inference settings.
        valid_height, valid_width: the unpadded size (python numbers or scalar tensors);
            boxes are clipped to it (default: the padded size). When given, a box more than
            half of whose height or width lies outside it (its centre is outside ``[0, W] x
            [0, H]``) is dropped before NMS: in a mirror-padded input it is the twin of a box
            inside, and clipped it would be a sliver along the border taking one of the
            ``max_detections`` places. So is a box left without area by the clipping.
        score_threshold: overrides ``config.inference.score_threshold``.
        max_detections: python int, the detections kept per image; None:
            ``config.inference.max_detections``.

    Returns:
        dict with ``boxes`` float32 [B, D, 4] (x1, y1, x2, y2 input pixels), ``scores`` [B, D],
        ``num_detections`` int32 [B]; D = ``max_detections``, padded with zeros; ``topk_full``
        bool [B]: some level had more boxes than ``topk_per_level`` and its k-th best score
        reached the threshold, so the per-level top-k may have cut candidates.
    """
    inf = config.inference
    threshold = inf.score_threshold if score_threshold is None else score_threshold
    cap = int(inf.max_detections if max_detections is None else max_detections)
    if cap < 1:
        raise ValueError(f"max_detections must be >= 1, got {cap}")
    all_scores, all_boxes, all_sizes = [], [], []
    shapes = levels.level_shapes(height, width, config.strides)
    if "anchor_cls" in outputs:
        acfg = anchor_config(config)
        anchors = generate_anchors(height, width, acfg)
        scores = tf.reduce_max(tf.sigmoid(tf.cast(outputs["anchor_cls"], tf.float32)), -1)
        boxes = decode_deltas(anchors, tf.cast(outputs["anchor_box"], tf.float32))
        sizes = [h * w * acfg.num_anchors for h, w in shapes]
        s, b = _level_topk(scores, boxes, sizes, inf.topk_per_level)
        all_scores += s
        all_boxes += b
        all_sizes += sizes
    if "free_cls" in outputs:
        centers, loc_strides, _ = level_layout(height, width, config.strides)
        scores = tf.reduce_max(tf.sigmoid(tf.cast(outputs["free_cls"], tf.float32)), -1)
        dists = tf.cast(outputs["free_box"], tf.float32)
        batch = tf.shape(dists)[0]
        flat = tf.reshape(dists, [-1, 4])
        tiled_centers = tf.tile(centers, [batch, 1])
        tiled_strides = tf.tile(loc_strides, [batch])
        boxes = tf.reshape(decode_tblr(tiled_centers, flat, tiled_strides), [batch, -1, 4])
        s, b = _level_topk(scores, boxes, [h * w for h, w in shapes], inf.topk_per_level)
        all_scores += s
        all_boxes += b
        all_sizes += [h * w for h, w in shapes]
    topk_full = tf.zeros_like(all_scores[0][:, 0], tf.bool)
    for level_scores, size in zip(all_scores, all_sizes):
        if size > inf.topk_per_level:  # the k-th best kept score reached the threshold
            topk_full |= level_scores[:, -1] >= threshold
    scores = tf.concat(all_scores, axis=1)
    boxes = tf.concat(all_boxes, axis=1)
    vh = tf.cast(height if valid_height is None else valid_height, tf.float32)
    vw = tf.cast(width if valid_width is None else valid_width, tf.float32)
    inside = centre_inside(boxes, vh, vw)  # before clipping moves the centres
    boxes = tf.stack([tf.clip_by_value(boxes[..., 0], 0.0, vw),
                      tf.clip_by_value(boxes[..., 1], 0.0, vh),
                      tf.clip_by_value(boxes[..., 2], 0.0, vw),
                      tf.clip_by_value(boxes[..., 3], 0.0, vh)], axis=-1)
    if valid_height is not None or valid_width is not None:
        # The cascade drops boxes without area anyway; here they would take places first.
        keep = inside & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
        # Scores are sigmoids >= 0 and the threshold is >= 0, so -1 always falls below it.
        scores = tf.where(keep, scores, -1.0)
    # combined_non_max_suppression wants (y1, x1, y2, x2); it pads to max_total_size.
    yx = tf.gather(boxes, [1, 0, 3, 2], axis=-1)
    nms = tf.image.combined_non_max_suppression(
        yx[:, :, None, :], scores[:, :, None], max_output_size_per_class=cap,
        max_total_size=cap, iou_threshold=inf.nms_iou,
        score_threshold=threshold, clip_boxes=False)
    out_boxes = tf.gather(nms.nmsed_boxes, [1, 0, 3, 2], axis=-1)
    return {"boxes": out_boxes, "scores": nms.nmsed_scores,
            "num_detections": tf.cast(nms.valid_detections, tf.int32), "topk_full": topk_full}


def centre_inside(boxes, height, width):
    """bool [...]: which x1, y1, x2, y2 ``boxes`` [..., 4] have their centre in the closed
    rectangle ``[0, width] x [0, height]`` (at least half of the box inside, per axis)."""
    cx = (boxes[..., 0] + boxes[..., 2]) / 2.0
    cy = (boxes[..., 1] + boxes[..., 3]) / 2.0
    return (cx >= 0.0) & (cx <= width) & (cy >= 0.0) & (cy <= height)


def mirror_indices(length, size):
    """Source indices of a side of ``length`` px mirrored out to ``size`` px at its end.

    The half-sample (edge-repeating, NumPy ``symmetric``) mirror, continued periodically
    (period ``2 * length``) where ``size`` exceeds twice ``length``: what repeated
    ``tf.pad(mode="SYMMETRIC")`` gives, for any pad. Works on python/NumPy ints (NumPy result)
    and on int32 scalar tensors (tensor result), with the same arithmetic.

    Returns:
        int [size] indices into ``[0, length)``; the first ``length`` are ``0 .. length - 1``.
    """
    if isinstance(length, tf.Tensor) or isinstance(size, tf.Tensor):
        i = tf.range(size) % (2 * length)
        return tf.where(i < length, i, 2 * length - 1 - i)
    i = np.arange(size) % (2 * length)
    return np.where(i < length, i, 2 * length - 1 - i)


def mirror_pad(images, height: int, width: int):
    """Mirrors [B, H, W, C] images at the bottom/right out to ``height`` x ``width``.

    Static sizes only (python ints); see :func:`mirror_indices` for the mirror. A dark border
    of zeros would look like tissue edges to Mdet, which then spends its candidates on it.
    """
    h, w = images.shape[1], images.shape[2]
    if (h, w) == (height, width):
        return images
    if height <= 2 * h and width <= 2 * w:  # one mirror step: tf.pad's own op
        return tf.pad(images, [[0, 0], [0, height - h], [0, width - w], [0, 0]],
                      mode="SYMMETRIC")
    images = tf.gather(images, mirror_indices(h, height), axis=1)
    return tf.gather(images, mirror_indices(w, width), axis=2)


def pad_to_stride(images, stride: int):
    """Mirror-pads [B, H, W, 3] images at the bottom/right to multiples of ``stride``.

    See :func:`mirror_pad`: the padding repeats the image next to it, so the border of a
    field (e.g. 1042 px, padded to 1056) is no darker than its inside.

    Returns:
        (padded images [B, H', W', 3], (H, W) original python ints when static).
    """
    height, width = images.shape[1], images.shape[2]
    pad_h = (-height) % stride
    pad_w = (-width) % stride
    if pad_h or pad_w:
        images = mirror_pad(images, height + pad_h, width + pad_w)
    return images, (height, width)


#: Inputs are padded to a multiple of C5's stride. The FPN's top-down path only needs C3-C5 to
#: align; P6/P7 come from stride-2 'same' convs, whose ceil sizes match the decoder's
#: ceil(H / stride) rule, so padding to 128 (P7) would only add work.
INPUT_MULTIPLE = 32


def detect_batch(model: keras.Model, images, config: MdetConfig, score_threshold=None,
                 max_detections=None, valid_height=None, valid_width=None) -> dict:
    """Runs Mdet on a batch of float [B, H, W, 3] images in [0, 1] of any size.

    The batch is mirror-padded at the bottom/right to a multiple of :data:`INPUT_MULTIPLE`
    (:func:`pad_to_stride`).

    Args:
        max_detections: detections kept per image (None: the config's).
        valid_height, valid_width: the part of the images that is image, not padding the
            caller added (python ints or scalar tensors; default: H, W); see
            :func:`decode_detections`.

    Returns:
        :func:`decode_detections` output in the unpadded image's pixels.
    """
    images = tf.convert_to_tensor(images, tf.float32)
    padded, (height, width) = pad_to_stride(images, INPUT_MULTIPLE)
    outputs = model(padded, training=False)
    return decode_detections(outputs, padded.shape[1], padded.shape[2], config,
                             valid_height=height if valid_height is None else valid_height,
                             valid_width=width if valid_width is None else valid_width,
                             score_threshold=score_threshold, max_detections=max_detections)


class Detector:
    """Mdet forward pass and decoding compiled into one graph per input size.

    Eager execution of a whole-HPF forward pass costs about a third more than the same
    graph (no op fusion, every intermediate map allocated separately); tracing costs a few
    seconds once per distinct padded size, so use this for repeated calls (tiles of one
    size, HPFs of one size) and :func:`detect_batch` for one-off calls.

    Args:
        model: a built Mdet.
        config: its :class:`MdetConfig`.
        score_threshold: overrides ``config.inference.score_threshold``.
        max_detections: detections kept per image (D of the outputs); None:
            ``config.inference.max_detections``.
    """

    def __init__(self, model: keras.Model, config: MdetConfig, score_threshold=None,
                 max_detections: int | None = None):
        self.model, self.config = model, config
        self.score_threshold = score_threshold
        self.max_detections = int(config.inference.max_detections if max_detections is None
                                  else max_detections)
        if self.max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self._compiled = tf.function(self._forward, autograph=False)

    def _forward(self, padded, height: int, width: int):
        outputs = self.model(padded, training=False)
        return decode_detections(outputs, padded.shape[1], padded.shape[2], self.config,
                                 valid_height=height, valid_width=width,
                                 score_threshold=self.score_threshold,
                                 max_detections=self.max_detections)

    def __call__(self, images, valid_height: int | None = None,
                 valid_width: int | None = None) -> dict:
        """Like :func:`detect_batch`: float [B, H, W, 3] images in [0, 1] of any size.

        ``valid_height``/``valid_width`` (python ints, default H, W): the part that is image
        where the caller padded the images itself (see :func:`decode_detections`).
        """
        images = tf.convert_to_tensor(images, tf.float32)
        padded, (height, width) = pad_to_stride(images, INPUT_MULTIPLE)
        return self._compiled(padded, int(height if valid_height is None else valid_height),
                              int(width if valid_width is None else valid_width))

    def detect_image(self, image):
        """Like :func:`detect_image` for one uint8 RGB (H, W, 3) image."""
        dets = self(tf.cast(tf.convert_to_tensor(image)[None], tf.float32) / 255.0)
        count = int(dets["num_detections"][0])
        return dets["boxes"][0, :count].numpy(), dets["scores"][0, :count].numpy()


def detect_image(model: keras.Model, image, config: MdetConfig, score_threshold=None):
    """Mdet on one whole uint8 RGB image (H, W, 3).

    Returns:
        (boxes float32 (D, 4) x1, y1, x2, y2 pixels, scores float32 (D,)), best first.
    """
    batch = tf.cast(tf.convert_to_tensor(image)[None], tf.float32) / 255.0
    dets = detect_batch(model, batch, config, score_threshold=score_threshold)
    count = int(dets["num_detections"][0])
    return dets["boxes"][0, :count].numpy(), dets["scores"][0, :count].numpy()
