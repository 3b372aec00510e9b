"""Tests of the anchor-free (FSAF) branch's targets, online level selection and loss."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import math  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from focas_keras.losses import fsaf  # noqa: E402
from focas_keras.models.levels import level_shapes  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)
SIZE = 256


def _index(level, x, y, height=SIZE, width=SIZE, strides=STRIDES):
    """Flat location index of (x, y) at ``level`` (levels.py order)."""
    shapes = level_shapes(height, width, strides)
    offset = sum(h * w for h, w in shapes[:level])
    return offset + y * shapes[level][1] + x


def _regions(boxes, height=SIZE, width=SIZE):
    layout = fsaf.level_layout(height, width, STRIDES)
    regions = fsaf.gt_regions(tf.constant(boxes, tf.float32), *layout, len(STRIDES))
    return layout, {k: v.numpy() for k, v in regions.items()}


def _perfect_at(level, box, garbage_logit=-6.0, height=SIZE, width=SIZE):
    """free_cls [L, 1], free_box [L, 4] predicting ``box`` confidently only at ``level``."""
    layout = fsaf.level_layout(height, width, STRIDES)
    centers, strides, level_ids = layout
    eff = fsaf.gt_regions(tf.constant([box], tf.float32), *layout, len(STRIDES))["effective"]
    good = (eff.numpy()[0]) & (level_ids.numpy() == level)
    num = int(level_ids.shape[0])
    logits = np.full([num, 1], garbage_logit, np.float32)
    logits[good] = 8.0
    dists = np.full([num, 4], 0.01, np.float32)
    exact = fsaf.encode_tblr(centers, tf.tile(tf.constant([box], tf.float32), [num, 1]),
                             strides).numpy()
    dists[good] = exact[good]
    return logits, dists


def test_tblr_round_trip_and_hand_value():
    rng = np.random.default_rng(0)
    strides = rng.choice(STRIDES, 50).astype(np.float32)
    centers = rng.uniform(0, 500, [50, 2]).astype(np.float32)
    x1y1 = centers - rng.uniform(1, 80, [50, 2])
    x2y2 = centers + rng.uniform(1, 80, [50, 2])
    boxes = np.concatenate([x1y1, x2y2], 1).astype(np.float32)
    dists = fsaf.encode_tblr(centers, boxes, strides)
    assert np.all(dists.numpy() > 0)
    np.testing.assert_allclose(fsaf.decode_tblr(centers, dists, strides), boxes, atol=1e-4)

    one = fsaf.encode_tblr([[100.0, 100.0]], [[80.0, 90.0, 130.0, 140.0]], [8.0]).numpy()
    # T, B, L, R = (100-90, 140-100, 100-80, 130-100) / 32
    np.testing.assert_allclose(one, [[0.3125, 1.25, 0.625, 0.9375]], atol=1e-6)
    back = fsaf.decode_tblr([[100.0, 100.0]], one, [8.0]).numpy()
    np.testing.assert_allclose(back, [[80.0, 90.0, 130.0, 140.0]], atol=1e-4)


def test_layout_counts_and_order():
    for height, width in ((256, 256), (300, 500), (1, 129)):
        centers, strides, ids = fsaf.level_layout(height, width, STRIDES)
        expect = sum(math.ceil(height / s) * math.ceil(width / s) for s in STRIDES)
        assert centers.shape == (expect, 2) and strides.shape == (expect,)
        assert ids.shape == (expect,) and ids.dtype == tf.int32
        assert np.all(np.diff(ids.numpy()) >= 0) and np.all(np.diff(strides.numpy()) >= 0)
    assert fsaf.level_layout(256, 256)[0].shape[0] == 1364
    assert fsaf.level_layout(300, 500)[0].shape[0] == 2394 + 608 + 160 + 40 + 12
    centers, strides, ids = fsaf.level_layout(300, 500, STRIDES)
    i = _index(1, 3, 2, 300, 500)  # level 1 (stride 16), x=3, y=2
    np.testing.assert_allclose(centers[i], [3.5 * 16, 2.5 * 16])
    assert int(ids[i]) == 1 and float(strides[i]) == 16.0


def test_regions_by_hand():
    # 40x40 box centred at (100, 100): effective region [96, 104]^2, 0.5 region [90, 110]^2.
    layout, regions = _regions([[80.0, 80.0, 120.0, 120.0]])
    eff, ign, outer = regions["effective"][0], regions["ignore_region"][0], regions["outer"][0]
    ids = layout[2].numpy()
    # Stride 8 centres 92, 100, 108: effective only (12, 12) (= the centre cell).
    assert set(np.flatnonzero(eff & (ids == 0))) == {_index(0, 12, 12)}
    expect_ign = {_index(0, x, y) for x in (11, 12, 13) for y in (11, 12, 13)} - {
        _index(0, 12, 12)}
    assert set(np.flatnonzero(ign & (ids == 0))) == expect_ign
    assert not np.any(eff & ign) and np.array_equal(outer, eff | ign)
    # Stride 32 centres 80, 112: none in [96, 104]; the centre rule adds (3, 3) alone.
    assert set(np.flatnonzero(eff & (ids == 2))) == {_index(2, 3, 3)}
    # Every level has >= 1 effective location.
    np.testing.assert_array_equal(regions["counts"][0] >= 1, True)

    # 80x40 box (80, 80, 160, 120), centre (120, 100): effective x [112, 128], y [96, 104];
    # stride 8 centres x 116, 124 (x = 14, 15), y 100 (y = 12); the centre cell (15, 12) is
    # already inside.
    layout, regions = _regions([[80.0, 80.0, 160.0, 120.0]])
    eff = regions["effective"][0]
    assert set(np.flatnonzero(eff & (ids == 0))) == {_index(0, 14, 12), _index(0, 15, 12)}
    assert regions["counts"][0, 0] == 2


def _loss(cls, box, boxes, mask, **kw):
    return fsaf.fsaf_loss(cls, box, tf.constant(boxes, tf.float32), tf.constant(mask), SIZE,
                          SIZE, STRIDES, **kw)


def test_no_gt_and_one_gt():
    num = 1364
    rng = np.random.default_rng(1)
    cls = tf.constant(rng.normal(-2, 1, [2, num, 1]), tf.float32)
    box = tf.constant(rng.uniform(0, 1, [2, num, 4]), tf.float32)
    out = _loss(cls, box, np.zeros([2, 3, 4]), np.zeros([2, 3], bool), return_levels=True)
    assert np.all(out["cls"].numpy() > 0) and np.all(np.isfinite(out["cls"].numpy()))
    np.testing.assert_array_equal(out["box"].numpy(), 0.0)
    np.testing.assert_array_equal(out["levels"].numpy(), -1)
    # M == 0 works too.
    out = _loss(cls, box, np.zeros([2, 0, 4]), np.zeros([2, 0], bool))
    assert np.all(out["cls"].numpy() > 0) and np.all(out["box"].numpy() == 0)

    boxes = np.array([[[80, 80, 120, 120], [0, 0, 0, 0]]] * 2, np.float32)
    mask = np.array([[True, False]] * 2)
    out = _loss(cls, box, boxes, mask, return_levels=True)
    assert np.all(out["cls"].numpy() > 0) and np.all(out["box"].numpy() > 0)
    assert np.all(np.isfinite(out["box"].numpy()))
    levels = out["levels"].numpy()
    assert np.all((levels[:, 0] >= 0) & (levels[:, 0] < 5)) and np.all(levels[:, 1] == -1)


def test_online_selection_picks_the_fitting_level():
    box = [84.0, 90.0, 124.0, 126.0]
    layout = fsaf.level_layout(SIZE, SIZE, STRIDES)
    for level in (1, 0, 3):
        logits, dists = _perfect_at(level, box)
        sel = fsaf.select_levels(logits, dists, tf.constant([box, [0, 0, 0, 0]]),
                                 tf.constant([True, False]), layout)
        np.testing.assert_array_equal(sel.numpy(), [level, -1])
    # Batched through fsaf_loss: image 0 fits level 1, image 1 fits level 0.
    pairs = [_perfect_at(1, box), _perfect_at(0, box)]
    cls = tf.constant(np.stack([p[0] for p in pairs]))
    dist = tf.constant(np.stack([p[1] for p in pairs]))
    out = _loss(cls, dist, [[box], [box]], [[True], [True]], return_levels=True)
    np.testing.assert_array_equal(out["levels"].numpy(), [[1], [0]])
    assert np.all(out["box"].numpy() < 1e-3)  # the selected level predicts the box exactly


def test_selection_has_no_gradient_but_loss_does():
    box = [84.0, 90.0, 124.0, 126.0]
    logits, dists = _perfect_at(1, box)
    cls_var = tf.Variable(logits[None])
    box_var = tf.Variable(dists[None])
    boxes, mask = tf.constant([[box]]), tf.constant([[True]])
    with tf.GradientTape() as tape:
        out = fsaf.fsaf_loss(cls_var, box_var, boxes, mask, SIZE, SIZE, return_levels=True)
        total = tf.reduce_sum(out["cls"] + out["box"])
    g_cls, g_box = tape.gradient(total, [cls_var, box_var])
    assert g_cls is not None and g_box is not None
    assert np.all(np.isfinite(g_cls.numpy())) and np.any(g_cls.numpy() != 0)
    assert np.all(np.isfinite(g_box.numpy()))

    # The gradient equals that of the loss with the selection held fixed (no argmin path).
    layout = fsaf.level_layout(SIZE, SIZE, STRIDES)
    with tf.GradientTape() as tape:
        targets = fsaf.fsaf_targets(boxes[0], mask[0], out["levels"][0], layout)
        fixed = tf.add_n(fsaf._image_loss(cls_var[0, :, 0], box_var[0], targets, layout))
    f_cls, f_box = tape.gradient(fixed, [cls_var, box_var])
    np.testing.assert_allclose(g_cls.numpy(), f_cls.numpy(), atol=1e-6)
    np.testing.assert_allclose(g_box.numpy(), f_box.numpy(), atol=1e-6)

    noise = np.random.default_rng(2).normal(0, 1e-3, logits.shape).astype(np.float32)
    sel = fsaf.select_levels(logits + noise, np.abs(dists + noise), boxes[0], mask[0], layout)
    np.testing.assert_array_equal(sel.numpy(), out["levels"].numpy()[0])


def test_smaller_gt_wins_and_ignore_rules():
    small, large = [80.0, 80.0, 120.0, 120.0], [70.0, 70.0, 130.0, 130.0]
    layout = fsaf.level_layout(SIZE, SIZE, STRIDES)
    i = _index(0, 12, 12)  # effective for both at stride 8
    for boxes in ([small, large], [large, small]):
        cls_t, cls_w, box_t, pos = fsaf.fsaf_targets(tf.constant(boxes), tf.constant([True] * 2),
                                                     tf.constant([0, 0]), layout)
        assert bool(pos[i]) and float(cls_t[i]) == 1.0 and float(cls_w[i]) == 1.0
        np.testing.assert_allclose(box_t[i].numpy(), small)
        assert int(tf.reduce_sum(tf.cast(pos, tf.int32))) == 1

    # One GT selected at level 1: positives only there, its outer region ignored on levels
    # 0 and 2, ordinary negatives on levels 3 and 4.
    cls_t, cls_w, box_t, pos = fsaf.fsaf_targets(tf.constant([small]), tf.constant([True]),
                                                 tf.constant([1]), layout)
    ids = layout[2].numpy()
    regions = fsaf.gt_regions(tf.constant([small]), *layout, 5)
    eff, ign = regions["effective"].numpy()[0], regions["ignore_region"].numpy()[0]
    outer = regions["outer"].numpy()[0]
    np.testing.assert_array_equal(pos.numpy(), eff & (ids == 1))
    np.testing.assert_array_equal(cls_w.numpy() == 0,
                                  (ign & (ids == 1)) | (outer & ((ids == 0) | (ids == 2))))
    assert not np.any(cls_w.numpy()[ids >= 3] == 0) and not np.any(cls_t.numpy()[ids != 1])

    # A positive of another GT (same box, selected at level 0) on an adjacent level of the
    # first GT is not ignored.
    _, cls_w, _, pos = fsaf.fsaf_targets(tf.constant([small, small]), tf.constant([True, True]),
                                         tf.constant([1, 0]), layout)
    j = _index(0, 12, 12)
    assert bool(pos[j]) and float(cls_w[j]) == 1.0


def test_tf_function_mixed_precision_and_distribute():
    box = [84.0, 90.0, 124.0, 126.0]
    logits, dists = _perfect_at(2, box)

    @tf.function
    def step(cls, dist, boxes, mask):
        out = fsaf.fsaf_loss(cls, dist, boxes, mask, SIZE, SIZE, return_levels=True)
        return out["cls"], out["box"], out["levels"]

    cls, b, levels = step(tf.constant(logits[None], tf.float16),
                          tf.constant(dists[None], tf.float16),
                          tf.constant([[box, box]], tf.float16), tf.constant([[True, False]]))
    assert cls.dtype == tf.float32 and np.all(np.isfinite(cls.numpy() + b.numpy()))
    np.testing.assert_array_equal(levels.numpy(), [[2, -1]])

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        result = strategy.run(step, (tf.constant(logits[None]), tf.constant(dists[None]),
                                     tf.constant([[box]]), tf.constant([[True]])))
    assert np.isfinite(float(result[0][0])) and int(result[2][0, 0]) == 2


def test_loss_decreases_with_gradient_steps():
    rng = np.random.default_rng(3)
    num = 1364
    cls_var = tf.Variable(rng.normal(-1, 0.5, [1, num, 1]).astype(np.float32))
    box_var = tf.Variable(rng.uniform(0.1, 0.5, [1, num, 4]).astype(np.float32))
    boxes = tf.constant([[[84.0, 90.0, 124.0, 126.0], [150.0, 30.0, 190.0, 62.0]]])
    mask = tf.constant([[True, True]])

    optimizer = keras.optimizers.Adam(0.05)
    optimizer.build([cls_var, box_var])

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            out = fsaf.fsaf_loss(cls_var, tf.nn.relu(box_var), boxes, mask, SIZE, SIZE)
            total = tf.reduce_sum(out["cls"] + out["box"])
        grads = tape.gradient(total, [cls_var, box_var])
        optimizer.apply_gradients(zip(grads, [cls_var, box_var]))
        return total

    losses = [float(step()) for _ in range(15)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses
