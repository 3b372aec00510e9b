"""Anchor generation, ordering, coverage of mitosis sizes, deltas and IoU."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras.utils import bounding_boxes as kbb  # noqa: E402

from focas_keras.models.anchors import (  # noqa: E402
    DELTA_CLIP, AnchorConfig, anchors_per_level, decode_deltas, encode_deltas,
    generate_anchors, pairwise_iou)
from focas_keras.models.levels import level_shapes, location_centers  # noqa: E402


def test_config_defaults():
    config = AnchorConfig()
    assert config.num_anchors == 9
    assert config.strides == (8, 16, 32, 64, 128)
    assert config.base_sizes == (24, 48, 96, 192, 384)
    with pytest.raises(ValueError):
        AnchorConfig(strides=(8, 16), base_sizes=(24,))


def test_first_location_hand_computed():
    config = AnchorConfig(strides=(8, 16), base_sizes=(24, 48))
    anchors = generate_anchors(64, 64, config).numpy()
    assert anchors.shape == (8 * 8 * 9 + 4 * 4 * 9, 4)
    expected = []
    for ratio in (0.5, 1.0, 2.0):                       # ratio-major, then scale
        for scale in (1.0, 2 ** (1 / 3), 2 ** (2 / 3)):
            size = 24 * scale
            w, h = size / math.sqrt(ratio), size * math.sqrt(ratio)
            expected.append((4 - w / 2, 4 - h / 2, 4 + w / 2, 4 + h / 2))
    np.testing.assert_allclose(anchors[:9], np.array(expected), rtol=1e-6, atol=1e-5)
    # Square scale-1 anchor (a = 1 * 3 + 0) of the first P3 location, and of the first P4 location.
    np.testing.assert_allclose(anchors[3], [-8, -8, 16, 16], atol=1e-5)
    np.testing.assert_allclose(anchors[8 * 8 * 9 + 3], [-16, -16, 32, 32], atol=1e-5)
    # Areas and aspect ratios.
    w, h = anchors[:9, 2] - anchors[:9, 0], anchors[:9, 3] - anchors[:9, 1]
    sizes = 24 * np.array([1.0, 2 ** (1 / 3), 2 ** (2 / 3)] * 3)
    np.testing.assert_allclose(w * h, sizes ** 2, rtol=1e-5)
    np.testing.assert_allclose(h / w, np.repeat([0.5, 1.0, 2.0], 3), rtol=1e-5)


@pytest.mark.parametrize("height,width", [(256, 256), (224, 320), (100, 75)])
def test_counts_per_level(height, width):
    config = AnchorConfig()
    counts = anchors_per_level(height, width, config)
    expected = [math.ceil(height / s) * math.ceil(width / s) * 9 for s in config.strides]
    assert counts == expected
    assert generate_anchors(height, width, config).shape == (sum(expected), 4)


@pytest.mark.parametrize("height,width", [(224, 320), (100, 75)])
def test_order_matches_levels(height, width):
    """Anchor offset_l + (y * W_l + x) * A + a is centred on location (x, y) of level l."""
    config = AnchorConfig()
    anchors = generate_anchors(height, width, config).numpy()
    centres = np.stack([(anchors[:, 0] + anchors[:, 2]) / 2,
                        (anchors[:, 1] + anchors[:, 3]) / 2], axis=-1)
    offset = 0
    for stride, (h_l, w_l), count in zip(config.strides,
                                         level_shapes(height, width, config.strides),
                                         anchors_per_level(height, width, config)):
        level = centres[offset:offset + count].reshape(h_l * w_l, 9, 2)
        ref = location_centers(height, width, stride).numpy()
        np.testing.assert_allclose(level, np.repeat(ref[:, None], 9, axis=1), atol=1e-4)
        # One explicit index: location (x=1, y=2) if it exists, anchor a=5.
        if h_l > 2 and w_l > 1:
            index = offset + (2 * w_l + 1) * 9 + 5
            np.testing.assert_allclose(centres[index], [1.5 * stride, 2.5 * stride], atol=1e-4)
        offset += count
    assert offset == len(anchors)


def test_mitosis_sizes_are_covered():
    """Every square box of 24-76 px, at any sub-stride position, has an anchor IoU >= 0.5."""
    anchors = generate_anchors(256, 256)
    boxes = []
    for size in range(24, 77):
        for ox in (0.0, 3.0, 4.0, 8.0, 11.5):
            for oy in (0.0, 4.0, 6.0, 8.0):
                cx, cy = 128 + ox, 120 + oy
                boxes.append((cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2))
    best = tf.reduce_max(pairwise_iou(anchors, np.array(boxes, np.float32)), axis=0).numpy()
    assert best.min() >= 0.5, (best.min(), boxes[int(best.argmin())])
    # Integer-pixel ICPR-like boxes: 40 px centroid boxes and 26-68 px wide mitoses.
    boxes = [(x, y, x + s, y + s) for s in (26, 40, 68) for x in range(100, 117, 3)
             for y in range(90, 107, 5)]
    best = tf.reduce_max(pairwise_iou(anchors, np.array(boxes, np.float32)), axis=0).numpy()
    assert best.min() >= 0.5


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    anchors = generate_anchors(128, 128).numpy()[:500]
    xy = rng.uniform(0, 200, (3, 500, 2))
    wh = rng.uniform(4, 150, (3, 500, 2))
    boxes = np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)
    for variance in ((1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)):
        deltas = encode_deltas(anchors, boxes, variance)             # [3, 500, 4] batched
        assert deltas.shape == (3, 500, 4) and deltas.dtype == tf.float32
        back = decode_deltas(anchors, deltas, variance).numpy()
        np.testing.assert_allclose(back, boxes, rtol=1e-4, atol=1e-3)
    # Exactly the anchor -> zero deltas.
    np.testing.assert_allclose(encode_deltas(anchors, anchors).numpy(), 0.0, atol=1e-6)


def test_encode_matches_keras_and_decode_clips():
    rng = np.random.default_rng(1)
    anchors = generate_anchors(64, 64).numpy()[:50]
    xy = rng.uniform(0, 60, (50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 80, (50, 2))], -1).astype(np.float32)
    variance = (0.1, 0.1, 0.2, 0.2)
    ours = encode_deltas(anchors, boxes, variance).numpy()
    keras_deltas = kbb.encode_box_to_deltas(anchors, boxes, "xyxy", "xyxy",
                                            encoding_format="center_xywh", variance=variance)
    np.testing.assert_allclose(ours, np.asarray(keras_deltas), rtol=1e-4, atol=1e-4)
    huge = decode_deltas(anchors[:1], np.array([[0.0, 0.0, 50.0, 50.0]], np.float32)).numpy()
    assert np.all(np.isfinite(huge))
    np.testing.assert_allclose(huge[0, 2] - huge[0, 0],
                               (anchors[0, 2] - anchors[0, 0]) * math.exp(DELTA_CLIP), rtol=1e-4)


def test_pairwise_iou():
    a = np.array([[0, 0, 10, 10], [5, 5, 15, 15], [20, 20, 20, 30]], np.float32)
    b = np.array([[0, 0, 10, 10], [5, 5, 15, 15]], np.float32)
    iou = pairwise_iou(a, b).numpy()
    np.testing.assert_allclose(iou, [[1, 25 / 175], [25 / 175, 1], [0, 0]], atol=1e-6)
    np.testing.assert_allclose(iou[:2], np.asarray(kbb.compute_iou(a[:2], b, "xyxy")),
                               atol=1e-6)
    assert pairwise_iou(a, np.zeros((0, 4), np.float32)).shape == (3, 0)
