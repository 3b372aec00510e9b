"""Threshold choice on whole validation fields, on a hand-made candidate table."""

import json

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


def _val_dir(tmp_path, detect_json=None):
    out = tmp_path / "val_detections"
    out.mkdir()
    columns = ["image", "x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score", "accepted"]
    _table()[columns].to_csv(out / "detections.csv", index=False)
    pd.DataFrame({"image": ["a", "b"], "accepted": [0, 0]}).to_csv(out / "counts.csv",
                                                                  index=False)
    if detect_json is not None:
        (out / "detect.json").write_text(json.dumps(detect_json))
    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y\na,10,10\na,200,200\nb,,\nunseen,50,50\n")
    return truth, out / "detections.csv"


def test_calibrate_write_saves_the_pair_and_what_it_was_chosen_on(tmp_path):
    from click.testing import CliRunner

    from focas_keras.cli import main
    from focas_keras.evaluation.calibrate import read_thresholds

    runs = {"det": "/runs/mdet", "cls": "/runs/mclass"}
    truth, pred = _val_dir(tmp_path, {"runs": runs, "settings": {"tta": True, "mpp": 0.2456},
                                      "resolved": {"det_threshold": 0.05,
                                                   "cls_threshold": 0.0}})
    target = tmp_path / "cal" / "thresholds.json"
    result = CliRunner().invoke(main, ["calibrate", "--truth", str(truth), "--pred", str(pred),
                                       "--merge-px", "25", "--radius-px", "18", "--write",
                                       str(target)])
    assert result.exit_code == 0, result.output
    assert f"--thresholds {target}" in result.output
    saved = json.loads(target.read_text())
    assert saved["det_threshold"] == pytest.approx(0.1)  # the lowest candidate's score
    assert saved["cls_threshold"] == pytest.approx(0.8)
    assert (saved["merge_px"], saved["tta"], saved["kind"]) == (25.0, True,
                                                                "focas-keras thresholds")
    assert saved["validation"]["tp"] == 2 and saved["validation"]["fp"] == 0
    assert saved["stage1_alone"]["det_threshold"] == pytest.approx(0.3)
    chosen = saved["chosen_on"]
    assert (chosen["images"], chosen["mitoses"], chosen["radius_px"]) == (["a", "b"], 2, 18.0)
    assert (chosen["truth"], chosen["pred"], chosen["format"]) == (str(truth), str(pred), None)
    assert chosen["detect"]["runs"] == runs and chosen["detect"]["det_threshold"] == 0.05
    assert not list(target.parent.glob("*.tmp"))  # written aside, renamed
    back = read_thresholds(target)
    assert (back["det_threshold"], back["cls_threshold"], back["merge_px"]) == (
        saved["det_threshold"], saved["cls_threshold"], 25.0)
    (pred.parent / "detect.json").unlink()
    as_json = json.loads(CliRunner().invoke(main, [
        "calibrate", "--truth", str(truth), "--pred", str(pred), "--json", "--write",
        str(tmp_path / "t2.json")]).output)
    assert as_json["written"] == str(tmp_path / "t2.json")
    assert json.loads((tmp_path / "t2.json").read_text())["tta"] is None  # no detect.json


@pytest.mark.parametrize("text, message", [
    ("{not json", "bad.json:1: not a thresholds file (invalid JSON"),
    ("[0.1, 0.5]", "bad.json: not a thresholds file (expected a JSON object"),
    ('{"det_threshold": 0.1}', "bad.json: not a thresholds file (no cls_threshold"),
    ('{"det_threshold": 1.5, "cls_threshold": 0.5}', "det_threshold must be a number in [0, 1]"),
    ('{"det_threshold": 0.1, "cls_threshold": true}', "cls_threshold must be a number"),
    ('{"det_threshold": 0.1, "cls_threshold": 0.5, "merge_px": -1}', "merge_px must be"),
    ('{"det_threshold": 0.1, "cls_threshold": 0.5, "tta": "yes"}', "tta must be true, false"),
])
def test_read_thresholds_refuses_malformed_files(tmp_path, text, message):
    from focas_keras.errors import InputError
    from focas_keras.evaluation.calibrate import read_thresholds

    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        read_thresholds(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_read_thresholds_hand_written_and_missing(tmp_path):
    from focas_keras.errors import InputError
    from focas_keras.evaluation.calibrate import read_thresholds

    path = tmp_path / "t.json"
    path.write_text('{"det_threshold": 0, "cls_threshold": 1, "note": "by hand"}')
    data = read_thresholds(path)
    assert (data["det_threshold"], data["cls_threshold"], data["merge_px"], data["tta"],
            data["note"]) == (0.0, 1.0, None, None, "by hand")
    with pytest.raises(InputError, match="thresholds file not found"):
        read_thresholds(tmp_path / "none.json")
