"""Focal loss, anchor assignment and the per-image RetinaNet loss."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from focas_keras.losses.focal import sigmoid_focal_loss  # noqa: E402
from focas_keras.losses.retina import (  # noqa: E402
    assign_anchors, retina_loss, retina_prior_bias)
from focas_keras.models.anchors import encode_deltas, generate_anchors  # noqa: E402

ANCHORS = generate_anchors(64, 64)           # default config: 86 locations * 9 = 774
GT = np.array([[10.0, 12.0, 42.0, 40.0]], np.float32)


def batch(*boxes_per_image, m=3):
    """Pads per-image box lists to gt_boxes [B, m, 4] (garbage padding), gt_mask [B, m]."""
    gt = np.full((len(boxes_per_image), m, 4), -7.0, np.float32)
    mask = np.zeros((len(boxes_per_image), m), bool)
    for i, boxes in enumerate(boxes_per_image):
        gt[i, :len(boxes)] = np.reshape(np.asarray(boxes, np.float32), (-1, 4))
        mask[i, :len(boxes)] = True
    return tf.constant(gt), tf.constant(mask)


def predictions(b, seed=0, k=1):
    rng = np.random.default_rng(seed)
    n = ANCHORS.shape[0]
    return (tf.constant(rng.normal(-2.0, 1.0, (b, n, k)), tf.float32),
            tf.constant(rng.normal(0.0, 0.3, (b, n, 4)), tf.float32))


def test_focal_matches_keras():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (64, 3)).astype(np.float32)
    logits = rng.normal(0, 4, (64, 3)).astype(np.float32)
    ours = sigmoid_focal_loss(labels, logits, 0.25, 2.0)
    assert ours.shape == (64, 3) and ours.dtype == tf.float32
    ref = keras.losses.BinaryFocalCrossentropy(
        apply_class_balancing=True, alpha=0.25, gamma=2.0, from_logits=True, reduction=None)
    # keras averages the last axis: equal elementwise for K = 1, per-row mean otherwise.
    np.testing.assert_allclose(np.asarray(ref(labels, logits)),
                               tf.reduce_mean(ours, -1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ref(labels[:, :1], logits[:, :1])),
                               ours.numpy()[:, 0], rtol=1e-5, atol=1e-6)


def test_focal_stable_and_mixed_precision():
    logits = tf.constant([-200.0, -30.0, 0.0, 30.0, 200.0], tf.float16)
    loss = sigmoid_focal_loss(tf.constant([1, 0, 1, 1, 0]), logits)
    assert loss.dtype == tf.float32 and np.all(np.isfinite(loss.numpy()))
    np.testing.assert_allclose(loss.numpy()[[1, 3]], 0.0, atol=1e-10)
    assert loss.numpy()[0] > 40 and loss.numpy()[4] > 100
    np.testing.assert_allclose(loss.numpy()[2], 0.25 * 0.25 * math.log(2), rtol=1e-3)


def test_prior_bias():
    assert retina_prior_bias(0.01) == pytest.approx(-math.log(99.0))
    assert 1 / (1 + math.exp(-retina_prior_bias(0.2))) == pytest.approx(0.2)


def test_assignment_hand_made():
    anchors = tf.constant([[0, 0, 20, 20],          # == GT 0 -> positive
                           [0, 0, 20, 44],          # IoU 400/880 = 0.45 with GT 0 -> ignored
                           [100, 100, 120, 120],    # only the padded box -> negative
                           [200, 200, 260, 260],    # IoU 0.01 with tiny GT 1 -> its best
                           [300, 300, 320, 320]],   # far -> negative
                          tf.float32)
    gt = tf.constant([[0, 0, 20, 20], [205, 205, 211, 211], [100, 100, 120, 120]], tf.float32)
    labels, matched = assign_anchors(anchors, gt, tf.constant([True, True, False]))
    assert labels.dtype == tf.int32 and matched.dtype == tf.int32
    assert labels.numpy().tolist() == [1, -1, 0, 1, 0]
    assert matched.numpy()[0] == 0 and matched.numpy()[3] == 1


def test_assignment_best_anchor_goes_to_its_gt():
    """An anchor that is a box's best goes to that box even if it overlaps another more."""
    anchors = tf.constant([[0, 0, 20, 20], [0, 0, 20, 44]], tf.float32)
    # a1: IoU 0.45 with g0 (its best box) but 0.11 with g1, whose best anchor it is.
    gt = tf.constant([[0, 0, 20, 20], [2, 30, 12, 40]], tf.float32)
    labels, matched = assign_anchors(anchors, gt, tf.constant([True, True]))
    assert labels.numpy().tolist() == [1, 1] and matched.numpy().tolist() == [0, 1]
    # Two boxes with the same best anchor: the one with the higher IoU keeps it.
    gt = tf.constant([[2, 2, 18, 18], [0, 0, 20, 20]], tf.float32)
    labels, matched = assign_anchors(anchors[:1], gt, tf.constant([True, True]))
    assert labels.numpy().tolist() == [1] and matched.numpy().tolist() == [1]


def test_assignment_no_gt_in_graph():
    fn = tf.function(assign_anchors, input_signature=[
        tf.TensorSpec([None, 4]), tf.TensorSpec([None, 4]), tf.TensorSpec([None], tf.bool)])
    for m in (0, 2):          # M = 0, and M = 2 with every box padded
        labels, matched = fn(ANCHORS, tf.ones([m, 4]) * 30.0, tf.zeros([m], tf.bool))
        assert np.all(labels.numpy() == 0) and np.all(matched.numpy() == 0)
    labels, _ = fn(ANCHORS, tf.constant(GT), tf.constant([True]))
    assert labels.numpy().max() == 1


def test_loss_no_gt():
    cls, box = predictions(1)
    out = retina_loss(cls, box, ANCHORS, *batch([]))
    assert out["cls"].shape == (1,) and out["box"].shape == (1,)
    assert out["cls"].numpy()[0] > 0 and out["box"].numpy()[0] == 0
    # With no positive the normaliser is 1: cls is the plain sum over all anchors.
    expected = tf.reduce_sum(sigmoid_focal_loss(tf.zeros_like(cls), cls)).numpy()
    np.testing.assert_allclose(out["cls"].numpy()[0], expected, rtol=1e-5)


def test_loss_one_gt_matches_numpy():
    cls, box = predictions(1)
    gt, mask = batch(GT)
    out = retina_loss(cls, box, ANCHORS, gt, mask)
    assert out["cls"].numpy()[0] > 0 and out["box"].numpy()[0] > 0
    labels, matched = assign_anchors(ANCHORS, gt[0], mask[0])
    labels = labels.numpy()
    pos, valid = labels == 1, labels >= 0
    assert pos.sum() >= 1
    focal = sigmoid_focal_loss(pos[:, None].astype(np.float32), cls[0]).numpy()
    np.testing.assert_allclose(out["cls"].numpy()[0], focal[valid].sum() / pos.sum(), rtol=1e-5)
    targets = encode_deltas(ANCHORS, np.repeat(GT, len(labels), 0)).numpy()
    diff = np.abs(box[0].numpy() - targets)[pos]
    beta = 1 / 9
    smooth = np.where(diff < beta, 0.5 * diff ** 2 / beta, diff - 0.5 * beta)
    np.testing.assert_allclose(out["box"].numpy()[0], smooth.sum() / pos.sum(), rtol=1e-5)
    l1 = retina_loss(cls, box, ANCHORS, gt, mask, box_loss="l1")["box"].numpy()[0]
    np.testing.assert_allclose(l1, diff.sum() / pos.sum(), rtol=1e-5)
    with pytest.raises(ValueError):
        retina_loss(cls, box, ANCHORS, gt, mask, box_loss="giou")


def test_perfect_predictions_give_zero_loss():
    gt, mask = batch(GT, [[30.0, 30.0, 60.0, 58.0], [2.0, 40.0, 30.0, 64.0]])
    cls, box = [], []
    for i in range(2):
        labels, matched = assign_anchors(ANCHORS, gt[i], mask[i])
        pos = (labels == 1)[:, None]
        cls.append(tf.where(pos, 30.0, -30.0))
        box.append(tf.where(pos, encode_deltas(ANCHORS, tf.gather(gt[i], matched)), 0.0))
    out = retina_loss(tf.stack(cls), tf.stack(box), ANCHORS, gt, mask)
    np.testing.assert_allclose(out["cls"].numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(out["box"].numpy(), 0.0, atol=1e-6)


def test_batch_of_two_equals_single_images_and_graph_mode():
    cls, box = predictions(2, seed=3)
    gt, mask = batch([], [GT[0], [30.0, 30.0, 60.0, 58.0]])
    eager = retina_loss(cls, box, ANCHORS, gt, mask)
    for i in range(2):
        single = retina_loss(cls[i:i + 1], box[i:i + 1], ANCHORS, gt[i:i + 1], mask[i:i + 1])
        for key in ("cls", "box"):
            np.testing.assert_allclose(eager[key].numpy()[i], single[key].numpy()[0], rtol=1e-6)
    assert eager["box"].numpy()[0] == 0 and eager["box"].numpy()[1] > 0

    spec = [tf.TensorSpec([None, None, 1]), tf.TensorSpec([None, None, 4]),
            tf.TensorSpec([None, 4]), tf.TensorSpec([None, None, 4]),
            tf.TensorSpec([None, None], tf.bool)]
    graph = tf.function(retina_loss, input_signature=spec)(cls, box, ANCHORS, gt, mask)
    xla = tf.function(retina_loss, jit_compile=True)(cls, box, ANCHORS, gt, mask)
    empty = tf.function(retina_loss, input_signature=spec)(
        cls, box, ANCHORS, tf.zeros([2, 0, 4]), tf.zeros([2, 0], tf.bool))
    for key in ("cls", "box"):
        np.testing.assert_allclose(graph[key].numpy(), eager[key].numpy(), rtol=1e-5)
        np.testing.assert_allclose(xla[key].numpy(), eager[key].numpy(), rtol=1e-4)
    assert np.all(empty["box"].numpy() == 0) and np.all(empty["cls"].numpy() > 0)


def test_gradients_flow_and_mixed_precision():
    cls, box = predictions(2, seed=5)
    cls_var, box_var = tf.Variable(cls), tf.Variable(box)
    gt, mask = batch(GT, [])
    with tf.GradientTape() as tape:
        out = retina_loss(cls_var, box_var, ANCHORS, gt, mask)
        total = tf.reduce_sum(out["cls"] + out["box"])
    g_cls, g_box = tape.gradient(total, [cls_var, box_var])
    assert g_cls is not None and g_box is not None
    assert np.all(np.isfinite(g_cls.numpy())) and np.all(np.isfinite(g_box.numpy()))
    assert np.abs(g_box.numpy()[0]).sum() > 0 and np.abs(g_box.numpy()[1]).sum() == 0

    half = retina_loss(tf.cast(cls, tf.float16), tf.cast(box, tf.float16), ANCHORS,
                       tf.cast(gt, tf.float16), mask)
    for key in ("cls", "box"):
        assert half[key].dtype == tf.float32
        np.testing.assert_allclose(half[key].numpy(), out[key].numpy(), rtol=2e-2, atol=1e-3)


def test_under_distribution_strategy():
    cls, box = predictions(2, seed=7)
    gt, mask = batch([GT[0], [30.0, 30.0, 60.0, 58.0]], [])
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])

    @tf.function
    def step(c, b, g, m):
        return strategy.run(retina_loss, args=(c, b, ANCHORS, g, m))

    out = step(cls, box, gt, mask)
    ref = retina_loss(cls, box, ANCHORS, gt, mask)
    for key in ("cls", "box"):
        np.testing.assert_allclose(out[key].numpy(), ref[key].numpy(), rtol=1e-5)
