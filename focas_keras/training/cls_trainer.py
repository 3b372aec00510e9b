"""``focas-keras train-cls``: Mclass on cls shards (balanced batches), through the shared loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from focas_keras.data import pipeline, records
from focas_keras.data.augment import AugmentConfig
from focas_keras.errors import InputError
from focas_keras.models.mclass import build_mclass, load_init_weights, resize_patches
from focas_keras.models.mclass_config import MclassConfig
from focas_keras.training.loop import LoopSpec, run_training


def roc_auc(labels, scores) -> float:
    """Area under the ROC curve (rank statistic, ties counted half); 0.5 when one class."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return 0.5
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    values = np.concatenate([pos, neg])[order]
    # average ranks over ties
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2)
                 / (len(pos) * len(neg)))


def threshold_metrics(labels, scores) -> dict:
    """Precision/recall at 0.5 and the best-F1 threshold with its precision/recall/F1."""
    labels = np.asarray(labels, bool)
    scores = np.asarray(scores, np.float64)

    def prf(threshold):
        predicted = scores >= threshold
        tp = float((predicted & labels).sum())
        precision = tp / predicted.sum() if predicted.sum() else 0.0
        recall = tp / labels.sum() if labels.sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    p05, r05, _ = prf(0.5)
    best = (0.5, *prf(0.5))
    for threshold in np.unique(scores):
        candidate = (float(threshold), *prf(threshold))
        if candidate[3] > best[3]:
            best = candidate
    return {"val_precision_at_0.5": p05, "val_recall_at_0.5": r05,
            "val_best_threshold": best[0], "val_precision": best[1], "val_recall": best[2],
            "val_f1": best[3]}


def to_input_size(ds: tf.data.Dataset, size: int) -> tf.data.Dataset:
    """Resizes batched patches to the model input (identity when they already fit).

    Patches cut at the crop size used at test time (e.g. 112 px) are shrunk to the input (64)
    exactly as :func:`focas_keras.models.mclass.resize_patches` does for candidates.
    """
    return ds.map(lambda images, labels: (resize_patches(images, size), labels),
                  num_parallel_calls=tf.data.AUTOTUNE)


def predict_split(model, data_dir, split: str, batch_size: int, size: int):
    """(labels, probabilities) over every patch of a split, unaugmented, in shard order."""
    labels, scores = [], []
    ds = pipeline.cls_dataset(data_dir, split, batch_size=batch_size, shuffle=False,
                              verify=False)
    for images, y in to_input_size(ds, size):
        labels.append(y.numpy())
        scores.append(tf.sigmoid(model(images, training=False))[:, 0].numpy())
    return np.concatenate(labels), np.concatenate(scores)


def validate(model, data_dir, batch_size: int, size: int) -> dict:
    """Validation loss, ROC AUC, P/R at 0.5 and the best-F1 threshold."""
    labels, scores = predict_split(model, data_dir, "val", batch_size, size)
    eps = 1e-7
    clipped = np.clip(scores, eps, 1 - eps)
    loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    return {"val_loss": float(loss), "val_auc": roc_auc(labels, scores),
            **threshold_metrics(labels, scores)}


def mined_val_candidates(data_dir, manifest: dict) -> dict | None:
    """The validation fields' stage-1 candidates (``mine --include-val``), decoded once.

    Returns:
        None when there are none, else ``images`` uint8 (N, P, P, 3), ``image_ids`` (N,) str,
        ``centres`` (N, 2) float64, ``det_scores`` (N,) float64, ``truth`` {image_id: (G, 2)}
        and ``mpp`` (the patches' pixel size).
    """
    mining = manifest.get("mining") or {}
    entries = [e for e in pipeline.shard_entries(manifest, records.CLS, "val")
               if e.get("source") == "mined" and e["records"] > 0]
    if not entries or mining.get("val_truth") is None:
        return None
    size = int(manifest["patch_size"])
    files = [str(Path(data_dir) / e["path"]) for e in entries]
    images, ids, centres, scores = [], [], [], []
    for example in tf.data.TFRecordDataset(files).map(lambda x: records.parse_cls(x, size)):
        images.append(example["image"].numpy())
        ids.append(example["image_id"].numpy().decode())
        centres.append(example["center"].numpy().astype(np.float64))
        scores.append(float(example["score"].numpy()))
    mpp = mining.get("val_mpp")
    return {"images": np.stack(images), "image_ids": np.asarray(ids),
            "centres": np.stack(centres), "det_scores": np.asarray(scores, np.float64),
            "truth": {k: np.asarray(v, np.float64).reshape(-1, 2)
                      for k, v in mining["val_truth"].items()},
            "mpp": float(mpp) if mpp is not None else None}


def cascade_validator(candidates: dict, size: int, batch_size: int = 256):
    """A ``model -> metrics`` function: the cascade's best-F1 threshold pair on the whole
    validation fields, from Mclass's scores of their stage-1 candidates with the point merge
    (:func:`focas_keras.evaluation.fields.cascade_metrics`)."""
    from focas_keras.datasets.annotations import ICPR2012_MPP
    from focas_keras.evaluation.fields import candidate_table, cascade_metrics
    from focas_keras.models.mclass import predict_proba

    mpp = candidates["mpp"] or ICPR2012_MPP

    def validate(model) -> dict:
        probs = np.asarray(predict_proba(model, candidates["images"], size, batch_size),
                           np.float64).reshape(-1)
        per_image = {image_id: ([], [], []) for image_id in candidates["truth"]}
        for image_id in np.unique(candidates["image_ids"]):
            rows = candidates["image_ids"] == image_id
            per_image[image_id] = (candidates["centres"][rows], candidates["det_scores"][rows],
                                   probs[rows])
        return cascade_metrics(candidates["truth"], candidate_table(per_image), mpp)

    return validate


def _describe(metrics: dict) -> str:
    text = f"loss {metrics['loss_total']:.4f}"
    if "val_auc" in metrics:
        text += (f", val loss {metrics['val_loss']:.4f} AUC {metrics['val_auc']:.3f} "
                 f"P {metrics['val_precision']:.3f} R {metrics['val_recall']:.3f} "
                 f"F1 {metrics['val_f1']:.3f} at {metrics['val_best_threshold']:.2f}")
    if "val_cascade_f1" in metrics:
        text += (f"; cascade on whole val fields: F1 {metrics['val_cascade_f1']:.3f} "
                 f"(det >= {metrics['val_cascade_det_threshold']:.3f}, Mclass >= "
                 f"{metrics['val_cascade_cls_threshold']:.3f})")
    return text


def train_cls(data_dir, run_dir, config: MclassConfig, init_weights=None, devices=None,
              log=print, extra_data=()) -> dict:
    """Trains Mclass on prepared cls shards (or resumes the interrupted run in ``run_dir``).

    Args:
        data_dir: shards from ``focas-keras prepare`` (plus ``focas-keras mine``).
        run_dir: run directory (see :func:`focas_keras.training.loop.run_training`).
        config: resolved configuration.
        init_weights: optional local weights file for the initial model (e.g. ImageNet
            ResNet-34 converted by the user); nothing is downloaded.
        devices: devices for MirroredStrategy (None: automatic).
        log: where progress lines go.
        extra_data: further cls shard directories (e.g. ``prepare --format amibr``: other
            scanners' mitoses and same-crop negatives) whose training patches join each batch
            with ``config.train.extra_share`` of each label's draws; their validation splits
            are not used.

    Returns:
        The final metrics dict.
    """
    config.validate()
    data_dir = Path(data_dir)
    manifest = pipeline.load_manifest(data_dir)
    size = config.model.input_size
    counts = manifest["splits"]["train"]["cls"]
    if not counts["positive"] or not counts["negative"]:
        raise InputError("cls training split needs both mitosis and non-mitosis patches",
                         data_dir)
    has_val, digests = pipeline.verify_for_training(data_dir, manifest, "cls")
    extra_data = [Path(d) for d in extra_data]
    if bool(extra_data) != (config.train.extra_share > 0):
        raise InputError("train.extra_share > 0 goes with extra shard directories "
                         "(--extra-data), and only with them")
    extra_digests = []
    for extra in extra_data:
        extra_manifest = pipeline.load_manifest(extra)
        if not extra_manifest["splits"].get("train", {}).get("cls", {}).get("positive"):
            raise InputError("extra shards have no training mitosis patches", extra)
        extra_digests.append(pipeline.verify_for_training(extra, extra_manifest, "cls")[1])
    if init_weights is not None and not Path(init_weights).is_file():
        raise InputError("initial weights file not found", init_weights)
    t = config.train
    steps = t.steps_per_epoch or max(1, counts["records"] // t.batch_size)
    augment = (AugmentConfig(translate_px=4, scale=t.scale_jitter, stain_sigma=t.stain_sigma)
               if t.augment else None)

    def build():
        model = build_mclass(config)
        if init_weights is not None:
            load_init_weights(model, init_weights)
        return model

    def losses(model, images, labels):
        logits = tf.cast(model(images, training=True)[:, 0], tf.float32)
        targets = labels * (1 - t.label_smoothing) + 0.5 * t.label_smoothing
        return {"total": tf.nn.sigmoid_cross_entropy_with_logits(targets, logits)}

    def train_dataset(epoch):
        return to_input_size(pipeline.cls_dataset(
            data_dir, "train", batch_size=t.batch_size, augment=augment,
            positive_share=t.positive_share, seed=t.seed * 100003 + epoch, deterministic=True,
            drop_remainder=True, verify=False, extra_dirs=extra_data,
            extra_share=t.extra_share).take(steps), size)

    candidates = mined_val_candidates(data_dir, manifest) if has_val else None
    validators = [lambda model: validate(model, data_dir, 256, size)] if has_val else []
    if candidates is not None:
        validators.append(cascade_validator(candidates, size))

    def validate_all(model) -> dict:
        metrics = {}
        for validator in validators:
            metrics.update(validator(model))
        return metrics

    def score(metrics) -> float:
        if candidates is not None:  # the cascade on whole fields; AUC breaks ties
            return metrics["val_cascade_f1"] + 1e-3 * metrics["val_auc"]
        return metrics["val_auc"] if has_val else -metrics["loss_total"]

    spec = LoopSpec(
        identity={"kind": "mclass", "config": config.to_dict(), "data": str(data_dir.resolve()),
                  "data_shards": digests,
                  "init_weights": None if init_weights is None else str(init_weights),
                  **({"extra_data": [str(d.resolve()) for d in extra_data],
                      "extra_shards": extra_digests} if extra_data else {}),
                  **pipeline.data_mpp_identity(manifest)},
        config_json=config.to_json(), train=t, steps_per_epoch=steps, build_model=build,
        losses=losses, train_dataset=train_dataset,
        validate=validate_all if validators else None, score=score, describe=_describe)
    return run_training(spec, run_dir, devices, log)
