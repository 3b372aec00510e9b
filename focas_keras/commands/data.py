"""``synth``, ``prepare``, ``inspect``: datasets and shards."""

from __future__ import annotations

import click

from focas_keras.commands.base import _import_tensorflow, _slides, on_interrupt
from focas_keras.commands.common import _check_writable
from focas_keras.errors import InputError


@click.command()
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
    on_interrupt(f"nothing was written ({out} is put in place only when complete)")
    from focas_keras.datasets.synth import write_dataset

    summary = write_dataset(out, images=images, size=size, seed=seed, per_slide=per_slide,
                            overwrite=overwrite, progress=True, mimics=mimics)
    mitoses = sum(item["mitoses"] for item in summary["per_image"])
    negatives = sum(item["hard_negatives"] for item in summary["per_image"])
    click.echo(f"wrote {images} images ({size}x{size}), {mitoses} mitoses, "
               f"{negatives} hard negatives to {out}")


@click.command()
@click.argument("src", type=click.Path())
@click.option("--format", "fmt", required=True,
              type=click.Choice(["icpr2012", "gzmh", "coco", "csv", "synth", "amibr"]),
              help="Layout of SRC.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory for det/, cls/ and manifest.json.")
@click.option("--mpp", type=float, default=None,
              help="Pixel size of SRC in um/px (default: the format's own).")
@click.option("--target-mpp", type=float, default=None,
              help="Rescale images to this pixel size first (default: keep it; amibr, whose "
                   "crops come at 0.23 and 0.25 um/px: 0.2456).")
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
@click.option("--val-scanners", multiple=True,
              help="A scanner whose slides all go to validation (repeat the option for more; "
                   "names as the dataset records them, e.g. amibr's \"Hamamatsu XR\").")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of slides drawn for validation when neither --val-slides nor "
                   "--val-scanners is given.")
@click.option("--det-small-images", type=click.Choice(["skip", "pad", "mosaic"]),
              default=None,
              help="Images smaller than a det tile: no det tiles (skip), reflect-padded "
                   "tiles (pad) or mosaic tiles of several of them, one scanner each, figures "
                   "at random places (mosaic: how amibr crops become Mdet tiles). Default: "
                   "skip for amibr (128 px crops), pad otherwise.")
@click.option("--seed", type=int, default=0, show_default=True, help="Split and sampling seed.")
@click.option("--shard-mb", type=float, default=64.0, show_default=True,
              help="Size bound of one shard (MiB).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def prepare(src, fmt, out, mpp, target_mpp, box_size, coco_bbox, tile_size,
            det_per_mitosis, det_empty_share, det_grid, val_fields, patch_size, cls_per_mitosis,
            cls_per_hard_negative,
            cls_background, val_slides, val_scanners, val_fraction, det_small_images, seed,
            shard_mb, overwrite):
    """Turn a dataset at SRC into TFRecord shards (det tiles, cls patches) + manifest.json."""
    _check_writable(out, into_parent=True)
    on_interrupt(f"nothing was written ({out} is put in place only when complete)")
    _import_tensorflow()
    from focas_keras.datasets.prepare import PrepareConfig
    from focas_keras.datasets.prepare import prepare as run_prepare
    from focas_keras.datasets.readers import read_dataset

    config = PrepareConfig(
        tile_size=tile_size, det_tiles_per_mitosis=det_per_mitosis,
        det_empty_share=det_empty_share, det_grid=det_grid, val_fields=val_fields,
        patch_size=patch_size,
        cls_per_mitosis=cls_per_mitosis, cls_per_hard_negative=cls_per_hard_negative,
        cls_background_per_image=cls_background, val_slides=_slides(val_slides),
        val_scanners=tuple(s.strip() for s in val_scanners if s.strip()),
        val_fraction=val_fraction, seed=seed, target_mpp=target_mpp,
        det_small_images=det_small_images, shard_mb=shard_mb)
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
        if c.get("scanners"):
            lines.append(f"        scanners: {', '.join(c['scanners'])}")
        if det.get("skipped_small_images"):
            lines.append(f"        {det['skipped_small_images']} images smaller than a det "
                         "tile gave no det tiles")
        if det.get("mosaic_tiles"):
            lines.append(f"        {det['mosaic_tiles']} mosaic tiles of images smaller than "
                         "a det tile")
    return "\n".join(lines)


@click.command()
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


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [synth, prepare, inspect]
