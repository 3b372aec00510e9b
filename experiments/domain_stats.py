"""The bundled model's domain: colour statistics of its 15 training fields, and how far inputs
from elsewhere lie from them (``focas_keras.domain``).

Measures, with the stain distance of :func:`focas_keras.domain.stain_distance`:

- each ICPR 2012 field against the card of the OTHER slides' fields (leave one slide out), as
  whole fields and as its 128 px crops around its mitoses pooled per field (the control for
  AMi-Br, which holds only such crops);
- AMi-Br's 128 px mitosis crops pooled per source slide, by scanner, against the full card;
- the CMU-1-Small-Region.svs skin slide (20x) as ``slide`` samples it, against the full card.

Prints a Markdown table and writes ``--json`` (every distance). ``--write-card`` puts the
``domain`` block (all 15 fields; limit from ``--limit`` or, by default, the rule below) into
``focas_keras/pretrained/icpr2012_cpu/card.json`` and rewrites ``MODEL_CARD.md``; the card's
checksums cover only the model files, so they stay valid.

Limit rule (default): the largest leave-one-slide-out distance of a held-out ICPR field
(whole fields and their mitosis crops), times 1.25, rounded up to 0.5: every held-out
training-scanner field passes, with a margin for fields of the same scanner that the 15 do
not cover.

Usage:
    python experiments/domain_stats.py --json experiments/results/domain_stats.json \
        --write-card
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data"

from focas_keras import domain  # noqa: E402

CROP = 128
CARD_MPP = 0.2456


def _load(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _crops(image: np.ndarray, points) -> list[np.ndarray]:
    """128 px crops centred on ``points`` (x, y), shifted inside the image."""
    height, width = image.shape[:2]
    out = []
    for x, y in points:
        x0 = int(min(max(0, round(x) - CROP // 2), width - CROP))
        y0 = int(min(max(0, round(y) - CROP // 2), height - CROP))
        out.append(image[y0:y0 + CROP, x0:x0 + CROP])
    return out


def icpr_fields(data: Path) -> tuple[dict, dict]:
    """{field: whole-field stats}, {field: pooled mitosis-crop stats}."""
    centroids = pd.read_csv(data / "centroids.csv")
    whole, crops = {}, {}
    for path in sorted((data / "images").glob("*.jpg")):
        image = _load(path)
        whole[path.stem] = domain.colour_stats(image)
        points = centroids[centroids["image"] == path.stem][["x", "y"]].to_numpy()
        crops[path.stem] = domain.colour_stats(_crops(image, points)) if len(points) else None
    return whole, crops


def ami_br_slides(root: Path) -> pd.DataFrame:
    """One row per AMi-Br source slide: scanner, crops, pooled stats."""
    labels = pd.read_csv(root / "labels.csv")
    rows = []
    for (dataset, slide), group in labels.groupby(["dataset", "slide"], sort=True):
        images = [_load(root / "patches" / f) for f in group["file"]]
        rows.append({"dataset": dataset, "slide": slide, "scanner": group["scanner"].iloc[0],
                     "crops": len(images), "stats": domain.colour_stats(images)})
    return pd.DataFrame(rows)


def cmu_slide(path: Path) -> dict | None:
    """The skin slide's stats as ``slide`` samples them (tissue mask, tiles at 0.2456)."""
    if not path.is_file():
        return None
    from focas_keras.slides.reader import SlideReader
    from focas_keras.slides.tissue import tissue_map

    with SlideReader.open(path) as reader:
        tissue = tissue_map(reader, 8.0)
        tiles = domain.sample_slide_tiles(reader, tissue, CARD_MPP)
        return {"mpp": reader.mpp, "tiles": len(tiles), "stats": domain.colour_stats(tiles)}


def card_block(icpr: Path, limit: float | None = None) -> dict:
    """The card's ``domain`` block from the 15 fields, with the leave-one-slide-out distances
    that set its limit (:func:`focas_keras.domain.card_stats` of all fields; limit by the rule
    in this module's docstring unless given).

    Returns:
        {"block": the domain block, "loso": DataFrame (field, slide, whole, crops), "whole":
        {field: stats}}.
    """
    whole, crops = icpr_fields(icpr)
    rows = []
    for name in sorted(whole):
        others = [whole[f] for f in whole if f[:3] != name[:3]]
        mean, spread = domain.card_stats(others)
        rows.append({"field": name, "slide": name[:3],
                     "whole": domain.stain_distance(whole[name], mean, spread),
                     "crops": (domain.stain_distance(crops[name], mean, spread)
                               if crops[name] else None)})
    loso = pd.DataFrame(rows)
    mean, spread = domain.card_stats(list(whole.values()))
    worst = float(np.nanmax(loso[["whole", "crops"]].to_numpy(np.float64)))
    rule = (f"largest leave-one-slide-out distance of a held-out ICPR 2012 field ({worst:.2f}, "
            "whole fields and their pooled 128 px mitosis crops) x 1.25, rounded up to 0.5")
    if limit is None:
        limit = math.ceil(worst * 1.25 * 2) / 2
    else:
        rule = f"set by hand ({limit:g}); leave-one-slide-out maximum {worst:.2f}"
    block = domain.DomainCard(
        stage_mpp={"mdet": 0.4912, "mclass": 0.2456}, validated_mpp=(0.2456,),
        features=domain.STAIN_FEATURES, mean=tuple(mean), spread=tuple(spread), limit=limit,
        fields=len(whole), limit_rule=rule).to_dict()
    block["stain"]["per_field"] = {k: domain.feature_vector(v).round(5).tolist()
                                   for k, v in sorted(whole.items())}
    block["stain"]["loso_distances"] = {r["field"]: round(float(r["whole"]), 3)
                                        for r in rows}
    block["density"] = {"limit_per_mm2": domain.DENSITY_LIMIT_PER_MM2,
                        "min_count": domain.DENSITY_MIN_COUNT}
    return {"block": block, "loso": loso, "whole": whole}


def _summary(values) -> str:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if not len(values):
        return "-"
    return (f"{np.median(values):.2f} ({values.min():.2f}-{values.max():.2f})")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--icpr", type=Path, default=SHARED / "icpr2012")
    parser.add_argument("--ami-br", type=Path, default=SHARED / "ami_br")
    parser.add_argument("--slide", type=Path, default=SHARED / "slides" /
                        "CMU-1-Small-Region.svs")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--limit", type=float, default=None,
                        help="Stain distance limit for the card (default: the rule above).")
    parser.add_argument("--write-card", action="store_true")
    parser.add_argument("--card", type=Path,
                        default=REPO / "focas_keras" / "pretrained" / "icpr2012_cpu")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    found = card_block(args.icpr, args.limit)
    block, loso, whole = found["block"], found["loso"], found["whole"]
    stain = block["stain"]
    mean, spread, limit, rule = stain["mean"], stain["spread"], stain["limit"], stain["limit_rule"]

    ami = ami_br_slides(args.ami_br) if (args.ami_br / "labels.csv").is_file() else None
    table = ["| input | unit | n | stain distance: median (min-max) | flagged (> "
             f"{limit:g}) |", "|---|---|---:|---:|---:|"]

    def line(label, unit, values):
        values = [v for v in values if v is not None]
        flagged = sum(v > limit for v in values)
        table.append(f"| {label} | {unit} | {len(values)} | {_summary(values)} | "
                     f"{flagged}/{len(values)} |")

    line("ICPR 2012 (held-out slide, LOSO card)", "whole field", loso["whole"])
    line("ICPR 2012 (held-out slide, LOSO card)", "field's mitosis crops pooled", loso["crops"])
    ami_out = []
    if ami is not None:
        ami["distance"] = [domain.stain_distance(s, mean, spread) for s in ami["stats"]]
        for scanner, group in ami.groupby("scanner", sort=True):
            line(f"AMi-Br {scanner}", "slide's mitosis crops pooled", group["distance"])
        ami_out = [{k: r[k] for k in ("dataset", "slide", "scanner", "crops", "distance")}
                   for r in ami.to_dict("records")]
    cmu = cmu_slide(args.slide)
    if cmu is not None:
        cmu["distance"] = domain.stain_distance(cmu["stats"], mean, spread)
        line("CMU-1-Small-Region.svs (skin, 20x)", f"{cmu['tiles']} tissue tiles of 256 um",
             [cmu["distance"]])
    seconds = time.perf_counter() - start
    text = "\n".join(table)
    print(text)
    print(f"\nLOSO per field:\n{loso.round(3).to_string(index=False)}")
    print(f"\nlimit {limit:g} ({rule}); {seconds:.0f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "limit": limit, "rule": rule, "seconds": round(seconds, 1),
            "loso": loso.to_dict("records"), "ami_br": ami_out,
            "cmu": cmu and {k: cmu[k] for k in ("mpp", "tiles", "distance", "stats")},
            "icpr_stats": whole, "table": table}, indent=1) + "\n")
    block["measured"] = {"command": "python experiments/domain_stats.py --write-card",
                         "date": datetime.date.today().isoformat(), "table": table}
    if args.write_card:
        write_card(args.card, block)
        print(f"wrote the domain block into {args.card / 'card.json'}")
    return 0


def write_card(bundle: Path, block: dict) -> None:
    """Sets ``domain`` in ``card.json`` and rewrites ``MODEL_CARD.md`` (temp name + rename)."""
    from focas_keras import pretrained

    path = bundle / "card.json"
    card = json.loads(path.read_text(encoding="utf-8"))
    card["domain"] = block
    for name, text in (("card.json", json.dumps(card, indent=2, sort_keys=True) + "\n"),
                       ("MODEL_CARD.md", pretrained.card_markdown(card))):
        tmp = bundle / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(bundle / name)


if __name__ == "__main__":
    sys.exit(main())
