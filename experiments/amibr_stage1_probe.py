"""Why stage 1 misses mitoses of other scanners: low scores, or no box at all?

The bundled model's candidate recall on the AMi-Br crops (``amibr_eval.py``) is 0.81-0.91
per scanner at its card's stage-1 threshold. This probe runs stage 1 alone
(:func:`focas_keras.inference.load_stage1`, the engine's ``detect_field``, as ``detect``) on the
same crops with a near-zero threshold and no per-area cap, and records for each crop the best
stage-1 score of a box within :data:`amibr_eval.RADIUS_UM` of the central figure and that
box's rank among the crop's boxes. Candidate recall at any threshold ``t`` and per-crop cap
``c`` follows: the crops whose figure has a box scoring >= ``t`` ranked within ``c``.

Usage:
    python experiments/amibr_stage1_probe.py --out experiments/results/amibr_stage1_probe \
        [--det RUN] [--per-scanner 200]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "experiments"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import amibr_eval  # noqa: E402

#: Stage-1 thresholds and per-crop caps the summary reports.
THRESHOLDS = (0.0791, 0.05, 0.03, 0.02, 0.01)
#: The floor the probe runs at (CascadeSettings needs a threshold).
FLOOR = 0.001


def probe_crop(boxes, scores, figure_xy, radius_px: float) -> tuple[float, int]:
    """(best score of a box whose centre is within ``radius_px`` of the figure, its 1-based
    rank among all boxes by score); (0.0, 0) when none is."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    scores = np.asarray(scores, np.float64).reshape(-1)
    if not len(scores):
        return 0.0, 0
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    near = np.hypot(*(centres - np.asarray(figure_xy, np.float64)).T) <= radius_px
    if not near.any():
        return 0.0, 0
    best = int(np.argmax(np.where(near, scores, -np.inf)))
    rank = 1 + int(np.sum(scores > scores[best]))
    return float(scores[best]), rank


def summarize(crops: pd.DataFrame, caps: dict) -> dict:
    """Candidate recall per scanner at each threshold, without a cap and at ``caps``
    (``{scanner: the per-crop cap detect applies}``)."""
    out = {}
    for scanner, group in crops.groupby("scanner", sort=True):
        cap = caps[scanner]
        row = {"crops": int(len(group)), "cap": int(cap),
               "no_box_at_floor": round(float((group.score <= 0).mean()), 4)}
        for t in THRESHOLDS:
            hit = group.score >= t
            row[f"recall@{t:g}"] = round(float(hit.mean()), 4)
            row[f"recall@{t:g},cap"] = round(float((hit & (group["rank"] <= cap)).mean()), 4)
        out[scanner] = row
    return out


def cut_for_recall(crops: pd.DataFrame, caps: dict, target: float) -> float:
    """The highest stage-1 threshold at which the capped candidate recall pooled over
    ``crops`` reaches ``target``: a threshold chosen on these crops' scanners only.

    Args:
        crops: probe rows (``scanner``, ``score``, ``rank``) of the scanners to choose on.
        caps: ``{scanner: per-crop cap}`` (the probe summary's ``cap``).
        target: candidate recall to reach, in (0, 1].

    Returns:
        The threshold (one of the crops' scores); :data:`FLOOR` when even that misses it.
    """
    if not 0 < target <= 1 or not len(crops):
        raise ValueError("need crops and a target in (0, 1]")
    capped = crops.score.where(crops["rank"] <= crops.scanner.map(caps), 0.0)
    needed = math.ceil(target * len(crops) - 1e-9)
    ordered = np.sort(capped.to_numpy(np.float64))[::-1]
    cut = float(ordered[needed - 1])
    return cut if cut >= FLOOR else FLOOR


def load_probe(directory) -> tuple[pd.DataFrame, dict, dict]:
    """(crops, {scanner: cap}, summary) of a probe's output directory."""
    directory = Path(directory)
    summary = json.loads((directory / "summary.json").read_text())
    crops = pd.read_csv(directory / "crops.csv", dtype={"image": str})
    caps = {name: row["cap"] for name, row in summary["scanners"].items()}
    return crops, caps, summary


def main(argv=None) -> int:
    from focas_keras import pretrained
    from focas_keras.datasets.annotations import load_image
    from focas_keras.datasets.readers.amibr import read_amibr
    from focas_keras.inference import load_stage1
    from focas_keras.inference.cascade import candidate_cap
    from focas_keras.io import sha256_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=amibr_eval.DEFAULT_DATA)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--det", type=Path, default=None, help="train-det run (default: "
                        "the bundled model's Mdet)")
    parser.add_argument("--per-scanner", type=int, default=200)
    parser.add_argument("--per-mm2", type=float, default=2000.0,
                        help="detect's cap, for the capped columns")
    args = parser.parse_args(argv)

    det = args.det or pretrained.model_dir(pretrained.DEFAULT) / "det"
    base = load_stage1(det, det_threshold=FLOOR, max_candidates_per_mm2=1e9)
    images = amibr_eval.sample(read_amibr(args.data, check_images=False).images,
                               args.per_scanner)
    figures = amibr_eval.central_first(args.data)

    rows, stages, caps = [], {}, {}
    start = time.perf_counter()
    for row in images.itertuples():
        mpp = float(row.mpp)
        if mpp not in stages:
            stages[mpp] = amibr_eval.cascade_at(base, mpp)
        stage = stages[mpp]
        image = load_image(row.image_path)
        boxes, scores = stage.stage1(image)
        radius_px = amibr_eval.RADIUS_UM / mpp
        score, rank = probe_crop(boxes, scores, figures[row.image_id][0], radius_px)
        h, w = (math.ceil(s * stage.det_scale) for s in image.shape[:2])
        caps.setdefault(row.scanner, candidate_cap(h, w, base.det_mpp, args.per_mm2))
        rows.append({"image": row.image_id, "scanner": row.scanner, "mpp": mpp,
                     "score": score, "rank": rank, "boxes": len(scores)})
    crops = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    crops.to_csv(args.out / "crops.csv", index=False, lineterminator="\n")
    summary = {"det": str(det), "det_sha256": sha256_file(det / "model.keras"),
               "floor": FLOOR, "per_scanner": args.per_scanner,
               "seconds": round(time.perf_counter() - start, 1),
               "scanners": summarize(crops, caps)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
