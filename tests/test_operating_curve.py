"""experiments/operating_curve.py: recall at a false-positive budget from kept candidates
(hand-made inputs, no model)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_modules import load_experiment  # noqa: E402
from test_joint_thresholds import _kept  # noqa: E402
from test_readers_amibr import XR, write_amibr  # noqa: E402

oc = load_experiment("operating_curve")


def _two_models(tmp_path):
    root = write_amibr(tmp_path / "amibr")
    # Model a: every figure found at 0.9, one false positive at 0.95 on crop 1.
    a = _kept(tmp_path / "a", [
        ("MIDOG21_1", 66, 64, 0.50, 0.90),
        ("MIDOG21_1", 10, 10, 0.06, 0.95),
        ("MIDOG21_2", 64, 64, 0.40, 0.90),
        ("MIDOG21_3", 64, 64, 0.30, 0.90),
    ])
    # Model b: the same candidates, its scores ranked so that the false positive is lowest.
    b = _kept(tmp_path / "b", [
        ("MIDOG21_1", 66, 64, 0.50, 0.70),
        ("MIDOG21_1", 10, 10, 0.06, 0.20),
        ("MIDOG21_2", 64, 64, 0.40, 0.60),
        ("MIDOG21_3", 64, 64, 0.30, 0.30),
    ])
    return root, a, b


def test_recall_at_budget_takes_the_best_threshold_under_the_budget(tmp_path):
    root, a, b = _two_models(tmp_path)
    [sa] = oc.jt.crop_scores(a, root, merge_px=30.0)
    [sb] = oc.jt.crop_scores(b, root, merge_px=30.0)
    assert sa["scanner"] == XR
    # a: its false positive outranks every figure, so a zero budget finds nothing and one
    # false positive per three crops finds all three (lowest threshold of that recall).
    ra = oc.recall_at_budgets(sa, 0.05, budgets=(0.0, 0.34))
    assert ra[0.0] == (0.0, None)
    assert ra[0.34][0] == pytest.approx(1.0)
    assert ra[0.34][1] == pytest.approx(0.05)
    # b: all three figures above the false positive, at no false positive.
    rb = oc.recall_at_budgets(sb, 0.05, budgets=(0.0,))
    assert rb[0.0][0] == pytest.approx(1.0)
    assert rb[0.0][1] == pytest.approx(0.25)  # lowest grid threshold above the FP
    # A stage-1 cut that drops crop 3's candidate (det 0.30 < 0.35) lowers recall.
    assert oc.recall_at_budgets(sb, 0.35, budgets=(0.0,))[0.0][0] == pytest.approx(2 / 3)
    with pytest.raises(SystemExit, match="not on the grid"):
        oc.recall_at_budgets(sb, 0.0791)


def test_cli_writes_one_row_per_model_and_cut(tmp_path, capsys):
    root, a, b = _two_models(tmp_path)
    for kept in (a, b):  # the CLI reads the merge radius from each run's summary
        (kept / "summary.json").write_text(
            '{"resolved": {"det_threshold": 0.02}, "settings": {"merge_px": 30.0}}')
    out = tmp_path / "out"
    assert oc.main(["--model", f"a={a}", "--model", f"b={b}", "--det", "0.05",
                    "--budgets", "0", "--amibr", str(root), "--out", str(out)]) == 0
    table = (out / "summary.md").read_text()
    assert f"| {XR} | 0.05 | a | 3 | 0.000 |" in table
    assert f"| {XR} | 0.05 | b | 3 | 1.000 (0.25) |" in table
    with pytest.raises(SystemExit, match="NAME=DIR"):
        oc.main(["--model", str(a)])
