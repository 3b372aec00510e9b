"""The AMi-Br reader (crops + labels.csv), its prepare round trip and scanner splits."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from focas_keras.datasets.annotations import ICPR2012_MPP, IMAGE_COLUMNS, load_image
from focas_keras.datasets.prepare import PrepareConfig, prepare, split_slides
from focas_keras.datasets.readers import FORMATS, read_dataset
from focas_keras.datasets.readers.amibr import BOX_UM, read_amibr
from focas_keras.data import pipeline, records
from focas_keras.errors import InputError

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "ami_br"
HEADER = "file,dataset,slide,scanner,mpp,x,y,atypical,expert1_label,expert2_label"
XR, CS2, TUPAC = "Hamamatsu XR", "Aperio ScanScope CS2", "Aperio ScanScope (TUPAC16, TCGA-BRCA)"
# (file, dataset, slide, scanner, mpp, x, y)
ROWS = [
    ("MIDOG21_1.png", "MIDOG21", "002.tiff", XR, 0.23, 1000, 500),
    ("MIDOG21_2.png", "MIDOG21", "002.tiff", XR, 0.23, 1030, 480),  # inside _1's crop
    ("MIDOG21_3.png", "MIDOG21", "002.tiff", XR, 0.23, 1100, 500),  # 100 px away: outside
    ("MIDOG21_4.png", "MIDOG21", "120.tiff", CS2, 0.25, 1010, 505),  # other slide
    ("MIDOG21_5.png", "MIDOG21", "120.tiff", CS2, 0.25, 500, 500),
    ("MIDOG21_6.png", "MIDOG21", "120.tiff", CS2, 0.25, 564, 500),  # x - 64 = _5: at _6's 0
    ("TUPAC16_1.png", "TUPAC16", "002.tiff", TUPAC, 0.25, 1000, 500),  # same slide name
]


def write_amibr(root, rows=ROWS, extra_lines=(), skip_files=()):
    """A tiny AMi-Br layout: 128 px pink crops with a dark disc at the centre."""
    root = Path(root)
    (root / "patches").mkdir(parents=True, exist_ok=True)
    lines = [HEADER]
    for i, (name, dataset, slide, scanner, mpp, x, y) in enumerate(rows):
        lines.append(f'{name},{dataset},{slide},"{scanner}",{mpp},{x},{y},false,NMF,NMF')
        if name in skip_files:
            continue
        image = np.full((128, 128, 3), (230, 160, 200), np.uint8)
        image[:, :, 2] = np.uint8(150 + i)  # each crop distinct
        cv2.circle(image, (64, 64), 8, (60, 20, 90), -1)
        cv2.imwrite(str(root / "patches" / name), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    lines += list(extra_lines)
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture()
def amibr(tmp_path):
    return write_amibr(tmp_path / "amibr")


def figures(aset, image_id):
    rows = aset.annotations[aset.annotations.image_id == image_id]
    return sorted(zip(rows.x, rows.y))


def test_images_table_slides_scanners_and_mpp(amibr):
    aset = read_dataset("amibr", amibr)
    assert "amibr" in FORMATS and aset.fmt == "amibr"
    assert list(aset.images.columns) == IMAGE_COLUMNS
    table = aset.images.set_index("image_id")
    assert list(table.index) == sorted(Path(r[0]).stem for r in ROWS)
    assert table.loc["MIDOG21_1", "slide_id"] == "MIDOG21/002.tiff"
    assert table.loc["TUPAC16_1", "slide_id"] == "TUPAC16/002.tiff"  # unique per dataset
    assert table.loc["MIDOG21_1", "scanner"] == XR
    assert table.loc["MIDOG21_4", "scanner"] == CS2
    assert table.loc["TUPAC16_1", "dataset"] == "TUPAC16"
    assert table.loc["MIDOG21_1", "mpp"] == pytest.approx(0.23)
    assert table.loc["MIDOG21_5", "mpp"] == pytest.approx(0.25)
    assert (table.width == 128).all() and (table.height == 128).all()


def test_second_figure_inside_a_crop(amibr):
    aset = read_amibr(amibr)
    # _2 lies at (+30, -20) from _1 in the source image, so at (94, 44) in _1's crop; _3
    # (100 px away), _4 (other slide) and TUPAC16_1 (same slide name, other dataset) do not.
    assert figures(aset, "MIDOG21_1") == [(64.0, 64.0), (94.0, 44.0)]
    assert figures(aset, "MIDOG21_2") == [(34.0, 84.0), (64.0, 64.0)]
    assert figures(aset, "MIDOG21_3") == [(64.0, 64.0)]
    assert figures(aset, "MIDOG21_4") == [(64.0, 64.0)]
    assert figures(aset, "TUPAC16_1") == [(64.0, 64.0)]
    # The crop spans source x - 64 .. x + 63: _5 is at _6's column 0, _6 outside _5's crop.
    assert figures(aset, "MIDOG21_6") == [(0.0, 64.0), (64.0, 64.0)]
    assert figures(aset, "MIDOG21_5") == [(64.0, 64.0)]
    assert set(aset.annotations.label) == {"mitosis"}


def test_boxes_are_ten_microns_at_each_crops_pixel_size(amibr):
    aset = read_amibr(amibr)
    ann = aset.annotations.set_index(["image_id", "x", "y"])
    at_023 = ann.loc[("MIDOG21_1", 64.0, 64.0)]
    side = BOX_UM / 0.23  # 40 px at 0.2456 um/px = 9.824 um = 42.7 px at 0.23
    assert BOX_UM == pytest.approx(9.824)
    assert at_023.x2 - at_023.x1 == pytest.approx(side)
    assert at_023.y1 == pytest.approx(64 - side / 2)
    at_025 = ann.loc[("MIDOG21_4", 64.0, 64.0)]
    assert at_025.x2 - at_025.x1 == pytest.approx(BOX_UM / 0.25)
    edge = ann.loc[("MIDOG21_6", 0.0, 64.0)]  # clipped at the crop's left border
    assert edge.x1 == 0.0 and edge.x2 == pytest.approx(BOX_UM / 0.25 / 2)


def test_missing_labels_file(tmp_path):
    (tmp_path / "patches").mkdir()
    with pytest.raises(InputError, match=r"labels\.csv.*no labels\.csv"):
        read_amibr(tmp_path)


def test_missing_crop_names_the_line(tmp_path):
    root = write_amibr(tmp_path / "a", skip_files=("MIDOG21_3.png",))
    with pytest.raises(InputError, match=r"labels\.csv:4: crop patches/MIDOG21_3\.png not found"):
        read_amibr(root)


@pytest.mark.parametrize("line, message", [
    ("MIDOG21_9.png,MIDOG21,002.tiff,Hamamatsu XR,abc,1,2,false,a,b", "'mpp' is not a number"),
    ("MIDOG21_9.png,MIDOG21,002.tiff,Hamamatsu XR,0,1,2,false,a,b", "'mpp' must be > 0"),
    ("MIDOG21_9.png,MIDOG21,002.tiff", "3 fields, expected 10"),
    ("MIDOG21_1.png,MIDOG21,002.tiff,Hamamatsu XR,0.23,1,2,false,a,b",
     "duplicate file 'MIDOG21_1.png' \\(also line 2\\)"),
])
def test_bad_row_names_file_and_line(tmp_path, line, message):
    root = write_amibr(tmp_path / "a", extra_lines=(line,))
    with pytest.raises(InputError, match=rf"labels\.csv:9: {message}"):
        read_amibr(root)


def test_missing_column(tmp_path):
    root = write_amibr(tmp_path / "a")
    text = (root / "labels.csv").read_text().replace("scanner,", "")
    (root / "labels.csv").write_text(text)
    with pytest.raises(InputError, match=r"labels\.csv:1: missing column\(s\) scanner"):
        read_amibr(root)


def test_other_readers_have_unknown_scanner(tiny_icpr):
    aset = read_dataset("icpr2012", tiny_icpr[0])
    assert list(aset.images.columns) == IMAGE_COLUMNS
    assert set(aset.images.scanner) == {""} and set(aset.images.dataset) == {""}


CONFIG = PrepareConfig(patch_size=32, cls_per_mitosis=2, cls_jitter=0.0,
                       cls_background_per_image=2, val_scanners=(CS2,), seed=1)


def test_prepare_round_trip_keeps_slide_and_scanner_at_one_pixel_size(amibr, tmp_path):
    aset = read_amibr(amibr)
    manifest = prepare(aset, tmp_path / "shards", CONFIG)
    # Crops at 0.23 and 0.25 um/px are brought to the ICPR/stage pixel size by default.
    assert manifest["parameters"]["target_mpp"] == pytest.approx(ICPR2012_MPP)
    assert manifest["parameters"]["det_small_images"] == "skip"
    assert manifest["splits"]["val"]["slides"] == ["MIDOG21/120.tiff"]
    assert manifest["splits"]["val"]["scanners"] == [CS2]
    assert manifest["splits"]["train"]["scanners"] == [TUPAC, XR]
    # 128 px crops are smaller than a 224 px det tile: no det tiles by default.
    assert manifest["splits"]["train"]["det"]["records"] == 0
    assert manifest["splits"]["train"]["det"]["skipped_small_images"] == 4
    recs = pipeline.read_records(tmp_path / "shards", records.CLS, "train")
    by_image = {}
    for rec in recs:
        by_image.setdefault(rec["image_id"].decode(), []).append(rec)
    one = by_image["MIDOG21_1"]
    assert {r["slide_id"].decode() for r in one} == {"MIDOG21/002.tiff"}
    assert {r["scanner"].decode() for r in one} == {XR}
    assert {r["scanner"].decode() for r in by_image["TUPAC16_1"]} == {TUPAC}
    # Positives (no jitter) sit on the figures, scaled by 0.23 / 0.2456: the centred one at
    # 64 * 0.9365 = 59.9 -> 60 px and the second at (94, 44) * 0.9365 = (88.0, 41.2) px.
    centres = sorted(tuple(r["center"]) for r in one if r["label"] == 1)
    assert centres == [(60, 60), (60, 60), (88, 41), (88, 41)]
    # The patch is cut from the crop resized to 0.2456 um/px (128 -> 120 px).
    image = load_image(amibr / "patches" / "MIDOG21_1.png")
    resized = cv2.resize(image, (120, 120), interpolation=cv2.INTER_AREA)
    patch = next(r for r in one if tuple(r["center"]) == (60, 60))
    np.testing.assert_array_equal(patch["image"], resized[44:76, 44:76])
    val = pipeline.read_records(tmp_path / "shards", records.CLS, "val")
    assert {r["scanner"].decode() for r in val} == {CS2}


def test_prepare_pad_and_explicit_target(amibr, tmp_path):
    aset = read_amibr(amibr)
    config = PrepareConfig(tile_size=64, patch_size=32, cls_per_mitosis=1,
                           cls_background_per_image=0, det_tiles_per_mitosis=1,
                           det_empty_share=0.0, val_fraction=0.0, target_mpp=0.5,
                           det_small_images="pad")
    manifest = prepare(aset, tmp_path / "shards", config)
    assert manifest["parameters"]["target_mpp"] == 0.5
    train = manifest["splits"]["train"]["det"]
    # one tile per figure: 7 centred + 3 second figures (in _1, _2 and _6)
    assert train["skipped_small_images"] == 0 and train["records"] == 10


def test_val_scanners_errors(amibr, tiny_icpr):
    aset = read_amibr(amibr)
    slides = aset.images.slide_id
    scanner_of = dict(zip(aset.images.slide_id, aset.images.scanner))
    with pytest.raises(InputError, match="unknown validation scanner\\(s\\) Nope"):
        split_slides(slides, PrepareConfig(val_scanners=("Nope",)), scanner_of)
    with pytest.raises(InputError, match="every slide"):
        split_slides(slides, PrepareConfig(val_scanners=(XR, CS2, TUPAC)), scanner_of)
    both = split_slides(slides, PrepareConfig(val_scanners=(XR,),
                                              val_slides=("TUPAC16/002.tiff",)), scanner_of)
    assert both["val"] == ["MIDOG21/002.tiff", "TUPAC16/002.tiff"]
    icpr = read_dataset("icpr2012", tiny_icpr[0])
    with pytest.raises(InputError, match="records none"):
        split_slides(icpr.images.slide_id, PrepareConfig(val_scanners=(XR,)),
                     dict(zip(icpr.images.slide_id, icpr.images.scanner)))


def test_old_cls_records_read_with_empty_scanner():
    old = records.cls_example(b"png", 1, "mitosis", "a", "s", (1, 2))
    new = records.cls_example(b"png", 1, "mitosis", "a", "s", (1, 2), scanner=XR)
    import tensorflow as tf

    def scanner(serialized):
        return tf.io.parse_single_example(serialized, records.CLS_FEATURES)["scanner"].numpy()

    assert scanner(old) == b"" and scanner(new) == XR.encode()


def test_cli_prepare_amibr_with_val_scanners(amibr, tmp_path):
    from focas_keras.cli import main

    out = tmp_path / "cli"
    result = CliRunner().invoke(main, [
        "prepare", str(amibr), "--format", "amibr", "--out", str(out), "--patch-size", "32",
        "--cls-per-mitosis", "1", "--cls-background", "1", "--val-scanners", XR,
        "--val-scanners", TUPAC])
    assert result.exit_code == 0, result.output
    assert "MIDOG21/002.tiff" in result.output and "gave no det tiles" in result.output
    bad = CliRunner().invoke(main, ["prepare", str(amibr / "missing"), "--format", "amibr",
                                    "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "dataset directory not found" in bad.output


def test_real_labels_counts_per_scanner():
    if not (REAL / "labels.csv").is_file():
        pytest.skip(f"AMi-Br not found at {REAL}")
    from focas_keras.datasets.readers.amibr import crop_figures, read_labels

    rows = read_labels(REAL / "labels.csv")
    counts = {}
    for row in rows:
        counts[row["scanner"]] = counts.get(row["scanner"], 0) + 1
    assert sorted(counts.values()) == [451, 582, 688, 1999]
    assert counts[XR] == 451 and counts["Hamamatsu S360"] == 582 and counts[CS2] == 688
    assert counts[TUPAC] == 1999
    assert {round(r["mpp"], 2) for r in rows if r["scanner"] in (XR, "Hamamatsu S360")} == {0.23}
    assert {round(r["mpp"], 2) for r in rows if r["scanner"] in (CS2, TUPAC)} == {0.25}
    # Labels list every figure of the source images: 91 crops hold 96 further figures.
    figures = crop_figures(rows)
    assert sum(len(f) - 1 for f in figures.values()) == 96
    assert sum(len(f) > 1 for f in figures.values()) == 91
