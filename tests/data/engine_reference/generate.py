"""Writes the engine's reference outputs (see README.md here) with the code at SOURCE.

Usage: python generate.py SOURCE OUT_DIR [WORK_DIR [PARTS]]

SOURCE: the root of a focas_keras source tree (run as ``python -m focas_keras`` with
PYTHONPATH=SOURCE); OUT_DIR receives the CSV / JSON references; WORK_DIR (default: a temp
directory) holds the slides and the full CLI outputs; PARTS (default all): a comma-separated
subset of detect_whole, detect_tile512, mosaic, synthetic.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ICPR = Path("/work/shared/data/icpr2012/images")
FIELDS = ["A00_00", "A03_00"]
MOSAIC_FIELDS = ["A00_00", "A01_04", "A02_00", "A04_03"]  # as test_slide_run's mosaic
MPP = 0.2456
SUMMARY_DROP = ("seconds", "path")  # the run's wall time and where the slide lay
EXACT_FORMAT = "%.9g"  # float32 scores exactly; coordinates to 1e-5 px


def cli(source: Path, *args) -> None:
    env = dict(os.environ, PYTHONPATH=str(source), TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run([sys.executable, "-m", "focas_keras", *map(str, args)], cwd=source,
                   env=env, check=True)


def slides_module(source: Path):
    sys.path.insert(0, str(source))  # SOURCE's own slide writer and synthetic fields
    try:
        from focas_keras.datasets.slides import synthetic_slide, write_slide
    except ImportError:  # the tree before the datasets move
        from data_tools.slides import synthetic_slide, write_slide
    try:
        from focas_keras.datasets.annotations import load_image
        from focas_keras.datasets.synth import synthesize_image
    except ImportError:
        from data_tools.annotations import load_image
        from data_tools.synth import synthesize_image
    return synthetic_slide, write_slide, load_image, synthesize_image


def make_slides(source: Path, work: Path) -> dict:
    synthetic_slide, write_slide, load_image, synthesize_image = slides_module(source)
    fields = [load_image(ICPR / f"{n}.jpg") for n in MOSAIC_FIELDS]
    step = 2112  # next multiple of 64 above a 2084 px field
    origins = [(0, 0), (0, step), (step, 0), (step, step)]
    mosaic = synthetic_slide(2 * step, 2 * step,
                             [(y, x, f) for (y, x), f in zip(origins, fields)])
    paths = {"mosaic": write_slide(work / "mosaic.svs", mosaic, MPP)}
    # A small synthetic slide: one synthetic H&E field on the left of a white slide, so the
    # tissue mask skips the white tiles on the right of the 512 px (Mdet) grid.
    field = synthesize_image((1400, 1800), seed=7).image
    small = synthetic_slide(2240, 4096, [(320, 384, field)])
    paths["synthetic"] = write_slide(work / "synthetic.svs", small, MPP)
    return paths


def main(source, out_dir, work=None, parts=None) -> None:
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    work = Path(work) if work else Path(tempfile.mkdtemp(prefix="engine_ref_"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = set((parts or "detect_whole,detect_tile512,mosaic,synthetic").split(","))
    images = [ICPR / f"{n}.jpg" for n in FIELDS]
    for name, extra in (("detect_whole", []), ("detect_tile512", ["--tile", "512"])):
        if name not in parts:
            continue
        cli(source, "detect", *images, "--out", work / name, *extra)
        shutil.copyfile(work / name / "detections.csv", out_dir / f"{name}.csv")
    slides = make_slides(source, work)
    runs = {"mosaic": [], "synthetic": ["--tile", "512"]}
    for name, path in slides.items():
        if name not in parts:
            continue
        cli(source, "slide", path, "--out", work / f"slide_{name}", *runs[name])
        result = work / f"slide_{name}" / name
        shutil.copyfile(result / "detections.csv", out_dir / f"slide_{name}.csv")
        summary = json.loads((result / "summary.json").read_text())
        for key in SUMMARY_DROP:
            summary.pop(key, None)
        (out_dir / f"slide_{name}_summary.json").write_text(
            json.dumps(summary, indent=1, sort_keys=True) + "\n")
    exact_tables(source, out_dir, work, parts)
    print(f"references in {out_dir}; full outputs in {work}")


def exact_tables(source: Path, out_dir: Path, work: Path, parts) -> None:
    """The same results unrounded (``*_exact.csv``): the fields through SOURCE's bundled
    ``Cascade.run`` in this process, the slides assembled by SOURCE from the journal
    (``tiles.jsonl``) that its ``slide`` command wrote."""
    import pandas as pd

    sys.path.insert(0, str(source))
    from focas_keras import pretrained
    from focas_keras.slides.reader import SlideReader

    _, _, load_image, _ = slides_module(source)
    for name, tile in (("detect_whole", 0), ("detect_tile512", 512)):
        if name not in parts:
            continue
        cascade = pretrained.load_cascade(tile=tile)
        tables = [cascade.run(load_image(ICPR / f"{n}.jpg")).assign(image=n) for n in FIELDS]
        pd.concat(tables, ignore_index=True).to_csv(out_dir / f"{name}_exact.csv",
                                                    index=False, float_format=EXACT_FORMAT)
    cascade = pretrained.load_cascade()
    for name in ("mosaic", "synthetic"):
        if name not in parts:
            continue
        slide_dir = work / f"slide_{name}" / name
        header, *lines = [json.loads(line) for line in
                          (slide_dir / "tiles.jsonl").read_text().splitlines()]
        with SlideReader.open(work / f"{name}.svs") as reader:
            table = assemble_with(source, cascade, reader, header, lines)
        table.to_csv(out_dir / f"slide_{name}_exact.csv", index=False,
                     float_format=EXACT_FORMAT)


def assemble_with(source: Path, cascade, reader, header: dict, records):
    """SOURCE's assembly of a slide's tile records (before or after the engine)."""
    try:
        from focas_keras.inference.engine import assemble, plan_tiles
    except ImportError:  # before the engine
        from focas_keras.slides.run import StageView, _assemble

        return _assemble(cascade, reader, StageView.of(reader, cascade.det_mpp), records)
    header_free = [r for r in records if r.get("status") == "done"]
    plan = plan_tiles(reader, cascade.det_mpp, cascade.cls_mpp, cascade.patch, header["tile"],
                      header["overlap"])
    return assemble(cascade, plan, header_free)


if __name__ == "__main__":
    main(*sys.argv[1:])
