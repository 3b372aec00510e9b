"""Seconds per real 2084 x 2084 HPF for the full cascade, next to the published protocol and
keras-hub's RetinaNet, with peak memory. Each variant runs in its own subprocess (clean peak
RSS), one after the other, on the same image.

Variants (``paper`` presets, random weights; stage 1 keeps its top 100 candidates, which all
go through stage 2 on 112 px crops):
- ``cascade_whole_fp32``: Mdet on the whole HPF (padded to 2112) + Mclass.
- ``cascade_whole_fp32_before``: the same as the package ran before the two speed levers:
  Keras's ``GroupNormalization`` instead of :class:`focas_keras.layers.group_norm.GroupNorm`
  and an eager forward pass instead of the compiled :class:`focas_keras.models.mdet.Detector`.
- ``cascade_half_fp32``: stage 1 at half resolution (Mdet on the HPF shrunk to 1042 px,
  0.4912 um/px, anchors halved), stage 2 on 112 px crops of the full-resolution HPF: what
  ``detect`` runs with an Mdet trained on ``prepare --target-mpp 0.4912`` shards.
- ``cascade_whole_bf16``: the same under ``mixed_bfloat16``.
- ``cascade_whole_bf16_p3p5``: bf16 with the pyramid cut to P3-P5 (mitoses are 26-68 px:
  P6/P7 anchors never match them).
- ``published_tiles_fp32``: the published code's protocol: pad to 2144, 11 x 11 tiles of 224 px
  at stride 192, batched, + Mclass.
- ``keras_hub_retinanet_fp32``: keras-hub RetinaNet ResNet-50-FPN forward on the whole HPF.

Usage:
    pip install -e ".[bench]"
    python experiments/bench_hpf.py [--repeats 2] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HPF = Path(__file__).resolve().parents[2] / "shared/data/icpr2012/images/A03_00.jpg"
VARIANTS = ("cascade_whole_fp32", "cascade_half_fp32", "cascade_whole_fp32_before",
            "cascade_whole_bf16",
            "cascade_whole_bf16_p3p5", "published_tiles_fp32", "keras_hub_retinanet_fp32")


def _image():
    from focas_keras.datasets.annotations import load_image

    if HPF.is_file():
        return load_image(HPF), HPF.name
    from focas_keras.datasets.synth import synthesize_image

    return synthesize_image(2084, seed=0).image, "synthetic 2084 px"


def _cascade(variant: str):
    import keras

    from focas_keras.datasets.annotations import ICPR2012_MPP
    from focas_keras.inference.cascade import Cascade, CascadeSettings
    from focas_keras.models.mclass import build_mclass
    from focas_keras.models.mclass_config import preset as cls_preset
    from focas_keras.models.mdet import build_mdet
    from focas_keras.models.mdet_config import preset as det_preset

    if "bf16" in variant:
        keras.mixed_precision.set_global_policy("mixed_bfloat16")
    if variant.endswith("_before"):
        from focas_keras.models import backbone, mdet

        backbone.GroupNorm = keras.layers.GroupNormalization
        original_init = mdet.Detector.__init__

        def eager_init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            self._compiled = self._forward

        mdet.Detector.__init__ = eager_init
    overrides = {"inference.score_threshold": 0.0, "inference.max_detections": 100}
    if "p3p5" in variant:
        overrides["fpn.max_level"] = 5
    half = "half" in variant
    if half:
        overrides["head.base_sizes"] = (12, 24, 48, 96, 192)
    det_config = det_preset("paper").override(**overrides)
    tiles = variant.startswith("published")
    settings = CascadeSettings(det_threshold=0.0, det_mpp=2 * ICPR2012_MPP if half else None,
                               tile=224 if tiles else 0,
                               overlap=32 if tiles else 64, tile_batch=11, cls_threshold=0.5)
    keras.utils.set_random_seed(0)
    return Cascade(build_mdet(det_config), det_config, build_mclass(cls_preset("paper")),
                   cls_preset("paper"), settings)


def run_variant(variant: str, repeats: int) -> dict:
    """Times one variant in this process; returns seconds per HPF and peak RSS."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    image, name = _image()
    if variant.startswith("keras_hub"):
        sys.path.insert(0, str(Path(__file__).parent))
        from bench_model import build_peer, outputs_of

        model = build_peer()
        padded = np.zeros((1, 2112, 2112, 3), np.float32)
        padded[0, :2084, :2084] = image / 255.0
        x = tf.constant(padded)
        fwd = tf.function(lambda t: outputs_of(model(t, training=False)))

        def once():
            [o.numpy() for o in fwd(x)]
            return None
    else:
        cascade = _cascade(variant)

        def once():
            return cascade.run(image)

    result = once()  # warm-up: traces the graphs
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = once()
        times.append(time.perf_counter() - start)
    out = {"variant": variant, "image": name, "seconds": statistics.median(times),
           "runs": times,
           "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20}
    if result is not None:
        out["candidates"] = int(len(result))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_variant(args.one, args.repeats)))
        return
    results = {"date": datetime.date.today().isoformat(),
               "machine": f"{os.uname().machine}, {os.cpu_count()} cores, no GPU"}
    for variant in args.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--one", variant, "--repeats",
                               str(args.repeats)], capture_output=True, text=True)
        if proc.returncode:
            results[variant] = {"error": proc.stderr.strip().splitlines()[-1:]}
        else:
            results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(json.dumps({variant: results[variant]}), flush=True)
    peer = results.get("keras_hub_retinanet_fp32", {}).get("seconds")
    if peer:
        results["speedup_vs_keras_hub"] = {
            k: peer / v["seconds"] for k, v in results.items()
            if isinstance(v, dict) and "seconds" in v}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
