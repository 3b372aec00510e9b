"""``focas-keras train-det``: Mdet on det shards, through the shared training loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from focas_keras.data import pipeline, records
from focas_keras.data.augment import AugmentConfig
from focas_keras.errors import InputError
from focas_keras.evaluation.matching import (Counts, best_f1_threshold, count_matches,
                                             max_recall_threshold)
from focas_keras.models.mdet import build_mdet, decode_detections, mdet_loss
from focas_keras.models.mdet_config import MdetConfig
from focas_keras.training.loop import LoopSpec, TrainingError, make_optimizer, run_training

__all__ = ["train_det", "make_validator", "TrainingError", "make_optimizer"]


def _centres(boxes):
    return np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)


def make_validator(config: MdetConfig, data_dir, batch_size: int):
    """A ``model -> metrics`` function over the val tiles (one traced graph per model).

    Metrics: validation loss, P/R/F1 at 20 px (box centres vs GT centres) at the best-F1 score
    threshold (reported too), and the recall at the inference threshold (what stage 1 hands
    to stage 2).
    """
    import tensorflow as tf

    size = config.input_size
    radius = config.inference.match_radius_px
    graphs = {}

    def graph_for(model):
        if id(model) not in graphs:
            @tf.function(reduce_retracing=True)
            def step(images, boxes, mask):
                outputs = model(images, training=False)
                return (mdet_loss(outputs, boxes, mask, size, size, config)["total"],
                        decode_detections(outputs, size, size, config))
            graphs[id(model)] = step
        return graphs[id(model)]

    def validate(model) -> dict:
        step = graph_for(model)
        ds = pipeline.det_dataset(data_dir, "val", batch_size=batch_size, shuffle=False,
                                  max_boxes=config.train.max_boxes, verify=False)
        losses, per_image = [], []
        for images, targets in ds:
            loss, dets = step(images, targets["boxes"], targets["box_mask"])
            losses.append(loss.numpy())
            boxes, scores = dets["boxes"].numpy(), dets["scores"].numpy()
            gt, mask = targets["boxes"].numpy(), targets["box_mask"].numpy()
            for i, count in enumerate(dets["num_detections"].numpy()):
                per_image.append((_centres(boxes[i, :count]), scores[i, :count],
                                  _centres(gt[i][mask[i]])))
        at_min = sum((count_matches(c, s, g, radius) for c, s, g in per_image), Counts())
        threshold, best = best_f1_threshold(per_image, radius)
        return {"val_loss": float(np.mean(np.concatenate(losses))),
                "val_recall_at_min_score": at_min.recall,
                "val_recall_threshold": max_recall_threshold(per_image, radius),
                "val_precision": best.precision, "val_recall": best.recall, "val_f1": best.f1,
                "val_best_threshold": threshold}

    return validate


#: Candidates per mm2 stage 1 may hand on while validating on whole fields (the cascade's
#: default, :attr:`focas_keras.inference.cascade.CascadeSettings.max_candidates_per_mm2`).
FIELD_CANDIDATES_PER_MM2 = 2000.0


def make_field_validator(config: MdetConfig, fields: list,
                         per_mm2: float = FIELD_CANDIDATES_PER_MM2):
    """A ``model -> metrics`` function over whole validation fields (``prepare --val-fields``).

    Mdet runs on each whole field through the inference engine, as ``detect`` runs stage 1
    (:func:`~focas_keras.inference.engine.detect_field`: at most ``per_mm2`` candidates per
    mm2, the per-level top-k scaled with the field's area, the inference threshold); the
    metrics are :func:`focas_keras.evaluation.fields.stage1_metrics`: the best-F1 stage-1 cut
    with the cascade's point merge, the share of mitoses with a candidate, and the candidate
    density.
    """
    from focas_keras.evaluation.fields import candidate_table, stage1_metrics
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    mpp = float(np.median([f["mpp"] for f in fields]))
    truth = {f["image_id"]: f["points"] for f in fields}
    area = sum(f["image"].shape[0] * f["image"].shape[1] for f in fields) * (mpp / 1000) ** 2
    stage1 = {}  # {(model, field mpp): stage-1-only Cascade}, each compiling once per size

    def validate(model) -> dict:
        per_image = {}
        for field in fields:
            key = (id(model), float(field["mpp"]))
            if key not in stage1:
                settings = CascadeSettings(mpp=float(field["mpp"]), det_mpp=float(field["mpp"]),
                                           max_candidates_per_mm2=per_mm2)
                stage1[key] = Cascade(model, config, None, None, settings)
            boxes, scores = stage1[key].detect_resized(field["image"])
            per_image[field["image_id"]] = (_centres(np.asarray(boxes).reshape(-1, 4)),
                                            scores, None)
        return stage1_metrics(truth, candidate_table(per_image), mpp, area)

    return validate


def _describe(metrics: dict) -> str:
    text = f"loss {metrics['loss_total']:.4f}"
    if "val_f1" in metrics:
        text += (f", val loss {metrics['val_loss']:.4f} P {metrics['val_precision']:.3f} "
                 f"R {metrics['val_recall']:.3f} F1 {metrics['val_f1']:.3f}")
    if "val_field_f1" in metrics:
        text += (f"; whole val fields: F1 {metrics['val_field_f1']:.3f} (stage 1 + merge), "
                 f"candidates reach {metrics['val_field_candidate_recall']:.3f} of mitoses, "
                 f"{metrics['val_field_candidates_per_mm2']:.0f}/mm2")
    return text


def _score(metrics: dict, has_val: bool, has_fields: bool) -> float:
    """Model selection: whole-field stage-1 F1 when whole fields exist (candidate recall breaks
    ties), else tile F1, else the negative training loss."""
    if has_fields:
        return metrics["val_field_f1"] + 1e-3 * metrics["val_field_candidate_recall"]
    return metrics["val_f1"] if has_val else -metrics["loss_total"]


def train_det(data_dir, run_dir, config: MdetConfig, devices=None, log=print,
              extra_data=()) -> dict:
    """Trains Mdet on prepared shards (or resumes the interrupted run in ``run_dir``).

    Args:
        data_dir: shards from ``focas-keras prepare``.
        run_dir: run directory (see :func:`focas_keras.training.loop.run_training`).
        config: resolved configuration.
        devices: devices for MirroredStrategy (None: automatic).
        log: where progress lines go.
        extra_data: further det shard directories (e.g. ``prepare --format amibr
            --det-small-images mosaic``: other scanners' mitoses as mosaic tiles), drawn
            with ``config.train.extra_share`` of the training tiles. The steps per epoch stay
            those of ``data_dir``, so the training costs the same; only ``data_dir``
            validates.

    Returns:
        The final metrics dict.
    """
    config.validate()
    data_dir = Path(data_dir)
    manifest = pipeline.load_manifest(data_dir)
    if manifest["tile_size"] != config.input_size:
        raise InputError(f"shards hold {manifest['tile_size']} px tiles but the config's "
                         f"input_size is {config.input_size}", data_dir)
    train_records = manifest["splits"]["train"]["det"]["records"]
    if not train_records:
        raise InputError("no det training records", data_dir)
    has_val, digests = pipeline.verify_for_training(data_dir, manifest, "det")
    t = config.train
    extra_data = [Path(d) for d in extra_data]
    if bool(extra_data) != (t.extra_share > 0):
        raise InputError("train.extra_share > 0 goes with extra shard directories "
                         "(--extra-data), and only with them")
    extra_digests = []
    for extra in extra_data:
        extra_manifest = pipeline.load_manifest(extra)
        if extra_manifest["tile_size"] != config.input_size:
            raise InputError(f"extra shards hold {extra_manifest['tile_size']} px tiles but the "
                             f"config's input_size is {config.input_size}", extra)
        if not extra_manifest["splits"].get("train", {}).get("det", {}).get("boxes"):
            raise InputError("extra shards have no training det tiles with mitoses (prepare "
                             "amibr crops with --det-small-images mosaic)", extra)
        extra_digests.append(pipeline.verify_for_training(extra, extra_manifest, "det")[1])
    steps = t.steps_per_epoch or max(1, train_records // t.batch_size)
    augment = AugmentConfig(scale=t.scale_jitter, stain_sigma=t.stain_sigma) if t.augment else None
    size = config.input_size

    def losses(model, images, targets):
        return mdet_loss(model(images, training=True), targets["boxes"], targets["box_mask"],
                         size, size, config)

    def train_dataset(epoch):
        return pipeline.det_dataset(data_dir, "train", batch_size=t.batch_size, augment=augment,
                                    repeat=True, seed=t.seed * 100003 + epoch,
                                    deterministic=True, max_boxes=t.max_boxes,
                                    drop_remainder=True, verify=False, extra_dirs=extra_data,
                                    extra_share=t.extra_share).take(steps)

    validators = [make_validator(config, data_dir, t.batch_size)] if has_val else []
    has_fields = pipeline.has_records(manifest, records.FIELD, "val")
    identity = {"kind": "mdet", "config": config.to_dict(), "data": str(data_dir.resolve()),
                "data_shards": digests, **pipeline.data_mpp_identity(manifest),
                **({"extra_data": [str(d.resolve()) for d in extra_data],
                    "extra_shards": extra_digests} if extra_data else {})}
    if has_fields:
        field_entries = pipeline.shard_entries(manifest, records.FIELD, "val")
        pipeline.verify_shards(data_dir, field_entries)
        identity["field_shards"] = [e["sha256"] for e in field_entries]
        validators.append(make_field_validator(
            config, pipeline.read_fields(data_dir, "val", verify=False)))

    def validate(model) -> dict:
        metrics = {}
        for validator in validators:
            metrics.update(validator(model))
        if has_fields:
            # detect's default stage-1 cut: keep every mitosis stage 1 reaches on whole fields
            metrics["val_recall_threshold"] = metrics["val_field_recall_threshold"]
        return metrics

    spec = LoopSpec(
        identity=identity, config_json=config.to_json(), train=t, steps_per_epoch=steps,
        build_model=lambda: build_mdet(config), losses=losses, train_dataset=train_dataset,
        validate=validate if validators else None,
        score=lambda m: _score(m, has_val, has_fields), describe=_describe)
    return run_training(spec, run_dir, devices, log)
