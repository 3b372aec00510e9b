"""The one annotation table every reader produces, and image loading shared by all readers.

A reader returns an :class:`AnnotationSet`: ``images`` lists every image (including images with
no annotation, which matter as sources of background), ``annotations`` holds one row per object.
``images`` columns: :data:`IMAGE_COLUMNS` (``scanner`` and ``dataset`` are "" where a reader
does not know them; the AMi-Br reader fills them, so that splits can hold out scanners).

``annotations`` columns (:data:`ANNOTATION_COLUMNS`):

========== ======= ===================================================================
image_id   str     unique image id (the file stem)
image_path str     path of the image file
slide_id   str     slide / patient id, or the image id when no slide is known
x, y       float   centroid in pixels (x = column, y = row)
x1..y2     float   box in pixels, x2/y2 exclusive
label      str     ``mitosis`` or ``hard_negative``
mpp        float   pixel size in um/px
pixels     object  (N, 2) int32 array of (x, y) pixels of the object, or None
========== ======= ===================================================================
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from focas_keras.errors import InputError

MITOSIS = "mitosis"
HARD_NEGATIVE = "hard_negative"
LABELS = (MITOSIS, HARD_NEGATIVE)

#: Pixel size of the ICPR 2012 scanner A images (um/px).
ICPR2012_MPP = 0.2456
IMAGE_EXTENSIONS = (".bmp", ".png", ".jpg", ".jpeg", ".tif", ".tiff")

IMAGE_COLUMNS = ["image_id", "image_path", "slide_id", "width", "height", "mpp", "scanner",
                 "dataset"]
#: Columns of the images table a reader may leave out (filled with "": unknown).
OPTIONAL_IMAGE_COLUMNS = ("scanner", "dataset")
ANNOTATION_COLUMNS = [
    "image_id", "image_path", "slide_id", "x", "y", "x1", "y1", "x2", "y2", "label", "mpp",
    "pixels",
]


@dataclasses.dataclass(frozen=True)
class AnnotationSet:
    """Images and their annotations, as read from one dataset.

    Attributes:
        images: one row per image, columns :data:`IMAGE_COLUMNS`.
        annotations: one row per object, columns :data:`ANNOTATION_COLUMNS`.
        source: where the set was read from (for messages and manifests).
        fmt: the reader's format name.
    """

    images: pd.DataFrame
    annotations: pd.DataFrame
    source: str = ""
    fmt: str = ""

    def for_images(self, image_ids) -> "AnnotationSet":
        """The subset restricted to ``image_ids`` (order of ``images`` kept)."""
        ids = set(image_ids)
        return AnnotationSet(
            images=self.images[self.images.image_id.isin(ids)].reset_index(drop=True),
            annotations=self.annotations[self.annotations.image_id.isin(ids)].reset_index(
                drop=True),
            source=self.source,
            fmt=self.fmt,
        )


def make_images_table(rows) -> pd.DataFrame:
    """Builds the images table from dicts with :data:`IMAGE_COLUMNS` keys; the
    :data:`OPTIONAL_IMAGE_COLUMNS` (``scanner``, ``dataset``) may be absent: "" (unknown)."""
    rows = [{**{name: "" for name in OPTIONAL_IMAGE_COLUMNS}, **row} for row in rows]
    table = pd.DataFrame(rows, columns=IMAGE_COLUMNS)
    table = table.astype({"image_id": str, "image_path": str, "slide_id": str,
                          "width": "int64", "height": "int64", "mpp": "float64",
                          "scanner": str, "dataset": str})
    return table.sort_values("image_id", kind="stable").reset_index(drop=True)


def make_annotation_table(rows) -> pd.DataFrame:
    """Builds the annotation table from dicts with :data:`ANNOTATION_COLUMNS` keys."""
    table = pd.DataFrame(list(rows), columns=ANNOTATION_COLUMNS)
    table = table.astype({"image_id": str, "image_path": str, "slide_id": str, "label": str,
                          "x": "float64", "y": "float64", "x1": "float64", "y1": "float64",
                          "x2": "float64", "y2": "float64", "mpp": "float64"})
    table["pixels"] = table["pixels"].astype(object)
    return table.sort_values(["image_id", "y", "x"], kind="stable").reset_index(drop=True)


def object_from_pixels(pixels: np.ndarray) -> dict:
    """Centroid and box of an object given its (N, 2) (x, y) pixel list.

    The box covers the pixels (x2 = max x + 1, exclusive).
    """
    pixels = np.asarray(pixels, dtype=np.int64).reshape(-1, 2)
    xs, ys = pixels[:, 0], pixels[:, 1]
    return {
        "x": float(xs.mean()), "y": float(ys.mean()),
        "x1": float(xs.min()), "y1": float(ys.min()),
        "x2": float(xs.max() + 1), "y2": float(ys.max() + 1),
        "pixels": pixels.astype(np.int32),
    }


def object_from_centroid(x: float, y: float, box_size: float) -> dict:
    """A square box of side ``box_size`` centred on a centroid (no pixel list)."""
    half = box_size / 2.0
    return {"x": float(x), "y": float(y), "x1": x - half, "y1": y - half,
            "x2": x + half, "y2": y + half, "pixels": None}


def slide_from_stem(stem: str) -> str:
    """ICPR-style slide id: the first three characters of the image stem (``A03_01`` -> ``A03``)."""
    return stem[:3] if len(stem) >= 3 else stem


#: The encodings :func:`load_image` reads, by the first bytes of the file.
IMAGE_SIGNATURES = (("PNG", (b"\x89PNG\r\n\x1a\n",)), ("JPEG", (b"\xff\xd8\xff",)),
                    ("BMP", (b"BM",)), ("TIFF", (b"II*\x00", b"MM\x00*")))
#: The names of those encodings, for messages.
IMAGE_FORMATS_TEXT = "BMP, PNG, JPEG or TIFF"
_NOT_AN_IMAGE = f"not a {IMAGE_FORMATS_TEXT} image (its first bytes match none of them)"
#: What :func:`load_image` tells ``warn`` about an image without colour.
GRAYSCALE = "grayscale"


def image_format(data: bytes) -> str | None:
    """The encoding of an image file's bytes (``PNG``, ``JPEG``, ``BMP``, ``TIFF``) by its
    signature, or None when it starts like none of them (whatever its file name says)."""
    for name, signatures in IMAGE_SIGNATURES:
        if any(data.startswith(signature) for signature in signatures):
            return name
    return None


def _looks_truncated(fmt: str, data: bytes) -> str | None:
    """A reason if the encoded file (of encoding ``fmt``) is visibly cut short, else None.

    OpenCV decodes truncated JPEGs (grey bottom rows, only a warning) and some truncated PNGs,
    so check the end markers of the formats we read.
    """
    if fmt == "JPEG":
        if b"\xff\xd9" not in data[-1024:]:
            return "truncated JPEG (no end-of-image marker)"
    elif fmt == "PNG":
        if b"IEND" not in data[-32:]:
            return "truncated PNG (no IEND chunk)"
    elif fmt == "BMP":
        if len(data) >= 6:
            declared = int.from_bytes(data[2:6], "little")
            if declared > len(data):
                return f"truncated BMP ({len(data)} of {declared} bytes)"
    return None


def check_image_file(path) -> str:
    """The encoding of an image file, from its first bytes only: a cheap check of many inputs
    before any is processed (a text file named ``.png`` fails here, not after an hour).

    Returns:
        ``PNG``, ``JPEG``, ``BMP`` or ``TIFF``.

    Raises:
        InputError: a missing, unreadable or empty file, or one that is none of those.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        raise InputError(f"cannot read image ({err.strerror or err})", path) from None
    return _format_or_error(head, path)


def _format_or_error(head: bytes, path: Path) -> str:
    """The encoding told by a file's first bytes; InputError when empty or none known."""
    if not head:
        raise InputError("empty image file", path)
    fmt = image_format(head)
    if fmt is None:
        raise InputError(_NOT_AN_IMAGE, path)
    return fmt


def is_grayscale(image: np.ndarray) -> bool:
    """True when a (H, W, 3) image has no colour: its three channels are equal everywhere."""
    image = np.asarray(image)
    return bool(np.array_equal(image[..., 0], image[..., 1])
                and np.array_equal(image[..., 1], image[..., 2]))


def load_image(path, warn=None) -> np.ndarray:
    """Reads an image as uint8 RGB (H, W, 3).

    Grayscale is replicated to three channels, an alpha channel is dropped, 16-bit images are
    scaled to 8 bits (value >> 8). The encoding is told by the file's first bytes, not its
    name; anything but :data:`IMAGE_FORMATS_TEXT` raises :class:`InputError` naming the file.

    Args:
        path: the image file.
        warn: optional callable ``(path, what)``, called with ``what`` =
            :data:`GRAYSCALE` when the image has no colour (one channel stored, or three equal
            ones): the models expect H&E colour. The image is loaded all the same.

    Returns:
        uint8 (H, W, 3) RGB.

    Raises:
        InputError: a missing, empty, non-image, truncated or undecodable file, or an
            unsupported pixel type or layout.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read image ({err.strerror or err})", path) from None
    fmt = _format_or_error(data, path)
    reason = _looks_truncated(fmt, data)
    if reason:
        raise InputError(reason, path)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise InputError(f"corrupt {fmt} image (cannot decode it)", path)
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise InputError(f"unsupported pixel type {image.dtype} (expected 8 or 16 bit)", path)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        raise InputError(f"unsupported image layout {image.shape}", path)
    if warn is not None and is_grayscale(image):
        warn(path, GRAYSCALE)
    return np.ascontiguousarray(image)


class ColourCheck:
    """The ``warn`` of :func:`load_image` for one run: says once, on the first image without
    colour, that results may be poor, and remembers every such image.

    Args:
        emit: callable taking the message (default: print to stderr with a
            ``focas-keras: warning:`` prefix).

    Attributes:
        paths: the images without colour seen so far (as strings, in order).
    """

    MESSAGE = "{path} is {what}; the models expect H&E colour, results may be poor"

    def __init__(self, emit=None):
        self.emit = emit or _stderr_warning
        self.paths: list[str] = []

    def __call__(self, path, what: str = GRAYSCALE) -> None:
        self.paths.append(os.fspath(path))
        if len(self.paths) == 1:
            self.emit(self.MESSAGE.format(path=os.fspath(path), what=what))

    def summary(self) -> dict:
        """``{"grayscale_images": [...]}`` for a run record (empty list when all had colour)."""
        return {"grayscale_images": list(self.paths)}


def _stderr_warning(message: str) -> None:
    import sys

    print(f"focas-keras: warning: {message}", file=sys.stderr, flush=True)


def image_size(path) -> tuple[int, int]:
    """(width, height) of an image, read fully so that a broken file fails here, early."""
    image = load_image(path)
    return image.shape[1], image.shape[0]


def list_images(directory) -> list[Path]:
    """Image files directly inside ``directory`` (sorted); refuses duplicate stems."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError("not a directory", directory)
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    seen = {}
    for path in files:
        if path.stem in seen:
            raise InputError(f"duplicate image stem '{path.stem}' (also {seen[path.stem].name})",
                             path)
        seen[path.stem] = path
    return files


def check_inside(obj: dict, width: int, height: int, path, line=None) -> None:
    """Raises InputError if an object's centroid or pixels lie outside a width x height image."""
    pixels = obj.get("pixels")
    if pixels is not None and len(pixels):
        bad = ((pixels[:, 0] < 0) | (pixels[:, 0] >= width) | (pixels[:, 1] < 0)
               | (pixels[:, 1] >= height))
        if bad.any():
            px, py = pixels[np.argmax(bad)]
            raise InputError(
                f"coordinate ({px}, {py}) outside the {width}x{height} image", path, line)
    if not (0 <= obj["x"] < width and 0 <= obj["y"] < height):
        raise InputError(
            f"coordinate ({obj['x']:g}, {obj['y']:g}) outside the {width}x{height} image",
            path, line)


def clip_box(obj: dict, width: int, height: int) -> dict:
    """Clips an object's box to the image (a centroid square may cross the border)."""
    obj = dict(obj)
    obj["x1"], obj["x2"] = max(0.0, obj["x1"]), min(float(width), obj["x2"])
    obj["y1"], obj["y2"] = max(0.0, obj["y1"]), min(float(height), obj["y2"])
    return obj


def rel(path) -> str:
    """A path string for tables and messages (as given, no resolution)."""
    return os.fspath(path)
