"""Re-detects each held-out slide of a finished recipe CV under other inference settings.

No retraining: each fold's runs (``<work>/fold_<slide>/{mdet,mclass}``, final weights, Mclass
TTA) detect their held-out slide again with another stage-1 candidate threshold
(``--det-threshold``) and/or with the slide shown at another scale (``--zoom`` z: ``detect
--mpp 0.2456*z``, so objects look z times larger to both stages). It then reports what
``recipe_cv.py`` reports for the bundled model's rule: candidate recall (a candidate within
20 px) and the pooled F1 with each slide's (stage-1, stage-2) pair chosen on the other folds'
pooled predictions. Predictions are cached in ``--out`` (``<slide>.csv``); a rerun only scores.

Usage:
    FOCAS_SRC=/tmp/focas_src python experiments/redetect_cv.py --work /tmp/focas_cv_full \
        --det-threshold 0.02 --out /tmp/redetect_002
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import icpr2012_cv as base  # noqa: E402
import recipe_cv as rc  # noqa: E402

SLIDES = ("A00", "A01", "A02", "A03", "A04")
ICPR_MPP = 0.2456


def candidate_recall(truth: dict, preds) -> tuple[int, int]:
    """(mitoses with a candidate within 20 px, mitoses)."""
    found = total = 0
    for image, points in truth.items():
        rows = preds[preds["image"] == image]
        xs, ys = rows["x"].to_numpy(), rows["y"].to_numpy()
        for x, y in np.asarray(points, np.float64).reshape(-1, 2):
            total += 1
            found += bool((np.hypot(xs - x, ys - y) <= rc.RADIUS_PX).any())
    return found, total


def main(argv=None) -> int:
    from focas_keras.evaluation import evaluate as ev

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="recipe_cv.py's --work.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--det-threshold", type=float, default=0.05)
    parser.add_argument("--zoom", type=float, default=1.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = base.cli_env()
    truths, preds = {}, {}
    for slide in SLIDES:
        fold = args.work / f"fold_{slide}"
        if not (fold / "mclass" / "model.keras").exists():
            continue
        target = args.out / f"{slide}.csv"
        if not target.exists():
            out = args.out / f"detect_{slide}"
            base._cli(["detect", fold / "test", "--det", fold / "mdet", "--cls",
                       fold / "mclass", "--which", "model", "--tta", "--out", out,
                       "--det-threshold", args.det_threshold, "--cls-threshold", 0,
                       "--mpp", round(ICPR_MPP * args.zoom, 6), "--no-overlays",
                       "--overwrite"], args.out / "detect.log", env)
            ev.read_predictions(out / "detections.csv").to_csv(target, index=False)
        truths[slide] = ev.read_truth(fold / "test", "icpr2012").points
        preds[slide] = ev.read_predictions(target)
    rows, totals = {}, np.zeros(3, int)
    found = mitoses = 0
    for slide in preds:
        others = [s for s in preds if s != slide]
        pair = rc.pooled_pair([truths[s] for s in others], [preds[s] for s in others])
        r = rc.score_pair(truths[slide], preds[slide], pair["det_threshold"],
                          pair["cls_threshold"])
        f, n = candidate_recall(truths[slide], preds[slide])
        found, mitoses = found + f, mitoses + n
        totals += [r["tp"], r["fp"], r["fn"]]
        rows[slide] = {"pair": [pair["det_threshold"], pair["cls_threshold"]], **r,
                       "with_candidate": f, "mitoses": n, "candidates": len(preds[slide])}
    tp, fp, fn = (int(v) for v in totals)
    result = {"work": str(args.work), "det_threshold": args.det_threshold, "zoom": args.zoom,
              "candidate_recall": found / mitoses if mitoses else 0.0,
              "candidates_found": found, "mitoses": mitoses,
              "pooled": {"tp": tp, "fp": fp, "fn": fn,
                         "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0},
              "folds": rows}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "folds"}))
    for slide, row in rows.items():
        print(f"  {slide}: {row['with_candidate']}/{row['mitoses']} with a candidate, "
              f"{row['candidates']} candidates; pair {row['pair'][0]:.3f}, "
              f"{row['pair'][1]:.3f}: {row['tp']}/{row['fp']}/{row['fn']}, F1 {row['f1']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
