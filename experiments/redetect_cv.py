"""Re-detects each held-out slide of a finished recipe CV under other inference settings.

No retraining: each fold's runs (``<work>/fold_<slide>/{mdet,mclass}``, final weights, Mclass
TTA) detect their held-out slide again with another stage-1 candidate threshold
(``--det-threshold``) and/or with the slide shown at another scale (``--zoom`` z: ``detect
--mpp 0.2456*z``, so objects look z times larger to both stages) and/or recoloured
(``--stain H,E``: each field's haematoxylin and eosin concentrations, from colour
deconvolution, multiplied by H and E, as another lab's staining might differ). It then
reports what ``recipe_cv.py`` reports for the bundled model's rule: candidate recall (a
candidate within 20 px) and the pooled F1 with each slide's (stage-1, stage-2) pair chosen on
the other folds' pooled predictions -- the re-detected ones, or with ``--pairs-from CV_RESULTS``
the CV's original final-weights + TTA predictions (thresholds fixed before the fields
changed, as in use) -- plus, as a diagnostic, the pair chosen on each slide itself.
Predictions are cached in ``--out`` (``<slide>.csv``); a rerun only scores.

Usage:
    FOCAS_SRC=/tmp/focas_src python experiments/redetect_cv.py --work /tmp/focas_cv_full \
        --det-threshold 0.02 --out /tmp/redetect_002
    python experiments/redetect_cv.py --work /tmp/focas_cv_scale --stain 0.8,1.2 \
        --pairs-from experiments/results/icpr2012_cv_scale --out /tmp/redetect_h08
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


def recolour(rgb: np.ndarray, hematoxylin: float, eosin: float) -> np.ndarray:
    """uint8 (H, W, 3) RGB with its H and E concentrations (colour deconvolution, Ruifrok &
    Johnston) scaled by ``hematoxylin`` and ``eosin``; (1, 1) returns the image up to rounding."""
    from focas_keras.data import augment

    hed = augment.rgb_to_hed(rgb.astype(np.float32) / 255.0).numpy()
    hed[..., 0] *= hematoxylin
    hed[..., 1] *= eosin
    return np.clip(augment.hed_to_rgb(hed).numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8)


def recoloured_fields(src: Path, out: Path, stain: tuple[float, float]) -> Path:
    """``src``'s images recoloured by :func:`recolour` as PNG (lossless) in ``out``."""
    import cv2

    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.suffix.lower() in base.IMAGE_SUFFIXES and not (out / f"{path.stem}.png").exists():
            rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
            cv2.imwrite(str(out / f"{path.stem}.png"),
                        cv2.cvtColor(recolour(rgb, *stain), cv2.COLOR_RGB2BGR))
    return out


def main(argv=None) -> int:
    from focas_keras.evaluation import evaluate as ev

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="recipe_cv.py's --work.")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--det-threshold", type=float, default=0.05)
    parser.add_argument("--zoom", type=float, default=1.0)
    parser.add_argument("--stain", default="1,1", help="H,E concentration factors.")
    parser.add_argument("--pairs-from", type=Path, default=None,
                        help="recipe_cv.py's --results: choose the pairs on its oof/ final + TTA "
                             "predictions instead of the re-detected ones.")
    args = parser.parse_args(argv)
    stain = tuple(float(v) for v in args.stain.split(","))
    if len(stain) != 2 or min(stain) <= 0:
        parser.error(f"--stain: two positive factors H,E, not {args.stain!r}")
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
            fields = fold / "test"
            if stain != (1.0, 1.0):
                fields = recoloured_fields(fields, args.out / f"fields_{slide}", stain)
            base._cli(["detect", fields, "--det", fold / "mdet", "--cls",
                       fold / "mclass", "--which", "model", "--tta", "--out", out,
                       "--det-threshold", args.det_threshold, "--cls-threshold", 0,
                       "--mpp", round(ICPR_MPP * args.zoom, 6), "--no-overlays",
                       "--overwrite"], args.out / "detect.log", env)
            ev.read_predictions(out / "detections.csv").to_csv(target, index=False)
        truths[slide] = ev.read_truth(fold / "test", "icpr2012").points
        preds[slide] = ev.read_predictions(target)
    import pandas as pd

    pairs_on = preds if args.pairs_from is None else {
        s: pd.read_csv(args.pairs_from / "oof" / f"{s}_final_tta.csv") for s in preds}
    rows, totals, own_totals = {}, np.zeros(3, int), np.zeros(3, int)
    found = mitoses = 0
    for slide in preds:
        others = [s for s in preds if s != slide]
        pair = rc.pooled_pair([truths[s] for s in others], [pairs_on[s] for s in others])
        own = rc.pooled_pair([truths[slide]], [preds[slide]])
        own_totals += [own["tp"], own["fp"], own["fn"]]
        r = rc.score_pair(truths[slide], preds[slide], pair["det_threshold"],
                          pair["cls_threshold"])
        f, n = candidate_recall(truths[slide], preds[slide])
        found, mitoses = found + f, mitoses + n
        totals += [r["tp"], r["fp"], r["fn"]]
        rows[slide] = {"pair": [pair["det_threshold"], pair["cls_threshold"]], **r,
                       "with_candidate": f, "mitoses": n, "candidates": len(preds[slide])}
    tp, fp, fn = (int(v) for v in totals)
    otp, ofp, ofn = (int(v) for v in own_totals)
    result = {"work": str(args.work), "det_threshold": args.det_threshold, "zoom": args.zoom,
              "stain": list(stain),
              "pairs_from": str(args.pairs_from) if args.pairs_from else "re-detected",
              "diagnostic_own_pair": {"tp": otp, "fp": ofp, "fn": ofn,
                                      "f1": 2 * otp / (2 * otp + ofp + ofn)
                                      if otp + ofp + ofn else 0.0},
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
