"""Mined sets before and after ``mine`` ran through the inference engine (issue 25).

``mine`` used to call Mdet itself (one call per whole image, the config's fixed per-level
top-k, one NMS). Through the engine (:func:`focas_keras.inference.engine.detect_field`) it
runs stage 1 as ``detect`` does: the per-level top-k scaled with the image's area, the final
clip + NMS + cap of :func:`~focas_keras.inference.tiling.merge_candidates`, auto-tiling past
the whole-image limit. This script mines one set of fields with whichever ``focas_keras`` is
importable and dumps every mined record; ``--compare`` matches two dumps.

Usage (the "before" from a snapshot of the code before the change)::

    PYTHONPATH=/tmp/focas_src_cv23 python experiments/mine_engine_check.py mine \
        --data ../shared/data/icpr2012/images --det focas_keras/pretrained/icpr2012_cpu/det \
        --work /tmp/mine_before --dump /tmp/mine_before.json
    python experiments/mine_engine_check.py mine ... --work /tmp/mine_after \
        --dump /tmp/mine_after.json
    python experiments/mine_engine_check.py compare /tmp/mine_before.json /tmp/mine_after.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def mine(args) -> None:
    import subprocess

    import focas_keras
    from focas_keras.data import pipeline, records
    try:
        from focas_keras.training.mine import mine_hard_negatives
    except ImportError:  # the code before issue 25 moved mining
        from data_tools.mine import mine_hard_negatives

    print(f"focas_keras from {Path(focas_keras.__file__).parent}", flush=True)
    shards = Path(args.work) / "shards"
    # Prepared as recipe_cv.py prepares a fold's cls shards (native pixels; mine resizes).
    subprocess.run([sys.executable, "-m", "focas_keras.cli", "prepare", args.data,
                    "--format", "icpr2012", "--out", str(shards), "--patch-size", "112",
                    "--det-per-mitosis", "0", "--det-empty-share", "0", "--val-fraction", "0",
                    "--seed", "0", "--overwrite"], check=True)
    t0 = time.perf_counter()
    summary = mine_hard_negatives(args.det, args.data, "icpr2012", shards,
                                  keep_true_positives=True)
    seconds = time.perf_counter() - t0
    mined = [{"image": r["image_id"].decode(), "x": int(r["center"][0]),
              "y": int(r["center"][1]), "label": int(r["label"]), "score": float(r["score"])}
             for r in pipeline.read_records(shards, records.CLS, "train")
             if r["source"].decode() in ("mined", "mined_tp")]
    Path(args.dump).write_text(json.dumps({"summary": summary, "seconds": round(seconds, 1),
                                           "records": mined}, indent=1))
    print(f"{len(mined)} mined records in {seconds:.0f} s -> {args.dump}")


def compare(args) -> None:
    import numpy as np

    a, b = (json.loads(Path(p).read_text()) for p in (args.before, args.after))
    print(f"before: {len(a['records'])} records ({a['seconds']} s); "
          f"after: {len(b['records'])} records ({b['seconds']} s)")
    images = sorted({r["image"] for r in a["records"] + b["records"]})
    same = 0
    only_a, only_b = [], []
    score_diff, shift = [], []
    for image in images:
        ra = [r for r in a["records"] if r["image"] == image]
        rb = [r for r in b["records"] if r["image"] == image]
        used = set()
        for r in ra:
            best, dist = None, None
            for j, s in enumerate(rb):
                d = np.hypot(r["x"] - s["x"], r["y"] - s["y"])
                if j not in used and d <= args.tolerance and (dist is None or d < dist):
                    best, dist = j, d
            if best is None:
                only_a.append(r)
            else:
                used.add(best)
                same += 1
                score_diff.append(abs(r["score"] - rb[best]["score"]))
                shift.append(dist)
        only_b += [s for j, s in enumerate(rb) if j not in used]
    for label in (0, 1):
        na = sum(r["label"] == label for r in a["records"])
        nb = sum(r["label"] == label for r in b["records"])
        print(f"label {label}: before {na}, after {nb}")
    print(f"matched within {args.tolerance:g} px: {same}")
    for name, rest in (("only before", only_a), ("only after", only_b)):
        if rest:
            scores = [r["score"] for r in rest]
            print(f"{name}: {len(rest)} on {len({r['image'] for r in rest})} fields, "
                  f"{sum(r['label'] for r in rest)} near a mitosis, scores "
                  f"{min(scores):.4f}-{max(scores):.4f}")
    if score_diff:
        print(f"matched: largest score difference {max(score_diff):.2e}, "
              f"largest centre shift {max(shift):.2f} px")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("mine")
    m.add_argument("--data", required=True)
    m.add_argument("--det", required=True)
    m.add_argument("--work", required=True)
    m.add_argument("--dump", required=True)
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    c.add_argument("--tolerance", type=float, default=1.0)
    args = parser.parse_args(argv)
    mine(args) if args.cmd == "mine" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
