"""The bundled pretrained cascade: intact files, safe loading, the card's reference detections,
and `detect`/`models` using it without --det/--cls."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from focas_keras import pretrained
from focas_keras.cli import main
from focas_keras.errors import InputError
from focas_keras.io import sha256_file


def test_the_default_model_is_bundled_with_matching_checksums():
    assert pretrained.DEFAULT in pretrained.names()
    root, card = pretrained.model_dir(), pretrained.load_card()
    assert set(card["files"]) == {f"{k}/{f}" for k in ("det", "cls")
                                  for f in ("model.keras", "config.json", "run.json")}
    for relative, digest in card["files"].items():
        assert sha256_file(root / relative) == digest
    size = sum((root / r).stat().st_size for r in card["files"])
    size += pretrained.sample_field().stat().st_size
    assert size <= 40 * 2 ** 20
    pretrained.verify()
    for key in ("det_threshold", "cls_threshold", "tta"):
        assert key in card["thresholds"]


def test_a_damaged_file_is_reported(tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "pretrained"
    shutil.copytree(pretrained._root(), copy)
    monkeypatch.setattr(pretrained, "_root", lambda: copy)
    with open(copy / pretrained.DEFAULT / "cls" / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(InputError, match="sha256"):
        pretrained.verify()
    with pytest.raises(InputError, match="no bundled model 'nope'"):
        pretrained.model_dir("nope")


def test_models_load_with_safe_mode_in_a_fresh_process():
    root = pretrained.model_dir()
    code = ("import focas_keras, keras, sys\n"
            "for p in sys.argv[1:]:\n"
            "    m = keras.saving.load_model(p, safe_mode=True)\n"
            "    print(m.name, m.count_params())\n")
    out = subprocess.run([sys.executable, "-c", code, str(root / "det" / "model.keras"),
                          str(root / "cls" / "model.keras")], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[0] == "mdet" and int(out[1]) > 0 and int(out[3]) > 0


def test_reference_detections_on_the_sample_field():
    """The card records what the cascade accepts on the sample field; a fresh load must give
    the same: equal count, positions within 0.5 px, scores within 2e-3 (float32 reductions in
    another thread order can move the last digits; a threshold crossing would change the
    count and fail)."""
    from focas_keras.datasets.annotations import load_image

    card = pretrained.load_card()
    cascade = pretrained.load_cascade()
    table = cascade.run(load_image(pretrained.sample_field()))
    accepted = table[table["accepted"]]
    expected = np.asarray(card["reference"]["accepted"], np.float64).reshape(-1, 4)
    assert len(table) == card["reference"]["candidates"]
    assert len(accepted) == len(expected) > 0
    got = accepted[["x", "y", "det_score", "cls_score"]].to_numpy(np.float64)
    got = got[np.lexsort((got[:, 1], got[:, 0]))]
    expected = expected[np.lexsort((expected[:, 1], expected[:, 0]))]
    np.testing.assert_allclose(got[:, :2], expected[:, :2], atol=0.5)
    np.testing.assert_allclose(got[:, 2:], expected[:, 2:], atol=2e-3)


def test_detect_without_runs_uses_the_bundled_model(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["detect", str(pretrained.sample_field()), "--out",
                                  str(tmp_path / "out"), "--no-overlays"])
    assert result.exit_code == 0, result.output
    assert "bundled model icpr2012_cpu" in result.output
    card = pretrained.load_card()
    table = pd.read_csv(tmp_path / "out" / "detections.csv")
    assert int(table["accepted"].sum()) == len(card["reference"]["accepted"])
    settings = json.loads((tmp_path / "out" / "detect.json").read_text())
    assert settings["bundled_model"] == pretrained.DEFAULT

    listing = runner.invoke(main, ["models"])
    assert listing.exit_code == 0 and pretrained.DEFAULT in listing.output
    assert "F1" in listing.output and "ICPR 2012" in listing.output


def _card(selection, cv_extra=None):
    pooled = {"tp": 40, "fp": 40, "fn": 61, "precision": 0.5, "recall": 0.396, "f1": 0.442}
    thresholds = {"det_threshold": 0.2, "cls_threshold": 0.6, "tta": True, "oof_f1_at_pair": 0.5,
                  "cv_key": "cascade_tta",
                  "cv": {"pooled": {"cascade_tta": pooled}, "candidate_recall": 0.9,
                         **(cv_extra or {})}}
    card = pretrained.make_card("m", "cpu", 0, thresholds, "python x", 60.0, "2026-12-03",
                                selection=selection)
    card["files"] = {}
    return card


def test_a_card_under_another_threshold_rule_says_so_and_reports_that_rule_s_estimate():
    card = _card(None)
    assert "all 101 mitoses" in card["thresholds"]["chosen_on"]
    pooled = {"tp": 50, "fp": 30, "fn": 51, "precision": 0.625, "recall": 0.495, "f1": 0.552}
    rule = pretrained.make_card(
        "m", "cpu", 0, {"det_threshold": 0.1, "cls_threshold": 0.7, "tta": True,
                        "oof_f1_at_pair": 0.6, "cv_key": "cascade_tta",
                        "cv": {"pooled": {"cascade_tta": {"f1": 0.1}}, "candidate_recall": 0.9},
                        "chosen_on": "ICPR and the other scanners", "cv_rule": "the same rule",
                        "cv_pooled": pooled},
        "python x", 60.0, "2026-12-07")
    rule["files"] = {}
    assert rule["thresholds"]["chosen_on"] == "ICPR and the other scanners"
    assert rule["cv_estimate"]["protocol"].endswith("a 4th validating, the same rule")
    assert rule["cv_estimate"]["pooled"]["f1"] == 0.552
    text = pretrained.card_markdown(rule)
    assert "chosen on ICPR and the other scanners" in text and "**F1 0.552**" in text


def test_the_card_says_which_weights_ship_and_how_they_were_chosen():
    final = _card(None)
    assert "selection" not in final
    assert "all 15 fields with no validation split" in final["recipe"]
    assert "final weights (as shipped)" in final["cv_estimate"]["protocol"]
    assert "trained on 3 slides with a 4th validating" in final["cv_estimate"]["protocol"]
    assert final["overrides"] == {"train-det": [], "train-cls": []}
    no_val = _card(None, {"validation_slide": False})  # a recipe_cv.py --no-val CV
    assert "trained on the other 4 slides (no validation slide)" in (
        no_val["cv_estimate"]["protocol"])
    assert "trained on the other 4 slides" in pretrained.card_markdown(no_val)
    assert "not this model (all 5 slides)" in pretrained.card_markdown(final)
    selected = _card({"val_slide": "A04", "det_epoch": 7, "cls_epoch": 5})
    assert selected["selection"] == {"val_slide": "A04", "det_epoch": 7, "cls_epoch": 5}
    assert "slide A04's fields validating" in selected["recipe"]
    assert "(Mdet epoch 7, Mclass epoch 5)" in selected["recipe"]
    assert "checkpoints selected on each fold's validation slide (as shipped)" in (
        selected["cv_estimate"]["protocol"])
    assert "not this model (4 slides, A04 validating)" in pretrained.card_markdown(selected)
    assert selected["cv_estimate"]["pooled"]["f1"] == 0.442
