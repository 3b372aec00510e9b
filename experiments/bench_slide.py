"""Whole-slide cost: seconds per mm2 of tissue and peak memory at two slide sizes, against the
same run's ``detect`` on the same tissue pixels as field files; and Mdet's forward rate.

Two slides are built from real ICPR 2012 HPFs (``../shared``; synthetic fields where it is
missing), laid edge to edge in a block at the slide's top-left with one field's width of white
to the right and below: ``x1`` holds 1 x 2 fields (0.52 mm2 of tissue), ``x4`` 2 x 4 (2.1 mm2).
Each run is a fresh process, timed from the outside with its peak RSS (``ru_maxrss``):
``focas-keras slide`` with the bundled model and default settings; ``focas-keras detect
--no-overlays`` on the fields written as PNG files (the tissue alone); and ``detect`` on the
footprints of the tiles the slide run processed, written as PNG files (exactly the pixels the
slide's stage 1 sees, 2048 px at level 0 = one 1024 px Mdet tile each). The slide path's
overhead is its wall time over the last, minus 1: reading the pyramid, the tissue mask, the
journal, the merge and the report. Its wall time over detect on the fields alone adds what
tiling costs: tile overlaps and whole tiles run where they touch tissue at all.

Then Mdet's forward GFLOP/s against the same run's 2048^2 matmul (``bench_forward.py``), with
and without Weight Standardisation folded into the kernels (what ``Cascade.from_runs`` does).

Usage:
    python experiments/bench_slide.py [--repeats 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))
SHARED = REPO.parent / "shared" / "data" / "icpr2012" / "images"
FIELD = 2084
MPP = 0.2456

_TIMED = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)
"""


def fields(count: int) -> list[np.ndarray]:
    """``count`` 2084 px fields: the shared real HPFs in name order, else synthetic ones."""
    files = sorted(SHARED.glob("*.jpg")) if SHARED.is_dir() else []
    if files:
        from focas_keras.datasets.annotations import load_image

        return [load_image(files[i % len(files)]) for i in range(count)]
    from focas_keras.datasets.synth import synthesize_image

    return [synthesize_image(FIELD, seed=i).image for i in range(count)]


def build(directory: Path, rows: int, cols: int) -> tuple[Path, list[Path], float]:
    """A slide of rows x cols fields plus white, and the same fields as PNG files."""
    from focas_keras.datasets.slides import synthetic_slide, write_slide

    images = fields(rows * cols)
    placed = [(r * FIELD, c * FIELD, images[r * cols + c]) for r in range(rows)
              for c in range(cols)]
    slide = synthetic_slide((rows + 1) * FIELD, (cols + 1) * FIELD, placed)
    path = directory / f"slide_{rows}x{cols}.svs"
    write_slide(path, slide, MPP, compression="zlib")
    field_dir = directory / f"fields_{rows}x{cols}"
    field_dir.mkdir()
    files = []
    for k, image in enumerate(images):
        files.append(field_dir / f"f{k}.png")
        cv2.imwrite(str(files[-1]), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return path, files, rows * cols * (FIELD * MPP / 1000.0) ** 2


def write_tiles(slide_dir: Path, path: Path, directory: Path) -> list[Path]:
    """The level-0 footprints of the tiles the slide run processed, as PNG files."""
    from focas_keras.inference.tiling import TileGrid
    from focas_keras.slides.reader import SlideReader

    lines = (slide_dir / "tiles.jsonl").read_text().splitlines()
    header = json.loads(lines[0])
    det = header["det"]
    grid = TileGrid(det["height"], det["width"], header["tile"], header["overlap"])
    directory.mkdir()
    files = []
    with SlideReader.open(path) as reader:
        scale = reader.width / det["width"]
        for line in lines[1:]:
            record = json.loads(line)
            if record["status"] != "done":
                continue
            x0, y0 = grid.origin(tuple(record["cell"]))
            side = round(grid.tile * scale)
            pixels = reader.read(round(x0 * scale), round(y0 * scale), side, side, 0)
            files.append(directory / f"t{record['cell'][0]}_{record['cell'][1]}.png")
            cv2.imwrite(str(files[-1]), cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR))
    return files


def timed(command: list[str]) -> dict:
    """Wall seconds and peak RSS (MiB) of one fresh process."""
    out = subprocess.run([sys.executable, "-c", _TIMED, *command], capture_output=True,
                         text=True, check=True).stdout.split()
    if int(out[2]) != 0:
        raise RuntimeError(f"failed: {' '.join(command)}")
    return {"seconds": float(out[0]), "peak_rss_mib": int(out[1]) / 1024.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs per measurement (min)")
    parser.add_argument("--forward-repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cli = [sys.executable, "-m", "focas_keras"]
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, (rows, cols) in {"x1": (1, 2), "x4": (2, 4)}.items():
            path, files, tissue_mm2 = build(tmp, rows, cols)
            runs = {"slide": [], "detect": [], "detect_tiles": []}
            tile_files = None
            for _ in range(args.repeats):  # alternated, so drifting load hits both alike
                out = tmp / f"out_{name}"
                shutil.rmtree(out, ignore_errors=True)
                runs["slide"].append(timed([*cli, "slide", str(path), "--out", str(out)]))
                det_out = tmp / f"det_{name}"
                shutil.rmtree(det_out, ignore_errors=True)
                runs["detect"].append(timed([*cli, "detect", *map(str, files), "--out",
                                             str(det_out), "--no-overlays"]))
                if tile_files is None:
                    tile_files = write_tiles(out / path.stem, path, tmp / f"tiles_{name}")
                det_out = tmp / f"dett_{name}"
                shutil.rmtree(det_out, ignore_errors=True)
                runs["detect_tiles"].append(timed([*cli, "detect", *map(str, tile_files),
                                                   "--out", str(det_out), "--no-overlays"]))
            best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
            summary = json.loads((out / path.stem / "summary.json").read_text())
            entry = {
                "fields": rows * cols, "tissue_mm2_nominal": round(tissue_mm2, 4),
                "tissue_mm2_mask": summary["tissue_mm2"], "tiles": summary["tiles"],
                "slide": best["slide"], "detect": best["detect"],
                "detect_tiles": best["detect_tiles"], "tiles_as_files": len(tile_files),
                "slide_s_per_mm2": best["slide"]["seconds"] / tissue_mm2,
                "detect_s_per_mm2": best["detect"]["seconds"] / tissue_mm2,
                "overhead": best["slide"]["seconds"] / best["detect_tiles"]["seconds"] - 1.0,
                "over_fields": best["slide"]["seconds"] / best["detect"]["seconds"] - 1.0,
                "mitoses_slide": summary["mitoses"],
            }
            result["sizes"][name] = entry
            print(f"{name}: {rows * cols} fields, slide {best['slide']['seconds']:.1f} s "
                  f"({entry['slide_s_per_mm2']:.1f} s/mm2, {best['slide']['peak_rss_mib']:.0f} "
                  f"MiB); detect on the fields {best['detect']['seconds']:.1f} s "
                  f"({best['detect']['peak_rss_mib']:.0f} MiB, slide "
                  f"{100 * entry['over_fields']:+.1f} %); detect on the slide's "
                  f"{len(tile_files)} tiles "
                  f"{best['detect_tiles']['seconds']:.1f} s: slide path overhead "
                  f"{100 * entry['overhead']:+.1f} %", flush=True)
    from bench_forward import forward_rates

    start = time.perf_counter()
    result["forward"] = forward_rates(["cpu"], 1024, args.forward_repeats)
    result["forward_seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(result, indent=2, default=float)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
