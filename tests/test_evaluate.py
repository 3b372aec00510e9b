"""Evaluation library: reading truth/predictions, both matching rules, the sweep, the plot."""

from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from focas_keras.errors import InputError
from focas_keras.evaluation.evaluate import (
    PREDICTION_COLUMNS, Truth, evaluate, format_table, radius_from, read_predictions,
    read_truth, sweep, truth_mpp)
from focas_keras.evaluation.plots import pr_curve_png

CENTROIDS = Path(__file__).resolve().parents[2] / "shared/data/icpr2012/centroids.csv"
HEADER = ",".join(PREDICTION_COLUMNS)


def preds(rows):
    """A predictions frame from (image, x, y, score[, accepted]) tuples (det = cls = score)."""
    records = []
    for row in rows:
        image, x, y, s = row[:4]
        accepted = row[4] if len(row) > 4 else True
        records.append({"image": image, "x": float(x), "y": float(y), "x1": x - 10.0,
                        "y1": y - 10.0, "x2": x + 10.0, "y2": y + 10.0, "det_score": float(s),
                        "cls_score": float(s), "accepted": accepted})
    return pd.DataFrame(records, columns=list(PREDICTION_COLUMNS))


def write(path, text):
    path.write_text(text)
    return path


def counts(result):
    return result["tp"], result["fp"], result["fn"]


def test_two_predictions_near_one_gt_one_tp_one_fp():
    truth = {"a": [[100, 100]]}
    result = evaluate(truth, preds([("a", 105, 100, 0.9), ("a", 95, 100, 0.8)]))
    assert counts(result) == (1, 1, 0)
    assert result["precision"] == 0.5 and result["recall"] == 1.0


def test_ties_in_score_resolve_in_file_order():
    truth = {"a": [[0, 0], [30, 0]]}
    a, b = ("a", 10, 0, 0.5), ("a", -5, 0, 0.5)  # a: 10 / 20 px from the GTs, b: 5 / 35 px
    # a first takes its nearest GT (0,0); b then has none within 20 px
    assert counts(evaluate(truth, preds([a, b]))) == (1, 1, 1)
    # b first takes (0,0); a then takes (30,0) at exactly 20 px
    assert counts(evaluate(truth, preds([b, a]))) == (2, 0, 0)
    # a higher score beats file order
    assert counts(evaluate(truth, preds([a, b[:3] + (0.6,)]))) == (2, 0, 0)
    assert sweep(truth, preds([a, b]), 20.0)["best"]["tp"] == 1


def test_exactly_radius_counts_for_one_to_one_but_not_nearest():
    truth = {"a": [[0, 0]]}
    p = preds([("a", 20, 0, 0.9)])
    assert counts(evaluate(truth, p, radius_px=20.0)) == (1, 0, 0)
    assert counts(evaluate(truth, p, radius_px=20.0, matching="nearest")) == (0, 1, 1)
    assert counts(evaluate(truth, preds([("a", 19.99, 0, 0.9)]), matching="nearest")) == (1, 0, 0)


def test_nearest_lets_one_prediction_serve_two_gts():
    truth = {"a": [[0, 0], [20, 0]]}
    p = preds([("a", 10, 0, 0.9), ("a", 200, 200, 0.8)])
    assert counts(evaluate(truth, p, matching="nearest")) == (2, 1, 0)
    assert counts(evaluate(truth, p, matching="one_to_one")) == (1, 1, 1)
    assert "published" in evaluate(truth, p, matching="nearest")["rule"]


def test_accepted_only_and_threshold_selection():
    truth = {"a": [[0, 0], [100, 0]]}
    p = preds([("a", 0, 0, 0.9, True), ("a", 100, 0, 0.4, False), ("a", 300, 0, 0.6, True)])
    assert counts(evaluate(truth, p)) == (1, 1, 1)
    assert counts(evaluate(truth, p, accepted_only=False)) == (2, 1, 0)
    assert counts(evaluate(truth, p, threshold=0.5)) == (1, 1, 1)
    assert counts(evaluate(truth, p, threshold=0.4)) == (2, 1, 0)
    p.loc[0, "det_score"] = 0.1
    assert counts(evaluate(truth, p, threshold=0.5, score="det")) == (0, 1, 2)


def test_unknown_image_is_an_error_and_missing_image_counts_fn():
    truth = {"a": [[0, 0]], "b": [[5, 5], [50, 50]]}
    with pytest.raises(InputError, match="not in the ground truth: x1, x2"):
        evaluate(truth, preds([("a", 0, 0, 0.9), ("x2", 0, 0, 0.9), ("x1", 0, 0, 0.9)]))
    result = evaluate(truth, preds([("a", 0, 0, 0.9)]))
    assert counts(result) == (1, 0, 2)
    assert [r["image"] for r in result["per_image"]] == ["a", "b"]
    assert counts(result["per_image"][1]) == (0, 0, 2)


def test_empty_predictions_give_zero_f1():
    truth = {"a": [[0, 0]]}
    for matching in ("one_to_one", "nearest"):
        result = evaluate(truth, preds([]), matching=matching)
        assert counts(result) == (0, 0, 1) and result["f1"] == 0.0
    result = sweep(truth, preds([]), 20.0)
    assert result["thresholds"] == [] and result["best"]["threshold"] is None
    assert result["best"]["fn"] == 1


def test_per_image_sums_to_pooled_and_table():
    rng = np.random.default_rng(1)
    truth = {f"img{k}": rng.uniform(0, 300, (k + 1, 2)) for k in range(4)}
    p = preds([(f"img{rng.integers(4)}", *rng.uniform(0, 300, 2), rng.uniform())
               for _ in range(30)])
    for matching in ("one_to_one", "nearest"):
        result = evaluate(truth, p, radius_px=40, matching=matching, accepted_only=False)
        for key in ("tp", "fp", "fn"):
            assert sum(r[key] for r in result["per_image"]) == result[key]
        table = format_table(result)
        assert table.count("\n") == 4 + len(truth) and "img3" in table
        assert table.splitlines()[-1].split()[1:4] == [str(result[k]) for k in ("tp", "fp", "fn")]


def test_sweep_equals_brute_force_and_best_threshold():
    rng = np.random.default_rng(0)
    truth = {f"i{k}": rng.uniform(0, 200, (rng.integers(0, 6), 2)) for k in range(6)}
    rows = []
    for image, gt in truth.items():
        rows += [(image, *(g + rng.normal(0, 8, 2)), round(rng.uniform(), 1)) for g in gt]
        rows += [(image, *rng.uniform(0, 200, 2), round(rng.uniform(), 1)) for _ in range(5)]
    p = preds(rows)  # scores rounded to 0.1: many ties
    result = sweep(truth, p, 20.0)
    assert result["thresholds"] == sorted(set(p.cls_score), reverse=True)
    for k, t in enumerate(result["thresholds"]):
        brute = evaluate(truth, p, 20.0, threshold=t)
        assert (brute["precision"], brute["recall"], brute["f1"]) == (
            result["precision"][k], result["recall"][k], result["f1"][k])
    best_f1 = max(evaluate(truth, p, 20.0, threshold=t)["f1"] for t in result["thresholds"])
    best = result["best"]
    assert best["f1"] == best_f1
    assert best["threshold"] == max(t for t, f in zip(result["thresholds"], result["f1"])
                                    if f == best_f1)
    assert counts(best) == counts(evaluate(truth, p, 20.0, threshold=best["threshold"]))


def test_sweep_best_hand_made():
    truth = {"a": [[0, 0], [100, 0]]}
    p = preds([("a", 0, 0, 0.9), ("a", 500, 0, 0.8), ("a", 100, 0, 0.7), ("a", 600, 0, 0.1)])
    result = sweep(truth, p, 20.0)
    assert result["thresholds"] == [0.9, 0.8, 0.7, 0.1]
    assert result["recall"] == [0.5, 0.5, 1.0, 1.0]
    assert result["best"]["threshold"] == 0.7
    assert counts(result["best"]) == (2, 1, 0)


def test_radius_from():
    assert radius_from() == 20.0
    assert radius_from(radius_px=15) == 15.0
    assert radius_from(radius_um=5.0) == pytest.approx(20.358, abs=1e-3)
    assert radius_from(radius_um=5.0, mpp=0.25) == 20.0
    assert radius_from(radius_um=5.0, mpp=None) == pytest.approx(20.358, abs=1e-3)
    with pytest.raises(InputError, match="not both"):
        radius_from(radius_px=20, radius_um=5)
    with pytest.raises(InputError, match="positive"):
        radius_from(radius_px=0)


def test_read_truth_centroid_csv(tmp_path):
    path = write(tmp_path / "gt.csv", "image,x,y,extra\na,1,2,z\na,3.5,4,\nb,,,\nc,7,8,\n")
    truth = read_truth(path)
    assert list(truth.points) == ["a", "b", "c"]
    assert truth.points["a"].tolist() == [[1, 2], [3.5, 4]]
    assert truth.points["b"].shape == (0, 2)
    assert truth.mpp == {"a": None, "b": None, "c": None} and truth_mpp(truth) is None


@pytest.mark.parametrize("text, message", [
    ("image,x,y\na,1,2\nb,oops,3\n", r"gt\.csv:3: x is not a number"),
    ("image,x,y\na,1,2\n,1,2\n", r"gt\.csv:3: blank image id"),
    ("image,x\na,1\n", r"gt\.csv:1: missing column\(s\) y"),
    ("", r"gt\.csv:1: empty file"),
    ("image,x,y\na,1,2,9\n", r"gt\.csv:2: more cells"),
])
def test_read_truth_bad_csv(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_truth(write(tmp_path / "gt.csv", text))


def test_read_truth_missing_and_bad_format(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_truth(tmp_path / "nope.csv")
    with pytest.raises(InputError):
        read_truth(tmp_path, fmt="no-such-format")


def test_read_truth_dataset_keeps_images_without_mitoses(tiny_icpr):
    root, boxes = tiny_icpr
    truth = read_truth(root, fmt="icpr2012")
    assert sorted(truth.points) == sorted(boxes)
    for image, image_boxes in boxes.items():
        assert len(truth.points[image]) == len(image_boxes)
    assert truth_mpp(truth) == pytest.approx(0.2456)
    t2 = Truth(truth.points, {**truth.mpp, "A00_00": 0.5})
    with pytest.raises(InputError, match="different pixel sizes"):
        truth_mpp(t2)


def test_read_predictions(tmp_path):
    path = write(tmp_path / "det.csv", HEADER + ",note\n"
                 "a,1,2,0,0,4,4,0.5,0.7,True,x\nb,3,4,0,0,4,4,0.1,,false,\na,5,6,0,0,9,9,1,0.2,1,\n")
    frame = read_predictions(path)
    assert list(frame.columns) == list(PREDICTION_COLUMNS)
    assert frame.accepted.tolist() == [True, False, True]
    assert frame.accepted.dtype == bool and frame.x.dtype == np.float64
    assert np.isnan(frame.cls_score[1])
    empty = read_predictions(write(tmp_path / "empty.csv", HEADER + "\n"))
    assert len(empty) == 0 and list(empty.columns) == list(PREDICTION_COLUMNS)
    assert evaluate({"a": [[0, 0]]}, empty)["f1"] == 0.0


@pytest.mark.parametrize("text, message", [
    ("image,x,y,accepted\na,1,2,True\n", r"det\.csv:1: missing column\(s\) x1, y1, x2, y2, "
                                         r"det_score, cls_score"),
    (HEADER + "\na,1,2,0,0,4,4,0.5,0.7,True\na,1,2,0,0,4,4,high,0.7,True\n",
     r"det\.csv:3: det_score is not a number: 'high'"),
    (HEADER + "\na,,2,0,0,4,4,0.5,0.7,True\n", r"det\.csv:2: x is not a number"),
    (HEADER + "\na,1,2,0,0,4,4,0.5,0.7,maybe\n", r"det\.csv:2: accepted is not True/False"),
])
def test_read_predictions_errors(tmp_path, text, message):
    with pytest.raises(InputError, match=message):
        read_predictions(write(tmp_path / "det.csv", text))


def test_read_predictions_missing_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_predictions(tmp_path / "det.csv")


def test_pr_curve_png(tmp_path):
    path = tmp_path / "plots" / "pr.png"
    curves = {"cls": ([0.1, 0.5, 0.8, 0.9], [1.0, 0.9, 0.6, 0.3]), "det": ([0.3], [0.4]),
              "empty": ([], [])}
    pr_curve_png(curves, path, best_points={"cls": (0.8, 0.6)})
    image = cv2.imread(str(path))
    assert image is not None and image.size > 0 and image.shape[2] == 3
    assert (image != 255).any()
    assert [p.name for p in path.parent.iterdir()] == ["pr.png"]


def test_real_icpr_centroids_as_truth():
    if not CENTROIDS.is_file():
        pytest.skip(f"{CENTROIDS} not found")
    truth = read_truth(CENTROIDS)
    assert len(truth.points) == 15
    assert sum(len(v) for v in truth.points.values()) == 101
    first = next(iter(truth.points))
    p = preds([(first, *xy, 0.9) for xy in truth.points[first]])
    result = evaluate(truth, p)
    assert result["tp"] == len(truth.points[first]) and result["fp"] == 0


def _detect_dir(root, rows, processed):
    """A detect-like output directory: detections.csv of ``rows`` and counts.csv listing
    ``processed``."""
    root.mkdir()
    preds(rows).to_csv(root / "detections.csv", index=False)
    pd.DataFrame({"image": processed, "accepted": 0}).to_csv(root / "counts.csv", index=False)
    return root / "detections.csv"


def test_only_processed_images_count_in_evaluate_and_calibrate(tmp_path):
    """One rule (truth_for_predictions) for both commands: an image detect never ran on is
    not a missed mitosis."""
    import json

    from click.testing import CliRunner

    from focas_keras.cli import main
    from focas_keras.evaluation.evaluate import processed_images, truth_for_predictions

    truth = write(tmp_path / "truth.csv", "image,x,y\na,10,10\nb,50,50\nunseen,5,5\n"
                                          "unseen,80,80\n")
    pred = _detect_dir(tmp_path / "out", [("a", 11, 10, 0.9), ("b", 300, 300, 0.8)], ["a", "b"])
    assert processed_images(pred) == ["a", "b"]
    kept = truth_for_predictions(read_truth(truth), pred)
    assert sorted(kept.points) == ["a", "b"] and sorted(kept.mpp) == ["a", "b"]
    result = CliRunner().invoke(main, ["evaluate", "--truth", str(truth), "--pred", str(pred),
                                       "--json"])
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output)
    assert (scored["n_images"], counts(scored)) == (2, (1, 1, 1))  # not FN 3 ("unseen")
    calibrated = json.loads(CliRunner().invoke(main, [
        "calibrate", "--truth", str(truth), "--pred", str(pred), "--json"]).output)
    assert calibrated["images"] == 2 and calibrated["cascade"]["fn"] == 1
    # Without counts.csv every truth image counts (hand-made predictions).
    (tmp_path / "out" / "counts.csv").unlink()
    assert processed_images(pred) is None
    scored = json.loads(CliRunner().invoke(main, ["evaluate", "--truth", str(truth), "--pred",
                                                  str(pred), "--json"]).output)
    assert (scored["n_images"], counts(scored)) == (3, (1, 1, 3))
    for command in ("evaluate", "calibrate"):
        help_text = " ".join(CliRunner().invoke(main, [command, "--help"]).output.split())
        assert "Only the images listed in counts.csv beside --pred" in help_text


def test_counts_naming_no_truth_image_is_a_user_error(tmp_path):
    from focas_keras.evaluation.evaluate import truth_for_predictions

    truth = read_truth(write(tmp_path / "truth.csv", "image,x,y\na,10,10\n"))
    pred = _detect_dir(tmp_path / "out", [], ["zz"])
    with pytest.raises(InputError, match="counts.csv: none of its 1 processed image") as err:
        truth_for_predictions(truth, pred)
    assert "'zz' is not" in str(err.value)
    (tmp_path / "out" / "counts.csv").write_text("image,accepted\n,0\n")
    with pytest.raises(InputError, match="counts.csv:2: blank image id"):
        truth_for_predictions(truth, pred)
