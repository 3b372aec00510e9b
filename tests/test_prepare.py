"""Shard preparation: round trips, manifest, splits, determinism, safe outputs."""

import json

import numpy as np
import pytest

from focas_keras.datasets import sampling
from focas_keras.datasets.annotations import load_image
from focas_keras.datasets.prepare import PrepareConfig, prepare, split_slides
from focas_keras.datasets.readers import read_dataset
from focas_keras.data import pipeline, records
from focas_keras.errors import InputError

CONFIG = PrepareConfig(tile_size=96, patch_size=32, det_tiles_per_mitosis=3, cls_per_mitosis=4,
                       cls_background_per_image=6, val_slides=("A02",), seed=3)


@pytest.fixture()
def shards(tiny_icpr, tmp_path):
    root, truth = tiny_icpr
    aset = read_dataset("icpr2012", root)
    out = tmp_path / "shards"
    manifest = prepare(aset, out, CONFIG)
    return out, manifest, aset, truth


def test_det_round_trip_pixels_and_boxes_exact(shards):
    out, manifest, aset, truth = shards
    for split in ("train", "val"):
        for rec in pipeline.read_records(out, records.DET, split):
            image_id = rec["image_id"].decode()
            image = load_image(aset.images.set_index("image_id").image_path[image_id])
            x0, y0 = rec["origin"]
            np.testing.assert_array_equal(rec["image"], sampling.crop(image, x0, y0, 96))
            want = sampling.boxes_in_tile(np.asarray(truth[image_id], float).reshape(-1, 4),
                                          x0, y0, 96, CONFIG.min_visible)
            np.testing.assert_array_equal(rec["boxes"], want)


def test_cls_round_trip_and_labels(shards):
    out, manifest, aset, truth = shards
    recs = pipeline.read_records(out, records.CLS, "train")
    paths = aset.images.set_index("image_id").image_path
    for rec in recs:
        image = load_image(paths[rec["image_id"].decode()])
        cx, cy = rec["center"]
        np.testing.assert_array_equal(rec["image"], sampling.crop(image, cx - 16, cy - 16, 32))
        boxes = np.asarray(truth[rec["image_id"].decode()], float).reshape(-1, 4)
        inside = ((boxes[:, 0] <= cx) & (cx < boxes[:, 2]) & (boxes[:, 1] <= cy)
                  & (cy < boxes[:, 3])).any()
        # Positives are centred on a pixel of their mitosis; background keeps its distance.
        assert inside == bool(rec["label"])
        assert rec["source"].decode() == ("mitosis" if rec["label"] else "background")


def test_manifest_counts_equal_records(shards):
    out, manifest, _, truth = shards
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["splits"] == manifest["splits"]
    for split in ("train", "val"):
        det = pipeline.read_records(out, records.DET, split)
        cls = pipeline.read_records(out, records.CLS, split)
        counts = manifest["splits"][split]
        assert counts["det"]["records"] == len(det)
        assert counts["det"]["boxes"] == sum(len(r["boxes"]) for r in det)
        assert counts["det"]["empty_tiles"] == sum(len(r["boxes"]) == 0 for r in det)
        assert counts["cls"]["records"] == len(cls)
        assert counts["cls"]["positive"] == sum(r["label"] for r in cls)
        n_mitoses = sum(len(truth[i]) for i in counts["images"])
        assert counts["cls"]["mitosis"] == CONFIG.cls_per_mitosis * n_mitoses
        assert counts["det"]["tiles_with_mitoses"] >= CONFIG.det_tiles_per_mitosis * n_mitoses
    entries = manifest["shards"]
    assert sum(e["records"] for e in entries) == sum(
        c[k]["records"] for c in manifest["splits"].values() for k in ("det", "cls"))
    assert manifest["parameters"]["seed"] == 3 and manifest["parameters"]["tile_size"] == 96
    assert manifest["package"]["name"] == "focas_keras"


def test_split_by_slide_is_disjoint(shards):
    out, manifest, _, _ = shards
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert val["slides"] == ["A02"] and train["slides"] == ["A00", "A01"]
    assert not set(train["images"]) & set(val["images"])
    for split, slides in (("train", {"A00", "A01"}), ("val", {"A02"})):
        for kind in records.KINDS:
            got = {r["slide_id"].decode() for r in pipeline.read_records(out, kind, split)}
            assert got <= slides


def test_fraction_split_deterministic_and_whole_slides():
    slides = [f"S{i:02d}" for i in range(10)]
    a = split_slides(slides, PrepareConfig(val_fraction=0.3, seed=1))
    b = split_slides(slides, PrepareConfig(val_fraction=0.3, seed=1))
    c = split_slides(slides, PrepareConfig(val_fraction=0.3, seed=2))
    assert a == b and len(a["val"]) == 3 and a != c
    assert sorted(a["train"] + a["val"]) == slides
    one = split_slides(["S00"], PrepareConfig(val_fraction=0.3))
    assert one == {"train": ["S00"], "val": []}
    with pytest.raises(InputError, match="unknown validation slide"):
        split_slides(slides, PrepareConfig(val_slides=("Z9",)))


def test_same_seed_same_shards(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    aset = read_dataset("icpr2012", root)
    a = prepare(aset, tmp_path / "a", CONFIG)
    b = prepare(aset, tmp_path / "b", CONFIG)
    c = prepare(aset, tmp_path / "c", PrepareConfig(**{**CONFIG.__dict__, "seed": 4}))
    digests = lambda m: [e["sha256"] for e in m["shards"]]  # noqa: E731
    assert digests(a) == digests(b)
    assert digests(a) != digests(c)


def test_shards_are_bounded_in_size(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    config = PrepareConfig(**{**CONFIG.__dict__, "shard_mb": 0.05})
    manifest = prepare(read_dataset("icpr2012", root), tmp_path / "s", config)
    det_train = pipeline.shard_entries(manifest, records.DET, "train")
    assert len(det_train) > 1
    assert all(e["bytes"] <= 0.05 * (1 << 20) for e in det_train)


def test_existing_output_refused_and_overwrite(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    aset = read_dataset("icpr2012", root)
    out = tmp_path / "s"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="exists and is not empty"):
        prepare(aset, out, CONFIG)
    assert (out / "keep.txt").read_text() == "user data"
    prepare(aset, out, CONFIG, overwrite=True)
    assert (out / "manifest.json").is_file() and not (out / "keep.txt").exists()


def test_interrupted_run_leaves_nothing(tiny_icpr, tmp_path, monkeypatch):
    root, _ = tiny_icpr
    aset = read_dataset("icpr2012", root)
    calls = {"n": 0}
    real = records.cls_example

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(records, "cls_example", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(aset, tmp_path / "s", CONFIG)
    assert list(tmp_path.iterdir()) == [tmp_path / "tiny"]


def test_rescaling_to_target_mpp(tiny_icpr, tmp_path):
    root, truth = tiny_icpr
    aset = read_dataset("icpr2012", root, mpp=0.25)
    config = PrepareConfig(**{**CONFIG.__dict__, "target_mpp": 0.5, "val_slides": ()})
    out = tmp_path / "half"
    prepare(aset, out, config)
    recs = [r for r in pipeline.read_records(out, records.DET, "train")
            if r["image_id"].decode() == "A00_00"]
    want = np.asarray(truth["A00_00"], float) / 2  # boxes halve with the image
    for rec in recs:
        for box in rec["boxes"]:
            shifted = box + np.tile(rec["origin"], 2)
            # a tile-clipped box lies inside its full box
            assert any(np.all(shifted[:2] >= w[:2] - 1e-4) and np.all(shifted[2:] <= w[2:] + 1e-4)
                       for w in want)
    assert max(r["origin"].max() for r in recs) < 160  # the 320 px image became 160 px
    # Runs trained on these shards record their pixel size, so detect can match it.
    manifest = pipeline.load_manifest(out)
    assert pipeline.data_mpp_identity(manifest) == {"data_mpp": 0.5}
    assert pipeline.data_mpp_identity({"parameters": {"target_mpp": None}}) == {}


def test_invalid_config_is_refused(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    aset = read_dataset("icpr2012", root)
    with pytest.raises(InputError, match="empty share"):
        prepare(aset, tmp_path / "x", PrepareConfig(det_empty_share=1.0))
