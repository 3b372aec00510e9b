"""Leave-one-scanner-out on AMi-Br: Mclass trained with other scanners' mitoses, tested on one.

Stage 1 is the bundled Mdet (trained on ICPR 2012 alone) in every fold, so the folds measure
what Mclass learns from other scanners. Per held-out scanner S (cached, resumable):

    prepare ICPR 2012 (all 15 fields) --patch-size 112, then mine --keep-tp with the bundled
        Mdet                                                   (once: ICPR candidates)
    prepare --format amibr --patch-size 112 --val-scanners S   (AMi-Br: S's crops held out;
        positives around each figure, --cls-background same-crop negatives per crop)
    train-cls --data ICPR --extra-data AMIBR_S --set train.extra_share=E  (the recipe)
    the cascade (bundled Mdet + this Mclass) on S's crops (experiments/amibr_eval.py):
        recall, candidate recall, false positives per crop

``--extra-share 0`` trains the same Mclass recipe on ICPR alone (one run serves every fold:
it never saw any AMi-Br scanner), the control for what the AMi-Br crops add.

Thresholds: the bundled card's stage-1 threshold and TTA with ``--cls-threshold`` (default
0.5), or the pair (and TTA) a finished ICPR CV of the same recipe gives on its pooled
out-of-fold predictions (``--thresholds-from CV_RESULTS_DIR``, as ``train_bundled.py``
chooses them); never chosen on the held-out scanner. With ``--stage1-recall R`` each fold's
stage-1 threshold is at most the highest one at which stage 1 (the bundled Mdet) reaches
candidate recall R on the OTHER three scanners' crops (``amibr_stage1_probe.py``'s output,
``--probe``; its Mdet must be the bundled one).

``--floor F`` runs each fold's cascade once at permissive thresholds (stage 1 at F, stage 2 at
0, the recipe's TTA) and keeps every candidate (``<out>/candidates/<scanner>/``); the fold's
metrics at its pair are then computed from them (``amibr_eval.rescore``), on every run. So
one detection pass serves every threshold rule: rerun with another ``--out``, ``--candidates``
pointing at the first run's, and another ``--thresholds-from`` or ``--stage1-recall``: only
the scoring runs again.

Usage:
    python experiments/scanner_cv.py --out experiments/results/scanner_cv_lite0 \\
        --preset lite0 --extra-share 0.3 --per-scanner 200
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

import amibr_eval  # noqa: E402
import icpr2012_cv as base  # noqa: E402  (the CLI runner of the CVs)

ICPR = REPO.parent / "shared" / "data" / "icpr2012" / "images"
AMIBR = REPO.parent / "shared" / "data" / "ami_br"
PATCH = 112


def _cli(args, log_path: Path) -> str:
    """Runs ``focas-keras ARGS`` as the ICPR CVs do (this checkout, or FOCAS_SRC, first on
    the path); appends its output to the log."""
    return base._cli(list(args), log_path, base.cli_env())


def thresholds_of(args, card: dict) -> tuple[tuple[float, float], bool]:
    """The (stage-1, stage-2) pair and TTA: ``--thresholds-from`` (a finished ICPR CV of the
    same recipe: its best pair on the pooled out-of-fold predictions of the final weights, as
    ``train_bundled.py`` ships it), else the card's stage-1 threshold and TTA with
    ``--cls-threshold``."""
    if args.thresholds_from is None:
        return ((float(card["thresholds"]["det_threshold"]), args.cls_threshold),
                bool(card["thresholds"].get("tta")))
    import train_bundled

    pair = train_bundled.oof_thresholds(Path(args.thresholds_from))
    return (pair["det_threshold"], pair["cls_threshold"]), pair["tta"]


def train_steps(args, work: Path, log: Path, fold: str | None) -> Path:
    """Prepares the shards a fold needs and trains its Mclass; returns the run directory."""
    from focas_keras import pretrained

    icpr = work / "icpr_cls"
    if not (icpr / "mined.txt").exists():
        with pretrained.runs() as (det_run, _, _):
            _cli(["prepare", args.icpr, "--format", "icpr2012", "--out", icpr, "--patch-size",
                  PATCH, "--det-per-mitosis", 0, "--det-empty-share", 0, "--val-fraction", 0,
                  "--seed", args.seed, "--overwrite"], log)
            out = _cli(["mine", "--det", det_run, "--data", args.icpr, "--format", "icpr2012",
                        "--out", icpr, "--keep-tp"], log)
        (icpr / "mined.txt").write_text(out)
    sets = [f"train.stain_sigma={args.stain_sigma}", *args.cls_set]
    extra = []
    if args.extra_share > 0:
        amibr = work / f"amibr_{amibr_eval.slug(fold)}"
        if not (amibr / "manifest.json").exists():
            _cli(["prepare", args.amibr, "--format", "amibr", "--out", amibr, "--patch-size",
                  PATCH, "--cls-per-mitosis", args.per_figure, "--cls-background",
                  args.background, "--val-scanners", fold, "--seed", args.seed,
                  "--overwrite"], log)
        extra = ["--extra-data", amibr]
        sets.append(f"train.extra_share={args.extra_share}")
        run = work / f"mclass_{amibr_eval.slug(fold)}"
    else:
        run = work / "mclass_icpr_only"
    if not (run / "model.keras").exists():
        epochs = ["--epochs", args.epochs] if args.epochs else []
        steps = ["--steps-per-epoch", args.steps] if args.steps else []
        _cli(["train-cls", "--data", icpr, "--out", run, "--preset", args.preset, "--seed",
              args.seed, *extra, *epochs, *steps,
              *[a for s in sets for a in ("--set", s)]], log)
    return run


def floor_fold(args, scanner: str, pair: tuple, tta: bool, fold_out: Path) -> None:
    """One fold under ``--floor``: the cascade at (floor, 0) on the held-out scanner's crops,
    every candidate kept (once; resumable), then the metrics at ``pair`` from them, written
    to ``fold_out`` (``crops.csv``, ``summary.json``)."""
    from focas_keras import pretrained
    from focas_keras.errors import InputError

    if pair[0] < args.floor:
        raise SystemExit(f"{scanner}: stage-1 threshold {pair[0]} is below --floor "
                         f"{args.floor}")
    started = time.perf_counter()
    slug = amibr_eval.slug(scanner)
    kept = (args.candidates or args.out / "candidates") / slug
    log = args.out / f"{slug}.log"
    run = train_steps(args, args.work, log, scanner)
    try:  # every chunk cached: no model needed
        floor_summary = amibr_eval.run(args.amibr, kept, None, "", args.per_scanner,
                                       [scanner], log=print, keep_candidates=True)
    except InputError:
        with pretrained.runs() as (det_run, _, _):
            cascade, name = amibr_eval.load_base_cascade(det_run, run, (args.floor, 0.0),
                                                         tta=tta)
        floor_summary = amibr_eval.run(args.amibr, kept, cascade, name, args.per_scanner,
                                       [scanner], log=print, keep_candidates=True)
        floor_summary["fold_seconds"] = round(time.perf_counter() - started, 1)
        (kept / "fold_seconds.json").write_text(json.dumps(floor_summary["fold_seconds"]))
    if bool(floor_summary["settings"]["tta"]) != bool(tta):
        raise SystemExit(f"{kept}: candidates scored with TTA "
                         f"{'on' if floor_summary['settings']['tta'] else 'off'}, the pair "
                         f"wants it {'on' if tta else 'off'} (another --candidates)")
    merge_px = floor_summary["settings"]["merge_px"]
    table, scanners = amibr_eval.rescore(kept, args.amibr, pair[0], pair[1], merge_px,
                                         [scanner])
    fold_out.mkdir(parents=True, exist_ok=True)
    amibr_eval._write_csv(table, fold_out / "crops.csv")
    seconds = kept / "fold_seconds.json"
    summary = {"model": floor_summary["model"], "floor": floor_summary["resolved"],
               "tta": tta, "merge_px": merge_px, "thresholds": list(pair),
               "fold_seconds": json.loads(seconds.read_text()) if seconds.exists() else None,
               "scanners": scanners,
               "recipe": {k: (str(v) if isinstance(v, Path) else v)
                          for k, v in vars(args).items()}}
    (fold_out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="Results (cached per fold).")
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_scanner_cv"))
    parser.add_argument("--icpr", type=Path, default=ICPR)
    parser.add_argument("--amibr", type=Path, default=AMIBR)
    parser.add_argument("--preset", default="lite0")
    parser.add_argument("--extra-share", type=float, default=0.3)
    parser.add_argument("--stain-sigma", type=float, default=0.05)
    parser.add_argument("--per-figure", type=int, default=4,
                        help="Positive patches per AMi-Br figure.")
    parser.add_argument("--background", type=int, default=2,
                        help="Same-crop negative patches per AMi-Br crop.")
    parser.add_argument("--cls-set", action="append", default=[], metavar="SECTION.FIELD=V")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="Steps per epoch.")
    parser.add_argument("--cls-threshold", type=float, default=0.5)
    parser.add_argument("--thresholds-from", type=Path, default=None,
                        help="A finished recipe_cv.py results directory (--final-ablation).")
    parser.add_argument("--stage1-recall", type=float, default=None,
                        help="Cap each fold's stage-1 threshold where the other scanners' "
                        "candidate recall reaches this (needs --probe).")
    parser.add_argument("--stage1-floor", type=float, default=0.0,
                        help="--stage1-recall's cap never goes below this (train_bundled.py "
                        "clips it to the ICPR CV's candidate floor, 0.05).")
    parser.add_argument("--probe", type=Path,
                        default=REPO / "experiments" / "results" / "amibr_stage1_probe",
                        help="amibr_stage1_probe.py output of the bundled Mdet.")
    parser.add_argument("--floor", type=float, default=None,
                        help="Detect once at this stage-1 cut (stage 2 at 0), keep every "
                        "candidate, score each pair from them.")
    parser.add_argument("--candidates", type=Path, default=None,
                        help="Where --floor keeps the candidates (default: OUT/candidates); "
                        "point several --out at one to score several rules.")
    parser.add_argument("--per-scanner", type=int, default=200)
    parser.add_argument("--scanners", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from focas_keras.datasets.readers.amibr import read_amibr
    from focas_keras import pretrained

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    scanners = args.scanners or sorted(set(read_amibr(args.amibr,
                                                      check_images=False).images.scanner))
    thresholds, tta = thresholds_of(args, pretrained.load_card())
    probe = None
    if args.stage1_recall is not None:
        import amibr_stage1_probe
        from focas_keras.io import sha256_file

        probe = amibr_stage1_probe.load_probe(args.probe)
        with pretrained.runs() as (det_run, _, _):
            if probe[2].get("det_sha256") != sha256_file(Path(det_run) / "model.keras"):
                raise SystemExit(f"{args.probe}: the probe ran another Mdet than the bundled one")
    results, pairs = {}, {}
    for scanner in scanners:
        pair = thresholds
        if probe is not None:
            crops, caps, _ = probe
            others = crops[crops.scanner != scanner]
            cut = amibr_stage1_probe.cut_for_recall(others, caps, args.stage1_recall)
            pair = (min(thresholds[0], max(cut, args.stage1_floor)), thresholds[1])
        pairs[scanner] = pair
        fold_out = args.out / amibr_eval.slug(scanner)
        done = fold_out / "summary.json"
        if args.floor is not None:
            floor_fold(args, scanner, pair, tta, fold_out)
        elif not done.exists():
            started = time.perf_counter()
            log = args.out / f"{amibr_eval.slug(scanner)}.log"
            run = train_steps(args, args.work, log, scanner)
            with pretrained.runs() as (det_run, _, _):
                cascade, name = amibr_eval.load_base_cascade(det_run, run, pair, tta=tta)
            summary = amibr_eval.run(args.amibr, fold_out, cascade, name, args.per_scanner,
                                     [scanner], log=print)
            summary["fold_seconds"] = round(time.perf_counter() - started, 1)
            summary["thresholds"] = list(pair)
            summary["recipe"] = {k: (str(v) if isinstance(v, Path) else v)
                                 for k, v in vars(args).items()}
            (fold_out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        results[scanner] = json.loads(done.read_text())["scanners"].get(scanner)
        print(f"{scanner}: {results[scanner]}", flush=True)
    (args.out / "summary.json").write_text(json.dumps(
        {"thresholds": thresholds, "fold_thresholds": pairs, "held_out": results},
        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
