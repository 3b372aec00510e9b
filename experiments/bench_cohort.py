"""``slide`` versus ``cohort`` (Beam DirectRunner, multi_processing, 1 and 2 workers) on the
same slides in the same run: wall seconds, tiles/s, seconds per mm2 of tissue, peak memory
of every process, and the pipeline's overhead at 1 worker against ``slide``.

Each configuration runs as its own ``focas-keras`` process (model loading and, for Beam,
pipeline and worker start-up included). Peak memory is each process's VmHWM (Linux
``/proc/<pid>/status``), polled every 0.2 s over the command's process tree: the Beam
launcher, its SDK worker processes, and ``slide``'s one process.

    python experiments/bench_cohort.py --out /tmp/bench_cohort [--slides 2 --tiles 2] \
        [--repeats 3]

With ``--repeats`` every configuration runs that many times, interleaved (slide, 1 worker,
2 workers, slide, ...), and its median wall time is reported (all runs are listed).

Slides are synthetic (pink tissue with dark blobs, 0.2456 um/px), each ``--tiles`` stage-1
tiles of the bundled model (1024 px at 0.4912 um/px) wide and one tall.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MPP = 0.2456


def make_slide(path: Path, tiles: int, seed: int) -> Path:
    """A slide ``tiles`` stage-1 tiles wide (1024 px at twice MPP, overlap 64) and one tall."""
    from focas_keras.datasets.slides import write_slide

    rng = np.random.default_rng(seed)
    height, width = 2048, 2 * (1024 + 960 * (tiles - 1))
    image = np.full((height, width, 3), (222, 160, 205), np.uint8)
    image += rng.integers(0, 12, image.shape, dtype=np.uint8)
    for y, x in rng.integers((20, 20), (height - 20, width - 20), (40 * tiles, 2)):
        y0, x0 = max(0, y - 14), max(0, x - 14)
        yy, xx = np.mgrid[y0:y + 14, x0:x + 14]
        blob = (yy - y) ** 2 + (xx - x) ** 2 < 13 ** 2
        image[y0:y + 14, x0:x + 14][blob] = (70, 35, 110)
    write_slide(path, image, MPP)
    return path


def _tree(root: int) -> list[int]:
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    return pids


def _hwm_mb(pid: int) -> tuple[str, float] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return cmd, int(line.split()[1]) / 1024.0
    return None


def run(command: list[str]) -> dict:
    """Runs ``command``; returns its wall seconds, exit code and per-process peak RSS (MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    peaks = {}
    while proc.poll() is None:
        for pid in _tree(proc.pid):
            seen = _hwm_mb(pid)
            if seen is not None:
                peaks[pid] = (seen[0], max(seen[1], peaks.get(pid, ("", 0.0))[1]))
        time.sleep(0.2)
    output = proc.stdout.read().decode(errors="replace")
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(output[-3000:], file=sys.stderr)
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(command)}")
    workers = [mb for cmd, mb in peaks.values()  # not the `/bin/sh -c` that starts each
               if "sdk_worker_main" in cmd and not cmd.startswith("/bin/sh")]
    main = [mb for pid, (cmd, mb) in peaks.items() if pid == proc.pid]
    return {"seconds": round(seconds, 1), "peak_mb_main": round(max(main, default=0.0)),
            "peak_mb_workers": sorted(round(mb) for mb in workers)}


def totals(out: Path, names: list[str]) -> tuple[int, float]:
    """(processed tiles, tissue mm2) over the slides' summaries."""
    tiles = mm2 = 0
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        tiles += summary["tiles"]["processed"]
        mm2 += summary["tissue_mm2"]
    return tiles, mm2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--tiles", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs of each configuration, interleaved; the median is reported")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slides = [make_slide(args.out / f"bench{i}.svs", args.tiles, seed=i)
              for i in range(args.slides)]
    names = [p.stem for p in slides]
    cli = [sys.executable, "-m", "focas_keras"]
    configs = {"slide": cli + ["slide", *map(str, slides), "--out", str(args.out / "slide"),
                               "--overwrite"]}
    for workers in (1, 2):
        configs[f"beam_{workers}"] = cli + ["cohort", *map(str, slides), "--out",
                                            str(args.out / f"beam_{workers}"), "--workers",
                                            str(workers), "--overwrite"]
    runs = {name: [] for name in configs}
    for repeat in range(args.repeats):  # interleaved, so drift of the machine hits all alike
        for name, command in configs.items():
            result = run(command)
            tiles, mm2 = totals(args.out / name, names)
            result.update(tiles=tiles, tissue_mm2=round(mm2, 3))
            runs[name].append(result)
            print(name, repeat, json.dumps(result), flush=True)
    results = {}
    for name, done in runs.items():
        seconds = float(np.median([r["seconds"] for r in done]))
        result = dict(done[0], seconds=round(seconds, 1),
                      runs_seconds=[r["seconds"] for r in done],
                      peak_mb_main=max(r["peak_mb_main"] for r in done),
                      peak_mb_workers=max((r["peak_mb_workers"] for r in done),
                                          key=lambda w: max(w, default=0)))
        result.update(tiles_per_s=round(result["tiles"] / seconds, 4),
                      s_per_mm2_tissue=round(seconds / result["tissue_mm2"], 2))
        results[name] = result
    overhead = results["beam_1"]["seconds"] / results["slide"]["seconds"] - 1.0
    report = {"slides": args.slides, "tiles_per_slide": args.tiles, "cpus": os.cpu_count(),
              "repeats": args.repeats,
              "results": results, "overhead_beam1_vs_slide": round(overhead, 3)}
    (args.out / "bench_cohort.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
