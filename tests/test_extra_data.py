"""Mclass batches drawn from several shard directories (``train-cls --extra-data``)."""

import json

import cv2
import numpy as np
import pytest

from focas_keras.datasets.prepare import PrepareConfig, prepare
from focas_keras.datasets.readers import read_dataset
from focas_keras.data import pipeline
from focas_keras.errors import InputError
from focas_keras.models.mclass_config import preset
from focas_keras.training.cls_trainer import train_cls

CONFIG = PrepareConfig(tile_size=96, patch_size=32, det_tiles_per_mitosis=1, cls_per_mitosis=6,
                       cls_background_per_image=8, val_slides=("A02",), seed=3, shard_mb=0.1)


def _without_red(root):
    """Zeroes the red channel of every image: patches of this set are told apart by colour."""
    for path in root.glob("*.png"):
        image = cv2.imread(str(path))
        image[..., 2] = 0
        cv2.imwrite(str(path), image)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    from conftest import write_tiny_icpr

    root = tmp_path_factory.mktemp("extra")
    write_tiny_icpr(root / "main")
    prepare(read_dataset("icpr2012", root / "main"), root / "main_shards", CONFIG)
    write_tiny_icpr(root / "other", seed=1)
    _without_red(root / "other")
    prepare(read_dataset("icpr2012", root / "other"), root / "other_shards", CONFIG)
    # Positives only, as a set of mitosis crops would give without same-crop negatives.
    prepare(read_dataset("icpr2012", root / "other"), root / "other_pos",
            PrepareConfig(**{**CONFIG.__dict__, "cls_background_per_image": 0}))
    prepare(read_dataset("icpr2012", root / "main"), root / "wide",
            PrepareConfig(**{**CONFIG.__dict__, "patch_size": 40}))
    return root


def _shares(ds, batches=25):
    """(share of positives, share of extra-source patches among positives, among negatives)."""
    images, labels = [], []
    for x, y in ds.take(batches):
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    extra = images[..., 0].mean(axis=(1, 2)) < 0.3  # the red-less set
    pos = labels == 1
    return pos.mean(), extra[pos].mean(), extra[~pos].mean()


def test_extra_share_of_each_label(sources):
    ds = pipeline.cls_dataset(sources / "main_shards", "train", batch_size=40,
                              positive_share=0.5, seed=0,
                              extra_dirs=[sources / "other_shards"], extra_share=0.4)
    positive, extra_pos, extra_neg = _shares(ds)
    assert abs(positive - 0.5) < 0.07
    assert abs(extra_pos - 0.4) < 0.08 and abs(extra_neg - 0.4) < 0.08


def test_positives_only_source_gives_positives_only(sources):
    manifest = pipeline.load_manifest(sources / "other_pos")
    assert manifest["splits"]["train"]["cls"]["negative"] == 0
    ds = pipeline.cls_dataset(sources / "main_shards", "train", batch_size=40,
                              positive_share=0.5, seed=1,
                              extra_dirs=[sources / "other_pos"], extra_share=0.3)
    positive, extra_pos, extra_neg = _shares(ds)
    assert abs(positive - 0.5) < 0.07
    assert abs(extra_pos - 0.3) < 0.08 and extra_neg == 0.0


def test_without_extra_the_draw_is_unchanged(sources):
    plain = pipeline.cls_dataset(sources / "main_shards", "train", batch_size=16,
                                 positive_share=0.5, seed=4, deterministic=True)
    again = pipeline.cls_dataset(sources / "main_shards", "train", batch_size=16,
                                 positive_share=0.5, seed=4, deterministic=True, extra_dirs=(),
                                 extra_share=0.0)
    for (a, la), (b, lb) in zip(plain.take(3), again.take(3)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())


def test_bad_extra_sources(sources):
    with pytest.raises(InputError, match="patch size"):
        pipeline.cls_dataset(sources / "main_shards", "train", positive_share=0.5,
                             extra_dirs=[sources / "wide"], extra_share=0.2)
    with pytest.raises(InputError, match="balanced sampling"):
        pipeline.cls_dataset(sources / "main_shards", "train",
                             extra_dirs=[sources / "other_shards"], extra_share=0.2)
    with pytest.raises(InputError, match="extra share"):
        pipeline.cls_dataset(sources / "main_shards", "train", positive_share=0.5,
                             extra_dirs=[sources / "other_shards"], extra_share=0.0)


def test_train_cls_records_the_extra_shards(sources, tmp_path):
    config = preset("tiny").override(**{"train.epochs": 1, "train.steps_per_epoch": 2,
                                        "train.batch_size": 8})
    with pytest.raises(InputError, match="extra_share"):
        train_cls(sources / "main_shards", tmp_path / "r0", config, log=lambda *_: None,
                  extra_data=[sources / "other_shards"])
    config = config.override(**{"train.extra_share": 0.25})
    train_cls(sources / "main_shards", tmp_path / "r1", config, log=lambda *_: None,
              extra_data=[sources / "other_shards"])
    run = json.loads((tmp_path / "r1" / "run.json").read_text())
    identity = run.get("identity", run)
    text = json.dumps(identity)
    assert str((sources / "other_shards").resolve()) in text
    assert "extra_shards" in text
