"""fold_weight_standardization: WSConv2D -> Conv2D with the standardised kernel, same outputs.

Tolerance: the folded model convolves with the kernel that WSConv2D computes at every call,
so the only possible difference is float32 round-off: the kernel is standardised once
eagerly instead of inside the traced graph, where the mean/variance reductions may be
evaluated in another order (oneDNN / Grappler), and such last-bit kernel differences pass
through every conv + GroupNorm of the network. A bound of 1e-4 times the output scale
(max |output|, at least 1) is some 1000x float32's epsilon and far below any change of
detections; measured differences are far smaller (exactly zero on this CPU).
"""

import keras
import numpy as np
import pytest

from focas_keras.layers.ws_conv2d import WSConv2D
from focas_keras.models.backbone import build_backbone
from focas_keras.models.fold import (
    fold_weight_standardization,
    folded_conv,
    has_ws_conv,
)
from focas_keras.models.mdet import Detector, build_mdet
from focas_keras.models.mdet_config import preset

TINY = preset("tiny")
RTOL = 1e-4


def perturb(model, seed=0):
    """Moves every weight away from its initial value, in place.

    WSConv2D kernels get a per-filter scale in [0.5, 3] and offset in [-0.5, 0.5] (so they are
    far from standardised, while the standardised kernel -- and the model's function -- stay
    those of the initial kernel); every other variable gets Gaussian noise (sd 0.05), so a
    clone that re-initialised a layer instead of copying it would give other outputs.
    """
    rng = np.random.default_rng(seed)
    ws_kernels = {id(layer.kernel) for layer in model._flatten_layers(recursive=True)
                  if isinstance(layer, WSConv2D)}
    for v in model.weights:
        value = v.numpy()
        if id(v) in ws_kernels:
            filters = value.shape[-1]
            value = value * rng.uniform(0.5, 3.0, filters) + rng.uniform(-0.5, 0.5, filters)
        else:
            value = value + rng.normal(0.0, 0.05, value.shape)
        v.assign(value.astype(v.dtype))


def ws_layers(model):
    return [layer for layer in model._flatten_layers(recursive=True)
            if isinstance(layer, WSConv2D)]


def assert_same_outputs(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key, value in a.items():
        want, got = np.asarray(value, np.float32), np.asarray(b[key], np.float32)
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(want - got).max() <= RTOL * scale, key


@pytest.fixture(scope="module")
def mdet():
    keras.utils.set_random_seed(0)
    model = build_mdet(TINY)
    perturb(model)
    return model


@pytest.fixture(scope="module")
def batch():
    return np.random.default_rng(1).random((2, 64, 96, 3), dtype=np.float32)


def test_fold_mdet_same_outputs_no_ws_left(mdet, batch):
    layers = ws_layers(mdet)
    assert len(layers) == 20  # ResNet-18: stem + 16 block convs + 3 projection shortcuts
    raw = {layer.name: layer.kernel.numpy().copy() for layer in layers}
    # The perturbation made the stored kernels far from standardised.
    stem = mdet.get_layer("backbone").get_layer("stem_conv")
    assert np.abs(raw["stem_conv"] - stem.standardized_kernel().numpy()).max() > 0.1
    before = mdet(batch, training=False)

    folded = fold_weight_standardization(mdet)

    assert folded is not mdet and folded.name == mdet.name
    assert not has_ws_conv(folded)
    assert_same_outputs(before, folded(batch, training=False))
    # The original is untouched: same layers, same raw kernels, same outputs.
    assert len(ws_layers(mdet)) == 20
    for layer in ws_layers(mdet):
        np.testing.assert_array_equal(layer.kernel.numpy(), raw[layer.name])
    after = mdet(batch, training=False)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])
    # Weights are copies, not shared variables.
    original_ids = {id(v) for v in mdet.weights}
    assert not any(id(v) in original_ids for v in folded.weights)
    assert len(folded.weights) == len(mdet.weights)


def test_folded_kernel_is_the_standardised_kernel(mdet):
    folded = fold_weight_standardization(mdet)
    old = mdet.get_layer("backbone").get_layer("stage3_block1_conv1")
    new = folded.get_layer("backbone").get_layer("stage3_block1_conv1")
    assert type(new) is keras.layers.Conv2D
    kernel = new.kernel.numpy()
    np.testing.assert_allclose(kernel, old.standardized_kernel().numpy(), atol=1e-6)
    # Per filter, over (kh, kw, c_in): mean 0, variance var / (var + eps) of the raw kernel.
    raw_var = old.kernel.numpy().astype(np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(kernel.var(axis=(0, 1, 2)), raw_var / (raw_var + old.ws_eps),
                               rtol=1e-4)
    # A non-WS layer keeps its (perturbed) weights.
    for name in ("fpn", "head"):
        for a, b in zip(mdet.get_layer(name).get_weights(), folded.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_folded_conv_keeps_the_configuration():
    layer = WSConv2D(12, (3, 5), strides=(2, 1), padding="same", dilation_rate=(1, 1),
                     groups=3, activation="relu", use_bias=True, name="ws",
                     kernel_regularizer="l2", ws_eps=1e-3)
    conv = folded_conv(layer)
    assert type(conv) is keras.layers.Conv2D
    want, got = layer.get_config(), conv.get_config()
    for key in ("name", "filters", "kernel_size", "strides", "padding", "data_format",
                "dilation_rate", "groups", "activation", "use_bias", "dtype", "trainable"):
        assert got[key] == want[key], key
    assert got["kernel_regularizer"] is None and "ws_eps" not in got


def test_bias_activation_strides_dilation_fold():
    inputs = keras.Input((None, None, 4))
    x = WSConv2D(6, 3, strides=2, padding="same", activation="relu", use_bias=True,
                 name="a")(inputs)
    x = WSConv2D(5, 3, dilation_rate=2, padding="valid", use_bias=True, name="b")(x)
    model = keras.Model(inputs, x)
    perturb(model, seed=3)
    x = np.random.default_rng(4).normal(size=(2, 17, 19, 4)).astype(np.float32)
    folded = fold_weight_standardization(model)
    np.testing.assert_array_equal(folded.get_layer("a").bias.numpy(),
                                  model.get_layer("a").bias.numpy())
    want, got = model(x).numpy(), folded(x).numpy()
    assert np.abs(want - got).max() <= RTOL * max(1.0, np.abs(want).max())


def test_model_without_ws_comes_back_unchanged():
    model = build_backbone(depth=18, norm="gn", ws=False, cbam=False, width=0.25)
    assert fold_weight_standardization(model) is model


def test_fold_loaded_keras_file(mdet, batch, tmp_path):
    path = tmp_path / "tiny.keras"
    mdet.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    folded = fold_weight_standardization(loaded)
    assert not has_ws_conv(folded) and has_ws_conv(loaded)
    want = loaded(batch, training=False)
    assert_same_outputs(want, folded(batch, training=False))
    assert_same_outputs(mdet(batch, training=False), want)


def test_mixed_bfloat16_policy_is_kept():
    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        keras.utils.set_random_seed(2)
        model = build_mdet(TINY)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    perturb(model, seed=5)
    folded = fold_weight_standardization(model)
    conv = folded.get_layer("backbone").get_layer("stem_conv")
    assert conv.dtype_policy.name == "mixed_bfloat16"
    assert conv.kernel.dtype == "float32" and conv.compute_dtype == "bfloat16"
    x = np.random.default_rng(6).random((1, 64, 64, 3), dtype=np.float32)
    want, got = model(x, training=False), folded(x, training=False)
    for key in want:
        assert got[key].dtype == want[key].dtype
        # Both convolve bfloat16 inputs with the same float32 kernel cast to bfloat16.
        a, b = np.asarray(want[key], np.float32), np.asarray(got[key], np.float32)
        assert np.abs(a - b).max() <= 1e-2 * max(1.0, np.abs(a).max()), key


def test_detector_same_detections(mdet):
    image = np.random.default_rng(7).random((1, 100, 70, 3), dtype=np.float32)
    folded = fold_weight_standardization(mdet)
    want = Detector(mdet, TINY, score_threshold=0.0, max_detections=50)(image)
    got = Detector(folded, TINY, score_threshold=0.0, max_detections=50)(image)
    count = int(want["num_detections"][0])
    assert count > 0 and int(got["num_detections"][0]) == count
    np.testing.assert_allclose(got["boxes"][0, :count], want["boxes"][0, :count], atol=1e-3)
    np.testing.assert_allclose(got["scores"][0, :count], want["scores"][0, :count], atol=1e-4)
