"""Leave-one-slide-out CV of the whole-field training recipe on the 15 real ICPR 2012 HPFs.

Five folds (slides A00..A04): one slide held out, the next (cyclic) validates, three train.
Per fold, through the ``focas-keras`` CLI (one process per step), the README's recipe:

    prepare --target-mpp 0.4912 --det-grid --val-fields     (Mdet's shards: whole-field grid
                                                             tiles + oversampled mitosis tiles)
    prepare --patch-size 112                                (Mclass's shards, full resolution)
    train-det --preset P  (checkpoint chosen on the whole validation fields)
    mine --keep-tp --include-val  (every candidate of the training fields; the validation
                                   fields' candidates for selection only)
    train-cls --preset P  (checkpoint and threshold pair chosen by the cascade's F1 on the
                           whole validation fields)
    detect held-out slide, permissive thresholds, with and without Mclass TTA

Thresholds for the held-out slide never look at it. Two rules are scored:
``cascade`` (the recipe's rule): the (stage-1, stage-2) pair of best F1 on the pooled
out-of-fold predictions of the OTHER folds (their held-out slides, scored by their own
models): about 80 mitoses instead of one validation slide's 8-40. ``cascade_val``: the pair
the Mclass run chose on its own validation slide. Each fold's result is cached as
``fold_<slide>.json`` (and its learning curves as ``fold_<slide>_{det,cls}_log.csv``); a rerun
skips finished steps and folds, and the summary is rebuilt from whatever folds exist.

``--final-ablation`` also detects each held-out slide with the runs' final weights (rows
``cascade_final*``), which the bundled model uses (``experiments/train_bundled.py``).

``--cls-preset lite0 --amibr ../shared/data/ami_br`` trains Mclass from ImageNet weights with
the AMi-Br mitoses of four other scanners in every batch (``--extra-share``; the crops are
prepared once and shared by the folds: none of them overlaps ICPR 2012).

``--no-val`` trains each fold as the bundled model is trained: the validation slide joins the
training slides (4 of them), nothing is selected, every detection uses the final weights (the
``cascade*`` and ``cascade_final*`` rows are then the same predictions), and there are no
``cascade_val`` rows.

Usage:
    FOCAS_SRC=/tmp/focas_src python experiments/recipe_cv.py --preset cpu --final-ablation
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import icpr2012_cv as base  # noqa: E402  (folds, CLI runner, symlinked slide dirs)

SRC = base.SRC
DEFAULT_DATA = base.DEFAULT_DATA
DET_MPP = 0.4912
MERGE_PX, RADIUS_PX = 30.0, 20.0
BORDER_PX = 32
KEEP = ("tp", "fp", "fn", "precision", "recall", "f1")


# ----------------------------------------------------------------------------- pure logic


def apply_pair(preds, det_threshold: float, cls_threshold: float, merge_px: float = MERGE_PX):
    """The cascade's accepted rows for a threshold pair: det >= t1, then Mclass >= t2, then the
    point merge ranked by Mclass's score (what ``detect`` does)."""
    above = preds[preds["det_score"] >= det_threshold]
    return base.select(above, "cascade", cls_threshold, merge_px)


def score_pair(truth, preds, det_threshold, cls_threshold) -> dict:
    """P/R/F1 counts of :func:`apply_pair` (20 px, one-to-one)."""
    from focas_keras.evaluation import evaluate as ev

    r = ev.evaluate(truth, apply_pair(preds, det_threshold, cls_threshold), RADIUS_PX,
                    score="cls", accepted_only=False)
    return {k: r[k] for k in KEEP}


def pooled_pair(truths: list, preds: list) -> dict:
    """The best-F1 threshold pair on pooled fields (image names made unique per fold)."""
    from focas_keras.evaluation.calibrate import calibrate_cascade

    points, pooled = _pool(truths, preds)
    return calibrate_cascade(points, pooled, RADIUS_PX, MERGE_PX,
                             min_det_threshold=float(pooled["det_score"].min()))


def border_share(preds, sizes: dict, strip: int = BORDER_PX) -> tuple:
    """(share of candidates whose box touches the ``strip`` px border band, the band's share
    of the image area), over images of ``sizes`` {image: (height, width)}."""
    touching, total, band, area = 0, 0, 0.0, 0.0
    for image, (height, width) in sizes.items():
        rows = preds[preds["image"] == image]
        total += len(rows)
        touching += int(((rows["x1"] < strip) | (rows["y1"] < strip)
                         | (rows["x2"] > width - strip) | (rows["y2"] > height - strip)).sum())
        band += height * width - max(height - 2 * strip, 0) * max(width - 2 * strip, 0)
        area += height * width
    return (touching / total if total else 0.0), (band / area if area else 0.0)


# ----------------------------------------------------------------------------- running


def amibr_prepare_args(amibr, out, seed) -> list:
    """``prepare`` of the AMi-Br crops for Mclass (all scanners, no validation split): 4
    positive patches per figure and 2 same-crop negatives per crop, 112 px at the crops' own
    pixel size resized to Mclass's."""
    return ["prepare", amibr, "--format", "amibr", "--out", out, "--patch-size", 112,
            "--cls-per-mitosis", 4, "--cls-background", 2, "--val-fraction", 0, "--seed", seed,
            "--overwrite"]


def run_fold(fold, args, work: Path, results: Path) -> dict:
    """Runs (or resumes) one fold's training and held-out detection; caches the result."""
    from focas_keras.evaluation import evaluate as ev

    result_path = results / f"fold_{fold['test']}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    fold_dir = work / f"fold_{fold['test']}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    log_path = results / f"fold_{fold['test']}.log"
    env = base.cli_env()
    steps = {}
    start = time.perf_counter()

    def step(name, done, fn):
        if done():
            return
        t0 = time.perf_counter()
        fn()
        steps[name] = round(time.perf_counter() - t0, 1)
        print(f"  [{fold['test']}] {name}: {steps[name]:.0f} s", flush=True)

    def cli(*a):
        return base._cli(list(a), log_path, env)

    src = base._link_slides(args.data, set(fold["train"]) | {fold["val"]}, fold_dir / "src")
    test = base._link_slides(args.data, {fold["test"]}, fold_dir / "test")
    det_shards, cls_shards = fold_dir / "shards_det", fold_dir / "shards_cls"
    mdet, mclass = fold_dir / "mdet", fold_dir / "mclass"
    seed = str(args.seed)
    # --no-val: the validation slide trains too (4 slides); nothing is selected on it, so
    # every detection below uses the final weights and only the OOF rules are scored.
    split = (["--val-fraction", 0] if args.no_val else ["--val-slides", fold["val"]])
    split += ["--seed", seed, "--overwrite"]
    val_fields = [] if args.no_val else ["--val-fields"]
    include_val = [] if args.no_val else ["--include-val"]
    which = ["--which", "model"] if args.no_val else []
    step("prepare-det", lambda: (det_shards / "manifest.json").exists(),
         lambda: cli("prepare", src, "--format", "icpr2012", "--out", det_shards,
                     "--target-mpp", DET_MPP, "--det-grid", *val_fields,
                     "--det-empty-share", 0, *split))
    step("prepare-cls", lambda: (cls_shards / "manifest.json").exists(),
         lambda: cli("prepare", src, "--format", "icpr2012", "--out", cls_shards,
                     "--patch-size", 112, "--det-per-mitosis", 0, "--det-empty-share", 0,
                     *split))
    det_epochs = ["--epochs", args.det_epochs] if args.det_epochs else []
    step("train-det", lambda: (mdet / "model.keras").exists(),
         lambda: cli("train-det", "--data", det_shards, "--out", mdet, "--preset", args.preset,
                     "--seed", seed, "--set", "head.base_sizes=[12,24,48,96,192]",
                     *det_epochs, *_sets(args.det_set)))
    marker = fold_dir / "mined.txt"
    step("mine", marker.exists,
         lambda: marker.write_text(cli("mine", "--det", mdet, "--data", src, "--format",
                                       "icpr2012", "--out", cls_shards, "--keep-tp",
                                       *include_val)))
    cls_epochs = ["--epochs", args.cls_epochs] if args.cls_epochs else []
    extra = []
    if args.amibr is not None:  # other scanners' mitoses: prepared once, shared by the folds
        amibr_shards = work / "shards_amibr"
        step("prepare-amibr", lambda: (amibr_shards / "manifest.json").exists(),
             lambda: cli(*amibr_prepare_args(args.amibr, amibr_shards, seed)))
        extra = ["--extra-data", amibr_shards, "--set", f"train.extra_share={args.extra_share}"]
    step("train-cls", lambda: (mclass / "model.keras").exists(),
         lambda: cli("train-cls", "--data", cls_shards, "--out", mclass, "--preset",
                     args.cls_preset or args.preset, "--seed", seed, *cls_epochs, *extra,
                     *_sets(args.cls_set)))
    outs = {}
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        out = fold_dir / f"detections_{name}"
        outs[name] = out
        step(f"detect-{name}", lambda out=out: (out / "detections.csv").exists(),
             lambda out=out, extra=extra: cli(
                 "detect", test, "--det", mdet, "--cls", mclass, "--out", out,
                 "--det-threshold", args.min_det, "--cls-threshold", 0, "--no-overlays",
                 "--overwrite", *which, *extra))
    truth = ev.read_truth(test, "icpr2012").points
    plain = ev.read_predictions(outs["plain"] / "detections.csv")
    tta = ev.read_predictions(outs["tta"] / "detections.csv")
    import cv2

    sizes = {}
    for path in sorted(test.iterdir()):
        if path.suffix.lower() in base.IMAGE_SUFFIXES:
            image = cv2.imread(str(path))
            sizes[path.stem] = image.shape[:2]
    from focas_keras.evaluation.fields import candidate_recall

    found, total = candidate_recall(truth, plain, RADIUS_PX)
    touch, band = border_share(plain, sizes)
    best = _best_metrics(mclass)
    det_best = _best_metrics(mdet)
    detect_json = json.loads((outs["plain"] / "detect.json").read_text())
    result = {
        "test": fold["test"], "val": None if args.no_val else fold["val"],
        "train": fold["train"] + [fold["val"]] if args.no_val else fold["train"],
        "preset": args.preset, "cls_preset": args.cls_preset or args.preset, "seed": args.seed,
        "amibr": None if args.amibr is None else {"data": str(args.amibr),
                                                   "extra_share": args.extra_share},
        "mitoses": total, "candidates": int(len(plain)), "candidates_found": found,
        "candidate_recall": found / total if total else 0.0,
        "border_share": touch, "border_band_area_share": band,
        "cap_bound_images": (detect_json.get("stage1_cap") or {}).get("cap_bound_images"),
        "mdet_best": {k: det_best.get(k) for k in ("epoch", "val_field_f1",
                                                   "val_field_candidate_recall",
                                                   "val_field_candidates_per_mm2")},
        "mclass_best": {k: best.get(k) for k in ("epoch", "val_cascade_f1", "val_auc")},
        "step_seconds": steps, "seconds": round(time.perf_counter() - start, 1),
        "source": str(SRC),
    }
    if not args.no_val:
        val_pair = (best["val_cascade_det_threshold"], best["val_cascade_cls_threshold"])
        result["val_pair"] = list(val_pair)
        result["cascade_val"] = score_pair(truth, plain, *val_pair)
        result["cascade_val_tta"] = score_pair(truth, tta, *val_pair)
    for kind, run in (("det", mdet), ("cls", mclass)):
        shutil.copy(run / "log.csv", results / f"fold_{fold['test']}_{kind}_log.csv")
    preds_dir = results / "oof"
    preds_dir.mkdir(parents=True, exist_ok=True)
    for name, table in (("plain", plain), ("tta", tta)):
        table.to_csv(preds_dir / f"{fold['test']}_{name}.csv", index=False)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(result_path)
    return result


def _best_metrics(run: Path) -> dict:
    """``best.json``'s metrics of a run ({} where it has none)."""
    path = run / "best.json"
    return json.loads(path.read_text()).get("metrics") or {} if path.exists() else {}


def _sets(overrides) -> list:
    return [a for o in overrides or () for a in ("--set", o)]


def run_final_detections(fold, args, work: Path, results: Path) -> None:
    """Ablation of checkpoint selection: the held-out slide again with each run's FINAL
    weights (``detect --which model``) instead of the ones selected on the validation
    fields; cached as ``oof/<slide>_final_{plain,tta}.csv``."""
    from focas_keras.evaluation import evaluate as ev

    fold_dir = work / f"fold_{fold['test']}"
    log_path = results / f"fold_{fold['test']}.log"
    env = base.cli_env()
    for name, extra in (("plain", []), ("tta", ["--tta"])):
        target = results / "oof" / f"{fold['test']}_final_{name}.csv"
        if target.exists():
            continue
        out = fold_dir / f"detections_final_{name}"
        if args.no_val:  # the fold's own detections are the final weights' already
            out = fold_dir / f"detections_{name}"
        if not (out / "detections.csv").exists():
            base._cli(["detect", fold_dir / "test", "--det", fold_dir / "mdet", "--cls",
                       fold_dir / "mclass", "--out", out, "--det-threshold", args.min_det,
                       "--cls-threshold", 0, "--no-overlays", "--overwrite", "--which",
                       "model", *extra], log_path, env)
        ev.read_predictions(out / "detections.csv").to_csv(target, index=False)


def summarize(folds: list, args, results: Path) -> dict:
    """Cross-fold thresholds for each finished fold, pooled counts, summary.json/.md."""
    import pandas as pd

    from focas_keras.evaluation import evaluate as ev

    done = [f for f in folds if (results / f"fold_{f['test']}.json").exists()]
    rows = {f["test"]: json.loads((results / f"fold_{f['test']}.json").read_text())
            for f in done}
    truths = {f["test"]: ev.read_truth(args.work / f"fold_{f['test']}" / "test",
                                       "icpr2012").points
              if (args.work / f"fold_{f['test']}" / "test").exists()
              else _truth_of(args.data, f["test"]) for f in done}
    names = ["plain", "tta"]
    if all((results / "oof" / f"{t}_final_{n}.csv").exists() for t in rows
           for n in ("plain", "tta")):
        names += ["final_plain", "final_tta"]
    preds = {(t, n): pd.read_csv(results / "oof" / f"{t}_{n}.csv") for t in rows for n in names}
    for t, row in rows.items():
        others = [o for o in rows if o != t]
        for name in names:
            key = {"plain": "cascade", "tta": "cascade_tta", "final_plain": "cascade_final",
                   "final_tta": "cascade_final_tta"}[name]
            if not others:
                row.pop(key, None)
                continue
            pair = pooled_pair([truths[o] for o in others], [preds[o, name] for o in others])
            row[f"{key}_pair"] = [pair["det_threshold"], pair["cls_threshold"]]
            row[key] = score_pair(truths[t], preds[t, name], pair["det_threshold"],
                                  pair["cls_threshold"])
        # What limits it (diagnostics, not results): stage 1 alone with the merge, its cut from
        # the other folds; and the pair chosen on this very slide (an optimistic bound that
        # separates threshold transfer from what the models can do at all).
        from focas_keras.evaluation.calibrate import calibrate_stage1

        if others:
            pooled_truth, pooled_preds = _pool([truths[o] for o in others],
                                               [preds[o, "plain"] for o in others])
            cut = calibrate_stage1(pooled_truth, pooled_preds, RADIUS_PX, MERGE_PX)
            row["stage1_cut"] = cut["det_threshold"]
            row["stage1"] = _stage1_counts(truths[t], preds[t, "plain"], cut["det_threshold"])
        for name, key in (("plain", "oracle"), ("tta", "oracle_tta"),
                          ("final_plain", "oracle_final"), ("final_tta", "oracle_final_tta")):
            if name not in names:
                continue
            own = pooled_pair([truths[t]], [preds[t, name]])
            row[key] = {k: own[k] for k in KEEP}
    finished = list(rows.values())
    keys = [k for k in ("cascade", "cascade_tta", "cascade_val", "cascade_val_tta",
                        "cascade_final", "cascade_final_tta", "stage1", "oracle", "oracle_tta",
                        "oracle_final", "oracle_final_tta")
            if finished and all(k in r for r in finished)]
    found = sum(r["candidates_found"] for r in finished)
    mitoses = sum(r["mitoses"] for r in finished)
    touching = sum(r["border_share"] * r["candidates"] for r in finished)
    candidates = sum(r["candidates"] for r in finished)
    summary = {
        "preset": args.preset,
        "overrides": {"train-det": list(args.det_set), "train-cls": list(args.cls_set)},
        "cls_preset": args.cls_preset or args.preset,
        "amibr": None if args.amibr is None else {"data": str(args.amibr),
                                                   "extra_share": args.extra_share},
        "candidate_threshold": args.min_det,
        "validation_slide": not args.no_val,
        "recipe": (("whole-field, 4 training slides a fold and no validation slide: prepare "
                    "--det-grid at 0.4912 um/px (Mdet) and 112 px patches at 0.2456 (Mclass); "
                    "train-det; mine --keep-tp (every candidate); train-cls; final weights; "
                    if args.no_val else
                    "whole-field: prepare --det-grid --val-fields at 0.4912 um/px (Mdet) and "
                    "112 px patches at 0.2456 (Mclass); train-det selected on whole val "
                    "fields; mine --keep-tp --include-val (every candidate); train-cls "
                    "selected by the cascade's F1 on whole val fields; ")
                   + "thresholds: best-F1 pair on the other folds' pooled out-of-fold "
                     "predictions"),
        "folds": [r["test"] for r in finished],
        "complete": len(finished) == len(folds),
        "mitoses": mitoses,
        "candidate_recall": found / mitoses if mitoses else 0.0,
        "candidates": candidates,
        "border_share": touching / candidates if candidates else 0.0,
        "border_band_area_share": (sum(r["border_band_area_share"] for r in finished)
                                   / len(finished)) if finished else 0.0,
        "pooled": {k: base.pool(finished, k) for k in keys},
        "seconds_all_folds": round(sum(r["seconds"] for r in finished), 1),
    }
    write = results / "summary.json"
    write.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (results / "summary.md").write_text(format_tables(summary, finished) + "\n\n"
                                        + learning_curves(results, summary["folds"]) + "\n")
    for row in finished:  # the cross-fold rows change as folds land
        path = results / f"fold_{row['test']}.json"
        path.write_text(json.dumps(row, indent=2, sort_keys=True) + "\n")
    return summary


def _pool(truths: list, preds: list):
    """One truth dict and one table from several folds (image names made unique)."""
    import pandas as pd

    points, frames = {}, []
    for i, (truth, table) in enumerate(zip(truths, preds)):
        points.update({f"{i}/{k}": v for k, v in truth.items()})
        frames.append(table.assign(image=f"{i}/" + table["image"].astype(str)))
    return points, pd.concat(frames, ignore_index=True)


def _stage1_counts(truth, preds, cut: float) -> dict:
    """Stage 1 alone: det >= cut, merged by det score (what detect would accept without
    Mclass)."""
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.evaluation.calibrate import merged

    above = merged(preds[preds["det_score"] >= cut], "det_score", MERGE_PX)
    r = ev.evaluate(truth, above, RADIUS_PX, score="det", accepted_only=False)
    return {k: r[k] for k in KEEP}


def learning_curves(results: Path, folds: list) -> str:
    """Markdown: per fold, the selection metric of every epoch (Mdet: stage 1 + merge F1 on
    the whole validation fields; Mclass: the cascade's F1 there) and the training loss."""
    import pandas as pd

    lines = ["| held out | stage | epoch: selection F1 on whole val fields (training loss) |",
             "|---|---|---|"]
    for slide in folds:
        for kind, column in (("det", "val_field_f1"), ("cls", "val_cascade_f1")):
            path = results / f"fold_{slide}_{kind}_log.csv"
            if not path.exists():
                continue
            log = pd.read_csv(path)
            if column in log:
                cells = ", ".join(f"{int(r.epoch)}: {getattr(r, column):.2f} "
                                  f"({r.loss_total:.3f})" for r in log.itertuples())
            else:  # no validation slide (--no-val): the training loss only
                cells = ", ".join(f"{int(r.epoch)}: - ({r.loss_total:.3f})"
                                  for r in log.itertuples())
            lines.append(f"| {slide} | {'Mdet' if kind == 'det' else 'Mclass'} | {cells} |")
    return "\n".join(lines)


def _truth_of(data: Path, slide: str) -> dict:
    from focas_keras.evaluation import evaluate as ev

    return {k: v for k, v in ev.read_truth(data, "icpr2012").points.items()
            if k.startswith(slide)}


LABELS = {"cascade": "cascade, pair from the other folds' pooled OOF predictions",
          "cascade_tta": "same, Mclass with 8-fold TTA",
          "cascade_val": "cascade, pair from the fold's own validation slide",
          "cascade_val_tta": "same, Mclass with 8-fold TTA",
          "stage1": "stage 1 alone + merge, cut from the other folds' OOF predictions",
          "oracle": "diagnostic only: pair chosen on the held-out slide itself",
          "oracle_tta": "diagnostic only: same, with TTA",
          "cascade_final": "ablation: final weights instead of the selected checkpoints, "
                           "pair from the other folds' OOF predictions",
          "cascade_final_tta": "same, with TTA",
          "oracle_final": "diagnostic only: final weights, pair chosen on the held-out slide",
          "oracle_final_tta": "same, with TTA"}


def format_tables(summary: dict, finished: list) -> str:
    """Markdown: pooled rows, then one row per fold."""
    lines = [f"folds: {', '.join(summary['folds'])}; {summary['mitoses']} mitoses; candidate "
             f"recall {summary['candidate_recall']:.3f}; border share "
             f"{summary['border_share']:.3f} (band area {summary['border_band_area_share']:.3f})",
             "", "| pooled over held-out slides | TP | FP | FN | P | R | F1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, c in summary["pooled"].items():
        lines.append(f"| {LABELS[key]} | {c['tp']} | {c['fp']} | {c['fn']} | "
                     f"{c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} |")
    lines += ["", "| held out | val | mitoses | with a candidate | candidates | pair (OOF) | "
                  "cascade TP/FP/FN, F1 | TTA | pair (val) | cascade (val pair) | "
                  "Mdet best epoch | Mclass best epoch | wall time |",
              "|---|---|---:|---:|---:|---|---|---|---|---|---:|---:|---:|"]
    for r in finished:
        def cell(key):
            c = r.get(key)
            return "-" if c is None else f"{c['tp']}/{c['fp']}/{c['fn']}, {c['f1']:.3f}"

        def pair_cell(pair):
            return "-" if pair is None else f"{pair[0]:.3f}, {pair[1]:.3f}"
        lines.append(
            f"| {r['test']} | {r['val'] or '-'} | {r['mitoses']} | {r['candidates_found']} | "
            f"{r['candidates']} | {pair_cell(r.get('cascade_pair'))} | {cell('cascade')} | "
            f"{cell('cascade_tta')} | {pair_cell(r.get('val_pair'))} | {cell('cascade_val')} | "
            f"{r['mdet_best'].get('epoch', '-')} | {r['mclass_best'].get('epoch', '-')} | "
            f"{base._minutes(r['seconds'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_recipe_cv"))
    parser.add_argument("--results", type=Path,
                        default=REPO / "experiments" / "results" / "icpr2012_cv")
    parser.add_argument("--preset", choices=("tiny", "cpu", "cpu_full", "paper"), default="cpu")
    parser.add_argument("--det-epochs", type=int, default=None)
    parser.add_argument("--cls-epochs", type=int, default=None)
    parser.add_argument("--min-det", type=float, default=0.05,
                        help="Stage-1 threshold of the permissive held-out run (Mdet's "
                             "inference threshold).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--det-set", action="append", default=[], metavar="SECTION.FIELD=V",
                        help="Extra train-det --set override (repeatable), e.g. "
                             "train.scale_jitter=0.2.")
    parser.add_argument("--cls-set", action="append", default=[], metavar="SECTION.FIELD=V",
                        help="Extra train-cls --set override (repeatable).")
    parser.add_argument("--cls-preset", default=None,
                        help="train-cls preset when it differs from --preset (e.g. lite0).")
    parser.add_argument("--amibr", type=Path, default=None,
                        help="AMi-Br directory: its crops (all scanners) join every fold's "
                             "Mclass batches (train-cls --extra-data).")
    parser.add_argument("--extra-share", type=float, default=0.3,
                        help="train.extra_share with --amibr.")
    parser.add_argument("--no-val", action="store_true",
                        help="Train on the validation slide too (4 training slides a fold); "
                             "final weights only, thresholds from the other folds' OOF "
                             "predictions.")
    parser.add_argument("--folds", default="", help="Comma-separated held-out slides only.")
    parser.add_argument("--summary-only", action="store_true",
                        help="Only rebuild the summary from the cached folds.")
    parser.add_argument("--final-ablation", action="store_true",
                        help="Also detect each held-out slide with the final weights.")
    args = parser.parse_args(argv)

    slides = base.slides_of(p.name for p in args.data.iterdir()
                            if p.suffix.lower() in base.IMAGE_SUFFIXES)
    folds = base.make_folds(slides)
    wanted = set(args.folds.split(",")) if args.folds else {f["test"] for f in folds}
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for fold in folds:
            if fold["test"] not in wanted:
                continue
            print(f"fold: test {fold['test']}, val {fold['val']}, train "
                  f"{','.join(fold['train'])}", flush=True)
            result = run_fold(fold, args, args.work, args.results)
            val_f1 = (f", cascade (val pair) F1 {result['cascade_val']['f1']:.3f}"
                      if "cascade_val" in result else "")
            print(f"  [{fold['test']}] done in {base._minutes(result['seconds'])}: candidate "
                  f"recall {result['candidate_recall']:.3f}{val_f1}", flush=True)
            if args.final_ablation:
                run_final_detections(fold, args, args.work, args.results)
            summarize(folds, args, args.results)
    summary = summarize(folds, args, args.results)
    print((args.results / "summary.md").read_text())
    return 0 if summary["folds"] else 1


if __name__ == "__main__":
    sys.exit(main())
