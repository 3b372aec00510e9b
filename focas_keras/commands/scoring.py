"""``evaluate``, ``calibrate``, ``patch-study``: scoring detections and choosing thresholds."""

from __future__ import annotations

import click

from focas_keras.commands.base import _import_tensorflow
from focas_keras.commands.common import _image_files, _warn
from focas_keras.errors import InputError


#: What ``evaluate`` and ``calibrate`` say about the images that count (one rule:
#: :func:`focas_keras.evaluation.evaluate.truth_for_predictions`).
_PROCESSED_HELP = ("Only the images listed in counts.csv beside --pred (those detect "
                   "processed) count; the rest of --truth is ignored. Without a counts.csv "
                   "there, every --truth image counts.")


def _truth_options(truth_help: str):
    """``--truth`` and ``--format``: ground truth, as ``evaluate``, ``calibrate`` and
    ``patch-study`` read it."""
    return [click.option("--truth", required=True, type=click.Path(), help=truth_help),
            click.option("--format", "fmt", default=None,
                         type=click.Choice(["icpr2012", "gzmh", "coco", "csv", "synth"]),
                         help="Dataset format of --truth (omit for a centroid CSV).")]


def _radius_options(default_help: str = "Match radius in px (default 20)."):
    """``--radius-px`` and ``--radius-um``: the match radius, in every command that matches."""
    return [click.option("--radius-px", type=float, default=None, help=default_help),
            click.option("--radius-um", type=float, default=None,
                         help="Match radius in um (converted with the truth's pixel size; "
                              "5 um is 20.4 px at 0.2456 um/px).")]


def _decorate_with(options):
    """A decorator applying click ``options`` in the order listed (as if stacked)."""
    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def _scoring_options(truth_help: str, pred_help: str):
    """``--truth``, ``--format``, ``--pred``, ``--radius-px``, ``--radius-um``: what
    ``evaluate`` and ``calibrate`` both read (see :func:`_read_scoring_inputs`)."""
    options = [*_truth_options(truth_help),
               click.option("--pred", required=True, type=click.Path(),
                            help=f"{pred_help} {_PROCESSED_HELP}"),
               *_radius_options()]
    return _decorate_with(options)


def _read_scoring_inputs(truth, fmt, pred, radius_px, radius_um):
    """(ground truth, predictions table, match radius in px) from the options above; the
    truth holds only the images that count (:func:`~focas_keras.evaluation.evaluate.
    truth_for_predictions`, the same rule for ``evaluate`` and ``calibrate``)."""
    from focas_keras.evaluation import evaluate as ev

    gt = ev.truth_for_predictions(ev.read_truth(truth, fmt), pred)
    preds = ev.read_predictions(pred)
    return gt, preds, ev.radius_from(radius_px, radius_um, ev.truth_mpp(gt))


@click.command()
@_scoring_options("Ground truth: a centroid CSV (image,x,y) or a dataset (with --format).",
                  "detections.csv from `detect`.")
@click.option("--matching", type=click.Choice(["one_to_one", "nearest"]), default="one_to_one",
              show_default=True,
              help="one_to_one: the contest rule. nearest: the published FoCasNet code's rule "
                   "(nearest prediction per ground truth, strictly < radius, not one-to-one).")
@click.option("--score", type=click.Choice(["cls", "det"]), default="cls", show_default=True,
              help="Score that ranks predictions (stage 2 or stage 1).")
@click.option("--threshold", type=float, default=None,
              help="Keep predictions with score >= this instead of the `accepted` column.")
@click.option("--sweep", "sweep_png", type=click.Path(), default=None,
              help="Also evaluate every threshold of both scores; write the PR curve PNG here.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(truth, fmt, pred, radius_px, radius_um, matching, score, threshold, sweep_png,
             as_json):
    """Precision, recall and F1 of detections against ground-truth centroids.

    Only images listed in counts.csv beside --pred (every image detect processed) count, as
    in calibrate: a truth image detect never saw is not a missed mitosis.
    """
    import json

    from focas_keras.evaluation import evaluate as ev

    gt, preds, radius = _read_scoring_inputs(truth, fmt, pred, radius_px, radius_um)
    result = ev.evaluate(gt, preds, radius, score=score, matching=matching,
                         accepted_only=threshold is None, threshold=threshold)
    if sweep_png:
        from focas_keras.evaluation.plots import pr_curve_png

        curves, points, result["sweep"] = {}, {}, {}
        for name in ("cls", "det"):
            swept = ev.sweep(gt, preds, radius, score=name)
            label = {"cls": "cascade (stage-2 score)", "det": "stage 1 alone"}[name]
            curves[label] = (swept["recall"], swept["precision"])
            best = swept["best"]
            points[label] = (best["recall"], best["precision"])
            result["sweep"][name] = best
        pr_curve_png(curves, sweep_png, points)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    click.echo(ev.format_table(result))
    for name, best in result.get("sweep", {}).items():
        threshold_text = "none" if best["threshold"] is None else f"{best['threshold']:.4f}"
        click.echo(f"best F1 over {name}_score thresholds: {best['f1']:.3f} at "
                   f"{threshold_text} (P {best['precision']:.3f}, R {best['recall']:.3f})")
    if sweep_png:
        click.echo(f"precision-recall curve: {sweep_png}")


@click.command()
@_scoring_options("Ground truth of the validation fields: a centroid CSV or a dataset.",
                  "detections.csv of `detect --det-threshold 0.05 --cls-threshold 0` on the "
                  "validation fields.")
@click.option("--merge-px", type=float, default=30.0, show_default=True,
              help="The merge radius detect will use.")
@click.option("--write", "write_path", type=click.Path(dir_okay=False), default=None,
              help="Also save the chosen cascade pair (with the merge radius and what it was "
                   "chosen on) to this JSON file, for `detect --thresholds FILE`.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def calibrate(truth, fmt, pred, radius_px, radius_um, merge_px, write_path, as_json):
    """Choose detect's two thresholds on whole validation fields (best F1).

    Only images listed in counts.csv beside --pred (every image detect processed) count, as
    in evaluate; the rest of --truth is ignored, so --truth may be the whole training
    dataset.
    """
    import json

    from focas_keras.evaluation import calibrate as cal

    gt, preds, radius = _read_scoring_inputs(truth, fmt, pred, radius_px, radius_um)
    points = gt.points
    result = {"images": len(points),
              "stage1": cal.calibrate_stage1(points, preds, radius, merge_px),
              "cascade": cal.calibrate_cascade(points, preds, radius, merge_px,
                                               min_det_threshold=float(preds["det_score"].min())
                                               if len(preds) else 0.0)}
    if write_path:
        detect_record = _detect_record(pred)
        chosen_on = {"truth": str(truth), "format": fmt, "pred": str(pred),
                     "images": sorted(points), "mitoses": int(sum(map(len, points.values()))),
                     "radius_px": float(radius), "detect": detect_record}
        cal.write_thresholds(write_path, cal.thresholds_record(
            result["cascade"], merge_px, chosen_on, stage1=result["stage1"],
            tta=(detect_record or {}).get("tta")))
        result["written"] = str(write_path)
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    one, both = result["stage1"], result["cascade"]
    click.echo(f"{len(points)} validation images, radius {radius:g} px, merge {merge_px:g} px")
    click.echo(f"stage 1 alone: det >= {one['det_threshold']:.4f}: P {one['precision']:.3f} "
               f"R {one['recall']:.3f} F1 {one['f1']:.3f}")
    click.echo(f"cascade: det >= {both['det_threshold']:.4f}, Mclass >= "
               f"{both['cls_threshold']:.4f}: P {both['precision']:.3f} R {both['recall']:.3f} "
               f"F1 {both['f1']:.3f}")
    click.echo(f"use: focas-keras detect ... --det-threshold {both['det_threshold']:.4f} "
               f"--cls-threshold {both['cls_threshold']:.4f} --merge-px {merge_px:g}")
    if write_path:
        click.echo(f"thresholds written to {write_path}; or use: focas-keras detect ... "
                   f"--thresholds {write_path}")


def _detect_record(pred) -> dict | None:
    """What ``detect.json`` beside a predictions file says about the run that made them (the
    runs, TTA, the thresholds used), for a thresholds file; None without one."""
    import json
    from pathlib import Path

    path = Path(pred).parent / "detect.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    settings, resolved = data.get("settings") or {}, data.get("resolved") or {}
    return {"file": str(path), "runs": data.get("runs"),
            "bundled_model": data.get("bundled_model"), "tta": settings.get("tta"),
            "det_threshold": resolved.get("det_threshold"),
            "cls_threshold": resolved.get("cls_threshold"), "mpp": settings.get("mpp")}


@click.command("patch-study")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--det", "det_run", required=True, type=click.Path(), help="A train-det run.")
@click.option("--cls", "cls_run", required=True, type=click.Path(), help="A train-cls run.")
@_decorate_with(_truth_options(
    "Ground truth: a centroid CSV (image,x,y) or a dataset (with --format); only the INPUTS "
    "count."))
@click.option("--sizes", default="64,112,128,256", show_default=True,
              help="Comma-separated crop sides (px).")
@click.option("--mpp", type=float, default=0.2456, show_default=True,
              help="Pixel size of the input images (um/px), as for detect.")
@click.option("--model-mpp", type=float, default=None,
              help="Pixel size both models were trained at (default: what each run recorded, "
                   "else --mpp), as for detect.")
@click.option("--det-mpp", type=float, default=None,
              help="Pixel size Mdet runs at (default: --model-mpp, else its run's).")
@click.option("--cls-mpp", type=float, default=None,
              help="Pixel size of Mclass's crops (default: --model-mpp, else its run's).")
@_decorate_with(_radius_options())
def patch_study(inputs, det_run, cls_run, truth, fmt, sizes, mpp, model_mpp, det_mpp, cls_mpp,
                radius_px, radius_um):
    """Paper Table 2: stage 2 on the same stage-1 candidates with several crop sizes."""
    _import_tensorflow()
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.evaluation.patch_study import patch_size_study
    from focas_keras.inference.loading import load_cascade

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes must be comma-separated integers, got '{sizes}'") from None
    files = _image_files(inputs)
    gt, stems = ev.read_truth(truth, fmt), {f.stem for f in files}
    gt = ev.Truth({k: v for k, v in gt.points.items() if k in stems},
                  {k: v for k, v in gt.mpp.items() if k in stems})
    radius = ev.radius_from(radius_px, radius_um, ev.truth_mpp(gt))
    cascade = load_cascade(det_run, cls_run, warn=_warn, mpp=mpp, model_mpp=model_mpp,
                           det_mpp=det_mpp, cls_mpp=cls_mpp)
    rows = patch_size_study(cascade, files, gt.points, size_list, radius, warn=_warn)
    click.echo(f"{'crop':>6s} {'TP':>5s} {'FP':>5s} {'FN':>5s}  precision  recall     F1")
    for row in rows:
        click.echo(f"{row['patch']:>6d} {row['tp']:>5d} {row['fp']:>5d} {row['fn']:>5d}  "
                   f"{row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f}")


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [evaluate, calibrate, patch_study]
