"""tf.data pipelines over prepared shards."""

import numpy as np
import pytest

from focas_keras.datasets.prepare import PrepareConfig, prepare
from focas_keras.datasets.readers import read_dataset
from focas_keras.data import pipeline, records
from focas_keras.data.augment import AugmentConfig
from focas_keras.errors import InputError

CONFIG = PrepareConfig(tile_size=96, patch_size=32, det_tiles_per_mitosis=3, cls_per_mitosis=4,
                       cls_background_per_image=6, val_slides=("A02",), seed=3, shard_mb=0.1)
GEOMETRY_ONLY = AugmentConfig(flip=True, rot90=True, translate_px=6, brightness=0, contrast=0,
                              saturation=0, hue=0, stain_sigma=0, noise_std=0, blur_prob=0)


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    from conftest import write_tiny_icpr

    root = tmp_path_factory.mktemp("data")
    write_tiny_icpr(root / "tiny")
    out = root / "shards"
    prepare(read_dataset("icpr2012", root / "tiny"), out, CONFIG)
    return out


def test_det_batches_hold_every_record_unaugmented(shard_dir):
    manifest = pipeline.load_manifest(shard_dir)
    ds = pipeline.det_dataset(shard_dir, "train", batch_size=5, shuffle=False, max_boxes=4)
    images, boxes, masks = [], [], []
    for batch_images, targets in ds:
        assert batch_images.dtype.name == "float32" and batch_images.shape[1:] == (96, 96, 3)
        assert targets["boxes"].shape[1:] == (4, 4) and targets["box_mask"].dtype.name == "bool"
        images.append(batch_images.numpy())
        boxes.append(targets["boxes"].numpy())
        masks.append(targets["box_mask"].numpy())
    images, boxes, masks = map(np.concatenate, (images, boxes, masks))
    counts = manifest["splits"]["train"]["det"]
    assert len(images) == counts["records"] and masks.sum() == counts["boxes"]
    recs = pipeline.read_records(shard_dir, records.DET, "train")
    np.testing.assert_allclose(images, np.stack([r["image"] for r in recs]) / 255.0, atol=1e-7)
    for rec, b, m in zip(recs, boxes, masks):
        np.testing.assert_array_equal(b[m], rec["boxes"])
        assert not b[~m].any()


def test_augmented_boxes_stay_on_the_object(shard_dir):
    ds = pipeline.det_dataset(shard_dir, "train", batch_size=16, augment=GEOMETRY_ONLY, seed=5)
    checked = 0
    for images, targets in ds:
        for image, tile_boxes, mask in zip(images.numpy(), targets["boxes"].numpy(),
                                           targets["box_mask"].numpy()):
            dark = image.mean(axis=-1) < 0.4  # the tiny dataset's mitoses are dark squares
            for x1, y1, x2, y2 in tile_boxes[mask]:
                inside = dark[int(y1):int(y2), int(x1):int(x2)]
                assert inside.size and inside.mean() > 0.95
                checked += 1
    assert checked >= 12  # every train box (2 mitoses x 3 tiles x 2 slides) checked


def test_same_seed_same_batches(shard_dir):
    def first(seed):
        ds = pipeline.det_dataset(shard_dir, "train", batch_size=8, augment=AugmentConfig(),
                                  seed=seed, deterministic=True)
        images, targets = next(iter(ds))
        return images.numpy(), targets["boxes"].numpy()

    a, b, c = first(1), first(1), first(2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_cls_positive_share(shard_dir):
    ds = pipeline.cls_dataset(shard_dir, "train", batch_size=50, positive_share=0.3, seed=0)
    labels = np.concatenate([y.numpy() for _, y in ds.take(20)])
    assert abs(labels.mean() - 0.3) < 0.05
    images, _ = next(iter(ds))
    assert images.shape == (50, 32, 32, 3)


def test_cls_unbalanced_reads_every_record(shard_dir):
    manifest = pipeline.load_manifest(shard_dir)
    ds = pipeline.cls_dataset(shard_dir, "val", batch_size=7, augment=AugmentConfig(), seed=0)
    labels = np.concatenate([y.numpy() for _, y in ds])
    assert labels.sum() == manifest["splits"]["val"]["cls"]["positive"]
    assert len(labels) == manifest["splits"]["val"]["cls"]["records"]


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_corrupt_shard_is_named(shard_dir, tmp_path):
    bad = _copy(shard_dir, tmp_path / "bad")
    shard = sorted((bad / "det").glob("train-*.tfrecord"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"train-00000\.tfrecord: shard fails its sha256"):
        pipeline.det_dataset(bad, "train")
    with pytest.raises(InputError, match="corrupt shard"):
        pipeline.read_records(bad, records.DET, "train", verify=False)


def test_truncated_and_missing_shards(shard_dir, tmp_path):
    bad = _copy(shard_dir, tmp_path / "bad")
    shard = sorted((bad / "cls").glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(InputError, match="truncated or replaced"):
        pipeline.cls_dataset(bad, "train")
    shard.unlink()
    with pytest.raises(InputError, match="missing"):
        pipeline.cls_dataset(bad, "train")


def test_missing_manifest_and_empty_split(tmp_path, shard_dir):
    with pytest.raises(InputError, match="no manifest.json"):
        pipeline.det_dataset(tmp_path)
    with pytest.raises(InputError, match="not found"):
        pipeline.det_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="no det records for split 'test'"):
        pipeline.det_dataset(shard_dir, "test")
    bad = _copy(shard_dir, tmp_path / "bad")
    (bad / "manifest.json").write_text("{\n  oops")
    with pytest.raises(InputError, match=r"manifest.json:2: invalid JSON"):
        pipeline.load_manifest(bad)
