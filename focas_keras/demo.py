"""``focas-keras demo``: the whole cascade on synthetic data, in a few CPU minutes.

Synthesise training and held-out fields (with hyperchromatic look-alikes) -> shards -> train
``tiny`` Mdet -> mine its false positives on the training images -> train ``tiny`` Mclass ->
choose thresholds on the whole validation fields (stage 1 alone: its best-F1 cut; the cascade:
its best-F1 pair) -> detect on the held-out fields -> evaluate stage 1 alone and the cascade.
Nothing is chosen on the held-out fields.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pandas as pd


def _candidates(cascade, paths) -> pd.DataFrame:
    """Every candidate of a cascade on image files, as a detections table."""
    from data_tools.annotations import load_image

    frames = [cascade.run(load_image(path)).assign(image=path.stem) for path in paths]
    return pd.concat(frames, ignore_index=True)


def _row(name: str, result: dict) -> str:
    return (f"  {name:<44s} {result['tp']:>4d} {result['fp']:>5d} {result['fn']:>4d}   "
            f"{result['precision']:.3f}  {result['recall']:.3f}  {result['f1']:.3f}")


def run_demo(out, images: int = 12, size: int = 1024, test_images: int = 4, seed: int = 0,
             det_epochs: int = 8, cls_epochs: int = 4, mimics: float = 2.0, echo=print) -> dict:
    """Runs the demo pipeline in ``out`` (replaced when it exists).

    Args:
        out: working directory.
        images: synthetic training/validation fields (two per slide; a quarter of the slides
            validate).
        size: field side, px.
        test_images: held-out fields for the final evaluation (another seed).
        seed: seed of everything.
        det_epochs, cls_epochs: training length of the two stages.
        mimics: hyperchromatic look-alikes in every field (see ``focas-keras synth``): the
            false positives a detector makes and a second stage is there to remove.
        echo: where progress lines go.

    Returns:
        dict with the stage-1 and cascade metrics and the output paths.
    """
    from data_tools.mine import mine_hard_negatives
    from data_tools.prepare import PrepareConfig, prepare
    from data_tools.readers import read_dataset
    from data_tools.synth import write_dataset
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.evaluation.calibrate import calibrate_cascade, calibrate_stage1
    from focas_keras.evaluation.calibrate import merged as merged_rows
    from focas_keras.inference.cascade import Cascade, CascadeSettings, list_inputs
    from focas_keras.inference.outputs import detect_to_dir
    from focas_keras.models.mclass_config import preset as cls_preset
    from focas_keras.models.mdet_config import preset as det_preset
    from focas_keras.training.cls_trainer import train_cls
    from focas_keras.training.det_trainer import train_det

    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    start = time.perf_counter()

    def step(text):
        echo(f"[{time.perf_counter() - start:5.0f} s] {text}")

    data, test = out / "synth", out / "synth_test"
    write_dataset(data, images=images, size=size, seed=seed, per_slide=2, mimics=mimics)
    write_dataset(test, images=test_images, size=size, seed=seed + 1000, per_slide=2,
                  mimics=mimics)
    step(f"synthesised {images} fields for training/validation and {test_images} held-out "
         f"fields ({size} px) in {out}")
    shards = out / "shards"
    # Mclass sees 112 px crops shrunk to its 64 px input, in training and at test time alike.
    manifest = prepare(read_dataset("synth", data), shards,
                       PrepareConfig(seed=seed, val_fraction=0.25, patch_size=112))
    counts = manifest["splits"]
    step(f"shards: train {counts['train']['det']['records']} tiles / "
         f"{counts['train']['cls']['records']} patches, val {counts['val']['det']['records']} "
         f"tiles / {counts['val']['cls']['records']} patches")
    det_config = det_preset("tiny").override(**{"train.epochs": det_epochs,
                                                "train.seed": seed})
    det_run = out / "mdet"
    train_det(shards, det_run, det_config, log=lambda line: step("Mdet " + line))
    mined = mine_hard_negatives(det_run, data, "synth", shards)
    step(f"mined {mined['false_positives']} hard negatives from Mdet's false positives on "
         f"{mined['images']} training fields")
    cls_config = cls_preset("tiny").override(**{"train.epochs": cls_epochs, "train.seed": seed})
    cls_run = out / "mclass"
    train_cls(shards, cls_run, cls_config, log=lambda line: step("Mclass " + line))

    # Thresholds: both stages' on the whole validation fields (never the held-out ones).
    loose = Cascade.from_runs(det_run, cls_run, CascadeSettings(
        det_threshold=det_config.inference.score_threshold, cls_threshold=0.0))
    val_images = set(manifest["splits"]["val"]["images"])
    val_truth = {k: v for k, v in ev.read_truth(data, "synth").points.items() if k in val_images}
    val_preds = _candidates(loose, [p for p in list_inputs([data]) if p.stem in val_images])
    merge_px = CascadeSettings().merge_px
    stage1_cal = calibrate_stage1(val_truth, val_preds, 20.0, merge_px)
    cascade_cal = calibrate_cascade(val_truth, val_preds, 20.0, merge_px,
                                    min_det_threshold=det_config.inference.score_threshold)
    step(f"thresholds from the {len(val_truth)} validation fields: stage 1 alone det >= "
         f"{stage1_cal['det_threshold']:.2f} (F1 {stage1_cal['f1']:.3f}); cascade det >= "
         f"{cascade_cal['det_threshold']:.2f} and Mclass >= {cascade_cal['cls_threshold']:.2f} "
         f"(F1 {cascade_cal['f1']:.3f})")

    settings = CascadeSettings(det_threshold=cascade_cal["det_threshold"],
                               cls_threshold=cascade_cal["cls_threshold"], merge_px=merge_px)
    cascade = Cascade(loose.det_model, loose.det_config, loose.cls_model, loose.cls_config,
                      settings)
    detections = out / "detections"
    detect_to_dir(cascade, list_inputs([test]), detections, progress=False)
    step(f"detected on the {test_images} held-out fields: {detections}")

    truth = ev.read_truth(test, "synth")
    preds = ev.read_predictions(detections / "detections.csv")
    test_candidates = _candidates(loose, list_inputs([test]))
    det_threshold = stage1_cal["det_threshold"]
    stage1 = ev.evaluate(truth, test_candidates, 20.0, score="det", accepted_only=False,
                         threshold=det_threshold)
    merged = ev.evaluate(
        truth, merged_rows(test_candidates[test_candidates["det_score"] >= det_threshold],
                           "det_score", merge_px), 20.0, score="det")
    both = ev.evaluate(truth, preds, 20.0, score="cls", accepted_only=True)
    lines = ["", f"held-out synthetic fields ({test_images}), match radius 20 px, one-to-one:",
             f"  {'':<44s} {'TP':>4s} {'FP':>5s} {'FN':>4s}   P      R      F1",
             _row(f"stage 1 alone (score >= {det_threshold:.2f})", stage1),
             _row(f"stage 1 alone + {merge_px:.0f} px merge", merged),
             _row(f"cascade (det >= {cascade.det_threshold:.2f}, "
                  f"Mclass >= {cascade.cls_threshold:.2f})", both),
             f"overlays: {detections / 'overlays'}; table: {detections / 'detections.csv'}",
             f"done in {time.perf_counter() - start:.0f} s"]
    for line in lines:
        echo(line)
    return {"stage1": stage1, "stage1_merged": merged, "cascade": both,
            "thresholds": {"stage1": stage1_cal, "cascade": cascade_cal},
            "detections": str(detections),
            "seconds": time.perf_counter() - start}
