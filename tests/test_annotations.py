"""Image loading: conversions and the unreadable / truncated cases."""

import cv2
import numpy as np
import pytest

from focas_keras.datasets.annotations import (
    GRAYSCALE, ColourCheck, image_format, is_grayscale, load_image, object_from_pixels)
from focas_keras.errors import InputError


def _rgb(h=20, w=30):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("ext", ["png", "bmp", "tif"])
def test_rgb_round_trip(tmp_path, ext):
    image = _rgb()
    cv2.imwrite(str(tmp_path / f"a.{ext}"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(load_image(tmp_path / f"a.{ext}"), image)


def test_grayscale_rgba_and_16bit_are_converted(tmp_path):
    gray = _rgb()[:, :, 0]
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    np.testing.assert_array_equal(load_image(tmp_path / "g.png"), np.stack([gray] * 3, -1))
    rgba = np.dstack([_rgb(), np.full((20, 30), 7, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(load_image(tmp_path / "a.png"), rgba[:, :, :3])
    deep = _rgb().astype(np.uint16) * 257  # 8-bit value v -> 16-bit v*257, back to v
    cv2.imwrite(str(tmp_path / "d.png"), cv2.cvtColor(deep, cv2.COLOR_RGB2BGR))
    np.testing.assert_array_equal(load_image(tmp_path / "d.png"), _rgb())


@pytest.mark.parametrize("ext, needle", [("jpg", "truncated JPEG"), ("png", "truncated PNG"),
                                         ("bmp", "truncated BMP")])
def test_truncated_images_are_refused(tmp_path, ext, needle):
    path = tmp_path / f"t.{ext}"
    cv2.imwrite(str(path), _rgb(200, 200))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=needle) as err:
        load_image(path)
    assert str(path) in str(err.value)


def test_unreadable_and_empty_files(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image at all, IEND")
    with pytest.raises(InputError) as err:
        load_image(tmp_path / "x.png")
    assert str(err.value) == (f"{tmp_path / 'x.png'}: not a BMP, PNG, JPEG or TIFF image "
                              "(its first bytes match none of them)")
    (tmp_path / "notes.jpg").write_text("a text file named like a photo\n")
    with pytest.raises(InputError, match="not a BMP, PNG, JPEG or TIFF image"):
        load_image(tmp_path / "notes.jpg")
    corrupt = b"\x89PNG\r\n\x1a\n" + bytes(100) + b"IEND\xaeB`\x82"
    (tmp_path / "c.png").write_bytes(corrupt)
    with pytest.raises(InputError, match="corrupt PNG image"):
        load_image(tmp_path / "c.png")
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(InputError, match="empty image file"):
        load_image(tmp_path / "e.jpg")
    with pytest.raises(InputError, match="cannot read image"):
        load_image(tmp_path / "missing.png")


def test_object_from_pixels():
    obj = object_from_pixels(np.array([[10, 5], [12, 5], [11, 8]]))
    assert (obj["x"], obj["y"]) == (11.0, 6.0)
    assert (obj["x1"], obj["y1"], obj["x2"], obj["y2"]) == (10.0, 5.0, 13.0, 9.0)


def test_encoding_is_told_by_content_not_name(tmp_path):
    image = _rgb()
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    (tmp_path / "really_a_png.jpg").write_bytes(encoded.tobytes())
    np.testing.assert_array_equal(load_image(tmp_path / "really_a_png.jpg"), image)
    assert image_format(encoded.tobytes()) == "PNG"
    assert image_format(b"BM....") == "BMP" and image_format(b"II*\x00") == "TIFF"
    assert image_format(b"\xff\xd8\xff\xe0") == "JPEG" and image_format(b"GIF89a") is None


def test_grayscale_is_reported_once_and_still_loaded(tmp_path):
    gray = _rgb()[:, :, 0]
    cv2.imwrite(str(tmp_path / "g1.png"), gray)
    cv2.imwrite(str(tmp_path / "g2.png"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))  # 3 equal
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(_rgb(), cv2.COLOR_RGB2BGR))
    messages = []
    check = ColourCheck(messages.append)
    loaded = [load_image(tmp_path / name, warn=check) for name in ("c.png", "g1.png", "g2.png")]
    assert [image.shape for image in loaded] == [(20, 30, 3)] * 3
    np.testing.assert_array_equal(loaded[1], np.stack([gray] * 3, -1))
    assert messages == [f"{tmp_path / 'g1.png'} is grayscale; the models expect H&E colour, "
                        "results may be poor"]
    assert check.summary() == {"grayscale_images": [str(tmp_path / "g1.png"),
                                                    str(tmp_path / "g2.png")]}
    seen = []
    load_image(tmp_path / "g1.png", warn=lambda path, what: seen.append((path, what)))
    assert seen == [(tmp_path / "g1.png", GRAYSCALE)]
    assert is_grayscale(loaded[1]) and not is_grayscale(loaded[0])
