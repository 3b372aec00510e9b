"""Hard-negative mining: exactly the false positives, training images only, safe re-runs."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import shutil  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import write_tiny_icpr  # noqa: E402

from focas_keras.datasets import sampling  # noqa: E402
from focas_keras.datasets.annotations import ICPR2012_MPP, load_image  # noqa: E402
from focas_keras.training.mine import find_false_positives, mine_hard_negatives  # noqa: E402
from focas_keras.datasets.prepare import PrepareConfig, prepare  # noqa: E402
from focas_keras.datasets.readers import read_dataset  # noqa: E402
from focas_keras.data import pipeline, records  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.io import sha256_file  # noqa: E402

BACKGROUND = [(290, 30), (150, 300)]


def _box(cx, cy):
    return (cx - 10, cy - 10, cx + 10, cy + 10)


def _planned(boxes):
    """(centres, is_fp) of the fake detections of an image with these truth boxes.

    A mitosis of box (x1, y1) has its centroid at (x1 + 11.5, y1 + 9.5).
    """
    plan = [((x1 + 12, y1 + 10), False) for x1, y1, _, _ in boxes]  # on each mitosis
    if boxes:
        x1, y1 = boxes[0][:2]
        plan.append(((x1 + 12 + 15, y1 + 10), False))  # 15.5 px away: still a TP
        plan.append(((x1 + 12, y1 + 10 + 30), True))  # 30.5 px away: FP
    return plan + [(c, True) for c in BACKGROUND]


class FakeDetector:
    """Identifies each image by its pixels, records it, returns the planned detections."""

    def __init__(self, root, truth, fail_at=None):
        aset = read_dataset("icpr2012", root)
        self.ids = {load_image(p).tobytes(): i for i, p in zip(aset.images.image_id,
                                                               aset.images.image_path)}
        self.truth, self.fail_at, self.seen = truth, fail_at, []

    def __call__(self, image):
        image_id = self.ids[image.tobytes()]
        self.seen.append(image_id)
        if self.fail_at is not None and len(self.seen) == self.fail_at:
            raise RuntimeError("detector broke")
        plan = _planned(self.truth[image_id])
        boxes = np.array([_box(*c) for c, _ in plan], np.float32)
        return boxes, np.linspace(0.9, 0.5, len(plan)).astype(np.float32)


@pytest.fixture()
def prepared(tmp_path):
    root = tmp_path / "tiny"
    truth = write_tiny_icpr(root)
    out = tmp_path / "shards"
    prepare(read_dataset("icpr2012", root), out,
            PrepareConfig(tile_size=96, patch_size=32, val_slides=("A02",)))
    return root, truth, out


def _mine(root, truth, out, **kw):
    detector = kw.pop("detector", None) or FakeDetector(root, truth)
    return mine_hard_negatives(None, root, "icpr2012", out, detector=detector, **kw), detector


def _by_image(recs, source):
    got = {}
    for r in recs:
        if r["source"].decode() == source:
            got.setdefault(r["image_id"].decode(), []).append(tuple(int(v) for v in r["center"]))
    return {k: sorted(v) for k, v in got.items()}


def _expected(truth, ids, fp):
    return {i: sorted(c for c, is_fp in _planned(truth[i]) if is_fp == fp) for i in ids}


def _snapshot(out):
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in out.rglob("*") if p.is_file()}


def test_find_false_positives_is_not_one_to_one():
    boxes = np.array([_box(50, 50), _box(52, 50), _box(70, 50), _box(50, 71), _box(200, 200)])
    fp, tp = find_false_positives(boxes, np.ones(5), np.array([[50.0, 50.0]]), radius=20.0)
    np.testing.assert_array_equal(tp, [True, True, True, False, False])  # 20 px: inclusive
    np.testing.assert_array_equal(fp, ~tp)
    fp, tp = find_false_positives(boxes, np.ones(5), np.zeros((0, 2)))
    assert fp.all() and not tp.any()
    fp, tp = find_false_positives(np.zeros((0, 4)), np.zeros(0), np.array([[1.0, 1.0]]))
    assert fp.shape == tp.shape == (0,)


def test_mines_exactly_the_false_positives_of_training_images(prepared):
    root, truth, out = prepared
    manifest = pipeline.load_manifest(out)
    train_ids = manifest["splits"]["train"]["images"]
    val_ids = manifest["splits"]["val"]["images"]
    assert val_ids and all(i.startswith("A02") for i in val_ids)
    mining, detector = _mine(root, truth, out)

    assert sorted(detector.seen) == sorted(train_ids)  # each training image once, no val image
    assert not any(i.startswith("A02") for i in detector.seen)
    recs = pipeline.read_records(out, records.CLS, "train")
    assert _by_image(recs, "mined") == _expected(truth, train_ids, fp=True)
    assert not _by_image(recs, "mined_tp")
    paths = read_dataset("icpr2012", root).images.set_index("image_id").image_path
    for r in recs:
        if r["source"].decode() == "mined":
            assert r["label"] == 0 and r["image_id"].decode() not in val_ids
            cx, cy = r["center"]
            image = load_image(paths[r["image_id"].decode()])
            np.testing.assert_array_equal(r["image"], sampling.crop(image, cx - 16, cy - 16, 32))
    val = pipeline.read_records(out, records.CLS, "val")
    assert not any(r["source"].decode().startswith("mined") for r in val)
    n_fp = sum(len(v) for v in _expected(truth, train_ids, fp=True).values())
    n_tp = sum(len(v) for v in _expected(truth, train_ids, fp=False).values())
    assert (mining["false_positives"], mining["true_positives"]) == (n_fp, n_tp)
    assert mining["detections"] == n_fp + n_tp and mining["images"] == len(train_ids)
    assert mining["generation"] == 1 and mining["det_run"] is None
    saved = pipeline.load_manifest(out)
    assert saved["mining"] == mining
    mined_entries = [e for e in saved["shards"] if e.get("source") == "mined"]
    assert mined_entries and all(e["split"] == "train" and e["kind"] == "cls"
                                 for e in mined_entries)


def test_keep_true_positives_writes_them_as_positives(prepared):
    root, truth, out = prepared
    train_ids = pipeline.load_manifest(out)["splits"]["train"]["images"]
    _mine(root, truth, out, keep_true_positives=True)
    recs = pipeline.read_records(out, records.CLS, "train")
    want_tp = {k: v for k, v in _expected(truth, train_ids, fp=False).items() if v}
    assert _by_image(recs, "mined_tp") == want_tp
    assert _by_image(recs, "mined") == _expected(truth, train_ids, fp=True)
    assert all(r["label"] == 1 for r in recs if r["source"].decode() == "mined_tp")
    counts = pipeline.load_manifest(out)["splits"]["train"]["cls"]
    assert counts["mined_tp"] == sum(len(v) for v in want_tp.values())
    assert counts["positive"] == sum(int(r["label"]) for r in recs)


def test_max_per_image_keeps_the_best_scores(prepared):
    root, truth, out = prepared
    mining, _ = _mine(root, truth, out, max_per_image=1)
    # The best detection sits on a mitosis (TP) where there is one, else on background (FP).
    train_ids = pipeline.load_manifest(out)["splits"]["train"]["images"]
    assert mining["detections"] == len(train_ids)
    assert mining["false_positives"] == sum(not truth[i] for i in train_ids)


def test_rerun_does_not_duplicate(prepared):
    root, truth, out = prepared
    _mine(root, truth, out, keep_true_positives=True)
    once = pipeline.load_manifest(out)
    first_files = {e["path"] for e in once["shards"] if e.get("source") == "mined"}
    mining, _ = _mine(root, truth, out, keep_true_positives=True)
    twice = pipeline.load_manifest(out)
    assert mining["generation"] == 2
    assert twice["splits"] == once["splits"]
    assert sum(e["records"] for e in twice["shards"]) == sum(e["records"]
                                                             for e in once["shards"])
    second_files = {e["path"] for e in twice["shards"] if e.get("source") == "mined"}
    assert second_files and not first_files & second_files
    assert not any((out / p).exists() for p in first_files)
    assert sorted(p.name for p in (out / "cls").glob("train-mined-*")) == sorted(
        p.split("/")[-1] for p in second_files)
    assert not list(out.glob(".mine-tmp-*"))
    pipeline.verify_shards(out, twice["shards"])
    recs = pipeline.read_records(out, records.CLS, "train")
    counts = twice["splits"]["train"]["cls"]
    assert counts["records"] == len(recs)
    assert counts["positive"] == sum(int(r["label"]) for r in recs)
    assert counts["negative"] == sum(1 - int(r["label"]) for r in recs)
    for source in ("mined", "mined_tp", "mitosis", "background"):
        assert counts[source] == sum(r["source"].decode() == source for r in recs)
    # A third run without TPs takes their counts back out.
    _mine(root, truth, out)
    counts = pipeline.load_manifest(out)["splits"]["train"]["cls"]
    assert counts["mined_tp"] == 0
    assert counts["records"] == len(pipeline.read_records(out, records.CLS, "train"))


def test_failure_midway_leaves_previous_output_valid(prepared):
    root, truth, out = prepared
    _mine(root, truth, out)
    manifest_text = (out / records.MANIFEST).read_text()
    before = _snapshot(out)
    broken = FakeDetector(root, truth, fail_at=2)
    with pytest.raises(RuntimeError, match="detector broke"):
        _mine(root, truth, out, detector=broken)
    assert len(broken.seen) == 2
    assert (out / records.MANIFEST).read_text() == manifest_text
    assert _snapshot(out) == before  # no new, partial or deleted file
    manifest = json.loads(manifest_text)
    pipeline.verify_shards(out, manifest["shards"])
    assert manifest["splits"]["train"]["cls"]["records"] == len(
        pipeline.read_records(out, records.CLS, "train"))


def test_missing_training_image_is_an_input_error(prepared, tmp_path):
    root, truth, out = prepared
    partial = tmp_path / "partial"
    shutil.copytree(root, partial)
    for suffix in (".png", ".csv"):
        (partial / f"A01_00{suffix}").unlink()
    with pytest.raises(InputError, match="A01_00") as err:
        mine_hard_negatives(None, partial, "icpr2012", out, detector=FakeDetector(root, truth))
    assert str(partial) in str(err.value)


def test_no_training_images_is_an_input_error(prepared):
    root, truth, out = prepared
    manifest = pipeline.load_manifest(out)
    manifest["splits"]["train"]["images"] = []
    (out / records.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="no training images"):
        _mine(root, truth, out)


def test_corrupt_shard_is_refused_before_mining(prepared):
    root, truth, out = prepared
    shard = out / pipeline.load_manifest(out)["shards"][0]["path"]
    shard.write_bytes(shard.read_bytes()[:-5] + b"xxxxx")
    detector = FakeDetector(root, truth)
    with pytest.raises(InputError, match="checksum"):
        _mine(root, truth, out, detector=detector)
    assert not detector.seen


def test_images_are_rescaled_like_prepare(tmp_path):
    root = tmp_path / "tiny"
    write_tiny_icpr(root, slides=("A00", "A01"), per_slide=2)
    out = tmp_path / "shards"
    prepare(read_dataset("icpr2012", root), out, PrepareConfig(
        tile_size=64, patch_size=32, val_slides=("A01",), target_mpp=2 * ICPR2012_MPP))
    shapes = []

    def detector(image):
        shapes.append(image.shape)
        # (x1 + 11.5, y1 + 9.5) / 2 for the first mitosis of A00_00 at (40, 60): ~(25.75, 34.75)
        return np.array([_box(26, 35), _box(120, 120)], np.float32), np.array([0.9, 0.8])

    mining = mine_hard_negatives(None, root, "icpr2012", out, detector=detector,
                                 keep_true_positives=True, radius=5.0)
    assert shapes == [(160, 160, 3), (160, 160, 3)]
    recs = pipeline.read_records(out, records.CLS, "train")
    assert _by_image(recs, "mined_tp") == {"A00_00": [(26, 35)]}
    assert _by_image(recs, "mined") == {"A00_00": [(120, 120)], "A00_01": [(26, 35), (120, 120)]}
    assert mining["true_positives"] == 1


def test_detector_at_another_pixel_size_maps_boxes_back(tmp_path):
    """Patches at full resolution, a detector trained at half: it sees the half-size image and
    its boxes are mapped back to full-resolution patch centres."""
    root = tmp_path / "tiny"
    write_tiny_icpr(root, slides=("A00", "A01"), per_slide=2)
    out = tmp_path / "shards"
    prepare(read_dataset("icpr2012", root), out, PrepareConfig(
        tile_size=64, patch_size=32, val_slides=("A01",)))
    shapes = []

    def detector(image):
        shapes.append(image.shape)
        # The first mitosis of A00_00, centroid (51.5, 69.5), is at ~(25.75, 34.75) here.
        return np.array([_box(26, 35), _box(120, 120)], np.float32), np.array([0.9, 0.8])

    mining = mine_hard_negatives(None, root, "icpr2012", out, detector=detector,
                                 keep_true_positives=True, radius=5.0,
                                 det_mpp=2 * ICPR2012_MPP)
    assert shapes == [(160, 160, 3), (160, 160, 3)]
    assert mining["det_mpp"] == 2 * ICPR2012_MPP
    recs = pipeline.read_records(out, records.CLS, "train")
    assert _by_image(recs, "mined_tp") == {"A00_00": [(52, 70)]}
    assert _by_image(recs, "mined") == {"A00_00": [(240, 240)],
                                        "A00_01": [(52, 70), (240, 240)]}


def test_missing_detector_run_is_an_input_error(prepared, tmp_path):
    root, _, out = prepared
    with pytest.raises(InputError, match="config.json"):
        mine_hard_negatives(tmp_path / "no-run", root, "icpr2012", out)


def _tiny_det_run(directory, seed):
    """An untrained tiny train-det run (model.keras, config.json); returns (dir, config)."""
    import keras

    from focas_keras.models.mdet import build_mdet
    from focas_keras.models.mdet_config import preset

    config = preset("tiny")
    directory.mkdir()
    keras.utils.set_random_seed(seed)
    build_mdet(config).save(directory / "model.keras")
    (directory / "config.json").write_text(json.dumps(config.to_dict()))
    return directory, config


def test_real_detector_run(prepared, tmp_path):
    root, _, out = prepared
    run, config = _tiny_det_run(tmp_path / "run", seed=0)
    mining = mine_hard_negatives(run, root, "icpr2012", out, max_per_image=5)
    assert mining["det_run"] == str(run.resolve())
    assert mining["score_threshold"] == pytest.approx(config.inference.score_threshold)
    assert mining["detections"] <= 5 * mining["images"]
    manifest = pipeline.load_manifest(out)
    recs = pipeline.read_records(out, records.CLS, "train")
    assert manifest["splits"]["train"]["cls"]["records"] == len(recs)
    assert sum(r["source"].decode() == "mined" for r in recs) == mining["false_positives"]


def test_loaded_run_mines_what_the_engine_detects(prepared, tmp_path):
    """Mining through the engine: the mined centres of a training image are exactly stage 1
    of the cascade that ``detect`` builds from the same run (load_stage1), and its scores."""
    from focas_keras.inference import load_stage1

    root, _, out = prepared
    run, _ = _tiny_det_run(tmp_path / "run", seed=1)
    # An untrained tiny Mdet scores every anchor near its prior: a low threshold keeps some.
    mining = mine_hard_negatives(run, root, "icpr2012", out, keep_true_positives=True,
                                 score_threshold=0.001)
    recs = pipeline.read_records(out, records.CLS, "train")
    mined = [r for r in recs if r["source"].decode() in ("mined", "mined_tp")]
    assert mining["detections"] == len(mined) > 0
    stage1 = load_stage1(run, det_threshold=0.001)
    aset = read_dataset("icpr2012", root)
    images = aset.images.set_index("image_id")
    for image_id in sorted({r["image_id"].decode() for r in mined}):
        image = load_image(images.loc[image_id].image_path)
        boxes, scores = stage1.stage1(image)
        centres = np.round((boxes[:, :2] + boxes[:, 2:]) / 2.0).astype(int)
        got = sorted((tuple(int(v) for v in r["center"]), round(float(r["score"]), 5))
                     for r in mined if r["image_id"].decode() == image_id)
        want = sorted(((int(x), int(y)), round(float(s), 5))
                      for (x, y), s in zip(centres, scores))
        assert got == want
    with pytest.raises(ValueError, match="stage 1 only"):
        stage1.classify_patches(np.zeros((1, 32, 32, 3), np.uint8))
