"""The whole-field recipe's parts: grid tiles, whole validation fields, mining every candidate
(validation candidates for selection only), and selection on whole fields in both trainers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from conftest import write_tiny_icpr  # noqa: E402
from test_mine import FakeDetector, _planned  # noqa: E402

from focas_keras.datasets import sampling  # noqa: E402
from focas_keras.datasets.annotations import load_image  # noqa: E402
from focas_keras.training.mine import mine_hard_negatives  # noqa: E402
from focas_keras.datasets.prepare import PrepareConfig, prepare  # noqa: E402
from focas_keras.datasets.readers import read_dataset  # noqa: E402
from focas_keras.data import pipeline, records  # noqa: E402
from focas_keras.evaluation import fields  # noqa: E402
from focas_keras.evaluation.calibrate import calibrate_cascade  # noqa: E402


def test_grid_origins_cover_the_image_with_the_last_tile_flush():
    assert sampling.grid_origins(320, 200, 96) == [
        (x, y) for y in (0, 96, 104) for x in (0, 96, 192, 224)]
    assert sampling.grid_origins(96, 50, 96) == [(0, 0)]  # short side: one tile, padded
    origins = sampling.grid_origins(1042, 1042, 224)
    covered = np.zeros((1042, 1042), bool)
    for x0, y0 in origins:
        covered[y0:y0 + 224, x0:x0 + 224] = True
    assert covered.all() and len(origins) == 25


@pytest.fixture()
def dataset(tmp_path):
    root = tmp_path / "tiny"
    return root, write_tiny_icpr(root)


def test_prepare_grid_tiles_and_whole_validation_fields(dataset, tmp_path):
    root, truth = dataset
    aset = read_dataset("icpr2012", root)
    plain = prepare(aset, tmp_path / "plain", PrepareConfig(tile_size=96, patch_size=32,
                                                            val_slides=("A02",)))
    manifest = prepare(aset, tmp_path / "grid", PrepareConfig(
        tile_size=96, patch_size=32, val_slides=("A02",), det_grid=True, val_fields=True))
    per_image = len(sampling.grid_origins(320, 320, 96))  # 16
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert train["det"]["grid_tiles"] == per_image * len(train["images"])
    assert train["det"]["records"] == plain["splits"]["train"]["det"]["records"] + \
        per_image * len(train["images"])
    assert val["det"]["records"] == plain["splits"]["val"]["det"]["records"]  # val: no grid
    assert not pipeline.has_records(plain, records.FIELD, "val")
    got = pipeline.read_fields(tmp_path / "grid", "val")
    assert sorted(f["image_id"] for f in got) == sorted(val["images"])
    assert val["field"] == {"records": 2, "mitoses": 2}
    paths = aset.images.set_index("image_id").image_path
    centroids = aset.annotations.set_index("image_id")
    for field in got:
        np.testing.assert_array_equal(field["image"], load_image(paths[field["image_id"]]))
        assert field["mpp"] == pytest.approx(0.2456)
        expected = np.asarray([[(x1 + x2 - 1) / 2, (y1 + y2 - 1) / 2]
                               for x1, y1, x2, y2 in truth[field["image_id"]]]).reshape(-1, 2)
        np.testing.assert_allclose(field["points"], expected, atol=1e-4)
    assert len(centroids)  # the reader saw the mitoses the fields carry


def test_field_metrics_on_hand_made_points():
    truth = {"a": np.array([[100.0, 100.0], [300.0, 300.0]]), "b": np.array([[50.0, 50.0]])}
    per_image = {"a": (np.array([[105.0, 100.0], [110.0, 100.0], [600.0, 600.0]]),
                       np.array([0.9, 0.8, 0.7]), None),
                 "b": (np.array([[50.0, 75.0]]), np.array([0.6]), None)}  # 25 px: too far
    preds = fields.candidate_table(per_image)
    assert list(preds["cls_score"]) == list(preds["det_score"])
    assert fields.candidate_recall(truth, preds, 20.0) == (1, 3)
    assert fields.recall_keeping_threshold(truth, preds, 20.0) == pytest.approx(0.9)
    m = fields.stage1_metrics(truth, preds, mpp=0.2456, areas_mm2=0.5)
    # 20 px at 0.2456 um/px; the 30 px merge folds (110, 100) into (105, 100): best cut 0.9
    # gives 1 TP, 0 FP, 2 FN.
    assert m["val_field_candidate_recall"] == pytest.approx(1 / 3)
    assert m["val_field_det_threshold"] == pytest.approx(0.9)
    assert m["val_field_precision"] == 1.0 and m["val_field_recall"] == pytest.approx(1 / 3)
    assert m["val_field_candidates_per_mm2"] == pytest.approx(4 / 0.5)
    # at half resolution the same micrometres are half the pixels: 12.5 px > 10 px radius
    half = fields.stage1_metrics({"a": np.array([[100.0, 100.0]])},
                                 fields.candidate_table({"a": (np.array([[112.5, 100.0]]),
                                                               np.array([0.5]), None)}),
                                 mpp=0.4912, areas_mm2=1.0)
    assert half["val_field_candidate_recall"] == 0.0


@pytest.fixture()
def prepared(dataset, tmp_path):
    root, truth = dataset
    out = tmp_path / "shards"
    prepare(read_dataset("icpr2012", root), out,
            PrepareConfig(tile_size=96, patch_size=32, val_slides=("A02",)))
    return root, truth, out


def test_mining_validation_candidates_for_selection_only(prepared):
    root, truth, out = prepared
    manifest = pipeline.load_manifest(out)
    val_ids = manifest["splits"]["val"]["images"]
    before_val = dict(manifest["splits"]["val"]["cls"])
    detector = FakeDetector(root, truth)
    mining = mine_hard_negatives(None, root, "icpr2012", out, detector=detector,
                                 include_val=True)
    assert sorted(detector.seen) == sorted(manifest["splits"]["train"]["images"] + val_ids)
    val = [r for r in pipeline.read_records(out, records.CLS, "val")
           if r["source"].decode().startswith("mined")]
    planned = {i: _planned(truth[i]) for i in val_ids}
    assert len(val) == sum(len(p) for p in planned.values())
    scores = np.linspace(0.9, 0.5, 6)  # FakeDetector's scores for 6 planned detections
    for r in val:
        image_id = r["image_id"].decode()
        plan = planned[image_id]
        index = [tuple(c) for c, _ in plan].index(tuple(int(v) for v in r["center"]))
        assert r["label"] == (0 if plan[index][1] else 1)
        expected_scores = np.linspace(0.9, 0.5, len(plan))
        assert r["score"] == pytest.approx(expected_scores[index], abs=1e-6)
    assert scores.shape == (6,)
    train = pipeline.read_records(out, records.CLS, "train")
    assert not any(r["image_id"].decode() in val_ids for r in train)
    assert all(r["score"] == records.NO_SCORE for r in train
               if not r["source"].decode().startswith("mined"))
    saved = pipeline.load_manifest(out)
    assert set(saved["mining"]["val_truth"]) == set(val_ids)
    counts = saved["splits"]["val"]["cls"]
    assert counts["records"] == before_val["records"] + len(val)
    assert mining["val"]["records"] == len(val)
    # mining again without --include-val removes the validation candidates and their counts
    mine_hard_negatives(None, root, "icpr2012", out, detector=FakeDetector(root, truth))
    again = pipeline.load_manifest(out)
    assert again["splits"]["val"]["cls"]["records"] == before_val["records"]
    assert not any(r["source"].decode().startswith("mined")
                   for r in pipeline.read_records(out, records.CLS, "val"))
    assert not list((out / "cls").glob("val-mined-*"))


def _darkness_model():
    """Mclass stand-in: the logit rises with the patch's darkness (the tiny dataset's
    'mitoses' are dark squares on a pink background)."""
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(1)])
    model.layers[-1].set_weights([np.full((3, 1), -20.0, np.float32), np.array([30.0])])
    return model


def test_cascade_validator_scores_whole_fields(prepared):
    from focas_keras.training.cls_trainer import cascade_validator, mined_val_candidates

    root, truth, out = prepared
    mine_hard_negatives(None, root, "icpr2012", out, detector=FakeDetector(root, truth),
                        include_val=True)
    candidates = mined_val_candidates(out, pipeline.load_manifest(out))
    assert candidates["images"].shape[1:] == (32, 32, 3)
    model = _darkness_model()
    metrics = cascade_validator(candidates, 32)(model)
    from focas_keras.models.mclass import predict_proba

    probs = predict_proba(model, candidates["images"], 32)
    preds = pd.DataFrame({"image": candidates["image_ids"], "x": candidates["centres"][:, 0],
                          "y": candidates["centres"][:, 1],
                          "det_score": candidates["det_scores"], "cls_score": probs})
    expected = calibrate_cascade(candidates["truth"], preds, 20.0, 30.0,
                                 min_det_threshold=float(preds["det_score"].min()))
    assert metrics["val_cascade_f1"] == pytest.approx(expected["f1"])
    assert metrics["val_cascade_cls_threshold"] == pytest.approx(expected["cls_threshold"])
    # the dark squares are found and the pink background rejected: a perfect cascade
    assert metrics["val_cascade_f1"] == 1.0


def test_train_cls_selects_on_whole_validation_fields(prepared, tmp_path):
    from focas_keras.models.mclass_config import preset
    from focas_keras.training.cls_trainer import train_cls

    root, truth, out = prepared
    mine_hard_negatives(None, root, "icpr2012", out, detector=FakeDetector(root, truth),
                        include_val=True, keep_true_positives=True)
    config = preset("tiny").override(**{"train.epochs": 1, "train.steps_per_epoch": 2,
                                        "model.input_size": 32})
    result = train_cls(out, tmp_path / "cls", config, log=lambda *_: None)
    best = json.loads((tmp_path / "cls" / "best.json").read_text())
    for key in ("val_cascade_f1", "val_cascade_det_threshold", "val_cascade_cls_threshold",
                "val_auc"):
        assert key in best["metrics"] and key in result["last"]
    assert best["score"] == pytest.approx(best["metrics"]["val_cascade_f1"]
                                          + 1e-3 * best["metrics"]["val_auc"])


def test_train_det_selects_on_whole_validation_fields(dataset, tmp_path):
    from focas_keras.models.mdet_config import preset
    from focas_keras.training.det_trainer import train_det

    root, _ = dataset
    shards = tmp_path / "shards"
    prepare(read_dataset("icpr2012", root), shards,
            PrepareConfig(tile_size=64, det_margin=8, val_slides=("A02",), det_grid=True,
                          val_fields=True))
    config = preset("tiny").override(**{"train.augment": False, "train.batch_size": 4,
                                        "train.steps_per_epoch": 2, "train.epochs": 1,
                                        "train.warmup_steps": 2, "input_size": 64,
                                        # an epoch-1 tiny Mdet scores near its prior: keep
                                        # some candidates on the fields
                                        "inference.score_threshold": 0.001})
    train_det(shards, tmp_path / "det", config, log=lambda *_: None)
    best = json.loads((tmp_path / "det" / "best.json").read_text())
    m = best["metrics"]
    for key in ("val_field_f1", "val_field_candidate_recall", "val_field_det_threshold",
                "val_field_candidates_per_mm2", "val_f1"):
        assert key in m
    assert best["score"] == pytest.approx(m["val_field_f1"]
                                          + 1e-3 * m["val_field_candidate_recall"])
    assert m["val_recall_threshold"] == m["val_field_recall_threshold"]
    # 2 fields of 320 x 320 px at 0.2456 um/px: at most each field's cap (2000 per mm2,
    # rounded up to 13 a field), and this low threshold fills it
    from focas_keras.inference.cascade import candidate_cap

    cap = candidate_cap(320, 320, 0.2456, 2000.0)
    field_mm2 = (320 * 0.2456 / 1000) ** 2
    assert m["val_field_candidates_per_mm2"] * 2 * field_mm2 == pytest.approx(2 * cap)
    run = json.loads((tmp_path / "det" / "run.json").read_text())
    assert run["field_shards"]
    # validation ran stage 1 as detect runs it: the engine's candidates of the same weights
    from focas_keras.datasets.annotations import load_image
    from focas_keras.inference import load_stage1

    stage1 = load_stage1(tmp_path / "det", which="best")
    images = read_dataset("icpr2012", root).images
    val = images[images.slide_id == "A02"]
    found = sum(len(stage1.stage1(load_image(path))[1]) for path in val.image_path)
    assert found == 2 * cap and stage1.det_mpp == 0.2456
