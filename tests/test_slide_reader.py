"""SlideReader on small tifffile-written slides: levels, pixel size, exact reads, errors."""

import math
import os

import cv2
import numpy as np
import openslide
import pytest

from focas_keras.datasets.slides import synthetic_slide, write_slide
from focas_keras.errors import InputError
from focas_keras.slides import reader as reader_mod
from focas_keras.slides.reader import (
    SlideReader,
    SlideReadError,
    pixel_size_from_properties,
)

MPP = 0.2456
HEIGHT, WIDTH = 1024, 1536


def _image(seed=0):
    """A 1024 x 1536 white slide with a textured pink 'tissue' field (every pixel distinct
    enough that a wrong offset or a lossy read shows)."""
    rng = np.random.default_rng(seed)
    field = np.clip(rng.normal((215, 130, 185), 20, (500, 700, 3)), 0, 255).astype(np.uint8)
    return synthetic_slide(HEIGHT, WIDTH, [(200, 300, field)])


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    rgb = _image()
    paths = {
        "svs": write_slide(root / "a.svs", rgb, MPP),
        "svs28": write_slide(root / "b.svs", rgb, MPP, downsamples=(2, 8)),
        "tif": write_slide(root / "g.tif", rgb, MPP, kind="tiff"),
        "tif_nompp": write_slide(root / "n.tif", rgb, None, kind="tiff"),
    }
    cv2.imwrite(str(root / "p.png"), rgb[..., ::-1])
    paths["png"] = root / "p.png"
    return root, rgb, paths


def test_aperio_levels_pixel_size_and_exact_reads(slides):
    _, rgb, paths = slides
    with SlideReader.open(paths["svs"]) as reader:
        assert reader.vendor == "aperio"
        assert reader.name == "a"
        assert (reader.width, reader.height) == (WIDTH, HEIGHT)
        assert reader.level_count == 3
        assert reader.level_downsamples == (1.0, 4.0, 16.0)
        assert reader.level_dimensions == ((1536, 1024), (384, 256), (96, 64))
        assert reader.mpp == pytest.approx(MPP, rel=1e-9)
        assert reader.mpp_source == "openslide.mpp-x"
        assert reader.level_mpp(1) == pytest.approx(4 * MPP)

        whole = reader.read(0, 0, WIDTH, HEIGHT, 0)
        assert whole.dtype == np.uint8 and whole.shape == (HEIGHT, WIDTH, 3)
        np.testing.assert_array_equal(whole, rgb)
        np.testing.assert_array_equal(reader.read(300, 200, 256, 128, 0),
                                      rgb[200:328, 300:556])
        # Level 1: the corner in level-0 px, the size in level-1 px.
        np.testing.assert_array_equal(reader.read(40, 80, 50, 30, 1),
                                      rgb[::4, ::4][20:50, 10:60])
        np.testing.assert_array_equal(reader.read(0, 0, 96, 64, 2), rgb[::16, ::16])


def test_level_for_mpp(slides):
    _, _, paths = slides
    with SlideReader.open(paths["svs"]) as reader:
        assert reader.level_for_mpp(0.4912) == 0  # level 1 is 0.98 um/px
        assert reader.level_for_mpp(0.1) == 0  # even level 0 is coarser
        assert reader.level_for_mpp(1.0) == 1
        assert reader.level_for_mpp(0.9730) == 1  # 0.9824 is within 1 %
        assert reader.level_for_mpp(0.9700) == 0
        assert reader.level_for_mpp(100.0) == 2
    with SlideReader.open(paths["svs28"]) as reader:
        assert reader.level_downsamples == (1.0, 2.0, 8.0)
        assert reader.level_for_mpp(0.4912) == 1
        assert reader.level_for_mpp(0.4870) == 1


def test_generic_tiff_pixel_size_from_resolution_tags(slides):
    _, rgb, paths = slides
    with SlideReader.open(paths["tif"]) as reader:
        assert reader.vendor == "generic-tiff"
        assert reader.mpp == pytest.approx(MPP, rel=1e-9)
        # OpenSlide 4 derives openslide.mpp-x from the resolution tags of a generic TIFF;
        # older versions did not, and the reader then takes the tags itself.
        assert reader.properties["tiff.ResolutionUnit"] == "centimeter"
        assert reader.mpp_source in ("openslide.mpp-x", "tiff.XResolution")
        np.testing.assert_array_equal(reader.read(0, 0, 384, 256, 1), rgb[::4, ::4])


def test_pixel_size_from_properties():
    tiff_only = {"tiff.XResolution": "40000", "tiff.YResolution": "40000",
                 "tiff.ResolutionUnit": "centimeter"}
    assert pixel_size_from_properties(tiff_only) == (0.25, 0.25, "tiff.XResolution")
    inch = {"tiff.XResolution": "101600", "tiff.ResolutionUnit": "inch"}
    assert pixel_size_from_properties(inch) == (0.25, 0.25, "tiff.XResolution")
    assert pixel_size_from_properties({"tiff.XResolution": "1", "tiff.YResolution": "1",
                                       "tiff.ResolutionUnit": "centimeter"}) is None
    assert pixel_size_from_properties({"tiff.XResolution": "40000",
                                       "tiff.ResolutionUnit": "none"}) is None
    assert pixel_size_from_properties({"tiff.XResolution": "40000"}) is None
    assert pixel_size_from_properties({}) is None
    both = dict(tiff_only, **{"openslide.mpp-x": "0.5", "openslide.mpp-y": "0.5"})
    assert pixel_size_from_properties(both) == (0.5, 0.5, "openslide.mpp-x")
    assert pixel_size_from_properties({"openslide.mpp-x": "nan"}) is None


def test_no_pixel_size_needs_override(slides):
    _, _, paths = slides
    with pytest.raises(InputError, match="--mpp") as info:
        SlideReader.open(paths["tif_nompp"])
    assert str(paths["tif_nompp"]) in str(info.value)
    with SlideReader.open(paths["tif_nompp"], mpp=0.5) as reader:
        assert (reader.mpp, reader.mpp_source) == (0.5, "--mpp")
        assert reader.level_count == 3
    for bad in (0, -1.0, float("nan"), float("inf"), "x"):
        with pytest.raises(InputError, match="--mpp"):
            SlideReader.open(paths["svs"], mpp=bad)
    with SlideReader.open(paths["svs"], mpp=0.3) as reader:  # the override beats the slide
        assert (reader.mpp, reader.mpp_source) == (0.3, "--mpp")


def test_non_square_pixels(tmp_path):
    import tifffile

    path = tmp_path / "ns.tif"
    rgb = np.full((256, 256, 3), 200, np.uint8)
    tifffile.imwrite(path, rgb, tile=(128, 128), photometric="rgb", metadata=None,
                     resolution=(1e4 / 0.25, 1e4 / 0.30), resolutionunit="CENTIMETER")
    with pytest.raises(InputError, match="non-square"):
        SlideReader.open(path)
    with SlideReader.open(path, mpp=0.25) as reader:
        assert reader.mpp == 0.25


def test_plain_png_needs_mpp(slides, tmp_path):
    _, rgb, paths = slides
    with pytest.raises(InputError, match="--mpp"):
        SlideReader.open(paths["png"])
    with SlideReader.open(paths["png"], mpp=1.0) as reader:
        assert reader.vendor == "image"
        assert reader.level_count == 1 and reader.level_downsamples == (1.0,)
        np.testing.assert_array_equal(reader.read(0, 0, WIDTH, HEIGHT, 0), rgb)
    # Transparent pixels read as white.
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[:, :30] = (10, 20, 30, 255)
    cv2.imwrite(str(tmp_path / "alpha.png"), rgba[..., [2, 1, 0, 3]])
    with SlideReader.open(tmp_path / "alpha.png", mpp=1.0) as reader:
        out = reader.read(0, 0, 60, 40, 0)
    assert (out[:, :30] == (10, 20, 30)).all() and (out[:, 30:] == 255).all()


def _assert_one_line_input_error(path, match=None):
    with pytest.raises(InputError, match=match) as info:
        SlideReader.open(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path) + ": ")
    return message


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_truncated_corrupt_missing_files(slides, tmp_path):
    _, _, paths = slides
    data = paths["svs"].read_bytes()
    for fraction in (0.5, 0.95):
        cut = tmp_path / f"cut{int(fraction * 100)}.svs"
        cut.write_bytes(data[:int(len(data) * fraction)])
        _assert_one_line_input_error(cut)
        # The same bytes as .tif: not silently read as a plain (first-page) image either.
        cut_tif = cut.with_suffix(".tif")
        cut_tif.write_bytes(cut.read_bytes())
        _assert_one_line_input_error(cut_tif)
    text = tmp_path / "notes.svs"
    text.write_text("not a slide\n")
    _assert_one_line_input_error(text)
    fake_png = tmp_path / "notes.png"
    fake_png.write_text("not an image\n")
    _assert_one_line_input_error(fake_png, match="not a whole-slide image or image file")
    _assert_one_line_input_error(tmp_path / "missing.svs", match="not found")


def test_read_bounds_and_errors(slides, monkeypatch):
    _, _, paths = slides
    with SlideReader.open(paths["svs"]) as reader:
        for args in ((1500, 0, 100, 10, 0), (0, 1000, 10, 25, 0), (-1, 0, 10, 10, 0),
                     (0, 0, 385, 1, 1), (8, 0, 383, 1, 1), (0, 0, 0, 10, 0),
                     (0, 0, 10, 10, 3)):
            with pytest.raises(ValueError):
                reader.read(*args)
        assert reader.read(4, 0, 383, 1, 1).shape == (1, 383, 3)

        def failing(*_args):
            raise openslide.OpenSlideError("broken tile")

        monkeypatch.setattr(reader._slide, "read_region", failing)
        with pytest.raises(SlideReadError, match="broken tile") as info:
            reader.read(256, 512, 64, 64, 0)
        assert (info.value.x, info.value.y, info.value.level) == (256, 512, 0)
    with pytest.raises(ValueError, match="closed"):
        reader.read(0, 0, 1, 1, 0)


def test_thumbnail(slides, monkeypatch):
    _, rgb, paths = slides
    with SlideReader.open(paths["svs"]) as reader:
        thumb, sx, sy = reader.thumbnail(8.0)  # from level 2 (3.93 um/px), halved
        assert thumb.dtype == np.uint8
        assert thumb.shape == (round(64 * 16 * MPP / 8), round(96 * 16 * MPP / 8), 3)
        assert (sx, sy) == (thumb.shape[1] / WIDTH, thumb.shape[0] / HEIGHT)
        assert MPP / sx == pytest.approx(8.0, rel=0.02)
        fine, sx, sy = reader.thumbnail(0.1)  # never enlarged
        assert (sx, sy) == (1.0, 1.0)
        np.testing.assert_array_equal(fine, rgb)
    with SlideReader.open(paths["png"], mpp=1.0) as reader:
        whole, sx, sy = reader.thumbnail(4.0)
        assert whole.shape == (256, 384, 3) and sx == sy == 0.25
        monkeypatch.setattr(reader_mod, "MAX_READ_PIXELS", 100 * WIDTH)
        strips, sx2, sy2 = reader.thumbnail(4.0)
        assert (sx2, sy2) == (sx, sy)
        # Integer ratio: area resizing is block averaging, identical strip by strip.
        np.testing.assert_array_equal(strips, whole)
        assert math.isclose(float(whole.mean()), float(rgb.mean()), rel_tol=0.01)


def test_write_slide_is_atomic_and_validates(tmp_path):
    rgb = np.full((64, 64, 3), 255, np.uint8)
    with pytest.raises(ValueError, match="lossless"):
        write_slide(tmp_path / "j.svs", rgb, MPP, compression="jpeg")
    with pytest.raises(ValueError, match="multiple of 16"):
        write_slide(tmp_path / "t.svs", rgb, MPP, tile=100)
    assert os.listdir(tmp_path) == []
