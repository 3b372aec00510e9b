"""Does stain/colour augmentation matter? Mdet (``tiny``, full backbone, hybrid head) trained
with three augmentation settings on the synthetic benchmark of ``experiments/ablation.py``,
tested on the 16 held-out fields as generated and on the SAME 16 fields rendered with a
shifted stain (bluer, paler hematoxylin, stronger eosin, yellower background: a 'new scanner';
see ``ablation.shifted_stain_patch``).

Settings (``focas_keras.data.augment.AugmentConfig``; geometry, noise and blur stay on in all):

    default     the trainer's AugmentConfig() (HED stain jitter 0.05, hue 0.03, saturation
                and contrast 0.15, brightness 0.08) -- the ablation's ``full`` run, reused
    no_colour   stain_sigma = hue = saturation = contrast = brightness = 0
    strong      stain_sigma 0.2, hue 0.06 (the rest default)

Stage 1 alone is scored as in the ablation (recall at 0.05, P/R/F1 at the validation best-F1
threshold, and with the 30 px merge). Resumable: one JSON per setting under ``--results``.

Usage:
    python experiments/augment_study.py --work /tmp/focas_ablation \
        --results experiments/results/augment --det-epochs 8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402  (sets up the import path of focas_keras)

SETTINGS = {
    "default": None,
    "no_colour": {"stain_sigma": 0.0, "hue": 0.0, "saturation": 0.0, "contrast": 0.0,
                  "brightness": 0.0},
    "strong": {"stain_sigma": 0.2, "hue": 0.06},
}
TESTS = ("test", "test_shifted")


def colour_stats(directory: Path) -> dict:
    """Mean RGB and mean hematoxylin/eosin optical density (HED) of the PNG fields."""
    import cv2
    import numpy as np

    rgb, od = [], []
    for path in sorted(directory.glob("*.png")):
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB).astype(np.float64)
        rgb.append(image.reshape(-1, 3).mean(0))
        od.append((-np.log(np.clip(image, 1, 255) / 255.0)).reshape(-1, 3).mean(0))
    return {"mean_rgb": [round(float(v), 1) for v in np.mean(rgb, 0)],
            "mean_od_rgb": [round(float(v), 3) for v in np.mean(od, 0)]}


def _one(args, name: str) -> None:
    paths = ablation.build_benchmark(args.work)
    run_name = "full" if SETTINGS[name] is None else f"aug_{name}"
    result = ablation.run_variant("full", paths, args.work / "runs", args.det_epochs, args.seed,
                                  augment_kwargs=SETTINGS[name], tests=TESTS,
                                  run_name=run_name)
    result["setting"] = name
    out = args.results / f"{name}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=float) + "\n")
    tmp.replace(out)


def table(results: Path) -> str:
    lines = ["| augmentation | held-out set | stage-1 recall @0.05 (candidates) | stage 1 @ val "
             "thr: TP/FP/FN; P R F1 | stage 1 + 30 px merge |", "|---|---|---|---|---|"]
    for name in SETTINGS:
        path = results / f"{name}.json"
        if not path.exists():
            continue
        r = json.loads(path.read_text())
        for test in TESTS:
            t = r[test]
            lines.append(f"| {name} | {test} | {t['recall_at_min']:.3f} "
                         f"({t['candidates_at_min']}) | "
                         + ablation.markdown_row("", t, keys=("stage1", "stage1_merged"))[4:])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_ablation"))
    parser.add_argument("--results", type=Path,
                        default=ablation.REPO / "experiments" / "results" / "augment")
    parser.add_argument("--det-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.one:
        _one(args, args.one)
        return 0
    paths = ablation.build_benchmark(args.work)
    stats = {test: colour_stats(Path(paths[test])) for test in TESTS}
    (args.results / "colour_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    for name in (s for s in args.settings.split(",") if s):
        if (args.results / f"{name}.json").exists():
            continue
        t0 = time.perf_counter()
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", name, "--work", str(args.work),
               "--results", str(args.results), "--det-epochs", str(args.det_epochs),
               "--seed", str(args.seed)]
        with open(args.results / f"{name}.log", "a", encoding="utf-8") as log:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"  {name} {'FAILED' if code else 'done'} in {time.perf_counter() - t0:.0f} s",
              flush=True)
    text = table(args.results) + "\n\ncolour of the held-out sets: " + json.dumps(stats)
    (args.results / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
