"""The training loop shared by ``train-det`` and ``train-cls``, the same for every strategy.

A custom loop (``strategy.run`` in a ``tf.function`` over a distributed dataset, losses scaled
with ``tf.nn.compute_average_loss``) because ``model.fit`` fails under
MultiWorkerMirroredStrategy in Keras 3 on TF 2.21. Each epoch reads its own seeded, ordered
slice of data, so a run resumed from an epoch checkpoint continues exactly as an uninterrupted
run would.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from focas_keras import __version__, runs
from focas_keras.errors import InputError
from focas_keras.io import write_json_atomic
from focas_keras.training.run_dir import CsvLog, claim_run_dir, save_model_atomic
from focas_keras.training.schedules import WarmupStepDecay
from focas_keras.training.strategy import is_chief, make_strategy


class TrainingError(RuntimeError):
    """Training stopped (a NaN loss); the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class LoopSpec:
    """What a training run needs from its model family.

    Attributes:
        identity: what makes two runs the same run (saved as run.json; a directory holding a
            different identity is refused).
        config_json: the resolved config, saved as config.json.
        train: the train section of the config (optimizer, schedule, epochs, batch size,
            precision, seed...).
        steps_per_epoch: optimizer steps per epoch.
        build_model: builds the model (called inside the strategy scope).
        losses: ``(model, inputs, targets) -> dict`` of per-example float32 [B] losses with a
            ``total`` entry; runs in replica context.
        train_dataset: ``epoch -> tf.data.Dataset`` of global batches for that epoch (finite:
            ``steps_per_epoch`` batches, deterministic for the epoch).
        validate: ``model -> dict`` of validation metrics, or None.
        score: ``metrics -> float``, higher is better (picks best.keras).
        describe: ``metrics -> str`` for the epoch's log line.
    """

    identity: dict
    config_json: str
    train: object
    steps_per_epoch: int
    build_model: Callable
    losses: Callable
    train_dataset: Callable
    validate: Callable | None
    score: Callable
    describe: Callable


def make_optimizer(train, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """SGD/Adam/AdamW with warm-up + step decay and global-norm clipping."""
    schedule = WarmupStepDecay(train.learning_rate, train.warmup_steps,
                               [e * steps_per_epoch for e in train.decay_epochs],
                               train.decay_factor)
    clip = train.clip_norm or None
    if train.optimizer == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=getattr(train, "momentum", 0.9),
                                   weight_decay=train.weight_decay or None, global_clipnorm=clip)
    elif train.optimizer == "adam":
        opt = keras.optimizers.Adam(schedule, global_clipnorm=clip)
    else:
        opt = keras.optimizers.AdamW(schedule, weight_decay=train.weight_decay,
                                     global_clipnorm=clip)
    if train.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def run_training(spec: LoopSpec, run_dir, devices=None, log=print) -> dict:
    """Runs (or resumes) a training run; restores the global dtype policy afterwards.

    Writes into ``run_dir``: ``run.json``, ``config.json``, ``checkpoints/`` (every epoch),
    ``logs/`` (TensorBoard), ``log.csv``, ``best.keras`` + ``best.json``, ``model.keras`` and
    ``metrics.json`` at the end. Only the chief writes there; other workers write to a
    temporary directory.

    Returns:
        ``{"last": metrics of the last epoch, "best": best.json, ...}``.
    """
    policy = keras.mixed_precision.global_policy()
    try:
        return _run(spec, Path(run_dir), devices, log)
    finally:
        keras.mixed_precision.set_global_policy(policy)


def _run(spec: LoopSpec, run_dir: Path, devices, log) -> dict:
    t = spec.train
    keras.mixed_precision.set_global_policy(t.precision)
    keras.utils.set_random_seed(t.seed)
    strategy = make_strategy(devices)
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise InputError(f"batch size {t.batch_size} is not a multiple of the "
                         f"{replicas} replicas")
    chief = is_chief(strategy)
    resuming = claim_run_dir(run_dir, spec.identity) if chief else False
    write_dir = run_dir if chief else Path(tempfile.mkdtemp(prefix="focas-worker-"))
    if chief:
        (run_dir / runs.CONFIG_FILE).write_text(spec.config_json + "\n", encoding="utf-8")

    with strategy.scope():
        model = spec.build_model()
        optimizer = make_optimizer(t, spec.steps_per_epoch)
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

    @tf.function
    def train_step(inputs, targets):
        def step_fn(inputs, targets):
            with tf.GradientTape() as tape:
                losses = spec.losses(model, inputs, targets)
                loss = tf.nn.compute_average_loss(losses["total"], global_batch_size=t.batch_size)
                scaled = optimizer.scale_loss(loss)
            grads = tape.gradient(scaled, model.trainable_variables)
            optimizer.apply_gradients(zip(grads, model.trainable_variables))
            return {k: tf.nn.compute_average_loss(v, global_batch_size=t.batch_size)
                    for k, v in losses.items()}

        per_replica = strategy.run(step_fn, args=(inputs, targets))
        return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
                for k, v in per_replica.items()}

    writer = tf.summary.create_file_writer(str(write_dir / "logs"))
    csv_log = CsvLog(write_dir / "log.csv")
    best_path = write_dir / runs.BEST_FILE
    best = runs.best_score(write_dir)
    best = -math.inf if best is None else best
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    metrics = {}
    for epoch in range(int(epoch_var.numpy()), t.epochs):
        start = time.perf_counter()
        dist = strategy.experimental_distribute_dataset(
            spec.train_dataset(epoch).with_options(options))
        sums, steps = {}, 0
        for inputs, targets in dist:
            values = {k: float(v.numpy()) for k, v in train_step(inputs, targets).items()}
            if not np.isfinite(values["total"]):
                raise TrainingError(f"loss became {values['total']} in epoch {epoch + 1}; "
                                    f"stopped (last good checkpoint kept in {write_dir})")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            steps += 1
        metrics = {"epoch": epoch + 1,
                   **{f"loss_{k}": v / max(steps, 1) for k, v in sums.items()},
                   "lr": float(optimizer.learning_rate.numpy())}
        if spec.validate is not None:
            metrics.update(spec.validate(model))
        metrics["seconds"] = time.perf_counter() - start
        epoch_var.assign(epoch + 1)
        manager.save(checkpoint_number=epoch + 1)
        with writer.as_default(step=epoch + 1):
            for key, value in metrics.items():
                if key != "epoch":
                    tf.summary.scalar(key, value)
        writer.flush()
        csv_log.append(metrics)
        score = spec.score(metrics)
        if chief and score > best:
            best = score
            save_model_atomic(model, write_dir / f"{runs.BEST}.keras")
            write_json_atomic(best_path, {"score": score, "metrics": metrics})
        log(f"epoch {epoch + 1}/{t.epochs}: {spec.describe(metrics)} "
            f"({metrics['seconds']:.0f} s)")
    if not chief:
        return {"last": metrics}
    save_model_atomic(model, run_dir / f"{runs.FINAL}.keras")
    final = {"package_version": __version__, "epochs": t.epochs, "last": metrics,
             "best": runs.read_json(best_path) if best_path.is_file() else None}
    write_json_atomic(run_dir / runs.METRICS_FILE, final)
    return final
