"""Ablation of Mdet's parts (paper Table 1), head comparison (Table 5) and Mclass depth (Table 6)
on a fixed synthetic benchmark, with the ``tiny`` preset.

Benchmark (same seeds, same bytes on every run): 12 training/validation fields of 1024 px
(``focas-keras synth``, seed 0, two per slide, a quarter of the slides validate; as in the
demo) and 16 held-out fields from seed 1000 (and the same 16 with a shifted stain,
used by experiments/augment_study.py). Thresholds come from the validation split only.

Mdet variants (``tiny`` preset, ``MdetConfig.override``):

    base_anchor   BN backbone + FPN, anchor (RetinaNet) branch only       Table 1 row 1
    base_hybrid   + hybrid head (anchor + FSAF)                           Table 1 row 2
    cbam          + CBAM (BN)                                             Table 1 row 3
    gnws          + GN & WS (no CBAM)                                     Table 1 row 4
    full          + both (= the tiny preset)                              Table 1 row 5
    full_anchor   full backbone, anchor branch only                       Table 5
    full_free     full backbone, anchor-free (FSAF) branch only           Table 5

Each variant: train Mdet, run its best checkpoint on the whole held-out fields, then score
stage 1 alone: recall at the inference threshold 0.05 (what stage 1 hands to stage 2),
P/R/F1 at the run's validation best-F1 threshold, and the same with the cascade's 30 px point
merge. The cascade (Table 1 last row) mines the ``full`` Mdet's false positives on a copy of
the shards, trains Mclass, and runs ``detect``; ``--cls-depths 18,34,50`` adds Table 6.

Every unit runs in its own process and writes one JSON under ``--results``; a unit whose JSON
exists is skipped (resumable).

Usage:
    python experiments/ablation.py --work /tmp/focas_ablation \
        --results experiments/results/ablation --det-epochs 8 --cls-epochs 4
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
#: Where focas_keras/data_tools are imported from (a pinned snapshot while others edit the
#: working tree; see experiments/icpr2012_cv.py); default: this checkout.
SRC = Path(os.environ.get("FOCAS_SRC", REPO)).resolve()
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

_BASE = {"backbone.cbam": False, "backbone.norm": "bn", "backbone.ws": False}
_FULL = {"backbone.cbam": True, "backbone.norm": "gn", "backbone.ws": True}
VARIANTS = {
    "base_anchor": ("backbone + FPN, anchor branch only (BN)", {**_BASE, "head.head": "anchor"}),
    "base_hybrid": ("+ hybrid head", {**_BASE, "head.head": "hybrid"}),
    "cbam": ("+ CBAM", {**_BASE, "backbone.cbam": True, "head.head": "hybrid"}),
    "gnws": ("+ GN & WS", {**_FULL, "backbone.cbam": False, "head.head": "hybrid"}),
    "full": ("+ CBAM + GN & WS (tiny preset)", {**_FULL, "head.head": "hybrid"}),
    "full_anchor": ("full backbone, anchor branch only", {**_FULL, "head.head": "anchor"}),
    "full_free": ("full backbone, anchor-free (FSAF) only", {**_FULL, "head.head": "free"}),
}
TABLE1 = ("base_anchor", "base_hybrid", "cbam", "gnws", "full")
TABLE5 = ("full_anchor", "full_free", "full")
MERGE_PX = 30.0


# ----------------------------------------------------------------------------- pure helpers


def variant_overrides(name: str, epochs: int, seed: int = 0) -> dict:
    """``MdetConfig.override`` fields of a variant."""
    if name not in VARIANTS:
        raise KeyError(f"unknown variant '{name}' (known: {', '.join(VARIANTS)})")
    return {**VARIANTS[name][1], "train.epochs": int(epochs), "train.seed": int(seed)}


def markdown_row(label: str, result: dict, keys=("recall_at_min", "stage1", "stage1_merged"),
                 extra=()) -> str:
    """One markdown row: label, then TP/FP/FN + P/R/F1 cells per result key."""
    cells = [label]
    for key in keys:
        value = result.get(key)
        if value is None:
            cells.append("-")
        elif isinstance(value, dict):
            cells.append(f"{value['tp']}/{value['fp']}/{value['fn']}; P {value['precision']:.3f} "
                         f"R {value['recall']:.3f} F1 {value['f1']:.3f}")
        else:
            cells.append(f"{value:.3f}")
    cells += [str(x) for x in extra]
    return "| " + " | ".join(cells) + " |"


def stage1_frame(per_image: dict):
    """A ``detections.csv``-shaped frame of stage-1 detections (no stage 2)."""
    import numpy as np
    import pandas as pd

    from focas_keras.evaluation.evaluate import PREDICTION_COLUMNS

    rows = []
    for image, (boxes, scores) in per_image.items():
        for (x1, y1, x2, y2), s in zip(np.asarray(boxes).reshape(-1, 4), np.ravel(scores)):
            rows.append({"image": image, "x": (x1 + x2) / 2, "y": (y1 + y2) / 2, "x1": x1,
                         "y1": y1, "x2": x2, "y2": y2, "det_score": float(s),
                         "cls_score": float("nan"), "accepted": False})
    frame = pd.DataFrame(rows, columns=list(PREDICTION_COLUMNS))
    return frame.astype({"image": str, "accepted": bool,
                         **{c: "float64" for c in PREDICTION_COLUMNS[1:-1]}})


# ----------------------------------------------------------------------------- data


def shifted_stain_patch():
    """Context manager: ``focas-keras synth`` with a shifted stain (a 'new scanner').

    The generator's own per-image stain is drawn first (same random draws, so the same seed
    gives the same tissue and the same objects); then hematoxylin is pushed fully to the
    blue-purple reference (training fields mix 30-100 % of the magenta one), made paler
    (x0.75), eosin stronger (x1.35) and the background yellower.
    """
    import contextlib

    import numpy as np

    from focas_keras.datasets import synth

    original = synth._stain

    def shifted(rng):
        stain = original(rng)
        h = np.asarray(synth._H_BLUE) / np.linalg.norm(synth._H_BLUE)
        stain = dict(stain)
        stain["h_vector"] = [round(float(v), 4) for v in h]
        stain["h_scale"] = round(stain["h_scale"] * 0.75, 4)
        stain["e_scale"] = round(stain["e_scale"] * 1.35, 4)
        stain["background"] = [round(b * f, 2) for b, f in
                               zip(stain["background"], (1.0, 0.97, 0.90))]
        return stain

    @contextlib.contextmanager
    def patched():
        synth._stain = shifted
        try:
            yield
        finally:
            synth._stain = original

    return patched()


def build_benchmark(work: Path, images: int = 12, test_images: int = 16, size: int = 1024,
                    seed: int = 0) -> dict:
    """Synthesises the fixed benchmark and its shards (skipped where already there)."""
    from focas_keras.datasets.prepare import PrepareConfig, prepare
    from focas_keras.datasets.readers import read_dataset
    from focas_keras.datasets.synth import write_dataset

    paths = {"train": work / "synth", "test": work / "synth_test",
             "test_shifted": work / "synth_test_shifted", "shards": work / "shards"}
    if not (paths["train"] / "synth.json").exists():
        write_dataset(paths["train"], images=images, size=size, seed=seed, per_slide=2,
                      overwrite=True)
    if not (paths["test"] / "synth.json").exists():
        write_dataset(paths["test"], images=test_images, size=size, seed=seed + 1000,
                      per_slide=2, overwrite=True)
    if not (paths["test_shifted"] / "synth.json").exists():
        with shifted_stain_patch():
            write_dataset(paths["test_shifted"], images=test_images, size=size,
                          seed=seed + 1000, per_slide=2, overwrite=True)
    if not (paths["shards"] / "manifest.json").exists():
        prepare(read_dataset("synth", paths["train"]), paths["shards"],
                PrepareConfig(seed=seed, val_fraction=0.25, patch_size=112), overwrite=True)
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- units


def eval_stage1(det_run: Path, test_dir: Path) -> dict:
    """Stage 1 alone on whole held-out fields (best checkpoint)."""
    import cv2

    from focas_keras.evaluation.calibrate import merged as merged_rows
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.models.mdet import detect_image
    from focas_keras import runs

    model, config = runs.load_mdet_run(det_run, runs.pick_checkpoint(det_run, "best"))
    truth = ev.read_truth(test_dir, "synth")
    per_image, t0 = {}, time.perf_counter()
    for image_id in truth.points:
        path = next(p for p in test_dir.iterdir() if p.stem == image_id and p.suffix == ".png")
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        per_image[image_id] = detect_image(model, image, config)
    seconds = time.perf_counter() - t0
    preds = stage1_frame(per_image)
    best = runs.read_json(det_run / runs.BEST_FILE)["metrics"]
    threshold = float(best["val_best_threshold"])
    keep = ("tp", "fp", "fn", "precision", "recall", "f1")
    at_min = ev.evaluate(truth, preds, 20.0, score="det", accepted_only=False,
                         threshold=config.inference.score_threshold)
    stage1 = ev.evaluate(truth, preds, 20.0, score="det", accepted_only=False,
                         threshold=threshold)
    above = preds[preds["det_score"] >= threshold]
    merged = ev.evaluate(truth, merged_rows(above, "det_score", MERGE_PX), 20.0, score="det")
    return {"recall_at_min": at_min["recall"], "candidates_at_min": int(at_min["tp"]
                                                                       + at_min["fp"]),
            "at_min": {k: at_min[k] for k in keep},
            "stage1": {k: stage1[k] for k in keep},
            "stage1_merged": {k: merged[k] for k in keep},
            "det_threshold": threshold, "val": best, "detect_seconds": round(seconds, 1)}


def run_variant(name: str, paths: dict, run_root: Path, epochs: int, seed: int,
                augment_kwargs: dict | None = None, tests=("test",),
                run_name: str | None = None) -> dict:
    """Trains one Mdet variant (resuming) and scores stage 1 on the held-out set(s).

    ``augment_kwargs`` replaces the trainer's ``AugmentConfig()`` (it only takes augment
    on/off), so such a run must get its own ``run_name``: its run.json does not record them.
    """
    import functools

    import keras

    from focas_keras.data.augment import AugmentConfig
    from focas_keras import runs
    from focas_keras.models.mdet_config import preset
    from focas_keras.training import det_trainer

    if augment_kwargs is not None:  # the trainer takes only augment on/off; patch its settings
        det_trainer.AugmentConfig = functools.partial(AugmentConfig, **augment_kwargs)
    config = preset("tiny").override(**variant_overrides(name, epochs, seed))
    run_dir = run_root / (run_name or name)
    t0 = time.perf_counter()
    det_trainer.train_det(Path(paths["shards"]), run_dir, config, log=lambda line: None)
    train_seconds = time.perf_counter() - t0
    model, _ = runs.load_mdet_run(run_dir, "model")
    result = {"variant": name, "run": run_name or name,
              "overrides": variant_overrides(name, epochs, seed),
              "params": int(model.count_params()), "train_seconds": round(train_seconds, 1),
              "augment": augment_kwargs}
    keras.backend.clear_session()
    for test in tests:
        result[test] = eval_stage1(run_dir, Path(paths[test]))
    return result


def run_cascade(paths: dict, run_root: Path, det_name: str, depth: int, cls_epochs: int,
                seed: int) -> dict:
    """Mines the Mdet run's false positives (on a copy of the shards), trains Mclass of
    ``depth`` (tiny width), runs the cascade on the held-out fields and scores it."""
    from focas_keras.training.mine import mine_hard_negatives
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.inference.cascade import Cascade, CascadeSettings, list_inputs
    from focas_keras.inference.outputs import detect_to_dir
    from focas_keras.models.mclass_config import preset as cls_preset
    from focas_keras.training.cls_trainer import train_cls

    det_run = run_root / det_name
    mined = run_root / f"shards_mined_{det_name}"
    marker = mined / "mined.json"
    t0 = time.perf_counter()
    if not marker.exists():
        shutil.rmtree(mined, ignore_errors=True)
        shutil.copytree(paths["shards"], mined)
        summary = mine_hard_negatives(det_run, paths["train"], "synth", mined)
        marker.write_text(json.dumps(summary, default=str))
    summary = json.loads(marker.read_text())
    mine_seconds = time.perf_counter() - t0
    config = cls_preset("tiny").override(**{"model.depth": depth, "train.epochs": cls_epochs,
                                            "train.seed": seed})
    cls_run = run_root / f"mclass_{det_name}_r{depth}"
    t0 = time.perf_counter()
    train_cls(mined, cls_run, config, log=lambda line: None)
    train_seconds = time.perf_counter() - t0
    cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings())
    out = run_root / f"detect_{det_name}_r{depth}"
    detect_to_dir(cascade, list_inputs([Path(paths["test"])]), out, overlays=False,
                  progress=False, overwrite=True)
    truth = ev.read_truth(paths["test"], "synth")
    preds = ev.read_predictions(out / "detections.csv")
    both = ev.evaluate(truth, preds, 20.0, score="cls", accepted_only=True)
    keep = ("tp", "fp", "fn", "precision", "recall", "f1")
    return {"det": det_name, "depth": depth, "cls_epochs": cls_epochs,
            "mined": summary.get("false_positives"), "cls_threshold": cascade.cls_threshold,
            "candidates": int(len(preds)), "cascade": {k: both[k] for k in keep},
            "mine_seconds": round(mine_seconds, 1), "train_seconds": round(train_seconds, 1)}


# ----------------------------------------------------------------------------- driver


def _unit(args, unit: str, results: Path) -> dict:
    """Runs one unit in a child process unless its JSON exists; returns its JSON."""
    path = results / f"{unit}.json"
    if not path.exists():
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "--one", unit, "--work", str(args.work),
               "--results", str(results), "--det-epochs", str(args.det_epochs),
               "--cls-epochs", str(args.cls_epochs), "--seed", str(args.seed)]
        print(f"[{time.strftime('%H:%M:%S')}] {unit} ...", flush=True)
        with open(results / f"{unit}.log", "a", encoding="utf-8") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode:
            print(f"  {unit} FAILED (exit {proc.returncode}); see {results / unit}.log",
                  flush=True)
            return {}
        print(f"  {unit} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(path.read_text())


def _one(args, unit: str, results: Path) -> None:
    paths = build_benchmark(args.work)
    runs = args.work / "runs"
    if unit.startswith("cascade_"):
        det_name, depth = unit[len("cascade_"):].rsplit("_r", 1)
        result = run_cascade(paths, runs, det_name, int(depth), args.cls_epochs, args.seed)
    else:
        result = run_variant(unit, paths, runs, args.det_epochs, args.seed)
    result["unit_seconds"] = round(time.perf_counter() - START, 1)
    tmp = results / f"{unit}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(results / f"{unit}.json")


def tables(results: Path) -> str:
    """Markdown tables from whatever unit JSONs exist."""
    def load(unit):
        path = results / f"{unit}.json"
        return json.loads(path.read_text()) if path.exists() else None

    head = ("| variant | params | train s | stage-1 recall @0.05 (candidates) | stage 1 @ val "
            "thr: TP/FP/FN; P R F1 | stage 1 + 30 px merge |\n|---|---:|---:|---|---|---|")
    lines = ["Table 1 (ablation)", "", head]
    def stage1_rows(names):
        for name in names:
            r = load(name)
            if r:
                t = r["test"]
                lines.append(f"| {VARIANTS[name][0]} | {r['params']:,} | "
                             f"{r['train_seconds']:.0f} | {t['recall_at_min']:.3f} "
                             f"({t['candidates_at_min']}) | "
                             + markdown_row("", t, keys=("stage1", "stage1_merged"))[4:])

    stage1_rows(TABLE1)
    for path in sorted(results.glob("cascade_full_r*.json")):
        r = json.loads(path.read_text())
        c = r["cascade"]
        lines.append(f"| + Mclass (cascade, ResNet-{r['depth']} tiny width) | - | "
                     f"{r['train_seconds']:.0f} (Mclass) | - | cascade: {c['tp']}/{c['fp']}/"
                     f"{c['fn']}; P {c['precision']:.3f} R {c['recall']:.3f} F1 {c['f1']:.3f} "
                     f"(Mclass thr {r['cls_threshold']:.2f}, {r['mined']} mined) | - |")
    lines += ["", "Table 5 (heads, full backbone)", "", head]
    stage1_rows(TABLE5)
    return "\n".join(lines)


START = time.perf_counter()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_ablation"))
    parser.add_argument("--results", type=Path,
                        default=REPO / "experiments" / "results" / "ablation")
    parser.add_argument("--det-epochs", type=int, default=8)
    parser.add_argument("--cls-epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="Comma-separated Mdet variants, in run order.")
    parser.add_argument("--cls-depths", default="18",
                        help="Mclass depths for the cascade row(s) (Table 6: 18,34,50).")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        _one(args, args.one, args.results)
        return 0
    t0 = time.perf_counter()
    build_benchmark(args.work)
    print(f"benchmark ready in {time.perf_counter() - t0:.0f} s", flush=True)
    units = [v for v in args.variants.split(",") if v]
    for unit in units:
        _unit(args, unit, args.results)
        if unit == "full":
            for depth in (d for d in args.cls_depths.split(",") if d):
                _unit(args, f"cascade_full_r{depth}", args.results)
    text = tables(args.results)
    (args.results / "tables.md").write_text(text + "\n")
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
