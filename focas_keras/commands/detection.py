"""``detect``, ``models``, ``export``, ``predict``, ``demo``: running the cascade."""

from __future__ import annotations

import click

from focas_keras.cli import _import_tensorflow, main, on_interrupt
from focas_keras.commands.common import (_check_writable, _image_files_or_failures,
                                         _report_failures, _warn)
from focas_keras.errors import InputError


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


def _runs_options(command):
    """``--det`` and ``--cls``, both defaulting to the bundled cascade (see
    :func:`_runs_or_bundled`), for ``detect``, ``export`` and ``slide``."""
    command = click.option(
        "--cls", "cls_run", type=click.Path(), default=None,
        help="A train-cls run (default: the bundled pretrained cascade, with --det).")(command)
    return click.option(
        "--det", "det_run", type=click.Path(), default=None,
        help="A train-det run (default: the bundled pretrained cascade, with --cls).")(command)


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
    from pathlib import Path

    files, failed = _image_files_or_failures(inputs)
    _check_writable(out, into_parent=True)
    on_interrupt("nothing was written (the output directory is put in place only when "
                 "complete)")
    _import_tensorflow()
    from focas_keras.inference.outputs import detect_to_dir

    values = dict(mpp=mpp, model_mpp=model_mpp, det_mpp=det_mpp, cls_mpp=cls_mpp, tile=tile,
                  overlap=overlap, tile_batch=tile_batch, det_threshold=det_threshold,
                  cls_threshold=cls_threshold, patch=patch, merge_px=merge_px,
                  max_candidates_per_mm2=max_candidates_per_mm2, tta=tta)
    thresholds = _apply_thresholds_file(ctx, thresholds_file, values)
    with _runs_or_bundled(det_run, cls_run) as (det_run, cls_run, card):
        _check_thresholds_runs(thresholds, det_run, cls_run)
        qc = _input_qc(card, det_run, cls_run, mpp, allow_coarser)  # before any model loads
        if card is None:
            values["tta"] = bool(values["tta"])
        cascade = _load_cascade(det_run, cls_run, card, values, merge_px, which)
        extra = {"runs": {"det": str(Path(det_run).resolve()),
                          "cls": str(Path(cls_run).resolve())},
                 "thresholds_file": thresholds}
        if card is not None:
            extra["bundled_model"] = card["name"]
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


def _load_cascade(det_run, cls_run, card, values: dict, merge_px: float, which: str):
    """The cascade of ``_runs_or_bundled``'s runs: ``values`` (the cascade settings given) as
    they are for the user's runs, with ``merge_px`` where no thresholds file set one; over the
    card's settings, and the final weights, for the bundled model."""
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    if card is None:
        if values["merge_px"] is None:
            values = {**values, "merge_px": merge_px}
        return Cascade.from_runs(det_run, cls_run, CascadeSettings(**values), which=which)
    from focas_keras import pretrained

    return Cascade.from_runs(det_run, cls_run, pretrained.settings_from_card(card, **values),
                             which="model")


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
    from data_tools.annotations import ColourCheck, load_image

    values = dict(mpp=mpp, tile=tile, overlap=overlap, tile_batch=tile_batch,
                  det_threshold=det_threshold, cls_threshold=cls_threshold, patch=patch,
                  merge_px=merge_px, max_candidates_per_mm2=max_candidates_per_mm2, tta=tta)
    thresholds = _apply_thresholds_file(ctx, thresholds_file, values)
    with _runs_or_bundled(det_run, cls_run) as (det_run, cls_run, card):
        _check_thresholds_runs(thresholds, det_run, cls_run)
        if card is None:
            values["tta"] = bool(values["tta"])
        cascade = _load_cascade(det_run, cls_run, card, values, merge_px, which)
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
