"""Whole-slide reading: :class:`SlideReader` over OpenSlide, with plain images as a fallback.

Slide formats (.svs, .ndpi, .mrxs, .scn, tiled .tif/.tiff, .vms, .bif, .dcm, ...) are opened
with ``openslide.OpenSlide``; plain images (.png, .jpg, .bmp, a stripped single-page .tif) with
``openslide.ImageSlide``, which has one level and no properties, so it always needs ``--mpp``.

Coordinates follow OpenSlide: ``x`` is the column, ``y`` the row, and the top-left corner of a
read is given in level-0 pixels whatever the level read. Pixel sizes are in um/px.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import openslide
from PIL import Image

from focas_keras.errors import InputError

# Formats only OpenSlide reads: when it does not recognise such a file, the file is broken (a
# plain-image reader could still decode the first page of a truncated SVS, silently).
SLIDE_ONLY_SUFFIXES = frozenset({
    ".svs", ".svslide", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".dcm"})

# Largest region (px) read in one read_region call by thumbnail(); larger levels go in strips.
MAX_READ_PIXELS = 64 * 2**20
STRIP_ROWS = 4096

# A level whose pixel size is at most this factor above a target still serves it
# (0.4920 um/px serves 0.4912).
MPP_TOLERANCE = 1.01
SQUARE_TOLERANCE = 0.01


class SlideReadError(Exception):
    """Reading a region failed (a corrupt tile, an I/O error) after the slide was opened.

    Attributes:
        x, y: top-left corner of the failed read, level-0 px.
        level: the level read.
    """

    def __init__(self, message: str, x: int, y: int, level: int):
        self.x, self.y, self.level = int(x), int(y), int(level)
        super().__init__(f"{message} (at x={self.x}, y={self.y}, level {self.level})")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _positive_float(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def pixel_size_from_properties(
        properties: Mapping[str, str]) -> tuple[float, float, str] | None:
    """The level-0 pixel size an OpenSlide property map states, and which property states it.

    ``openslide.mpp-x`` / ``-y`` first; else the TIFF resolution tags (``tiff.XResolution`` /
    ``YResolution`` per ``tiff.ResolutionUnit``: centimeter or inch). A resolution of 1 or a
    missing / "none" unit means unknown, as TIFF writers put 1 there by default.

    Args:
        properties: the slide's properties (``OpenSlide.properties``).

    Returns:
        (mpp_x, mpp_y, source) in um/px, or None when the properties state no pixel size.
    """
    mpp_x = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_X))
    if mpp_x is not None:
        mpp_y = _positive_float(properties.get(openslide.PROPERTY_NAME_MPP_Y)) or mpp_x
        return mpp_x, mpp_y, openslide.PROPERTY_NAME_MPP_X
    um_per_unit = {"centimeter": 1e4, "inch": 25400.0}.get(
        str(properties.get("tiff.ResolutionUnit", "")).strip().lower())
    x_res = _positive_float(properties.get("tiff.XResolution"))
    if um_per_unit is None or x_res is None or x_res == 1.0:
        return None
    y_res = _positive_float(properties.get("tiff.YResolution"))
    if y_res is None or y_res == 1.0:
        y_res = x_res
    return um_per_unit / x_res, um_per_unit / y_res, "tiff.XResolution"


def _open_plain_image(path: Path) -> Image.Image:
    """Decodes a plain image fully (so a broken file fails here), as RGB or RGBA.

    Pillow's guard against "decompression bombs" (about 179 Mpx) is lifted for the file the
    user names: a big plain scan is what ``slide`` is for (it is decoded whole, so it needs
    3 bytes per pixel of memory).
    """
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return _decode_plain_image(path)
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _decode_plain_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            if image.format == "TIFF" and getattr(image, "n_frames", 1) > 1:
                raise InputError("a multi-page TIFF that OpenSlide cannot read (truncated, "
                                 "corrupt or an unsupported pyramid)", path)
            has_alpha = "A" in image.getbands() or "transparency" in image.info
            return image.convert("RGBA" if has_alpha else "RGB")
    except InputError:
        raise
    except Exception as error:  # PIL raises many types (OSError, TypeError, SyntaxError...)
        raise InputError(f"not a whole-slide image or image file ({_one_line(error)})",
                         path) from error


def _open_slide(path: Path) -> tuple[openslide.AbstractSlide, Image.Image | None]:
    """OpenSlide when it recognises the file, else ImageSlide over a decoded plain image."""
    if not path.exists():
        raise InputError("file not found", path)
    if path.is_dir():
        raise InputError("is a directory, not a slide or image file", path)
    fmt = openslide.OpenSlide.detect_format(str(path))
    if fmt is not None:
        try:
            return openslide.OpenSlide(str(path)), None
        except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as error:
            raise InputError(f"cannot open the {fmt} slide ({_one_line(error)})",
                             path) from error
    if path.suffix.lower() in SLIDE_ONLY_SUFFIXES:
        raise InputError(f"OpenSlide does not recognise this {path.suffix} file (truncated, "
                         "corrupt or not a slide)", path)
    image = _open_plain_image(path)
    return openslide.ImageSlide(image), image


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 straight (not premultiplied) RGBA -> (H, W, 3) uint8 over white."""
    rgb = rgba[..., :3]
    alpha = rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha.astype(np.uint32)
    out = (rgb.astype(np.uint32) * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


class SlideReader:
    """An open whole-slide image (or plain image) with a known level-0 pixel size.

    Build it with :meth:`open`; use it as a context manager or call :meth:`close`.

    Attributes:
        path: the file.
        name: the file stem.
        width, height: level-0 size, px.
        mpp: level-0 pixel size, um/px (the x size where the slide states two within 1 %).
        mpp_source: where ``mpp`` came from: "--mpp", "openslide.mpp-x" or "tiff.XResolution".
        vendor: ``openslide.vendor`` ("aperio", "generic-tiff", ...), or "image" for a plain
            image.
        level_count: number of pyramid levels (1 for a plain image).
        level_dimensions: ((width, height), ...) per level, px.
        level_downsamples: (float, ...) level-0 px per level px, per level (level 0: 1.0).
        properties: the OpenSlide properties (empty for a plain image).
    """

    def __init__(self, slide: openslide.AbstractSlide, path, mpp: float, mpp_source: str,
                 image: Image.Image | None = None):
        self._slide = slide
        self._image = image
        self.path = Path(path)
        self.name = self.path.stem
        self.mpp = float(mpp)
        self.mpp_source = mpp_source
        self.properties = dict(slide.properties)
        self.vendor = self.properties.get(openslide.PROPERTY_NAME_VENDOR) or "image"
        self.level_count = int(slide.level_count)
        self.level_dimensions = tuple((int(w), int(h)) for w, h in slide.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in slide.level_downsamples)
        self.width, self.height = self.level_dimensions[0]

    @classmethod
    def open(cls, path, mpp: float | None = None) -> SlideReader:
        """Opens ``path`` and settles its level-0 pixel size.

        Args:
            path: a slide or plain image file.
            mpp: level-0 pixel size override, um/px (``--mpp``); None takes the slide's own.

        Returns:
            The open reader (the caller closes it).

        Raises:
            InputError: a missing, truncated, corrupt or unsupported file; an invalid ``mpp``;
                no pixel size in the slide and no ``mpp``; non-square pixels and no ``mpp``.
        """
        path = Path(path)
        if mpp is not None and _positive_float(mpp) is None:
            raise InputError(f"--mpp must be a finite number > 0, got {mpp!r}", path)
        slide, image = _open_slide(path)
        try:
            _test_read(slide, path)
            if mpp is not None:
                mpp_value, source = float(mpp), "--mpp"
            else:
                mpp_value, source = _slide_mpp(slide, path)
            return cls(slide, path, mpp_value, source, image)
        except BaseException:
            slide.close()
            if image is not None:
                image.close()
            raise

    def close(self) -> None:
        """Releases the slide; the reader cannot read afterwards. Safe to call twice."""
        if self._slide is not None:
            self._slide.close()
            self._slide = None
        if self._image is not None:
            self._image.close()
            self._image = None

    def reopen(self) -> None:
        """Opens the file afresh: after a failed read OpenSlide refuses every later read of
        the same handle, so a caller that goes on past an unreadable region reopens first.
        No other thread may be reading meanwhile.

        Raises:
            InputError: the file can no longer be opened.
        """
        if self._image is not None:  # a plain image is decoded in memory: nothing to redo
            return
        if self._slide is not None:
            self._slide.close()
        self._slide, _ = _open_slide(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"SlideReader({str(self.path)!r}, {self.width}x{self.height} px, "
                f"mpp={self.mpp:.4g} from {self.mpp_source}, {self.level_count} levels)")

    def level_mpp(self, level: int) -> float:
        """Pixel size of ``level``, um/px (level-0 mpp times the level's downsample)."""
        self._check_level(level)
        return self.mpp * self.level_downsamples[level]

    def level_for_mpp(self, target_mpp: float) -> int:
        """The coarsest level whose pixel size does not exceed ``target_mpp`` (by > 1 %).

        Args:
            target_mpp: the wanted pixel size, um/px.

        Returns:
            The level index; 0 when even level 0 is coarser than the target.
        """
        if _positive_float(target_mpp) is None:
            raise ValueError(f"target_mpp must be finite and > 0, got {target_mpp!r}")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= target_mpp * MPP_TOLERANCE:
                best = max(best, level)
        return best

    def read(self, x: int, y: int, width: int, height: int, level: int) -> np.ndarray:
        """Reads a region as RGB, transparent parts composited onto white.

        Args:
            x, y: top-left corner in LEVEL-0 px (as ``openslide.read_region``).
            width, height: region size in px of ``level``.
            level: the level to read.

        Returns:
            (height, width, 3) uint8 RGB.

        Raises:
            ValueError: the region leaves the level's bounds (by more than the half level px
                that rounding a level-0 corner may cost) or has no pixels.
            SlideReadError: OpenSlide failed to read it (after such an error OpenSlide refuses
                every later read of this slide).
        """
        self._check_level(level)
        x, y, width, height = int(x), int(y), int(width), int(height)
        if width < 1 or height < 1:
            raise ValueError(f"region size must be positive, got {width}x{height}")
        level_w, level_h = self.level_dimensions[level]
        down = self.level_downsamples[level]
        left, top = x / down, y / down
        if (x < 0 or y < 0 or left + width > level_w + 0.5 or top + height > level_h + 0.5):
            raise ValueError(
                f"region x={x}, y={y} (level-0 px), {width}x{height} px of level {level} leaves "
                f"the level ({level_w}x{level_h} px, downsample {down:g})")
        if self._slide is None:
            raise ValueError("the slide is closed")
        try:
            region = self._slide.read_region((x, y), level, (width, height))
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideReadError(f"cannot read {self.path}: {_one_line(error)}",
                                 x, y, level) from error
        return _rgba_to_rgb(np.asarray(region))

    def thumbnail(self, target_mpp: float = 8.0) -> tuple[np.ndarray, float, float]:
        """The whole slide as RGB at about ``target_mpp``.

        Reads the whole of :meth:`level_for_mpp`'s level and area-resizes it (``INTER_AREA``)
        to ``target_mpp``; a level already coarser is kept as it is (never enlarged). A level
        over :data:`MAX_READ_PIXELS` is read and resized in strips of :data:`STRIP_ROWS` rows
        (fewer for very wide levels), so memory stays bounded by one strip plus the result.

        Args:
            target_mpp: the wanted pixel size, um/px.

        Returns:
            (rgb, scale_x, scale_y): (H, W, 3) uint8 RGB; thumbnail px per level-0 px along x
            and y (exactly W / width and H / height).
        """
        level, out_w, out_h = self.thumbnail_size(target_mpp)
        level_w, level_h = self.level_dimensions[level]
        if level_w * level_h <= MAX_READ_PIXELS:
            rgb = self._read_level_rows(level, 0, level_h)
            rgb = _area_resize(rgb, out_w, out_h)
        else:
            rgb = self._strip_thumbnail(level, out_w, out_h)
        return rgb, out_w / self.width, out_h / self.height

    def thumbnail_size(self, target_mpp: float = 8.0) -> tuple[int, int, int]:
        """What :meth:`thumbnail` reads and returns, without reading a pixel.

        Returns:
            (level, width, height): the level read and the thumbnail's size, px.
        """
        level = self.level_for_mpp(target_mpp)
        level_w, level_h = self.level_dimensions[level]
        factor = self.level_mpp(level) / target_mpp
        if factor >= 1.0:
            return level, level_w, level_h
        return level, max(1, round(level_w * factor)), max(1, round(level_h * factor))

    def _strip_thumbnail(self, level: int, out_w: int, out_h: int) -> np.ndarray:
        level_w, level_h = self.level_dimensions[level]
        rows = max(1, min(STRIP_ROWS, MAX_READ_PIXELS // level_w))
        # Strips are cut at output rows, so each maps to whole output rows without seams.
        out_rows = max(1, rows * out_h // level_h)
        out = np.empty((out_h, out_w, 3), np.uint8)
        for o0 in range(0, out_h, out_rows):
            o1 = min(out_h, o0 + out_rows)
            r0 = round(o0 * level_h / out_h)
            r1 = round(o1 * level_h / out_h)
            strip = self._read_level_rows(level, r0, r1)
            out[o0:o1] = _area_resize(strip, out_w, o1 - o0)
        return out

    def _read_level_rows(self, level: int, row0: int, row1: int) -> np.ndarray:
        """Rows ``[row0, row1)`` of ``level``, full width."""
        down = self.level_downsamples[level]
        return self.read(0, round(row0 * down), self.level_dimensions[level][0], row1 - row0,
                         level)

    def _check_level(self, level: int) -> None:
        if not 0 <= int(level) < self.level_count:
            raise ValueError(f"level {level} not in [0, {self.level_count})")


def _area_resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def _test_read(slide: openslide.AbstractSlide, path: Path) -> None:
    """Reads a small corner of the lowest-resolution level, so a broken file fails at open."""
    level = slide.level_count - 1
    width, height = slide.level_dimensions[level]
    try:
        slide.read_region((0, 0), level, (min(64, width), min(64, height)))
    except (openslide.OpenSlideError, OSError) as error:
        raise InputError(f"cannot read the slide (truncated or corrupt?): {_one_line(error)}",
                         path) from error


def _slide_mpp(slide: openslide.AbstractSlide, path: Path) -> tuple[float, str]:
    found = pixel_size_from_properties(slide.properties)
    if found is None:
        raise InputError("no pixel size in the slide; pass --mpp (um per pixel)", path)
    mpp_x, mpp_y, source = found
    if abs(mpp_x - mpp_y) > SQUARE_TOLERANCE * max(mpp_x, mpp_y):
        raise InputError(f"non-square pixels ({mpp_x:.4g} x {mpp_y:.4g} um/px); pass --mpp "
                         "(um per pixel) to read it as square", path)
    return mpp_x, source
