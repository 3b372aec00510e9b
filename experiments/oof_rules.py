"""Other acceptance rules, scored on a finished recipe CV's out-of-fold predictions only.

No model runs: every held-out candidate of ``<results>/oof/<slide>_<kind>.csv`` already carries
both scores. Each rule replaces Mclass's score by another per-candidate score, and then the
recipe's own protocol decides: for each held-out slide, the best-F1 (stage-1, stage-2) pair
(and the rule's own parameter, from a fixed grid) on the pooled predictions of the OTHER
folds; the counts are pooled over the five slides. Also printed, as a diagnostic: the pair
chosen on each slide itself.

Rules:
    cls      Mclass's probability (what ``detect`` does; the baseline).
    product  cls^a * det^(1 - a), a in {0.75, 0.5}: both stages' evidence in one score.
    or       a candidate with det >= t3 is accepted whatever Mclass says (t3 from the grid
             0.3..0.7, or never): stage 1 overrules stage 2 where it is sure.
    centred  Mclass's log-odds minus their median over the candidates of the same field,
             back through the sigmoid: a per-field recalibration (``detect`` could do it
             field by field) for slides whose stain moves every score.
    fixed    Mclass's threshold fixed at 0.5 (a probability's natural cut, chosen on nothing);
             only the stage-1 threshold comes from the other folds. For a classifier whose
             best pooled stage-2 threshold sits near 1 and does not transfer between slides.

A CV still running is read as far as it goes: only slides with an out-of-fold table count.

Usage:
    python experiments/oof_rules.py --results experiments/results/icpr2012_cv_scale \
        --kind final_tta
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import recipe_cv as rc  # noqa: E402

SLIDES = ("A00", "A01", "A02", "A03", "A04")
OR_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, np.inf)


def product_score(preds, a: float):
    """cls^a * det^(1 - a) as the new ``cls_score``."""
    cls = preds["cls_score"].clip(lower=1e-6)
    det = preds["det_score"].clip(lower=1e-6)
    return preds.assign(cls_score=cls ** a * det ** (1.0 - a))


def or_score(preds, t3: float):
    """``cls_score`` 1 where det >= t3 (accepted at any stage-2 threshold), else unchanged."""
    return preds.assign(cls_score=np.where(preds["det_score"] >= t3, 1.0, preds["cls_score"]))


def centred_score(preds):
    """``cls_score`` recentred per image: sigmoid(logit(cls) - median over that image's
    candidates of logit(cls))."""
    cls = preds["cls_score"].clip(lower=1e-6, upper=1.0 - 1e-6)
    logit = np.log(cls / (1.0 - cls))
    median = logit.groupby(preds["image"]).transform("median")
    return preds.assign(cls_score=1.0 / (1.0 + np.exp(-(logit - median))))


def fixed_score(preds, cls_threshold: float):
    """Rows with Mclass >= ``cls_threshold`` only, each with ``cls_score`` 1: every stage-2
    threshold then accepts exactly them, and only the stage-1 cut is left to choose."""
    return preds[preds["cls_score"] >= cls_threshold].assign(cls_score=1.0)


def cross_fold(truths: dict, variants: dict) -> dict:
    """Pooled counts: per held-out slide, the (parameter, pair) of best F1 on the other
    slides' pooled ``variants[param][slide]`` tables, applied to that slide."""
    totals, own, chosen = np.zeros(3, int), np.zeros(3, int), {}
    for slide in truths:
        others = [s for s in truths if s != slide]
        best = None
        for param, tables in variants.items():
            pair = rc.pooled_pair([truths[s] for s in others], [tables[s] for s in others])
            if best is None or pair["f1"] > best[1]["f1"]:
                best = (param, pair)
        param, pair = best
        r = rc.score_pair(truths[slide], variants[param][slide], pair["det_threshold"],
                          pair["cls_threshold"])
        totals += [r["tp"], r["fp"], r["fn"]]
        chosen[slide] = param
    for slide in truths:  # diagnostic: the first variant's pair chosen on the slide itself
        first = next(iter(variants.values()))
        o = rc.pooled_pair([truths[slide]], [first[slide]])
        own += [o["tp"], o["fp"], o["fn"]]

    def f1(c):
        return float(2 * c[0] / (2 * c[0] + c[1] + c[2])) if c.sum() else 0.0

    return {"tp": int(totals[0]), "fp": int(totals[1]), "fn": int(totals[2]),
            "f1": f1(totals), "chosen": chosen, "diagnostic_own_pair_f1": f1(own)}


def main(argv=None) -> int:
    import pandas as pd

    from focas_keras.evaluation import evaluate as ev

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--kind", default="final_tta",
                        choices=("plain", "tta", "final_plain", "final_tta"))
    parser.add_argument("--data", type=Path, default=rc.DEFAULT_DATA / "images")
    args = parser.parse_args(argv)
    points = ev.read_truth(args.data, "icpr2012").points
    slides = [s for s in SLIDES if (args.results / "oof" / f"{s}_{args.kind}.csv").exists()]
    if len(slides) < 2:
        parser.error(f"{args.results / 'oof'}: fewer than two slides have a {args.kind} table")
    truths = {s: {k: v for k, v in points.items() if k.startswith(s)} for s in slides}
    preds = {s: pd.read_csv(args.results / "oof" / f"{s}_{args.kind}.csv") for s in slides}
    rules = {
        "cls": {None: preds},
        "product a=0.75": {0.75: {s: product_score(p, 0.75) for s, p in preds.items()}},
        "product a=0.5": {0.5: {s: product_score(p, 0.5) for s, p in preds.items()}},
        "or (t3 from the other folds)": {t: {s: or_score(p, t) for s, p in preds.items()}
                                         for t in OR_GRID},
        "centred per field": {None: {s: centred_score(p) for s, p in preds.items()}},
        "fixed stage-2 0.5": {0.5: {s: fixed_score(p, 0.5) for s, p in preds.items()}},
    }
    out = {}
    for name, variants in rules.items():
        out[name] = cross_fold(truths, variants)
        r = out[name]
        print(f"{name}: {r['tp']}/{r['fp']}/{r['fn']}, F1 {r['f1']:.3f} (diagnostic own pair "
              f"{r['diagnostic_own_pair_f1']:.3f}); chosen {r['chosen']}", flush=True)
    print(json.dumps({"results": str(args.results), "kind": args.kind, "slides": slides,
                      "f1": {k: round(v["f1"], 3) for k, v in out.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
