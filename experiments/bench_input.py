"""Input-pipeline throughput vs the training step rate it must feed, in one run.

Measures records/s of the det and cls tf.data pipelines (augmentation on, shards prepared from
the real ICPR 2012 fields when ../shared is present, else from synthetic data) and, in the same
process, the images/s of a ResNet-50 forward+backward step at the same batch size and input
size. The pipeline should deliver at least 5x what training consumes.

Usage:
    python experiments/bench_input.py [--det-batch 8] [--cls-batch 64] [--batches 30]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from focas_keras.datasets.prepare import PrepareConfig, prepare  # noqa: E402
from focas_keras.datasets.readers import read_dataset  # noqa: E402
from focas_keras.data import pipeline  # noqa: E402
from focas_keras.data.augment import AugmentConfig  # noqa: E402

ICPR = Path(__file__).resolve().parents[2] / "shared" / "data" / "icpr2012" / "images"


def make_shards(workdir: Path) -> tuple[Path, str]:
    """Shards from the real ICPR fields if present, else from synthetic images."""
    out = workdir / "shards"
    if ICPR.is_dir():
        aset, source = read_dataset("icpr2012", ICPR), "ICPR 2012 (15 real HPFs)"
    else:
        from focas_keras.datasets.synth import write_dataset

        write_dataset(workdir / "synth", images=8, size=1024, seed=0)
        aset, source = read_dataset("synth", workdir / "synth"), "synthetic (8 x 1024 px)"
    prepare(aset, out, PrepareConfig(val_slides=(), val_fraction=0.0))
    return out, source


def pipeline_rate(ds, batches: int, warmup: int = 3) -> float:
    """Records/s over ``batches`` batches after ``warmup`` batches."""
    iterator = iter(ds)
    for _ in range(warmup):
        next(iterator)
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
        count += int(images.shape[0])
    return count / (time.perf_counter() - start)


def train_rate(batch: int, size: int, steps: int, warmup: int = 2) -> float:
    """Images/s of ResNet-50 (random init) forward+backward+SGD at ``batch`` x size x size."""
    model = keras.applications.ResNet50(weights=None, input_shape=(size, size, 3), classes=1,
                                        classifier_activation=None)
    optimizer = keras.optimizers.SGD(0.01)
    images = tf.random.uniform((batch, size, size, 3))
    labels = tf.zeros((batch, 1))

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step().numpy()
    return batch * steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--det-batch", type=int, default=8)
    parser.add_argument("--cls-batch", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards, source = make_shards(Path(tmp))
        manifest = pipeline.load_manifest(shards)
        tile, patch = manifest["tile_size"], manifest["patch_size"]
        det = pipeline.det_dataset(shards, "train", args.det_batch, augment=AugmentConfig(),
                                   repeat=True, seed=0)
        cls = pipeline.cls_dataset(shards, "train", args.cls_batch, augment=AugmentConfig(),
                                   positive_share=0.5, seed=0)
        det_rate = pipeline_rate(det, args.batches)
        cls_rate = pipeline_rate(cls, args.batches)
    det_train = train_rate(args.det_batch, tile, args.train_steps)
    cls_train = train_rate(args.cls_batch, patch, args.train_steps)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "tensorflow": tf.__version__,
        "source": source,
        "det": {"batch": args.det_batch, "size": tile, "pipeline_records_per_s": det_rate,
                "train_images_per_s": det_train, "ratio": det_rate / det_train},
        "cls": {"batch": args.cls_batch, "size": patch, "pipeline_records_per_s": cls_rate,
                "train_images_per_s": cls_train, "ratio": cls_rate / cls_train},
    }
    print(json.dumps(result, indent=2))
    for kind in ("det", "cls"):
        r = result[kind]
        verdict = "OK" if r["ratio"] >= 5 else "BELOW 5x"
        print(f"{kind}: pipeline {r['pipeline_records_per_s']:.1f} rec/s vs ResNet-50 train "
              f"{r['train_images_per_s']:.1f} img/s at batch {r['batch']}, {r['size']} px: "
              f"{r['ratio']:.1f}x ({verdict})")


if __name__ == "__main__":
    main()
