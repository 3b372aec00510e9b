"""FPN: level shapes (square, non-square, odd), variants, hand-made top-down case, config."""

import math
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focas_keras.models.fpn import FPN  # noqa: E402

C_CHANNELS = {3: 24, 4: 40, 5: 64}


def features(h, w, levels=(3, 4, 5), batch=1, seed=0, channels=None):
    """Random C-level maps of an h x w image: C_l is ceil(h / 2^l) x ceil(w / 2^l)."""
    rng = np.random.default_rng(seed)
    channels = channels or C_CHANNELS
    return {f"C{lv}": rng.standard_normal(
        (batch, math.ceil(h / 2 ** lv), math.ceil(w / 2 ** lv), channels[lv])).astype("float32")
        for lv in levels}


def shapes(outputs):
    return {k: tuple(int(d) for d in v.shape) for k, v in outputs.items()}


def to_np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("h,w", [(128, 128), (96, 160), (100, 70), (33, 65)])
def test_shapes_levels_3_to_7(h, w):
    fpn = FPN(channels=16)
    out = fpn(features(h, w, batch=2))
    assert shapes(out) == {f"P{lv}": (2, math.ceil(h / 2 ** lv), math.ceil(w / 2 ** lv), 16)
                           for lv in range(3, 8)}
    symbolic = fpn.compute_output_shape({k: v.shape for k, v in features(h, w).items()})
    assert {k: v[1:] for k, v in symbolic.items()} == {k: v[1:] for k, v in shapes(out).items()}


@pytest.mark.parametrize("h,w", [(128, 128), (96, 160)])
def test_levels_3_to_5_has_no_extra_convs(h, w):
    fpn = FPN(channels=8, max_level=5)
    out = fpn(features(h, w))
    assert shapes(out) == {f"P{lv}": (1, h // 2 ** lv, w // 2 ** lv, 8) for lv in (3, 4, 5)}
    assert not fpn.extra_convs
    assert len(fpn.weights) == 2 * 6  # 3 lateral + 3 output convs


def test_variants():
    x = features(96, 160, levels=(2, 3, 4, 5), channels={2: 8, **C_CHANNELS})
    # P2..P6 from C2..C5; P6 from C5.
    fpn = FPN(channels=8, min_level=2, max_level=6, input_levels=(2, 3, 4, 5), extra_from="c5")
    out = fpn(x)
    assert sorted(out) == ["P2", "P3", "P4", "P5", "P6"]
    assert tuple(out["P2"].shape) == (1, 24, 40, 8) and tuple(out["P6"].shape) == (1, 2, 3, 8)
    assert fpn.extra_convs[0].kernel.shape == (3, 3, 64, 8)
    # min_level 4: C2, C3 are ignored; max_level 4 < top input level: P5 not returned.
    fpn = FPN(channels=8, min_level=4, max_level=4, input_levels=(2, 3, 4, 5))
    out = fpn(x)
    assert shapes(out) == {"P4": (1, 6, 10, 8)}
    assert [c.name for c in fpn.lateral_convs] == ["lateral_c4", "lateral_c5"]
    # Only two input levels, extras up to P7.
    fpn = FPN(channels=8, min_level=4, max_level=7, input_levels=(4, 5))
    assert sorted(FPN(channels=8, input_levels=(3, 4)).get_config()["input_levels"]) == [3, 4]
    assert sorted(fpn(x)) == ["P4", "P5", "P6", "P7"]


def test_extra_relu_and_source():
    """P7 = conv(ReLU(P6)) with the ReLU, conv(P6) without; P6 from P5 or C5."""
    x = features(64, 64, seed=3)
    with_relu = FPN(channels=8, extra_from="p5", use_relu_between_extra=True)
    out = with_relu(x)
    no_relu = FPN(channels=8, extra_from="p5", use_relu_between_extra=False)
    no_relu(x)
    no_relu.set_weights(with_relu.get_weights())
    out2 = no_relu(x)
    np.testing.assert_allclose(to_np(out2["P6"]), to_np(out["P6"]), atol=1e-6)
    p7_conv = with_relu.extra_convs[1]
    np.testing.assert_allclose(to_np(out["P7"]), to_np(p7_conv(keras.ops.relu(out["P6"]))),
                               atol=1e-5)
    np.testing.assert_allclose(to_np(out2["P7"]), to_np(p7_conv(out["P6"])), atol=1e-5)
    np.testing.assert_allclose(to_np(out["P6"]), to_np(with_relu.extra_convs[0](out["P5"])),
                               atol=1e-5)


def test_top_down_nearest_upsampling_by_hand():
    """Identity laterals / output convs on 1-channel maps: P_l = C_l + crop(up2(P_{l+1}))."""
    h, w = 100, 70  # odd level sizes: C3 13x9, C4 7x5, C5 4x3 -> crops needed
    x = features(h, w, channels={3: 1, 4: 1, 5: 1}, seed=4)
    fpn = FPN(channels=1, max_level=5)
    fpn(x)
    for conv in fpn.lateral_convs:
        conv.set_weights([np.ones((1, 1, 1, 1), "float32"), np.zeros(1, "float32")])
    centre = np.zeros((3, 3, 1, 1), "float32")
    centre[1, 1] = 1.0
    for conv in fpn.output_convs:
        conv.set_weights([centre, np.zeros(1, "float32")])
    out = fpn(x)

    def up(a, shape):
        return np.repeat(np.repeat(a, 2, axis=1), 2, axis=2)[:, :shape[1], :shape[2]]

    p5 = x["C5"]
    p4 = x["C4"] + up(p5, x["C4"].shape)
    p3 = x["C3"] + up(p4, x["C3"].shape)
    for key, expected in (("P5", p5), ("P4", p4), ("P3", p3)):
        np.testing.assert_allclose(to_np(out[key]), expected, rtol=1e-5, atol=1e-5)


def test_config_round_trip():
    x = features(96, 160)
    fpn = FPN(channels=12, min_level=3, max_level=6, extra_from="c5",
              use_relu_between_extra=False, kernel_initializer="he_normal", name="my_fpn")
    y = fpn(x)
    config = fpn.get_config()
    for key, value in dict(channels=12, min_level=3, max_level=6, input_levels=[3, 4, 5],
                           extra_from="c5", use_relu_between_extra=False,
                           name="my_fpn").items():
        assert config[key] == value
    assert config["kernel_initializer"]["class_name"] == "HeNormal"
    clone = FPN.from_config(config)
    assert clone.get_config() == config
    clone(x)
    clone.set_weights(fpn.get_weights())
    got = clone(x)
    for key in y:
        np.testing.assert_allclose(to_np(got[key]), to_np(y[key]), rtol=1e-5, atol=1e-5)


def test_functional_unknown_sizes_and_keras_save_load(tmp_path):
    inputs = {f"C{lv}": keras.Input((None, None, C_CHANNELS[lv]), name=f"C{lv}")
              for lv in (3, 4, 5)}
    outputs = FPN(channels=8, name="fpn")(inputs)
    assert all(tuple(v.shape) == (None, None, None, 8) for v in outputs.values())
    model = keras.Model(inputs, outputs)
    x = features(100, 70, seed=5)
    expected = model(x)
    path = tmp_path / "fpn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    got = loaded(x)
    assert sorted(got) == ["P3", "P4", "P5", "P6", "P7"]
    for key in expected:
        np.testing.assert_allclose(to_np(got[key]), to_np(expected[key]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(input_levels=(3, 5)), dict(min_level=2),
                                    dict(max_level=2), dict(extra_from="p4")])
def test_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        FPN(**kwargs)
