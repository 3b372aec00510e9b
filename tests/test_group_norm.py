import numpy as np
import pytest
import keras

from focas_keras.layers.group_norm import GroupNorm


def _pair(groups, channels, center=True, scale=True):
    ours = GroupNorm(groups=groups, epsilon=1e-5, center=center, scale=scale)
    ref = keras.layers.GroupNormalization(groups=groups, epsilon=1e-5, center=center,
                                          scale=scale)
    shape = (2, 9, 7, channels)
    ours.build(shape)
    ref.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.uniform(0.5, 1.5, channels).astype("float32") if scale else None,
               rng.normal(0, 1, channels).astype("float32") if center else None]
    weights = [w for w in weights if w is not None]
    ours.set_weights(weights)
    ref.set_weights(weights)
    return ours, ref


@pytest.mark.parametrize("groups,channels,center,scale", [
    (4, 16, True, True), (1, 8, True, True), (8, 8, True, True), (4, 16, False, False)])
def test_matches_keras_group_normalization(groups, channels, center, scale):
    ours, ref = _pair(groups, channels, center, scale)
    rng = np.random.default_rng(1)
    # Channels with very different means: the per-channel route must add the between-channel
    # spread back into each group's variance.
    x = (rng.normal(0, 1, (2, 9, 7, channels)) * rng.uniform(0.1, 5, channels)
         + rng.uniform(-20, 20, channels)).astype("float32")
    np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-4)


def test_each_group_is_standardised():
    layer = GroupNorm(groups=2, epsilon=1e-5)
    x = np.random.default_rng(2).normal(3, 2, (1, 5, 5, 4)).astype("float32")
    y = layer(x).numpy().reshape(25, 2, 2)    # gamma 1, beta 0
    for g in range(2):
        values = y[:, g, :]
        assert abs(values.mean()) < 1e-5
        assert abs(values.var() - 1.0) < 1e-3


def test_bfloat16_output_dtype_and_config_round_trip():
    layer = GroupNorm(groups=2, epsilon=1e-3, dtype="mixed_bfloat16", name="gn")
    y = layer(np.ones((1, 3, 3, 4), "float32"))
    assert y.dtype == "bfloat16"
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(clone, GroupNorm)
    assert clone.get_config() == layer.get_config()
