"""Stage 1 with other scanners' mitoses: Mdet trained with AMi-Br mosaic tiles, judged on the
held-out ICPR 2012 slides of a finished recipe CV, beside that CV's own Mdet.

For each fold of a ``recipe_cv.py --no-val`` work directory (``fold_<slide>/{shards_det,
mdet,test}``) this trains a second Mdet on the same shards, with the same config and seed,
plus ``--extra-share`` of its tiles drawn from AMi-Br mosaic tiles (``prepare --format amibr
--target-mpp 0.4912 --det-small-images mosaic``: 3,720 mitoses of four other scanners; none
overlaps ICPR 2012). The steps per epoch stay those of the ICPR shards, so both arms cost the
same; only the data differ. The CV's Mdet is the control (trained by the same training code:
``det_trainer``/``loop``/``pipeline`` have changed only in file names and the validation path
since that CV's snapshot, and ``--no-val`` runs do not validate).

Both arms' final weights then run stage 1 alone on the held-out slide's whole fields, as
``detect`` runs it (input 0.2456 um/px, Mdet at 0.4912, the cascade's candidate cap), with a
permissive threshold (``--min-det``), and each is scored:

- candidate recall at the bundled model's stage-1 threshold (0.05, ``--det-threshold``): the
  share of mitoses with a candidate within 20 px, and the candidates it costs per field;
- recall at the control's candidate count: the new arm's top-N candidates of the fold, N the
  control's count at 0.05 (more candidates alone raise recall; this removes that);
- recall at fixed candidate budgets per field (``--budgets``; each fold's best-scored
  ``budget x fields`` candidates, both arms), pooled over the folds.

Nothing is chosen on the held-out slides: the share, recipe and thresholds are fixed before.
Each fold's trained model and scores are cached (``<work>/fold_<slide>/mdet_extra``,
``<results>/fold_<slide>.json``); a rerun goes on where it stopped.

Usage:
    FOCAS_SRC=/tmp/focas_src_det23 python experiments/det_extra_cv.py \
        --control-work /tmp/focas_cv23_s0 --amibr-det /tmp/focas_det23/shards_amibr_det \
        --work /tmp/focas_det23/s0 --results experiments/results/det_extra_cv_s0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SLIDES = ("A00", "A01", "A02", "A03", "A04")
ICPR_MPP, DET_MPP, RADIUS_PX = 0.2456, 0.4912, 20.0
ARMS = ("control", "extra")


# ----------------------------------------------------------------------------- pure logic


def recall_at(truth: dict, table, threshold: float) -> dict:
    """Candidates with ``det_score >= threshold``: mitoses with one within 20 px, candidates."""
    from focas_keras.evaluation.fields import candidate_recall

    kept = table[table["det_score"] >= threshold]
    found, total = candidate_recall(truth, kept, RADIUS_PX)
    return {"found": found, "mitoses": total, "candidates": int(len(kept))}


def recall_top(truth: dict, table, count: int) -> dict:
    """The ``count`` best-scored candidates of the table (all images together), scored as
    :func:`recall_at`."""
    from focas_keras.evaluation.fields import candidate_recall

    kept = table.sort_values("det_score", ascending=False, kind="stable").head(int(count))
    found, total = candidate_recall(truth, kept, RADIUS_PX)
    return {"found": found, "mitoses": total, "candidates": int(len(kept))}


def fold_scores(truth: dict, tables: dict, threshold: float, fields: int) -> dict:
    """Per arm: recall and candidates at ``threshold``; for ``extra`` also at the control's
    candidate count."""
    scores = {arm: recall_at(truth, tables[arm], threshold) for arm in ARMS}
    scores["extra_at_control_count"] = recall_top(truth, tables["extra"],
                                                 scores["control"]["candidates"])
    scores["fields"] = fields
    return scores


def budget_curve(folds: list[tuple], budgets) -> dict:
    """Pooled recall of each arm at each budget of candidates per field.

    Args:
        folds: per fold ``(truth, {arm: table}, fields)``.
        budgets: candidates per field.

    Returns:
        ``{arm: {budget: {"found", "mitoses", "recall"}}}`` (budget keys as strings).
    """
    out = {}
    for arm in ARMS:
        out[arm] = {}
        for budget in budgets:
            scored = [recall_top(truth, tables[arm], budget * fields)
                      for truth, tables, fields in folds]
            found = sum(r["found"] for r in scored)
            mitoses = sum(r["mitoses"] for r in scored)
            out[arm][f"{budget:g}"] = {"found": found, "mitoses": mitoses,
                                       "recall": found / mitoses if mitoses else 0.0}
    return out


def pooled(folds: list[dict]) -> dict:
    """Sums of :func:`fold_scores` over folds, with recall and candidates per field."""
    out = {}
    fields = sum(f["fields"] for f in folds)
    for key in ARMS + ("extra_at_control_count",):
        found = sum(f[key]["found"] for f in folds)
        mitoses = sum(f[key]["mitoses"] for f in folds)
        candidates = sum(f[key]["candidates"] for f in folds)
        out[key] = {"found": found, "mitoses": mitoses, "candidates": candidates,
                    "recall": found / mitoses if mitoses else 0.0,
                    "candidates_per_field": candidates / fields if fields else 0.0}
    out["fields"] = fields
    return out


# ----------------------------------------------------------------------------- running


def _train_extra(fold_dir: Path, run_dir: Path, amibr: Path, share: float) -> float:
    from focas_keras.models.mdet_config import MdetConfig
    from focas_keras.training.det_trainer import train_det

    control = json.loads((fold_dir / "mdet" / "config.json").read_text())
    config = MdetConfig.from_dict(control).override(**{"train.extra_share": share})
    start = time.perf_counter()
    train_det(fold_dir / "shards_det", run_dir, config, extra_data=[amibr],
              log=lambda line: print(f"  {line}", flush=True))
    return time.perf_counter() - start


def _train_seconds(run_dir: Path) -> float:
    import csv

    with open(run_dir / "log.csv", newline="") as handle:
        return float(sum(float(row["seconds"]) for row in csv.DictReader(handle)))


def _candidates(run_dir: Path, test: Path, min_det: float):
    import cv2

    from focas_keras.evaluation.fields import candidate_table
    from focas_keras.inference.cascade import Cascade, CascadeSettings
    from focas_keras.runs import load_mdet_run

    model, config = load_mdet_run(run_dir)
    settings = CascadeSettings(mpp=ICPR_MPP, det_mpp=DET_MPP, det_threshold=min_det)
    cascade = Cascade(model, config, None, None, settings)
    per_image = {}
    for path in sorted(test.glob("*.jpg")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        boxes, scores = cascade.stage1(image)
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
        per_image[path.stem] = (centres, scores, None)
    return candidate_table(per_image)


def run_fold(slide: str, args) -> dict:
    from focas_keras.evaluation import evaluate as ev

    cached = args.results / f"fold_{slide}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    fold_dir = args.control_work / f"fold_{slide}"
    run_dir = args.work / f"fold_{slide}" / "mdet_extra"
    print(f"[{slide}] training Mdet with AMi-Br mosaics (share {args.extra_share})", flush=True)
    _train_extra(fold_dir, run_dir, args.amibr_det, args.extra_share)
    test = fold_dir / "test"
    truth = ev.read_truth(test, "icpr2012").points
    tables = {}
    for arm, run in (("control", fold_dir / "mdet"), ("extra", run_dir)):
        tables[arm] = _candidates(run, test, args.min_det)
        tables[arm].to_csv(args.results / f"fold_{slide}_{arm}_candidates.csv", index=False)
    result = fold_scores(truth, tables, args.det_threshold, len(list(test.glob("*.jpg"))))
    result.update({"test": slide, "train_seconds": {
        "control": _train_seconds(fold_dir / "mdet"), "extra": _train_seconds(run_dir)}})
    args.results.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=1) + "\n")
    return result


def report(summary: dict) -> str:
    """Markdown table of a summary."""
    lines = [f"folds: {', '.join(summary['folds'])}; stage-1 threshold "
             f"{summary['det_threshold']}; extra share {summary['extra_share']}", "",
             "| held out | mitoses | control: found / candidates | AMi-Br mosaics: found / "
             "candidates | mosaics at control's count: found |", "|---|---:|---:|---:|---:|"]
    for f in summary["per_fold"]:
        lines.append(f"| {f['test']} | {f['control']['mitoses']} | {f['control']['found']} / "
                     f"{f['control']['candidates']} | {f['extra']['found']} / "
                     f"{f['extra']['candidates']} | {f['extra_at_control_count']['found']} |")
    p = summary["pooled"]
    lines.append(f"| pooled | {p['control']['mitoses']} | {p['control']['found']} / "
                 f"{p['control']['candidates']} ({p['control']['recall']:.3f}) | "
                 f"{p['extra']['found']} / {p['extra']['candidates']} "
                 f"({p['extra']['recall']:.3f}) | {p['extra_at_control_count']['found']} "
                 f"({p['extra_at_control_count']['recall']:.3f}) |")
    curve = summary.get("budgets")
    if curve:
        budgets = list(curve["control"])
        lines += ["", "| candidates per field | " + " | ".join(budgets) + " |",
                  "|---|" + "---:|" * len(budgets)]
        for arm, name in (("control", "control"), ("extra", "AMi-Br mosaics")):
            lines.append(f"| {name} | " + " | ".join(
                f"{curve[arm][b]['found']}/{curve[arm][b]['mitoses']} "
                f"({curve[arm][b]['recall']:.3f})" for b in budgets) + " |")
    return "\n".join(lines) + "\n"


def _tables(slide: str, args):
    import pandas as pd

    from focas_keras.evaluation import evaluate as ev

    test = args.control_work / f"fold_{slide}" / "test"
    tables = {arm: pd.read_csv(args.results / f"fold_{slide}_{arm}_candidates.csv")
              for arm in ARMS}
    for table in tables.values():
        table["image"] = table["image"].astype(str)
    return ev.read_truth(test, "icpr2012").points, tables, len(list(test.glob("*.jpg")))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control-work", type=Path, required=True,
                        help="A finished recipe_cv.py --no-val work directory.")
    parser.add_argument("--amibr-det", type=Path, required=True,
                        help="AMi-Br mosaic det shards (prepare --det-small-images mosaic).")
    parser.add_argument("--work", type=Path, required=True, help="Where the new Mdets go.")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--extra-share", type=float, default=0.3)
    parser.add_argument("--det-threshold", type=float, default=0.05,
                        help="Stage-1 threshold scored (the bundled model's).")
    parser.add_argument("--min-det", type=float, default=0.02,
                        help="Threshold of the candidates kept in the tables.")
    parser.add_argument("--slides", default=",".join(SLIDES))
    parser.add_argument("--budgets", default="50,100,200,300,400",
                        help="Candidates per field at which recall is compared.")
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    folds = [run_fold(s, args) for s in args.slides.split(",") if s]
    summary = {"folds": [f["test"] for f in folds], "det_threshold": args.det_threshold,
               "extra_share": args.extra_share, "min_det": args.min_det,
               "control_work": str(args.control_work), "amibr_det": str(args.amibr_det),
               "per_fold": folds, "pooled": pooled(folds),
               "budgets": budget_curve([_tables(f["test"], args) for f in folds],
                                       [float(b) for b in args.budgets.split(",") if b])}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.results / "summary.md").write_text(report(summary))
    print(report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
