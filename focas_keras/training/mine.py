"""``mine_hard_negatives``: stage 1's candidates on whole images -> Mclass patches.

Mdet runs on every whole TRAINING image of a prepared shard directory through the inference
engine, as ``detect`` runs stage 1 (all candidates at the run's own score threshold, capped per
mm2; :func:`~focas_keras.inference.loading.load_stage1`). Detections farther than ``radius`` px from
every annotated mitosis become label-0 patches (source ``mined``); optionally the detections
near a mitosis become label-1 patches (source ``mined_tp``). They go to new cls shards of split
``train``, so the training pipeline reads them with the prepared patches. Validation images
are looked at only with ``include_val``: their candidates go to the ``val`` split, for
selecting Mclass and its thresholds on the cascade's real input, never for training.

Re-running replaces the previous mined shards instead of adding to them. The new generation is
written to a temporary directory and only moved next to the other shards when complete; the
manifest is then replaced atomically and the old generation's files are deleted last, so a
failure at any point leaves a valid manifest whose shards all exist and verify.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
from tqdm import tqdm

from focas_keras.datasets import sampling
from focas_keras.datasets.annotations import MITOSIS, load_image
from focas_keras.datasets.prepare import TRAIN, VAL, _encode_png, _rescale
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.shards import ShardWriter
from focas_keras import __version__
from focas_keras.data import pipeline, records
from focas_keras.errors import InputError
from focas_keras.io import write_json_atomic

MINED, MINED_TP = "mined", "mined_tp"
SHARD_PREFIX = "train-mined"
#: Shard name prefix of each split's mined candidates.
PREFIXES = {"train": SHARD_PREFIX, "val": "val-mined"}


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


def _make_detector(det_run, score_threshold, per_mm2):
    """``(image, image_mpp, det_mpp) -> (boxes, scores)`` for a train-det run: stage 1 of the
    inference engine (:func:`~focas_keras.inference.engine.detect_field`, as ``detect`` runs
    it) on an image already in Mdet's pixels, at most ``per_mm2`` candidates per mm2 of the
    pixel size it runs at; plus the threshold used and the run's pixel size."""
    from focas_keras.inference.cascade import Cascade
    from focas_keras.inference.loading import load_stage1
    from focas_keras.runs import run_data_mpp

    if det_run is None:
        raise InputError("no detector run given")
    base = load_stage1(det_run, det_threshold=score_threshold,
                       max_candidates_per_mm2=per_mm2)
    cascades = {base.det_mpp: base}

    def detect(image, image_mpp, det_mpp):
        mpp = det_mpp if det_mpp is not None else image_mpp
        if mpp is None or not np.isfinite(mpp):
            mpp = base.det_mpp  # as detect: ICPR 2012's pixel size when nothing says
        cascade = cascades.get(float(mpp))
        if cascade is None:  # a run trained on unrescaled images: caps at each image's mpp
            settings = dataclasses.replace(base.settings, det_mpp=float(mpp))
            cascade = Cascade(base.det_model, base.det_config, None, None, settings)
            cascades[float(mpp)] = cascade
        return cascade.detect_resized(image)

    return detect, float(base.det_threshold), run_data_mpp(det_run)


def _detect_at(detector, image, image_mpp, det_mpp, image_id, takes_mpp=False):
    """Runs ``detector`` at ``det_mpp`` (None: on the image as it is); boxes in image pixels.

    ``takes_mpp``: the detector is called as ``detector(image, mpp of that image, det_mpp)``
    (the run's own, which caps candidates per area) instead of ``detector(image)``.
    """
    from focas_keras.inference.resize import resize_by

    def call(img, mpp):
        return detector(img, mpp, det_mpp) if takes_mpp else detector(img)

    if det_mpp is None or image_mpp == det_mpp:
        return call(image, image_mpp)
    if not (image_mpp is not None and np.isfinite(image_mpp) and image_mpp > 0):
        raise InputError(f"image '{image_id}' has no pixel size, but the detector runs at "
                         f"{det_mpp:g} um/px")
    small, sx, sy = resize_by(image, float(image_mpp) / float(det_mpp))
    boxes, scores = call(small, det_mpp)
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4) / np.array([sx, sy, sx, sy])
    return boxes, scores


def _update_counts(cls_counts: dict, fp: int, tp: int) -> None:
    old_fp, old_tp = cls_counts.get(MINED, 0), cls_counts.get(MINED_TP, 0)
    cls_counts["records"] += fp + tp - old_fp - old_tp
    cls_counts["negative"] += fp - old_fp
    cls_counts["positive"] += tp - old_tp
    cls_counts[MINED], cls_counts[MINED_TP] = fp, tp


def mine_hard_negatives(det_run, source, fmt, shard_dir, score_threshold=None,
                        keep_true_positives=False, radius=20.0, max_per_image=None,
                        progress=False, detector=None, det_mpp=None, include_val=False,
                        per_mm2=2000.0) -> dict:
    """Mines Mdet's candidates on whole images into new cls shards.

    On the TRAINING images every candidate farther than ``radius`` from every mitosis becomes a
    label-0 patch (source ``mined``), and with ``keep_true_positives`` the others label-1
    patches (``mined_tp``). With ``include_val`` every candidate on the VALIDATION images goes
    to the val split the same way (label 1 near a mitosis), each carrying its stage-1 score,
    and the manifest records those images' mitoses (``mining.val_truth``): ``train-cls`` then
    selects its checkpoint and thresholds by the cascade's F1 on whole validation fields.

    Args:
        det_run: ``train-det`` run directory (may be None when ``detector`` is given).
        source: dataset the shards were prepared from.
        fmt: its format (see :func:`focas_keras.datasets.readers.read_dataset`).
        shard_dir: directory written by ``prepare``; updated in place.
        score_threshold: detection threshold; None takes the run's inference threshold. With
            ``detector`` it is only recorded (the callable applies its own threshold).
        keep_true_positives: also write training detections near a mitosis as label-1 patches.
        radius: px from a mitosis centroid within which a detection is not a false positive.
        max_per_image: at most this many detections (highest scores) per image; None: all.
        progress: show a progress bar over images.
        detector: optional callable ``(image uint8 (H, W, 3)) -> (boxes (D, 4), scores (D,))``
            used instead of loading ``det_run`` (tests, other detectors).
        det_mpp: pixel size (um/px) the detector runs at; images are resized to it for
            detection and the boxes mapped back to the patches' pixels. None: ``det_run``'s
            (:func:`~focas_keras.runs.run_data_mpp`), or the patches' own
            pixel size when the run was trained on unrescaled shards.
        include_val: also mine the validation images (see above).
        per_mm2: candidates per mm2 of image the loaded run may return (``detect``'s
            ``--max-candidates-per-mm2``, > 0); ignored with ``detector``.

    Returns:
        The ``mining`` summary, also stored in the manifest.

    Raises:
        InputError: no training images, a training image missing from ``source``, or a shard
            failing its checksum.
    """
    shard_dir = Path(shard_dir)
    manifest = pipeline.load_manifest(shard_dir)
    pipeline.verify_shards(shard_dir, manifest["shards"])
    splits = {TRAIN: list(manifest["splits"].get(TRAIN, {}).get("images", []))}
    if not splits[TRAIN]:
        raise InputError("the manifest has no training images to mine", shard_dir)
    if include_val:
        splits[VAL] = list(manifest["splits"].get(VAL, {}).get("images", []))
        if not splits[VAL]:
            raise InputError("the manifest has no validation images to mine", shard_dir)
    if radius <= 0 or (max_per_image is not None and max_per_image < 1):
        raise InputError("radius must be > 0 and max per image >= 1")
    aset = read_dataset(fmt, source)
    images = aset.images.set_index("image_id")
    for image_id in [i for ids in splits.values() for i in ids]:
        if image_id not in images.index:
            raise InputError(f"image '{image_id}' of the manifest is not in the dataset", source)
    threshold = score_threshold
    takes_mpp = detector is None
    if detector is None:
        detector, threshold, run_mpp = _make_detector(det_run, score_threshold, per_mm2)
        det_mpp = run_mpp if det_mpp is None else det_mpp
    params = manifest["parameters"]
    target_mpp, size = params.get("target_mpp"), int(manifest["patch_size"])
    max_bytes = int(float(params.get("shard_mb", 64.0)) * (1 << 20))
    generation = int(manifest.get("mining", {}).get("generation", 0)) + 1
    stats = {"detections": 0, "false_positives": 0, "true_positives": 0}
    val_stats = {"detections": 0, "false_positives": 0, "true_positives": 0}
    written = {split: {MINED: 0, MINED_TP: 0} for split in splits}
    val_truth, val_mpp = {}, None
    tmp = shard_dir / f".mine-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    writers = {split: ShardWriter(tmp, records.CLS, f"{PREFIXES[split]}-g{generation}",
                                  max_bytes) for split in splits}
    jobs = [(split, image_id) for split, ids in splits.items() for image_id in ids]
    try:
        for split, image_id in tqdm(jobs, desc="mine", unit="image", disable=not progress):
            info = images.loc[image_id]
            objects = aset.annotations[aset.annotations.image_id == image_id]
            factor = 1.0 if target_mpp is None else float(info.mpp) / float(target_mpp)
            image, objects = _rescale(load_image(info.image_path), objects, factor)
            image_mpp = float(info.mpp) if target_mpp is None else float(target_mpp)
            boxes, scores = _detect_at(detector, image, image_mpp, det_mpp, image_id, takes_mpp)
            boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
            scores = np.asarray(scores, np.float64).reshape(-1)
            keep = np.argsort(-scores, kind="stable")[:max_per_image]
            boxes, scores = boxes[keep], scores[keep]
            gt_xy = objects[objects.label == MITOSIS][["x", "y"]].to_numpy(np.float64)
            fp_mask, tp_mask = find_false_positives(boxes, scores, gt_xy, radius)
            counter = stats if split == TRAIN else val_stats
            counter["detections"] += len(boxes)
            counter["false_positives"] += int(fp_mask.sum())
            counter["true_positives"] += int(tp_mask.sum())
            if split == VAL:
                val_truth[image_id] = gt_xy.tolist()
                val_mpp = image_mpp
            centres = _box_centres(boxes, image.shape[1], image.shape[0])
            wanted = [(fp_mask, 0, MINED)]
            if keep_true_positives or split == VAL:
                wanted.append((tp_mask, 1, MINED_TP))
            for mask, label, tag in wanted:
                for (cx, cy), score in zip(centres[mask], scores[mask]):
                    patch = sampling.crop(image, int(cx) - size // 2, int(cy) - size // 2, size)
                    writers[split].write(records.cls_example(
                        _encode_png(patch), label, tag, image_id, str(info.slide_id),
                        (int(cx), int(cy)), score=float(score)))
                    written[split][tag] += 1
        entries = []
        for split, writer in writers.items():
            for entry in writer.close():  # complete: move next to the other shards
                target = shard_dir / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp / entry["path"], target)
                entry.update(split=split, source=MINED)
                entries.append(entry)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    kept = [e for e in manifest["shards"] if e.get("source") != MINED]
    manifest["shards"] = sorted(kept + entries, key=lambda e: e["path"])
    for split in (TRAIN, VAL):
        if split in manifest["splits"]:
            counts = written.get(split, {MINED: 0, MINED_TP: 0})
            _update_counts(manifest["splits"][split]["cls"], counts[MINED], counts[MINED_TP])
    mining = {
        "det_run": None if det_run is None else str(Path(det_run).resolve()),
        "det_mpp": None if det_mpp is None else float(det_mpp),
        "score_threshold": threshold, "radius": float(radius),
        "keep_true_positives": bool(keep_true_positives),
        "max_per_image": None if max_per_image is None else int(max_per_image),
        "max_candidates_per_mm2": None if not takes_mpp else per_mm2,
        "images": len(splits[TRAIN]), **stats,
        "records": written[TRAIN][MINED] + written[TRAIN][MINED_TP],
        "generation": generation, "package_version": __version__,
    }
    if include_val:
        mining["val"] = {"images": len(splits[VAL]), **val_stats,
                         "records": written[VAL][MINED] + written[VAL][MINED_TP]}
        mining["val_truth"] = val_truth
        mining["val_mpp"] = val_mpp
    manifest["mining"] = mining
    write_json_atomic(shard_dir / records.MANIFEST, manifest)
    # Last: delete the previous generation and leftovers of interrupted runs.
    listed = {e["path"] for e in manifest["shards"]}
    for prefix in PREFIXES.values():
        for path in (shard_dir / records.CLS).glob(f"{prefix}-*.tfrecord*"):
            if path.relative_to(shard_dir).as_posix() not in listed:
                path.unlink(missing_ok=True)
    return mining
