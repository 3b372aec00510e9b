"""Small pyramidal TIFF slides for tests and demos, written with tifffile.

``write_slide(kind="aperio")`` writes an SVS-like file that OpenSlide reads as vendor
``aperio`` (its pixel size from the ``MPP =`` field of the description); ``kind="tiff"`` the
same pyramid as a generic TIFF (vendor ``generic-tiff``, pixel size from the resolution tags
only). The reduced levels are made by striding (``rgb[::d, ::d]``), not by averaging, so a test
knows every pixel of every level exactly.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LOSSLESS = ("zlib", "lzw", None)
KINDS = ("aperio", "tiff")
THUMBNAIL_STRIDE = 32


def _import_tifffile():
    try:
        import tifffile
    except ImportError as error:
        raise ImportError("writing slides needs tifffile, which comes with the test extra: "
                          "pip install focas_keras[test]") from error
    return tifffile


def write_slide(path, rgb: np.ndarray, mpp: float | None, kind: str = "aperio",
                tile: int = 256, downsamples: tuple[int, ...] = (4, 16),
                compression: str | None = "zlib") -> Path:
    """Writes ``rgb`` as a tiled, pyramidal, losslessly compressed TIFF slide.

    Pages: the full image (tiled), a small stripped thumbnail (``rgb[::32, ::32]``), then one
    tiled reduced page (``subfiletype=1``) per downsample. Written to a temporary name in the
    same directory and renamed, so ``path`` is never a partial file.

    Args:
        path: the file to write (e.g. ``.svs`` for aperio, ``.tif`` for tiff).
        rgb: (H, W, 3) uint8 level-0 image.
        mpp: level-0 pixel size, um/px. None (tiff only) writes no resolution tags, for a
            slide without a pixel size.
        kind: "aperio" or "tiff".
        tile: tile side, px (a multiple of 16).
        downsamples: integer level-0 px per level px of each reduced level, increasing.
        compression: "zlib", "lzw" or None (lossless only).

    Returns:
        ``path`` as a Path.
    """
    tifffile = _import_tifffile()
    path = Path(path)
    rgb = np.ascontiguousarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in LOSSLESS:
        raise ValueError(f"compression must be lossless, one of {LOSSLESS}, got {compression!r}")
    if list(downsamples) != sorted(set(downsamples)) or any(int(d) < 2 for d in downsamples):
        raise ValueError(f"downsamples must be increasing integers >= 2, got {downsamples}")
    if mpp is None and kind == "aperio":
        raise ValueError("an aperio slide needs mpp")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be finite and > 0, got {mpp!r}")

    first = {}
    if mpp is not None:
        first.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    if kind == "aperio":
        first["description"] = f"Aperio Image Library Fake\nTest |AppMag = 40|MPP = {mpp}"
    tiled = {"tile": (tile, tile), "photometric": "rgb", "compression": compression,
             "metadata": None}

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tifffile.TiffWriter(tmp) as writer:
            writer.write(rgb, **tiled, **first)
            writer.write(np.ascontiguousarray(rgb[::THUMBNAIL_STRIDE, ::THUMBNAIL_STRIDE]),
                         photometric="rgb", compression=compression, metadata=None)
            for down in downsamples:
                writer.write(np.ascontiguousarray(rgb[::int(down), ::int(down)]),
                             subfiletype=1, **tiled)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def synthetic_slide(height: int, width: int, fields, background: int = 255) -> np.ndarray:
    """A ``height`` x ``width`` slide image: ``fields`` pasted onto a uniform background.

    Args:
        height, width: image size, px.
        fields: list of (y, x, rgb) with (y, x) the top-left corner (px) of an (h, w, 3) uint8
            array; later fields cover earlier ones; each must lie inside the image.
        background: grey level of the background (255: white).

    Returns:
        (height, width, 3) uint8 RGB.
    """
    image = np.full((height, width, 3), background, np.uint8)
    for y, x, field in fields:
        field = np.asarray(field, np.uint8)
        h, w = field.shape[:2]
        if y < 0 or x < 0 or y + h > height or x + w > width:
            raise ValueError(f"field at y={y}, x={x} of {h}x{w} px leaves the "
                             f"{height}x{width} slide")
        image[y:y + h, x:x + w] = field[..., :3]
    return image
