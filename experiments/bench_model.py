"""Mdet (``paper`` preset) forward and training-step cost next to keras-hub's RetinaNet.

In one process, on the same inputs:
- forward time at 224 px (batch 1) and on a full 2084 x 2084 HPF (padded to 2112, a multiple
  of 32, for both models), for Mdet and for keras-hub's RetinaNet ResNet-50-FPN (built offline
  with explicit arguments, random weights, 1 class);
- achieved GFLOP/s of each forward (FLOPs counted by the TF profiler on the traced graph) next
  to a 2048 x 2048 float32 matmul, the practical peak of this CPU;
- one training step at batch 8, 224 px: Mdet with its real hybrid loss, and both networks with
  the same surrogate loss (mean square of all head outputs), forward + backward + SGD.

Needs the bench extra: ``pip install -e ".[bench]"`` (keras-hub, used only here).

Usage:
    python experiments/bench_model.py [--repeats 3] [--skip-hpf]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def graph_flops(fn, *args) -> float:
    """Float operations of one call of a tf.function, counted on its traced graph."""
    from tensorflow.python.profiler import model_analyzer, option_builder

    concrete = fn.get_concrete_function(*args)
    options = (option_builder.ProfileOptionBuilder(option_builder.ProfileOptionBuilder
                                                   .float_operation()).with_empty_output().build())
    return float(model_analyzer.profile(graph=concrete.graph, options=options).total_float_ops)


def matmul_gflops(repeats: int) -> float:
    a = tf.random.uniform((2048, 2048))
    b = tf.random.uniform((2048, 2048))
    f = tf.function(lambda: tf.matmul(a, b))
    seconds = timed(lambda: f().numpy(), repeats * 3, warmup=2)
    return 2 * 2048 ** 3 / seconds / 1e9


def build_peer():
    """keras-hub RetinaNet ResNet-50-FPN, P3-P7, 9 anchors, 1 class, no network access."""
    import keras_hub

    resnet = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512], stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2], block_type="bottleneck_block",
        use_pre_activation=False, image_shape=(None, None, 3))
    backbone = keras_hub.models.RetinaNetBackbone(
        image_encoder=resnet, min_level=3, max_level=7, use_p5=False,
        image_shape=(None, None, 3))
    anchors = keras_hub.layers.AnchorGenerator(
        bounding_box_format="yxyx", min_level=3, max_level=7, num_scales=3,
        aspect_ratios=[0.5, 1.0, 2.0], anchor_size=4)
    return keras_hub.models.RetinaNetObjectDetector(
        backbone=backbone, num_classes=1, anchor_generator=anchors,
        bounding_box_format="yxyx")


def outputs_of(result):
    """Flat list of output tensors of either model."""
    return list(result.values()) if isinstance(result, dict) else list(tf.nest.flatten(result))


def surrogate_step(model):
    optimizer = keras.optimizers.SGD(1e-4)

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            outs = outputs_of(model(images, training=True))
            loss = tf.add_n([tf.reduce_mean(tf.square(tf.cast(o, tf.float32))) for o in outs])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def mdet_real_step(model, config):
    from focas_keras.models.mdet import mdet_loss

    optimizer = keras.optimizers.SGD(1e-4, momentum=0.9, global_clipnorm=10.0)
    size = config.input_size
    boxes = tf.constant([[[60.0, 60.0, 100.0, 100.0], [150.0, 40.0, 190.0, 80.0]]] * 8)
    mask = tf.ones((8, 2), tf.bool)

    @tf.function
    def step(images):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(
                mdet_loss(model(images, training=True), boxes, mask, size, size, config)["total"])
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    return step


def load_hpf():
    """A real ICPR 2012 HPF when ../shared is present, else a synthetic 2084 px field."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "shared/data/icpr2012/images/A03_00.jpg"
    if path.is_file():
        from focas_keras.datasets.annotations import load_image

        return load_image(path), path.name
    from focas_keras.datasets.synth import synthesize_image

    return synthesize_image(2084, seed=0).image, "synthetic 2084 px"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hpf", action="store_true")
    args = parser.parse_args()

    from focas_keras.models.mdet import build_mdet
    from focas_keras.models.mdet_config import preset

    config = preset("paper")
    keras.utils.set_random_seed(0)
    models = {"mdet": build_mdet(config), "keras_hub_retinanet": build_peer()}
    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
              "tensorflow": tf.__version__, "keras": keras.__version__,
              "params": {k: int(m.count_params()) for k, m in models.items()},
              "matmul_2048_gflops": matmul_gflops(args.repeats)}
    inputs = {"224": tf.random.uniform((1, 224, 224, 3))}
    if not args.skip_hpf:
        image, name = load_hpf()
        padded = np.zeros((1, 2112, 2112, 3), np.float32)
        padded[0, :2084, :2084] = image / 255.0
        inputs["hpf_2084"] = tf.constant(padded)
        result["hpf"] = name
    for size, x in inputs.items():
        for key, model in models.items():
            fwd = tf.function(lambda t, m=model: outputs_of(m(t, training=False)))
            seconds = timed(lambda: [o.numpy() for o in fwd(x)], args.repeats)
            flops = graph_flops(fwd, x)
            result[f"forward_{size}_{key}"] = {"seconds": seconds, "gflop": flops / 1e9,
                                               "gflops_per_s": flops / seconds / 1e9}
        result[f"forward_{size}_ratio_mdet_over_peer"] = (
            result[f"forward_{size}_mdet"]["seconds"]
            / result[f"forward_{size}_keras_hub_retinanet"]["seconds"])
        print(json.dumps({k: v for k, v in result.items() if size in k}, indent=2), flush=True)
    batch = tf.random.uniform((8, 224, 224, 3))
    steps = {"train_step_b8_mdet_real_loss": mdet_real_step(models["mdet"], config)}
    for key, model in models.items():
        steps[f"train_step_b8_{key}_surrogate"] = surrogate_step(model)
    for key, step in steps.items():
        result[key] = {"seconds": timed(lambda s=step: s(batch).numpy(), args.repeats)}
    result["train_step_ratio_mdet_over_peer_surrogate"] = (
        result["train_step_b8_mdet_surrogate"]["seconds"]
        / result["train_step_b8_keras_hub_retinanet_surrogate"]["seconds"])
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
