"""experiments/joint_thresholds.py: the crop-side rates and the constrained choice of a pair
(hand-made inputs, no model)."""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_modules import load_experiment  # noqa: E402
from test_readers_amibr import XR, write_amibr  # noqa: E402

jt = load_experiment("joint_thresholds")


def _kept(tmp_path, cands, floor=0.02):
    """A scanner_cv --floor candidates directory of XR's three crops (0.23 um/px)."""
    kept = tmp_path / "kept"
    (kept / "cache" / "Hamamatsu_XR").mkdir(parents=True)
    pd.DataFrame(cands, columns=["image", "x", "y", "det_score", "cls_score"]).to_csv(
        kept / "cache" / "Hamamatsu_XR" / "cand_000.csv", index=False)
    pd.DataFrame({"image": [f"MIDOG21_{i}" for i in (1, 2, 3)], "scanner": XR,
                  "mpp": 0.23}).to_csv(kept / "crops.csv", index=False)
    (kept / "summary.json").write_text(json.dumps({"resolved": {"det_threshold": floor}}))
    return kept


def test_crop_scores_and_rates_follow_the_cascade(tmp_path):
    root = write_amibr(tmp_path / "amibr")
    kept = _kept(tmp_path, [
        ("MIDOG21_1", 66, 64, 0.50, 0.90),   # on the centre
        ("MIDOG21_1", 70, 66, 0.30, 0.95),   # merged with it; the better Mclass score wins
        ("MIDOG21_1", 10, 10, 0.06, 0.80),   # far from every figure
        ("MIDOG21_2", 64, 60, 0.03, 0.60),   # under the grid's lowest stage-1 cut
        ("MIDOG21_3", 64, 70, 0.20, 0.40),
    ])
    [s] = jt.crop_scores(kept, root, merge_px=30.0)
    assert s["scanner"] == XR and s["crops"] == 3
    i05 = list(jt.DET_GRID).index(0.05)
    i25 = list(jt.DET_GRID).index(0.25)
    np.testing.assert_allclose(s["hit"][i05], [0.95, -1.0, 0.40])
    np.testing.assert_allclose(s["hit"][i25], [0.95, -1.0, -1.0])
    np.testing.assert_allclose(s["fp"][i05], [0.80])
    assert len(s["fp"][i25]) == 0
    recall, fp = jt.crop_rates([s])
    j35 = list(jt.CLS_GRID).index(0.35)
    j85 = list(jt.CLS_GRID).index(0.85)
    j96 = list(jt.CLS_GRID).index(0.96)
    assert recall[i05, j35] == pytest.approx(2 / 3) and fp[i05, j35] == pytest.approx(1 / 3)
    assert recall[i05, j85] == pytest.approx(1 / 3) and fp[i05, j85] == 0
    assert recall[i05, j96] == 0
    # Pooling two sets weighs every crop once.
    recall2, _ = jt.crop_rates([s, {**s, "hit": np.full_like(s["hit"], 0.99)}])
    assert recall2[i05, j35] == pytest.approx((2 + 3) / 6)
    with pytest.raises(SystemExit, match="above the grid"):
        jt.crop_scores(_kept(tmp_path / "b", [], floor=0.1), root, 30.0)


def test_choose_best_icpr_f1_among_pairs_that_keep_the_crops_recall():
    shape = (3, 4)
    icpr = np.zeros(shape + (3,), np.int64)
    icpr[..., 0], icpr[..., 2] = 5, 5          # F1 0.5 everywhere ...
    icpr[2, 3] = (9, 0, 1)                      # ... except the best ICPR pair
    icpr[1, 1] = (8, 1, 2)                      # second best
    icpr[0, 1] = (8, 1, 2)                      # tied with it, at a lower stage-1 cut
    recall = np.full(shape, 0.9)
    recall[2, 3] = 0.5                          # the best ICPR pair loses the other scanners
    fp = np.zeros(shape)
    assert jt.choose(icpr, recall, fp, 0.8, 0.1) == (0, 1)
    assert jt.choose(icpr, recall, fp, 0.4, 0.1) == (2, 3)
    fp[0, 1] = 0.5                              # too many false positives there
    assert jt.choose(icpr, recall, fp, 0.8, 0.1) == (1, 1)
    # Nothing feasible: the highest crop recall, then fewer false positives.
    recall[:] = 0.3
    recall[1, 2], recall[2, 0] = 0.6, 0.6
    fp[2, 0] = 0.05
    assert jt.choose(icpr, recall, fp, 0.8, 0.1) == (1, 2)


def test_icpr_counts_equal_the_cascade_at_every_grid_pair():
    rng = np.random.default_rng(3)
    truth = {"A00_01": np.array([[100.0, 100.0], [400.0, 300.0]]),
             "A00_02": np.array([[50.0, 60.0]])}
    rows = []
    for image, gt in truth.items():
        for x, y in gt:  # a few candidates near each mitosis, some near each other
            for _ in range(3):
                rows.append((image, x + rng.normal(0, 8), y + rng.normal(0, 8),
                             rng.uniform(0.05, 0.9), rng.uniform(0.3, 1.0)))
        for _ in range(6):
            rows.append((image, rng.uniform(0, 500), rng.uniform(0, 500),
                         rng.uniform(0.05, 0.6), rng.uniform(0, 1)))
    preds = pd.DataFrame(rows, columns=["image", "x", "y", "det_score", "cls_score"])
    counts = jt.icpr_counts(truth, preds)
    for i in range(0, len(jt.DET_GRID), 5):
        for j in range(0, len(jt.CLS_GRID), 4):
            r = jt.rc.score_pair(truth, preds, float(jt.DET_GRID[i]), float(jt.CLS_GRID[j]))
            assert tuple(counts[i, j]) == (r["tp"], r["fp"], r["fn"]), (i, j)
    assert jt.f1_of(np.array([2, 1, 1])) == pytest.approx(4 / 6)
    assert jt.f1_of(np.array([0, 0, 0])) == 0
