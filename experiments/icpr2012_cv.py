"""Leave-one-slide-out cross-validation of the FoCasNet cascade on the 15 real ICPR 2012 HPFs.

Five folds (slides A00..A04). In each fold one slide is held out for testing; of the other
four, one validates (best checkpoint and score thresholds of both stages) and three train.
Nothing is tuned on the held-out slide. Per fold, through the ``focas-keras`` CLI (one
process per step, so each step's memory is returned):

    prepare (4 slides, --val-slides V) -> train-det -> mine (training slides only)
    -> train-cls -> detect (held-out slide) -> evaluate --json

Stage 1 alone is scored on the same ``detections.csv`` (every candidate carries its
det_score): all candidates with det_score >= the Mdet run's validation best-F1 threshold,
once as NMS left them and once with the cascade's 30 px point merge (the same logic as
``focas_keras/demo.py``). Counts are pooled over all 101 mitoses.

Resumable: a fold whose result JSON exists is skipped; inside a fold every finished step is
skipped (train-det/train-cls resume from their checkpoints on their own).

Usage:
    python experiments/icpr2012_cv.py --preset tiny --det-epochs 6 --cls-epochs 4 \
        --work /tmp/focas_cv --results experiments/results/icpr2012_cv_issue7
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Where focas_keras/data_tools are imported from. Other engineers edit the working tree while
#: these long runs go on, so runs pin a snapshot (e.g. ``git archive HEAD focas_keras
#: data_tools | tar -x -C /tmp/focas_src``) and name it here; default: this checkout.
SRC = Path(os.environ.get("FOCAS_SRC", REPO)).resolve()
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "icpr2012"
IMAGE_SUFFIXES = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")
ROWS = (("stage1", "stage 1 alone (det >= Mdet val threshold)"),
        ("stage1_merged", "stage 1 alone + 30 px merge"),
        ("cascade", "cascade (Mdet -> Mclass -> 30 px merge)"))
#: Extra rows: thresholds chosen on the validation slide's WHOLE HPFs instead of its tiles and
#: patches (still never on the held-out slide).
VALCAL_ROWS = (("stage1_valcal", "stage 1 alone + 30 px merge, det threshold from val HPFs"),
               ("cascade_valcal", "cascade, Mclass threshold from val HPFs"))


# ----------------------------------------------------------------------------- pure logic


def slides_of(image_names) -> list:
    """Sorted slide ids (first three characters of each image stem, the ICPR 2012 rule)."""
    return sorted({Path(name).stem[:3] for name in image_names})


def make_folds(slides) -> list:
    """Leave-one-slide-out folds.

    Fold i tests ``slides[i]`` and validates on the next slide in (cyclic) order; the rest
    train. Returns dicts ``{"test": s, "val": s, "train": [s, ...]}``.
    """
    slides = sorted(slides)
    if len(slides) < 3:
        raise ValueError("need at least 3 slides (train, validation, test)")
    folds = []
    for i, test in enumerate(slides):
        val = slides[(i + 1) % len(slides)]
        folds.append({"test": test, "val": val,
                      "train": [s for s in slides if s not in (test, val)]})
    return folds


def prf(tp: int, fp: int, fn: int) -> dict:
    """Counts and precision, recall, F1 (0 where undefined)."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * p * r / (p + r) if p + r else 0.0
    return {"tp": int(tp), "fp": int(fp), "fn": int(fn), "precision": p, "recall": r, "f1": f1}


def pool(fold_results, key: str) -> dict:
    """Pooled counts (summed over folds, then the ratios) of result row ``key``."""
    tp = sum(r[key]["tp"] for r in fold_results)
    fp = sum(r[key]["fp"] for r in fold_results)
    fn = sum(r[key]["fn"] for r in fold_results)
    return prf(tp, fp, fn)


def format_tables(fold_results) -> str:
    """Markdown: the pooled table and the per-fold table."""
    lines = ["| pooled over held-out slides | TP | FP | FN | P | R | F1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    rows = ROWS + tuple(r for r in VALCAL_ROWS
                        if fold_results and all(r[0] in f for f in fold_results))
    for key, label in rows:
        c = pool(fold_results, key)
        lines.append(f"| {label} | {c['tp']} | {c['fp']} | {c['fn']} | {c['precision']:.3f} | "
                     f"{c['recall']:.3f} | {c['f1']:.3f} |")
    extra = rows[len(ROWS):]
    lines += ["", "| held out | val | mitoses | Mdet thr | Mclass thr | stage 1: TP/FP/FN, F1 | "
                  "stage 1 + merge: TP/FP/FN, F1 | cascade: TP/FP/FN, F1 | "
              + "".join(f"{key}: TP/FP/FN, F1 | " for key, _ in extra) + "wall time |",
              "|---|---|---:|---:|---:|---|---|---|" + "---|" * len(extra) + "---:|"]
    for r in fold_results:
        cells = [f"{r[k]['tp']}/{r[k]['fp']}/{r[k]['fn']}, {r[k]['f1']:.3f}" for k, _ in rows]
        mitoses = r["cascade"]["tp"] + r["cascade"]["fn"]
        lines.append(f"| {r['test']} | {r['val']} | {mitoses} | {r['det_threshold']:.3f} | "
                     f"{r['cls_threshold']:.3f} | " + " | ".join(cells)
                     + f" | {_minutes(r['seconds'])} |")
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


def select(preds, stage: str, threshold: float, merge_px: float):
    """The detections a threshold keeps, after the cascade's point merge.

    ``stage1``: det_score >= threshold, merged by det_score. ``cascade``: cls_score >=
    threshold (every row of ``detections.csv`` passed stage 1), merged by cls_score -- what
    ``detect`` does with that Mclass threshold.
    """
    import numpy as np

    from focas_keras.inference.cascade import merge_points

    column = {"stage1": "det_score", "cascade": "cls_score"}[stage]
    keep = np.zeros(len(preds), bool)
    positions = np.arange(len(preds))
    for _, rows in preds.groupby("image", sort=False):
        scores = rows[column].to_numpy(np.float64)
        kept = merge_points(rows[["x", "y"]].to_numpy(np.float64), scores,
                            np.nan_to_num(scores, nan=-np.inf) >= threshold, merge_px)
        keep[positions[preds.index.get_indexer(rows.index)]] = kept
    return preds[keep]


def candidate_thresholds(scores, most: int = 200) -> list:
    """Distinct finite scores (descending), thinned to at most ``most`` evenly spaced ones."""
    import numpy as np

    values = np.unique(np.asarray(scores, np.float64))
    values = values[np.isfinite(values)][::-1]
    if len(values) > most:
        values = values[np.linspace(0, len(values) - 1, most).round().astype(int)]
    return [float(v) for v in values]


def best_threshold(truth, preds, stage: str, merge_px: float) -> tuple:
    """(threshold, counts) of the highest F1 of :func:`select` over candidate thresholds
    (ties: the highest threshold)."""
    from focas_keras.evaluation import evaluate as ev

    column = {"stage1": "det_score", "cascade": "cls_score"}[stage]
    best_t, best = None, None
    for t in candidate_thresholds(preds[column].to_numpy()):
        r = ev.evaluate(truth, select(preds, stage, t, merge_px), 20.0,
                        score="det" if stage == "stage1" else "cls", accepted_only=False)
        if best is None or r["f1"] > best["f1"]:
            best_t, best = t, r
    return best_t, best


# ----------------------------------------------------------------------------- running


def _link_slides(data: Path, slides, out: Path) -> Path:
    """A directory of symlinks to the images (+ CSVs) of ``slides``."""
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(data.iterdir()):
        if path.stem[:3] in slides and path.suffix.lower() in IMAGE_SUFFIXES + (".csv",):
            target = out / path.name
            if not target.exists():
                target.symlink_to(path.resolve())
    return out


def cli_env() -> dict:
    """The environment for ``focas-keras`` steps: :data:`SRC` first on PYTHONPATH, so every
    step imports the pinned snapshot of the package."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _cli(args, log_path: Path, env) -> str:
    """Runs ``focas-keras ARGS``; appends its output to the log; returns stdout."""
    cmd = [sys.executable, "-m", "focas_keras", *map(str, args)]
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"\n$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        log.write(proc.stdout)
    if proc.returncode:
        raise RuntimeError(f"step failed (exit {proc.returncode}): {' '.join(cmd)}; see {log_path}")
    return proc.stdout


def _stage1_rows(truth_dir: Path, detections_csv: Path, det_threshold: float, merge_px: float):
    """Stage 1 alone, as ``focas_keras/demo.py`` scores it: without and with the merge."""
    from focas_keras.evaluation.calibrate import merged as merged_rows
    from focas_keras.evaluation import evaluate as ev

    truth = ev.read_truth(truth_dir, "icpr2012")
    preds = ev.read_predictions(detections_csv)
    stage1 = ev.evaluate(truth, preds, 20.0, score="det", accepted_only=False,
                         threshold=det_threshold)
    above = preds[preds["det_score"] >= det_threshold]
    merged = ev.evaluate(truth, merged_rows(above, "det_score", merge_px), 20.0, score="det")
    keep = ("tp", "fp", "fn", "precision", "recall", "f1")
    return ({k: stage1[k] for k in keep}, {k: merged[k] for k in keep},
            int(len(preds)))


def run_fold(fold: dict, args, data: Path, work: Path, results: Path) -> dict:
    """Runs (or resumes) one fold; writes and returns its result dict."""
    result_path = results / f"fold_{fold['test']}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    fold_dir = work / f"fold_{fold['test']}"
    fold_dir.mkdir(parents=True, exist_ok=True)
    log_path = results / f"fold_{fold['test']}.log"
    env = cli_env()
    start = time.perf_counter()
    steps = {}

    def step(name, done, fn):
        if done():
            return
        t0 = time.perf_counter()
        fn()
        steps[name] = round(time.perf_counter() - t0, 1)
        print(f"  [{fold['test']}] {name}: {steps[name]:.0f} s", flush=True)

    src = _link_slides(data, set(fold["train"]) | {fold["val"]}, fold_dir / "src")
    test = _link_slides(data, {fold["test"]}, fold_dir / "test")
    shards, mdet, mclass = fold_dir / "shards", fold_dir / "mdet", fold_dir / "mclass"
    detections = fold_dir / "detections"
    seed = str(args.seed)
    step("prepare", lambda: (shards / "manifest.json").exists(),
         lambda: _cli(["prepare", src, "--format", "icpr2012", "--out", shards, "--overwrite",
                       "--val-slides", fold["val"], "--patch-size", args.patch_size,
                       "--seed", seed], log_path, env))
    det_extra = [x for s in args.det_set for x in ("--set", s)]
    step("train-det", lambda: (mdet / "model.keras").exists(),
         lambda: _cli(["train-det", "--data", shards, "--out", mdet, "--preset", args.preset,
                       "--seed", seed, *(["--epochs", args.det_epochs] if args.det_epochs
                                         else []), *det_extra], log_path, env))
    mined_marker = fold_dir / "mined.txt"
    step("mine", mined_marker.exists,
         lambda: mined_marker.write_text(_cli(["mine", "--det", mdet, "--data", src,
                                               "--format", "icpr2012", "--out", shards],
                                              log_path, env)))
    step("train-cls", lambda: (mclass / "model.keras").exists(),
         lambda: _cli(["train-cls", "--data", shards, "--out", mclass, "--preset", args.preset,
                       "--seed", seed, *(["--epochs", args.cls_epochs] if args.cls_epochs
                                         else [])], log_path, env))
    tile = ["--tile", args.tile] if args.tile else []
    step("detect", lambda: (detections / "detections.csv").exists(),
         lambda: _cli(["detect", test, "--det", mdet, "--cls", mclass, "--out", detections,
                       "--no-overlays", "--overwrite", *tile], log_path, env))
    cascade = json.loads(_cli(["evaluate", "--truth", test, "--format", "icpr2012", "--pred",
                               detections / "detections.csv", "--json"], log_path, env))
    det_threshold = json.loads((mdet / "best.json").read_text())["metrics"]["val_best_threshold"]
    detect_json = json.loads((detections / "detect.json").read_text())
    stage1, merged, candidates = _stage1_rows(test, detections / "detections.csv",
                                              det_threshold, args.merge_px)
    keep = ("tp", "fp", "fn", "precision", "recall", "f1")
    result = {"test": fold["test"], "val": fold["val"], "train": fold["train"],
              "preset": args.preset, "det_epochs": args.det_epochs,
              "cls_epochs": args.cls_epochs, "det_set": list(args.det_set),
              "det_threshold": float(det_threshold),
              "cls_threshold": float(_find(detect_json, "cls_threshold")),
              "candidates": candidates, "stage1": stage1, "stage1_merged": merged,
              "cascade": {k: cascade[k] for k in keep},
              "step_seconds": steps, "seconds": round(time.perf_counter() - start, 1),
              "resumed": len(steps) < 5, "source": str(SRC)}
    results.mkdir(parents=True, exist_ok=True)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(result_path)
    if args.clean:
        shutil.rmtree(fold_dir / "shards", ignore_errors=True)
    return result


def calibrate_fold(fold: dict, args, data: Path, work: Path, results: Path) -> dict:
    """Thresholds from the validation slide's whole HPFs, applied to the held-out slide.

    Runs ``detect`` on the validation slide with the fold's two models, picks the stage-1
    det threshold and the Mclass threshold of best F1 there (with the 30 px merge), and scores
    the held-out ``detections.csv`` with them. Cached in ``fold_<test>_valcal.json``.
    """
    from focas_keras.evaluation import evaluate as ev

    path = results / f"fold_{fold['test']}_valcal.json"
    if path.exists():
        return json.loads(path.read_text())
    fold_dir = work / f"fold_{fold['test']}"
    log_path = results / f"fold_{fold['test']}.log"
    env = cli_env()
    val = _link_slides(data, {fold["val"]}, fold_dir / "val")
    out = fold_dir / "detections_val"
    t0 = time.perf_counter()
    if not (out / "detections.csv").exists():
        tile = ["--tile", args.tile] if args.tile else []
        _cli(["detect", val, "--det", fold_dir / "mdet", "--cls", fold_dir / "mclass",
              "--out", out, "--no-overlays", "--overwrite", *tile], log_path, env)
    val_truth, val_preds = ev.read_truth(val, "icpr2012"), ev.read_predictions(
        out / "detections.csv")
    test = fold_dir / "test"
    truth = ev.read_truth(test, "icpr2012")
    preds = ev.read_predictions(fold_dir / "detections" / "detections.csv")
    keep = ("tp", "fp", "fn", "precision", "recall", "f1")
    result = {"test": fold["test"], "val": fold["val"]}
    for stage in ("stage1", "cascade"):
        t, on_val = best_threshold(val_truth, val_preds, stage, args.merge_px)
        r = ev.evaluate(truth, select(preds, stage, t if t is not None else float("inf"),
                                      args.merge_px), 20.0,
                        score="det" if stage == "stage1" else "cls", accepted_only=False)
        result[f"{stage}_valcal"] = {k: r[k] for k in keep}
        result[f"{stage}_valcal_threshold"] = t
        result[f"{stage}_valcal_on_val"] = {k: on_val[k] for k in keep} if on_val else None
    result["seconds"] = round(time.perf_counter() - t0, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)
    return result


def _find(obj, key):
    """First value of ``key`` anywhere in a nested dict (detect.json layout-agnostic)."""
    if isinstance(obj, dict):
        if key in obj:
            return obj[key]
        for value in obj.values():
            found = _find(value, key)
            if found is not None:
                return found
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA / "images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_cv"))
    parser.add_argument("--results", type=Path,
                        default=REPO / "experiments" / "results" / "icpr2012_cv_issue7")
    parser.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    parser.add_argument("--det-epochs", type=int, default=None)
    parser.add_argument("--cls-epochs", type=int, default=None)
    parser.add_argument("--det-set", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE", help="train-det --set overrides.")
    parser.add_argument("--patch-size", type=int, default=112,
                        help="cls patch side at prepare (112 = detect's crop, as in the demo).")
    parser.add_argument("--tile", type=int, default=0, help="detect --tile (0: whole image).")
    parser.add_argument("--merge-px", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--folds", default="", help="Comma-separated held-out slides only.")
    parser.add_argument("--clean", action="store_true", help="Delete a fold's shards when done.")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="Skip the rows with thresholds from the val slide's whole HPFs.")
    args = parser.parse_args(argv)

    slides = slides_of(p.name for p in args.data.iterdir()
                       if p.suffix.lower() in IMAGE_SUFFIXES)
    folds = make_folds(slides)
    if args.folds:
        wanted = set(args.folds.split(","))
        folds = [f for f in folds if f["test"] in wanted]
    args.results.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = []
    for fold in folds:
        print(f"fold: test {fold['test']}, val {fold['val']}, train {','.join(fold['train'])}",
              flush=True)
        result = run_fold(fold, args, args.data, args.work, args.results)
        if not args.no_calibrate:
            cal = calibrate_fold(fold, args, args.data, args.work, args.results)
            result = {**result, **{k: cal[k] for k, _ in VALCAL_ROWS}}
        print(f"  [{fold['test']}] done in {_minutes(result['seconds'])}: cascade F1 "
              f"{result['cascade']['f1']:.3f}, stage 1 + merge F1 "
              f"{result['stage1_merged']['f1']:.3f}", flush=True)
        done.append(result)
    keys = [k for k, _ in ROWS + VALCAL_ROWS if done and all(k in r for r in done)]
    summary = {"folds": [r["test"] for r in done],
               "pooled": {k: pool(done, k) for k in keys},
               "seconds_this_invocation": round(time.perf_counter() - start, 1),
               "seconds_all_folds": round(sum(r["seconds"] for r in done), 1)}
    (args.results / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True)
                                                + "\n")
    table = format_tables(done)
    (args.results / "summary.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
