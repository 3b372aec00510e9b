"""The TFRecord schema of the two shard kinds, shared by the writer and the tf.data readers.

``det`` records (one detection tile):

=============== ========= ==============================================================
image           bytes     PNG-encoded uint8 RGB tile (lossless: pixels come back exactly)
image_id        bytes     source image id
slide_id        bytes     source slide id
origin          int64[2]  tile's top-left (x, y) in the (possibly rescaled) source image
boxes           float[4N] x1, y1, x2, y2 per mitosis, tile pixels, x2/y2 exclusive
=============== ========= ==============================================================

``cls`` records (one classification patch):

=============== ========= ==============================================================
image           bytes     PNG-encoded uint8 RGB patch
label           int64     1 = mitosis, 0 = not a mitosis
source          bytes     ``mitosis``, ``background``, ``hard_negative`` or ``mined``
image_id        bytes     source image id
slide_id        bytes     source slide id
center          int64[2]  patch centre (x, y) in the (possibly rescaled) source image
score           float     stage-1 score of a mined candidate (optional; -1 when absent)
scanner         bytes     scanner of the source image (optional; empty when unknown, as in
                          shards written before it existed)
=============== ========= ==============================================================

``field`` records (one whole validation field, ``prepare --val-fields``), used to select
models and thresholds on what detection really sees instead of on tiles and patches:

=============== ========= ==============================================================
image           bytes     PNG-encoded uint8 RGB field (the whole, possibly rescaled, image)
image_id        bytes     source image id
slide_id        bytes     source slide id
mpp             float     pixel size of the stored field (um/px)
points          float[2N] x, y per mitosis centroid, field pixels
=============== ========= ==============================================================
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MANIFEST = "manifest.json"
DET = "det"
CLS = "cls"
FIELD = "field"
#: The kinds every ``prepare`` writes (``field`` only with ``--val-fields``).
KINDS = (DET, CLS)
#: A score feature of -1 means "not a mined candidate" (no stage-1 score).
NO_SCORE = -1.0


def _bytes(values):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=values))


def _ints(values):
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def _floats(values):
    return tf.train.Feature(float_list=tf.train.FloatList(value=[float(v) for v in values]))


def det_example(png: bytes, image_id: str, slide_id: str, origin, boxes) -> bytes:
    """Serialises one detection tile.

    Args:
        png: PNG bytes of the tile.
        image_id: source image id.
        slide_id: source slide id.
        origin: (x, y) of the tile's top-left corner in the source image.
        boxes: (N, 4) x1, y1, x2, y2 in tile pixels.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    features = {
        "image": _bytes([png]),
        "image_id": _bytes([image_id.encode()]),
        "slide_id": _bytes([slide_id.encode()]),
        "origin": _ints(origin),
        "boxes": _floats(boxes.reshape(-1)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def cls_example(png: bytes, label: int, source: str, image_id: str, slide_id: str,
                center, score: float | None = None, scanner: str = "") -> bytes:
    """Serialises one classification patch (see the module docstring for the fields).

    ``score``: the stage-1 score of a mined candidate; omitted (read back as -1) otherwise.
    ``scanner``: the source image's scanner; omitted when empty (read back as ``b""``).
    """
    features = {
        "image": _bytes([png]),
        "label": _ints([label]),
        "source": _bytes([source.encode()]),
        "image_id": _bytes([image_id.encode()]),
        "slide_id": _bytes([slide_id.encode()]),
        "center": _ints(center),
    }
    if score is not None:
        features["score"] = _floats([score])
    if scanner:
        features["scanner"] = _bytes([scanner.encode()])
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def field_example(png: bytes, image_id: str, slide_id: str, mpp: float, points) -> bytes:
    """Serialises one whole field with its mitosis centroids ((N, 2) x, y field pixels)."""
    points = np.asarray(points, np.float32).reshape(-1, 2)
    features = {
        "image": _bytes([png]),
        "image_id": _bytes([image_id.encode()]),
        "slide_id": _bytes([slide_id.encode()]),
        "mpp": _floats([mpp]),
        "points": _floats(points.reshape(-1)),
    }
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


DET_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "slide_id": tf.io.FixedLenFeature([], tf.string),
    "origin": tf.io.FixedLenFeature([2], tf.int64),
    "boxes": tf.io.VarLenFeature(tf.float32),
}

CLS_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "source": tf.io.FixedLenFeature([], tf.string),
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "slide_id": tf.io.FixedLenFeature([], tf.string),
    "center": tf.io.FixedLenFeature([2], tf.int64),
    "score": tf.io.FixedLenFeature([], tf.float32, default_value=NO_SCORE),
    "scanner": tf.io.FixedLenFeature([], tf.string, default_value=b""),
}

FIELD_FEATURES = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "image_id": tf.io.FixedLenFeature([], tf.string),
    "slide_id": tf.io.FixedLenFeature([], tf.string),
    "mpp": tf.io.FixedLenFeature([], tf.float32),
    "points": tf.io.VarLenFeature(tf.float32),
}


def parse_det(serialized, size: int) -> dict:
    """Parses one det record (graph mode).

    Args:
        serialized: scalar string tensor.
        size: tile side in pixels (static shape of the decoded image).

    Returns:
        dict with ``image`` uint8 [size, size, 3], ``boxes`` float32 [N, 4], ``image_id``,
        ``slide_id`` (string scalars) and ``origin`` int64 [2].
    """
    parsed = tf.io.parse_single_example(serialized, DET_FEATURES)
    image = tf.io.decode_png(parsed["image"], channels=3)
    image = tf.ensure_shape(image, [size, size, 3])
    boxes = tf.reshape(tf.sparse.to_dense(parsed["boxes"]), [-1, 4])
    return {"image": image, "boxes": boxes, "image_id": parsed["image_id"],
            "slide_id": parsed["slide_id"], "origin": parsed["origin"]}


def parse_cls(serialized, size: int) -> dict:
    """Parses one cls record (graph mode).

    Args:
        serialized: scalar string tensor.
        size: patch side in pixels.

    Returns:
        dict with ``image`` uint8 [size, size, 3], ``label`` int64 scalar, ``source``,
        ``image_id``, ``slide_id``, ``scanner`` (string scalars; ``scanner`` empty when
        unknown), ``center`` int64 [2] and ``score`` float32 scalar.
    """
    parsed = tf.io.parse_single_example(serialized, CLS_FEATURES)
    image = tf.io.decode_png(parsed["image"], channels=3)
    parsed["image"] = tf.ensure_shape(image, [size, size, 3])
    return parsed


def parse_field(serialized) -> dict:
    """Parses one field record (graph mode).

    Returns:
        dict with ``image`` uint8 [H, W, 3], ``points`` float32 [N, 2], ``mpp`` float32 scalar,
        ``image_id``, ``slide_id`` (string scalars).
    """
    parsed = tf.io.parse_single_example(serialized, FIELD_FEATURES)
    parsed["image"] = tf.io.decode_png(parsed["image"], channels=3)
    parsed["points"] = tf.reshape(tf.sparse.to_dense(parsed["points"]), [-1, 2])
    return parsed
