"""HybridHead: output layout, prior biases, config round trip, save/load."""

import math

import keras
import numpy as np
import pytest

from focas_keras.models import levels
from focas_keras.models.head import HybridHead

STRIDES = (8, 16, 32)


def _features(height, width, channels=16, batch=2):
    rng = np.random.default_rng(0)
    return [rng.normal(size=(batch, h, w, channels)).astype("float32")
            for h, w in levels.level_shapes(height, width, STRIDES)]


@pytest.mark.parametrize("height, width", [(64, 64), (96, 160)])
def test_output_counts_follow_level_layout(height, width):
    head = HybridHead(num_classes=1, num_anchors=9, channels=16, tower_depth=2)
    out = head(_features(height, width))
    locations = sum(h * w for h, w in levels.level_shapes(height, width, STRIDES))
    assert out["anchor_cls"].shape == (2, locations * 9, 1)
    assert out["anchor_box"].shape == (2, locations * 9, 4)
    assert out["free_cls"].shape == (2, locations, 1)
    assert out["free_box"].shape == (2, locations, 4)
    assert np.all(keras.ops.convert_to_numpy(out["free_box"]) >= 0)


def test_order_is_level_then_row_then_anchor():
    # Only one location of the P4 map is non-zero: its 9 anchors must be contiguous at
    # offset(P3) + (y * W + x) * 9.
    head = HybridHead(num_classes=1, num_anchors=9, channels=4, tower_depth=0,
                      kernel_initializer="ones")
    feats = [np.zeros((1, h, w, 4), "float32") for h, w in levels.level_shapes(64, 96, STRIDES)]
    y, x = 2, 3
    feats[1][0, y, x, :] = 1.0
    cls = keras.ops.convert_to_numpy(head(feats)["anchor_cls"])[0, :, 0]
    prior = -math.log(99)
    changed = np.where(~np.isclose(cls, prior))[0]
    (h3, w3), (h4, w4) = levels.level_shapes(64, 96, STRIDES)[:2]
    centre = h3 * w3 * 9 + (y * w4 + x) * 9
    assert centre in changed and changed.min() >= h3 * w3 * 9
    assert np.all(np.isclose(cls[centre:centre + 9], cls[centre]))


def test_classification_biases_start_at_prior():
    head = HybridHead(channels=8, tower_depth=1)
    head(_features(64, 64, channels=8))
    for conv in (head.anchor_cls_conv, head.free_cls_conv):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(conv.bias), -math.log(99),
                                   rtol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(head.anchor_box_conv.bias), 0)


def test_single_branch_heads():
    assert set(HybridHead(channels=8, tower_depth=1, use_free=False)(
        _features(64, 64, 8))) == {"anchor_cls", "anchor_box"}
    assert set(HybridHead(channels=8, tower_depth=1, use_anchor=False)(
        _features(64, 64, 8))) == {"free_cls", "free_box"}
    with pytest.raises(ValueError):
        HybridHead(use_anchor=False, use_free=False)


def test_config_round_trip_non_default():
    head = HybridHead(num_classes=2, num_anchors=3, channels=8, tower_depth=1, use_free=False,
                      prior_prob=0.05, name="h")
    clone = HybridHead.from_config(head.get_config())
    assert clone.get_config() == head.get_config()
    feats = _features(64, 64, 8)
    out, out2 = head(feats), clone(feats)
    clone.set_weights(head.get_weights())
    out2 = clone(feats)
    for key in out:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(out[key]),
                                   keras.ops.convert_to_numpy(out2[key]), rtol=1e-6)


def test_keras_save_load(tmp_path):
    inputs = [keras.Input((None, None, 8)) for _ in STRIDES]
    model = keras.Model(inputs, HybridHead(channels=8, tower_depth=1)(inputs))
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    feats = _features(64, 96, 8)
    for key, value in model(feats).items():
        np.testing.assert_allclose(keras.ops.convert_to_numpy(value),
                                   keras.ops.convert_to_numpy(loaded(feats)[key]), rtol=1e-5)
