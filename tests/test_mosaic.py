"""Mosaic det tiles of crops smaller than a tile, and Mdet trained with extra det shards
(``prepare --det-small-images mosaic``, ``train-det --extra-data``)."""

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from focas_keras.cli import main
from focas_keras.data import pipeline, records
from focas_keras.datasets import mosaic
from focas_keras.datasets.prepare import PrepareConfig, prepare
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.readers.amibr import read_amibr
from focas_keras.errors import InputError
from focas_keras.models.mdet_config import preset
from focas_keras.training.det_trainer import train_det

DISC = (60, 20, 90)  # the figure colour of test_readers_amibr.write_amibr


def test_partition_sums_and_bounds():
    rng = np.random.default_rng(0)
    for total, parts, most in ((224, 5, 60), (96, 3, 40), (100, 1, 100), (10, 10, 1)):
        for _ in range(50):
            sizes = mosaic.partition(total, parts, most, rng)
            assert sizes.sum() == total and len(sizes) == parts
            assert sizes.max() <= most and sizes.min() >= 1
    with pytest.raises(ValueError, match="cannot cover"):
        mosaic.partition(224, 3, 60, rng)
    # AMi-Br at 0.4912 um/px: 60-65 px crops -> 4 cells would fit, 5 leave room to move
    assert mosaic.grid_side(224, [65, 60]) == 5
    assert mosaic.grid_side(224, [65, 60], extra=0) == 4


def _disc_crop(side, value, centre=None):
    crop = np.full((side, side, 3), value, np.uint8)
    cx, cy = centre or (side // 2, side // 2)
    crop[cy - 5:cy + 5, cx - 5:cx + 5] = DISC
    return crop, np.array([[cx - 5, cy - 5, cx + 5, cy + 5]], np.float64)


def test_tile_boxes_lie_on_their_figures_and_cells_come_from_their_crops():
    rng = np.random.default_rng(1)
    crops, boxes = zip(*[_disc_crop(40, 100 + 10 * i) for i in range(9)])
    for _ in range(20):
        tile, tile_boxes = mosaic.mosaic_tile(list(crops), list(boxes), 96, rng)
        assert tile.shape == (96, 96, 3) and tile.dtype == np.uint8
        # every visible pixel comes from a crop: its background value or the disc
        values = {tuple(v) for v in tile.reshape(-1, 3)}
        assert values <= {(100 + 10 * i,) * 3 for i in range(9)} | {DISC}
        # each kept box covers disc pixels only where it is fully visible (10 px square)
        for x1, y1, x2, y2 in tile_boxes:
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96
            if x2 - x1 == 10 and y2 - y1 == 10:
                assert (tile[int(y1):int(y2), int(x1):int(x2)] == DISC).all()
        # a disc pixel far from every box would be an unlabelled figure
        ys, xs = np.nonzero((tile == DISC).all(axis=2))
        centres = (tile_boxes[:, :2] + tile_boxes[:, 2:]) / 2
        for x, y in zip(xs, ys):
            near = np.abs(centres - [x + 0.5, y + 0.5]).max(axis=1) <= 5.5
            # only a disc cut to < min_visible of its box may go unboxed
            if not near.any():
                assert ((tile[max(0, y - 5):y + 6, max(0, x - 5):x + 6] == DISC).all(axis=2).sum()
                        < 50)


def test_centred_figures_land_at_varying_places_in_their_cells():
    """The shortcut "a figure sits at the centre of each piece" must not hold."""
    rng = np.random.default_rng(2)
    crops, boxes = zip(*[_disc_crop(64, 150) for _ in range(25)])
    xs = []
    for _ in range(40):
        _, tile_boxes = mosaic.mosaic_tile(list(crops), list(boxes), 224, rng)
        first_column = tile_boxes[(tile_boxes[:, 0] + tile_boxes[:, 2]) / 2 < 25]
        xs += list((first_column[:, 0] + first_column[:, 2]) / 2)
    assert np.ptp(xs) > 15  # a centred crop window would give one x


def test_every_crop_appears_about_per_crop_times():
    rng = np.random.default_rng(3)
    crops, boxes = [], []
    for i in range(16):
        crop = np.full((40, 40, 3), i, np.uint8)
        crops.append(crop)
        boxes.append(np.zeros((0, 4)))
    # 40 px crops in a 96 px tile: 3 cells would fit, so 4 x 4; 16 crops x 3 = 3 tiles, each
    # one permutation of the crops
    tiles = mosaic.mosaic_tiles(crops, boxes, 96, per_crop=3, rng=rng)
    assert len(tiles) == 3
    counts = np.zeros(16)
    for tile, tile_boxes in tiles:
        assert len(tile_boxes) == 0
        for value in np.unique(tile[..., 0]):
            counts[value] += 1
    assert (counts == 3).all()
    assert len(mosaic.mosaic_tiles(crops[:10], boxes[:10], 96, 3, rng)) == 2
    assert mosaic.mosaic_tiles([], [], 96, 3, rng) == []
    with pytest.raises(ValueError, match="square number"):
        mosaic.mosaic_tile(crops[:5], boxes[:5], 96, rng)


# ----------------------------------------------------------------------------- prepare


@pytest.fixture(scope="module")
def amibr(tmp_path_factory):
    from test_readers_amibr import write_amibr

    return write_amibr(tmp_path_factory.mktemp("amibr") / "amibr")


MOSAIC = PrepareConfig(tile_size=96, patch_size=32, det_tiles_per_mitosis=2,
                       cls_per_mitosis=1, cls_background_per_image=0, val_fraction=0.0,
                       target_mpp=0.4912, det_small_images="mosaic", seed=5)


def test_prepare_amibr_mosaic_tiles_one_scanner_each(amibr, tmp_path):
    manifest = prepare(read_amibr(amibr), tmp_path / "shards", MOSAIC)
    det = manifest["splits"]["train"]["det"]
    # 3 crops of Hamamatsu XR, 3 of CS2, 1 of TUPAC: 60-65 px at 0.4912 um/px -> 3 x 3 cells
    # of a 96 px tile; each scanner's crops twice: ceil(3*2/9) + ceil(3*2/9) + ceil(1*2/9)
    assert det["mosaic_tiles"] == det["records"] == 3
    assert det["skipped_small_images"] == 0
    recs = pipeline.read_records(tmp_path / "shards", records.DET, "train")
    assert sorted(r["slide_id"].decode() for r in recs) == [
        "mosaic/Aperio ScanScope (TUPAC16, TCGA-BRCA)", "mosaic/Aperio ScanScope CS2",
        "mosaic/Hamamatsu XR"]
    total = 0
    for rec in recs:
        image, boxes = rec["image"], np.asarray(rec["boxes"]).reshape(-1, 4)
        assert image.shape == (96, 96, 3) and len(boxes) >= 1
        total += len(boxes)
        for x1, y1, x2, y2 in boxes:  # boxes are 10 um = 20.4 px; fully visible ones sit on
            if x2 - x1 > 20 and y2 - y1 > 20:  # their figure's disc (8 px radius at 0.23-0.25)
                cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
                assert np.abs(image[cy, cx].astype(int) - DISC).max() < 40
    assert total == det["boxes"]
    # the same seed gives the same tiles
    again = prepare(read_amibr(amibr), tmp_path / "again", MOSAIC)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in manifest["shards"]]


def test_cli_prepare_mosaic(amibr, tmp_path):
    result = CliRunner().invoke(main, [
        "prepare", str(amibr), "--format", "amibr", "--out", str(tmp_path / "s"),
        "--target-mpp", "0.4912", "--det-small-images", "mosaic", "--val-fraction", "0",
        "--tile-size", "96", "--patch-size", "32"])
    assert result.exit_code == 0, result.output
    assert "mosaic tiles" in result.output


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def det_sources(tmp_path_factory):
    from conftest import write_tiny_icpr
    from test_extra_data import _without_red  # the extra source is told apart by colour

    root = tmp_path_factory.mktemp("detextra")
    config = PrepareConfig(tile_size=64, det_margin=8, val_slides=("A02",), seed=3)
    write_tiny_icpr(root / "main")
    prepare(read_dataset("icpr2012", root / "main"), root / "main_shards", config)
    write_tiny_icpr(root / "other", seed=1)
    _without_red(root / "other")
    prepare(read_dataset("icpr2012", root / "other"), root / "other_shards", config)
    prepare(read_dataset("icpr2012", root / "main"), root / "wide",
            PrepareConfig(tile_size=96, val_slides=("A02",), seed=3))
    return root


def _extra_share(ds, batches=30):
    images = np.concatenate([x.numpy() for x, _ in ds.take(batches)])
    return float((images[..., 0].mean(axis=(1, 2)) < 0.3).mean())  # the red-less source


def test_det_dataset_mixes_the_extra_share(det_sources):
    ds = pipeline.det_dataset(det_sources / "main_shards", "train", batch_size=16, seed=0,
                              extra_dirs=[det_sources / "other_shards"], extra_share=0.4)
    assert abs(_extra_share(ds) - 0.4) < 0.08
    plain = pipeline.det_dataset(det_sources / "main_shards", "train", batch_size=16, seed=0,
                                 repeat=True)
    assert _extra_share(plain) == 0.0


def test_det_dataset_without_extra_is_unchanged(det_sources):
    kwargs = dict(batch_size=4, seed=4, deterministic=True, repeat=True)
    plain = pipeline.det_dataset(det_sources / "main_shards", "train", **kwargs)
    again = pipeline.det_dataset(det_sources / "main_shards", "train", extra_dirs=(),
                                 extra_share=0.0, **kwargs)
    for (a, ta), (b, tb) in zip(plain.take(3), again.take(3)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(ta["boxes"].numpy(), tb["boxes"].numpy())


def test_bad_extra_det_sources(det_sources):
    with pytest.raises(InputError, match="tile size"):
        pipeline.det_dataset(det_sources / "main_shards", "train",
                             extra_dirs=[det_sources / "wide"], extra_share=0.2)
    with pytest.raises(InputError, match="extra share"):
        pipeline.det_dataset(det_sources / "main_shards", "train",
                             extra_dirs=[det_sources / "other_shards"], extra_share=0.0)
    with pytest.raises(InputError, match="extra share"):
        pipeline.det_dataset(det_sources / "main_shards", "train", extra_share=0.2)


def test_train_det_records_the_extra_shards(det_sources, tmp_path):
    config = preset("tiny").override(**{
        "train.augment": False, "train.batch_size": 4, "train.steps_per_epoch": 2,
        "train.epochs": 1, "train.warmup_steps": 2, "input_size": 64})
    quiet = {"log": lambda *_: None}
    with pytest.raises(InputError, match="extra_share"):
        train_det(det_sources / "main_shards", tmp_path / "r0", config,
                  extra_data=[det_sources / "other_shards"], **quiet)
    with pytest.raises(InputError, match="extra_share"):
        train_det(det_sources / "main_shards", tmp_path / "r0",
                  config.override(**{"train.extra_share": 0.3}), **quiet)
    with pytest.raises(InputError, match="96 px tiles"):
        train_det(det_sources / "main_shards", tmp_path / "r0",
                  config.override(**{"train.extra_share": 0.3}),
                  extra_data=[det_sources / "wide"], **quiet)
    config = config.override(**{"train.extra_share": 0.3})
    train_det(det_sources / "main_shards", tmp_path / "r1", config,
              extra_data=[det_sources / "other_shards"], **quiet)
    identity = json.loads((tmp_path / "r1" / "run.json").read_text())
    text = json.dumps(identity.get("identity", identity))
    assert str((det_sources / "other_shards").resolve()) in text and "extra_shards" in text
    saved = json.loads((tmp_path / "r1" / "config.json").read_text())
    assert saved["train"]["extra_share"] == 0.3


def test_cli_train_det_extra_data(det_sources, tmp_path):
    result = CliRunner().invoke(main, [
        "train-det", "--data", str(det_sources / "main_shards"), "--out", str(tmp_path / "r"),
        "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
        "--set", "input_size=64", "--set", "train.extra_share=0.5",
        "--extra-data", str(det_sources / "other_shards")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "model.keras").is_file()


def test_train_det_extra_data_without_mitoses(det_sources, amibr, tmp_path):
    skipped = tmp_path / "skipped"  # crops (49 px at 0.6 um/px) skipped, not mosaicked
    prepare(read_amibr(amibr), skipped, PrepareConfig(tile_size=64, patch_size=32,
                                                       val_fraction=0.0, target_mpp=0.6))
    config = preset("tiny").override(**{"input_size": 64, "train.extra_share": 0.3})
    with pytest.raises(InputError, match="mosaic"):
        train_det(det_sources / "main_shards", tmp_path / "r", config, extra_data=[skipped],
                  log=lambda *_: None)


# ----------------------------------------------------------------------------- experiment


def test_det_extra_cv_scores():
    from experiment_modules import load_experiment

    cv = load_experiment("det_extra_cv")
    truth = {"f1": np.array([[100.0, 100.0], [300.0, 300.0]]), "f2": np.array([[50.0, 50.0]])}

    def table(rows):
        return pd.DataFrame(rows, columns=["image", "x", "y", "det_score"])

    control = table([("f1", 105, 100, 0.9), ("f1", 500, 500, 0.06), ("f2", 50, 80, 0.5)])
    extra = table([("f1", 100, 100, 0.3), ("f1", 310, 300, 0.04), ("f2", 52, 50, 0.2),
                   ("f2", 900, 900, 0.8)])
    fold = cv.fold_scores(truth, {"control": control, "extra": extra}, 0.05, fields=2)
    assert fold["control"] == {"found": 1, "mitoses": 3, "candidates": 3}
    assert fold["extra"] == {"found": 2, "mitoses": 3, "candidates": 3}
    # the control's 3 candidates: extra's best three are 0.8 (nowhere), 0.3 and 0.2
    assert fold["extra_at_control_count"] == {"found": 2, "mitoses": 3, "candidates": 3}
    pooled = cv.pooled([fold, fold])
    assert pooled["extra"]["recall"] == pytest.approx(2 / 3)
    assert pooled["control"]["candidates_per_field"] == pytest.approx(1.5)
    summary = {"folds": ["A00"], "det_threshold": 0.05, "extra_share": 0.3,
               "per_fold": [{**fold, "test": "A00"}], "pooled": pooled}
    assert "| A00 | 3 | 1 / 3 | 2 / 3 | 2 |" in cv.report(summary)
    # budgets of candidates per field (2 fields): the best 1, then the best 2 of each arm
    curve = cv.budget_curve([(truth, {"control": control, "extra": extra}, 2)], [0.5, 1])
    assert curve["control"]["0.5"]["found"] == 1 and curve["extra"]["0.5"]["found"] == 0
    assert curve["control"]["1"]["found"] == 1 and curve["extra"]["1"]["found"] == 1
    assert "| AMi-Br mosaics | 0/3 (0.000) | 1/3 (0.333) |" in cv.report(
        {**summary, "budgets": curve})
