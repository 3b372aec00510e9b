"""A cascade on the AMi-Br crops (real mitoses of four other scanners), per scanner.

Each crop (128 px, one mitosis at its centre, at its scanner's pixel size) goes through the
library's detect path (:func:`focas_keras.inference.outputs.detect_to_dir`, which resizes it
to each stage's pixel size) and is scored against its labelled figures: the centred one and
every other figure of ``labels.csv`` inside the crop (:mod:`focas_keras.datasets.readers.amibr`).

Per scanner:

- ``recall``: share of crops whose central figure has an accepted detection within
  :data:`RADIUS_UM` (20 px at 0.2456 um/px, 4.9 um);
- ``candidate_recall``: the same for any stage-1 candidate, accepted or not;
- ``fp_per_crop``: accepted detections farther than :data:`RADIUS_UM` from every labelled
  figure of their crop, per crop. The crops hold only labelled mitoses and unlabelled other
  cells, so these are false positives up to label noise.

Detections are cached per scanner in chunks (``<out>/cache/<scanner>/part_NNN.csv``), so an
interrupted run resumes where it stopped; ``<out>/crops.csv`` (one row per crop) and
``<out>/summary.json`` are written at the end (from the cache: a rerun only scores).

With ``keep_candidates`` every candidate (centre, both scores) is cached beside its chunk
(``cand_NNN.csv``). Run once at permissive thresholds (a low stage-1 floor, stage 2 at 0),
:func:`rescore` then gives the crops' metrics for any stricter pair without a model: a pair
accepts the same candidates from the floor run as from its own run (stage 1's NMS and its
per-area cap keep the best-scored boxes, so a higher cut keeps a subset of them), and the
point merge is the cascade's (:func:`~focas_keras.inference.engine.merge_points`, ranked by
Mclass, in input pixels).

Usage:
    python experiments/amibr_eval.py --out experiments/results/amibr_bundled
    python experiments/amibr_eval.py --per-scanner 200 --scanners "Hamamatsu XR" --out DIR
    python experiments/amibr_eval.py --det RUN --cls RUN --thresholds 0.05,0.6 --out DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from focas_keras.datasets.annotations import ICPR2012_MPP  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "ami_br"
#: Match radius, um: 20 px at the ICPR 2012 / stage pixel size.
RADIUS_UM = 20 * ICPR2012_MPP
#: Crops per cached chunk.
CHUNK = 100
CROP_COLUMNS = ["image", "scanner", "dataset", "slide", "mpp", "figures", "hit",
                "candidate_hit", "fp", "accepted", "candidates", "centre_dist_um"]
CANDIDATE_COLUMNS = ["image", "x", "y", "det_score", "cls_score"]


def crop_metrics(figures, detections: pd.DataFrame, mpp: float,
                 radius_um: float = RADIUS_UM) -> dict:
    """Scores one crop.

    Args:
        figures: (G, 2) x, y of the crop's labelled figures in crop pixels, the central
            (evaluated) figure first; G >= 1.
        detections: the crop's candidates, columns ``x, y`` (crop pixels) and ``accepted``.
        mpp: the crop's pixel size (um/px).
        radius_um: match radius, um.

    Returns:
        ``hit`` (an accepted detection within the radius of the central figure),
        ``candidate_hit`` (any candidate within it), ``fp`` (accepted detections outside the
        radius of every figure), ``accepted``, ``candidates`` and ``centre_dist_um`` (distance
        of the nearest accepted detection to the central figure, um; NaN when none).
    """
    figures = np.asarray(figures, np.float64).reshape(-1, 2)
    if not len(figures):
        raise ValueError("a crop needs its central figure")
    points = detections[["x", "y"]].to_numpy(np.float64).reshape(-1, 2)
    accepted = detections["accepted"].to_numpy(bool).reshape(-1)
    radius = radius_um / float(mpp)
    dist = np.hypot(points[:, None, 0] - figures[None, :, 0],
                    points[:, None, 1] - figures[None, :, 1])  # (D, G) px
    near_centre = dist[:, 0] <= radius
    near_any = (dist <= radius).any(axis=1)
    centre = dist[accepted, 0]
    return {"hit": bool((near_centre & accepted).any()),
            "candidate_hit": bool(near_centre.any()),
            "fp": int((accepted & ~near_any).sum()),
            "accepted": int(accepted.sum()), "candidates": int(len(points)),
            "centre_dist_um": float(centre.min() * mpp) if len(centre) else float("nan")}


def summarize(crops: pd.DataFrame) -> dict:
    """Per-scanner (and ``all``) recall, candidate recall and false positives per crop.

    Args:
        crops: one row per crop with ``scanner, hit, candidate_hit, fp, accepted``.

    Returns:
        ``{scanner: {"crops", "recall", "candidate_recall", "fp", "fp_per_crop",
        "accepted_per_crop"}}``, plus ``all`` over every crop.
    """
    def stats(rows):
        n = len(rows)
        return {"crops": int(n),
                "recall": float(rows["hit"].astype(bool).mean()) if n else float("nan"),
                "candidate_recall": (float(rows["candidate_hit"].astype(bool).mean())
                                     if n else float("nan")),
                "fp": int(rows["fp"].sum()),
                "fp_per_crop": float(rows["fp"].sum() / n) if n else float("nan"),
                "accepted_per_crop": float(rows["accepted"].sum() / n) if n else float("nan")}

    out = {str(s): stats(g) for s, g in crops.groupby("scanner", sort=True)}
    out["all"] = stats(crops)
    return out


def sample(images: pd.DataFrame, per_scanner: int | None) -> pd.DataFrame:
    """A deterministic sample of at most ``per_scanner`` crops per scanner: each scanner's
    crops sorted by file name, every k-th from the first (k = count // per_scanner); None or
    0: every crop."""
    images = images.assign(_file=images.image_path.map(lambda p: Path(p).name))
    parts = []
    for _, group in images.sort_values("_file", kind="stable").groupby("scanner", sort=True):
        if per_scanner and len(group) > per_scanner:
            group = group.iloc[::len(group) // per_scanner].iloc[:per_scanner]
        parts.append(group)
    return pd.concat(parts).drop(columns="_file").reset_index(drop=True)


def slug(text: str) -> str:
    """A file-name-safe form of a scanner name."""
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "unknown"


def cascade_at(base, mpp: float):
    """``base`` (a :class:`~focas_keras.inference.cascade.Cascade`) for inputs of pixel size
    ``mpp``: the same models, thresholds and stage pixel sizes, so each stage resizes the
    input from ``mpp`` as ``detect --mpp`` would."""
    from focas_keras.inference.cascade import Cascade

    settings = dataclasses.replace(base.settings, mpp=float(mpp))
    return Cascade(base.det_model, base.det_config, base.cls_model, base.cls_config, settings,
                   cls_threshold_default=base.cls_threshold,
                   det_threshold_default=base.det_threshold,
                   det_mpp_default=base.det_mpp, cls_mpp_default=base.cls_mpp)


def load_base_cascade(det=None, cls=None, thresholds=None, tta=None):
    """The bundled cascade (card thresholds and TTA) or the ``det``/``cls`` runs' (their
    final weights); ``thresholds`` (det, cls) and ``tta`` override."""
    from focas_keras import pretrained
    from focas_keras.inference.cascade import Cascade, CascadeSettings

    values = {}
    if thresholds is not None:
        values["det_threshold"], values["cls_threshold"] = map(float, thresholds)
    if tta is not None:
        values["tta"] = bool(tta)
    if det is None and cls is None:
        return pretrained.load_cascade(**values), f"bundled:{pretrained.DEFAULT}"
    if det is None or cls is None:
        raise SystemExit("give both --det and --cls, or neither (the bundled model)")
    return (Cascade.from_runs(det, cls, CascadeSettings(**values), which="model"),
            f"runs:{det},{cls}")


def detect_chunk(cascade_for, rows: pd.DataFrame, figures: dict, work: Path,
                 candidates: list | None = None) -> pd.DataFrame:
    """Runs ``detect_to_dir`` on a chunk of crops (one pixel size each) and scores them.

    Args:
        cascade_for: ``mpp -> Cascade`` for inputs of that pixel size (see
            :func:`cascade_at`; reuse them: each builds and traces its own detector).
        rows: images-table rows (``image_id, image_path, mpp, scanner, dataset, slide_id``).
        figures: ``{image_id: (G, 2)}`` figures, central first.
        work: scratch directory.
        candidates: if a list, every candidate table (:data:`CANDIDATE_COLUMNS`) is appended.

    Returns:
        One row per crop, :data:`CROP_COLUMNS`.
    """
    from focas_keras.inference.outputs import detect_to_dir

    out = []
    for mpp, group in rows.groupby("mpp", sort=True):
        target = Path(tempfile.mkdtemp(dir=work)) / "detect"
        detect_to_dir(cascade_for(mpp), list(group.image_path), target,
                      overlays=False, progress=False)
        found = pd.read_csv(target / "detections.csv", dtype={"image": str})
        if candidates is not None:
            candidates.append(found[CANDIDATE_COLUMNS])
        by_image = dict(tuple(found.groupby("image")))
        empty = found.iloc[:0]
        for row in group.itertuples():
            scores = crop_metrics(figures[row.image_id], by_image.get(row.image_id, empty), mpp)
            out.append({"image": row.image_id, "scanner": row.scanner, "dataset": row.dataset,
                        "slide": row.slide_id, "mpp": float(mpp),
                        "figures": len(figures[row.image_id]), **scores})
    return pd.DataFrame(out, columns=CROP_COLUMNS)


def central_first(data) -> dict:
    """``{image_id: (G, 2)}`` each crop's labelled figures in crop pixels, its central figure
    first (:func:`focas_keras.datasets.readers.amibr.crop_figures`; crops taken as 128 px)."""
    from focas_keras.datasets.readers.amibr import LABELS_FILE, crop_figures, read_labels

    figures = crop_figures(read_labels(Path(data) / LABELS_FILE))
    return {Path(name).stem: np.array([(x, y) for x, y, _ in figs], np.float64)
            for name, figs in figures.items()}


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    table.to_csv(tmp, index=False, lineterminator="\n")
    os.replace(tmp, path)


def run(data, out, cascade=None, model_name="", per_scanner=None, scanners=None,
        log=print, keep_candidates: bool = False) -> dict:
    """Evaluates ``cascade`` on the AMi-Br crops; writes ``crops.csv`` and ``summary.json``.

    Args:
        data: the AMi-Br directory.
        out: output directory (its ``cache/`` makes an interrupted run resume).
        cascade: a Cascade; None only when every chunk is cached already.
        model_name: what ran, for the summary.
        per_scanner: sample size per scanner (:func:`sample`); None: all crops.
        scanners: scanner names to evaluate; None: all.
        log: callable for progress lines.
        keep_candidates: also cache every candidate per chunk (``cand_NNN.csv``, for
            :func:`rescore`); a chunk cached without them runs again.

    Returns:
        The summary.
    """
    from focas_keras.datasets.readers.amibr import read_amibr
    from focas_keras.errors import InputError

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    aset = read_amibr(data, check_images=False)
    images = sample(aset.images, per_scanner)
    if scanners:
        unknown = sorted(set(scanners) - set(images.scanner))
        if unknown:
            raise InputError(f"unknown scanner(s) {', '.join(unknown)} "
                             f"(known: {', '.join(sorted(set(images.scanner)))})")
        images = images[images.scanner.isin(scanners)].reset_index(drop=True)
    figures = central_first(data)
    parts, seconds, cascades = [], {}, {}

    def cascade_for(mpp):
        if mpp not in cascades:
            cascades[mpp] = cascade_at(cascade, mpp)
        return cascades[mpp]

    for scanner, group in images.groupby("scanner", sort=True):
        cache = out / "cache" / slug(scanner)
        cache.mkdir(parents=True, exist_ok=True)
        started, ran = time.perf_counter(), 0
        for index, start in enumerate(range(0, len(group), CHUNK)):
            chunk = group.iloc[start:start + CHUNK]
            path = cache / f"part_{index:03d}.csv"
            cand_path = cache / f"cand_{index:03d}.csv"
            if path.is_file() and (cand_path.is_file() or not keep_candidates):
                cached = pd.read_csv(path, dtype={"image": str})
                if list(cached.image) == list(chunk.image_id):
                    parts.append(cached)
                    continue
            if cascade is None:
                raise InputError(f"{path} is missing and no model was given")
            found = [] if keep_candidates else None
            with tempfile.TemporaryDirectory(dir=out) as work:
                table = detect_chunk(cascade_for, chunk, figures, Path(work), found)
            if keep_candidates:  # before the part: a part without its candidates runs again
                _write_csv(pd.concat(found, ignore_index=True)
                           if found else pd.DataFrame(columns=CANDIDATE_COLUMNS), cand_path)
            _write_csv(table, path)
            parts.append(table)
            ran += len(chunk)
            log(f"{scanner}: {start + len(chunk)}/{len(group)} crops "
                f"({time.perf_counter() - started:.0f} s)")
        if ran:
            seconds[scanner] = round(time.perf_counter() - started, 1)
    crops = pd.concat(parts, ignore_index=True)[CROP_COLUMNS]
    _write_csv(crops, out / "crops.csv")
    # Scoring a cache without a model keeps what the earlier run recorded of its cascade.
    earlier = (json.loads((out / "summary.json").read_text())
               if cascade is None and (out / "summary.json").is_file() else {})
    summary = {"model": model_name or earlier.get("model", ""), "data": str(data),
               "per_scanner": per_scanner, "radius_um": RADIUS_UM, "chunk": CHUNK,
               "settings": (dataclasses.asdict(cascade.settings) if cascade is not None
                            else earlier.get("settings")),
               "resolved": ({"det_threshold": cascade.det_threshold,
                             "cls_threshold": cascade.cls_threshold,
                             "det_mpp": cascade.det_mpp, "cls_mpp": cascade.cls_mpp}
                            if cascade is not None else earlier.get("resolved")),
               "seconds_this_run": seconds, "scanners": summarize(crops)}
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, out / "summary.json")
    return summary


def kept_candidates(out, scanner: str, crops: int) -> pd.DataFrame:
    """Every candidate a :func:`run` with ``keep_candidates`` cached for ``scanner``'s
    ``crops`` crops (:data:`CANDIDATE_COLUMNS`).

    Raises:
        InputError: a chunk without its candidates.
    """
    from focas_keras.errors import InputError

    cache = Path(out) / "cache" / slug(scanner)
    paths = sorted(cache.glob("cand_*.csv"))
    if len(paths) != -(-crops // CHUNK):
        raise InputError(f"{scanner}: no candidates kept for every chunk (run with "
                         "keep_candidates)", cache)
    return pd.concat([pd.read_csv(p, dtype={"image": str}) for p in paths], ignore_index=True)


def rescore(out, data, det_threshold: float, cls_threshold: float, merge_px: float,
            scanners=None) -> tuple[pd.DataFrame, dict]:
    """The crops' metrics at a threshold pair, from a :func:`run` with ``keep_candidates``.

    Args:
        out: that run's output directory (its ``crops.csv`` and ``cache/*/cand_*.csv``).
        data: the AMi-Br directory (for the labelled figures).
        det_threshold: stage-1 cut; at least the run's own (below it nothing was kept).
        cls_threshold: stage-2 threshold.
        merge_px: the cascade's merge radius (input pixels).
        scanners: scanner names to score; None: every scanner of the run.

    Returns:
        (one row per crop, :data:`CROP_COLUMNS`; :func:`summarize` of it).

    Raises:
        InputError: the run kept no candidates for a scanner, or ran at a higher stage-1
            cut than ``det_threshold``.
    """
    from focas_keras.errors import InputError
    from focas_keras.inference.engine import merge_points

    out = Path(out)
    summary = json.loads((out / "summary.json").read_text())
    floor = (summary.get("resolved") or {}).get("det_threshold")
    if floor is None or det_threshold < floor - 1e-9:
        raise InputError(f"stage-1 cut {det_threshold} is below the run's own ({floor})",
                         out / "summary.json")
    crops = pd.read_csv(out / "crops.csv", dtype={"image": str})
    if scanners:
        crops = crops[crops.scanner.isin(scanners)]
    figures = central_first(data)
    rows = []
    for scanner, group in crops.groupby("scanner", sort=True):
        cands = kept_candidates(out, scanner, len(group))
        cands = cands[cands.det_score >= det_threshold]
        by_image = dict(tuple(cands.groupby("image")))
        for crop in group.itertuples(index=False):
            found = by_image.get(crop.image, cands.iloc[:0])
            points = found[["x", "y"]].to_numpy(np.float64)
            accepted = merge_points(points, found.cls_score.to_numpy(np.float64),
                                    found.cls_score.to_numpy() >= cls_threshold, merge_px)
            scores = crop_metrics(figures[crop.image], found.assign(accepted=accepted),
                                  crop.mpp)
            rows.append({**{c: getattr(crop, c) for c in CROP_COLUMNS[:6]}, **scores})
    table = pd.DataFrame(rows, columns=CROP_COLUMNS)
    return table, summarize(table)


def _pair(text: str) -> tuple[float, float]:
    try:
        det, cls = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected DET,CLS (two numbers)") from None
    return det, cls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="AMi-Br directory.")
    parser.add_argument("--out", type=Path, required=True, help="Output (and cache) directory.")
    parser.add_argument("--det", type=Path, help="train-det run (with --cls); default: bundled.")
    parser.add_argument("--cls", type=Path, help="train-cls run (with --det).")
    parser.add_argument("--thresholds", type=_pair, help="DET,CLS thresholds (default: the "
                        "card's for the bundled model, the runs' otherwise).")
    parser.add_argument("--tta", dest="tta", action="store_true", default=None,
                        help="Mclass TTA (default: the card's; off for runs).")
    parser.add_argument("--no-tta", dest="tta", action="store_false")
    parser.add_argument("--per-scanner", type=int, default=None,
                        help="Deterministic sample of N crops per scanner (default: all).")
    parser.add_argument("--scanners", nargs="+", default=None, metavar="NAME",
                        help="Scanner names as in labels.csv (default: all).")
    parser.add_argument("--keep-candidates", action="store_true",
                        help="Also cache every candidate (for rescore / joint_thresholds.py).")
    args = parser.parse_args(argv)
    from focas_keras.errors import InputError

    try:
        cascade, name = load_base_cascade(args.det, args.cls, args.thresholds, args.tta)
        summary = run(args.data, args.out, cascade, name, args.per_scanner, args.scanners,
                      keep_candidates=args.keep_candidates)
    except InputError as err:
        print(f"amibr_eval: error: {err}", file=sys.stderr)
        return 2
    for scanner, s in summary["scanners"].items():
        print(f"{scanner:40s} crops {s['crops']:5d}  recall {s['recall']:.3f}  "
              f"candidate recall {s['candidate_recall']:.3f}  FP/crop {s['fp_per_crop']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
