"""Pure logic of experiments/icpr2012_cv.py and experiments/ablation.py (no training)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_modules import load_experiment as _load  # noqa: E402


cv = _load("icpr2012_cv")


def test_slides_of_uses_first_three_characters():
    names = ["A03_00.jpg", "A00_08.jpg", "A00_00.jpg", "A04_07.jpg"]
    assert cv.slides_of(names) == ["A00", "A03", "A04"]


def test_folds_leave_one_slide_out_with_disjoint_validation():
    slides = ["A00", "A01", "A02", "A03", "A04"]
    folds = cv.make_folds(slides)
    assert [f["test"] for f in folds] == slides
    for f in folds:
        assert f["val"] != f["test"]
        assert f["test"] not in f["train"] and f["val"] not in f["train"]
        assert sorted(f["train"] + [f["val"], f["test"]]) == slides
    # every slide validates exactly once
    assert sorted(f["val"] for f in folds) == slides
    assert folds[0] == {"test": "A00", "val": "A01", "train": ["A02", "A03", "A04"]}
    assert folds[4]["val"] == "A00"


def test_folds_need_three_slides():
    with pytest.raises(ValueError):
        cv.make_folds(["A00", "A01"])


def test_prf_and_pooling_sum_counts_before_ratios():
    assert cv.prf(0, 0, 0) == {"tp": 0, "fp": 0, "fn": 0, "precision": 0.0, "recall": 0.0,
                               "f1": 0.0}
    folds = [{"cascade": cv.prf(8, 2, 0)}, {"cascade": cv.prf(2, 8, 10)}]
    pooled = cv.pool(folds, "cascade")
    assert (pooled["tp"], pooled["fp"], pooled["fn"]) == (10, 10, 10)
    assert pooled["precision"] == pytest.approx(0.5)
    assert pooled["recall"] == pytest.approx(0.5)
    assert pooled["f1"] == pytest.approx(0.5)


def test_format_tables_has_pooled_and_per_fold_rows():
    row = cv.prf(3, 1, 1)
    result = {"test": "A00", "val": "A01", "det_threshold": 0.4, "cls_threshold": 0.5,
              "stage1": row, "stage1_merged": row, "cascade": row, "seconds": 125.0}
    text = cv.format_tables([result])
    assert "| cascade (Mdet -> Mclass -> 30 px merge) | 3 | 1 | 1 | 0.750 | 0.750 | 0.750 |" \
        in text
    assert "| A00 | A01 | 4 | 0.400 | 0.500 | 3/1/1, 0.750" in text
    assert "2 min 05 s" in text


def test_find_nested_key():
    assert cv._find({"a": {"cls_threshold": 0.7}}, "cls_threshold") == 0.7
    assert cv._find({"a": 1}, "cls_threshold") is None


ablation = _load("ablation")


def test_ablation_variants_switch_one_part_at_a_time():
    base = ablation.variant_overrides("base_anchor", epochs=3, seed=1)
    assert base == {"backbone.cbam": False, "backbone.norm": "bn", "backbone.ws": False,
                    "head.head": "anchor", "train.epochs": 3, "train.seed": 1}
    full = ablation.variant_overrides("full", 8)
    assert (full["backbone.cbam"], full["backbone.norm"], full["backbone.ws"],
            full["head.head"]) == (True, "gn", True, "hybrid")
    assert ablation.variant_overrides("full_free", 8)["head.head"] == "free"
    assert set(ablation.TABLE1) | set(ablation.TABLE5) == set(ablation.VARIANTS)
    with pytest.raises(KeyError):
        ablation.variant_overrides("nope", 1)


def test_ablation_variants_are_valid_tiny_configs():
    from focas_keras.models.mdet_config import preset

    for name in ablation.VARIANTS:
        preset("tiny").override(**ablation.variant_overrides(name, 1)).validate()


def test_markdown_row_and_stage1_frame():
    row = ablation.markdown_row("x", {"stage1": cv.prf(1, 1, 0), "r": 0.5, "m": None},
                                keys=("stage1", "r", "m"))
    assert row == "| x | 1/1/0; P 0.500 R 1.000 F1 0.667 | 0.500 | - |"
    frame = ablation.stage1_frame({"S00_00": ([[0, 0, 10, 20], [5, 5, 7, 7]], [0.9, 0.2]),
                                   "S00_01": ([], [])})
    assert list(frame["x"]) == [5.0, 6.0] and list(frame["y"]) == [10.0, 6.0]
    assert not frame["accepted"].any() and frame["cls_score"].isna().all()


def _preds(rows):
    import pandas as pd

    cols = ["image", "x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score", "accepted"]
    frame = pd.DataFrame([{"image": r[0], "x": r[1], "y": r[2], "x1": r[1] - 5,
                           "y1": r[2] - 5, "x2": r[1] + 5, "y2": r[2] + 5, "det_score": r[3],
                           "cls_score": r[4], "accepted": False} for r in rows], columns=cols)
    return frame.astype({"image": str, "accepted": bool})


def test_select_thresholds_then_merges_within_radius():
    preds = _preds([("a", 100, 100, 0.9, 0.2), ("a", 110, 100, 0.8, 0.9),
                    ("a", 300, 300, 0.3, 0.7), ("b", 50, 50, 0.6, 0.1)])
    stage1 = cv.select(preds, "stage1", 0.5, 30.0)
    assert list(zip(stage1.image, stage1.x)) == [("a", 100), ("b", 50)]  # 110 merged into 100
    cascade = cv.select(preds, "cascade", 0.5, 30.0)
    assert list(zip(cascade.image, cascade.x)) == [("a", 110), ("a", 300)]
    assert len(cv.select(preds, "stage1", 0.5, 0.0)) == 3


def test_candidate_and_best_thresholds():
    assert cv.candidate_thresholds([0.1, 0.5, 0.5, float("nan")]) == [0.5, 0.1]
    assert len(cv.candidate_thresholds(range(1000), most=10)) == 10
    truth = {"a": __import__("numpy").array([[100.0, 100.0]]), "b": __import__("numpy")
             .zeros((0, 2))}
    preds = _preds([("a", 101, 100, 0.9, 0.9), ("a", 300, 300, 0.95, 0.1),
                    ("b", 50, 50, 0.4, 0.3)])
    t, counts = cv.best_threshold(truth, preds, "cascade", 30.0)
    assert t == 0.9 and (counts["tp"], counts["fp"], counts["fn"]) == (1, 0, 0)
    t, counts = cv.best_threshold(truth, preds, "stage1", 30.0)
    assert t == 0.9 and (counts["tp"], counts["fp"]) == (1, 1)


bundled = _load("train_bundled")


def _fake_cv(tmp_path, selected_tta_f1, final_tta_f1):
    """A finished CV's results dir: summary.json plus one OOF table per slide and rule, each
    table's single det_score naming its file (so the test sees which ones were pooled)."""
    import json

    pooled = {"cascade": {"f1": 0.30}, "cascade_tta": {"f1": selected_tta_f1},
              "cascade_final": {"f1": 0.40}, "cascade_final_tta": {"f1": final_tta_f1}}
    (tmp_path / "summary.json").write_text(json.dumps(
        {"complete": True, "folds": ["A00", "A01"], "pooled": pooled, "candidate_recall": 0.9}))
    (tmp_path / "oof").mkdir()
    for i, name in enumerate(("plain", "tta", "final_plain", "final_tta")):
        for slide in ("A00", "A01"):
            _preds([(f"{slide}_00", 10, 10, 0.1 * (i + 1), 0.5)]).to_csv(
                tmp_path / "oof" / f"{slide}_{name}.csv", index=False)
    return tmp_path


def test_bundled_thresholds_come_from_the_rule_of_the_weights_it_ships(tmp_path, monkeypatch):
    from focas_keras.evaluation import evaluate as ev

    seen = []
    monkeypatch.setattr(ev, "read_truth", lambda *a: type("T", (), {"points": {}})())
    monkeypatch.setattr(bundled.recipe_cv, "pooled_pair", lambda truths, preds: seen.append(
        sorted({round(float(p["det_score"].iloc[0]), 1) for p in preds}))
        or {"det_threshold": 0.2, "cls_threshold": 0.7, "f1": 0.5})
    results = _fake_cv(tmp_path, selected_tta_f1=0.45, final_tta_f1=0.35)
    chosen = bundled.oof_thresholds(results, selected=True)
    # selected checkpoints: TTA (0.45) beat plain (0.30), so the "tta" tables (0.2) are pooled
    assert seen[-1] == [0.2] and chosen["tta"] and chosen["cv_key"] == "cascade_tta"
    chosen = bundled.oof_thresholds(results, selected=False)
    # final weights: TTA (0.35) lost to plain (0.40), so "final_plain" (0.3)
    assert seen[-1] == [0.3] and not chosen["tta"] and chosen["cv_key"] == "cascade_final"
    assert (chosen["det_threshold"], chosen["cls_threshold"]) == (0.2, 0.7)


def test_bundled_stage1_cap_lowers_the_pair_and_the_cv_estimate_follows_it(tmp_path,
                                                                           monkeypatch):
    from focas_keras.evaluation import evaluate as ev

    used = []
    monkeypatch.setattr(ev, "read_truth", lambda *a: type("T", (), {"points": {}})())
    monkeypatch.setattr(bundled.recipe_cv, "pooled_pair", lambda truths, preds: {
        "det_threshold": 0.2, "cls_threshold": 0.7, "f1": 0.5})
    monkeypatch.setattr(bundled.recipe_cv, "score_pair", lambda truth, preds, t1, t2: (
        used.append((t1, t2)) or {"tp": 3, "fp": 1, "fn": 2}))
    results = _fake_cv(tmp_path, selected_tta_f1=0.45, final_tta_f1=0.5)
    chosen = bundled.capped_thresholds(results, 0.0479, 0.95)
    # the cut (0.0479) is under the CV's candidate floor (0.05): the floor caps stage 1
    assert (chosen["det_threshold"], chosen["cls_threshold"], chosen["tta"]) == (0.05, 0.7, True)
    assert used == [(0.05, 0.7), (0.05, 0.7)]  # each held-out slide, capped the same way
    assert chosen["cv_pooled"] == {"tp": 6, "fp": 2, "fn": 4, "precision": 0.75,
                                   "recall": 0.6, "f1": pytest.approx(12 / 18)}
    assert "0.0479, clipped to the CV's candidate floor 0.05" in chosen["chosen_on"]
    assert "capped at 0.05" in chosen["cv_rule"]
    used.clear()
    chosen = bundled.capped_thresholds(results, 0.12, 0.95)  # a cap above the floor
    assert chosen["det_threshold"] == 0.12 and used == [(0.12, 0.7), (0.12, 0.7)]
    chosen = bundled.capped_thresholds(results, 0.5, 0.95)  # a cap above the pair: no change
    assert chosen["det_threshold"] == 0.2


def test_bundled_reproduce_command_names_the_validation_slide():
    import argparse

    args = argparse.Namespace(preset="cpu", val_slide="A04",
                              results=bundled.REPO / "experiments" / "results" / "icpr2012_cv_x")
    summary = {"overrides": {"train-det": ["train.scale_jitter=0.2"], "train-cls": []}}
    command = bundled._command(args, summary, bundled.recipe_options(summary))
    assert command == ("python experiments/recipe_cv.py --preset cpu --final-ablation "
                       "--det-set train.scale_jitter=0.2 --results "
                       "experiments/results/icpr2012_cv_x && python experiments/"
                       "train_bundled.py --preset cpu --results "
                       "experiments/results/icpr2012_cv_x --val-slide A04")
    args.val_slide = ""
    assert not bundled._command(args, summary, bundled.recipe_options(summary)).endswith("A04")
    # a CV whose folds trained on 4 slides is rebuilt with --no-val
    summary["validation_slide"] = False
    assert "--det-set train.scale_jitter=0.2 --no-val --results" in bundled._command(
        args, summary, bundled.recipe_options(summary))


def test_reuse_shipped_copies_the_runs_and_refuses_another_recipe(tmp_path):
    import json

    bundle = tmp_path / "bundle"
    for kind in ("det", "cls"):
        (bundle / kind).mkdir(parents=True)
        for file in ("model.keras", "config.json", "run.json"):
            (bundle / kind / file).write_text(f"{kind}/{file}")
    (bundle / "card.json").write_text(json.dumps({"train_seconds": 600.0,
                                                  "date": "2026-12-02"}))
    none = {"train-det": [], "train-cls": []}
    mdet, mclass, seconds, date = bundled.shipped_runs(bundle, tmp_path / "work", none)
    assert (mdet / "model.keras").read_text() == "det/model.keras"
    assert (mclass / "run.json").read_text() == "cls/run.json"
    assert (seconds, date) == (600.0, "2026-12-02")
    with pytest.raises(SystemExit, match="differ from the shipped"):
        bundled.shipped_runs(bundle, tmp_path / "work",
                             {"train-det": ["train.scale_jitter=0.2"], "train-cls": []})


def test_recolour_scales_one_stain_and_leaves_the_image_otherwise():
    import numpy as np

    redetect = _load("redetect_cv")
    rng = np.random.default_rng(0)
    rgb = rng.integers(30, 250, (16, 16, 3), dtype=np.uint8)
    same = redetect.recolour(rgb, 1.0, 1.0)
    assert np.abs(same.astype(int) - rgb).max() <= 1
    # a haematoxylin-blue pixel (dark in R) gets lighter with less haematoxylin, darker with more
    blue = np.array([[[90, 80, 160]]], np.uint8)
    assert redetect.recolour(blue, 0.5, 1.0)[0, 0, 0] > 90
    assert redetect.recolour(blue, 1.5, 1.0)[0, 0, 0] < 90
    white = np.full((1, 1, 3), 255, np.uint8)  # no stain at all: unchanged by any factor
    assert (redetect.recolour(white, 0.5, 2.0) == 255).all()


def test_oof_rules_rescore_candidates():
    import numpy as np

    rules = _load("oof_rules")
    preds = _preds([("a", 10, 10, 0.81, 0.25), ("a", 50, 50, 0.2, 0.9)])
    product = rules.product_score(preds, 0.5)["cls_score"].to_numpy()
    assert np.allclose(product, [0.45, np.sqrt(0.18)])
    assert list(rules.or_score(preds, 0.5)["cls_score"]) == [1.0, 0.9]
    assert list(rules.or_score(preds, np.inf)["cls_score"]) == [0.25, 0.9]
    assert list(preds["cls_score"]) == [0.25, 0.9]  # the input is left alone
    # per-image recentring: image a's median log-odds (two candidates) is their mean
    two = _preds([("a", 10, 10, 0.5, 0.25), ("a", 50, 50, 0.5, 0.9), ("b", 9, 9, 0.5, 0.9)])
    centred = rules.centred_score(two)["cls_score"].to_numpy()
    shift = (np.log(0.25 / 0.75) + np.log(0.9 / 0.1)) / 2
    expect = 1 / (1 + np.exp(-(np.log([0.25 / 0.75, 0.9 / 0.1]) - shift)))
    assert np.allclose(centred, [*expect, 0.5])  # b alone: its own median, so 0.5


def test_recipe_cv_tables_without_a_validation_slide(tmp_path):
    recipe = bundled.recipe_cv
    row = cv.prf(3, 1, 1)
    # --no-val: the fold has no validation slide, so no val pair and no cascade_val rows
    fold = {"test": "A00", "val": None, "mitoses": 4, "candidates_found": 4, "candidates": 50,
            "cascade": row, "cascade_tta": row, "cascade_pair": [0.2, 0.6],
            "mdet_best": {}, "mclass_best": {}, "seconds": 65.0}
    summary = {"folds": ["A00"], "mitoses": 4, "candidate_recall": 1.0, "border_share": 0.05,
               "border_band_area_share": 0.06, "pooled": {"cascade": row}}
    text = recipe.format_tables(summary, [fold])
    assert "| A00 | - | 4 | 4 | 50 | 0.200, 0.600 | 3/1/1, 0.750 | 3/1/1, 0.750 | - | - | - " \
        "| - |" in text
    assert recipe._best_metrics(tmp_path) == {}
    (tmp_path / "best.json").write_text('{"score": 1.0, "metrics": {"epoch": 3}}')
    assert recipe._best_metrics(tmp_path) == {"epoch": 3}
