"""``slide``: the cascade over whole-slide images, with the hotspot count and mitosis score."""

from __future__ import annotations

import click

from focas_keras.commands.base import _import_tensorflow, on_interrupt
from focas_keras.commands.common import (_check_writable, _given_or_none, _report_failures,
                                         _runs_options, _slide_options, _warn)


@click.command("slide")
@click.argument("slides", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory: one subdirectory per slide and slides.csv.")
@_runs_options
@click.option("--mpp", type=float, default=None,
              help="Level-0 pixel size (um/px), overriding the slide's own (openslide.mpp-x, "
                   "or the TIFF resolution tags); needed for plain images.")
@_slide_options
@click.option("--overwrite", is_flag=True,
              help="Discard a slide directory's tiles from another run instead of refusing.")
@click.option("--allow-coarser", is_flag=True,
              help="Run slides coarser than the model's pixel size (refused by default, e.g. "
                   "a 20x slide for a 40x model); they are flagged and get no score.")
@click.option("--score-anyway", is_flag=True,
              help="Give the Nottingham score of a flagged slide too (marked as flagged).")
@click.pass_context
def slide(ctx, slides, out, det_run, cls_run, mpp, hotspot_mm2, hpf, field_diameter_mm,
          no_tissue_mask, min_tissue, tile, overlap, det_threshold, cls_threshold,
          thresholds_file, merge_px, tta, which, on_tile_error, overwrite, allow_coarser,
          score_anyway):
    """Find mitoses in whole-slide images (.svs, .ndpi, .mrxs, .scn, pyramidal .tif, or plain
    images with --mpp): the count, the hotspot and the Nottingham mitosis score.

    A rerun with the same --out resumes from the finished tiles; a second run into an --out
    in use is refused. Among several slides, one that cannot be read or run is recorded in
    slides.csv (status failed, reason) and the rest run; the exit status is then 1.
    """
    from focas_keras.slides.lock import out_dir_lock
    from focas_keras.slides.run import SlideSettings, open_slides, run_slides

    settings = SlideSettings(tile=tile, overlap=overlap, tissue_mask=not no_tissue_mask,
                             min_tissue=min_tissue, hotspot_mm2=hotspot_mm2, hpf=hpf,
                             field_diameter_mm=field_diameter_mm,
                             on_tile_error=on_tile_error, allow_coarser=allow_coarser,
                             score_anyway=score_anyway)
    # Every file is checked before any model loads; among several, a bad one is set aside.
    failed = [] if len(slides) > 1 else None
    readers = open_slides(slides, mpp, failed)
    try:
        _check_writable(out)
        with out_dir_lock(out, warn=_warn):  # one run per --out
            on_interrupt(lambda: _kept_for_resume(out, readers))
            settings = _domain_check(settings, det_run, cls_run, readers)  # before models load
            cascade, model = _slide_cascade(ctx, det_run, cls_run, which, det_threshold,
                                            cls_threshold, merge_px, tta, thresholds_file)
            click.echo(f"stage 1 >= {cascade.det_threshold:.3f} at {cascade.det_mpp:g} um/px, "
                       f"stage 2 >= {cascade.cls_threshold:.3f} at {cascade.cls_mpp:g} um/px"
                       f"{', TTA' if cascade.settings.tta else ''}; {len(readers)} slide(s)")
            run_slides(cascade, readers, out, settings, mpp=mpp, model=model, progress=True,
                       overwrite=overwrite, echo=click.echo, failed=failed, locked=True)
    finally:
        for reader in readers:
            reader.close()
    if len(slides) > 1:
        click.echo(f"{out}/slides.csv: one row per slide (status, reason)")
    _report_failures(ctx, failed, "slides", len(slides))


def _kept_for_resume(out, readers) -> str:
    """What an interrupted ``slide`` leaves: the journals of the slides not finished."""
    from pathlib import Path

    from focas_keras.slides.run import JOURNAL

    kept = [Path(out) / r.name / JOURNAL for r in readers
            if (Path(out) / r.name / JOURNAL).is_file()
            and not (Path(out) / r.name / "summary.json").is_file()]
    if not kept:
        return "no tile was finished yet, so there is nothing to resume"
    return (f"the finished tiles are kept in {', '.join(map(str, kept))}; rerun the same "
            "command to resume")


def _domain_check(settings, det_run, cls_run, readers):
    """Refuses (InputError naming the slide and --allow-coarser) a slide coarser than the
    model's finest stage unless ``settings.allow_coarser``; returns ``settings`` with the
    bundled model's :class:`~focas_keras.domain.DomainCard`, which the run checks stain
    against."""
    import dataclasses

    from focas_keras import domain
    from focas_keras.inference.loading import model_runs

    card = model_runs(det_run, cls_run).card
    finest = domain.model_finest_mpp(card, det_run, cls_run)
    for reader in readers:
        if domain.check_pixel_size(reader.mpp, finest, reader.path, settings.allow_coarser):
            click.echo(f"focas-keras: warning: {reader.path}: {reader.mpp:g} um/px is coarser "
                       f"than the model's {finest:g} um/px; running anyway (--allow-coarser): "
                       "flagged (no score unless --score-anyway)", err=True)
    return dataclasses.replace(settings, domain=domain.domain_of(card))


def _slide_cascade(ctx, det_run, cls_run, which, det_threshold, cls_threshold, merge_px, tta,
                   thresholds_file):
    """(the Cascade, {"det", "cls"} sha256 of the weights it loaded: the tiles' model key),
    from :func:`focas_keras.inference.loading.load_cascade`."""
    _import_tensorflow()
    from focas_keras.inference.loading import load_cascade

    cascade = load_cascade(det_run, cls_run, thresholds_file, which=which, tta=tta,
                           announce=click.echo, warn=_warn, det_threshold=det_threshold,
                           cls_threshold=cls_threshold,
                           merge_px=_given_or_none(ctx, "merge_px", merge_px))
    return cascade, cascade.model_key


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [slide]
