"""The cascade on whole images: tiling, crops at borders, rescaling, thresholds, run loading."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import cv2  # noqa: E402
import tensorflow as tf  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from focas_keras.errors import InputError  # noqa: E402
from focas_keras.inference import cascade as cascade_module  # noqa: E402
from focas_keras.inference import tiling as tiling_module  # noqa: E402
from focas_keras.inference.cascade import (  # noqa: E402
    RESULT_COLUMNS, Cascade, CascadeSettings, crop_patches, list_inputs, tile_starts)
from focas_keras.models.mclass import build_mclass  # noqa: E402
from focas_keras.models.mclass_config import preset as mclass_preset  # noqa: E402
from focas_keras.models.mdet import build_mdet  # noqa: E402
from focas_keras.models.mdet_config import preset as mdet_preset  # noqa: E402
from focas_keras.runs import run_cls_threshold  # noqa: E402


#: A per-area candidate cap that never binds on these small test images.
UNCAPPED = 1e9


def _uncapped(**settings) -> CascadeSettings:
    return CascadeSettings(max_candidates_per_mm2=UNCAPPED, **settings)


class FakeCascade(Cascade):
    """Stage 1 finds dark connected components per tile (purely local); stage 2 scores the
    darkness of the crop's centre pixel."""

    def __init__(self, settings, cls_threshold_default=0.5):
        super().__init__(None, mdet_preset("tiny"), None, mclass_preset("tiny"), settings,
                         cls_threshold_default)
        self.batches, self.patches = [], []

    def detect_images(self, batch, max_detections, valid_size=None):
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

    def classify_patches(self, patches):
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
    whole = FakeCascade(_uncapped(det_threshold=0.0))
    tiled = FakeCascade(_uncapped(det_threshold=0.0, tile=160, overlap=96, tile_batch=5))
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
    monkeypatch.setattr(tiling_module, "ownership",
                        lambda starts, tile: [(-np.inf, np.inf)] * len(starts))
    boxes, _ = FakeCascade(_uncapped(det_threshold=0.0, tile=160, overlap=96)).stage1(image)
    assert len(boxes) > len(truth)


def test_image_smaller_than_tile_is_one_padded_tile():
    image, truth = _squares_image(70, 100, seed=5, count=6)
    tiled = FakeCascade(_uncapped(det_threshold=0.0, tile=128, overlap=32))
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
    fake = FakeCascade(_uncapped(patch=32))
    fake.stage2(image, [[2, 4, 4, 6]])
    np.testing.assert_array_equal(fake.patches[0][0, 16, 16], image[5, 3])


@pytest.mark.parametrize("mpp, model_mpp, shape", [(0.5, 0.25, (1, 160, 200, 3)),
                                                   (0.25, 0.5, (1, 40, 50, 3))])
def test_rescaling_maps_boxes_back(mpp, model_mpp, shape):
    image = np.full((80, 100, 3), 220, np.uint8)
    image[10:20, 20:30] = 40
    image[50:70, 60:80] = 30
    fake = FakeCascade(_uncapped(mpp=mpp, model_mpp=model_mpp, det_threshold=0.0, patch=24))
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
    fake = _StageMppFake(_uncapped(mpp=0.25, det_threshold=0.0, patch=8, merge_px=0),
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
    from focas_keras.runs import run_data_mpp

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
    fake = FakeCascade(_uncapped(det_threshold=0.0))
    boxes, _ = fake.stage1(image)
    scores = fake.stage2(image, boxes)
    threshold = float(np.sort(scores)[len(scores) // 2])
    table = FakeCascade(_uncapped(det_threshold=0.0, cls_threshold=threshold)).run(image)
    assert list(table.columns) == RESULT_COLUMNS
    assert table.accepted.dtype == bool
    assert (np.diff(table.det_score) <= 0).all()
    np.testing.assert_array_equal(table.accepted, table.cls_score >= threshold)
    assert 0 < table.accepted.sum() < len(table)
    at_threshold = table.cls_score == threshold
    assert at_threshold.any() and table.accepted[at_threshold].all()
    np.testing.assert_allclose(table.x, (table.x1 + table.x2) / 2)
    assert FakeCascade(_uncapped(), cls_threshold_default=0.37).cls_threshold == 0.37
    empty = FakeCascade(_uncapped()).run(np.full((50, 50, 3), 230, np.uint8))
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



# --------------------------------------------------------------------------- candidate caps


def test_candidate_cap_values():
    from focas_keras.inference.cascade import candidate_cap

    # A 2084 px ICPR 2012 field: (2084 * 0.2456 um)^2 = 0.26197 mm^2 -> 523.94 -> 524; the same
    # field at half resolution (1042 px of 0.4912 um) covers the same area.
    assert candidate_cap(2084, 2084, 0.2456, 2000) == 524
    assert candidate_cap(1042, 1042, 0.4912, 2000) == 524
    # A 512 px tile at 0.4912 um/px: 0.063249 mm^2 -> 126.50 -> 127.
    assert candidate_cap(512, 512, 0.4912, 2000) == 127
    # Exactly 0.25 mm^2 (1000 px of 0.5 um): 500, not 501 from float noise.
    assert candidate_cap(1000, 1000, 0.5, 2000) == 500
    assert candidate_cap(1000, 500, 0.5, 2000) == 250
    assert candidate_cap(10, 10, 0.25, 2000) == 1          # 0.0125 -> at least 1
    assert candidate_cap(100, 100, 0.25, 2000.5) == 2      # 1.25 -> 2


@pytest.mark.parametrize("kwargs", [dict(max_candidates_per_mm2=0), dict(tta="yes"),
                                    dict(max_candidates_per_mm2=-5.0)])
def test_cap_and_tta_settings_are_validated(kwargs):
    with pytest.raises(InputError, match="max candidates per mm\\^2|tta"):
        CascadeSettings(**kwargs)


def test_per_area_cap_binds_and_is_recorded():
    """26 squares on a 320 px image at 0.2456 um/px (0.006178 mm^2): 1000 per mm^2 keeps
    ceil(6.18) = 7, the best by score; each 160 px tile keeps ceil(1.544) = 2."""
    image, truth = _squares_image()
    free = FakeCascade(_uncapped(det_threshold=0.0))
    boxes, scores = free.stage1(image)
    whole = {"tile": 0, "auto_tiled": False, "topk_per_level": 1000, "calls_at_topk": 0}
    assert len(boxes) == 26 and free.stage1_info == {
        "candidates": 26, "cap": 6_176_703, "cap_bound": False, "calls": 1, "calls_at_cap": 0,
        "call_cap": 6_176_703, "bound": [], **whole}
    capped = FakeCascade(CascadeSettings(det_threshold=0.0, max_candidates_per_mm2=1000.0))
    capped_boxes, capped_scores = capped.stage1(image)
    np.testing.assert_array_equal(capped_boxes, boxes[:7])
    np.testing.assert_array_equal(capped_scores, scores[:7])
    assert capped.stage1_info == {"candidates": 7, "cap": 7, "cap_bound": True,
                                       "calls": 1, "calls_at_cap": 1, "call_cap": 7,
                                       "bound": ["call_nms_max"], **whole}
    tiled = FakeCascade(CascadeSettings(det_threshold=0.0, max_candidates_per_mm2=1000.0,
                                        tile=160, overlap=96))
    tiled_boxes, _ = tiled.stage1(image)
    info = tiled.stage1_info
    assert info["cap"] == 7 and info["calls"] == 16 and info["cap_bound"]
    assert 0 < info["calls_at_cap"] <= 16 and len(tiled_boxes) <= 7
    assert info["call_cap"] == 2 and info["tile"] == 160 and "call_nms_max" in info["bound"]
    assert tiled.candidate_cap(160, 160) == 2
    assert len(tiled.run(image)) == info["candidates"]


# --------------------------------------------------------------------------- a real Mdet


@pytest.fixture(scope="module")
def tiny_mdet():
    """A random-weight tiny Mdet and its config."""
    import keras

    keras.utils.set_random_seed(0)
    config = mdet_preset("tiny")
    return build_mdet(config), config


def _pink_field(height, width, seed=0):
    """A noisy pink field with dark blobs, like test_export's."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (225, 160, 195)
    image += rng.integers(0, 30, image.shape, dtype=np.uint8)
    for _ in range(max(1, height * width // 4000)):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(6, 16)
        cv2.circle(image, (int(x), int(y)), int(r), (60, 30, 100), -1)
    return image


def _mdet_cascade(tiny_mdet, **settings):
    model, config = tiny_mdet
    return Cascade(model, config, None, mclass_preset("tiny"),
                   CascadeSettings(det_threshold=0.0, **settings))


def test_whole_image_and_one_padded_tile_agree_exactly(tiny_mdet):
    """A 200 px image: whole, Mdet mirror-pads it to 224 px; tiled (224 px tiles), the
    cascade mirror-pads it to the tile. Same input, same padding rule (boxes mostly in the
    padding dropped before NMS), so the same candidates, with both per-area caps binding
    (121 for the image, 152 for the tile at 50000 per mm^2) and, at stage-1 threshold 0, each
    level's top-k of 1000 (a 224 px call keeps the config's 1000, :func:`level_topk`)."""
    image = _pink_field(200, 200, seed=1)
    whole = _mdet_cascade(tiny_mdet, max_candidates_per_mm2=50000.0)
    tiled = _mdet_cascade(tiny_mdet, max_candidates_per_mm2=50000.0, tile=224, overlap=32)
    boxes_w, scores_w = whole.stage1(image)
    boxes_t, scores_t = tiled.stage1(image)
    common = {"candidates": 121, "cap": 121, "cap_bound": True, "calls": 1, "calls_at_cap": 1,
              "auto_tiled": False, "topk_per_level": 1000, "calls_at_topk": 1}
    assert whole.stage1_info == {**common, "tile": 0, "call_cap": 121,
                                      "bound": ["per_level_topk", "call_nms_max"]}
    assert tiled.stage1_info == {**common, "tile": 224, "call_cap": 152,
                                      "bound": ["per_level_topk", "call_nms_max", "image_cap"]}
    np.testing.assert_array_equal(boxes_t, boxes_w)
    np.testing.assert_array_equal(scores_t, scores_w)
    assert boxes_w[:, [0, 2]].max() <= 200 and boxes_w[:, [1, 3]].max() <= 200


def _border_share(boxes, height, width, band):
    """Share of boxes whose centre lies within ``band`` px of the bottom or right border."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    return float(np.mean((cx > width - band) | (cy > height - band)))


def test_no_pile_up_of_candidates_at_the_padded_border(tiny_mdet, monkeypatch):
    """A 200 x 170 field of pink noise is padded to 224 x 192 for Mdet. Zero padding puts a
    dark band along the bottom and right, to which even a random Mdet responds: about half of
    its 100 best candidates crowd the 16 px strip along those borders, which is 16.7 % of the
    image (45-58 % over five seeds). Mirrored, the strip gets no more than about its share
    (9-15 %), and every box is clipped to the image with area left."""
    from focas_keras.models import mdet as mdet_module

    height, width, band = 200, 170, 16
    area_share = 1 - (height - band) * (width - band) / (height * width)
    rng = np.random.default_rng(0)
    image = np.full((height, width, 3), (225, 160, 195), np.uint8)
    image += rng.integers(0, 30, image.shape, dtype=np.uint8)
    per_mm2 = 100 / (height * width * (0.2456e-3) ** 2)  # a cap of 100 candidates
    mirrored, _ = _mdet_cascade(tiny_mdet, max_candidates_per_mm2=per_mm2).stage1(image)
    assert len(mirrored) == 100
    assert _border_share(mirrored, height, width, band) <= 1.25 * area_share
    assert ((mirrored[:, 2] > mirrored[:, 0]) & (mirrored[:, 3] > mirrored[:, 1])).all()
    assert mirrored[:, [0, 2]].max() <= width and mirrored[:, [1, 3]].max() <= height

    def zero_pad(images, padded_height, padded_width):
        h, w = images.shape[1], images.shape[2]
        return tf.pad(images, [[0, 0], [0, padded_height - h], [0, padded_width - w], [0, 0]])

    monkeypatch.setattr(mdet_module, "mirror_pad", zero_pad)
    zeroed, _ = _mdet_cascade(tiny_mdet, max_candidates_per_mm2=per_mm2).stage1(image)
    assert _border_share(zeroed, height, width, band) > 2 * area_share  # the check bites


def test_whole_image_and_512_px_tiles_agree_on_a_real_field(tiny_mdet, icpr_dir):
    """A real ICPR 2012 field at half resolution (1042 px; the whole image is mirror-padded
    to 1056), stage 1 whole and in 512 px tiles (overlap 64: origins 0, 448, 530), with the
    same random-weight tiny Mdet.

    Tolerances, and why: the random model's scores all lie within ~2e-4 (about 0.0100 to
    0.0102), and GroupNorm normalises over its whole input, so a 512 px tile, whose
    statistics differ from the whole field's, shifts every score a little (measured: up to
    2.2e-5, boxes up to 0.2 px). Asserted: every compared whole-image candidate has a tiled
    one within 1 px per coordinate whose score differs by < 5e-5. Compared are the candidates
    whose score is at least 5e-5 above the threshold (so neither run can drop them at it),
    whose centre is 32 px or more from every tile edge inside the image, and which are owned
    by tiles starting on Mdet's 32 px grid (the last tile, at 530, sees anchors and strides
    2-18 px off the whole image's). NMS is off (IoU 1): between overlapping boxes of almost
    equal scores it would choose by that noise. The threshold, the 80th percentile of all
    scores, keeps the candidates below every cap (caps: their own test).
    """
    from focas_keras.datasets.annotations import load_image
    from focas_keras.inference.tiling import ownership as _ownership

    model, config = tiny_mdet
    config = config.override(**{"inference.nms_iou": 1.0})
    image = load_image(sorted((icpr_dir / "images").glob("*.jpg"))[0])

    def cascade(**settings):
        return Cascade(model, config, None, mclass_preset("tiny"), CascadeSettings(
            det_mpp=0.4912, nms_iou=1.0, max_candidates_per_mm2=1e6, **settings))

    _, all_scores = cascade(det_threshold=0.0).stage1(image)
    threshold = float(np.quantile(all_scores, 0.8))
    whole, tiled = cascade(det_threshold=threshold), cascade(det_threshold=threshold, tile=512)
    boxes_w, scores_w = whole.stage1(image)
    boxes_t, scores_t = tiled.stage1(image)
    assert tiled.stage1_info["calls"] == 9 and not tiled.stage1_info["cap_bound"]
    assert whole.det_scale == 0.5 and whole.model_image(image, "det")[0].shape == (1042, 1042, 3)

    # Both sets in Mdet's pixels (input pixels x 0.5).
    boxes_w, boxes_t = boxes_w * whole.det_scale, boxes_t * whole.det_scale
    starts = tile_starts(1042, 512, 64)
    owners = _ownership(starts, 512)

    def comparable(v):
        owner = next(k for k, (lo, hi) in enumerate(owners) if lo <= v < hi)
        edges = [e for e in (starts[owner], starts[owner] + 512) if 0 < e < 1042]
        return starts[owner] % 32 == 0 and all(abs(v - e) >= 32 for e in edges)

    centres = (boxes_w[:, :2] + boxes_w[:, 2:]) / 2
    compared = [i for i, (cx, cy) in enumerate(centres)
                if scores_w[i] >= threshold + 5e-5 and comparable(cx) and comparable(cy)]
    assert len(compared) >= 10
    for i in compared:
        j = int(np.argmin(np.abs(boxes_t - boxes_w[i]).max(axis=1)))
        assert np.abs(boxes_t[j] - boxes_w[i]).max() <= 1.0, (boxes_w[i], boxes_t[j])
        assert abs(scores_t[j] - scores_w[i]) < 5e-5


def test_tta_setting_scores_crops_with_predict_proba_tta():
    import keras

    from focas_keras.models.mclass import predict_proba, predict_proba_tta

    keras.utils.set_random_seed(0)
    cls_config = mclass_preset("tiny")
    model = build_mclass(cls_config)
    patches = np.random.default_rng(0).integers(0, 256, (4, 112, 112, 3), dtype=np.uint8)
    size = cls_config.model.input_size

    def classify(tta):
        return Cascade(None, mdet_preset("tiny"), model, cls_config,
                       CascadeSettings(tta=tta, cls_batch=3)).classify_patches(patches)

    np.testing.assert_allclose(classify(True), predict_proba_tta(model, patches, size, 3),
                               atol=1e-6)
    np.testing.assert_allclose(classify(False), predict_proba(model, patches, size, 3),
                               atol=1e-6)
