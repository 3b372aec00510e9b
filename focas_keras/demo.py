"""``focas-keras demo``: the whole cascade on synthetic data, in a few CPU minutes.

Synthesise training and held-out fields (with hyperchromatic look-alikes) -> shards -> train
``tiny`` Mdet -> mine its false positives on the training images -> train ``tiny`` Mclass ->
choose thresholds on the whole validation fields (stage 1 alone: its best-F1 cut; the cascade:
its best-F1 pair) -> detect on the held-out fields -> evaluate stage 1 alone and the cascade.
Nothing is chosen on the held-out fields.

Everything is built in a temporary directory beside ``out`` and renamed into place at the
end (:func:`focas_keras.io.atomic_output_dir`): an interrupted demo leaves what was there
untouched and nothing new that looks complete. The chosen pair is saved as
``out/thresholds.json`` (as ``calibrate --write`` saves it), and the demo ends with the
``focas-keras detect`` and ``evaluate`` lines that reproduce its held-out result.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pandas as pd


def _candidates(cascade, paths) -> pd.DataFrame:
    """Every candidate of a cascade on image files, as a detections table."""
    from focas_keras.datasets.annotations import load_image

    frames = [cascade.run(load_image(path)).assign(image=path.stem) for path in paths]
    return pd.concat(frames, ignore_index=True)


def _row(name: str, result: dict) -> str:
    return (f"  {name:<44s} {result['tp']:>4d} {result['fp']:>5d} {result['fn']:>4d}   "
            f"{result['precision']:.3f}  {result['recall']:.3f}  {result['f1']:.3f}")


def _relocate(value, old: str, new: str):
    """``value`` (JSON data) with every string that starts with path ``old`` moved to
    ``new``."""
    if isinstance(value, dict):
        return {k: _relocate(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [_relocate(v, old, new) for v in value]
    if isinstance(value, str) and (value == old or value.startswith(old + os.sep)):
        return new + value[len(old):]
    return value


def _relocate_records(root: Path, final: Path) -> None:
    """Rewrites the paths under the temporary build directory ``root`` that the steps recorded
    in their JSON files (run.json, manifest.json, detect.json...) to where ``root`` is about
    to be renamed, so nothing points at a directory that will not exist."""
    from focas_keras.io import write_json_atomic

    # (recorded form, its final form), longest first: the resolved and absolute forms, and
    # the path as the demo was given it.
    moves = sorted({(str(root.resolve()), str(final.resolve())),
                    (os.path.abspath(root), os.path.abspath(final)), (str(root), str(final))},
                   key=lambda move: len(move[0]), reverse=True)
    for path in sorted(root.rglob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        moved = data
        for old, new in moves:
            moved = _relocate(moved, old, new)
        if moved != data:
            write_json_atomic(path, moved)


def _command(*words) -> str:
    return " ".join(shlex.quote(str(w)) for w in words)


def run_demo(out, images: int = 12, size: int = 1024, test_images: int = 4, seed: int = 0,
             det_epochs: int = 8, cls_epochs: int = 4, mimics: float = 2.0,
             overwrite: bool = False, echo=print) -> dict:
    """Runs the demo pipeline into ``out``.

    The demo is built in a temporary sibling directory and renamed to ``out`` when complete;
    an existing non-empty ``out`` is refused unless ``overwrite`` (and then replaced only at
    that end). On any error or interruption the temporary directory is removed and ``out``
    is as it was.

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
        overwrite: replace an existing non-empty ``out``.
        echo: where progress lines go.

    Returns:
        dict with the stage-1 and cascade metrics, the chosen thresholds, the output paths
        (``detections``, ``runs``, ``thresholds_file``, all under ``out``) and ``reproduce``
        (the ``detect`` and ``evaluate`` command lines).

    Raises:
        InputError: ``out`` exists and is not empty, without ``overwrite``.
    """
    from focas_keras.io import atomic_output_dir

    final = Path(out)
    with atomic_output_dir(final, overwrite=overwrite) as tmp:
        result = _run_demo(tmp, final, images=images, size=size, test_images=test_images,
                           seed=seed, det_epochs=det_epochs, cls_epochs=cls_epochs,
                           mimics=mimics, echo=echo)
        _relocate_records(tmp, final)
    for line in result.pop("lines"):
        echo(line)
    return result


def _run_demo(out: Path, final: Path, images, size, test_images, seed, det_epochs, cls_epochs,
              mimics, echo) -> dict:
    """The demo's steps, building in ``out`` (renamed to ``final`` afterwards); returns
    :func:`run_demo`'s dict plus ``lines``, the summary to print once ``final`` exists."""
    from focas_keras.training.mine import mine_hard_negatives
    from focas_keras.datasets.prepare import PrepareConfig, prepare
    from focas_keras.datasets.readers import read_dataset
    from focas_keras.datasets.synth import write_dataset
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.evaluation.calibrate import calibrate_cascade, calibrate_stage1
    from focas_keras.evaluation.calibrate import merged as merged_rows
    from focas_keras.evaluation.calibrate import thresholds_record, write_thresholds
    from focas_keras.inference.cascade import Cascade, CascadeSettings, list_inputs
    from focas_keras.inference.outputs import detect_to_dir
    from focas_keras.models.mclass_config import preset as cls_preset
    from focas_keras.models.mdet_config import preset as det_preset
    from focas_keras.training.cls_trainer import train_cls
    from focas_keras.training.det_trainer import train_det

    start = time.perf_counter()

    def step(text):
        echo(f"[{time.perf_counter() - start:5.0f} s] {text}")

    data, test = out / "synth", out / "synth_test"
    write_dataset(data, images=images, size=size, seed=seed, per_slide=2, mimics=mimics)
    write_dataset(test, images=test_images, size=size, seed=seed + 1000, per_slide=2,
                  mimics=mimics)
    step(f"synthesised {images} fields for training/validation and {test_images} held-out "
         f"fields ({size} px) for {final}")
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
    thresholds_file = out / "thresholds.json"
    write_thresholds(thresholds_file, thresholds_record(
        cascade_cal, merge_px, {
            "truth": str(final / "synth"), "format": "synth", "pred": None,
            "images": sorted(val_truth), "mitoses": int(sum(map(len, val_truth.values()))),
            "radius_px": 20.0,
            "detect": {"runs": {"det": str((final / "mdet").resolve()),
                                "cls": str((final / "mclass").resolve())},
                       "tta": False, "det_threshold": loose.det_threshold,
                       "cls_threshold": loose.cls_threshold, "mpp": loose.settings.mpp}},
        stage1=stage1_cal, tta=False, written_by="focas-keras demo"))

    settings = CascadeSettings(det_threshold=cascade_cal["det_threshold"],
                               cls_threshold=cascade_cal["cls_threshold"], merge_px=merge_px)
    cascade = Cascade(loose.det_model, loose.det_config, loose.cls_model, loose.cls_config,
                      settings)
    detections = out / "detections"
    detect_to_dir(cascade, list_inputs([test]), detections, progress=False,
                  extra={"runs": {"det": str((final / "mdet").resolve()),
                                  "cls": str((final / "mclass").resolve())},
                         "thresholds_file": {"path": str(final / "thresholds.json"),
                                             "used": {"det_threshold": settings.det_threshold,
                                                      "cls_threshold": settings.cls_threshold,
                                                      "merge_px": settings.merge_px}}})
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
    again = final / "detections_again"
    reproduce = {
        "detect": _command("focas-keras", "detect", final / "synth_test", "--det",
                           final / "mdet", "--cls", final / "mclass", "--thresholds",
                           final / "thresholds.json", "--out", again),
        "evaluate": _command("focas-keras", "evaluate", "--truth", final / "synth_test",
                             "--format", "synth", "--pred", again / "detections.csv")}
    lines = ["", f"held-out synthetic fields ({test_images}), match radius 20 px, one-to-one:",
             f"  {'':<44s} {'TP':>4s} {'FP':>5s} {'FN':>4s}   P      R      F1",
             _row(f"stage 1 alone (score >= {det_threshold:.2f})", stage1),
             _row(f"stage 1 alone + {merge_px:.0f} px merge", merged),
             _row(f"cascade (det >= {cascade.det_threshold:.2f}, "
                  f"Mclass >= {cascade.cls_threshold:.2f})", both),
             f"overlays: {final / 'detections' / 'overlays'}; table: "
             f"{final / 'detections' / 'detections.csv'}",
             f"trained runs: Mdet {final / 'mdet'}, Mclass {final / 'mclass'}; thresholds "
             f"chosen on the validation fields: {final / 'thresholds.json'}",
             "the cascade's held-out result again, from the command line:",
             f"  {reproduce['detect']}",
             f"  {reproduce['evaluate']}",
             f"done in {time.perf_counter() - start:.0f} s"]
    return {"stage1": stage1, "stage1_merged": merged, "cascade": both,
            "thresholds": {"stage1": stage1_cal, "cascade": cascade_cal},
            "detections": str(final / "detections"),
            "runs": {"det": str(final / "mdet"), "cls": str(final / "mclass")},
            "thresholds_file": str(final / "thresholds.json"), "reproduce": reproduce,
            "seconds": time.perf_counter() - start, "lines": lines}
