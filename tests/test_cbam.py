"""CBAM: shapes, hand-computed values, config and .keras round trips, mixed precision."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focas_keras.layers.cbam import CBAM  # noqa: E402


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def to_np(x):
    return keras.ops.convert_to_numpy(x)


def set_all(layer, fill):
    layer.set_weights([np.full(w.shape, fill, "float32") for w in layer.get_weights()])


@pytest.mark.parametrize("shape", [(2, 9, 7, 24), (1, 16, 16, 64), (1, 1, 1, 8)])
def test_output_shape_equals_input(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype("float32")
    assert to_np(CBAM()(x)).shape == shape


def test_unknown_spatial_dims():
    inputs = keras.Input((None, None, 32))
    outputs = CBAM(name="att")(inputs)
    assert tuple(outputs.shape) == (None, None, None, 32)
    model = keras.Model(inputs, outputs)
    for h, w in ((5, 7), (12, 3)):
        assert to_np(model(np.ones((1, h, w, 32), "float32"))).shape == (1, h, w, 32)


@pytest.mark.parametrize("channels,ratio,min_hidden,hidden",
                         [(64, 16, 8, 8), (256, 16, 8, 16), (24, 4, 2, 6), (16, 16, 1, 1)])
def test_hidden_channels(channels, ratio, min_hidden, hidden):
    layer = CBAM(ratio=ratio, min_hidden=min_hidden)
    layer.build((None, None, None, channels))
    assert layer.mlp_conv1.filters == hidden
    assert layer.mlp_conv2.filters == channels
    assert layer.spatial_conv.kernel_size == (7, 7)


def test_zero_weights_give_quarter():
    """All weights zero: Mc = sigmoid(0 + 0) = 0.5, Ms = sigmoid(0) = 0.5 -> 0.25 * x."""
    x = np.random.default_rng(1).standard_normal((2, 6, 5, 16)).astype("float32")
    layer = CBAM()
    layer.build(x.shape)
    set_all(layer, 0.0)
    np.testing.assert_allclose(to_np(layer(x)), 0.25 * x, rtol=1e-6, atol=1e-6)


def test_hand_computed_values():
    """MLP output = its bias (kernels 0); spatial conv = centre tap only, so Ms is pointwise."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 5, 6, 8)).astype("float32")
    layer = CBAM(ratio=2, spatial_kernel=3, min_hidden=1)
    layer.build(x.shape)
    set_all(layer, 0.0)
    b2 = rng.standard_normal(8).astype("float32")
    layer.mlp_conv2.bias.assign(b2)
    k = np.zeros((3, 3, 2, 1), "float32")
    k[1, 1, 0, 0], k[1, 1, 1, 0] = 0.8, -1.5
    layer.spatial_conv.kernel.assign(k)
    layer.spatial_conv.bias.assign(np.array([0.2], "float32"))

    mc = sigmoid(2.0 * b2)  # MLP(avg) + MLP(max) = b2 + b2
    xc = x * mc
    ms = sigmoid(0.8 * xc.mean(-1, keepdims=True) - 1.5 * xc.max(-1, keepdims=True) + 0.2)
    np.testing.assert_allclose(to_np(layer(x)), ms * xc, rtol=1e-5, atol=1e-6)


def test_hand_computed_channel_mlp():
    """1-hidden-unit MLP with known weights on global avg / max pooled features."""
    x = np.arange(2 * 3 * 2, dtype="float32").reshape(1, 2, 3, 2) / 10.0 - 0.4
    layer = CBAM(ratio=2, spatial_kernel=1, min_hidden=1)
    layer.build(x.shape)
    set_all(layer, 0.0)
    w1 = np.array([[[[1.0], [-2.0]]]], "float32")  # (1, 1, 2, 1)
    w2 = np.array([[[[0.5, -1.0]]]], "float32")  # (1, 1, 1, 2)
    layer.mlp_conv1.set_weights([w1, np.array([0.1], "float32")])
    layer.mlp_conv2.set_weights([w2, np.array([0.0, 0.3], "float32")])

    def mlp(v):  # v: [2]
        h = max(0.0, float(v @ w1[0, 0, :, 0]) + 0.1)
        return h * w2[0, 0, 0] + np.array([0.0, 0.3])

    avg, mx = x.mean(axis=(0, 1, 2)), x.max(axis=(0, 1, 2))
    xc = x * sigmoid(mlp(avg) + mlp(mx))
    np.testing.assert_allclose(to_np(layer(x)), 0.5 * xc, rtol=1e-5, atol=1e-6)


def test_config_round_trip():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 8, 8, 12)).astype("float32")
    layer = CBAM(ratio=4, spatial_kernel=3, min_hidden=2, name="my_cbam")
    y = to_np(layer(x))
    config = layer.get_config()
    assert {k: config[k] for k in ("ratio", "spatial_kernel", "min_hidden", "name")} == {
        "ratio": 4, "spatial_kernel": 3, "min_hidden": 2, "name": "my_cbam"}
    clone = CBAM.from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_np(clone(x)), y, rtol=1e-6, atol=1e-6)


def test_keras_save_load(tmp_path):
    rng = np.random.default_rng(4)
    inputs = keras.Input((None, None, 16))
    x = keras.layers.Conv2D(16, 3, padding="same", name="conv")(inputs)
    outputs = CBAM(ratio=4, spatial_kernel=5, name="cbam")(x)
    model = keras.Model(inputs, outputs)
    for w in model.weights:  # non-trivial values, also for the zero-initialised biases
        w.assign(rng.standard_normal(w.shape).astype("float32") * 0.3)
    data = rng.standard_normal((2, 10, 6, 16)).astype("float32")
    expected = to_np(model(data))
    path = tmp_path / "cbam.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("cbam"), CBAM)
    assert loaded.get_layer("cbam").spatial_kernel == 5
    np.testing.assert_allclose(to_np(loaded(data)), expected, rtol=1e-6, atol=1e-6)


def test_mixed_precision():
    x = np.random.default_rng(5).standard_normal((1, 8, 8, 16)).astype("float32")
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = CBAM()
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        assert all(keras.backend.standardize_dtype(w.dtype) == "float32" for w in layer.weights)
        symbolic = layer(keras.Input((None, None, 16)))
        assert keras.backend.standardize_dtype(symbolic.dtype) == "float16"
    finally:
        keras.mixed_precision.set_global_policy(previous)
    assert np.all(np.isfinite(to_np(y).astype("float32")))


def test_rejects_bad_args():
    with pytest.raises(ValueError):
        CBAM(ratio=0)
    with pytest.raises(ValueError):
        CBAM().build((None, None, None, None))
