"""``focas-keras train-det``: the Mdet training loop, the same for every tf.distribute strategy.

A custom loop (``strategy.run`` in a ``tf.function`` over a distributed dataset, losses scaled
with ``tf.nn.compute_average_loss``) because ``model.fit`` fails under
MultiWorkerMirroredStrategy in Keras 3 on TF 2.21. Each epoch reads its own seeded, ordered
slice of data, so a run resumed from an epoch checkpoint continues exactly as an uninterrupted
run would.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from focas_keras import __version__
from focas_keras.data import pipeline
from focas_keras.data.augment import AugmentConfig
from focas_keras.errors import InputError
from focas_keras.evaluation.matching import best_f1_threshold, count_matches
from focas_keras.io import write_json_atomic
from focas_keras.models.mdet import build_mdet, decode_detections, mdet_loss
from focas_keras.models.mdet_config import MdetConfig
from focas_keras.training.run_dir import CsvLog, claim_run_dir, save_model_atomic
from focas_keras.training.schedules import WarmupStepDecay
from focas_keras.training.strategy import is_chief, make_strategy


class TrainingError(RuntimeError):
    """Training stopped (a NaN loss); the last good checkpoint is kept."""


def make_optimizer(config: MdetConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD/Adam/AdamW with warm-up + step decay and global-norm clipping."""
    t = config.train
    schedule = WarmupStepDecay(t.learning_rate, t.warmup_steps,
                               [e * steps_per_epoch for e in t.decay_epochs], t.decay_factor)
    clip = t.clip_norm or None
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=t.momentum,
                                   weight_decay=t.weight_decay or None, global_clipnorm=clip)
    elif t.optimizer == "adam":
        opt = keras.optimizers.Adam(schedule, global_clipnorm=clip)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=t.weight_decay, global_clipnorm=clip)
    if t.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def validate(model, config: MdetConfig, data_dir, batch_size: int) -> dict:
    """Validation loss and detection P/R/F1 at 20 px (centres vs box centres) on val tiles."""
    size = config.input_size
    ds = pipeline.det_dataset(data_dir, "val", batch_size=batch_size, shuffle=False,
                              max_boxes=config.train.max_boxes, verify=False)
    losses, per_image = [], []
    radius = config.inference.match_radius_px
    for images, targets in ds:
        outputs = model(images, training=False)
        losses.append(mdet_loss(outputs, targets["boxes"], targets["box_mask"], size, size,
                                config)["total"].numpy())
        dets = decode_detections(outputs, size, size, config)
        boxes, scores = dets["boxes"].numpy(), dets["scores"].numpy()
        gt, mask = targets["boxes"].numpy(), targets["box_mask"].numpy()
        for i, count in enumerate(dets["num_detections"].numpy()):
            b = boxes[i, :count]
            centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
            g = gt[i][mask[i]]
            per_image.append((centres, scores[i, :count],
                              np.stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2], 1)))
    at_threshold = sum((count_matches(c, s, g, radius) for c, s, g in per_image),
                       start=count_matches([], [], [], radius))
    threshold, best = best_f1_threshold(per_image, radius)
    return {"val_loss": float(np.mean(np.concatenate(losses))),
            "val_recall_at_min_score": at_threshold.recall,
            "val_precision": best.precision, "val_recall": best.recall, "val_f1": best.f1,
            "val_best_threshold": threshold}


def train_det(data_dir, run_dir, config: MdetConfig, devices=None, log=print) -> dict:
    """Trains Mdet on prepared shards (see :func:`_train_det`); restores the global dtype
    policy afterwards."""
    policy = keras.mixed_precision.global_policy()
    try:
        return _train_det(data_dir, run_dir, config, devices, log)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _train_det(data_dir, run_dir, config: MdetConfig, devices=None, log=print) -> dict:
    """Trains Mdet on prepared shards.

    Args:
        data_dir: shards from ``focas-keras prepare``.
        run_dir: output: ``run.json`` (config + data), ``checkpoints/``, ``logs/``
            (TensorBoard), ``log.csv``, ``best.keras``, ``model.keras``, ``metrics.json``.
        config: resolved configuration.
        devices: devices for MirroredStrategy (None: automatic, see
            :func:`~focas_keras.training.strategy.make_strategy`).
        log: where progress lines go.

    Returns:
        The final metrics dict.
    """
    config.validate()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    manifest = pipeline.load_manifest(data_dir)
    if manifest["tile_size"] != config.input_size:
        raise InputError(f"shards hold {manifest['tile_size']} px tiles but the config's "
                         f"input_size is {config.input_size}", data_dir)
    train_records = manifest["splits"]["train"]["det"]["records"]
    if not train_records:
        raise InputError("no det training records", data_dir)
    pipeline.verify_shards(data_dir, pipeline.shard_entries(manifest, "det", "train")
                           + pipeline.shard_entries(manifest, "det", "val"))
    has_val = manifest["splits"].get("val", {}).get("det", {}).get("records", 0) > 0

    t = config.train
    keras.mixed_precision.set_global_policy(t.precision)
    keras.utils.set_random_seed(t.seed)
    strategy = make_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise InputError(f"batch size {t.batch_size} is not a multiple of the "
                         f"{replicas} replicas")
    chief = is_chief(strategy)
    identity = {"kind": "mdet", "config": config.to_dict(), "data": str(data_dir.resolve()),
                "data_manifest_shards": [e["sha256"] for e in manifest["shards"]
                                         if e["kind"] == "det"]}
    resuming = claim_run_dir(run_dir, identity) if chief else False
    write_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="focas-worker-"))
    if chief:
        (run_dir / "config.json").write_text(config.to_json() + "\n", encoding="utf-8")

    steps = t.steps_per_epoch or max(1, train_records // t.batch_size)
    with strategy.scope():
        model = build_mdet(config)
        optimizer = make_optimizer(config, steps)
        optimizer.build(model.trainable_variables)
        epoch_var = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
        checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, epoch=epoch_var)
    manager = tf.train.CheckpointManager(checkpoint, str(write_dir / "checkpoints"),
                                         max_to_keep=2)
    if manager.latest_checkpoint:
        checkpoint.restore(manager.latest_checkpoint).expect_partial()
        log(f"resuming from {manager.latest_checkpoint} (epoch {int(epoch_var.numpy())} done)")
    elif resuming:
        log("run directory has no checkpoint yet: starting from scratch")

    size = config.input_size

    @tf.function
    def train_step(images, targets):
        def step_fn(images, targets):
            with tf.GradientTape() as tape:
                outputs = model(images, training=True)
                losses = mdet_loss(outputs, targets["boxes"], targets["box_mask"], size, size,
                                   config)
                loss = tf.nn.compute_average_loss(losses["total"], global_batch_size=t.batch_size)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return {k: tf.nn.compute_average_loss(v, global_batch_size=t.batch_size)
                    for k, v in losses.items()}

        per_replica = strategy.run(step_fn, args=(images, targets))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    writer = tf.summary.create_file_writer(str(write_dir / "logs"))
    csv_log = CsvLog(write_dir / "log.csv")
    best_path = write_dir / "best.json"
    best = json.loads(best_path.read_text())["score"] if best_path.is_file() else -math.inf
    augment = AugmentConfig() if t.augment else None
    metrics = {}
    for epoch in range(int(epoch_var.numpy()), t.epochs):
        start = time.perf_counter()
        ds = pipeline.det_dataset(data_dir, "train", batch_size=t.batch_size, augment=augment,
                                  repeat=True, seed=t.seed * 100003 + epoch, deterministic=True,
                                  max_boxes=t.max_boxes, drop_remainder=True,
                                  verify=False).take(steps)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA)
        dist = strategy.experimental_distribute_dataset(ds.with_options(options))
        sums = {}
        for images, targets in dist:
            losses = train_step(images, targets)
            values = {k: float(v.numpy()) for k, v in losses.items()}
            if not np.isfinite(values["total"]):
                raise TrainingError(f"loss became {values['total']} in epoch {epoch + 1}; "
                                    f"stopped (last good checkpoint kept in {write_dir})")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
        metrics = {"epoch": epoch + 1, **{f"loss_{k}": v / steps for k, v in sums.items()},
                   "lr": float(optimizer.learning_rate.numpy())
                   if hasattr(optimizer.learning_rate, "numpy") else t.learning_rate}
        if has_val:
            metrics.update(validate(model, config, data_dir, t.batch_size))
        metrics["seconds"] = time.perf_counter() - start
        epoch_var.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        with writer.as_default(step=epoch + 1):
            for key, value in metrics.items():
                if key != "epoch":
                    tf.summary.scalar(key, value)
        writer.flush()
        csv_log.append(metrics)
        score = metrics["val_f1"] if has_val else -metrics["loss_total"]
        if chief and score > best:
            best = score
            save_model_atomic(model, write_dir / "best.keras")
            write_json_atomic(best_path, {"score": score, "metrics": metrics})
        log("epoch {epoch}/{total}: loss {loss:.4f}{val} ({sec:.0f} s)".format(
            epoch=epoch + 1, total=t.epochs, loss=metrics["loss_total"],
            val=(f", val loss {metrics['val_loss']:.4f} P {metrics['val_precision']:.3f} "
                 f"R {metrics['val_recall']:.3f} F1 {metrics['val_f1']:.3f}" if has_val else ""),
            sec=metrics["seconds"]))
    if chief:
        save_model_atomic(model, run_dir / "model.keras")
        final = {"package_version": __version__, "epochs": t.epochs, "last": metrics,
                 "best": json.loads(best_path.read_text()) if best_path.is_file() else None}
        write_json_atomic(run_dir / "metrics.json", final)
        return final
    return {"last": metrics}
