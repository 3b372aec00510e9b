"""The cascade on whole images: tiling, crops at borders, rescaling, thresholds, run loading."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from focas_keras.errors import InputError  # noqa: E402
from focas_keras.inference import cascade as cascade_module  # noqa: E402
from focas_keras.inference.cascade import (  # noqa: E402
    RESULT_COLUMNS, Cascade, CascadeSettings, crop_patches, list_inputs, run_cls_threshold,
    tile_starts)
from focas_keras.models.mclass import build_mclass  # noqa: E402
from focas_keras.models.mclass_config import preset as mclass_preset  # noqa: E402
from focas_keras.models.mdet import build_mdet  # noqa: E402
from focas_keras.models.mdet_config import preset as mdet_preset  # noqa: E402


class FakeCascade(Cascade):
    """Stage 1 finds dark connected components per tile (purely local); stage 2 scores the
    darkness of the crop's centre pixel."""

    def __init__(self, settings, cls_threshold_default=0.5):
        super().__init__(None, mdet_preset("tiny"), None, mclass_preset("tiny"), settings,
                         cls_threshold_default)
        self.batches, self.patches = [], []

    def _detect_tiles(self, batch):
        self.batches.append(batch.shape)
        found = []
        for tile in batch:
            shade = tile.mean(-1)
            dark = ((shade < 0.5) & (shade > 0)).astype(np.uint8)  # 0: zero padding
            n, labels, stats, _ = cv2.connectedComponentsWithStats(dark, connectivity=4)
            boxes = [[x, y, x + w, y + h] for x, y, w, h, _ in stats[1:]]
            scores = [1.0 - float(tile[labels == k].mean()) for k in range(1, n)]
            found.append((np.array(boxes, np.float32).reshape(-1, 4),
                          np.array(scores, np.float32)))
        return found

    def _classify(self, patches):
        self.patches.append(patches)
        c = patches.shape[1] // 2
        return 1.0 - patches[:, c, c].mean(-1) / 255.0


def _squares_image(height=320, width=320, seed=3, count=26):
    """Light image with non-touching dark squares of distinct shades, some crossing tile edges
    and the image border; returns (image, clipped truth boxes)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 215, np.uint8)
    image += rng.integers(0, 20, image.shape, dtype=np.uint8)
    taken = np.zeros((height + 80, width + 80), bool)  # offset 40, for squares past the border
    fixed = [(150, 20, 24), (100, 100, 30), (215, 150, 20), (280, 280, 36), (-8, 60, 20),
             (300, 5, 30), (60, 170, 40), (120, 300, 30)] if (height, width) == (320, 320) else []
    squares = []
    while len(squares) < count:
        if fixed:
            x, y, s = fixed.pop(0)
        else:
            s = int(rng.integers(6, 40))
            x, y = int(rng.integers(-10, width)), int(rng.integers(-10, height))
        if min(x, y) + s < 3 or taken[y + 37:y + 43 + s, x + 37:x + 43 + s].any():
            continue
        taken[y + 40:y + 40 + s, x + 40:x + 40 + s] = True
        squares.append((x, y, s))
    truth = []
    for k, (x, y, s) in enumerate(squares):
        x1, y1, x2, y2 = max(x, 0), max(y, 0), min(x + s, width), min(y + s, height)
        image[y1:y2, x1:x2] = 10 + 4 * k
        truth.append([x1, y1, x2, y2])
    return image, np.array(truth, np.float32)


def _sorted(boxes):
    boxes = np.asarray(boxes)
    return boxes[np.lexsort((boxes[:, 1], boxes[:, 0]))]


def test_tile_starts_cover_with_overlap():
    assert tile_starts(320, 160, 96) == [0, 64, 128, 160]
    assert tile_starts(160, 160, 64) == [0] and tile_starts(100, 160, 64) == [0]
    starts = tile_starts(2084, 512, 64)
    assert starts[0] == 0 and starts[-1] == 2084 - 512
    assert all(a + 512 - b >= 64 for a, b in zip(starts, starts[1:]))


def test_tiled_equals_whole_image():
    image, truth = _squares_image()
    whole = FakeCascade(CascadeSettings(det_threshold=0.0))
    tiled = FakeCascade(CascadeSettings(det_threshold=0.0, tile=160, overlap=96, tile_batch=5))
    boxes_w, scores_w = whole.stage1(image)
    boxes_t, scores_t = tiled.stage1(image)
    assert whole.batches == [(1, 320, 320, 3)]
    assert tiled.batches == [(5, 160, 160, 3)] * 3 + [(1, 160, 160, 3)]
    np.testing.assert_array_equal(_sorted(boxes_w), _sorted(truth))
    np.testing.assert_array_equal(boxes_t, boxes_w)  # same order: by score
    np.testing.assert_allclose(scores_t, scores_w, atol=1e-6)
    assert (np.diff(scores_t) <= 0).all()


def test_tiling_check_catches_tile_edge_copies(monkeypatch):
    """Without the ownership rule, copies cut by tile edges survive NMS: the check above
    would fail (so it tests something)."""
    image, truth = _squares_image()
    monkeypatch.setattr(cascade_module, "_ownership",
                        lambda starts, tile: [(-np.inf, np.inf)] * len(starts))
    boxes, _ = FakeCascade(CascadeSettings(det_threshold=0.0, tile=160, overlap=96)).stage1(image)
    assert len(boxes) > len(truth)


def test_image_smaller_than_tile_is_one_padded_tile():
    image, truth = _squares_image(70, 100, seed=5, count=6)
    tiled = FakeCascade(CascadeSettings(det_threshold=0.0, tile=128, overlap=32))
    boxes, _ = tiled.stage1(image)
    assert tiled.batches == [(1, 128, 128, 3)]
    np.testing.assert_array_equal(_sorted(boxes), _sorted(truth))


def test_crops_are_centred_and_reflect_padded():
    image = np.random.default_rng(0).integers(0, 256, (80, 100, 3), dtype=np.uint8)
    patch = crop_patches(image, [[3, 5]], 112)[0]
    assert patch.shape == (112, 112, 3)
    np.testing.assert_array_equal(patch[56, 56], image[5, 3])
    np.testing.assert_array_equal(patch[56, 52], image[5, 1])  # x = -1 reflects to 1
    np.testing.assert_array_equal(patch[50, 56], image[1, 3])  # y = -1 reflects to 1
    inner = crop_patches(image, [[50, 40], [50.4, 39.6]], 21)
    np.testing.assert_array_equal(inner[0], image[30:51, 40:61])
    np.testing.assert_array_equal(inner[1], inner[0])
    assert crop_patches(image, np.zeros((0, 2)), 16).shape == (0, 16, 16, 3)
    fake = FakeCascade(CascadeSettings(patch=32))
    fake.stage2(image, [[2, 4, 4, 6]])
    np.testing.assert_array_equal(fake.patches[0][0, 16, 16], image[5, 3])


@pytest.mark.parametrize("mpp, model_mpp, shape", [(0.5, 0.25, (1, 160, 200, 3)),
                                                   (0.25, 0.5, (1, 40, 50, 3))])
def test_rescaling_maps_boxes_back(mpp, model_mpp, shape):
    image = np.full((80, 100, 3), 220, np.uint8)
    image[10:20, 20:30] = 40
    image[50:70, 60:80] = 30
    fake = FakeCascade(CascadeSettings(mpp=mpp, model_mpp=model_mpp, det_threshold=0.0,
                                       patch=24))
    boxes, _ = fake.stage1(image)
    assert fake.batches == [shape]
    np.testing.assert_allclose(_sorted(boxes), [[20, 10, 30, 20], [60, 50, 80, 70]])
    table = fake.run(image)
    np.testing.assert_allclose(sorted(table.x), [25, 70])
    patches = fake.patches[-1]
    assert patches.shape == (2, 24, 24, 3)
    assert (patches[:, 12, 12] < 60).all()  # centres in the rescaled image hit the squares


class _StageMppFake(FakeCascade):
    def __init__(self, settings, det_mpp_default=None, cls_mpp_default=None):
        Cascade.__init__(self, None, mdet_preset("tiny"), None, mclass_preset("tiny"), settings,
                         0.5, None, det_mpp_default, cls_mpp_default)
        self.batches, self.patches = [], []


def test_each_stage_runs_at_its_own_pixel_size():
    """Stage 1 at half resolution, stage 2 on the full-resolution image: boxes come back in
    input pixels and the crops are cut from the unscaled image around the right centres."""
    image = np.full((80, 100, 3), 220, np.uint8)
    image[10:20, 20:30] = 40
    image[50:70, 60:80] = 30
    fake = _StageMppFake(CascadeSettings(mpp=0.25, det_threshold=0.0, patch=8, merge_px=0),
                         det_mpp_default=0.5)
    assert (fake.det_mpp, fake.cls_mpp, fake.det_scale, fake.cls_scale) == (0.5, 0.25, 0.5, 1.0)
    table = fake.run(image)
    assert fake.batches == [(1, 40, 50, 3)]          # Mdet saw the half-size image
    np.testing.assert_allclose(table.sort_values("x")[["x1", "y1", "x2", "y2"]],
                               [[20, 10, 30, 20], [60, 50, 80, 70]])
    patches = fake.patches[-1]
    assert patches.shape == (2, 8, 8, 3)
    # Full-resolution crops: the 10 px square (value 40) fills the whole 8 px crop around
    # (25, 15); the 20 px square (value 30) fills its crop too.
    assert sorted(int(v) for v in patches.reshape(2, -1).max(axis=1)) == [30, 40]
    assert sorted(int(v) for v in patches.reshape(2, -1).min(axis=1)) == [30, 40]
    np.testing.assert_allclose(sorted(fake.stage2(image, table[["x1", "y1", "x2", "y2"]]
                                                  .to_numpy())), sorted(table.cls_score))


def test_stage_pixel_size_precedence():
    def fake(det_run=None, cls_run=None, **settings):
        return _StageMppFake(CascadeSettings(mpp=0.25, **settings), det_run, cls_run)

    assert (fake().det_mpp, fake().cls_mpp) == (0.25, 0.25)             # nothing: the input's
    assert (fake(0.5, 0.3).det_mpp, fake(0.5, 0.3).cls_mpp) == (0.5, 0.3)  # the runs'
    both = fake(0.5, 0.3, model_mpp=0.4)                                  # model_mpp beats runs
    assert (both.det_mpp, both.cls_mpp) == (0.4, 0.4)
    own = fake(0.5, 0.3, model_mpp=0.4, det_mpp=1.0, cls_mpp=0.2)         # stage settings win
    assert (own.det_mpp, own.cls_mpp, own.det_scale, own.cls_scale) == (1.0, 0.2, 0.25, 1.25)
    with pytest.raises(InputError, match="det mpp must be > 0"):
        CascadeSettings(det_mpp=0.0)


def test_run_data_mpp_is_read_from_run_json(tmp_path):
    from focas_keras.inference.cascade import run_data_mpp

    assert run_data_mpp(tmp_path) is None                     # no run.json
    (tmp_path / "run.json").write_text(json.dumps({"kind": "mdet"}))
    assert run_data_mpp(tmp_path) is None                     # shards kept the images' size
    (tmp_path / "run.json").write_text(json.dumps({"kind": "mdet", "data_mpp": 0.4912}))
    assert run_data_mpp(tmp_path) == 0.4912
    (tmp_path / "run.json").write_text(json.dumps({"kind": "mdet", "data_mpp": "x"}))
    with pytest.raises(InputError, match="data_mpp must be a positive number"):
        run_data_mpp(tmp_path)


def test_run_table_and_acceptance_threshold():
    image, _ = _squares_image()
    fake = FakeCascade(CascadeSettings(det_threshold=0.0))
    boxes, _ = fake.stage1(image)
    scores = fake.stage2(image, boxes)
    threshold = float(np.sort(scores)[len(scores) // 2])
    table = FakeCascade(CascadeSettings(det_threshold=0.0, cls_threshold=threshold)).run(image)
    assert list(table.columns) == RESULT_COLUMNS
    assert table.accepted.dtype == bool
    assert (np.diff(table.det_score) <= 0).all()
    np.testing.assert_array_equal(table.accepted, table.cls_score >= threshold)
    assert 0 < table.accepted.sum() < len(table)
    at_threshold = table.cls_score == threshold
    assert at_threshold.any() and table.accepted[at_threshold].all()
    np.testing.assert_allclose(table.x, (table.x1 + table.x2) / 2)
    assert FakeCascade(CascadeSettings(), cls_threshold_default=0.37).cls_threshold == 0.37
    empty = FakeCascade(CascadeSettings()).run(np.full((50, 50, 3), 230, np.uint8))
    assert list(empty.columns) == RESULT_COLUMNS and len(empty) == 0


def test_cls_threshold_from_run_files(tmp_path):
    assert run_cls_threshold(tmp_path) == 0.5
    (tmp_path / "best.json").write_text(json.dumps(
        {"score": 0.8, "metrics": {"val_best_threshold": 0.37}}))
    assert run_cls_threshold(tmp_path) == 0.37
    (tmp_path / "metrics.json").write_text(json.dumps({"last": {"val_best_threshold": 0.41}}))
    assert run_cls_threshold(tmp_path, "model") == 0.41
    assert run_cls_threshold(tmp_path, "best") == 0.37
    (tmp_path / "best.json").write_text("{")
    with pytest.raises(InputError, match="invalid JSON"):
        run_cls_threshold(tmp_path)


@pytest.mark.parametrize("kwargs", [dict(tile=100), dict(tile=64, overlap=64), dict(mpp=0),
                                    dict(det_threshold=1.5), dict(nms_iou=0.0), dict(patch=0)])
def test_settings_are_validated(kwargs):
    with pytest.raises(InputError):
        CascadeSettings(**kwargs)


def test_list_inputs(tmp_path):
    (tmp_path / "d").mkdir()
    for name in ("b.png", "a.PNG", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"x")
    (tmp_path / "c.jpg").write_bytes(b"x")
    files = list_inputs([tmp_path / "d", tmp_path / "c.jpg"])
    assert [p.name for p in files] == ["a.PNG", "b.png", "c.jpg"]
    with pytest.raises(InputError, match="not found"):
        list_inputs([tmp_path / "missing.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        list_inputs([tmp_path / "empty"])
    with pytest.raises(InputError, match="not an image"):
        list_inputs([tmp_path / "d" / "notes.txt"])
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "b.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="duplicate image name 'b'"):
        list_inputs([tmp_path / "d", tmp_path / "e"])


def test_real_tiny_models_from_runs(tmp_path):
    """Real (random-weight) tiny Mdet + Mclass saved as runs, loaded, run whole and tiled."""
    det_run, cls_run = tmp_path / "det", tmp_path / "cls"
    det_run.mkdir()
    cls_run.mkdir()
    det_config, cls_config = mdet_preset("tiny"), mclass_preset("tiny")
    (det_run / "config.json").write_text(det_config.to_json())
    build_mdet(det_config).save(det_run / "model.keras")
    with pytest.raises(InputError, match="config.json"):
        Cascade.from_runs(det_run, cls_run)
    (cls_run / "config.json").write_text(cls_config.to_json())
    with pytest.raises(InputError, match="model.keras"):
        Cascade.from_runs(det_run, cls_run)
    build_mclass(cls_config).save(cls_run / "best.keras")
    (cls_run / "best.json").write_text(json.dumps(
        {"score": 0.9, "metrics": {"val_best_threshold": 0.7}}))
    with pytest.raises(InputError, match="not found"):
        Cascade.from_runs(tmp_path / "nope", cls_run)

    image = np.random.default_rng(1).integers(0, 256, (200, 150, 3), dtype=np.uint8)
    assert Cascade.from_runs(det_run, cls_run).det_threshold == 0.05   # no best.json: config's
    (det_run / "metrics.json").write_text(json.dumps({"last": {"val_recall_threshold": 0.31}}))
    assert Cascade.from_runs(det_run, cls_run).det_threshold == 0.31
    (det_run / "metrics.json").write_text(json.dumps({"last": {"val_recall_threshold": 0.01}}))
    assert Cascade.from_runs(det_run, cls_run).det_threshold == 0.05   # floored at config's
    cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings(det_threshold=0.0, merge_px=0))
    assert cascade.cls_threshold == 0.7 and cascade.det_threshold == 0.0
    assert cascade.patch == 112 and cascade.nms_iou == det_config.inference.nms_iou
    whole = cascade.run(image)
    assert len(whole) > 0 and list(whole.columns) == RESULT_COLUMNS
    assert len(whole) <= det_config.inference.max_detections
    tiled_cascade = Cascade(cascade.det_model, det_config, cascade.cls_model, cls_config,
                            CascadeSettings(det_threshold=0.0, tile=96, overlap=32, cls_batch=64,
                                            merge_px=0),
                            cls_threshold_default=0.3)
    tiled = tiled_cascade.run(image)
    for table, threshold in ((whole, 0.7), (tiled, 0.3)):
        assert ((table.x1 >= 0) & (table.x2 <= 150) & (table.y1 >= 0) & (table.y2 <= 200)).all()
        assert ((table.cls_score >= 0) & (table.cls_score <= 1)).all()
        np.testing.assert_array_equal(table.accepted, table.cls_score >= threshold)
        assert isinstance(table, pd.DataFrame) and (np.diff(table.det_score) <= 0).all()
    # A run threshold below the floor is raised to it; an explicit one is kept.
    (cls_run / "best.json").write_text(json.dumps(
        {"score": 0.9, "metrics": {"val_best_threshold": 0.01}}))
    assert Cascade.from_runs(det_run, cls_run).cls_threshold == 0.5
    assert Cascade.from_runs(det_run, cls_run,
                             CascadeSettings(cls_threshold=0.01)).cls_threshold == 0.01
    # A det run trained on shards rescaled to 0.4912 um/px runs Mdet on the half-size image.
    (det_run / "run.json").write_text(json.dumps({"kind": "mdet", "data_mpp": 0.4912}))
    half = Cascade.from_runs(det_run, cls_run, CascadeSettings(det_threshold=0.0, merge_px=0))
    assert (half.det_mpp, half.cls_mpp, half.det_scale) == (0.4912, 0.2456, 0.5)
    table = half.run(image)
    assert len(table) > 0
    assert ((table.x1 >= 0) & (table.x2 <= 150) & (table.y1 >= 0) & (table.y2 <= 200)).all()
    np.testing.assert_allclose(table.cls_score, half.stage2(image, table[["x1", "y1", "x2",
                                                                          "y2"]].to_numpy()),
                               atol=1e-6)


def test_merge_points_keeps_one_detection_per_cell():
    from focas_keras.inference.cascade import merge_points

    centres = np.array([[100.0, 100.0], [112.0, 100.0], [160.0, 100.0], [101.0, 101.0]])
    scores = np.array([0.6, 0.9, 0.8, 0.95])
    accepted = np.array([True, True, True, False])
    # 0.95 is not accepted, so it suppresses nothing; 0.9 at (112, 100) absorbs (100, 100).
    assert merge_points(centres, scores, accepted, 30.0).tolist() == [False, True, True, False]
    assert merge_points(centres, scores, accepted, 0.0).tolist() == accepted.tolist()

