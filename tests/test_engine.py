"""The inference engine: plan, read, run and assemble tiles; detect and slide results equal the
references written before the engine (tests/data/engine_reference/README.md).

Measured against the unrounded references (all four sources, the bundled model before its
`lite0` Mclass, this machine's CPU; the references were regenerated for the `lite0` model on
2026-12-07 and pass at the same tolerances): the same candidates in the same order; boxes within 5.0e-6 px and scores within 5.0e-10,
i.e. equal up to the references' 9 significant digits. The tolerances below leave room for
another CPU's float arithmetic.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras.inference import engine  # noqa: E402
from focas_keras.inference.tiling import TileGrid  # noqa: E402
from focas_keras.slides.tissue import TissueMap  # noqa: E402
from test_cascade import FakeCascade, _squares_image, _uncapped  # noqa: E402

REFERENCE = Path(__file__).parent / "data" / "engine_reference"
MPP = 0.2456
#: Largest difference to the references' unrounded scores (see the README there).
SCORE_TOL = 1e-5
#: ... and box coordinates (px).
BOX_TOL = 1e-3


class ArrayReader:
    """An in-memory one-level "slide" with the reader interface the engine needs."""

    def __init__(self, image, mpp=MPP, name="array"):
        self.image, self.mpp, self.name, self.path = image, mpp, name, Path(f"{name}.npy")
        self.height, self.width = image.shape[:2]
        self.level_dimensions, self.level_downsamples = [(self.width, self.height)], [1.0]
        self.reads = []

    def level_for_mpp(self, mpp):
        return 0

    def level_mpp(self, level):
        return self.mpp

    def read(self, x, y, width, height, level=0):
        self.reads.append((x, y, width, height))
        return self.image[y:y + height, x:x + width].copy()


def _fake(**settings):
    return FakeCascade(_uncapped(det_threshold=0.0, cls_threshold=0.7, mpp=MPP, **settings))


# --------------------------------------------------------------------------- plan


def test_plan_tiles_is_the_grid_and_skips_by_tissue():
    image = np.full((600, 900, 3), 230, np.uint8)  # 256 px tiles, overlap 32: 3 x 4 cells
    mask = np.zeros((60, 90), bool)  # 10 level-0 px per mask px; tissue in x < 300 only
    mask[:, :30] = True
    reader = ArrayReader(image)
    plan = engine.plan_tiles(reader, MPP, MPP, 64, 256, 32, TissueMap(mask, 0.1, 0.1),
                             min_tissue=0.01)
    grid = TileGrid(600, 900, 256, 32)
    assert plan.cells == tuple(grid.cells()) and len(plan.cells) == 12
    assert plan.grid().xs == grid.xs == [0, 224, 448, 644]
    # columns at x 0 and 224 hold tissue (the second: 76 of its 256 px); 448 and 644 none
    assert sorted(plan.skip) == [(r, c) for r in range(3) for c in (2, 3)]
    assert set(plan.skip.values()) == {0.0}
    assert plan.tissue[(0, 0)] == 1.0 and plan.tissue[(1, 1)] == pytest.approx(8 / 26)
    assert reader.reads == []  # planning reads no pixels
    everything = engine.plan_tiles(reader, MPP, MPP, 64, 256, 32)
    assert everything.skip == {} and set(everything.tissue.values()) == {1.0}
    assert pickle.loads(pickle.dumps(plan)) == plan  # a plan travels to workers


def test_plan_in_stage_pixels_and_level0_origins():
    reader = ArrayReader(np.zeros((1000, 1500, 3), np.uint8))
    plan = engine.plan_tiles(reader, 2 * MPP, MPP, 112, 256, 64)
    assert (plan.det.width, plan.det.height) == (750, 500)
    assert (plan.cls.width, plan.cls.height) == (1500, 1000)
    assert plan.to_level0 == (2.0, 2.0) and plan.size == (1500, 1000)
    assert plan.level0_origin(plan.cells[-1]) == (2 * (750 - 256), 2 * (500 - 256))


# --------------------------------------------------------------------------- run and assemble


def test_tiles_run_and_assemble_like_the_field_run():
    """read_tile -> run_tile -> assemble on a (fake) slide equals Cascade.run on the same
    pixels with the same tiles; records may arrive in any order, and batched tiles
    (run_tiles) give the same records."""
    image, _ = _squares_image(600, 760, seed=4, count=40)
    cascade = _fake(tile=256, overlap=32)
    expected = cascade.run(image)
    reader = ArrayReader(image)
    plan = engine.plan_tiles(reader, cascade.det_mpp, cascade.cls_mpp, cascade.patch,
                             256, 32)
    reads = {cell: engine.read_tile(reader, plan, cell) for cell in plan.cells}
    pixels, region, origin = reads[(1, 1)]
    margin = cascade.patch // 2 + 2  # half a crop and 2 px
    assert pixels.shape == (256, 256, 3) and origin == (224 - margin, 224 - margin)
    assert region.shape == (256 + 2 * margin, 256 + 2 * margin, 3)
    np.testing.assert_array_equal(pixels, image[224:480, 224:480])
    records = [engine.run_tile(cascade, plan, cell, *reads[cell]) for cell in plan.cells]
    assert json.loads(json.dumps(records)) == records  # journal lines
    assert {r["status"] for r in records} == {"done"}
    got = engine.assemble(cascade, plan, records[::-1])
    assert len(expected) >= 20 and 0 < expected["accepted"].sum() < len(expected)
    assert list(got.columns) == engine.RESULT_COLUMNS
    np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]], expected[["x1", "y1", "x2", "y2"]],
                               atol=1e-3)
    np.testing.assert_allclose(got["cls_score"], expected["cls_score"], atol=1e-6)
    assert (got["accepted"].to_numpy() == expected["accepted"].to_numpy()).all()
    cascade.batches.clear()
    batched = engine.run_tiles(cascade, [(plan, c, *reads[c]) for c in plan.cells])
    assert cascade.batches == [(len(plan.cells), 256, 256, 3)]  # one stage-1 call
    assert batched == records


def test_assemble_ignores_skipped_and_unreadable_tiles():
    image, _ = _squares_image(300, 300, seed=2, count=10)
    cascade = _fake(tile=256, overlap=32)
    reader = ArrayReader(image)
    plan = engine.plan_tiles(reader, MPP, MPP, cascade.patch, 256, 32)
    first = engine.run_tile(cascade, plan, (0, 0), *engine.read_tile(reader, plan, (0, 0)))
    others = [{"cell": [0, 1], "status": "skipped", "tissue": 0.0},
              {"cell": [1, 0], "status": "unreadable", "error": "bad"}]
    table = engine.assemble(cascade, plan, [first] + others)
    alone = engine.assemble(cascade, plan, [first])
    pd.testing.assert_frame_equal(table, alone)
    assert len(alone) == len(first["det"]) > 0  # no neighbour: nothing to merge
    empty = engine.assemble(cascade, plan, others)
    assert list(empty.columns) == engine.RESULT_COLUMNS and empty.empty


# --------------------------------------------------------------------------- references


def _reference(name):
    return pd.read_csv(REFERENCE / name)


def _check_exact(got: pd.DataFrame, want: pd.DataFrame):
    """Same candidates in the same order, same acceptance; boxes and scores within the
    tolerances."""
    assert len(got) == len(want)
    assert (got["accepted"].to_numpy(bool) == want["accepted"].to_numpy(bool)).all()
    np.testing.assert_allclose(got[["x1", "y1", "x2", "y2"]].to_numpy(np.float64),
                               want[["x1", "y1", "x2", "y2"]].to_numpy(np.float64), atol=BOX_TOL)
    for column in ("det_score", "cls_score"):
        np.testing.assert_allclose(got[column].to_numpy(np.float64),
                                   want[column].to_numpy(np.float64), atol=SCORE_TOL)


@pytest.fixture(scope="module")
def bundled():
    from focas_keras import pretrained

    return pretrained.load_cascade()


@pytest.mark.parametrize("tile", [0, 512])
def test_detect_on_real_fields_equals_the_reference(icpr_dir, bundled, tile):
    """Cascade.run (what detect runs) on two real fields, whole-image and in 512 px tiles."""
    from focas_keras.datasets.annotations import load_image
    from focas_keras.inference.cascade import Cascade
    from focas_keras.inference.outputs import detections_table

    name = "detect_whole" if tile == 0 else "detect_tile512"
    cascade = Cascade(bundled.det_model, bundled.det_config, bundled.cls_model,
                      bundled.cls_config, dataclasses.replace(bundled.settings, tile=tile),
                      bundled.cls_threshold, bundled.det_threshold, bundled.det_mpp,
                      bundled.cls_mpp)
    want = _reference(f"{name}_exact.csv")
    tables = []
    for image_id in want["image"].unique():
        table = cascade.run(load_image(icpr_dir / "images" / f"{image_id}.jpg"))
        _check_exact(table, want[want["image"] == image_id])
        tables.append(table.assign(image=image_id))
    # what detect writes, to the character
    written = detections_table(pd.concat(tables, ignore_index=True))
    assert written.to_csv(index=False, lineterminator="\n") == (
        REFERENCE / f"{name}.csv").read_text()


def check_slide_reference(out_dir: Path, name: str, cascade):
    """A slide's detections.csv and summary (in ``out_dir``) equal the reference ``name``, and
    its journal assembles to the unrounded reference (``cascade``: the bundled one)."""
    assert ((out_dir / "detections.csv").read_text()
            == (REFERENCE / f"slide_{name}.csv").read_text())
    summary = json.loads((out_dir / "summary.json").read_text())
    want = json.loads((REFERENCE / f"slide_{name}_summary.json").read_text())
    assert {k: v for k, v in summary.items() if k not in ("seconds", "path")} == want
    header, *records = [json.loads(line) for line in
                        (out_dir / "tiles.jsonl").read_text().splitlines()]
    from focas_keras.slides.reader import SlideReader

    with SlideReader.open(summary["path"]) as reader:
        plan = engine.plan_tiles(reader, cascade.det_mpp, cascade.cls_mpp, cascade.patch,
                                 header["tile"], header["overlap"])
    _check_exact(engine.assemble(cascade, plan, records),
                 _reference(f"slide_{name}_exact.csv"))


def _slide_cli(path: Path, out_dir: Path, *options):
    from focas_keras.cli import main

    result = CliRunner().invoke(main, ["slide", str(path), "--out", str(out_dir), *options])
    assert result.exit_code == 0, result.output


def test_slide_of_a_synthetic_slide_equals_the_reference(bundled, tmp_path):
    """`focas-keras slide --tile 512` (bundled model) on one synthetic H&E field on a white
    slide: the tissue mask skips the white tiles."""
    from focas_keras.datasets.slides import synthetic_slide, write_slide
    from focas_keras.datasets.synth import synthesize_image

    field = synthesize_image((1400, 1800), seed=7).image
    path = write_slide(tmp_path / "synthetic.svs",
                       synthetic_slide(2240, 4096, [(320, 384, field)]), MPP)
    _slide_cli(path, tmp_path / "out", "--tile", "512")
    check_slide_reference(tmp_path / "out" / "synthetic", "synthetic", bundled)
    summary = json.loads((tmp_path / "out" / "synthetic" / "summary.json").read_text())
    assert summary["tiles"]["skipped"] > 0


# The four-field mosaic's slide outputs are checked against their reference by
# test_slide_run.py::test_slide_of_four_real_fields_matches_detect (check_slide_reference), which
# runs `slide` on that very mosaic already.
