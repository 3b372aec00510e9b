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
=============== ========= ==============================================================
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

MANIFEST = "manifest.json"
DET = "det"
CLS = "cls"
KINDS = (DET, CLS)


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
                center) -> bytes:
    """Serialises one classification patch (see the module docstring for the fields)."""
    features = {
        "image": _bytes([png]),
        "label": _ints([label]),
        "source": _bytes([source.encode()]),
        "image_id": _bytes([image_id.encode()]),
        "slide_id": _bytes([slide_id.encode()]),
        "center": _ints(center),
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
        ``image_id``, ``slide_id`` (string scalars) and ``center`` int64 [2].
    """
    parsed = tf.io.parse_single_example(serialized, CLS_FEATURES)
    image = tf.io.decode_png(parsed["image"], channels=3)
    parsed["image"] = tf.ensure_shape(image, [size, size, 3])
    return parsed
