"""ICPR 2012 reader: the real files in ../shared and the bad-input cases."""

import numpy as np
import pytest

from focas_keras.datasets.annotations import ANNOTATION_COLUMNS, IMAGE_COLUMNS, MITOSIS
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.readers.icpr2012 import parse_icpr_csv, read_icpr2012
from focas_keras.errors import InputError


def test_real_icpr_test_set(icpr_dir):
    aset = read_icpr2012(icpr_dir / "images")
    assert list(aset.images.columns) == IMAGE_COLUMNS
    assert list(aset.annotations.columns) == ANNOTATION_COLUMNS
    assert len(aset.images) == 15 and len(aset.annotations) == 101
    assert set(aset.images.width) == {2084} and set(aset.images.height) == {2084}
    per_slide = aset.annotations.groupby("slide_id").size().to_dict()
    assert per_slide == {"A00": 8, "A01": 24, "A02": 11, "A03": 40, "A04": 18}
    assert set(aset.annotations.label) == {MITOSIS}
    assert np.allclose(aset.annotations.mpp, 0.2456)
    # Centroid-only lines: the centroid itself, a 40 px square box, no pixel list.
    first = aset.annotations[aset.annotations.image_id == "A00_00"].sort_values("x").iloc[0]
    assert (first.x, first.y) == (113.0, 1635.0)
    assert (first.x1, first.y1, first.x2, first.y2) == (93.0, 1615.0, 133.0, 1655.0)
    assert first.pixels is None


def test_real_icpr_matches_centroid_table(icpr_dir):
    import pandas as pd

    table = pd.read_csv(icpr_dir / "centroids.csv")
    aset = read_icpr2012(icpr_dir / "images")
    got = sorted(zip(aset.annotations.image_id, aset.annotations.x, aset.annotations.y))
    want = sorted(zip(table.image, table.x.astype(float), table.y.astype(float)))
    assert got == want


def test_official_full_pixel_lists(icpr_dir):
    samples = icpr_dir / "official_format_samples"
    a01 = parse_icpr_csv(samples / "A00_01.csv")
    a02 = parse_icpr_csv(samples / "A00_02.csv")
    assert len(a01) == 5 and len(a02) == 2
    widths = [obj["x2"] - obj["x1"] for _, obj in a01 + a02]
    heights = [obj["y2"] - obj["y1"] for _, obj in a01 + a02]
    assert min(widths + heights) >= 26 and max(widths + heights) <= 68
    line, obj = a01[0]
    assert line == 1
    pixels = obj["pixels"]
    assert obj["x"] == pytest.approx(pixels[:, 0].mean())
    assert obj["y"] == pytest.approx(pixels[:, 1].mean())
    assert obj["x1"] == pixels[:, 0].min() and obj["x2"] == pixels[:, 0].max() + 1
    raw = np.array(
        (samples / "A00_01.csv").read_text().splitlines()[0].split(","), int).reshape(-1, 2)
    assert len(pixels) == len(raw) == 723
    assert (obj["x1"], obj["y1"], obj["x2"], obj["y2"]) == (
        raw[:, 0].min(), raw[:, 1].min(), raw[:, 0].max() + 1, raw[:, 1].max() + 1)


def test_tiny_dataset_boxes_and_slides(tiny_icpr):
    root, truth = tiny_icpr
    aset = read_dataset("icpr2012", root, box_size=30)
    assert len(aset.images) == 6
    assert sorted(aset.images.slide_id.unique()) == ["A00", "A01", "A02"]
    for image_id, boxes in truth.items():
        rows = aset.annotations[aset.annotations.image_id == image_id]
        got = sorted(map(tuple, rows[["x1", "y1", "x2", "y2"]].to_numpy().tolist()))
        assert got == sorted(map(tuple, np.asarray(boxes, float).tolist()))
    # The empty CSV: an image with zero mitoses, still listed.
    assert "A00_01" in set(aset.images.image_id)
    assert (aset.annotations.image_id == "A00_01").sum() == 0


def test_centroid_box_size_and_clipping(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "B01_00.png"), np.full((100, 100, 3), 200, np.uint8))
    (tmp_path / "B01_00.csv").write_text("50,50\n5,95\n")
    aset = read_icpr2012(tmp_path, box_size=20)
    rows = aset.annotations.sort_values("x")
    assert tuple(rows.iloc[0][["x1", "y1", "x2", "y2"]]) == (0.0, 85.0, 15.0, 100.0)
    assert tuple(rows.iloc[1][["x1", "y1", "x2", "y2"]]) == (40.0, 40.0, 60.0, 60.0)


@pytest.mark.parametrize("content, line, needle", [
    ("10,20,30\n", 1, "odd number"),
    ("10,20\n10,abc\n", 2, "not a number"),
    ("10,20\n\n500,20\n", 3, "outside"),
    ("10.5,20,11,20\n", 1, "integer"),
])
def test_bad_csv_lines_name_file_and_line(tmp_path, content, line, needle):
    import cv2

    cv2.imwrite(str(tmp_path / "C00_00.png"), np.full((100, 120, 3), 200, np.uint8))
    (tmp_path / "C00_00.csv").write_text(content)
    with pytest.raises(InputError) as err:
        read_icpr2012(tmp_path)
    assert f"C00_00.csv:{line}:" in str(err.value) and needle in str(err.value)


def test_missing_annotation_file_is_an_error(tmp_path):
    import cv2

    cv2.imwrite(str(tmp_path / "C00_00.png"), np.full((50, 50, 3), 200, np.uint8))
    with pytest.raises(InputError, match=r"C00_00\.png: missing annotation file C00_00\.csv"):
        read_icpr2012(tmp_path)


def test_duplicate_stems_are_refused(tmp_path):
    import cv2

    for ext in ("png", "bmp"):
        cv2.imwrite(str(tmp_path / f"C00_00.{ext}"), np.full((50, 50, 3), 200, np.uint8))
    (tmp_path / "C00_00.csv").write_text("")
    with pytest.raises(InputError, match="duplicate image stem 'C00_00'"):
        read_icpr2012(tmp_path)


def test_empty_directory_and_unknown_format(tmp_path):
    with pytest.raises(InputError, match="no images"):
        read_icpr2012(tmp_path)
    with pytest.raises(InputError, match="unknown dataset format"):
        read_dataset("voc", tmp_path)
