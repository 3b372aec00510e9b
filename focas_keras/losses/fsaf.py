"""Target assignment and loss of Mdet's anchor-free (FSAF) branch.

FSAF (Zhu et al., CVPR 2019) attaches an anchor-free branch to every FPN level and picks, per
ground-truth box and per training step, the level whose current predictions fit it best
("online feature selection"). Conventions used throughout this module:

* Locations follow :mod:`focas_keras.models.levels`: levels in stride order, each level
  row-major; location (x, y) of a level with stride s has its centre at
  ((x + 0.5) s, (y + 0.5) s). ``L`` is the total number of locations of all levels.
* Boxes are (x1, y1, x2, y2) in input pixels, x2 / y2 exclusive.
* Box distances are always in the order **T, B, L, R** (top, bottom, left, right): for a
  location centre (px, py) and a box, (py - y1, y2 - py, px - x1, x2 - px) / (4 s).
* Regions of a box b at the level with stride s: the *effective region* is b shrunk around its
  centre to ``effective`` (0.2) of its width and height; a location is inside when its centre
  lies in the closed shrunk box. Mitoses (26-68 px) are small against strides up to 128, so the
  single location whose cell contains the box centre, (floor(cx / s), floor(cy / s)), is always
  added to the effective region: every GT whose centre lies in the image has >= 1 effective
  location at every level. The *ignoring region* is b shrunk to ``ignore`` (0.5) minus the
  effective region.
* Box loss: IoU loss -log(IoU) on decoded boxes, IoU clipped to >= 1e-6 (mmdetection's
  default), so a miss costs at most -log(1e-6) ~ 13.8 and never NaN / inf. Classification:
  sigmoid focal loss (alpha 0.25, gamma 2) from logits.

Only one class (K = 1) is supported: the branch's ``free_cls`` must have a last axis of 1.
"""

from __future__ import annotations

import tensorflow as tf

from focas_keras.losses.focal import sigmoid_focal_loss
from focas_keras.models.levels import level_shapes, location_centers

DEFAULT_STRIDES = (8, 16, 32, 64, 128)
BOX_SCALE = 4.0  # distances are normalised by BOX_SCALE * stride
IOU_EPS = 1e-6  # IoU is clipped to >= IOU_EPS before the log


def encode_tblr(centers, boxes, strides):
    """Normalised T, B, L, R distances from location centres to box sides.

    Args:
        centers: [P, 2] (x, y) location centres in pixels.
        boxes: [P, 4] (x1, y1, x2, y2) boxes in pixels.
        strides: [P] stride of each location's level.

    Returns:
        float32 [P, 4] (top, bottom, left, right) / (4 * stride).
    """
    centers = tf.cast(centers, tf.float32)
    boxes = tf.cast(boxes, tf.float32)
    scale = BOX_SCALE * tf.cast(strides, tf.float32)[..., None]
    px, py = centers[..., 0], centers[..., 1]
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    return tf.stack([py - y1, y2 - py, px - x1, x2 - px], axis=-1) / scale


def decode_tblr(centers, dists, strides):
    """Boxes from normalised T, B, L, R distances (inverse of :func:`encode_tblr`).

    Args:
        centers: [P, 2] (x, y) location centres in pixels.
        dists: [P, 4] (top, bottom, left, right) / (4 * stride).
        strides: [P] stride of each location's level.

    Returns:
        float32 [P, 4] (x1, y1, x2, y2) = (px - l 4s, py - t 4s, px + r 4s, py + b 4s).
    """
    centers = tf.cast(centers, tf.float32)
    scale = BOX_SCALE * tf.cast(strides, tf.float32)[..., None]
    t, b, l, r = tf.unstack(tf.cast(dists, tf.float32) * scale, axis=-1)
    px, py = centers[..., 0], centers[..., 1]
    return tf.stack([px - l, py - t, px + r, py + b], axis=-1)


def iou_loss(pred_boxes, target_boxes):
    """Elementwise IoU loss -log(max(IoU, 1e-6)) between broadcastable box tensors.

    Args:
        pred_boxes: [..., 4] (x1, y1, x2, y2).
        target_boxes: [..., 4] (x1, y1, x2, y2), broadcastable against ``pred_boxes``.

    Returns:
        float32 [...] losses in [0, -log(1e-6)]; degenerate boxes give the maximum, not NaN.
    """
    a = tf.cast(pred_boxes, tf.float32)
    b = tf.cast(target_boxes, tf.float32)
    iw = tf.maximum(tf.minimum(a[..., 2], b[..., 2]) - tf.maximum(a[..., 0], b[..., 0]), 0.0)
    ih = tf.maximum(tf.minimum(a[..., 3], b[..., 3]) - tf.maximum(a[..., 1], b[..., 1]), 0.0)
    inter = iw * ih
    area_a = tf.maximum(a[..., 2] - a[..., 0], 0.0) * tf.maximum(a[..., 3] - a[..., 1], 0.0)
    area_b = tf.maximum(b[..., 2] - b[..., 0], 0.0) * tf.maximum(b[..., 3] - b[..., 1], 0.0)
    union = tf.maximum(area_a + area_b - inter, 1e-9)
    return -tf.math.log(tf.maximum(inter / union, IOU_EPS))


def level_layout(height, width, strides=DEFAULT_STRIDES):
    """Centres, strides and level indices of all locations, in head-output order.

    Args:
        height: input height in pixels (python int).
        width: input width in pixels (python int).
        strides: strides of the levels, increasing.

    Returns:
        (centers float32 [L, 2] (x, y), loc_strides float32 [L], level_ids int32 [L]) with
        L = sum_l ceil(height / s_l) * ceil(width / s_l); ``level_ids`` is 0 for the first level.
    """
    centers, loc_strides, level_ids = [], [], []
    for index, (stride, (h, w)) in enumerate(zip(strides, level_shapes(height, width, strides))):
        centers.append(location_centers(height, width, stride))
        loc_strides.append(tf.fill([h * w], tf.constant(float(stride), tf.float32)))
        level_ids.append(tf.fill([h * w], tf.constant(index, tf.int32)))
    return tf.concat(centers, 0), tf.concat(loc_strides, 0), tf.concat(level_ids, 0)


def _num_levels(level_ids, num_levels):
    if num_levels is not None:
        return num_levels
    static = tf.get_static_value(level_ids)
    if static is not None and static.size:
        return int(static.max()) + 1
    return tf.reduce_max(level_ids) + 1


def gt_regions(gt_boxes, centers, loc_strides, level_ids, num_levels, effective=0.2,
               ignore=0.5):
    """Effective and ignoring regions of every box at every level.

    Args:
        gt_boxes: [M, 4] (x1, y1, x2, y2) boxes in pixels.
        centers: [L, 2] location centres from :func:`level_layout`.
        loc_strides: [L] location strides.
        level_ids: [L] int32 level index of each location.
        num_levels: number of levels (int or scalar tensor).
        effective: side ratio of the effective region.
        ignore: side ratio of the outer (ignoring) region.

    Returns:
        dict of
        ``effective`` bool [M, L]: inside the ``effective`` region, or the location whose cell
        holds the box centre;
        ``ignore_region`` bool [M, L]: inside the ``ignore`` region but not ``effective``;
        ``outer`` bool [M, L]: ``effective | ignore_region`` (what adjacent levels ignore);
        ``counts`` float32 [M, num_levels]: number of effective locations per level.
    """
    boxes = tf.cast(gt_boxes, tf.float32)
    centers = tf.cast(centers, tf.float32)
    strides = tf.cast(loc_strides, tf.float32)[None, :]
    x1, y1, x2, y2 = [c[:, None] for c in tf.unstack(boxes, num=4, axis=-1)]
    cx, cy = (x1 + x2) * 0.5, (y1 + y2) * 0.5
    w, h = x2 - x1, y2 - y1
    px, py = centers[None, :, 0], centers[None, :, 1]

    def inside(ratio):
        return (tf.abs(px - cx) <= 0.5 * ratio * w) & (tf.abs(py - cy) <= 0.5 * ratio * h)

    centre_cell = ((tf.floor(px / strides) == tf.floor(cx / strides))
                   & (tf.floor(py / strides) == tf.floor(cy / strides)))
    eff = inside(effective) | centre_cell
    outer = inside(ignore) | eff
    counts = tf.matmul(tf.cast(eff, tf.float32),
                       tf.one_hot(level_ids, num_levels, dtype=tf.float32))
    return {"effective": eff, "ignore_region": outer & ~eff, "outer": outer, "counts": counts}


def select_levels(free_cls, free_box, gt_boxes, gt_mask, layout, num_levels=None,
                  effective=0.2, ignore=0.5, alpha=0.25, gamma=2.0):
    """Online feature selection: the level whose predictions currently fit each GT best.

    For every GT and level, the cost is the mean focal loss (target 1) plus the mean IoU loss
    over the GT's effective locations at that level; the level of smallest cost is selected
    (ties: the lower level). Computed entirely under ``tf.stop_gradient``.

    Args:
        free_cls: [L, 1] logits of one image.
        free_box: [L, 4] non-negative normalised T, B, L, R distances.
        gt_boxes: [M, 4] (x1, y1, x2, y2) boxes.
        gt_mask: bool [M], False for padding.
        layout: (centers, loc_strides, level_ids) from :func:`level_layout`.
        num_levels: number of levels; inferred from ``level_ids`` when None.
        effective, ignore: region ratios (see :func:`gt_regions`).
        alpha, gamma: focal loss parameters.

    Returns:
        int32 [M] selected level index (0 = first level), -1 for padded GTs.
    """
    centers, loc_strides, level_ids = layout
    n = _num_levels(level_ids, num_levels)
    logits = tf.stop_gradient(tf.cast(free_cls, tf.float32))[:, 0]
    dists = tf.stop_gradient(tf.cast(free_box, tf.float32))
    boxes = tf.stop_gradient(tf.cast(gt_boxes, tf.float32))
    regions = gt_regions(boxes, centers, loc_strides, level_ids, n, effective, ignore)
    eff = tf.cast(regions["effective"], tf.float32)  # [M, L]
    pred = decode_tblr(centers, dists, loc_strides)  # [L, 4]
    cost = (sigmoid_focal_loss(tf.ones_like(logits), logits, alpha, gamma)[None, :]
            + iou_loss(pred[None, :, :], boxes[:, None, :]))  # [M, L], finite
    sums = tf.matmul(eff * cost, tf.one_hot(level_ids, n, dtype=tf.float32))  # [M, n]
    counts = regions["counts"]
    mean = tf.where(counts > 0, sums / tf.maximum(counts, 1.0), tf.constant(float("inf")))
    selected = tf.argmin(mean, axis=1, output_type=tf.int32)
    return tf.stop_gradient(tf.where(tf.cast(gt_mask, tf.bool), selected, -1))


def fsaf_targets(gt_boxes, gt_mask, selected_levels, layout, num_levels=None, effective=0.2,
                 ignore=0.5):
    """Per-location targets of one image given each GT's selected level.

    A GT is positive at its effective locations of its selected level; its ignoring region
    there and its whole outer (0.5) region on the two adjacent levels get no cls loss, unless
    a location is positive for another GT. A location positive for several GTs takes the one
    of smallest area (ties: lowest GT index).

    Args:
        gt_boxes: [M, 4] (x1, y1, x2, y2) boxes.
        gt_mask: bool [M], False for padding.
        selected_levels: int32 [M] from :func:`select_levels` (negative = unused GT).
        layout: (centers, loc_strides, level_ids) from :func:`level_layout`.
        num_levels: number of levels; inferred from ``level_ids`` when None.
        effective, ignore: region ratios (see :func:`gt_regions`).

    Returns:
        (cls_target float32 [L] in {0, 1}, cls_weight float32 [L] (0 on ignored locations),
        box_target_boxes float32 [L, 4] (assigned GT box, zeros off positives), pos_mask
        bool [L]).
    """
    centers, loc_strides, level_ids = layout
    n = _num_levels(level_ids, num_levels)
    # One padded row keeps the reductions over GTs well defined when M == 0.
    boxes = tf.concat([tf.cast(gt_boxes, tf.float32), tf.zeros([1, 4], tf.float32)], 0)
    mask = tf.concat([tf.cast(gt_mask, tf.bool), [False]], 0)
    sel = tf.concat([tf.cast(selected_levels, tf.int32), [-1]], 0)[:, None]
    valid = (mask & (sel[:, 0] >= 0))[:, None]
    regions = gt_regions(boxes, centers, loc_strides, level_ids, n, effective, ignore)
    lvl = tf.cast(level_ids, tf.int32)[None, :]
    at_sel = (lvl == sel) & valid
    adjacent = (tf.abs(lvl - sel) == 1) & valid
    pos_m = regions["effective"] & at_sel  # [M + 1, L]
    ign_m = (regions["ignore_region"] & at_sel) | (regions["outer"] & adjacent)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_m = tf.where(pos_m, area[:, None], tf.constant(float("inf")))
    winner = tf.argmin(area_m, axis=0, output_type=tf.int32)  # [L]
    pos = tf.reduce_any(pos_m, axis=0)
    ignored = tf.reduce_any(ign_m, axis=0) & ~pos
    box_target = tf.where(pos[:, None], tf.gather(boxes, winner), 0.0)
    return (tf.cast(pos, tf.float32), 1.0 - tf.cast(ignored, tf.float32), box_target, pos)


def _image_loss(logits, dists, targets, layout, alpha=0.25, gamma=2.0):
    """(cls, box) scalar losses of one image: sums normalised by max(1, positives).

    Args:
        logits: [L] logits. dists: [L, 4] predicted normalised T, B, L, R distances.
        targets: output of :func:`fsaf_targets`. layout: from :func:`level_layout`.
    """
    centers, loc_strides, _ = layout
    cls_target, cls_weight, box_boxes, pos = targets
    num_pos = tf.maximum(tf.reduce_sum(tf.cast(pos, tf.float32)), 1.0)
    focal = sigmoid_focal_loss(cls_target, logits, alpha, gamma)
    cls = tf.reduce_sum(focal * cls_weight) / num_pos
    pred = decode_tblr(centers, dists, loc_strides)
    box = tf.reduce_sum(tf.where(pos, iou_loss(pred, box_boxes), 0.0)) / num_pos
    return cls, box


def fsaf_loss(free_cls, free_box, gt_boxes, gt_mask, height, width, strides=DEFAULT_STRIDES,
              effective=0.2, ignore=0.5, alpha=0.25, gamma=2.0, return_levels=False):
    """FSAF loss of a batch with online feature selection.

    Args:
        free_cls: [B, L, 1] logits (any float dtype; computed in float32).
        free_box: [B, L, 4] non-negative normalised T, B, L, R distances.
        gt_boxes: [B, M, 4] (x1, y1, x2, y2) pixel boxes, padded.
        gt_mask: bool [B, M], False for padding.
        height, width: input size in pixels (python ints).
        strides: level strides, in head-output order.
        effective, ignore: region ratios (see :func:`gt_regions`).
        alpha, gamma: focal loss parameters.
        return_levels: also return the selected levels.

    Returns:
        dict with ``cls`` float32 [B] (focal loss summed over non-ignored locations) and ``box``
        float32 [B] (IoU loss summed over positives), both divided by max(1, positives), and
        with ``levels`` int32 [B, M] (-1 for padding) when ``return_levels``.
    """
    layout = level_layout(height, width, strides)
    num_locations = sum(h * w for h, w in level_shapes(height, width, strides))
    free_cls = tf.cast(free_cls, tf.float32)
    free_box = tf.cast(free_box, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_mask = tf.cast(gt_mask, tf.bool)
    if free_cls.shape.rank is not None and free_cls.shape[-1] not in (None, 1):
        raise ValueError(f"fsaf_loss supports one class, got free_cls {free_cls.shape}")
    for name, tensor in (("free_cls", free_cls), ("free_box", free_box)):
        if tensor.shape.rank is not None and tensor.shape[1] not in (None, num_locations):
            raise ValueError(f"{name} has {tensor.shape[1]} locations, expected "
                             f"{num_locations} for {height}x{width} and strides {strides}")
    n = len(strides)

    def per_image(args):
        cls_i, box_i, boxes_i, mask_i = args
        selected = select_levels(cls_i, box_i, boxes_i, mask_i, layout, n, effective, ignore,
                                 alpha, gamma)
        targets = fsaf_targets(boxes_i, mask_i, selected, layout, n, effective, ignore)
        cls, box = _image_loss(cls_i[:, 0], box_i, targets, layout, alpha, gamma)
        return cls, box, selected

    cls, box, levels = tf.map_fn(
        per_image, (free_cls, free_box, gt_boxes, gt_mask),
        fn_output_signature=(tf.TensorSpec([], tf.float32), tf.TensorSpec([], tf.float32),
                             tf.TensorSpec([None], tf.int32)))
    out = {"cls": cls, "box": box}
    if return_levels:
        out["levels"] = levels
    return out
