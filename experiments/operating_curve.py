"""Two Mclass models on the same held-out crops, compared without any threshold: recall at a
fixed budget of false positives per crop.

A fixed stage-2 threshold compares two models badly: each model's scores have their own
calibration, so 0.5 means something else to each. Sweeping the stage-2 threshold over
``joint_thresholds.CLS_GRID`` traces each model's (false positives per crop, recall) curve on
a held-out scanner's crops; at each budget B the table gives the highest recall among the
thresholds that keep at most B false positives per crop. Nothing is chosen on the crops: the
budgets and the stage-1 cut are fixed in advance, the comparison is of rankings.

Inputs are ``scanner_cv.py --floor`` output directories (their ``candidates/<scanner>/``) or
``amibr_eval.py --keep-candidates`` outputs, one per model; scanners present in every input
are compared.

Usage:
    python experiments/operating_curve.py \\
        --model lite0=experiments/results/scanner_cv_lite0_floor \\
        --model resnet34=experiments/results/scanner_cv_resnet34 \\
        --det 0.05 --out experiments/results/operating_curve_cs2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import amibr_eval  # noqa: E402
import joint_thresholds as jt  # noqa: E402

BUDGETS = (0.01, 0.02, 0.03, 0.05, 0.1)


def recall_at_budgets(crop_set: dict, det_threshold: float,
                      budgets=BUDGETS) -> dict[float, tuple[float, float | None]]:
    """Highest recall at each false-positive budget, at one stage-1 cut.

    Args:
        crop_set: one scanner's :func:`joint_thresholds.crop_scores` result.
        det_threshold: the stage-1 cut; must be on ``joint_thresholds.DET_GRID``.
        budgets: false positives per crop.

    Returns:
        ``{budget: (recall, stage-2 threshold)}``; the lowest such threshold where several
        give that recall; ``(0.0, None)`` where no threshold on the grid finds a figure within the budget.
    """
    hits = np.isclose(jt.DET_GRID, det_threshold)
    if not hits.any():
        raise SystemExit(f"stage-1 cut {det_threshold} is not on the grid "
                         f"{jt.DET_GRID[0]}..{jt.DET_GRID[-1]}")
    i = int(np.argmax(hits))
    recall, fp = jt.crop_rates([crop_set])
    out = {}
    for budget in budgets:
        ok = fp[i] <= budget + 1e-12
        if not ok.any():
            out[budget] = (0.0, None)
            continue
        best = float(recall[i][ok].max())
        if best == 0:
            out[budget] = (0.0, None)
            continue
        j = int(np.flatnonzero(ok & (recall[i] == best))[0])
        out[budget] = (best, float(jt.CLS_GRID[j]))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, metavar="NAME=DIR",
                        help="A model's kept candidates (repeat).")
    parser.add_argument("--det", type=float, nargs="+", default=[0.05],
                        help="Stage-1 cuts (on joint_thresholds.DET_GRID).")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--amibr", type=Path, default=amibr_eval.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=None,
                        help="Write summary.json and summary.md here.")
    args = parser.parse_args(argv)

    sets = {}
    for spec in args.model:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--model {spec!r}: expected NAME=DIR")
        found = {}
        for kept in jt.kept_dirs(Path(path)):
            merge_px = json.loads((kept / "summary.json").read_text())["settings"]["merge_px"]
            for s in jt.crop_scores(kept, args.amibr, merge_px):
                found[s["scanner"]] = s
        sets[name] = found
    common = sorted(set.intersection(*(set(v) for v in sets.values())))
    if not common:
        raise SystemExit("the models share no scanner")
    rows, summary = [], {"det": args.det, "budgets": args.budgets, "scanners": {}}
    header = ("| scanner | stage 1 | model | crops | " +
              " | ".join(f"recall at <= {b:g} FP/crop" for b in args.budgets) + " |")
    rows += [header, "|" + "---|" * 4 + "---:|" * len(args.budgets)]
    for scanner in common:
        for det in args.det:
            for name, found in sets.items():
                res = recall_at_budgets(found[scanner], det, args.budgets)
                summary["scanners"].setdefault(scanner, {}).setdefault(str(det), {})[name] = {
                    str(b): {"recall": r, "cls_threshold": t} for b, (r, t) in res.items()}
                cells = " | ".join(f"{r:.3f}" + (f" ({t:g})" if t is not None else "")
                                   for r, t in res.values())
                rows.append(f"| {scanner} | {det:g} | {name} | {found[scanner]['crops']} | "
                            f"{cells} |")
    table = "\n".join(rows)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "summary.md").write_text(
            "Recall at each budget of false positives per crop (the stage-2 threshold that "
            "reaches it in brackets).\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
