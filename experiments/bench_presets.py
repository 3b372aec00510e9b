"""Training steps per second of each preset on this machine, and the same run's matmul rate.

For Mdet (batch 8, 224 px tiles, the real hybrid loss with one box per tile) and Mclass
(batch 64 / 32, 64 px patches, sigmoid cross-entropy): one compiled training step (forward,
loss, gradients, Adam update) timed over ``--steps`` steps after two warm-up steps. A 2048^2
float32 matmul in the same process gives the machine's arithmetic rate, so runs on different
(or differently loaded) machines can be compared by ratio.

Usage:
    python experiments/bench_presets.py --steps 10
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    import tensorflow as tf

    a = tf.random.uniform([size, size])
    b = tf.random.uniform([size, size])
    step = tf.function(lambda: tf.reduce_sum(a @ b))
    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step().numpy()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start) / 1e9


def _time(step, steps: int) -> float:
    step()
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def mdet_step_seconds(name: str, steps: int) -> tuple[float, int]:
    import keras
    import tensorflow as tf

    from focas_keras.models.mdet import build_mdet, mdet_loss
    from focas_keras.models.mdet_config import preset

    config = preset(name)
    model = build_mdet(config)
    optimizer = keras.optimizers.Adam(1e-3)
    images = tf.random.uniform([8, 224, 224, 3], seed=0)
    boxes = np.zeros((8, 32, 4), np.float32)
    boxes[:, 0] = (50, 50, 90, 90)
    mask = np.zeros((8, 32), bool)
    mask[:, 0] = True

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(mdet_loss(model(images, training=True), boxes, mask, 224, 224,
                                            config)["total"])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return _time(step, steps), model.count_params()


def mclass_step_seconds(name: str, steps: int) -> tuple[float, int, int]:
    import keras
    import tensorflow as tf

    from focas_keras.models.mclass import build_mclass
    from focas_keras.models.mclass_config import preset

    config = preset(name)
    batch = config.train.batch_size
    model = build_mclass(config)
    optimizer = keras.optimizers.Adam(1e-3)
    size = config.model.input_size
    images = tf.random.uniform([batch, size, size, 3], seed=0)
    labels = tf.cast(tf.range(batch) % 2, tf.float32)

    step = mclass_train_step(model, optimizer, images, labels)
    return _time(step, steps), model.count_params(), batch


def mclass_train_step(model, optimizer, images, labels):
    """A compiled Mclass training step on fixed data (forward, sigmoid cross-entropy,
    gradients, optimizer update); returns the loss."""
    import tensorflow as tf

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = tf.cast(model(images, training=True)[:, 0], tf.float32)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,cpu")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    rows = {"matmul_gflops_before": matmul_gflops()}
    for name in args.presets.split(","):
        det, det_params = mdet_step_seconds(name, args.steps)
        cls, cls_params, batch = mclass_step_seconds(name, args.steps)
        rows[name] = {"mdet_steps_per_s": 1 / det, "mdet_params": det_params,
                      "mclass_steps_per_s": 1 / cls, "mclass_params": cls_params,
                      "mclass_batch": batch}
        print(f"{name}: Mdet {1 / det:.2f} steps/s (batch 8, {det_params / 1e6:.2f} M params), "
              f"Mclass {1 / cls:.2f} steps/s (batch {batch}, {cls_params / 1e6:.2f} M params)",
              flush=True)
    rows["matmul_gflops_after"] = matmul_gflops()
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
