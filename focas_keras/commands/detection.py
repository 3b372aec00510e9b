"""``detect``, ``models``, ``export``, ``predict``, ``demo``: running the cascade."""

from __future__ import annotations

import click

from focas_keras.commands.base import _import_tensorflow, on_interrupt
from focas_keras.commands.common import (_cascade_options, _check_writable, _given_or_none,
                                         _image_files_or_failures, _report_failures,
                                         _runs_options, _warn)


@click.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@_runs_options
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
@click.option("--allow-coarser", is_flag=True,
              help="Run on images coarser than the model's pixel size (refused by default); "
                   "every output is then flagged (qc).")
@click.pass_context
def detect(ctx, inputs, det_run, cls_run, out, mpp, model_mpp, det_mpp, cls_mpp, tile, overlap,
           tile_batch, det_threshold, cls_threshold, patch, merge_px, thresholds_file, which,
           max_candidates_per_mm2, tta, no_overlays, no_rejected, overwrite, allow_coarser):
    """Find mitoses in INPUTS (images or directories of .bmp/.png/.jpg/.tif HPFs).

    An unreadable image among several is listed in detect.json (failed) and the rest run;
    the exit status is then 1.
    """
    files, failed = _image_files_or_failures(inputs)
    _check_writable(out, into_parent=True)
    on_interrupt("nothing was written (the output directory is put in place only when "
                 "complete)")
    _import_tensorflow()
    from focas_keras.inference.loading import load_cascade, model_runs
    from focas_keras.inference.outputs import detect_to_dir

    source = model_runs(det_run, cls_run)
    qc = _input_qc(source.card, source.det, source.cls, mpp, allow_coarser)  # before models
    cascade = load_cascade(
        det_run, cls_run, thresholds_file, which=which, tta=tta, announce=click.echo,
        warn=_warn, mpp=mpp, model_mpp=model_mpp, det_mpp=det_mpp, cls_mpp=cls_mpp, tile=tile,
        overlap=overlap, tile_batch=tile_batch, det_threshold=det_threshold,
        cls_threshold=cls_threshold, patch=patch,
        merge_px=_given_or_none(ctx, "merge_px", merge_px),
        max_candidates_per_mm2=max_candidates_per_mm2)
    extra = {"runs": {"det": str(cascade.runs.det.resolve()),
                      "cls": str(cascade.runs.cls.resolve())},
             "thresholds_file": cascade.thresholds_file}
    if cascade.card is not None:
        extra["bundled_model"] = cascade.card["name"]
    counts = detect_to_dir(cascade, files, out, overlays=not no_overlays, progress=True,
                           overwrite=overwrite, extra=extra, rejected=not no_rejected,
                           warn=_warn, qc=qc, failed=failed)
    click.echo(f"{int(counts['accepted'].sum())} mitoses accepted of "
               f"{int(counts['candidates'].sum())} candidates in {len(counts)} images "
               f"(stage 1 >= {cascade.det_threshold:.3f}, stage 2 >= "
               f"{cascade.cls_threshold:.3f}{', TTA' if cascade.settings.tta else ''}"
               + (f"; thresholds from {thresholds_file}" if thresholds_file else "")
               + f"); results in {out}")
    flagged = counts[counts["qc"] != "ok"]
    if len(flagged):
        click.echo(f"  qc: {len(flagged)} of {len(counts)} images FLAGGED (outside the model's "
                   f"domain: {', '.join(sorted(set(';'.join(flagged['qc']).split(';'))))}); "
                   "see detect.json qc and the README's 'When a slide or field is flagged'")
    overlay_text = "; overlays/: green = accepted" + ("" if no_rejected else
                                                      ", red = rejected candidate")
    click.echo(f"  {out}/counts.csv: mitoses per image and per mm2; detections.csv: every "
               f"candidate (accepted = counted); detections.geojson: accepted, for QuPath"
               + ("" if no_overlays else overlay_text))
    _report_failures(ctx, failed, "images", len(counts) + len(failed))


def _input_qc(card, det_run, cls_run, mpp, allow_coarser):
    """``detect``'s per-image domain check (:func:`focas_keras.domain.image_qc`), after
    refusing (InputError naming --mpp) images coarser than the model unless
    ``allow_coarser``."""
    from focas_keras import domain

    finest = domain.model_finest_mpp(card, det_run, cls_run)
    forced = domain.check_pixel_size(mpp, finest, f"--mpp {mpp:g}", allow_coarser)
    if forced:
        _warn(f"{forced}; running anyway (--allow-coarser): every output is flagged")
    card_domain = domain.domain_of(card)

    def qc(image, df):
        return domain.image_qc(image, df, mpp, finest, forced, card_domain)

    return qc


@click.command()
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


@click.command("export")
@_runs_options
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
@click.option("--tta/--no-tta", default=None,
              help="Score each crop under its 8 rotations/flips inside the graph and average "
                   "the probabilities, as detect --tta (default: as detect, i.e. the bundled "
                   "model's card, off for --det/--cls runs).")
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
               which, max_detections, max_candidates_per_mm2, max_pixels, tta, sample,
               config_base, check):
    """Export the cascade, Mdet and Mclass as SavedModels for TensorFlow Serving."""
    if not (det_run is None and cls_run is None and check):
        _check_writable(base)
    _import_tensorflow()
    from focas_keras.export import savedmodel
    from focas_keras.export.compare import ExportError

    if det_run is None and cls_run is None and check:
        click.echo(savedmodel.describe_base(base, version=version))
        return
    from focas_keras.datasets.annotations import ColourCheck, load_image
    from focas_keras.inference.loading import load_cascade

    cascade = load_cascade(
        det_run, cls_run, thresholds_file, which=which, tta=tta, announce=click.echo,
        warn=_warn, mpp=mpp, tile=tile, overlap=overlap, tile_batch=tile_batch,
        det_threshold=det_threshold, cls_threshold=cls_threshold, patch=patch,
        merge_px=_given_or_none(ctx, "merge_px", merge_px),
        max_candidates_per_mm2=max_candidates_per_mm2)
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


@click.command()
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
    _check_writable(out, into_parent=True)
    on_interrupt("nothing was written (the output directory is put in place only when "
                 "complete)")
    _import_tensorflow()
    from focas_keras.export.client import make_client, predict_to_dir

    client = make_client(server=server, rest=rest, model=model, version=version,
                         timeout=timeout)
    counts = predict_to_dir(client, inputs, out, mpp=mpp, overlays=not no_overlays,
                            progress=True, overwrite=overwrite)
    click.echo(f"{int(counts['accepted'].sum())} mitoses accepted of "
               f"{int(counts['candidates'].sum())} candidates in {len(counts)} images "
               f"(server {server or rest}, model {model}); results in {out}")


@click.command()
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
    _check_writable(out, into_parent=True)
    on_interrupt(f"nothing new was written ({out} is put in place only when complete)")
    _import_tensorflow()
    if not synthetic:
        from focas_keras.sample_demo import run_sample_demo

        run_sample_demo(out, overwrite=overwrite, echo=click.echo)
        return
    from focas_keras.demo import run_demo

    run_demo(out, images=images, size=size, test_images=test_images, seed=seed,
             overwrite=overwrite, echo=click.echo)


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [detect, models, export_cmd, predict, demo]
