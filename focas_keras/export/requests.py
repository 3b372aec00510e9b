"""Readable runtime checks of serving requests, inside the exported graph.

The signatures declare no static rank, so these checks run whatever a server lets through;
each failure is an INVALID_ARGUMENT naming what was expected.
"""

from __future__ import annotations

import tensorflow as tf

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


def checked_images(images, max_pixels: int):
    """``images`` (any rank/shape) as uint8 [B, H, W, 3], after readable runtime checks.

    The signature declares no static rank, so these checks run in the graph whatever a server
    lets through; each failure is an INVALID_ARGUMENT naming what was expected.
    """
    shape = tf.shape(images, out_type=tf.int64)
    checks = [tf.debugging.assert_equal(
        tf.rank(images), 4, message="images must be uint8 [batch, height, width, 3]; got rank")]
    with tf.control_dependencies(checks):
        checks.append(tf.debugging.assert_equal(
            shape[-1], tf.constant(3, tf.int64),
            message="images must have 3 channels (RGB) in the last axis; got"))
    with tf.control_dependencies(checks):
        checks.append(tf.debugging.assert_positive(
            shape[1:3], message="image height and width must be > 0 (an empty image); got"))
    with tf.control_dependencies(checks):
        checks.append(tf.debugging.assert_less_equal(
            shape[1] * shape[2], tf.constant(max_pixels, tf.int64),
            message=f"image too large: height x width must be <= {max_pixels} pixels; got"))
    with tf.control_dependencies(checks):
        images = tf.identity(images)
    # A static shape only: tf.ensure_shape's own runtime check could fire first, less clearly.
    images.set_shape([None, None, None, 3])
    return images


def checked_bytes(image_bytes):
    """``image_bytes`` (any rank) as a string [batch], after a readable runtime check."""
    check = tf.debugging.assert_rank(
        image_bytes, 1, message="image_bytes must be a string tensor [batch] of encoded images")
    with tf.control_dependencies([check]):
        image_bytes = tf.identity(image_bytes)
    image_bytes.set_shape([None])
    return image_bytes


def decode_checked(data, max_pixels: int):
    """One encoded JPEG or PNG (scalar string) -> uint8 [H, W, 3], checked before decoding.

    The size is read from the PNG header / the JPEG frame header first, so an oversized image
    is refused before it is decompressed.
    """
    head = tf.strings.substr(tf.strings.join([data, tf.constant(b"\0" * 24)]), 0, 24)
    is_png = tf.equal(tf.strings.substr(head, 0, 8), _PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(head, 0, 3), _JPEG_MAGIC)
    check = tf.debugging.Assert(
        tf.logical_or(is_png, is_jpeg),
        ["image_bytes: not a JPEG or PNG image (first bytes:",
         tf.strings.substr(head, 0, 8), ")"])
    with tf.control_dependencies([check]):
        size = tf.cond(
            is_png,
            lambda: tf.io.decode_raw(tf.strings.substr(head, 16, 8), tf.int32,
                                     little_endian=False)[::-1],  # IHDR: width, height
            lambda: tf.image.extract_jpeg_shape(data)[:2])  # height, width
    size = tf.cast(size, tf.int64)
    checks = [tf.debugging.assert_positive(
        size, message="image_bytes: image height and width must be > 0; got")]
    with tf.control_dependencies(checks):
        checks.append(tf.debugging.assert_less_equal(
            size[0] * size[1], tf.constant(max_pixels, tf.int64),
            message=f"image_bytes: image too large: height x width must be <= {max_pixels} "
                    "pixels; got"))
    with tf.control_dependencies(checks):
        image = tf.cond(is_png,
                        lambda: tf.io.decode_png(data, channels=3),
                        lambda: tf.io.decode_jpeg(data, channels=3))
    return tf.ensure_shape(image, [None, None, 3])
