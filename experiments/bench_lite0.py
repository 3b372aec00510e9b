"""Mclass cost with the EfficientNet-Lite0 backbone vs the ResNet presets, in one run.

For each Mclass preset (default ``lite0``, ``cpu``, ``paper``) and input side (default 64 and
112 px), batch 64: the mean time of a compiled forward pass (``training=False``) and of a
compiled training step (forward, sigmoid cross-entropy, gradients, Adam update), each over
``--steps`` calls after two warm-up calls; plus the ratio of each preset's times to the first
preset's. A 2048^2 float32 matmul before and after gives the machine's arithmetic rate.

Usage:
    python experiments/bench_lite0.py --steps 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_presets import matmul_gflops, mclass_train_step  # noqa: E402


def _seconds(step, steps: int) -> float:
    step().numpy()
    step().numpy()
    start = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return (time.perf_counter() - start) / steps


def mclass_seconds(name: str, size: int, batch: int, steps: int) -> dict:
    """Forward and training-step seconds of the preset's Mclass at ``size`` px."""
    import keras
    import tensorflow as tf

    from focas_keras.models.mclass import build_mclass
    from focas_keras.models.mclass_config import preset

    model = build_mclass(preset(name))
    optimizer = keras.optimizers.Adam(1e-4)
    images = tf.random.uniform([batch, size, size, 3], seed=0)
    labels = tf.cast(tf.range(batch) % 2, tf.float32)

    @tf.function
    def forward():
        return tf.reduce_sum(model(images, training=False))

    train_step = mclass_train_step(model, optimizer, images, labels)
    return {"forward_s": _seconds(forward, steps), "train_step_s": _seconds(train_step, steps),
            "params": model.count_params()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="lite0,cpu,paper")
    parser.add_argument("--sizes", default="64,112")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args(argv)
    presets = args.presets.split(",")
    rows = {"batch": args.batch, "steps": args.steps, "matmul_gflops_before": matmul_gflops()}
    for size in (int(s) for s in args.sizes.split(",")):
        for name in presets:
            row = mclass_seconds(name, size, args.batch, args.steps)
            rows[f"{name}@{size}"] = row
            base = rows[f"{presets[0]}@{size}"]
            print(f"{name} @ {size} px: forward {row['forward_s']:.3f} s "
                  f"(x{row['forward_s'] / base['forward_s']:.2f} of {presets[0]}), train step "
                  f"{row['train_step_s']:.3f} s "
                  f"(x{row['train_step_s'] / base['train_step_s']:.2f}), "
                  f"{row['params'] / 1e6:.2f} M params", flush=True)
    rows["matmul_gflops_after"] = matmul_gflops()
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
