"""Mdet assembly: outputs per level, anchors vs head outputs, save/load, decoding."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from focas_keras.models import levels
from focas_keras.models.anchors import generate_anchors
from focas_keras.models.mdet import (Detector, anchor_config, build_mdet, decode_detections,
                                     detect_batch, mdet_loss, mirror_indices, pad_to_stride)
from focas_keras.models.mdet_config import preset

TINY = preset("tiny")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(0)
    return build_mdet(TINY)


@pytest.mark.parametrize("height, width", [(128, 128), (96, 160)])
def test_anchors_per_level_equal_head_outputs(model, height, width):
    out = model(np.zeros((1, height, width, 3), "float32"))
    anchors = generate_anchors(height, width, anchor_config(TINY))
    assert out["anchor_cls"].shape[1] == anchors.shape[0]
    assert out["anchor_box"].shape[1] == anchors.shape[0]
    locations = sum(h * w for h, w in levels.level_shapes(height, width, TINY.strides))
    assert out["free_cls"].shape[1] == locations == anchors.shape[0] // 9


@pytest.mark.parametrize("head, keys", [("anchor", {"anchor_cls", "anchor_box"}),
                                        ("free", {"free_cls", "free_box"})])
def test_head_switches(head, keys):
    cfg = TINY.override(**{"head.head": head, "backbone.cbam": False, "backbone.norm": "bn",
                           "backbone.ws": False})
    m = build_mdet(cfg)
    out = m(np.zeros((1, 64, 64, 3), "float32"))
    assert set(out) == keys
    gt = tf.constant([[[10.0, 10.0, 40.0, 40.0]]])
    losses = mdet_loss(out, gt, tf.constant([[True]]), 64, 64, cfg)
    assert set(losses) == {"total"} | keys
    assert float(losses["total"][0]) > 0


def test_loss_no_gt_and_one_gt(model):
    out = model(np.random.default_rng(0).random((2, 128, 128, 3), dtype=np.float32))
    gt = tf.constant([[[40.0, 40.0, 80.0, 80.0]], [[0.0, 0.0, 0.0, 0.0]]])
    mask = tf.constant([[True], [False]])
    losses = {k: v.numpy() for k, v in mdet_loss(out, gt, mask, 128, 128, TINY).items()}
    for key in ("anchor_cls", "anchor_box", "free_cls", "free_box"):
        assert losses[key][0] > 0
    assert losses["anchor_cls"][1] > 0 and losses["free_cls"][1] > 0
    assert losses["anchor_box"][1] == 0 and losses["free_box"][1] == 0
    want = (losses["anchor_cls"] + losses["anchor_box"]
            + 0.5 * (losses["free_cls"] + losses["free_box"]))
    np.testing.assert_allclose(losses["total"], want, rtol=1e-6)


def test_keras_save_load_equal_outputs(model, tmp_path):
    path = tmp_path / "mdet.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(1).random((1, 96, 128, 3), dtype=np.float32)
    a, b = model(x), loaded(x)
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=1e-5, atol=1e-5)


def test_decoding_recovers_a_planted_box():
    # Plant one confident anchor whose deltas are zero: the detection is that anchor.
    height = width = 128
    anchors = generate_anchors(height, width, anchor_config(TINY)).numpy()
    n = anchors.shape[0]
    cls = np.full((1, n, 1), -10.0, np.float32)
    index = 123
    cls[0, index, 0] = 5.0
    outputs = {"anchor_cls": tf.constant(cls), "anchor_box": tf.zeros((1, n, 4))}
    dets = decode_detections(outputs, height, width, TINY)
    assert int(dets["num_detections"][0]) == 1
    np.testing.assert_allclose(dets["boxes"][0, 0].numpy(), np.clip(anchors[index], 0, 128),
                               atol=1e-4)
    assert float(dets["scores"][0, 0]) == pytest.approx(1 / (1 + np.exp(-5.0)), rel=1e-5)


def test_nms_merges_duplicates_across_branches():
    height = width = 64
    anchors = generate_anchors(height, width, anchor_config(TINY)).numpy()
    n = anchors.shape[0]
    cls = np.full((1, n, 1), -10.0, np.float32)
    cls[0, 40, 0] = 3.0
    cls[0, 41, 0] = 2.0  # same location, next scale: IoU > 0.5 with anchor 40 -> suppressed
    outputs = {"anchor_cls": tf.constant(cls), "anchor_box": tf.zeros((1, n, 4))}
    dets = decode_detections(outputs, height, width, TINY)
    assert int(dets["num_detections"][0]) == 1


def test_compiled_detector_equals_eager_detect_batch(model):
    x = np.random.default_rng(3).random((2, 100, 70, 3), dtype=np.float32)
    eager = detect_batch(model, x, TINY, score_threshold=0.0)
    detector = Detector(model, TINY, score_threshold=0.0)
    compiled = detector(x)
    np.testing.assert_array_equal(compiled["num_detections"], eager["num_detections"])
    np.testing.assert_allclose(compiled["scores"], eager["scores"], atol=1e-5)
    np.testing.assert_allclose(compiled["boxes"], eager["boxes"], atol=1e-3)
    image = (x[0] * 255).astype(np.uint8)
    boxes, scores = detector.detect_image(image)
    want = detector(image[None].astype(np.float32) / 255.0)
    assert len(boxes) == len(scores) == int(want["num_detections"][0])


def test_detect_batch_pads_any_size(model):
    x = np.random.default_rng(2).random((1, 100, 70, 3), dtype=np.float32)
    dets = detect_batch(model, x, TINY, score_threshold=0.0)
    count = int(dets["num_detections"][0])
    assert count > 0
    boxes = dets["boxes"][0, :count].numpy()
    assert boxes[:, [0, 2]].max() <= 70 and boxes[:, [1, 3]].max() <= 100


def test_pad_to_stride_mirrors_the_image():
    image = np.arange(30 * 20, dtype=np.float32).reshape(1, 30, 20, 1)
    padded, size = pad_to_stride(tf.constant(image), 32)
    padded = padded.numpy()
    assert size == (30, 20) and padded.shape == (1, 32, 32, 1)
    np.testing.assert_array_equal(padded[:, :30, :20], image)
    # Half-sample mirror: the edge row/column repeats, then the image runs backwards.
    np.testing.assert_array_equal(padded[0, 30:, :20, 0], image[0, [29, 28], :, 0])
    np.testing.assert_array_equal(padded[0, :30, 20:, 0], image[0, :, 19:7:-1, 0])
    np.testing.assert_array_equal(padded[0, 30:, 20:, 0], image[0, [29, 28]][:, 19:7:-1, 0])
    unpadded, _ = pad_to_stride(tf.constant(image[:, :, :, :]), 10)
    assert unpadded.shape == (1, 30, 20, 1)


def test_mirror_beyond_twice_the_image_repeats_the_mirror():
    want = list(range(10)) + list(range(9, -1, -1)) + list(range(10)) + [9, 8]
    assert mirror_indices(10, 32).tolist() == want
    assert mirror_indices(tf.constant(10), tf.constant(32)).numpy().tolist() == want
    image = np.arange(10, dtype=np.float32).reshape(1, 1, 10, 1) * np.ones((1, 10, 1, 1))
    padded, _ = pad_to_stride(tf.constant(image, tf.float32), 32)  # pads 22 > 10 px
    np.testing.assert_array_equal(padded[0, 0, :, 0].numpy(), want)
    np.testing.assert_array_equal(padded[0, :, 0, 0].numpy(), np.zeros(32))


def test_decoding_drops_boxes_mostly_in_the_padding():
    """Three planted 24 px anchors of a 64 px input whose image is 52 px: centred inside, on
    the border (half inside: kept, clipped) and in the padding (dropped before NMS, so even
    as the best it takes none of the 2 places)."""
    anchors = generate_anchors(64, 64, anchor_config(TINY)).numpy()
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    square24 = np.isclose(anchors[:, 2] - anchors[:, 0], 24) & np.isclose(
        anchors[:, 3] - anchors[:, 1], 24)  # P3, scale 1, ratio 1
    cls = np.full((1, len(anchors), 1), -10.0, np.float32)

    def pick(cx, cy):
        at = square24 & np.isclose(centres[:, 0], cx) & np.isclose(centres[:, 1], cy)
        return int(np.flatnonzero(at)[0])

    inside, border, padding = pick(20, 20), pick(52, 20), pick(60, 20)
    cls[0, [inside, border, padding], 0] = 3.0, 4.0, 5.0
    outputs = {"anchor_cls": tf.constant(cls), "anchor_box": tf.zeros((1, len(anchors), 4))}
    dets = decode_detections(outputs, 64, 64, TINY, valid_height=52, valid_width=52,
                             max_detections=2)
    assert int(dets["num_detections"][0]) == 2
    np.testing.assert_allclose(dets["boxes"][0], [[40, 8, 52, 32], [8, 8, 32, 32]], atol=1e-4)
    whole = decode_detections(outputs, 64, 64, TINY)  # no valid size: nothing is padding
    np.testing.assert_allclose(whole["boxes"][0, 0], [48, 8, 64, 32], atol=1e-4)


def test_detector_honours_max_detections(model):
    x = np.random.default_rng(4).random((2, 96, 64, 3), dtype=np.float32)
    full = Detector(model, TINY, score_threshold=0.0)(x)
    capped = Detector(model, TINY, score_threshold=0.0, max_detections=7)(x)
    assert capped["boxes"].shape == (2, 7, 4) and capped["scores"].shape == (2, 7)
    assert full["boxes"].shape[1] == TINY.inference.max_detections
    assert capped["num_detections"].numpy().tolist() == [7, 7]
    # Greedy NMS: the 7 kept are the first 7 of the uncapped answer.
    np.testing.assert_allclose(capped["scores"], full["scores"][:, :7], atol=1e-6)
    np.testing.assert_allclose(capped["boxes"], full["boxes"][:, :7], atol=1e-4)
    eager = detect_batch(model, x, TINY, score_threshold=0.0, max_detections=7)
    np.testing.assert_allclose(eager["scores"], capped["scores"], atol=1e-5)
    with pytest.raises(ValueError, match="max_detections"):
        Detector(model, TINY, max_detections=0)
