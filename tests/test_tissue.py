"""Tissue mask and TissueMap on drawn slides with known areas."""

import math

import cv2
import numpy as np
import pytest

from focas_keras.datasets.slides import write_slide
from focas_keras.errors import InputError
from focas_keras.slides.reader import SlideReader
from focas_keras.slides.tissue import TissueMap, save_mask_png, tissue_map, tissue_mask

MPP = 1.0  # level 0, um/px
SIZE = 1024  # px, level 0
CENTRE = (512, 512)  # (x, y) px
AXES_UM = (350.0, 225.0)  # ellipse semi-axes
HOLE_UM = 100.0  # radius of the white hole in the blob's middle
SPECK = (875, 150, 60)  # x, y, side (px): a 60 x 60 um square, below 20000 um2


def _white(shape, rng):
    return np.clip(rng.normal(248, 3, shape), 0, 255).astype(np.uint8)


def _drawn_slide(seed=0):
    """White (noisy) slide, an H&E-pink textured ellipse with a white hole, a pink speck."""
    rng = np.random.default_rng(seed)
    image = _white((SIZE, SIZE, 3), rng)
    pink = np.clip(rng.normal((215, 135, 190), 18, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    drawn = np.zeros((SIZE, SIZE), np.uint8)
    axes_px = (round(AXES_UM[0] / MPP), round(AXES_UM[1] / MPP))
    cv2.ellipse(drawn, CENTRE, axes_px, 0, 0, 360, 1, -1)
    cv2.circle(drawn, CENTRE, round(HOLE_UM / MPP), 0, -1)
    x, y, side = SPECK
    drawn[y:y + side, x:x + side] = 1
    image[drawn == 1] = pink[drawn == 1]
    return image


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("tissue") / "blob.svs"
    # Levels at 2 and 16 um/px: the 8 um/px thumbnail is level 1 area-resized by 4.
    return write_slide(path, _drawn_slide(), MPP, downsamples=(2, 16))


def _ellipse_mm2():
    return math.pi * AXES_UM[0] * AXES_UM[1] / 1e6


def _hole_mm2():
    return math.pi * HOLE_UM**2 / 1e6


def test_white_slide_is_empty():
    rng = np.random.default_rng(1)
    white = _white((256, 320, 3), rng)
    mask = tissue_mask(white, 8.0)
    assert mask.dtype == bool and mask.shape == (256, 320) and not mask.any()
    assert TissueMap(mask, 1 / 16, 1 / 16).area_mm2(MPP) == 0.0
    assert not tissue_mask(np.full((64, 64, 3), 255, np.uint8), 8.0).any()


def test_blob_area_hole_and_speck(slide):
    hole_xy = np.array([CENTRE], float)
    speck_xy = np.array([[SPECK[0] + SPECK[2] / 2, SPECK[1] + SPECK[2] / 2]])
    with SlideReader.open(slide) as reader:
        tissue = tissue_map(reader, 8.0)
        assert tissue.mask.shape == (128, 128)
        assert tissue.scale_x == tissue.scale_y == 1 / 8
        assert tissue.area_mm2(reader.mpp) == pytest.approx(_ellipse_mm2(), rel=0.05)
        assert tissue.contains(hole_xy).all()  # the hole is filled
        assert not tissue.contains(speck_xy).any()  # the speck is removed

        holed = tissue_map(reader, 8.0, fill_holes=False)
        assert not holed.contains(hole_xy).any()
        assert holed.area_mm2(reader.mpp) == pytest.approx(_ellipse_mm2() - _hole_mm2(),
                                                           rel=0.05)
        with_specks = tissue_map(reader, 8.0, min_area_um2=0.0)
        assert with_specks.contains(speck_xy).all()


def test_tissue_map_fraction_contains_area():
    mask = np.zeros((10, 20), bool)
    mask[2:6, 4:10] = True  # level-0 x in [40, 100), y in [20, 60)
    tissue = TissueMap(mask, 0.1, 0.1)
    assert tissue.fraction(40, 20, 100, 60) == 1.0
    assert tissue.fraction(0, 0, 200, 100) == pytest.approx(24 / 200)
    assert tissue.fraction(35, 20, 45, 30) == 0.5  # mask columns 3 and 4, partly covered
    assert tissue.fraction(50, 50, 50, 60) == 0.0  # empty
    assert tissue.fraction(1000, 1000, 1100, 1100) == 0.0  # outside
    # Clipped to the mask (rows 5-9, columns 9-19), of which only pixel (5, 9) is tissue.
    assert tissue.fraction(90, 50, 300, 300) == pytest.approx(1 / 55)
    points = np.array([[45, 25], [40, 20], [39.9, 25], [99.9, 59.9], [100, 25], [-1, 25],
                       [1e6, 0], [np.nan, 30]])
    np.testing.assert_array_equal(tissue.contains(points),
                                  [True, True, False, True, False, False, False, False])
    assert tissue.contains(np.zeros((0, 2))).shape == (0,)
    assert tissue.area_mm2(0.5) == pytest.approx(24 * 25 / 1e6)


def test_save_mask_png(tmp_path):
    mask = np.zeros((30, 40), bool)
    mask[5:10, 8:20] = True
    path = tmp_path / "mask.png"
    save_mask_png(mask, path)
    back = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask.astype(np.uint8) * 255)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.png"]
    with pytest.raises(InputError, match="tissue mask"):
        save_mask_png(mask, tmp_path / "missing_dir" / "mask.png")


def test_pale_and_strong_stains_covering_most_of_the_slide_are_both_tissue():
    """Otsu alone would split the two stains (saturation ~0.3 vs ~0.6) when they cover most of
    the image; the threshold's ceiling keeps both, and the glass strip stays background."""
    rng = np.random.default_rng(1)
    image = _white((512, 768, 3), rng)
    image[:, :352] = np.clip(rng.normal((200, 80, 150), 6, (512, 352, 3)), 0, 255)  # S ~0.6
    image[:, 352:704] = np.clip(rng.normal((235, 165, 215), 6, (512, 352, 3)), 0, 255)  # ~0.3
    mask = tissue_mask(image, 2.0)
    assert mask[:, :700].mean() > 0.99
    assert mask[:, 720:].mean() < 0.01
