"""``mine_hard_negatives``: stage 1's false positives on training images -> Mclass patches.

Mdet runs on every whole TRAINING image of a prepared shard directory (validation images are
never looked at). Detections farther than ``radius`` px from every annotated mitosis become
label-0 patches (source ``mined``); optionally the detections near a mitosis become label-1
patches (source ``mined_tp``). They go to new cls shards of split ``train``, so the training
pipeline reads them with the prepared patches.

Re-running replaces the previous mined shards instead of adding to them. The new generation is
written to a temporary directory and only moved next to the other shards when complete; the
manifest is then replaced atomically and the old generation's files are deleted last, so a
failure at any point leaves a valid manifest whose shards all exist and verify.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools import sampling
from data_tools.annotations import MITOSIS, load_image
from data_tools.prepare import TRAIN, _encode_png, _rescale
from data_tools.readers import read_dataset
from data_tools.shards import ShardWriter
from focas_keras import __version__
from focas_keras.data import pipeline, records
from focas_keras.errors import InputError
from focas_keras.io import write_json_atomic

MINED, MINED_TP = "mined", "mined_tp"
SHARD_PREFIX = "train-mined"


def find_false_positives(det_boxes, det_scores, gt_xy, radius: float = 20.0):
    """Splits detections into false positives and detections near a mitosis.

    Not one-to-one: every detection within ``radius`` of any mitosis counts as near it, so
    duplicates on one mitosis are never taken as hard negatives.

    Args:
        det_boxes: (D, 4) x1, y1, x2, y2 pixels.
        det_scores: (D,) scores (only their count is checked).
        gt_xy: (G, 2) mitosis centroids (x, y).
        radius: a detection centre within this distance (<=) of a centroid is a true positive.

    Returns:
        (fp_mask (D,) bool, tp_mask (D,) bool); the two masks are complementary.
    """
    boxes = np.asarray(det_boxes, np.float64).reshape(-1, 4)
    if len(np.asarray(det_scores).reshape(-1)) != len(boxes):
        raise ValueError("det_boxes and det_scores differ in length")
    gt_xy = np.asarray(gt_xy, np.float64).reshape(-1, 2)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    if not len(gt_xy) or not len(boxes):
        tp = np.zeros(len(boxes), bool)
    else:
        distances = np.hypot(centres[:, None, 0] - gt_xy[None, :, 0],
                             centres[:, None, 1] - gt_xy[None, :, 1])
        tp = (distances <= radius).any(axis=1)
    return ~tp, tp


def _box_centres(boxes, width: int, height: int) -> np.ndarray:
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    centres = np.round((boxes[:, :2] + boxes[:, 2:]) / 2.0).astype(np.int64)
    centres[:, 0] = np.clip(centres[:, 0], 0, width - 1)
    centres[:, 1] = np.clip(centres[:, 1], 0, height - 1)
    return centres


def _make_detector(det_run, score_threshold):
    from focas_keras.inference.cascade import run_data_mpp
    from focas_keras.models.mdet import Detector, load_mdet_run

    if det_run is None:
        raise InputError("no detector run given")
    model, config = load_mdet_run(det_run)
    threshold = config.inference.score_threshold if score_threshold is None else score_threshold
    return (Detector(model, config, threshold).detect_image, float(threshold),
            run_data_mpp(det_run))


def _detect_at(detector, image, image_mpp, det_mpp, image_id):
    """Runs ``detector`` at ``det_mpp`` (None: on the image as it is); boxes in image pixels."""
    from focas_keras.inference.resize import resize_by

    if det_mpp is None or image_mpp == det_mpp:
        return detector(image)
    if not (image_mpp is not None and np.isfinite(image_mpp) and image_mpp > 0):
        raise InputError(f"image '{image_id}' has no pixel size, but the detector runs at "
                         f"{det_mpp:g} um/px")
    small, sx, sy = resize_by(image, float(image_mpp) / float(det_mpp))
    boxes, scores = detector(small)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])
    return boxes, scores


def _update_counts(cls_counts: dict, fp: int, tp: int) -> None:
    old_fp, old_tp = cls_counts.get(MINED, 0), cls_counts.get(MINED_TP, 0)
    cls_counts["records"] += fp + tp - old_fp - old_tp
    cls_counts["negative"] += fp - old_fp
    cls_counts["positive"] += tp - old_tp
    cls_counts[MINED], cls_counts[MINED_TP] = fp, tp


def mine_hard_negatives(det_run, source, fmt, shard_dir, score_threshold=None,
                        keep_true_positives=False, radius=20.0, max_per_image=200,
                        progress=False, detector=None, det_mpp=None) -> dict:
    """Mines Mdet's false positives on the training images into new cls shards.

    Args:
        det_run: ``train-det`` run directory (may be None when ``detector`` is given).
        source: dataset the shards were prepared from.
        fmt: its format (see :func:`data_tools.readers.read_dataset`).
        shard_dir: directory written by ``prepare``; updated in place.
        score_threshold: detection threshold; None takes the run's inference threshold. With
            ``detector`` it is only recorded (the callable applies its own threshold).
        keep_true_positives: also write detections near a mitosis as label-1 patches.
        radius: px from a mitosis centroid within which a detection is not a false positive.
        max_per_image: at most this many detections (highest scores) per image.
        progress: show a progress bar over images.
        detector: optional callable ``(image uint8 (H, W, 3)) -> (boxes (D, 4), scores (D,))``
            used instead of loading ``det_run`` (tests, other detectors).
        det_mpp: pixel size (um/px) the detector runs at; images are resized to it for
            detection and the boxes mapped back to the patches' pixels. None: ``det_run``'s
            (:func:`~focas_keras.inference.cascade.run_data_mpp`), or the patches' own
            pixel size when the run was trained on unrescaled shards.

    Returns:
        The ``mining`` summary, also stored in the manifest.

    Raises:
        InputError: no training images, a training image missing from ``source``, or a shard
            failing its checksum.
    """
    shard_dir = Path(shard_dir)
    manifest = pipeline.load_manifest(shard_dir)
    pipeline.verify_shards(shard_dir, manifest["shards"])
    train_ids = list(manifest["splits"].get(TRAIN, {}).get("images", []))
    if not train_ids:
        raise InputError("the manifest has no training images to mine", shard_dir)
    if radius <= 0 or max_per_image < 1:
        raise InputError("radius must be > 0 and max per image >= 1")
    aset = read_dataset(fmt, source)
    images = aset.images.set_index("image_id")
    for image_id in train_ids:
        if image_id not in images.index:
            raise InputError(f"training image '{image_id}' of the manifest is not in the "
                             "dataset", source)
    threshold = score_threshold
    if detector is None:
        detector, threshold, run_mpp = _make_detector(det_run, score_threshold)
        det_mpp = run_mpp if det_mpp is None else det_mpp
    params = manifest["parameters"]
    target_mpp, size = params.get("target_mpp"), int(manifest["patch_size"])
    max_bytes = int(float(params.get("shard_mb", 64.0)) * (1 << 20))
    generation = int(manifest.get("mining", {}).get("generation", 0)) + 1
    split_name = f"{SHARD_PREFIX}-g{generation}"
    stats = {"detections": 0, "false_positives": 0, "true_positives": 0}
    written = {MINED: 0, MINED_TP: 0}
    tmp = shard_dir / f".mine-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = ShardWriter(tmp, records.CLS, split_name, max_bytes)
    try:
        for image_id in tqdm(train_ids, desc="mine", unit="image", disable=not progress):
            info = images.loc[image_id]
            objects = aset.annotations[aset.annotations.image_id == image_id]
            factor = 1.0 if target_mpp is None else float(info.mpp) / float(target_mpp)
            image, objects = _rescale(load_image(info.image_path), objects, factor)
            image_mpp = float(info.mpp) if target_mpp is None else float(target_mpp)
            boxes, scores = _detect_at(detector, image, image_mpp, det_mpp, image_id)
            boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
            scores = np.asarray(scores, np.float64).reshape(-1)
            keep = np.argsort(-scores, kind="stable")[:max_per_image]
            boxes, scores = boxes[keep], scores[keep]
            gt_xy = objects[objects.label == MITOSIS][["x", "y"]].to_numpy(np.float64)
            fp_mask, tp_mask = find_false_positives(boxes, scores, gt_xy, radius)
            stats["detections"] += len(boxes)
            stats["false_positives"] += int(fp_mask.sum())
            stats["true_positives"] += int(tp_mask.sum())
            centres = _box_centres(boxes, image.shape[1], image.shape[0])
            wanted = [(fp_mask, 0, MINED)]
            if keep_true_positives:
                wanted.append((tp_mask, 1, MINED_TP))
            for mask, label, tag in wanted:
                for cx, cy in centres[mask]:
                    patch = sampling.crop(image, int(cx) - size // 2, int(cy) - size // 2, size)
                    writer.write(records.cls_example(_encode_png(patch), label, tag, image_id,
                                                     str(info.slide_id), (int(cx), int(cy))))
                    written[tag] += 1
        entries = writer.close()
        for entry in entries:  # complete: move next to the other shards (new names, no clash)
            target = shard_dir / entry["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / entry["path"], target)
            entry.update(split=TRAIN, source=MINED)
    except BaseException:
        writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    kept = [e for e in manifest["shards"] if e.get("source") != MINED]
    manifest["shards"] = sorted(kept + entries, key=lambda e: e["path"])
    _update_counts(manifest["splits"][TRAIN]["cls"], written[MINED], written[MINED_TP])
    mining = {
        "det_run": None if det_run is None else str(Path(det_run).resolve()),
        "det_mpp": None if det_mpp is None else float(det_mpp),
        "score_threshold": threshold, "radius": float(radius),
        "keep_true_positives": bool(keep_true_positives), "max_per_image": int(max_per_image),
        "images": len(train_ids), **stats, "records": written[MINED] + written[MINED_TP],
        "generation": generation, "package_version": __version__,
    }
    manifest["mining"] = mining
    write_json_atomic(shard_dir / records.MANIFEST, manifest)
    # Last: delete the previous generation and leftovers of interrupted runs.
    listed = {e["path"] for e in manifest["shards"]}
    for path in (shard_dir / records.CLS).glob(f"{SHARD_PREFIX}-*.tfrecord*"):
        if path.relative_to(shard_dir).as_posix() not in listed:
            path.unlink(missing_ok=True)
    return mining
