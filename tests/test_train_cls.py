"""train-cls: learning on synthetic patches, metrics, AUC helper, bad input."""

import json

import pytest
from click.testing import CliRunner

from focas_keras.datasets.prepare import PrepareConfig, prepare
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.synth import write_dataset
from focas_keras.cli import main
from focas_keras.models.mclass_config import preset
from focas_keras.training.cls_trainer import roc_auc, threshold_metrics, train_cls


@pytest.fixture(scope="module")
def cls_shards(tmp_path_factory):
    """Patches from six synthetic fields: two training slides, one held-out slide."""
    root = tmp_path_factory.mktemp("cls")
    write_dataset(root / "syn", images=6, size=768, seed=3, per_slide=2)
    prepare(read_dataset("synth", root / "syn"), root / "shards",
            PrepareConfig(val_slides=("S02",), cls_per_mitosis=12, cls_per_hard_negative=6,
                          cls_background_per_image=30, det_tiles_per_mitosis=1))
    return root / "shards"


def test_roc_auc_and_thresholds():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    assert roc_auc([1, 1, 0, 0], [0.9, 0.1, 0.8, 0.2]) == 0.5
    metrics = threshold_metrics([1, 1, 0, 0], [0.9, 0.4, 0.6, 0.1])
    assert metrics["val_precision_at_0.5"] == 0.5 and metrics["val_recall_at_0.5"] == 0.5
    assert metrics["val_best_threshold"] == 0.4 and metrics["val_f1"] == pytest.approx(0.8)


def test_tiny_preset_separates_mitoses_from_look_alikes(cls_shards, tmp_path):
    manifest = json.loads((cls_shards / "manifest.json").read_text())
    assert manifest["splits"]["val"]["cls"]["hard_negative"] > 0
    config = preset("tiny").override(**{"train.epochs": 4, "train.steps_per_epoch": 25})
    result = train_cls(cls_shards, tmp_path / "run", config, log=lambda *_: None)
    best = result["best"]["metrics"]
    assert best["val_auc"] >= 0.95, best
    for key in ("val_loss", "val_precision_at_0.5", "val_recall_at_0.5", "val_best_threshold"):
        assert key in best
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["last"]["epoch"] == 4
    assert (tmp_path / "run" / "best.keras").is_file()
    # Shards kept the images' own pixel size: the run records none (detect will not rescale).
    assert "data_mpp" not in json.loads((tmp_path / "run" / "run.json").read_text())


def test_bad_inputs_exit_2(cls_shards, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["train-cls", "--data", str(cls_shards), "--out",
                                  str(tmp_path / "r"), "--preset", "tiny", "--init-weights",
                                  str(tmp_path / "missing.weights.h5")])
    assert result.exit_code == 2 and "initial weights file not found" in result.output
    result = runner.invoke(main, ["train-cls", "--data", str(cls_shards), "--out",
                                  str(tmp_path / "r"), "--preset", "tiny",
                                  "--set", "train.positive_share=1.5"])
    assert result.exit_code == 2 and "positive_share" in result.output
    result = runner.invoke(main, ["train-cls", "--data", str(tmp_path), "--out",
                                  str(tmp_path / "r"), "--preset", "tiny"])
    assert result.exit_code == 2 and "no manifest.json" in result.output
