"""Mclass: model shapes/dtypes/serialisation, patch resizing, probabilities, weight init, config."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import json  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from focas_keras.errors import InputError  # noqa: E402
from focas_keras.models.backbone import build_backbone  # noqa: E402
from focas_keras.models.mclass import (  # noqa: E402
    build_mclass, load_init_weights, predict_proba, predict_proba_tta, resize_patches)
from focas_keras.models.mclass_config import (  # noqa: E402
    MclassConfig, MclassModelConfig, MclassTrainConfig, preset)


def small(depth=18, width=0.25, dropout=0.0):
    return MclassConfig(model=MclassModelConfig(depth=depth, width=width, dropout=dropout))


def images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def perturb(model, seed=1):
    """Random values for every variable (BN statistics included), so loads are observable."""
    rng = np.random.default_rng(seed)
    for v in model.variables:
        v.assign(rng.uniform(0.5, 1.5, v.shape).astype(v.dtype))


def test_shapes_and_any_input_size():
    model = build_mclass(small(dropout=0.2))
    assert model.name == "mclass"
    assert [layer.name for layer in model.layers] == [
        "image", "rescale", "backbone", "pool", "dropout", "logit"]
    assert tuple(model(images(3)).shape) == (3, 1)
    assert tuple(model(images(2, 112)).shape) == (2, 1)
    assert model.get_layer("backbone").get_layer("stem_norm").__class__.__name__ == \
        "BatchNormalization"


def test_logits_float32_under_mixed_precision():
    policy = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
        model = build_mclass(small())
        assert model.get_layer("backbone").get_layer("stem_conv").compute_dtype == "bfloat16"
        out = model(images())
        assert out.dtype == "float32" and tuple(out.shape) == (2, 1)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def test_keras_save_load_round_trip(tmp_path):
    model = build_mclass(small(dropout=0.1))
    perturb(model)
    x = images()
    path = tmp_path / "mclass.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_resize_patches():
    patch = np.empty((2, 112, 112, 3), np.uint8)
    patch[:] = (200, 100, 50)
    out = resize_patches(patch, 64)
    assert out.dtype == "float32" and tuple(out.shape) == (2, 64, 64, 3)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to([200 / 255, 100 / 255, 50 / 255],
                                                            (2, 64, 64, 3)), atol=1e-6)
    small_patch = np.full((1, 40, 40, 3), 0.25, np.float32)
    np.testing.assert_allclose(resize_patches(small_patch, 64).numpy(), 0.25, atol=1e-6)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_patches(x, 64).numpy(), x.astype(np.float32) / 255)
    # shrinking averages (area): a 2x2 checkerboard of 0/1 becomes 0.5
    board = np.indices((128, 128)).sum(0) % 2
    board = np.repeat(board[None, :, :, None], 3, axis=3).astype(np.float32)
    np.testing.assert_allclose(resize_patches(board, 64).numpy(), 0.5, atol=1e-6)
    with pytest.raises(ValueError):
        resize_patches(np.zeros((64, 64, 3), np.uint8), 64)


def test_predict_proba():
    model = build_mclass(small())
    patches = np.random.default_rng(0).integers(0, 256, (5, 112, 112, 3), dtype=np.uint8)
    proba = predict_proba(model, patches, 64, batch_size=2)
    assert proba.shape == (5,) and proba.dtype == np.float32
    assert np.all((proba >= 0) & (proba <= 1))
    logits = model(resize_patches(patches, 64)).numpy()[:, 0]
    np.testing.assert_allclose(proba, 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-6)
    empty = predict_proba(model, np.zeros((0, 112, 112, 3), np.uint8), 64)
    assert empty.shape == (0,)


def _sharp_mclass():
    """A random Mclass whose probabilities spread (logit kernel x 30)."""
    keras.utils.set_random_seed(0)
    model = build_mclass(small())
    logit = model.get_layer("logit")
    logit.kernel.assign(logit.kernel * 30.0)
    return model


def _dihedral(patches):
    """The 8 symmetries of the square, written out one by one (rotations counter-clockwise)."""
    t = patches.transpose(0, 2, 1, 3)
    return [patches, t[:, ::-1], patches[:, ::-1, ::-1], t[:, :, ::-1],  # 0, 90, 180, 270
            patches[:, :, ::-1], patches[:, ::-1], t, t[:, ::-1, ::-1]]  # flips, (anti)transpose


def test_tta_is_the_mean_of_the_eight_transformed_predictions():
    model = _sharp_mclass()
    patches = np.random.default_rng(2).integers(0, 256, (3, 112, 96, 3), dtype=np.uint8)
    views = [predict_proba(model, np.ascontiguousarray(v), 64, batch_size=2)
             for v in _dihedral(patches)]
    tta = predict_proba_tta(model, patches, 64, batch_size=2)
    assert tta.shape == (3,) and tta.dtype == np.float32
    np.testing.assert_allclose(tta, np.mean(views, axis=0), atol=1e-6)
    assert np.abs(tta - views[0]).max() > 1e-3  # the model is not orientation-blind
    assert predict_proba_tta(model, np.zeros((0, 112, 112, 3), np.uint8), 64).shape == (0,)


def test_tta_of_a_dihedral_invariant_patch_equals_no_tta():
    model = _sharp_mclass()
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (2, 112, 112, 3)).astype(np.int64)
    patches = (sum(_dihedral(base)) // 8).astype(np.uint8)  # the group average: invariant
    for view in _dihedral(patches):
        np.testing.assert_array_equal(view, patches)
    np.testing.assert_allclose(predict_proba_tta(model, patches, 64),
                               predict_proba(model, patches, 64), atol=1e-6)


def test_init_from_whole_model(tmp_path):
    source = build_mclass(small())
    perturb(source)
    path = tmp_path / "whole.weights.h5"
    source.save_weights(path)
    target = build_mclass(small())
    assert load_init_weights(target, path) == "mclass"
    x = images()
    np.testing.assert_allclose(target(x).numpy(), source(x).numpy(), rtol=1e-5, atol=1e-5)


def test_init_from_backbone_only(tmp_path):
    source = build_backbone(18, norm="bn", ws=False, cbam=False, width=0.25, name="resnet18")
    perturb(source)
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    target = build_mclass(small())
    head = target.get_layer("logit").get_weights()
    assert load_init_weights(target, path) == "backbone"
    x = images()
    got = target.get_layer("backbone")(x)
    want = source(x)
    for level in ("C2", "C3", "C4", "C5"):
        np.testing.assert_allclose(got[level].numpy(), want[level].numpy(), rtol=1e-5, atol=1e-5)
    for before, after in zip(head, target.get_layer("logit").get_weights()):
        np.testing.assert_array_equal(before, after)


def test_init_from_file_without_layer_names(tmp_path):
    """Files without the per-layer ``name`` attribute are matched by their group keys."""
    source = build_backbone(18, norm="bn", ws=False, cbam=False, width=0.25)
    perturb(source)
    path = tmp_path / "old.weights.h5"
    source.save_weights(path)
    with h5py.File(path, "a") as handle:
        handle.visititems(lambda name, obj: obj.attrs.pop("name", None)
                          if isinstance(obj, h5py.Group) else None)
    target = build_mclass(small())
    assert load_init_weights(target, path) == "backbone"
    x = images()
    np.testing.assert_allclose(target.get_layer("backbone")(x)["C5"].numpy(),
                               source(x)["C5"].numpy(), rtol=1e-5, atol=1e-5)


def test_init_mismatch_names_layer_and_shapes(tmp_path):
    target = build_mclass(small())
    wide = tmp_path / "wide.weights.h5"
    build_backbone(18, norm="bn", ws=False, cbam=False, width=0.5).save_weights(wide)
    with pytest.raises(InputError) as info:
        load_init_weights(target, wide)
    message = str(info.value)
    assert str(wide) in message
    assert "layer 'stem_conv' kernel has shape (7, 7, 3, 32) in the file but (7, 7, 3, 16) " \
           "in the model" in message

    deep = tmp_path / "deep.weights.h5"
    build_mclass(small(depth=34)).save_weights(deep)
    with pytest.raises(InputError) as info:
        load_init_weights(target, deep)
    message = str(info.value)
    assert str(deep) in message and "an Mclass" in message
    assert "layer 'backbone/stage2_block3_conv1' (and 31 more) is in the file but not in the " \
           "model" in message

    deep_backbone = tmp_path / "deep_backbone.weights.h5"
    build_backbone(34, norm="bn", ws=False, cbam=False, width=0.25).save_weights(deep_backbone)
    with pytest.raises(InputError, match=r"layer 'stage2_block3_conv1' \(and 31 more\) is in "):
        load_init_weights(target, deep_backbone)

    before = target.get_weights()
    gn = tmp_path / "gn.weights.h5"
    build_backbone(18, norm="gn", ws=False, cbam=False, width=0.25).save_weights(gn)
    with pytest.raises(InputError, match="layer 'stem_norm' has 2 variables in the file "
                                         "but 4 in the model"):
        load_init_weights(target, gn)
    # nothing was half-loaded (stem_conv matched before stem_norm failed)
    for a, b in zip(before, target.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_init_bad_files(tmp_path):
    target = build_mclass(small())
    missing = tmp_path / "missing.weights.h5"
    with pytest.raises(InputError, match="not found") as info:
        load_init_weights(target, missing)
    assert str(missing) in str(info.value)
    text = tmp_path / "notes.weights.h5"
    text.write_text("not hdf5")
    with pytest.raises(InputError, match="not an HDF5 weights file") as info:
        load_init_weights(target, text)
    assert str(text) in str(info.value)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as handle:
        handle.create_dataset("x", data=np.zeros(3))
    with pytest.raises(InputError, match="no 'layers' group") as info:
        load_init_weights(target, other)
    assert str(other) in str(info.value)


def test_presets_round_trip_and_override():
    paper = preset("paper")
    assert paper.model == MclassModelConfig(depth=34, width=1.0, input_size=64, dropout=0.0)
    assert (paper.train.optimizer, paper.train.learning_rate, paper.train.epochs,
            paper.train.batch_size) == ("adam", 1e-4, 20, 64)
    assert paper.crop_size == 112
    tiny = preset("tiny")
    assert (tiny.model.depth, tiny.model.width, tiny.model.input_size) == (18, 0.25, 64)
    assert (tiny.train.learning_rate, tiny.train.epochs, tiny.train.batch_size) == (2e-3, 4, 32)
    for config in (paper, tiny, paper.override(**{"train.decay_epochs": [10, 15]})):
        again = MclassConfig.from_dict(json.loads(config.to_json()))
        assert again == config
    changed = tiny.override(**{"model.dropout": 0.3, "train.epochs": None, "crop_size": 96})
    assert changed.model.dropout == 0.3 and changed.train.epochs == 4 and changed.crop_size == 96
    assert changed.override(**{"train.decay_epochs": [2, 3]}).train.decay_epochs == (2, 3)
    with pytest.raises(InputError, match="unknown preset"):
        preset("huge")


@pytest.mark.parametrize("field, value, words", [
    ("model.depth", 20, "model.depth"),
    ("model.width", 0, "model.width"),
    ("model.input_size", 16, "model.input_size"),
    ("model.dropout", 1.0, "model.dropout"),
    ("train.optimizer", "rmsprop", "sgd/adam/adamw"),
    ("train.learning_rate", -1.0, "learning_rate"),
    ("train.positive_share", 1.0, "positive_share"),
    ("train.positive_share", 0, "positive_share"),
    ("train.precision", "float16", "precision"),
    ("train.batch_size", 0, "batch_size"),
    ("train.label_smoothing", 1.5, "label_smoothing"),
    ("crop_size", 0, "crop_size"),
])
def test_validate_errors(field, value, words):
    with pytest.raises(InputError, match=words):
        preset("tiny").override(**{field: value})


def test_unknown_keys():
    with pytest.raises(InputError, match="unknown config field 'model.colour'"):
        preset("tiny").override(**{"model.colour": 1})
    with pytest.raises(InputError, match="unknown config key"):
        MclassConfig.from_dict({"optimizer": "adam"})
    with pytest.raises(InputError, match="train.momentum"):
        MclassConfig.from_dict({"train": {"momentum": 0.9}})
    assert dataclasses.is_dataclass(MclassTrainConfig) and MclassConfig().validate()
