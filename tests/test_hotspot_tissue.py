"""The hotspot respects the tissue: only detections in the tissue mask count, a window larger
than the tissue gives the count over all tissue and no score, the window's polygon stays on the
slide, a flagged slide gets no score unless asked; and the real 20x skin slide is refused, or
flagged and unscored when forced."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras import domain  # noqa: E402
from focas_keras.cli import main  # noqa: E402
from focas_keras.slides import hotspot as hs  # noqa: E402
from focas_keras.slides import report  # noqa: E402
from focas_keras.slides.reader import SlideReader  # noqa: E402
from focas_keras.slides.run import SlideSettings, run_slide  # noqa: E402
from test_slide_run import TILE, _fake, _slide, _tissue_image  # noqa: E402

CMU = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides" / \
    "CMU-1-Small-Region.svs"


def test_clip_ring_to_the_slide():
    square = [[0, 0], [10, 0], [10, 10], [0, 10], [0, 0]]
    half = hs.clip_ring(square, 5, -1, 20, 20)
    assert hs.ring_area(half) == pytest.approx(50.0)
    assert hs.clip_ring(square, 20, 20, 30, 30) == []
    assert hs.ring_area(hs.clip_ring(square, -5, -5, 50, 50)) == pytest.approx(100.0)
    # a circle centred on the slide's corner keeps a quarter, every vertex on the slide
    ring = report.circle_ring(0.0, 0.0, 100.0, vertices=4096)
    quarter = hs.clip_ring(ring, 0, 0, 1000, 1000)
    assert hs.ring_area(quarter) == pytest.approx(math.pi * 100 ** 2 / 4, rel=1e-4)
    assert min(min(p) for p in quarter) >= 0.0 and quarter[0] == quarter[-1]


def test_window_larger_than_tissue_counts_all_tissue_without_score():
    h = report.hotspot_summary(None, 0.25, (4000, 4000), 2.0, 0.6, 80)
    assert not h["fits"] and h["window"] == "all tissue"
    assert h["count"] == 80 and h["area_mm2"] == 0.6 and h["per_mm2"] == pytest.approx(133.33,
                                                                                     abs=0.01)
    assert "smaller than the 2.00 mm2 window" in h["note"]
    qc = domain.qc_block(0.25, 0.2456, None, None, [], {domain.FLAG_SMALL_TISSUE: h["note"]})
    score = report.score_entry(h, qc, score_anyway=True)  # never scored, even when asked
    assert score["score"] is None and score["reason"] == h["note"]


def test_flagged_slide_gets_no_score_unless_asked():
    spot = hs.Hotspot(x_um=100.0, y_um=100.0, radius_um=hs.circle_radius_um(2.0), count=20,
                      members=tuple(range(20)))
    h = report.hotspot_summary(spot, 0.25, (40000, 40000), 2.0, 5.0, 30)
    assert h["fits"] and h["count"] == 20 and h["x_px"] == 400.0
    # centred 100 um from two edges: the window's part on the slide
    r = spot.radius_um
    inside = (math.pi * r * r / 4 + 2 * (100 * math.sqrt(r * r - 100 ** 2)
                                         + r * r * math.asin(100 / r)) / 2 + 100 * 100) / 1e6
    assert h["area_in_slide_mm2"] == pytest.approx(inside, rel=1e-3)
    clean = domain.qc_block(0.25, 0.2456, None, {"flag": False}, [])
    assert report.score_entry(h, clean)["score"] == 3  # 20 in 2 mm2 > 14.6
    flagged = domain.qc_block(0.25, 0.2456, None, {"flag": True, "reason": "far"}, [])
    withheld = report.score_entry(h, flagged)
    assert withheld["score"] is None and "--score-anyway" in withheld["reason"]
    given = report.score_entry(h, flagged, score_anyway=True)
    assert given["score"] == 3 and given["flagged"] == [domain.FLAG_STAIN]


def _with_squares_off_tissue():
    """The test slide's tissue (x < 832) plus three dark squares on the white glass beside it,
    in tiles that still run (x < 928): the fake cascade accepts them, the tissue mask does not
    hold them."""
    image = _tissue_image()
    for k, (x, y) in enumerate(((885, 100), (885, 400), (888, 700))):
        image[y:y + 16, x:x + 16] = 20 + 5 * k
    return image


def test_only_detections_in_the_tissue_are_counted(tmp_path):
    with SlideReader.open(_slide(tmp_path, _with_squares_off_tissue())) as reader:
        width, height = reader.width, reader.height
        small = run_slide(_fake(), reader, tmp_path / "small",
                          SlideSettings(tile=TILE, overlap=32, hotspot_mm2=0.01),
                          progress=False)
        anyway = run_slide(_fake(), reader, tmp_path / "anyway",
                           SlideSettings(tile=TILE, overlap=32, hotspot_mm2=0.01,
                                         score_anyway=True), progress=False)
        big = run_slide(_fake(), reader, tmp_path / "big",
                        SlideSettings(tile=TILE, overlap=32), progress=False)
    table = pd.read_csv(tmp_path / "small" / "detections.csv")
    off = table[table["x"] > 870]
    assert len(off) == 3 and off["accepted"].all() and not off["in_tissue"].any()
    assert not off["counted"].any()
    assert (table["counted"] == (table["accepted"] & table["in_tissue"])).all()
    counted = int(table["counted"].sum())
    outside = int((table["accepted"] & ~table["in_tissue"]).sum())  # the 3, and any square
    assert small["mitoses"] == counted > 0 and small["accepted_outside_tissue"] == outside >= 3
    assert small["counted_in"] == "tissue mask"
    assert small["per_mm2_tissue"] == pytest.approx(counted / small["tissue_mm2"], rel=2e-3)
    # the hotspot counts only tissue detections, and its polygon stays on the slide
    spot = small["hotspot"]
    assert spot["fits"] and 0 < spot["count"] <= counted
    assert spot["area_in_slide_mm2"] <= spot["area_mm2"] + 1e-9
    features = json.loads((tmp_path / "small" / "detections.geojson").read_text())["features"]
    window = [f for f in features if f["properties"]["classification"]["name"] == "Hotspot"]
    ring = np.array(window[0]["geometry"]["coordinates"][0])
    assert ring[:, 0].min() >= 0 and ring[:, 0].max() <= width
    assert ring[:, 1].min() >= 0 and ring[:, 1].max() <= height
    assert len(features) - 1 == counted  # the 3 off-tissue ones are not exported
    # dense fake 'mitoses' on 0.045 mm2: flagged, so no score unless asked
    assert small["qc"]["flags"] == [domain.FLAG_DENSITY]
    assert small["score"]["score"] is None and "--score-anyway" in small["score"]["reason"]
    assert anyway["score"]["score"] == 3 and anyway["score"]["flagged"] == [domain.FLAG_DENSITY]
    # the default 2 mm2 window is larger than the tissue: all tissue counted, no score
    assert not big["hotspot"]["fits"] and big["hotspot"]["count"] == counted
    assert big["hotspot"]["area_mm2"] == pytest.approx(big["tissue_mm2"], abs=1e-4)
    assert big["score"]["score"] is None and "smaller than" in big["score"]["reason"]
    assert domain.FLAG_SMALL_TISSUE in big["qc"]["flags"]
    text = report.summary_text(big, tmp_path / "big")
    assert "qc: FLAGGED" in text and f"{outside} accepted outside the tissue mask" in text
    assert "Nottingham mitosis score: none" in text


@pytest.fixture()
def cmu_slide():
    if not CMU.is_file():
        pytest.skip(f"the real 20x slide is not at {CMU}")
    return CMU


def test_real_20x_skin_slide_is_refused_before_models_load(cmu_slide, tmp_path):
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["slide", str(cmu_slide), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    error = result.output.strip().splitlines()[-1]
    assert "0.499 um/px, coarser than the model's 0.2456 um/px" in error
    assert "--allow-coarser" in error and str(cmu_slide) in error
    out = tmp_path / "o"
    assert not (out.exists() and any(out.iterdir()))  # nothing written
    assert time.perf_counter() - start < 20


def test_real_20x_skin_slide_forced_is_flagged_and_not_scored(cmu_slide, tmp_path):
    """A 480 x 480 px region of the real slide (its own pixels, 0.499 um/px; one 512 px Mdet
    tile) through the CLI with --allow-coarser and a window that fits its tissue: flagged, and
    no score although the window fits; the stain check puts it outside the bundled card."""
    from focas_keras.datasets.slides import write_slide

    with SlideReader.open(cmu_slide) as reader:
        region = reader.read(1000, 1300, 480, 480, 0)
        mpp = reader.mpp
    path = tmp_path / "cmu_region.svs"
    write_slide(path, region, mpp, tile=64, downsamples=(4,))
    out = tmp_path / "o"
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["slide", str(path), "--out", str(out), "--allow-coarser",
                                       "--hotspot-mm2", "0.02", "--no-tta", "--tile", "512"])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "cmu_region" / "summary.json").read_text())
    assert summary["hotspot"]["fits"] and summary["score"]["score"] is None
    assert "--score-anyway" in summary["score"]["reason"]
    flags = summary["qc"]["flags"]
    assert flags[:2] == [domain.FLAG_COARSER, domain.FLAG_STAIN], flags
    assert summary["qc"]["stain"]["distance"] > summary["qc"]["stain"]["limit"]
    row = pd.read_csv(out / "slides.csv").iloc[0]
    assert row["qc"].startswith("coarser_than_model;stain_outside_domain")
    assert pd.isna(row["score"])
    assert "qc: FLAGGED" in result.output and "Nottingham mitosis score: none" in result.output
    print(f"forced CMU region: {seconds:.1f} s")
