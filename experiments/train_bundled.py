"""Rebuilds the bundled pretrained cascade (``focas_keras/pretrained/icpr2012_cpu``).

The whole-field recipe (README, "Training for whole fields") on the 15 ICPR 2012 HPFs of
``../shared/data/icpr2012``, preset ``cpu``, seed 0, in one of two ways:

- default: ALL 15 HPFs train. There is no validation slide left, so both runs keep their
  final weights, and the thresholds are the best-F1 (stage-1, stage-2) pair on the pooled
  out-of-fold predictions of the CV's final weights.
- ``--val-slide S``: slide S validates, as in each CV fold (Mdet selected on its whole
  fields, its candidates mined for Mclass's selection only), and the other slides train. The
  bundle ships the selected checkpoints (``best.keras``), and the thresholds are the best-F1
  pair on the pooled out-of-fold predictions of the CV's selected checkpoints.

Either way the CV is ``experiments/recipe_cv.py --final-ablation`` with the same overrides
(``--results``; run it first), and Mclass TTA is switched on in the card only if it raised
that CV's pooled F1 under the same rule.

Writes the two runs' ``model.keras``, ``config.json`` and ``run.json``, the sample field, and
``card.json`` (thresholds, the CV estimate, sha256 of every file, the detections on the
sample field that ``tests/test_bundled.py`` checks, and the ``domain`` block of
``experiments/domain_stats.py``) plus ``MODEL_CARD.md``.

``--stage1-recall R`` caps the pair's stage-1 threshold where the shipped Mdet reaches
candidate recall R on other scanners' mitoses (``experiments/amibr_stage1_probe.py``'s crops),
never below the CV's candidate floor (its out-of-fold tables hold nothing lower); the card's
CV estimate is then that rule's (each held-out slide's stage 1 capped the same way).

``--reuse-shipped`` trains nothing: the shipped weights stay, and only the thresholds, the
CV estimate, the card and its reference detections are rebuilt from ``--results`` (a CV of the
same recipe, e.g. one whose folds train on 4 slides: ``recipe_cv.py --no-val``).

Usage:
    FOCAS_SRC=/tmp/focas_src python experiments/train_bundled.py --work /tmp/focas_bundled
    python experiments/train_bundled.py --results experiments/results/icpr2012_cv_scale \
        --val-slide A04
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import domain_stats  # noqa: E402
import icpr2012_cv as base  # noqa: E402
import recipe_cv  # noqa: E402

NAME = "icpr2012_cpu"
SAMPLE = "A03_00.jpg"
SLIDES = ("A00", "A01", "A02", "A03", "A04")


def recipe_options(summary: dict) -> dict:
    """The CV's extra trainer overrides ({"train-det": [...], "train-cls": [...]}), so that the
    bundled runs are trained exactly as the folds whose predictions chose their thresholds."""
    overrides = summary.get("overrides") or {}
    options = {"train-det": list(overrides.get("train-det", [])),
               "train-cls": list(overrides.get("train-cls", []))}
    # Mclass's preset and AMi-Br crops (recipe_cv.py --cls-preset / --amibr), where the CV
    # used them; absent from older summaries (ResNet-34 on ICPR alone).
    if summary.get("cls_preset") and summary.get("cls_preset") != summary.get("preset"):
        options["cls_preset"] = summary["cls_preset"]
    if summary.get("amibr"):
        options["amibr"] = dict(summary["amibr"])
    return options


def amibr_block(options: dict) -> dict | None:
    """The card's second data set where the recipe trained Mclass on AMi-Br crops."""
    if not options.get("amibr"):
        return None
    import pandas as pd

    labels = pd.read_csv(Path(options["amibr"]["data"]) / "labels.csv")
    return {"name": "AMi-Br (MIDOG 2021 and TUPAC16 mitotic figures, 128 px crops)",
            "crops": int(len(labels)), "scanners": sorted(labels["scanner"].unique()),
            "extra_share": options["amibr"]["extra_share"],
            "licence": "crops MIT (DeepMicroscopy/AMi-Br_Benchmark); the images are research "
                       "data of MIDOG 2021 and TUPAC16: research use, cite them",
            "citation": "Bertram CA et al. Histologic Dataset of Normal and Atypical Mitotic "
                        "Figures on Human Breast Cancer (AMi-Br). BVM 2025, "
                        "doi 10.1007/978-3-658-47422-5_25; Aubreville M et al. (MIDOG 2021); "
                        "Veta M et al. (TUPAC16)"}


def scanner_block(results: Path | None) -> dict | None:
    """Held-out-scanner estimates of the recipe from a finished ``scanner_cv.py`` run."""
    if results is None:
        return None
    summary = json.loads((Path(results) / "summary.json").read_text())
    pairs = list((summary.get("fold_thresholds") or {}).values()) or [summary["thresholds"]]
    dets, clss = sorted({p[0] for p in pairs}), sorted({p[1] for p in pairs})
    det = f"{dets[0]:.4f}" if len(dets) == 1 else f"{dets[0]:.4f}-{dets[-1]:.4f} (per fold)"
    cls = f"{clss[0]:.4f}" if len(clss) == 1 else f"{clss[0]:.4f}-{clss[-1]:.4f} (per fold)"
    return {"protocol": (f"leave-one-scanner-out on AMi-Br (experiments/scanner_cv.py, "
                         f"{Path(results).name}): Mclass trained without the scanner's crops, "
                         f"Mdet of the bundled recipe (ICPR 2012 only), thresholds {det} / "
                         f"{cls}, nothing chosen on the held-out scanner; recall "
                         "on its crops, false positives = accepted detections farther than "
                         "20 px from every labelled figure, per crop"),
            "held_out": summary["held_out"]}


def train(args, work: Path, log_path: Path, options: dict) -> tuple[Path, Path]:
    """The recipe on every HPF, or with ``args.val_slide`` validating; returns (Mdet run,
    Mclass run)."""
    env = base.cli_env()

    def cli(*a):
        return base._cli(list(a), log_path, env)

    data = args.data
    det_shards, cls_shards = work / "shards_det", work / "shards_cls"
    mdet, mclass = work / "mdet", work / "mclass"
    split = ["--val-slides", args.val_slide] if args.val_slide else ["--val-fraction", 0]
    common = [*split, "--seed", args.seed, "--overwrite"]
    val_fields = ["--val-fields"] if args.val_slide else []
    if not (det_shards / "manifest.json").exists():
        cli("prepare", data, "--format", "icpr2012", "--out", det_shards, "--target-mpp",
            recipe_cv.DET_MPP, "--det-grid", *val_fields, "--det-empty-share", 0, *common)
    if not (cls_shards / "manifest.json").exists():
        cli("prepare", data, "--format", "icpr2012", "--out", cls_shards, "--patch-size", 112,
            "--det-per-mitosis", 0, "--det-empty-share", 0, *common)
    if not (mdet / "model.keras").exists():
        cli("train-det", "--data", det_shards, "--out", mdet, "--preset", args.preset,
            "--seed", args.seed, "--set", "head.base_sizes=[12,24,48,96,192]",
            *recipe_cv._sets(options["train-det"]))
    if not (work / "mined.txt").exists():
        include_val = ["--include-val"] if args.val_slide else []
        (work / "mined.txt").write_text(cli("mine", "--det", mdet, "--data", data, "--format",
                                            "icpr2012", "--out", cls_shards, "--keep-tp",
                                            *include_val))
    extra = []
    if options.get("amibr"):  # the CV's recipe: other scanners' mitoses in Mclass's batches
        amibr_shards = work / "shards_amibr"
        if not (amibr_shards / "manifest.json").exists():
            cli(*recipe_cv.amibr_prepare_args(options["amibr"]["data"], amibr_shards,
                                              args.seed))
        extra = ["--extra-data", amibr_shards,
                 "--set", f"train.extra_share={options['amibr']['extra_share']}"]
    if not (mclass / "model.keras").exists():
        cli("train-cls", "--data", cls_shards, "--out", mclass, "--preset",
            options.get("cls_preset") or args.preset, "--seed", args.seed, *extra,
            *recipe_cv._sets(options["train-cls"]))
    return mdet, mclass


def shipped_runs(bundle: Path, work: Path, options: dict) -> tuple:
    """The shipped bundle's two runs copied to ``work`` as run directories, with the training
    seconds and date of its card; refused when the CV was trained with other overrides than
    the shipped weights (its thresholds would belong to another recipe)."""
    card = json.loads((bundle / "card.json").read_text())
    shipped = recipe_options({"overrides": card.get("overrides") or {},
                              "cls_preset": (card.get("recipe_options") or {}).get("cls_preset"),
                              "amibr": (card.get("recipe_options") or {}).get("amibr")})
    if shipped != options:
        raise SystemExit(f"--reuse-shipped: the CV's overrides {options} differ from the "
                         f"shipped model's {shipped}")
    runs = []
    for kind, name in (("det", "mdet"), ("cls", "mclass")):
        run = work / name
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        for file in ("model.keras", "config.json", "run.json"):
            shutil.copy(bundle / kind / file, run / file)
        runs.append(run)
    return runs[0], runs[1], float(card["train_seconds"]), card["date"]


def oof_thresholds(results: Path, selected: bool = False) -> dict:
    """The pair of best F1 on all folds' pooled out-of-fold predictions of the weights this
    script ships (``selected``: the checkpoints chosen on each fold's validation slide; else
    the FINAL weights: with every field in training there is nothing left to select a
    checkpoint on), and whether TTA helped on the CV under that rule (its cross-fold pooled F1
    above the plain one's)."""
    import pandas as pd

    from focas_keras.evaluation import evaluate as ev

    summary = json.loads((results / "summary.json").read_text())
    if not summary.get("complete"):
        raise SystemExit(f"the CV in {results} is not complete (folds: {summary['folds']})")
    pooled = summary["pooled"]
    if not selected and "cascade_final" not in pooled:
        raise SystemExit("run experiments/recipe_cv.py --final-ablation first")
    key = "cascade" if selected else "cascade_final"
    tta = pooled[f"{key}_tta"]["f1"] > pooled[key]["f1"]
    name = ("tta" if tta else "plain") if selected else ("final_tta" if tta else "final_plain")
    truth = ev.read_truth(recipe_cv.DEFAULT_DATA / "images", "icpr2012").points
    truths, preds = [], []
    for slide in summary["folds"]:
        truths.append({k: v for k, v in truth.items() if k.startswith(slide)})
        preds.append(pd.read_csv(results / "oof" / f"{slide}_{name}.csv"))
    pair = recipe_cv.pooled_pair(truths, preds)
    return {"det_threshold": float(pair["det_threshold"]),
            "cls_threshold": float(pair["cls_threshold"]), "tta": bool(tta),
            "oof_f1_at_pair": float(pair["f1"]), "cv": summary,
            "cv_key": f"{key}_tta" if tta else key}


def capped_thresholds(results: Path, cap: float, recall: float) -> dict:
    """:func:`oof_thresholds` with stage 1 at most ``cap`` (clipped to the CV's candidate
    floor, below which its out-of-fold tables hold nothing), and the CV estimate of that rule:
    each held-out slide's pair chosen on the other folds' pooled predictions, its stage-1
    threshold capped the same way."""
    import pandas as pd

    from focas_keras.evaluation import evaluate as ev

    chosen = oof_thresholds(results)
    cv = chosen["cv"]
    floor = float(cv.get("candidate_threshold", 0.05))
    cut, cap = float(cap), max(float(cap), floor)
    kind = "final_tta" if chosen["tta"] else "final_plain"
    truth = ev.read_truth(recipe_cv.DEFAULT_DATA / "images", "icpr2012").points
    truths = {s: {k: v for k, v in truth.items() if k.startswith(s)} for s in cv["folds"]}
    preds = {s: pd.read_csv(results / "oof" / f"{s}_{kind}.csv") for s in cv["folds"]}
    tp = fp = fn = 0
    for slide in cv["folds"]:
        others = [s for s in cv["folds"] if s != slide]
        pair = recipe_cv.pooled_pair([truths[s] for s in others], [preds[s] for s in others])
        r = recipe_cv.score_pair(truths[slide], preds[slide],
                                 min(pair["det_threshold"], cap), pair["cls_threshold"])
        tp, fp, fn = tp + r["tp"], fp + r["fp"], fn + r["fn"]
    pooled = {"tp": tp, "fp": fp, "fn": fn,
              "precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn),
              "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0}
    rule = (f"stage 1 at most {cap:g}: the highest cut at which the bundled Mdet reaches "
            f"candidate recall {recall:g} on other scanners' mitoses (AMi-Br, 4 x 200 crops; "
            f"experiments/amibr_stage1_probe.py) is {cut:.4f}, clipped to the CV's candidate "
            f"floor {floor:g} (its out-of-fold tables hold nothing lower)")
    return {**chosen, "det_threshold": min(chosen["det_threshold"], cap),
            "chosen_on": ("pooled out-of-fold predictions of the 5-fold leave-one-slide-out CV "
                          f"(all 101 mitoses), {rule}"),
            "cv_rule": ("thresholds for each held-out slide chosen on the other folds' pooled "
                        f"out-of-fold predictions, stage 1 capped at {cap:g} as shipped"),
            "cv_pooled": pooled}


def stage1_cap(probe: Path, recall: float) -> float:
    """The highest stage-1 threshold at which the bundled Mdet reaches candidate ``recall`` on
    all the probe's crops (``amibr_stage1_probe.py``; it must have run the shipped Mdet)."""
    import amibr_stage1_probe

    from focas_keras import pretrained
    from focas_keras.io import sha256_file

    crops, caps, summary = amibr_stage1_probe.load_probe(probe)
    with pretrained.runs() as (det_run, _, _):
        if summary.get("det_sha256") != sha256_file(Path(det_run) / "model.keras"):
            raise SystemExit(f"{probe}: the probe ran another Mdet than the bundled one")
    return amibr_stage1_probe.cut_for_recall(crops, caps, recall)


def _command(args, summary: dict, options: dict) -> str:
    """The commands that rebuild this model: its CV, then this script on that CV."""
    extra = [f"--det-set {o}" for o in options["train-det"]]
    extra += [f"--cls-set {o}" for o in options["train-cls"]]
    if options.get("cls_preset"):
        extra.append(f"--cls-preset {options['cls_preset']}")
    if options.get("amibr"):
        extra.append(f"--amibr ../shared/data/ami_br --extra-share "
                     f"{options['amibr']['extra_share']:g}")
    if summary.get("candidate_threshold", 0.05) != 0.05:
        extra.append(f"--min-det {summary['candidate_threshold']:g}")
    if summary.get("validation_slide") is False:
        extra.append("--no-val")
    results = ""
    default = REPO / "experiments" / "results" / "icpr2012_cv"
    if args.results.resolve() != default.resolve():
        rel = args.results.resolve().relative_to(REPO)
        results = f" --results {rel.as_posix()}"
    val = f" --val-slide {args.val_slide}" if args.val_slide else ""
    if getattr(args, "stage1_recall", None) is not None:
        val += f" --stage1-recall {args.stage1_recall:g}"
    if getattr(args, "scanners_from", None) is not None:  # committed scanner_cv.py results
        val += f" --scanners-from {Path(args.scanners_from).resolve().relative_to(REPO).as_posix()}"
    return (f"python experiments/recipe_cv.py --preset {args.preset} --final-ablation "
            + "".join(f"{e} " for e in extra) + f"{results.strip()} && python "
            f"experiments/train_bundled.py --preset {args.preset}{results}{val}"
            ).replace("  ", " ")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=recipe_cv.DEFAULT_DATA / "images")
    parser.add_argument("--work", type=Path, default=Path("/tmp/focas_bundled"))
    parser.add_argument("--results", type=Path,
                        default=REPO / "experiments" / "results" / "icpr2012_cv")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-slide", default="",
                        help="Validate on this slide (ship the selected checkpoints) instead "
                             "of training on all 15 HPFs (ship the final weights).")
    parser.add_argument("--reuse-shipped", action="store_true",
                        help="Do not train: keep the shipped weights (and their training date "
                             "and time) and only re-derive the thresholds, the CV estimate and "
                             "the reference detections from --results (a CV of the same "
                             "recipe).")
    parser.add_argument("--scanners-from", type=Path, default=None,
                        help="A finished scanner_cv.py output directory: its held-out-scanner "
                             "recall and false positives go into the card.")
    parser.add_argument("--stage1-recall", type=float, default=None,
                        help="Cap the stage-1 threshold where the shipped Mdet reaches this "
                             "candidate recall on other scanners' crops (--probe).")
    parser.add_argument("--probe", type=Path,
                        default=REPO / "experiments" / "results" / "amibr_stage1_probe",
                        help="amibr_stage1_probe.py output of the shipped Mdet.")
    parser.add_argument("--train-seconds", type=float, default=None,
                        help="The training time to record when the steps ran before (the "
                             "work directory's finished steps are skipped, so this run does "
                             "not time them).")
    args = parser.parse_args(argv)
    if args.val_slide and args.val_slide not in SLIDES:
        parser.error(f"--val-slide: one of {', '.join(SLIDES)}, not {args.val_slide!r}")
    if args.reuse_shipped and args.val_slide:
        parser.error("--reuse-shipped keeps the shipped final weights: no --val-slide")
    sys.path.insert(0, str(base.SRC))
    from focas_keras import pretrained
    from focas_keras.io import sha256_file

    if args.stage1_recall is not None:
        if args.val_slide:
            parser.error("--stage1-recall: the final weights' rule only (no --val-slide)")
        chosen = capped_thresholds(args.results, stage1_cap(args.probe, args.stage1_recall),
                                   args.stage1_recall)
    else:
        chosen = oof_thresholds(args.results, selected=bool(args.val_slide))
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    options = recipe_options(chosen["cv"])
    out = REPO / "focas_keras" / "pretrained" / NAME
    date = datetime.date.today().isoformat()
    if args.reuse_shipped:
        mdet, mclass, seconds, date = shipped_runs(out, args.work, options)
    else:
        mdet, mclass = train(args, args.work, args.work / "train.log", options)
        seconds = (time.perf_counter() - start if args.train_seconds is None
                   else args.train_seconds)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    weights = "best.keras" if args.val_slide else "model.keras"
    selection = None
    for kind, run in (("det", mdet), ("cls", mclass)):
        (tmp / kind).mkdir(parents=True)
        shutil.copy(run / weights, tmp / kind / "model.keras")  # what the bundle runs
        for file in ("config.json", "run.json"):
            shutil.copy(run / file, tmp / kind / file)
    if args.val_slide:
        selection = {"val_slide": args.val_slide, **{
            f"{kind}_epoch": int(json.loads((run / "best.json").read_text())["metrics"]["epoch"])
            for kind, run in (("det", mdet), ("cls", mclass))}}
    sample_dir = REPO / "focas_keras" / "pretrained" / "sample"
    sample_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(args.data / SAMPLE, sample_dir / SAMPLE)
    shutil.copy(args.data / SAMPLE.replace(".jpg", ".csv"), sample_dir / SAMPLE.replace(
        ".jpg", ".csv"))
    card = pretrained.make_card(
        name=NAME, preset=args.preset, seed=args.seed, thresholds=chosen,
        command=_command(args, chosen["cv"], options),
        train_seconds=round(seconds, 1), date=date,
        overrides=options, selection=selection,
        extra_data=amibr_block(options), scanners=scanner_block(args.scanners_from),
        # the training fields' colour statistics the checks use (the table of other scanners'
        # distances: `python experiments/domain_stats.py --write-card` afterwards)
        domain=domain_stats.card_block(args.data.parent)["block"])
    card["files"] = {p.relative_to(tmp).as_posix(): sha256_file(p)
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    card["reference"] = pretrained.reference_detections(tmp, sample_dir / SAMPLE)
    (tmp / "card.json").write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    (tmp / "MODEL_CARD.md").write_text(pretrained.card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    print(pretrained.card_markdown(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
