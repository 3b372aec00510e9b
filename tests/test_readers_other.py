"""GZMH, COCO and CSV readers on tiny hand-made datasets, and their bad-input cases."""

import json

import cv2
import numpy as np
import pytest

from focas_keras.datasets.annotations import ANNOTATION_COLUMNS, HARD_NEGATIVE, IMAGE_COLUMNS, MITOSIS
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.readers.coco import read_coco
from focas_keras.datasets.readers.csv_table import read_csv_table
from focas_keras.datasets.readers.gzmh import gzmh_slide_id, read_gzmh
from focas_keras.errors import InputError


def _image(path, width=96, height=80, value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((height, width, 3), value, np.uint8))
    return path


def _errors(call, *needles):
    with pytest.raises(InputError) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    return str(info.value)


# ---------------------------------------------------------------- GZMH


@pytest.fixture()
def gzmh(tmp_path):
    """GZMH dataset: S1_a (two blobs, one 8-connected via a diagonal, plus a speck),
    S1-b (0/1 three-channel BMP mask, one blob), c2 (JPEG image and mask, no blob)."""
    root = tmp_path / "gzmh"
    _image(root / "image" / "S1_a.png", 120, 100)
    mask = np.zeros((100, 120), np.uint8)
    mask[10:20, 30:36] = 255                 # 6x10 rectangle
    mask[50:53, 60:63] = 255                 # 3x3 square ...
    mask[53:56, 63:66] = 255                 # ... touching another 3x3 at a corner
    mask[90:92, 5:7] = 255                   # 4-pixel speck, below min_area
    (root / "label").mkdir()
    cv2.imwrite(str(root / "label" / "S1_a.png"), mask)
    _image(root / "image" / "S1-b.png", 64, 64)
    mask01 = np.zeros((64, 64, 3), np.uint8)
    mask01[40:44, 8:12] = 1
    cv2.imwrite(str(root / "label" / "S1-b.bmp"), mask01)
    _image(root / "image" / "c2.jpg", 64, 64)
    cv2.imwrite(str(root / "label" / "c2.jpg"), np.zeros((64, 64), np.uint8))
    return root


def test_gzmh_objects(gzmh):
    aset = read_gzmh(gzmh, mpp=0.5)
    assert list(aset.images.columns) == IMAGE_COLUMNS
    assert list(aset.annotations.columns) == ANNOTATION_COLUMNS
    assert aset.fmt == "gzmh"
    assert list(aset.images.image_id) == ["S1-b", "S1_a", "c2"]
    assert list(aset.images.slide_id) == ["S1", "S1", "c2"]
    assert list(aset.images.width) == [64, 120, 64]
    ann = aset.annotations
    assert len(ann) == 3 and set(ann.label) == {MITOSIS} and set(ann.mpp) == {0.5}
    rect = ann[ann.image_id == "S1_a"].iloc[0]
    assert (rect.x, rect.y) == (32.5, 14.5)
    assert (rect.x1, rect.y1, rect.x2, rect.y2) == (30, 10, 36, 20)
    assert rect.pixels.shape == (60, 2) and rect.pixels.dtype == np.int32
    assert {tuple(p) for p in rect.pixels} == {(x, y) for x in range(30, 36)
                                               for y in range(10, 20)}
    diag = ann[ann.image_id == "S1_a"].iloc[1]
    assert (diag.x, diag.y) == (62.5, 52.5)
    assert (diag.x1, diag.y1, diag.x2, diag.y2) == (60, 50, 66, 56)
    assert len(diag.pixels) == 18
    small = ann[ann.image_id == "S1-b"].iloc[0]
    assert (small.x, small.y, small.x1, small.y2) == (9.5, 41.5, 8, 44)
    assert small.slide_id == "S1"


def test_gzmh_min_area_and_dispatch(gzmh):
    assert len(read_gzmh(gzmh, min_area=1).annotations) == 4
    assert len(read_gzmh(gzmh, min_area=17).annotations) == 2
    assert len(read_dataset("gzmh", gzmh, box_size=40).annotations) == 3


def test_gzmh_jpeg_mask_threshold(tmp_path):
    root = tmp_path / "g"
    _image(root / "image" / "j.png", 64, 64)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 255
    (root / "label").mkdir()
    cv2.imwrite(str(root / "label" / "j.jpg"), mask, [cv2.IMWRITE_JPEG_QUALITY, 30])
    ann = read_gzmh(root).annotations
    assert len(ann) == 1
    assert ann.x[0] == pytest.approx(29.5, abs=0.5) and ann.y[0] == pytest.approx(29.5, abs=0.5)


def test_gzmh_slide_id():
    assert gzmh_slide_id("S03_0012") == "S03"
    assert gzmh_slide_id("case7-a_b") == "case7"
    assert gzmh_slide_id("plain") == "plain"
    assert gzmh_slide_id("_odd") == "_odd"


def test_gzmh_errors(gzmh, tmp_path):
    _errors(lambda: read_gzmh(tmp_path / "nowhere"), "nowhere")
    (tmp_path / "empty").mkdir()
    _errors(lambda: read_gzmh(tmp_path / "empty"), "empty/image", "not found")
    _image(tmp_path / "empty" / "image" / "x.png")
    _errors(lambda: read_gzmh(tmp_path / "empty"), "empty/label", "not found")
    (gzmh / "label" / "c2.jpg").unlink()
    _errors(lambda: read_gzmh(gzmh), "c2.jpg", "mask is missing")
    cv2.imwrite(str(gzmh / "label" / "c2.png"), np.zeros((64, 65), np.uint8))
    _errors(lambda: read_gzmh(gzmh), "c2.png", "65x64", "64x64")
    cv2.imwrite(str(gzmh / "label" / "c2.png"), np.zeros((64, 64), np.uint8))
    assert len(read_gzmh(gzmh).images) == 3
    _image(gzmh / "image" / "c2.bmp", 64, 64)
    _errors(lambda: read_gzmh(gzmh), "duplicate image stem 'c2'")
    (gzmh / "image" / "c2.bmp").unlink()
    (gzmh / "label" / "S1-b.bmp").write_bytes(b"not an image at all")
    _errors(lambda: read_gzmh(gzmh), "S1-b.bmp")


# ---------------------------------------------------------------- COCO


def _coco(tmp_path, **changes):
    """MIDOG-like JSON in tmp_path/coco.json, images in tmp_path/images/."""
    _image(tmp_path / "images" / "001.tiff", 200, 150)
    _image(tmp_path / "images" / "002.tiff", 100, 100)
    data = {
        "images": [{"id": 1, "file_name": "001.tiff", "width": 200, "height": 150},
                   {"id": 2, "file_name": "002.tiff", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "Mitotic figure"},
                       {"id": 2, "name": "hard_negative"},
                       {"id": 3, "name": "Non-mitotic figure"}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [10, 20, 50, 50]},
            {"id": 11, "image_id": 1, "category_id": 2, "bbox": [170, 100, 50, 40]},
            {"id": 12, "image_id": 1, "category_id": 3, "bbox": [100, 50, 20, 30]},
        ],
    }
    data.update(changes)
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def test_coco_reads_midog_style(tmp_path):
    aset = read_coco(_coco(tmp_path), mpp=0.25)
    assert aset.fmt == "coco"
    images = aset.images
    assert list(images.image_id) == ["001", "002"]
    assert list(images.slide_id) == ["001", "002"]
    assert list(images.width) == [200, 100] and list(images.height) == [150, 100]
    assert images.image_path[0] == str(tmp_path / "images" / "001.tiff")
    ann = aset.annotations                   # sorted by image, then y, x
    assert list(ann.label) == [MITOSIS, HARD_NEGATIVE, HARD_NEGATIVE]
    first = ann.iloc[0]
    assert (first.x, first.y, first.x1, first.y1, first.x2, first.y2) == (35, 45, 10, 20, 60, 70)
    assert first.pixels is None and first.mpp == 0.25
    assert (ann.x[1], ann.y[1]) == (110, 65)
    border = ann.iloc[2]                     # crosses the right border: clipped
    assert (border.x, border.y) == (195, 120)
    assert (border.x1, border.y1, border.x2, border.y2) == (170, 100, 200, 140)
    assert set(ann.image_id) == {"001"}      # 002 listed without objects


def test_coco_clips_border_boxes_and_xyxy(tmp_path):
    ann = [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [180, 130, 30, 10]}]
    aset = read_coco(_coco(tmp_path, annotations=ann), image_root=tmp_path / "images")
    row = aset.annotations.iloc[0]
    assert (row.x, row.y) == (195, 135)
    assert (row.x1, row.y1, row.x2, row.y2) == (180, 130, 200, 140)
    ann = [{"id": 5, "image_id": 2, "category_id": 1, "bbox": [10, 20, 60, 40]}]
    row = read_coco(_coco(tmp_path, annotations=ann), bbox_format="xyxy").annotations.iloc[0]
    assert (row.x, row.y, row.x1, row.y1, row.x2, row.y2) == (35, 30, 10, 20, 60, 40)
    assert len(read_dataset("coco", _coco(tmp_path, annotations=[])).images) == 2


def test_coco_image_root_directly(tmp_path):
    path = _coco(tmp_path)
    other = tmp_path / "elsewhere"
    other.mkdir()
    moved = path.rename(other / "coco.json")
    aset = read_coco(moved, image_root=tmp_path / "images")
    assert aset.images.image_path[1] == str(tmp_path / "images" / "002.tiff")
    _errors(lambda: read_coco(moved), "coco.json", "image file not found",
            str(other / "001.tiff"))


@pytest.mark.parametrize("changes, needles", [
    ({"annotations": [{"id": 7, "image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5]}]},
     ["annotation 7", "unknown image id 9"]),
    ({"annotations": [{"id": 7, "image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]}]},
     ["annotation 7", "unknown category id 4"]),
    ({"annotations": [{"id": 8, "image_id": 2, "category_id": 1, "bbox": [90, 90, 30, 30]}]},
     ["annotation 8", "outside the 100x100 image 002"]),
    ({"annotations": [{"id": 8, "image_id": 2, "category_id": 1, "bbox": [-40, 5, 30, 30]}]},
     ["annotation 8", "outside"]),
    ({"annotations": [{"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, 10, 0, 5]}]},
     ["annotation 3", "non-positive size"]),
    ({"annotations": [{"id": 3, "image_id": 2, "category_id": 1, "bbox": [10, "a", 5, 5]}]},
     ["annotation 3", "4 numbers"]),
    ({"annotations": [{"image_id": 2, "category_id": 1}]}, ["annotations[0]", "'bbox'"]),
    ({"categories": [{"id": 1, "name": "tumour cell"}]},
     ["unknown category name 'tumour cell'", "mitotic figure", "hard negative"]),
    ({"images": [{"id": 1, "file_name": "001.tiff", "height": 5}]}, ["images[0]", "'width'"]),
    ({"images": [{"id": 1, "file_name": "001.tiff", "width": 0, "height": 5}]},
     ["positive integer"]),
    ({"images": [{"id": 1, "file_name": "001.tiff", "width": 200, "height": 150},
                 {"id": 2, "file_name": "sub/001.png", "width": 9, "height": 9}]},
     ["duplicate image stem '001'"]),
    ({"images": [{"id": 1, "file_name": "001.tiff", "width": 200, "height": 150},
                 {"id": 1, "file_name": "002.tiff", "width": 100, "height": 100}]},
     ["duplicate image id 1"]),
    ({"images": [{"id": 1, "file_name": "gone.tiff", "width": 200, "height": 150}]},
     ["image file not found", "gone.tiff"]),
])
def test_coco_errors(tmp_path, changes, needles):
    path = _coco(tmp_path, **changes)
    _errors(lambda: read_coco(path), "coco.json", *needles)


def test_coco_missing_keys_and_bad_json(tmp_path):
    path = _coco(tmp_path)
    data = json.loads(path.read_text())
    del data["categories"]
    path.write_text(json.dumps(data))
    _errors(lambda: read_coco(path), "coco.json", "missing key 'categories'")
    path.write_text('{\n  "images": [],\n  "categories": [,]\n}\n')
    message = _errors(lambda: read_coco(path), "coco.json:3: invalid JSON")
    assert "Expecting value" in message
    _errors(lambda: read_coco(tmp_path / "nope.json"), "nope.json", "not found")
    _errors(lambda: read_coco(_coco(tmp_path), bbox_format="cxcywh"), "bbox format")


# ---------------------------------------------------------------- CSV


@pytest.fixture()
def csv_images(tmp_path):
    """Images a.png (120x100), b.bmp (80x60), sub/c.jpg (64x64) under tmp_path/img."""
    root = tmp_path / "img"
    _image(root / "a.png", 120, 100)
    _image(root / "b.bmp", 80, 60)
    _image(root / "sub" / "c.jpg", 64, 64)
    return root


def _csv(root, text, name="table.csv"):
    path = root / name
    path.write_text(text)
    return path


def test_csv_table(csv_images):
    path = _csv(csv_images, "image,x,y,label,note\n"
                            "a,50,40,,first\n"
                            "a.png,10,95,Hard-Negative,\n"
                            "\n"
                            "b,70.5,30,1,\n"
                            "sub/c.jpg,,,,no objects\n"
                            "b.bmp,5,5,0,\n")
    aset = read_csv_table(path, mpp=0.3, box_size=20)
    assert aset.fmt == "csv"
    assert list(aset.images.image_id) == ["a", "b", "c"]
    assert list(aset.images.slide_id) == ["a", "b", "c"]
    assert list(aset.images.width) == [120, 80, 64]
    assert aset.images.image_path[2] == str(csv_images / "sub" / "c.jpg")
    ann = aset.annotations
    assert list(zip(ann.image_id, ann.x, ann.y, ann.label)) == [
        ("a", 50, 40, MITOSIS), ("a", 10, 95, HARD_NEGATIVE),
        ("b", 5, 5, HARD_NEGATIVE), ("b", 70.5, 30, MITOSIS)]
    assert (ann.x1[0], ann.y1[0], ann.x2[0], ann.y2[0]) == (40, 30, 60, 50)
    assert (ann.x1[1], ann.y1[1], ann.x2[1], ann.y2[1]) == (0, 85, 20, 100)     # clipped
    assert (ann.x1[3], ann.y1[3], ann.x2[3], ann.y2[3]) == (60.5, 20, 80, 40)
    assert set(ann.mpp) == {0.3} and ann.pixels.isna().all()


def test_csv_slide_column_and_rules(csv_images, tmp_path):
    path = _csv(csv_images, "X,Y,Image,Slide\n1,2,a,P1\n3,4,b,\n5,6,sub/c,P2\n")
    aset = read_csv_table(path)
    assert list(aset.images.slide_id) == ["P1", "b", "P2"]
    root = tmp_path / "rules"
    _image(root / "A03_01.png", 64, 64)
    _image(root / "S7-2.png", 64, 64)
    path = _csv(root, "image,x,y\nA03_01,1,1\nS7-2,1,1\n")
    assert list(read_csv_table(path, slide_from="icpr").images.slide_id) == ["A03", "S7-"]
    assert list(read_csv_table(path, slide_from="prefix").images.slide_id) == ["A03", "S7"]
    _errors(lambda: read_csv_table(path, slide_from="folder"), "slide rule")
    path = _csv(csv_images, "image,x,y,slide\na,1,1,P1\na,2,2,P2\n")
    _errors(lambda: read_csv_table(path), "table.csv:3", "P2")


def test_csv_image_root_and_dispatch(csv_images, tmp_path):
    path = _csv(tmp_path, "image,x,y\na,1,1\nsub/c.jpg,3,3\n")
    aset = read_dataset("csv", path, image_root=csv_images, mpp=0.5, box_size=10)
    assert list(aset.images.image_id) == ["a", "c"] and set(aset.annotations.mpp) == {0.5}
    assert aset.annotations.x2[0] == 6


@pytest.mark.parametrize("text, line, needles", [
    ("image,x\na,1\n", 1, ["missing header column", "y"]),
    ("", 1, ["empty CSV"]),
    ("image,x,y\na,1,2\na,one,2\n", 3, ["x is not a number: 'one'"]),
    ("image,x,y\na,1,nan\n", 2, ["y is not a number"]),
    ("image,x,y\na,1,\n", 2, ["y is not a number"]),
    ("image,x,y\na,120,5\n", 2, ["(120, 5) outside the 120x100 image"]),
    ("image,x,y\nb,-1,5\n", 2, ["outside the 80x60 image"]),
    ("image,x,y,label\na,1,1,mitosis\n\nb,1,1,tumour\n", 4, ["unknown label 'tumour'"]),
    ("image,x,y\na,1,1\nzzz,1,1\n", 3, ["image file not found: 'zzz'"]),
    ("image,x,y\n,1,1\n", 2, ["empty image name"]),
    ('image,x,y\n"a,1,1\n', 2, ["malformed CSV"]),
])
def test_csv_errors(csv_images, text, line, needles):
    path = _csv(csv_images, text)
    _errors(lambda: read_csv_table(path), f"table.csv:{line}:", *needles)


def test_csv_image_problems(csv_images):
    _image(csv_images / "a.jpg", 10, 10)
    path = _csv(csv_images, "image,x,y\nb,1,1\na,1,1\n")
    _errors(lambda: read_csv_table(path), "table.csv:3:", "ambiguous", "a.jpg", "a.png")
    _image(csv_images / "other" / "b.png", 10, 10)
    path = _csv(csv_images, "image,x,y\nb,1,1\nother/b.png,1,1\n")
    _errors(lambda: read_csv_table(path), "table.csv:3:", "duplicate image stem 'b'")
    (csv_images / "bad.png").write_bytes(b"\x89PNG garbage")
    path = _csv(csv_images, "image,x,y\nbad.png,1,1\n")
    _errors(lambda: read_csv_table(path), "table.csv:2:", "bad.png")
    _errors(lambda: read_csv_table(csv_images / "none.csv"), "none.csv", "not found")
