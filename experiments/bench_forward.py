"""Mdet's forward rate in GFLOP/s next to the same run's 2048 x 2048 float32 matmul rate.

For each preset (default ``cpu`` and ``cpu_full``, random weights), at one square input
size (default 1024 px: Mdet's input for a ~2048 px field region shrunk to 0.49 um/px),
batch 1, in four variants: float32 and ``mixed_bfloat16`` (the policy set globally while the
model is built, as ``focas_keras.training.loop`` does for ``train.precision``), each as
built (WSConv2D standardising its kernel at every call) and with Weight Standardisation
folded into plain convolutions (:func:`focas_keras.models.fold.fold_weight_standardization`).

FLOPs are counted analytically, not by the TF profiler: while the model is traced once on a
``[1, size, size, 3]`` input, every call of a ``Conv2D`` (``WSConv2D`` included) or
``Dense`` layer, at any depth (backbone convs, CBAM's convs, FPN and head convs; the head's
towers are shared by the levels and so counted once per level) records its static output
shape, and adds ``2 * output elements * (kernel_h * kernel_w * in_channels / groups)``
(``2 * output elements * in_features`` for Dense): one multiply and one add per kernel tap.
Everything else -- normalisation, activations, pooling, additions, resizing, CBAM's gates,
the per-call kernel standardisation of WSConv2D -- is element-wise or reduction work and is
left out, so the count is the same with and without folding and the GFLOP/s are a lower
bound of the arithmetic actually done.

The forward pass is timed two ways, both returning host arrays: ``model(x, training=False)``
in a ``tf.function`` with a fixed input signature, and ``model.predict_on_batch(x)`` (Keras'
own compiled predict step; no XLA, the model is not compiled). Each variant reports both and
its rate uses the faster. A model, its folded copy and the reference matmul (float32, and
bfloat16 for the bf16 variants) are timed in interleaved rounds (see
:func:`interleaved_medians`): on a shared machine the background load then hits the
forward passes and their reference alike, and the share of the matmul rate stays meaningful
when the absolute rates do not.

Usage:
    python experiments/bench_forward.py [--presets cpu,cpu_full] [--size 1024] [--repeats 5]
        [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

MATMUL_N = 2048
PRECISIONS = ("float32", "mixed_bfloat16")


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_call(dtype=tf.float32, n: int = MATMUL_N):
    """A callable running one ``[n, n] x [n, n]`` ``tf.linalg.matmul`` to a host array."""
    a = tf.cast(tf.random.uniform((n, n)), dtype)
    b = tf.cast(tf.random.uniform((n, n)), dtype)
    f = tf.function(lambda: tf.linalg.matmul(a, b))
    return lambda: f().numpy()


def matmul_gflops(repeats: int, dtype=tf.float32, n: int = MATMUL_N) -> float:
    """GFLOP/s of an ``[n, n] x [n, n]`` ``tf.linalg.matmul`` (``2 n^3`` FLOPs), median."""
    seconds = timed(matmul_call(dtype, n), max(3, 3 * repeats), warmup=2)
    return 2 * n ** 3 / seconds / 1e9


def _counted_layers(model: keras.Model):
    return [layer for layer in model._flatten_layers(include_self=False, recursive=True)
            if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense))]


def _layer_flops(layer, output) -> int:
    # Conv2D kernel: (kh, kw, c_in / groups, filters); Dense kernel: (in, units).
    taps = math.prod(int(d) for d in layer.kernel.shape[:-1])
    return 2 * math.prod(int(d) for d in output.shape) * taps


@contextlib.contextmanager
def _recording_calls(layers, log: list):
    """Wraps each layer's ``call`` (as an instance attribute) to append (layer, output)."""
    for layer in layers:
        def wrapper(*args, _layer=layer, _call=layer.call, **kwargs):
            output = _call(*args, **kwargs)
            log.append((_layer, output))
            return output
        object.__setattr__(layer, "call", wrapper)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("call", None)


def forward_flops(model: keras.Model, size: int, batch: int = 1) -> dict:
    """Multiply-add FLOPs of one forward pass of ``model`` on float32 [batch, size, size, 3].

    Returns:
        dict: ``flops`` (int, total), ``layer_calls`` (int, conv/dense calls counted),
        ``by_part`` ({top-level layer name: flops}, e.g. backbone / fpn / head).
    """
    layers = _counted_layers(model)
    owner = {}
    for top in model.layers:
        if isinstance(top, (keras.layers.Conv2D, keras.layers.Dense)):
            owner[id(top)] = top.name
        for layer in top._flatten_layers(include_self=False, recursive=True):
            owner[id(layer)] = top.name
    log = []
    spec = tf.TensorSpec((batch, size, size, 3), tf.float32)
    with _recording_calls(layers, log):
        # Tracing only: the graph is built with static shapes, nothing is computed.
        tf.function(lambda x: model(x, training=False)).get_concrete_function(spec)
    by_part = {}
    for layer, output in log:
        part = owner.get(id(layer), layer.name)
        by_part[part] = by_part.get(part, 0) + _layer_flops(layer, output)
    return {"flops": sum(by_part.values()), "layer_calls": len(log), "by_part": by_part}


def _host(outputs):
    return [np.asarray(o) for o in tf.nest.flatten(outputs)]


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each of several callables, timed in interleaved rounds.

    After one warm-up call of each (which also traces), every round calls each callable once,
    so that a change of a shared machine's background load during the run hits all of them
    alike and their ratios stay meaningful.

    Returns:
        {key: median seconds} for the keys of ``calls``.
    """
    for call in calls.values():
        call()
    times = {key: [] for key in calls}
    for _ in range(max(1, repeats)):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def forward_calls(model: keras.Model, x) -> dict:
    """The two timed ways of running ``model`` on ``x`` (float32 [1, H, W, 3]) to host arrays.

    Returns:
        {"tf_function": callable, "predict_on_batch": callable}.
    """
    spec = tf.TensorSpec(x.shape, tf.float32)
    fwd = tf.function(lambda t: model(t, training=False), input_signature=[spec])
    return {"tf_function": lambda: _host(fwd(x)),
            "predict_on_batch": lambda: _host(model.predict_on_batch(x))}


def build(preset_name: str, precision: str) -> keras.Model:
    """Mdet of a preset with random weights, built under ``precision`` (then restored)."""
    from focas_keras.models.mdet import build_mdet
    from focas_keras.models.mdet_config import preset

    previous = keras.mixed_precision.global_policy()
    try:
        keras.mixed_precision.set_global_policy(precision)
        keras.utils.set_random_seed(0)
        return build_mdet(preset(preset_name))
    finally:
        keras.mixed_precision.set_global_policy(previous)


def forward_rates(presets, size: int = 1024, repeats: int = 5, log=print) -> dict:
    """Forward GFLOP/s of Mdet presets next to the float32 (and bf16) matmul rate.

    Args:
        presets: iterable of preset names (e.g. ``("cpu", "cpu_full")``).
        size: python int, the square input size in px (batch 1, float32 [1, size, size, 3]).
        repeats: timed rounds (median), after one warm-up call of everything timed.
        log: called with a one-line summary per variant (None: silent).

    Returns:
        dict: machine/versions/load, standalone ``matmul_2048_float32_gflops`` and
        ``matmul_2048_bfloat16_gflops`` (at the start), ``matmul_2048_float32_gflops_end``,
        and ``variants``: {``{preset}_{precision}`` or ``..._folded``: {"preset",
        "precision", "folded", "params", "gflop", "seconds", "method",
        "seconds_tf_function", "seconds_predict_on_batch", "gflops_per_s",
        "matmul_float32_gflops" (timed in the same rounds as this model and its folded or
        unfolded twin), "share_of_matmul" (of that rate), "matmul_bfloat16_gflops" and
        "share_of_bf16_matmul" (bf16 variants), "gflop_by_part"}}.
    """
    from focas_keras.models.fold import fold_weight_standardization

    result = {"date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "tensorflow": tf.__version__, "keras": keras.__version__,
              "size": int(size), "batch": 1, "repeats": int(repeats),
              "load_average_before": os.getloadavg()}
    # Standalone reference rates; the shares use the rates timed inside each variant's rounds.
    f32 = matmul_gflops(repeats)
    bf16 = matmul_gflops(repeats, tf.bfloat16)
    result["matmul_2048_float32_gflops"] = f32
    result["matmul_2048_bfloat16_gflops"] = bf16
    if log:
        log(f"matmul {MATMUL_N}: float32 {f32:.1f} GFLOP/s, bfloat16 {bf16:.1f} GFLOP/s")
    x = tf.random.uniform((1, size, size, 3), seed=1)
    variants = {}
    for name in presets:
        for precision in PRECISIONS:
            model = build(name, precision)
            key = f"{name}_{precision}"
            nets = {key: model, f"{key}_folded": fold_weight_standardization(model)}
            calls = {"matmul_float32": matmul_call(tf.float32)}
            if precision != "float32":
                calls["matmul_bfloat16"] = matmul_call(tf.bfloat16)
            for net_key, net in nets.items():
                for way, call in forward_calls(net, x).items():
                    calls[(net_key, way)] = call
            seconds = interleaved_medians(calls, repeats)
            f32 = 2 * MATMUL_N ** 3 / seconds["matmul_float32"] / 1e9
            for net_key, net in nets.items():
                flops = forward_flops(net, size)
                ways = {way: seconds[(net_key, way)] for way in ("tf_function", "predict_on_batch")}
                method = min(ways, key=ways.get)
                rate = flops["flops"] / ways[method] / 1e9
                entry = {"preset": name, "precision": precision,
                         "folded": net_key.endswith("_folded"),
                         "params": int(net.count_params()), "gflop": flops["flops"] / 1e9,
                         "seconds": ways[method], "method": method,
                         "seconds_tf_function": ways["tf_function"],
                         "seconds_predict_on_batch": ways["predict_on_batch"],
                         "gflops_per_s": rate, "matmul_float32_gflops": f32,
                         "share_of_matmul": rate / f32,
                         "gflop_by_part": {k: v / 1e9 for k, v in flops["by_part"].items()}}
                if precision != "float32":
                    bf16 = 2 * MATMUL_N ** 3 / seconds["matmul_bfloat16"] / 1e9
                    entry["matmul_bfloat16_gflops"] = bf16
                    entry["share_of_bf16_matmul"] = rate / bf16
                variants[net_key] = entry
                if log:
                    log(f"{net_key}: {entry['seconds']:.3f} s ({method}), "
                        f"{entry['gflop']:.2f} GFLOP, {rate:.1f} GFLOP/s, "
                        f"{entry['share_of_matmul']:.1%} of fp32 matmul ({f32:.0f} GFLOP/s)")
            del model, nets, calls
    result["variants"] = variants
    # Again at the end: how far a background load moved during the run.
    result["matmul_2048_float32_gflops_end"] = matmul_gflops(repeats)
    result["load_average_after"] = os.getloadavg()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="cpu,cpu_full",
                        help="comma-separated Mdet presets")
    parser.add_argument("--size", type=int, default=1024, help="square input size, px")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs (median)")
    parser.add_argument("--json", default=None, help="write the result dict here")
    args = parser.parse_args()
    # One tf.function per model and way is intended; TF's retracing warning says otherwise.
    tf.get_logger().setLevel("ERROR")
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    result = forward_rates(presets, args.size, args.repeats)
    text = json.dumps(result, indent=2)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
