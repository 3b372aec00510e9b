"""WSConv2D: standardised kernel statistics, equivalence with a plain Conv2D, config, groups."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focas_keras.layers.ws_conv2d import WSConv2D  # noqa: E402


def standardise(kernel, eps=1e-5):
    """Numpy reference: per output filter over (kh, kw, c_in), population variance."""
    mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
    var = kernel.var(axis=(0, 1, 2), keepdims=True)
    return (kernel - mean) / np.sqrt(var + eps)


def random_weights(layer, rng, scale=0.7, shift=0.3):
    weights = [shift + scale * rng.standard_normal(w.shape).astype("float32")
               for w in layer.get_weights()]
    layer.set_weights(weights)
    return weights


def test_effective_kernel_has_zero_mean_unit_variance():
    rng = np.random.default_rng(0)
    layer = WSConv2D(16, 3)
    layer.build((None, None, None, 8))
    random_weights(layer, rng)
    kernel = keras.ops.convert_to_numpy(layer.standardized_kernel())
    assert kernel.shape == (3, 3, 8, 16)
    np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(kernel.var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    # The stored variable is left untouched.
    assert abs(float(np.mean(layer.get_weights()[0])) - 0.3) < 0.1


def test_default_init_kernel_is_standardised():
    layer = WSConv2D(8, 3, kernel_initializer="he_normal")
    layer.build((None, None, None, 16))
    kernel = keras.ops.convert_to_numpy(layer.standardized_kernel())
    np.testing.assert_allclose(kernel.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    # var / (var + eps) with var ~ 2 / 144: within 1 % of one.
    np.testing.assert_allclose(kernel.var(axis=(0, 1, 2)), 1.0, rtol=1e-2)


@pytest.mark.parametrize("strides,padding", [(1, "same"), (2, "same"), (1, "valid")])
def test_matches_plain_conv_with_standardised_kernel(strides, padding):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 11, 9, 5)).astype("float32")
    layer = WSConv2D(7, 3, strides=strides, padding=padding)
    layer.build(x.shape)
    kernel, bias = random_weights(layer, rng)
    plain = keras.layers.Conv2D(7, 3, strides=strides, padding=padding)
    plain.build(x.shape)
    plain.set_weights([standardise(kernel), bias])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)),
                               keras.ops.convert_to_numpy(plain(x)), rtol=1e-4, atol=1e-4)


def test_custom_eps_is_used():
    rng = np.random.default_rng(2)
    layer = WSConv2D(4, 1, use_bias=False, ws_eps=0.5)
    layer.build((None, None, None, 3))
    kernel = random_weights(layer, rng, scale=0.3)[0]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.standardized_kernel()),
                               standardise(kernel, eps=0.5), rtol=1e-5, atol=1e-6)


def test_config_round_trip_non_default_args():
    rng = np.random.default_rng(3)
    layer = WSConv2D(12, (3, 5), strides=(2, 1), padding="same", groups=3, activation="relu",
                     use_bias=False, kernel_initializer="he_uniform", ws_eps=1e-3,
                     name="ws_custom")
    x = rng.standard_normal((2, 10, 12, 6)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    assert config["ws_eps"] == 1e-3
    assert config["groups"] == 3 and config["use_bias"] is False
    assert config["strides"] == (2, 1) and config["kernel_size"] == (3, 5)
    clone = WSConv2D.from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), y, rtol=1e-5, atol=1e-5)
    # Registered under the package name, so generic deserialisation finds it.
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(restored) is WSConv2D and restored.ws_eps == 1e-3


def test_grouped_conv_equals_per_group_convs():
    rng = np.random.default_rng(4)
    groups, c_in, filters = 4, 8, 12
    x = rng.standard_normal((1, 9, 9, c_in)).astype("float32")
    layer = WSConv2D(filters, 3, padding="same", groups=groups)
    y = keras.ops.convert_to_numpy(layer(x))
    assert y.shape == (1, 9, 9, filters)
    kernel, bias = random_weights(layer, rng)
    assert kernel.shape == (3, 3, c_in // groups, filters)
    y = keras.ops.convert_to_numpy(layer(x))
    k_std = standardise(kernel)
    per_in, per_out = c_in // groups, filters // groups
    parts = []
    for g in range(groups):
        conv = keras.layers.Conv2D(per_out, 3, padding="same")
        xg = x[..., g * per_in:(g + 1) * per_in]
        conv.build(xg.shape)
        conv.set_weights([k_std[..., g * per_out:(g + 1) * per_out],
                          bias[g * per_out:(g + 1) * per_out]])
        parts.append(keras.ops.convert_to_numpy(conv(xg)))
    np.testing.assert_allclose(y, np.concatenate(parts, axis=-1), rtol=1e-4, atol=1e-4)


def test_mixed_precision():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 8, 4)).astype("float32")
    reference = WSConv2D(6, 3, padding="same")
    reference.build(x.shape)
    weights = random_weights(reference, rng)
    expected = keras.ops.convert_to_numpy(reference(x))
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = WSConv2D(6, 3, padding="same")
        layer.build(x.shape)
        layer.set_weights(weights)
        y = layer(x)
        assert keras.backend.standardize_dtype(y.dtype) == "float16"
        assert keras.backend.standardize_dtype(layer.kernel.dtype) == "float32"
        assert keras.backend.standardize_dtype(layer.standardized_kernel().dtype) == "float32"
        # Symbolic use in a functional model.
        inputs = keras.Input((None, None, 4))
        assert keras.backend.standardize_dtype(layer(inputs).dtype) == "float16"
    finally:
        keras.mixed_precision.set_global_policy(previous)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(y).astype("float32"), expected,
                               rtol=2e-2, atol=2e-2)


def test_rejects_negative_eps():
    with pytest.raises(ValueError):
        WSConv2D(4, 3, ws_eps=-1.0)
