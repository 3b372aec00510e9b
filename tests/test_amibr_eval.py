"""experiments/amibr_eval.py: the per-crop metric, the summary, the sample and the cache
(hand-made inputs, no model)."""

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from focas_keras.errors import InputError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_modules import load_experiment  # noqa: E402
from test_readers_amibr import CS2, TUPAC, XR, write_amibr  # noqa: E402

ev = load_experiment("amibr_eval")


def dets(rows):
    return pd.DataFrame(rows, columns=["x", "y", "accepted"])


def test_radius_is_20_px_at_the_stage_pixel_size():
    assert ev.RADIUS_UM == pytest.approx(4.912)
    # At 0.23 um/px that is 21.36 crop pixels; at 0.25, 19.65.
    hit = ev.crop_metrics([(64, 64)], dets([(64 + 21.3, 64, True)]), 0.23)
    miss = ev.crop_metrics([(64, 64)], dets([(64 + 21.3, 64, True)]), 0.25)
    assert hit["hit"] and not miss["hit"] and miss["fp"] == 1


def test_crop_metrics_hand_made():
    figures = [(64, 64), (100, 30)]  # central first, a second labelled figure
    found = dets([
        (70, 60, True),    # 7.2 px from the centre: a hit
        (64, 90, False),   # rejected candidate 26 px away: neither
        (101, 32, True),   # on the second figure: not a false positive
        (10, 10, True),    # far from both: a false positive
        (66, 66, False),   # rejected, near the centre: candidate only
    ])
    out = ev.crop_metrics(figures, found, 0.2456)
    assert out["hit"] and out["candidate_hit"]
    assert out["fp"] == 1 and out["accepted"] == 3 and out["candidates"] == 5
    assert out["centre_dist_um"] == pytest.approx(math.hypot(6, 4) * 0.2456)


def test_candidate_only_and_empty():
    only = ev.crop_metrics([(64, 64)], dets([(60, 64, False), (120, 120, True)]), 0.25)
    assert not only["hit"] and only["candidate_hit"] and only["fp"] == 1
    assert only["centre_dist_um"] == pytest.approx(math.hypot(56, 56) * 0.25)
    none = ev.crop_metrics([(64, 64)], dets([]), 0.23)
    assert none == {"hit": False, "candidate_hit": False, "fp": 0, "accepted": 0,
                    "candidates": 0, "centre_dist_um": none["centre_dist_um"]}
    assert math.isnan(none["centre_dist_um"])
    with pytest.raises(ValueError):
        ev.crop_metrics([], dets([]), 0.23)


def test_summarize_per_scanner():
    crops = pd.DataFrame({
        "scanner": ["a", "a", "a", "a", "b"],
        "hit": [True, False, True, False, True],
        "candidate_hit": [True, True, True, False, True],
        "fp": [0, 2, 1, 0, 0],
        "accepted": [1, 2, 2, 0, 1]})
    out = ev.summarize(crops)
    assert out["a"] == {"crops": 4, "recall": 0.5, "candidate_recall": 0.75, "fp": 3,
                        "fp_per_crop": 0.75, "accepted_per_crop": 1.25}
    assert out["b"]["recall"] == 1.0 and out["b"]["fp_per_crop"] == 0.0
    assert out["all"]["crops"] == 5 and out["all"]["recall"] == pytest.approx(0.6)


def test_sample_every_kth_sorted_by_file():
    images = pd.DataFrame({
        "image_path": [f"/p/x_{i:02d}.png" for i in range(10, 0, -1)] + ["/p/y_1.png"],
        "scanner": ["s"] * 10 + ["t"]})
    picked = ev.sample(images, 3)
    assert list(picked.image_path) == ["/p/x_01.png", "/p/x_04.png", "/p/x_07.png",
                                       "/p/y_1.png"]
    assert len(ev.sample(images, None)) == 11
    assert ev.slug(TUPAC) == "Aperio_ScanScope_TUPAC16_TCGA_BRCA"


def test_central_first_and_cached_run(tmp_path):
    root = write_amibr(tmp_path / "amibr")
    figures = ev.central_first(root)
    np.testing.assert_array_equal(figures["MIDOG21_1"], [[64, 64], [94, 44]])
    np.testing.assert_array_equal(figures["MIDOG21_2"], [[64, 64], [34, 84]])
    out = tmp_path / "out"
    with pytest.raises(InputError, match="no model was given"):
        ev.run(root, out, cascade=None, scanners=[XR])
    # A finished chunk in the cache is scored without a model (resume).
    chunk = pd.DataFrame([
        {"image": f"MIDOG21_{i}", "scanner": XR, "dataset": "MIDOG21",
         "slide": "MIDOG21/002.tiff", "mpp": 0.23, "figures": 1, "hit": i == 1,
         "candidate_hit": True, "fp": int(i == 3), "accepted": 1, "candidates": 2,
         "centre_dist_um": 1.0} for i in (1, 2, 3)], columns=ev.CROP_COLUMNS)
    (out / "cache" / "Hamamatsu_XR").mkdir(parents=True, exist_ok=True)
    chunk.to_csv(out / "cache" / "Hamamatsu_XR" / "part_000.csv", index=False)
    summary = ev.run(root, out, cascade=None, scanners=[XR])
    assert summary["scanners"][XR]["crops"] == 3
    assert summary["scanners"][XR]["recall"] == pytest.approx(1 / 3)
    assert summary["scanners"][XR]["fp_per_crop"] == pytest.approx(1 / 3)
    assert json.loads((out / "summary.json").read_text())["scanners"][XR]["fp"] == 1
    assert len(pd.read_csv(out / "crops.csv")) == 3
    with pytest.raises(InputError, match="unknown scanner"):
        ev.run(root, out, cascade=None, scanners=["Nope"])
    # A cached chunk of other crops (another sample) is not taken for this one.
    chunk.assign(image=["MIDOG21_1", "MIDOG21_3", "MIDOG21_2"]).to_csv(
        out / "cache" / "Hamamatsu_XR" / "part_000.csv", index=False)
    with pytest.raises(InputError, match="no model was given"):
        ev.run(root, out, cascade=None, scanners=[XR, CS2])


def test_stage1_probe_best_near_box_its_rank_and_recall_per_cap():
    probe = load_experiment("amibr_stage1_probe")
    boxes = [(0, 0, 10, 10), (60, 60, 70, 70), (50, 58, 60, 68), (100, 100, 110, 110)]
    scores = [0.9, 0.04, 0.3, 0.5]
    # near the figure at (64, 64) within 20 px: boxes 1 (0.04) and 2 (0.3, centre 9 px away)
    assert probe.probe_crop(boxes, scores, (64, 64), 20.0) == (0.3, 3)
    assert probe.probe_crop(boxes, scores, (300, 300), 20.0) == (0.0, 0)
    assert probe.probe_crop(np.zeros((0, 4)), [], (64, 64), 20.0) == (0.0, 0)
    crops = pd.DataFrame({"scanner": ["a"] * 4, "score": [0.3, 0.06, 0.015, 0.0],
                          "rank": [3, 1, 2, 0]})
    row = probe.summarize(crops, {"a": 2})["a"]
    assert row["no_box_at_floor"] == 0.25
    assert row["recall@0.05"] == 0.5 and row["recall@0.05,cap"] == 0.25
    assert row["recall@0.01"] == 0.75 and row["recall@0.01,cap"] == 0.5


def test_stage1_cut_reaches_the_target_recall_on_the_given_crops_only():
    probe = load_experiment("amibr_stage1_probe")
    crops = pd.DataFrame({"scanner": ["a", "a", "a", "a", "b", "b"],
                          "score": [0.4, 0.2, 0.06, 0.03, 0.5, 0.04],
                          "rank": [1, 1, 3, 1, 1, 1]})
    caps = {"a": 2, "b": 3}
    # capped scores: a 0.4, 0.2, 0 (rank 3 > 2), 0.03; b 0.5, 0.04
    assert probe.cut_for_recall(crops, caps, 0.5) == 0.2  # 3 of 6
    assert probe.cut_for_recall(crops, caps, 4 / 6) == 0.04  # 4 of 6
    assert probe.cut_for_recall(crops, caps, 5 / 6) == 0.03
    # the sixth crop is only reachable past the cap: the floor
    assert probe.cut_for_recall(crops, caps, 1.0) == probe.FLOOR
    assert probe.cut_for_recall(crops[crops.scanner == "b"], caps, 1.0) == 0.04
    with pytest.raises(ValueError):
        probe.cut_for_recall(crops, caps, 0.0)


def test_rescore_applies_a_stricter_pair_to_the_kept_candidates(tmp_path):
    root = write_amibr(tmp_path / "amibr")
    out = tmp_path / "out"
    cache = out / "cache" / "Hamamatsu_XR"
    cache.mkdir(parents=True)
    # A floor run (stage 1 at 0.02, stage 2 at 0) of three XR crops, 0.23 um/px: 20 px at the
    # stage pixel size is 21.4 crop px. MIDOG21_1's second figure is at (94, 44).
    cands = pd.DataFrame([
        ("MIDOG21_1", 66, 64, 0.50, 0.90),   # on the centre
        ("MIDOG21_1", 70, 66, 0.30, 0.95),   # 4.5 px away: merged into the better-ranked one
        ("MIDOG21_1", 10, 10, 0.04, 0.80),   # far from every figure: an FP at low cuts
        ("MIDOG21_2", 64, 60, 0.03, 0.60),   # only a low stage-1 cut keeps it
        ("MIDOG21_3", 95, 95, 0.20, 0.70),   # 43 px away: an FP, not a hit
    ], columns=ev.CANDIDATE_COLUMNS)
    cands.to_csv(cache / "cand_000.csv", index=False)
    crops = pd.DataFrame([
        {"image": f"MIDOG21_{i}", "scanner": XR, "dataset": "MIDOG21",
         "slide": "MIDOG21/002.tiff", "mpp": 0.23, "figures": 1, "hit": False,
         "candidate_hit": False, "fp": 0, "accepted": 0, "candidates": 0,
         "centre_dist_um": float("nan")} for i in (1, 2, 3)], columns=ev.CROP_COLUMNS)
    crops.to_csv(cache / "part_000.csv", index=False)
    (out / "summary.json").write_text(json.dumps({"resolved": {"det_threshold": 0.02}}))
    ev.run(root, out, cascade=None, scanners=[XR], keep_candidates=True)
    # Scoring the cache without a model keeps the floor the run recorded.
    assert json.loads((out / "summary.json").read_text())["resolved"]["det_threshold"] == 0.02

    table, summary = ev.rescore(out, root, 0.02, 0.0, merge_px=30.0)
    by = table.set_index("image")
    assert by.loc["MIDOG21_1", "hit"] and by.loc["MIDOG21_1", "accepted"] == 2
    assert by.loc["MIDOG21_1", "fp"] == 1 and by.loc["MIDOG21_1", "candidates"] == 3
    assert by.loc["MIDOG21_2", "hit"] and not by.loc["MIDOG21_3", "hit"]
    assert summary[XR]["recall"] == pytest.approx(2 / 3)
    assert summary[XR]["fp"] == 2

    table, summary = ev.rescore(out, root, 0.05, 0.92, merge_px=30.0)
    by = table.set_index("image")
    # Stage 2 at 0.92 keeps only the 0.95 candidate of crop 1 (the 0.90 one is rejected).
    assert by.loc["MIDOG21_1", "hit"] and by.loc["MIDOG21_1", "accepted"] == 1
    assert by.loc["MIDOG21_1", "centre_dist_um"] == pytest.approx(math.hypot(6, 2) * 0.23)
    assert by.loc["MIDOG21_1", "candidates"] == 2
    assert not by.loc["MIDOG21_2", "candidate_hit"] and by.loc["MIDOG21_3", "accepted"] == 0
    assert summary[XR]["recall"] == pytest.approx(1 / 3) and summary[XR]["fp"] == 0
    assert summary[XR]["candidate_recall"] == pytest.approx(1 / 3)

    with pytest.raises(InputError, match="below the run's own"):
        ev.rescore(out, root, 0.01, 0.5, merge_px=30.0)
    (cache / "cand_000.csv").unlink()
    with pytest.raises(InputError, match="no candidates kept"):
        ev.rescore(out, root, 0.05, 0.5, merge_px=30.0)
