"""Stage 1 at half resolution vs full resolution on the 15 real ICPR 2012 HPFs.

The speed lever of issue 5: Mdet trained and run at 0.4912 um/px (the HPF shrunk 2x, about a
quarter of the FLOPs) while Mclass keeps its full-resolution 112 px crops. This checks whether
accuracy holds, fold by fold, on the leave-one-slide-out folds of ``icpr2012_cv.py``.

It reuses the work directory of ``icpr2012_cv.py`` (``--work``): each fold's training,
validation and held-out slides, its full-resolution Mdet (``mdet``) and its Mclass
(``mclass``). Per fold it adds:

    prepare --target-mpp 0.4912 (same slides, same validation slide) -> train-det (same
    preset, epochs and seed; anchors halved to fit 13-34 px mitoses) = ``mdet_half``

Then for each detector (full, half) with the SAME Mclass: ``detect`` on the validation slide
and on the held-out slide with permissive thresholds (stage 1 at 0.05, every candidate
scored by Mclass), ``calibrate`` on the validation slide (best-F1 threshold pair, and stage 1's
own cut), and those thresholds applied to the held-out slide. Nothing is tuned on the
held-out slide. Counts are pooled over all 101 mitoses.

Mclass was trained on hard negatives mined with the full-resolution Mdet, which, if anything,
favours the full-resolution row.

Usage (after ``icpr2012_cv.py`` has run):
    python experiments/half_res_stage1.py --work /tmp/focas_cv \
        --results experiments/results/half_res_stage1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from icpr2012_cv import (DEFAULT_DATA, IMAGE_SUFFIXES, _cli, cli_env,  # noqa: E402
                         make_folds, pool, select, slides_of)

HALF_MPP = 0.4912
VARIANTS = ("full", "half")
KEEP = ("tp", "fp", "fn", "precision", "recall", "f1")


def stage1_ceiling(truth, preds, radius: float = 20.0) -> int:
    """Mitoses with at least one candidate centre within ``radius`` px (stage 2's ceiling)."""
    from focas_keras.evaluation.fields import candidate_recall

    return candidate_recall(truth.points, preds, radius)[0]


def run_fold(fold: dict, args, work: Path, results: Path) -> dict:
    path = results / f"fold_{fold['test']}.json"
    if path.exists():
        return json.loads(path.read_text())
    from focas_keras.evaluation import evaluate as ev

    fold_dir = work / f"fold_{fold['test']}"
    for needed in ("src", "val", "test", "mdet", "mclass"):
        if not (fold_dir / needed).exists():
            raise SystemExit(f"{fold_dir / needed} missing: run icpr2012_cv.py first")
    log = results / f"fold_{fold['test']}.log"
    env = cli_env()
    seconds = {}
    shards, half = fold_dir / "shards_half", fold_dir / "mdet_half"

    def step(name, done, args_):  # runs a CLI step unless its output exists; times it
        if not done.exists():
            t0 = time.perf_counter()
            _cli(args_, log, env)
            seconds[name] = round(time.perf_counter() - t0, 1)

    step("prepare_half", shards / "manifest.json",
         ["prepare", fold_dir / "src", "--format", "icpr2012", "--out", shards, "--overwrite",
          "--val-slides", fold["val"], "--target-mpp", HALF_MPP, "--seed", args.seed])
    step("train_det_half", half / "model.keras",
         ["train-det", "--data", shards, "--out", half, "--preset", args.preset,
          "--seed", args.seed, "--epochs", args.det_epochs,
          "--set", f"head.base_sizes={json.dumps(args.half_base_sizes)}"])
    result = {"test": fold["test"], "val": fold["val"], "train": fold["train"],
              "half_mpp": HALF_MPP, "half_base_sizes": args.half_base_sizes}
    truth = {name: ev.read_truth(fold_dir / name, "icpr2012") for name in ("val", "test")}
    for variant, det in (("full", fold_dir / "mdet"), ("half", half)):
        preds = {}
        for name in ("val", "test"):
            out = fold_dir / f"det_{variant}_{name}"
            step(f"detect_{variant}_{name}", out / "detections.csv",
                 ["detect", fold_dir / name, "--det", det, "--cls", fold_dir / "mclass",
                  "--out", out, "--det-threshold", 0.05, "--cls-threshold", 0.0,
                  "--no-overlays", "--overwrite"])
            preds[name] = ev.read_predictions(out / "detections.csv")
        cal = json.loads(_cli(["calibrate", "--truth", fold_dir / "val", "--format", "icpr2012",
                               "--pred", fold_dir / f"det_{variant}_val" / "detections.csv",
                               "--json"], log, env))
        # The pair applied to the permissive table equals rerunning detect with it: NMS and
        # merge survivors are prefix-stable (see focas_keras.evaluation.calibrate).
        pair, test = cal["cascade"], preds["test"]
        candidates = test[test["det_score"] >= pair["det_threshold"]]
        cascade = ev.evaluate(truth["test"], select(candidates, "cascade", pair["cls_threshold"],
                                                    args.merge_px),
                              20.0, score="cls", accepted_only=False)
        t1 = cal["stage1"]["det_threshold"]
        stage1 = ev.evaluate(truth["test"], select(test, "stage1", t1, args.merge_px), 20.0,
                             score="det", accepted_only=False)
        result[variant] = {
            "cascade": {k: cascade[k] for k in KEEP}, "stage1_merged": {k: stage1[k] for k in KEEP},
            "det_threshold": pair["det_threshold"], "cls_threshold": pair["cls_threshold"],
            "stage1_threshold": t1, "on_val": {k: pair[k] for k in KEEP},
            "candidates": int(len(preds["test"])),
            "ceiling": stage1_ceiling(truth["test"], preds["test"]),
            "mitoses": int(sum(len(v) for v in truth["test"].points.values()))}
    result["seconds"] = seconds  # steps run by this invocation (finished ones are skipped)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


def format_table(done) -> str:
    lines = ["| stage 1 at | row | TP | FP | FN | precision | recall | F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for variant, label in (("full", "0.2456 um/px (full)"), ("half", "0.4912 um/px (half)")):
        for key, row in (("cascade", "cascade, pair from val HPFs"),
                         ("stage1_merged", "stage 1 + merge, cut from val HPFs")):
            p = pool([{key: r[variant][key]} for r in done], key)
            lines.append(f"| {label} | {row} | {p['tp']} | {p['fp']} | {p['fn']} | "
                         f"{p['precision']:.3f} | {p['recall']:.3f} | {p['f1']:.3f} |")
    lines.append("")
    lines.append("| stage 1 at | candidates (held-out, all folds) | mitoses with a candidate "
                 "within 20 px |")
    lines.append("|---|---:|---:|")
    total = sum(r["full"]["mitoses"] for r in done)
    for variant in VARIANTS:
        lines.append(f"| {variant} | {sum(r[variant]['candidates'] for r in done)} | "
                     f"{sum(r[variant]['ceiling'] for r in done)} of {total} |")
    lines.append("")
    lines.append("| fold (test) | full: cascade F1 | half: cascade F1 | full: stage 1 F1 | "
                 "half: stage 1 F1 |")
    lines.append("|---|---:|---:|---:|---:|")
    for r in done:
        lines.append(f"| {r['test']} | {r['full']['cascade']['f1']:.3f} | "
                     f"{r['half']['cascade']['f1']:.3f} | {r['full']['stage1_merged']['f1']:.3f} "
                     f"| {r['half']['stage1_merged']['f1']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_cv"))
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent
                        / "results" / "half_res_stage1")
    parser.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--det-epochs", type=int, default=6)
    parser.add_argument("--half-base-sizes", type=json.loads, default=[12, 24, 48],
                        help="Anchor base sizes at half resolution (JSON list, P3 first).")
    parser.add_argument("--merge-px", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", default="", help="Comma-separated held-out slides only.")
    args = parser.parse_args(argv)
    folds = make_folds(slides_of(p.name for p in args.data.iterdir()
                                 if p.suffix.lower() in IMAGE_SUFFIXES))
    if args.folds:
        folds = [f for f in folds if f["test"] in set(args.folds.split(","))]
    args.results.mkdir(parents=True, exist_ok=True)
    done = []
    for fold in folds:
        start = time.perf_counter()
        result = run_fold(fold, args, args.work, args.results)
        print(f"[{fold['test']}] {time.perf_counter() - start:.0f} s: cascade F1 full "
              f"{result['full']['cascade']['f1']:.3f} half {result['half']['cascade']['f1']:.3f}",
              flush=True)
        done.append(result)
    table = format_table(done)
    (args.results / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
