"""``cohort``: ``slide`` over a cohort of slides on Apache Beam (the ``beam`` extra)."""

from __future__ import annotations

import click

from focas_keras.commands.common import (_check_writable, _given_or_none, _report_failures,
                                         _runs_options, _slide_options, _warn)


def _split(arguments) -> tuple[list[str], list[str]]:
    """(slides and manifests, Beam options): Beam's are the ``--name[=value]`` tokens."""
    slides = [a for a in arguments if not a.startswith("-")]
    return slides, [a for a in arguments if a.startswith("-")]


@click.command("cohort", context_settings={"ignore_unknown_options": True})
@click.argument("slides", nargs=-1, required=True)
@click.option("--out", required=True,
              help="Output directory (local, or a URI the runner's filesystems write): one "
                   "subdirectory per slide as `slide` writes it, slides.csv and failures.csv.")
@_runs_options
@click.option("--runner", default="DirectRunner", show_default=True,
              help="Beam runner (DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, ...); "
                   "other Beam options pass through as --name=value.")
@click.option("--workers", type=int, default=None,
              help="DirectRunner worker processes (default: the CPU count).")
@click.option("--batch-size", type=int, default=1, show_default=True,
              help="Most tiles per RunInference batch (one Mdet call). 1 is fastest on CPU "
                   "workers (each new batch size traces the detector again); raise it for "
                   "GPU workers.")
@click.option("--mpp", type=float, default=None,
              help="Level-0 pixel size (um/px) of every slide, overriding their own.")
@_slide_options
@click.option("--overwrite", is_flag=True,
              help="Rerun slides whose outputs are complete or hold another run's tiles.")
@click.option("--allow-coarser", is_flag=True,
              help="Run slides coarser than the model's pixel size (flagged, no score).")
@click.option("--score-anyway", is_flag=True,
              help="Give the Nottingham score of a flagged slide too (marked as flagged).")
@click.pass_context
def cohort(ctx, slides, out, det_run, cls_run, runner, workers, batch_size, mpp, hotspot_mm2,
           hpf, field_diameter_mm, no_tissue_mask, min_tissue, tile, overlap, det_threshold,
           cls_threshold, thresholds_file, merge_px, tta, which, on_tile_error, overwrite,
           allow_coarser, score_anyway):
    """Run `slide` over a cohort on Apache Beam: SLIDES are slide files or URIs, or manifests
    (.txt: one path a line; .csv/.tsv: a path column).

    Tiles, not slides, are spread over the workers. A slide that cannot be read is listed in
    failures.csv (and slides.csv) and the rest finish (exit status 1); a rerun skips slides
    whose outputs are complete for the same model and settings unless --overwrite. Example
    Beam options: --project=P --region=R --temp_location=gs://B/tmp
    --setup_file=./pyproject.toml.
    """
    import importlib.util

    from focas_keras.errors import InputError

    if importlib.util.find_spec("apache_beam") is None:
        raise InputError("the cohort command needs Apache Beam: pip install "
                         "'focas_keras[beam]'")
    from focas_keras.cohort import sources
    from focas_keras.cohort.pipeline import run_cohort
    from focas_keras.cohort.work import cohort_job
    from focas_keras.slides.lock import out_dir_lock
    from focas_keras.slides.run import SlideSettings

    paths, beam_args = _split(slides)
    slide_sources = sources.expand_sources(paths)
    settings = SlideSettings(tile=tile, overlap=overlap, tissue_mask=not no_tissue_mask,
                             min_tissue=min_tissue, hotspot_mm2=hotspot_mm2, hpf=hpf,
                             field_diameter_mm=field_diameter_mm, on_tile_error=on_tile_error,
                             allow_coarser=allow_coarser, score_anyway=score_anyway)
    job = cohort_job(out, det_run, cls_run, thresholds_file, which=which, tta=tta,
                     settings=settings, mpp=mpp, overwrite=overwrite, batch_size=batch_size,
                     det_threshold=det_threshold, cls_threshold=cls_threshold,
                     merge_px=_given_or_none(ctx, "merge_px", merge_px))
    click.echo(f"{len(slide_sources)} slide(s) on {runner}")
    if sources.is_remote(out):
        rows = run_cohort(slide_sources, job, runner, beam_args, workers)
    else:
        _check_writable(out)
        with out_dir_lock(out, warn=_warn):  # one run per --out
            rows = run_cohort(slide_sources, job, runner, beam_args, workers)
    for row in rows:
        if row["status"] == "done":
            click.echo(f"{row['slide']}: {row['mitoses']} mitoses in {row['tissue_mm2']} mm2 of "
                       f"tissue, score {row['score'] if row['score'] != '' else 'none'} "
                       f"({row['qc']})")
    click.echo(f"{out}/slides.csv: one row per slide; {out}/failures.csv: "
               f"{sum(r['status'] == 'failed' for r in rows)} failed")
    _report_failures(ctx, [r for r in rows if r["status"] == "failed"], "slides", len(rows))


#: The commands this module adds to ``focas-keras`` (:mod:`focas_keras.cli`).
COMMANDS = [cohort]
