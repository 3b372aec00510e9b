"""Backbone: strides / channels per depth, parameter count vs Keras ResNet50, names, saving."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focas_keras.layers.cbam import CBAM  # noqa: E402
from focas_keras.layers.ws_conv2d import WSConv2D  # noqa: E402
from focas_keras.models.backbone import (  # noqa: E402
    build_backbone, gn_group_count, round_channels, stage_channels)

LEVELS = ("C2", "C3", "C4", "C5")

# keras.applications.ResNet50(include_top=False, weights=None).count_params(): every one of
# its 53 convs has a bias; ours have none. Biases: stem 64 + per stage
# (blocks * 6 * f + 4 * f for the projection), f = 64, 128, 256, 512.
KERAS_RESNET50_PARAMS = 23_587_712
RESNET50_CONV_BIASES = 64 + sum(n * 6 * f + 4 * f
                                for n, f in zip((3, 4, 6, 3), (64, 128, 256, 512)))
RESNET50_PARAMS = 23_561_152


def shapes(outputs):
    return {k: tuple(int(d) for d in v.shape) for k, v in outputs.items()}


@pytest.mark.parametrize("depth,resnext,channels", [
    (18, False, (16, 32, 64, 128)),
    (34, False, (16, 32, 64, 128)),
    (50, False, (64, 128, 256, 512)),
    (50, True, (64, 128, 256, 512)),
])
def test_strides_and_channels(depth, resnext, channels):
    model = build_backbone(depth=depth, resnext=resnext, width=0.25)
    x = np.random.default_rng(0).random((1, 64, 96, 3), dtype=np.float32)
    out = model(x)
    assert set(out) == set(LEVELS)
    expected = {f"C{s}": (1, 64 // 2 ** s, 96 // 2 ** s, c) for s, c in zip(range(2, 6), channels)}
    assert shapes(out) == expected
    assert all(np.all(np.isfinite(keras.ops.convert_to_numpy(v))) for v in out.values())
    n_blocks = {18: 8, 34: 16, 50: 16}[depth]
    n_cbam = sum(isinstance(layer, CBAM) for layer in model.layers)
    assert n_cbam == n_blocks


def test_resnext_uses_grouped_convs():
    model = build_backbone(depth=50, resnext=True, width=0.25, cbam=False)
    conv = model.get_layer("stage3_block1_conv2")
    assert conv.groups == 32 and conv.filters == 64 and conv.strides == (2, 2)
    assert stage_channels(50, 1.0, True, 32) == [(128, 256), (256, 512), (512, 1024),
                                                 (1024, 2048)]
    assert stage_channels(101, 1.0, False) == [(64, 256), (128, 512), (256, 1024),
                                               (512, 2048)]
    assert stage_channels(18, 1.0) == [(64, 64), (128, 128), (256, 256), (512, 512)]


@pytest.mark.parametrize("size", [(70, 100), (33, 65), (64, 64)])
def test_ceil_sizes_for_any_input(size):
    h, w = size
    model = build_backbone(depth=18, width=0.25, input_shape=(h, w, 3))
    for s in range(2, 6):
        assert tuple(model.output[f"C{s}"].shape[1:3]) == (-(-h // 2 ** s), -(-w // 2 ** s))


def test_resnet50_parameter_count_matches_keras_applications():
    assert RESNET50_CONV_BIASES == 26_560
    model = build_backbone(depth=50, norm="bn", ws=False, cbam=False, width=1.0)
    reference = keras.applications.ResNet50(include_top=False, weights=None)
    assert reference.count_params() == KERAS_RESNET50_PARAMS
    assert model.count_params() == RESNET50_PARAMS
    assert model.count_params() == reference.count_params() - RESNET50_CONV_BIASES
    assert abs(model.count_params() / reference.count_params() - 1) < 0.005
    # Trainable parameters (moving statistics excluded): 23,508,032, the usual ResNet-50
    # figure without the classifier (25,557,032 - 2048 * 1000 - 1000).
    assert sum(int(np.prod(w.shape)) for w in model.trainable_weights) == 23_508_032
    # Same per-level channels and the same number of convolutions.
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    ref_convs = [layer for layer in reference.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == len(ref_convs) == 53
    assert sorted(tuple(c.kernel.shape) for c in convs) == sorted(
        tuple(c.kernel.shape) for c in ref_convs)


def test_mdet_backbone_gn_ws_cbam_full_width():
    model = build_backbone()  # depth 50, gn, ws, cbam, width 1
    assert model.name == "resnet50_cbam_gn_ws"
    assert model.count_params() == 26_040_608  # all trainable (GroupNorm has no statistics)
    convs = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 53 and all(isinstance(c, WSConv2D) for c in convs)
    assert all(not c.use_bias for c in convs)
    norms = [layer for layer in model.layers if "_norm" in layer.name]
    assert len(norms) == 53
    assert all(isinstance(n, keras.layers.GroupNormalization) and n.groups == 32
               for n in norms)
    out = model(np.random.default_rng(1).random((1, 64, 64, 3), dtype=np.float32))
    assert shapes(out) == {"C2": (1, 16, 16, 256), "C3": (1, 8, 8, 512),
                           "C4": (1, 4, 4, 1024), "C5": (1, 2, 2, 2048)}


def test_layer_names_and_structure():
    model = build_backbone(depth=50, width=0.25)
    names = {layer.name for layer in model.layers}
    for expected in ("image", "stem_conv", "stem_norm", "stem_relu", "stem_pool",
                     "stage2_block1_conv1", "stage2_block1_norm3", "stage2_block1_cbam",
                     "stage2_block1_shortcut_conv", "stage2_block1_add", "stage2_block1_out",
                     "stage5_block3_conv3", "stage4_block6_cbam"):
        assert expected in names
    assert "stage2_block2_shortcut_conv" not in names  # identity shortcut
    # v1.5: the stride sits on the 3x3 conv of the first block of stages 3..5.
    for stage in (3, 4, 5):
        assert model.get_layer(f"stage{stage}_block1_conv1").strides == (1, 1)
        assert model.get_layer(f"stage{stage}_block1_conv2").strides == (2, 2)
        assert model.get_layer(f"stage{stage}_block1_shortcut_conv").strides == (2, 2)
    assert model.get_layer("stem_conv").kernel_size == (7, 7)
    assert model.get_layer("stem_conv").filters == 16
    assert isinstance(model.get_layer("stem_conv"), WSConv2D)
    # GroupNorm on 16 channels with gn_groups=32 falls back to 16 groups.
    assert model.get_layer("stem_norm").groups == 16
    assert model.get_layer("stage2_block1_norm3").groups == 32
    # Basic block, stage 2: no projection shortcut; bn / plain conv variant.
    small = build_backbone(depth=18, norm="bn", ws=False, cbam=False, width=0.25)
    assert "stage2_block1_shortcut_conv" not in {layer.name for layer in small.layers}
    assert type(small.get_layer("stage3_block1_conv1")) is keras.layers.Conv2D
    assert isinstance(small.get_layer("stage3_block1_norm1"), keras.layers.BatchNormalization)
    assert small.name == "resnet18"


def test_keras_save_load(tmp_path):
    model = build_backbone(depth=18, width=0.25, name="tiny")
    rng = np.random.default_rng(2)
    for w in model.weights:  # perturb so norms / CBAM biases are not at their init
        w.assign(w + 0.05 * rng.standard_normal(w.shape).astype("float32"))
    x = rng.random((2, 64, 64, 3), dtype=np.float32)
    expected = model(x)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("stem_conv"), WSConv2D)
    assert isinstance(loaded.get_layer("stage5_block2_cbam"), CBAM)
    got = loaded(x)
    for key in LEVELS:
        np.testing.assert_allclose(keras.ops.convert_to_numpy(got[key]),
                                   keras.ops.convert_to_numpy(expected[key]),
                                   rtol=1e-5, atol=1e-5)


def test_helpers():
    assert [round_channels(c) for c in (3, 16, 17.0, 20, 64 * 0.3)] == [8, 16, 16, 24, 16]
    assert gn_group_count(256, 32) == 32
    assert gn_group_count(16, 32) == 16
    assert gn_group_count(40, 32) == 20
    assert gn_group_count(24, 32) == 24
    assert gn_group_count(8, 32) == 8


@pytest.mark.parametrize("kwargs", [dict(depth=26), dict(norm="ln"),
                                    dict(depth=18, resnext=True), dict(width=0)])
def test_rejects_bad_args(kwargs):
    with pytest.raises(ValueError):
        build_backbone(**kwargs)
