"""``train-det``, ``train-cls``, ``mine``: training both stages."""

from __future__ import annotations

import click

from focas_keras.commands.base import _import_tensorflow, on_interrupt
from focas_keras.commands.common import _check_writable
from focas_keras.errors import InputError


def _parse_value(text: str):
    """A --set value: JSON when it parses (numbers, booleans, lists), else the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


_PRECISION_HELP = ("Compute precision (default: the preset's; the mixed ones keep float32 "
                   "weights).")


@click.command("train-det")
@click.option("--data", required=True, type=click.Path(), help="Shards from `prepare`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", default="paper", show_default=True,
              type=click.Choice(["paper", "tiny", "cpu", "cpu_full"]),
              help="Named configuration (cpu: sized for a 2-core CPU).")
@click.option("--head", type=click.Choice(["anchor", "free", "hybrid"]), default=None,
              help="Head branches (default: the preset's, hybrid).")
@click.option("--no-cbam", is_flag=True, help="Backbone without CBAM.")
@click.option("--norm", type=click.Choice(["bn", "gn"]), default=None,
              help="Backbone normalisation.")
@click.option("--no-ws", is_flag=True, help="Plain convs instead of weight standardisation.")
@click.option("--extra-data", multiple=True, type=click.Path(),
              help="Further det shards (e.g. `prepare --format amibr --det-small-images "
                   "mosaic`: other scanners' mitoses) drawn into training with --set "
                   "train.extra_share=S (repeatable).")
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
def train_det(data, out, preset, head, no_cbam, norm, no_ws, extra_data, epochs, batch_size,
              steps_per_epoch, lr, precision, seed, devices, overrides):
    """Train Mdet (stage 1) on prepared shards; resumes an interrupted run in OUT."""
    _check_writable(out)
    on_interrupt(f"the finished epochs are kept in {out} (epoch checkpoints); rerun the same "
                 "command to resume")
    _import_tensorflow()
    from focas_keras.models.mdet_config import preset as get_preset
    from focas_keras.training.det_trainer import train_det as run_training

    fields = {"head.head": head, "backbone.norm": norm, "train.epochs": epochs,
              "train.batch_size": batch_size, "train.steps_per_epoch": steps_per_epoch,
              "train.learning_rate": lr, "train.precision": precision, "train.seed": seed,
              "backbone.cbam": False if no_cbam else None, "backbone.ws": False if no_ws else None}
    config = get_preset(preset).override(**_with_overrides(fields, overrides))
    result = run_training(data, out, config, devices=_devices(devices), log=click.echo,
                          extra_data=extra_data)
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


@click.command("train-cls")
@click.option("--data", required=True, type=click.Path(), help="Shards from `prepare`/`mine`.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--preset", default="paper", show_default=True,
              type=click.Choice(["paper", "tiny", "cpu", "cpu_full", "lite0"]),
              help="Named configuration (cpu: sized for a 2-core CPU; lite0: EfficientNet-"
                   "Lite0 from the installed ImageNet weights).")
@click.option("--init-weights", type=click.Path(), default=None,
              help="Local Keras weights file (.weights.h5) of an Mclass or its backbone.")
@click.option("--extra-data", multiple=True, type=click.Path(),
              help="Further cls shards (e.g. `prepare --format amibr`: other scanners' "
                   "mitoses) drawn into every batch with --set train.extra_share=S "
                   "(repeatable).")
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
def train_cls(data, out, preset, init_weights, extra_data, depth, epochs, batch_size,
              steps_per_epoch, lr, positive_share, precision, seed, devices, overrides):
    """Train Mclass (stage 2) on prepared cls shards; resumes an interrupted run in OUT."""
    _check_writable(out)
    on_interrupt(f"the finished epochs are kept in {out} (epoch checkpoints); rerun the same "
                 "command to resume")
    _import_tensorflow()
    from focas_keras.models.mclass_config import preset as get_preset
    from focas_keras.training.cls_trainer import train_cls as run_training

    fields = {"model.depth": None if depth is None else int(depth), "train.epochs": epochs,
              "train.batch_size": batch_size, "train.steps_per_epoch": steps_per_epoch,
              "train.learning_rate": lr, "train.positive_share": positive_share,
              "train.precision": precision, "train.seed": seed}
    config = get_preset(preset).override(**_with_overrides(fields, overrides))
    result = run_training(data, out, config, init_weights=init_weights,
                          devices=_devices(devices), log=click.echo, extra_data=extra_data)
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


@click.command()
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
    _check_writable(shard_dir)
    _import_tensorflow()
    from focas_keras.training.mine import mine_hard_negatives
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.runs import MDET, check_run_kind

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


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [train_det, train_cls, mine]
