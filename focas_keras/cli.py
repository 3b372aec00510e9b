"""The ``focas-keras`` command line: a thin layer over the library.

User errors (:class:`~focas_keras.errors.InputError`, unreadable shards) print one line on
stderr and exit with code 2; nothing else is printed for them.
"""

from __future__ import annotations

import os
import sys

import click

from focas_keras import __version__
from focas_keras.errors import InputError

EXIT_INPUT = 2


class _Group(click.Group):
    """Turns user errors raised anywhere below into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except InputError as err:
            click.echo(f"focas-keras: error: {err}", err=True)
            ctx.exit(EXIT_INPUT)
        except KeyboardInterrupt:
            click.echo("focas-keras: interrupted (no partial output was kept)", err=True)
            ctx.exit(130)
        except Exception as err:  # corrupt TFRecords surface from inside TensorFlow
            if type(err).__name__ == "TrainingError":
                click.echo(f"focas-keras: error: {err}", err=True)
                ctx.exit(1)
            if type(err).__name__ == "DataLossError":
                first = str(getattr(err, "message", err)).splitlines()[0]
                click.echo(f"focas-keras: error: corrupt shard ({first})", err=True)
                ctx.exit(EXIT_INPUT)
            raise


def _import_tensorflow():
    """TensorFlow, imported quietly (see :func:`focas_keras.tf_import.import_tensorflow`);
    importing ``focas_keras`` has already done it, so this only documents the dependency."""
    from focas_keras.tf_import import import_tensorflow

    import_tensorflow()


def _slides(value: str) -> tuple:
    return tuple(s.strip() for s in value.split(",") if s.strip()) if value else ()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="focas-keras")
def main():
    """FoCasNet mitosis detection: data, training of both stages, detection, evaluation."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--images", default=8, show_default=True, help="Number of images.")
@click.option("--size", default=1024, show_default=True, help="Image side in pixels.")
@click.option("--seed", default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--per-slide", default=4, show_default=True,
              help="Images per synthetic slide (slide ids S00, S01, ...).")
@click.option("--mimics", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Hyperchromatic look-alikes (dark smooth nuclei that fool detectors), in "
                   "units of 12 per 2084 px field; 0 = none.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def synth(out, images, size, seed, per_slide, mimics, overwrite):
    """Write synthetic H&E fields with mitoses and look-alikes to OUT (ICPR 2012 layout)."""
    from data_tools.synth import write_dataset

    summary = write_dataset(out, images=images, size=size, seed=seed, per_slide=per_slide,
                            overwrite=overwrite, progress=True, mimics=mimics)
    mitoses = sum(item["mitoses"] for item in summary["per_image"])
    negatives = sum(item["hard_negatives"] for item in summary["per_image"])
    click.echo(f"wrote {images} images ({size}x{size}), {mitoses} mitoses, "
               f"{negatives} hard negatives to {out}")


@main.command()
@click.argument("src", type=click.Path())
@click.option("--format", "fmt", required=True,
              type=click.Choice(["icpr2012", "gzmh", "coco", "csv", "synth"]),
              help="Layout of SRC.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory for det/, cls/ and manifest.json.")
@click.option("--mpp", type=float, default=None,
              help="Pixel size of SRC in um/px (default: the format's own).")
@click.option("--target-mpp", type=float, default=None,
              help="Rescale images to this pixel size first.")
@click.option("--box-size", type=float, default=40.0, show_default=True,
              help="Box side (px) for centroid-only annotations.")
@click.option("--coco-bbox", type=click.Choice(["xywh", "xyxy"]), default="xywh",
              show_default=True,
              help="COCO bbox layout (MIDOG 2021's JSON stores x1,y1,x2,y2: use xyxy).")
@click.option("--tile-size", type=int, default=224, show_default=True, help="Det tile side.")
@click.option("--det-per-mitosis", type=int, default=4, show_default=True,
              help="Det tiles per mitosis (random offsets).")
@click.option("--det-empty-share", type=float, default=0.3, show_default=True,
              help="Share of det tiles without mitoses.")
@click.option("--det-grid", is_flag=True,
              help="Also cut a grid of det tiles covering every training field whole (the "
                   "whole-field recipe: Mdet sees all tissue each epoch).")
@click.option("--val-fields", is_flag=True,
              help="Also store the validation fields whole, so train-det selects its "
                   "checkpoint and thresholds on whole fields.")
@click.option("--patch-size", type=int, default=64, show_default=True, help="Cls patch side.")
@click.option("--cls-per-mitosis", type=int, default=8, show_default=True,
              help="Positive patches per mitosis.")
@click.option("--cls-per-hard-negative", type=int, default=4, show_default=True,
              help="Patches per hard-negative annotation.")
@click.option("--cls-background", type=int, default=40, show_default=True,
              help="Background patches per image.")
@click.option("--val-slides", default="", help="Comma-separated slides for validation.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of slides drawn for validation when --val-slides is not given.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and sampling seed.")
@click.option("--shard-mb", type=float, default=64.0, show_default=True,
              help="Size bound of one shard (MiB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def prepare(src, fmt, out, mpp, target_mpp, box_size, coco_bbox, tile_size,
            det_per_mitosis, det_empty_share, det_grid, val_fields, patch_size, cls_per_mitosis, cls_per_hard_negative,
            cls_background, val_slides, val_fraction, seed, shard_mb, overwrite):
    """Turn a dataset at SRC into TFRecord shards (det tiles, cls patches) + manifest.json."""
    _import_tensorflow()
    from data_tools.prepare import PrepareConfig
    from data_tools.prepare import prepare as run_prepare
    from data_tools.readers import read_dataset

    config = PrepareConfig(
        tile_size=tile_size, det_tiles_per_mitosis=det_per_mitosis,
        det_empty_share=det_empty_share, det_grid=det_grid, val_fields=val_fields,
        patch_size=patch_size,
        cls_per_mitosis=cls_per_mitosis, cls_per_hard_negative=cls_per_hard_negative,
        cls_background_per_image=cls_background, val_slides=_slides(val_slides),
        val_fraction=val_fraction, seed=seed, target_mpp=target_mpp, shard_mb=shard_mb)
    config.validate()
    kwargs = {"box_size": box_size} if fmt in ("icpr2012", "csv") else {}
    if fmt == "coco":
        kwargs["bbox_format"] = coco_bbox
    aset = read_dataset(fmt, src, mpp=mpp, **kwargs)
    manifest = run_prepare(aset, out, config, overwrite=overwrite, progress=True)
    click.echo(summarize(manifest, out))


def summarize(manifest: dict, out) -> str:
    """A short text table of a manifest's counts."""
    lines = [f"shards in {out}:"]
    for split, c in manifest["splits"].items():
        det, cls = c["det"], c["cls"]
        lines.append(
            f"  {split:5s} {len(c['images']):3d} images ({', '.join(c['slides']) or '-'}): "
            f"det {det['records']} tiles / {det['boxes']} boxes ({det['empty_tiles']} empty); "
            f"cls {cls['records']} patches ({cls['positive']} mitosis, "
            f"{cls['background']} background, {cls['hard_negative']} hard negative)")
    return "\n".join(lines)


@main.command()
@click.argument("shards", type=click.Path())
@click.option("--read", "read_all", is_flag=True,
              help="Also decode every record and compare the counts with the manifest.")
def inspect(shards, read_all):
    """Verify the shard checksums of SHARDS and print their counts."""
    _import_tensorflow()
    from focas_keras.data import pipeline, records

    manifest = pipeline.load_manifest(shards)
    pipeline.verify_shards(shards, manifest["shards"])
    click.echo(summarize(manifest, shards))
    if read_all:
        for split, counts in manifest["splits"].items():
            for kind in records.KINDS:
                expected = counts[kind]["records"]
                found = len(pipeline.read_records(shards, kind, split, verify=False)) \
                    if expected else 0
                if found != expected:
                    raise InputError(f"{kind}/{split}: manifest says {expected} records, "
                                     f"shards hold {found}", shards)
        click.echo("all records decode; counts match the manifest")
    click.echo(f"{len(manifest['shards'])} shards verified (sha256)")


def _parse_value(text: str):
    """A --set value: JSON when it parses (numbers, booleans, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_PRECISION_HELP = ("Compute precision (default: the preset's; the mixed ones keep float32 "
                   "weights).")


@main.command("train-det")
@click.option("--data", required=True, type=click.Path(), help="Shards from `prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", default="paper", show_default=True,
              type=click.Choice(["paper", "tiny", "cpu"]),
              help="Named configuration (cpu: sized for a 2-core CPU).")
@click.option("--head", type=click.Choice(["anchor", "free", "hybrid"]), default=None,
              help="Head branches (default: the preset's, hybrid).")
@click.option("--no-cbam", is_flag=True, help="Backbone without CBAM.")
@click.option("--norm", type=click.Choice(["bn", "gn"]), default=None,
              help="Backbone normalisation.")
@click.option("--no-ws", is_flag=True, help="Plain convs instead of weight standardisation.")
@click.option("--epochs", type=int, default=None,
              help="Training epochs (default: the preset's).")
@click.option("--batch-size", type=int, default=None, help="Global batch size.")
@click.option("--steps-per-epoch", type=int, default=None,
              help="Steps per epoch (default: training tiles / batch size).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16", "mixed_float16"]),
              default=None, help=_PRECISION_HELP)
@click.option("--seed", type=int, default=None,
              help="Seed of initialisation, sampling and augmentation (default: the "
                   "preset's).")
@click.option("--devices", default="",
              help="Comma-separated devices for MirroredStrategy (e.g. /gpu:0,/gpu:1); "
                   "'cpu:N' splits the CPU into N logical devices.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override any config field, e.g. --set fpn.max_level=5.")
def train_det(data, out, preset, head, no_cbam, norm, no_ws, epochs, batch_size,
              steps_per_epoch, lr, precision, seed, devices, overrides):
    """Train Mdet (stage 1) on prepared shards; resumes an interrupted run in OUT."""
    _import_tensorflow()
    from focas_keras.models.mdet_config import preset as get_preset
    from focas_keras.training.det_trainer import train_det as run_training

    fields = {"head.head": head, "backbone.norm": norm, "train.epochs": epochs,
              "train.batch_size": batch_size, "train.steps_per_epoch": steps_per_epoch,
              "train.learning_rate": lr, "train.precision": precision, "train.seed": seed,
              "backbone.cbam": False if no_cbam else None, "backbone.ws": False if no_ws else None}
    config = get_preset(preset).override(**_with_overrides(fields, overrides))
    result = run_training(data, out, config, devices=_devices(devices), log=click.echo)
    _report(result, out)


def _with_overrides(fields: dict, overrides) -> dict:
    """Adds --set SECTION.FIELD=VALUE items to the flag fields."""
    fields = dict(fields)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"--set needs SECTION.FIELD=VALUE, got '{item}'")
        fields[key.strip()] = _parse_value(value.strip())
    return fields


def _devices(devices: str):
    """The --devices list; 'cpu:N' splits the CPU into N logical devices first."""
    from focas_keras.training.strategy import split_cpu

    device_list = [d for d in devices.split(",") if d]
    if len(device_list) == 1 and device_list[0].startswith("cpu:"):
        device_list = split_cpu(int(device_list[0][4:]))
    return device_list or None


def _report(result: dict, out) -> None:
    best = (result.get("best") or {}).get("metrics", {})
    if best.get("val_f1") is not None:
        auc = f" AUC {best['val_auc']:.3f}" if "val_auc" in best else ""
        click.echo(f"best epoch {best['epoch']}:{auc} val P {best['val_precision']:.3f} "
                   f"R {best['val_recall']:.3f} F1 {best['val_f1']:.3f} at threshold "
                   f"{best['val_best_threshold']:.3f}; model: {out}/model.keras")
    else:
        click.echo(f"model: {out}/model.keras")


@main.command("train-cls")
@click.option("--data", required=True, type=click.Path(), help="Shards from `prepare`/`mine`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", default="paper", show_default=True,
              type=click.Choice(["paper", "tiny", "cpu"]),
              help="Named configuration (cpu: sized for a 2-core CPU).")
@click.option("--init-weights", type=click.Path(), default=None,
              help="Local Keras weights file (.weights.h5) of an Mclass or its backbone.")
@click.option("--depth", type=click.Choice(["18", "34", "50", "101"]), default=None,
              help="ResNet depth (default: the preset's, 34).")
@click.option("--epochs", type=int, default=None,
              help="Training epochs (default: the preset's).")
@click.option("--batch-size", type=int, default=None, help="Global batch size.")
@click.option("--steps-per-epoch", type=int, default=None,
              help="Steps per epoch (default: training patches / batch size).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--positive-share", type=float, default=None,
              help="Share of mitosis patches in each batch (weighted sampling).")
@click.option("--precision", type=click.Choice(["float32", "mixed_bfloat16", "mixed_float16"]),
              default=None, help=_PRECISION_HELP)
@click.option("--seed", type=int, default=None,
              help="Seed of initialisation, sampling and augmentation (default: the "
                   "preset's).")
@click.option("--devices", default="", help="As for train-det.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.FIELD=VALUE",
              help="Override any config field, e.g. --set model.width=0.5.")
def train_cls(data, out, preset, init_weights, depth, epochs, batch_size, steps_per_epoch, lr,
              positive_share, precision, seed, devices, overrides):
    """Train Mclass (stage 2) on prepared cls shards; resumes an interrupted run in OUT."""
    _import_tensorflow()
    from focas_keras.models.mclass_config import preset as get_preset
    from focas_keras.training.cls_trainer import train_cls as run_training

    fields = {"model.depth": None if depth is None else int(depth), "train.epochs": epochs,
              "train.batch_size": batch_size, "train.steps_per_epoch": steps_per_epoch,
              "train.learning_rate": lr, "train.positive_share": positive_share,
              "train.precision": precision, "train.seed": seed}
    config = get_preset(preset).override(**_with_overrides(fields, overrides))
    result = run_training(data, out, config, init_weights=init_weights,
                          devices=_devices(devices), log=click.echo)
    _report(result, out)


def _alias(ctx, name: str, old: str):
    """The value of option ``name``, or of its hidden old name ``old`` (both parameter
    names); InputError when both are given and differ."""
    value, old_value = ctx.params[name], ctx.params[old]
    if old_value is None:
        return value
    flag, old_flag = (f"--{n.replace('_', '-')}" for n in (name, old.removesuffix("_alias")))
    if value is not None and value != old_value:
        raise InputError(f"{flag} and {old_flag} (its old name) disagree: {value:g} and "
                         f"{old_value:g}")
    return old_value


@main.command()
@click.option("--det", "det_run", required=True, type=click.Path(), help="A train-det run.")
@click.option("--data", "source", required=True, type=click.Path(),
              help="The dataset the shards were prepared from.")
@click.option("--format", "fmt", required=True,
              type=click.Choice(["icpr2012", "gzmh", "coco", "csv", "synth"]),
              help="Layout of the --data dataset (as given to prepare).")
@click.option("--out", "shard_dir", required=True, type=click.Path(),
              help="The shard directory to add hard negatives to.")
@click.option("--det-threshold", type=float, default=None,
              help="Stage-1 score threshold (default: the run's inference threshold).")
@click.option("--score-threshold", "score_threshold_alias", type=float, default=None,
              hidden=True)
@click.option("--keep-tp", is_flag=True, help="Also add true-positive detections as positives.")
@click.option("--radius-px", type=float, default=None,
              help="A detection farther than this (px of the shards' images) from every "
                   "mitosis is a false positive (default 20).")
@click.option("--radius-um", type=float, default=None,
              help="The same radius in um (converted with the shards' pixel size).")
@click.option("--radius", "radius_alias", type=float, default=None, hidden=True)
@click.option("--include-val", is_flag=True,
              help="Also add every candidate on the VALIDATION images to the val split (with "
                   "its stage-1 score), so train-cls selects its checkpoint and thresholds by "
                   "the cascade's F1 on whole validation fields. Never used for training.")
@click.option("--max-candidates-per-mm2", type=float, default=2000.0, show_default=True,
              help="Stage-1 candidates kept per mm2 of image (as detect).")
@click.pass_context
def mine(ctx, det_run, source, fmt, shard_dir, det_threshold, score_threshold_alias, keep_tp,
         radius_px, radius_um, radius_alias, include_val, max_candidates_per_mm2):
    """Add Mdet's candidates on the TRAINING images as cls patches: every false positive as a
    hard negative (and with --keep-tp the rest as positives)."""
    _import_tensorflow()
    from data_tools.mine import mine_hard_negatives
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.run_kind import MDET, check_run_kind

    check_run_kind(det_run, MDET, "--det")
    det_threshold = _alias(ctx, "det_threshold", "score_threshold_alias")
    radius_px = _alias(ctx, "radius_px", "radius_alias")
    mpp = None
    if radius_um is not None:
        from focas_keras.data.pipeline import load_manifest

        mpp = load_manifest(shard_dir).get("parameters", {}).get("target_mpp")
        if mpp is None:
            mpp = ev.truth_mpp(ev.read_truth(source, fmt))
    radius = ev.radius_from(radius_px, radius_um, mpp)
    summary = mine_hard_negatives(det_run, source, fmt, shard_dir,
                                  score_threshold=det_threshold, keep_true_positives=keep_tp,
                                  radius=radius, progress=True, include_val=include_val,
                                  per_mm2=max_candidates_per_mm2)
    click.echo(f"mined {summary['false_positives']} hard negatives"
               + (f" and {summary['true_positives']} true positives" if keep_tp else "")
               + f" from {summary['images']} training images into {shard_dir}")
    if include_val:
        val = summary["val"]
        click.echo(f"and {val['records']} candidates ({val['true_positives']} near a mitosis) "
                   f"from {val['images']} validation images, for selection only")


def _cascade_options(command):
    """The cascade settings shared by ``detect`` and ``export`` (all but ``--tile``)."""
    options = [
        click.option("--overlap", type=int, default=64, show_default=True,
                     help="Tile overlap (px)."),
        click.option("--tile-batch", type=int, default=8, show_default=True,
                     help="Tiles per batch."),
        click.option("--det-threshold", type=float, default=None,
                     help="Stage-1 candidate threshold (default: the pair the Mclass run chose "
                          "on whole validation fields, when it was mined with --include-val; "
                          "else the highest score that keeps the Mdet run's best validation "
                          "recall, at least its inference threshold 0.05; or use "
                          "`focas-keras calibrate`)."),
        click.option("--cls-threshold", type=float, default=None,
                     help="Stage-2 acceptance threshold (default: the Mclass run's whole-field "
                          "pair, as above; else its best-F1 value on patches, at least 0.5)."),
        click.option("--patch", type=int, default=None,
                     help="Crop side around each candidate (default: the Mclass run's, 112)."),
        click.option("--merge-px", type=float, default=30.0, show_default=True,
                     help="Accepted detections closer than this (px) to a better one are "
                          "merged."),
        click.option("--thresholds", "thresholds_file", type=click.Path(dir_okay=False),
                     default=None,
                     help="A thresholds file from `calibrate --write` (or the demo): its "
                          "stage-1 and stage-2 thresholds and merge radius (and TTA, where it "
                          "records it) replace the defaults, and override the bundled model's; "
                          "--det-threshold, --cls-threshold and --merge-px given here still "
                          "win."),
        click.option("--which", type=click.Choice(["best", "model"]), default="best",
                     show_default=True, help="Use each run's best or final model."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _given(ctx, name: str) -> bool:
    """Whether option ``name`` was set on the command line (or by its environment variable),
    not left at its default."""
    from click.core import ParameterSource

    return ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE,
                                              ParameterSource.ENVIRONMENT)


def _apply_thresholds_file(ctx, path, values: dict) -> dict | None:
    """Fills ``values`` (the cascade settings) from a ``--thresholds`` file.

    The file's ``det_threshold``, ``cls_threshold``, ``merge_px`` and (where ``values`` has
    one) ``tta`` are used where the command line gave none. ``merge_px`` is left None where
    neither gave one (the bundled model's card, else 30 px, decides).

    Returns:
        What ``detect.json`` records of the file (None without one).
    """
    from focas_keras.evaluation.calibrate import read_thresholds
    from focas_keras.io import sha256_file

    if not _given(ctx, "merge_px"):
        values["merge_px"] = None
    if path is None:
        return None
    data = read_thresholds(path)
    used, kept = {}, []
    for name in ("det_threshold", "cls_threshold", "merge_px", "tta"):
        if name not in values or data.get(name) is None:
            continue
        if values[name] is not None:
            kept.append(name)
        else:
            values[name] = used[name] = data[name]
    return {"path": str(path), "sha256": sha256_file(path), "used": used,
            "command_line_won": kept, "chosen_on": data.get("chosen_on")}


def _check_thresholds_runs(record, det_run, cls_run) -> None:
    """Warns (stderr) when a thresholds file was chosen on candidates of other runs."""
    from pathlib import Path

    chosen = ((record or {}).get("chosen_on") or {}).get("detect") or {}
    runs = chosen.get("runs") if isinstance(chosen, dict) else None
    if not isinstance(runs, dict):
        return
    now = {"det": str(Path(det_run).resolve()), "cls": str(Path(cls_run).resolve())}
    if any(runs.get(k) not in (None, now[k]) for k in now):
        click.echo(f"focas-keras: warning: {record['path']} was chosen on the candidates of "
                   f"--det {runs.get('det')} --cls {runs.get('cls')}, not of these runs; "
                   "its thresholds may not fit them", err=True)


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--det", "det_run", type=click.Path(), default=None,
              help="A train-det run (default: the bundled pretrained cascade, with --cls).")
@click.option("--cls", "cls_run", type=click.Path(), default=None,
              help="A train-cls run (default: the bundled pretrained cascade, with --det).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory (detections.csv, detections.geojson, counts.csv, "
                   "overlays/).")
@click.option("--mpp", type=float, default=0.2456, show_default=True,
              help="Pixel size of the input images (um/px).")
@click.option("--model-mpp", type=float, default=None,
              help="Pixel size both models were trained at (default: what each run recorded, "
                   "else --mpp); images are rescaled to it and results mapped back.")
@click.option("--det-mpp", type=float, default=None,
              help="Pixel size Mdet runs at (default: --model-mpp, else its run's).")
@click.option("--cls-mpp", type=float, default=None,
              help="Pixel size of Mclass's crops (default: --model-mpp, else its run's).")
@click.option("--tile", type=int, default=0, show_default=True,
              help="Run Mdet in tiles of this side (px, multiple of 32, in Mdet's pixels); "
                   "0 = whole image.")
@_cascade_options
@click.option("--max-candidates-per-mm2", type=float, default=2000.0, show_default=True,
              help="Stage-1 candidate cap per mm^2 of image: each Mdet call (whole image or "
                   "tile) and each image keeps at most this many per mm^2 of its area, best "
                   "first (about 524 on a 2084 px field at 0.2456 um/px). detect.json lists "
                   "the images where the cap bound.")
@click.option("--tta/--no-tta", default=None,
              help="Score each crop with Mclass under its 8 rotations/flips and average the "
                   "probabilities (8x stage-2 cost).")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay images.")
@click.option("--no-rejected", is_flag=True,
              help="Leave the rejected candidates off the overlays (only accepted ones).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@click.pass_context
def detect(ctx, inputs, det_run, cls_run, out, mpp, model_mpp, det_mpp, cls_mpp, tile, overlap,
           tile_batch, det_threshold, cls_threshold, patch, merge_px, thresholds_file, which,
           max_candidates_per_mm2, tta, no_overlays, no_rejected, overwrite):
    """Find mitoses in INPUTS (images or directories of .bmp/.png/.jpg/.tif HPFs)."""
    _import_tensorflow()
    from pathlib import Path

    from focas_keras.inference.cascade import Cascade, CascadeSettings
    from focas_keras.inference.outputs import detect_to_dir

    files = _image_files(inputs)
    values = dict(mpp=mpp, model_mpp=model_mpp, det_mpp=det_mpp, cls_mpp=cls_mpp, tile=tile,
                  overlap=overlap, tile_batch=tile_batch, det_threshold=det_threshold,
                  cls_threshold=cls_threshold, patch=patch, merge_px=merge_px,
                  max_candidates_per_mm2=max_candidates_per_mm2, tta=tta)
    thresholds = _apply_thresholds_file(ctx, thresholds_file, values)
    with _runs_or_bundled(det_run, cls_run) as (det_run, cls_run, card):
        _check_thresholds_runs(thresholds, det_run, cls_run)
        if card is None:
            values["tta"] = bool(values["tta"])
            values["merge_px"] = merge_px if values["merge_px"] is None else values["merge_px"]
            cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings(**values),
                                        which=which)
        else:
            from focas_keras import pretrained

            cascade = Cascade.from_runs(det_run, cls_run,
                                        pretrained.settings_from_card(card, **values),
                                        which="model")
        extra = {"runs": {"det": str(Path(det_run).resolve()),
                          "cls": str(Path(cls_run).resolve())},
                 "thresholds_file": thresholds}
        if card is not None:
            extra["bundled_model"] = card["name"]
        counts = detect_to_dir(cascade, files, out, overlays=not no_overlays, progress=True,
                               overwrite=overwrite, extra=extra, rejected=not no_rejected,
                               warn=_warn)
    click.echo(f"{int(counts['accepted'].sum())} mitoses accepted of "
               f"{int(counts['candidates'].sum())} candidates in {len(files)} images "
               f"(stage 1 >= {cascade.det_threshold:.3f}, stage 2 >= "
               f"{cascade.cls_threshold:.3f}{', TTA' if cascade.settings.tta else ''}"
               + (f"; thresholds from {thresholds_file}" if thresholds_file else "")
               + f"); results in {out}")
    overlay_text = "; overlays/: green = accepted" + ("" if no_rejected else
                                                      ", red = rejected candidate")
    click.echo(f"  {out}/counts.csv: mitoses per image and per mm2; detections.csv: every "
               f"candidate (accepted = counted); detections.geojson: accepted, for QuPath"
               + ("" if no_overlays else overlay_text))


def _image_files(inputs) -> list:
    """The image files INPUTS name (:func:`~focas_keras.inference.cascade.list_inputs`),
    each checked to be an image by its first bytes before any model loads."""
    from data_tools.annotations import check_image_file
    from focas_keras.inference.cascade import list_inputs

    files = list_inputs(inputs)
    for path in files:
        check_image_file(path)
    return files


def _warn(message: str) -> None:
    """A warning line on stderr (the run goes on)."""
    click.echo(f"focas-keras: warning: {message}", err=True)


def _runs_or_bundled(det_run, cls_run):
    """``with`` (det_run, cls_run, card): the given runs (card None), or the bundled
    pretrained cascade when neither is given (announced on stdout)."""
    import contextlib

    from focas_keras import pretrained

    if det_run is None and cls_run is None:
        card = pretrained.load_card()
        click.echo(f"using the bundled model {card['name']} (ICPR 2012 scanner A, "
                   f"cross-validated F1 {card['cv_estimate']['pooled']['f1']:.2f}; "
                   f"`focas-keras models` shows its card)")
        return pretrained.runs()
    if det_run is None or cls_run is None:
        raise InputError("give both --det and --cls, or neither (the bundled model)")
    return contextlib.nullcontext((det_run, cls_run, None))


@main.command()
def models():
    """List the bundled pretrained models with their cards."""
    from focas_keras import pretrained

    for name in pretrained.names():
        card = pretrained.load_card(name)
        p, t = card["cv_estimate"]["pooled"], card["thresholds"]
        default = " (default)" if name == pretrained.DEFAULT else ""
        click.echo(f"{name}{default}: {card['data']['name']}; preset {card['preset']}; "
                   f"cross-validated F1 {p['f1']:.3f} (P {p['precision']:.3f}, "
                   f"R {p['recall']:.3f}); thresholds stage 1 >= {t['det_threshold']:.4f}, "
                   f"stage 2 >= {t['cls_threshold']:.4f}, TTA {'on' if t['tta'] else 'off'}")
        click.echo(f"  card: {pretrained.model_dir(name) / 'MODEL_CARD.md'}")
        click.echo(f"  sample field: {pretrained.sample_field()}")


@main.command("export")
@click.option("--det", "det_run", type=click.Path(), default=None,
              help="A train-det run (default: the bundled pretrained cascade, with --cls).")
@click.option("--cls", "cls_run", type=click.Path(), default=None,
              help="A train-cls run (default: the bundled pretrained cascade, with --det).")
@click.option("--out", "base", required=True, type=click.Path(file_okay=False),
              help="BASE directory: BASE/<name>/<version>/ SavedModels and BASE/models.config.")
@click.option("--name", default="focasnet", show_default=True, help="Name of the cascade model.")
@click.option("--det-name", default="mdet", show_default=True, help="Name of Mdet alone.")
@click.option("--cls-name", default="mclass", show_default=True, help="Name of Mclass alone.")
@click.option("--version", type=int, default=None,
              help="Version to write (default: one above the highest under BASE); an existing "
                   "version is never overwritten.")
@click.option("--tile", type=int, default=512, show_default=True,
              help="Stage-1 tile side (px, multiple of 32, in Mdet's pixels); the graph always "
                   "runs tiled.")
@click.option("--mpp", type=float, default=0.2456, show_default=True,
              help="Pixel size of the images the server will receive (um/px): Mclass's. An "
                   "Mdet run trained at a coarser one (prepare --target-mpp) gets them shrunk.")
@_cascade_options
@click.option("--max-detections", type=int, default=300, show_default=True,
              help="Candidates returned per image (the best by stage-1 score).")
@click.option("--max-candidates-per-mm2", type=float, default=2000.0, show_default=True,
              help="Stage-1 candidate cap per mm^2, as for detect: each tile and each image "
                   "keeps at most this many per mm^2 of its area (an image also at most "
                   "--max-detections).")
@click.option("--max-pixels", type=int, default=25_000_000, show_default=True,
              help="Largest image (height x width) a request may send.")
@click.option("--sample", type=click.Path(), default=None,
              help="Image for the self-check against the Python cascade (default: a synthetic "
                   "field of about 1.5 tiles).")
@click.option("--config-base", default="/models", show_default=True,
              help="Path of BASE inside the server, written into models.config.")
@click.option("--check", is_flag=True,
              help="Print the signatures (like saved_model_cli show); without --det/--cls, only "
                   "print those of the newest (or --version) models under --out.")
@click.pass_context
def export_cmd(ctx, det_run, cls_run, base, name, det_name, cls_name, version, tile, mpp, overlap,
               tile_batch, det_threshold, cls_threshold, patch, merge_px, thresholds_file,
               which, max_detections, max_candidates_per_mm2, max_pixels, sample, config_base,
               check):
    """Export the cascade, Mdet and Mclass as SavedModels for TensorFlow Serving."""
    _import_tensorflow()
    from focas_keras.export import savedmodel
    from focas_keras.export.compare import ExportError

    if det_run is None and cls_run is None and check:
        click.echo(savedmodel.describe_base(base, version=version))
        return
    from data_tools.annotations import ColourCheck, load_image
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    values = dict(mpp=mpp, tile=tile, overlap=overlap, tile_batch=tile_batch,
                  det_threshold=det_threshold, cls_threshold=cls_threshold, patch=patch,
                  merge_px=merge_px, max_candidates_per_mm2=max_candidates_per_mm2)
    thresholds = _apply_thresholds_file(ctx, thresholds_file, values)
    with _runs_or_bundled(det_run, cls_run) as (det_run, cls_run, card):
        _check_thresholds_runs(thresholds, det_run, cls_run)
        if card is None:
            values["merge_px"] = merge_px if values["merge_px"] is None else values["merge_px"]
            cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings(**values),
                                        which=which)
        else:
            from focas_keras import pretrained

            if card["thresholds"].get("tta"):
                click.echo("note: the served graph scores each crop once (no TTA), so its "
                           "accepted set may differ slightly from `detect` with this model")
            cascade = Cascade.from_runs(det_run, cls_run, pretrained.settings_from_card(
                card, **values, tta=False), which="model")
        image = load_image(sample, warn=ColourCheck(_warn)) if sample else None
        try:
            result = savedmodel.export(cascade, base, name=name, det_name=det_name,
                                       cls_name=cls_name, version=version,
                                       max_detections=max_detections, max_pixels=max_pixels,
                                       sample=image, config_base=config_base, log=click.echo)
        except ExportError as err:
            click.echo(f"focas-keras: error: export failed its check, nothing was written: "
                       f"{err}", err=True)
            ctx.exit(1)
    click.echo(savedmodel.format_summary(result))
    if check:
        click.echo(savedmodel.describe_base(base, names=list(result["paths"]),
                                            version=result["version"]))


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--server", default=None, help="TF Serving gRPC address HOST:PORT (port 8500).")
@click.option("--rest", default=None, help="TF Serving REST URL http://HOST:PORT (port 8501).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory (as for detect, plus predict.json).")
@click.option("--model", default="focasnet", show_default=True, help="Model name on the server.")
@click.option("--version", type=int, default=None,
              help="Model version (default: the server's choice, normally the newest).")
@click.option("--mpp", type=float, default=0.2456, show_default=True,
              help="Pixel size of the images (um/px), for the densities in counts.csv.")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Seconds per request.")
@click.option("--no-overlays", is_flag=True, help="Skip the overlay images.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def predict(inputs, server, rest, out, model, version, mpp, timeout, no_overlays, overwrite):
    """Send INPUTS (images or directories) to a TF Serving export; write what detect writes."""
    _import_tensorflow()
    from focas_keras.export.client import make_client, predict_to_dir

    client = make_client(server=server, rest=rest, model=model, version=version,
                         timeout=timeout)
    counts = predict_to_dir(client, inputs, out, mpp=mpp, overlays=not no_overlays,
                            progress=True, overwrite=overwrite)
    click.echo(f"{int(counts['accepted'].sum())} mitoses accepted of "
               f"{int(counts['candidates'].sum())} candidates in {len(counts)} images "
               f"(server {server or rest}, model {model}); results in {out}")


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


@main.command()
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


@main.command()
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


@main.command("patch-study")
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
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise InputError(f"--sizes must be comma-separated integers, got '{sizes}'") from None
    files = _image_files(inputs)
    gt, stems = ev.read_truth(truth, fmt), {f.stem for f in files}
    gt = ev.Truth({k: v for k, v in gt.points.items() if k in stems},
                  {k: v for k, v in gt.mpp.items() if k in stems})
    radius = ev.radius_from(radius_px, radius_um, ev.truth_mpp(gt))
    cascade = Cascade.from_runs(det_run, cls_run, CascadeSettings(
        mpp=mpp, model_mpp=model_mpp, det_mpp=det_mpp, cls_mpp=cls_mpp))
    rows = patch_size_study(cascade, files, gt.points, size_list, radius, warn=_warn)
    click.echo(f"{'crop':>6s} {'TP':>5s} {'FP':>5s} {'FN':>5s}  precision  recall     F1")
    for row in rows:
        click.echo(f"{row['patch']:>6d} {row['tp']:>5d} {row['fp']:>5d} {row['fn']:>5d}  "
                   f"{row['precision']:9.3f} {row['recall']:7.3f} {row['f1']:6.3f}")


@main.command()
@click.option("--out", default="focas_demo", show_default=True, type=click.Path(file_okay=False),
              help="Output directory of the demo; built aside and renamed into place when "
                   "complete, so an interrupted demo leaves nothing new there.")
@click.option("--synthetic", is_flag=True,
              help="Instead of the bundled model on the real sample field: the whole training "
                   "chain on synthetic data (synth, prepare, train Mdet, mine, train Mclass, "
                   "calibrate, detect and evaluate on held-out fields; ~5 min).")
@click.option("--images", default=12, show_default=True,
              help="--synthetic: fields for training and validation.")
@click.option("--test-images", default=4, show_default=True,
              help="--synthetic: held-out fields.")
@click.option("--size", default=1024, show_default=True, help="--synthetic: field side (px).")
@click.option("--seed", default=0, show_default=True,
              help="--synthetic: seed of data, split and training.")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing non-empty --out (only once the new demo is complete).")
def demo(out, synthetic, images, test_images, size, seed, overwrite):
    """Find mitoses on a real H&E field with the bundled pretrained model (default), or train
    both stages from scratch on synthetic data (--synthetic).

    The default runs `detect` on the bundled ICPR 2012 field and scores it against the field's
    annotated mitoses. --synthetic ends with where its two trained runs are and the
    `focas-keras detect ... --thresholds` line that gives its held-out result again. A
    non-empty --out is refused unless --overwrite.
    """
    _import_tensorflow()
    if not synthetic:
        from focas_keras.sample_demo import run_sample_demo

        run_sample_demo(out, overwrite=overwrite, echo=click.echo)
        return
    from focas_keras.demo import run_demo

    run_demo(out, images=images, size=size, test_images=test_images, seed=seed,
             overwrite=overwrite, echo=click.echo)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
