"""Threshold choice on whole validation fields, on a hand-made candidate table."""

import numpy as np
import pandas as pd
import pytest

from focas_keras.evaluation.calibrate import calibrate_cascade, calibrate_stage1, merged

TRUTH = {"a": np.array([[10.0, 10.0], [200.0, 200.0]]), "b": np.zeros((0, 2))}
ROWS = [  # x, y, det_score, cls_score
    (11, 10, 0.9, 0.95),    # mitosis 1
    (15, 10, 0.8, 0.90),    # the same cell again: merged away
    (300, 300, 0.85, 0.1),  # a look-alike stage 1 likes and stage 2 rejects
    (201, 200, 0.3, 0.8),   # mitosis 2, found with a low stage-1 score
    (500, 500, 0.2, 0.7),
    (600, 600, 0.1, 0.2),
]


def _table():
    frame = pd.DataFrame(ROWS, columns=["x", "y", "det_score", "cls_score"]).assign(image="a")
    for key in ("x1", "y1"):
        frame[key] = frame[key[0]] - 10
    for key in ("x2", "y2"):
        frame[key] = frame[key[0]] + 10
    return frame.assign(accepted=False)


def test_merge_keeps_the_best_ranked_point_of_each_cell():
    kept = merged(_table(), "det_score", 30.0)
    assert kept["x"].tolist() == [11, 300, 201, 500, 600] and kept["accepted"].all()
    assert len(merged(_table(), "det_score", 0.0)) == 6


def test_stage1_threshold_is_its_best_f1_cut():
    result = calibrate_stage1(TRUTH, _table(), 20.0, 30.0)
    # >= 0.3: both mitoses and the look-alike: P 2/3, R 1, F1 0.8 (the best cut).
    assert result["det_threshold"] == pytest.approx(0.3)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 0)
    assert result["f1"] == pytest.approx(0.8)


def test_cascade_pair_rejects_the_look_alike_and_keeps_recall():
    result = calibrate_cascade(TRUTH, _table(), 20.0, 30.0, min_det_threshold=0.05)
    assert result["cls_threshold"] == pytest.approx(0.8)
    assert result["det_threshold"] <= 0.3          # ties keep the lowest stage-1 cut
    assert result["det_threshold"] == pytest.approx(0.05)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 0, 0)


def test_nothing_found_gives_closed_thresholds():
    table = _table().iloc[[2, 5]]
    assert calibrate_stage1(TRUTH, table)["det_threshold"] == 1.0
    result = calibrate_cascade(TRUTH, table)
    assert result["det_threshold"] == result["cls_threshold"] == 1.0
    assert result["f1"] == 0.0 and result["fn"] == 2


def test_cli_uses_only_the_images_detect_processed(tmp_path):
    import json

    from click.testing import CliRunner

    from focas_keras.cli import main

    out = tmp_path / "val_detections"
    out.mkdir()
    columns = ["image", "x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score", "accepted"]
    _table()[columns].to_csv(out / "detections.csv", index=False)
    pd.DataFrame({"image": ["a"], "accepted": [0]}).to_csv(out / "counts.csv", index=False)
    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y\na,10,10\na,200,200\nunseen,50,50\n")
    result = CliRunner().invoke(main, ["calibrate", "--truth", str(truth), "--pred",
                                       str(out / "detections.csv"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["images"] == 1 and data["cascade"]["fn"] == 0
    assert data["cascade"]["cls_threshold"] == pytest.approx(0.8)
    assert data["stage1"]["det_threshold"] == pytest.approx(0.3)
    text = CliRunner().invoke(main, ["calibrate", "--truth", str(truth), "--pred",
                                     str(out / "detections.csv")]).output
    assert "--det-threshold 0.1000 --cls-threshold 0.8000" in text
