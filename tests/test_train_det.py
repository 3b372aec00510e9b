"""train-det: learning, strategies (mirrored, multi-worker), resume, precision, bad input."""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from focas_keras.datasets.prepare import PrepareConfig, prepare
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.synth import write_dataset
from focas_keras.cli import main
from focas_keras.data import pipeline
from focas_keras.evaluation.matching import best_f1_threshold
from focas_keras.models.mdet import detect_batch
from focas_keras.models.mdet_config import preset
from focas_keras.training.det_trainer import train_det

SMALL = {"train.augment": False, "train.batch_size": 4, "train.steps_per_epoch": 2,
         "train.epochs": 2, "train.warmup_steps": 2, "input_size": 64}


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory):
    """Shards of 224 px tiles from two synthetic fields (no validation split)."""
    root = tmp_path_factory.mktemp("det")
    write_dataset(root / "syn", images=3, size=768, seed=1, per_slide=3)
    prepare(read_dataset("synth", root / "syn"), root / "shards",
            PrepareConfig(val_fraction=0, det_tiles_per_mitosis=2, det_empty_share=0.2))
    return root / "shards"


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """64 px tiles with a validation split, for fast loop mechanics."""
    from conftest import write_tiny_icpr

    root = tmp_path_factory.mktemp("small")
    write_tiny_icpr(root / "tiny")
    prepare(read_dataset("icpr2012", root / "tiny"), root / "shards",
            PrepareConfig(tile_size=64, det_margin=8, val_slides=("A02",)))
    return root / "shards"


def _recall_on_train_tiles(model, shards, config):
    per_image = []
    for images, targets in pipeline.det_dataset(shards, "train", batch_size=8, shuffle=False):
        dets = detect_batch(model, images, config)
        for i, count in enumerate(dets["num_detections"].numpy()):
            b = dets["boxes"].numpy()[i, :count]
            g = targets["boxes"].numpy()[i][targets["box_mask"].numpy()[i]]
            per_image.append((np.c_[(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2],
                              dets["scores"].numpy()[i, :count],
                              np.c_[(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2]))
    return best_f1_threshold(per_image, 20.0)


def test_tiny_preset_learns_synthetic_mitoses(synth_shards, tmp_path):
    config = preset("tiny").override(**{"train.augment": False, "train.epochs": 12,
                                        "train.steps_per_epoch": 8, "train.batch_size": 4,
                                        "train.warmup_steps": 10})
    result = train_det(synth_shards, tmp_path / "run", config, log=lambda *_: None)
    assert result["last"]["loss_total"] < 1.0
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    threshold, counts = _recall_on_train_tiles(model, synth_shards, config)
    assert counts.recall >= 0.9, counts.as_dict()
    run = tmp_path / "run"
    for name in ("run.json", "config.json", "log.csv", "metrics.json", "best.keras"):
        assert (run / name).is_file(), name
    assert (run / "logs").is_dir() and any((run / "checkpoints").iterdir())
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 12


def test_mirrored_strategy_on_two_cpus_and_validation(small_shards, tmp_path):
    config = preset("tiny").override(**SMALL)
    result = train_det(small_shards, tmp_path / "run", config, devices=["/cpu:0", "/cpu:1"],
                       log=lambda *_: None)
    last = result["last"]
    assert np.isfinite(last["loss_total"]) and last["epoch"] == 2
    for key in ("val_loss", "val_precision", "val_recall", "val_f1", "val_best_threshold",
                "val_recall_threshold"):
        assert key in last
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,")


def test_interrupted_run_resumes_to_the_same_weights(small_shards, tmp_path):
    config = preset("tiny").override(**SMALL)
    train_det(small_shards, tmp_path / "straight", config, log=lambda *_: None)

    def interrupt_after_first_epoch(line):
        if line.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_det(small_shards, tmp_path / "resumed", config, log=interrupt_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.keras").exists()
    lines = []
    train_det(small_shards, tmp_path / "resumed", config, log=lines.append)
    assert any(line.startswith("resuming from") for line in lines)
    a = keras.saving.load_model(tmp_path / "straight" / "model.keras")
    b = keras.saving.load_model(tmp_path / "resumed" / "model.keras")
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)


def _cli(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_bad_inputs_exit_2(small_shards, tmp_path):
    code, out = _cli("train-det", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "r"),
                     "--preset", "tiny")
    assert code == 2 and "shard directory not found" in out
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(small_shards, broken)
    shard = sorted((broken / "det").glob("train-*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    code, out = _cli("train-det", "--data", str(broken), "--out", str(tmp_path / "r"),
                     "--preset", "tiny", "--set", "input_size=64")
    assert code == 2 and "sha256" in out and shard.name in out
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"kind": "mdet", "config": {}}))
    code, out = _cli("train-det", "--data", str(small_shards), "--out", str(other),
                     "--preset", "tiny", "--set", "input_size=64")
    assert code == 2 and "holds a different run" in out
    code, out = _cli("train-det", "--data", str(small_shards), "--out", str(tmp_path / "r2"),
                     "--preset", "tiny")
    assert code == 2 and "64 px tiles" in out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_with_tf_config(small_shards, tmp_path):
    ports = [_free_port(), _free_port()]
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    args = ["train-det", "--data", str(small_shards), "--out", str(tmp_path / "run"),
            "--preset", "tiny", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
            "--set", "input_size=64", "--set", "train.augment=false",
            "--precision", "mixed_bfloat16"]
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}})}
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "from focas_keras.cli import main; main()", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=500) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, err[-3000:]
    assert "epoch 1/1" in outputs[0][0]
    assert (tmp_path / "run" / "model.keras").is_file()
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["precision"] == "mixed_bfloat16"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(metrics["last"]["loss_total"])


def test_both_trainers_record_the_pixel_size_of_rescaled_shards(tmp_path, monkeypatch):
    """A run on shards prepared with --target-mpp records it (run.json's data_mpp), which
    detect, mine and export read; the training itself is stubbed out here."""
    from conftest import write_tiny_icpr

    from focas_keras.runs import run_data_mpp
    from focas_keras.models.mclass_config import preset as cls_preset
    from focas_keras.training import cls_trainer, det_trainer
    from focas_keras.training.run_dir import claim_run_dir

    write_tiny_icpr(tmp_path / "tiny")
    prepare(read_dataset("icpr2012", tmp_path / "tiny"), tmp_path / "half",
            PrepareConfig(tile_size=64, patch_size=32, val_slides=("A02",), target_mpp=0.5))

    def claim_only(spec, run_dir, devices, log):  # what run_training does first
        claim_run_dir(run_dir, spec.identity)
        return {}

    monkeypatch.setattr(det_trainer, "run_training", claim_only)
    monkeypatch.setattr(cls_trainer, "run_training", claim_only)
    det_trainer.train_det(tmp_path / "half", tmp_path / "det", preset("tiny").override(
        input_size=64))
    cls_trainer.train_cls(tmp_path / "half", tmp_path / "cls", cls_preset("tiny"))
    assert run_data_mpp(tmp_path / "det") == 0.5 and run_data_mpp(tmp_path / "cls") == 0.5
