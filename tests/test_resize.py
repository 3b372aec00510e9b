"""Resampling to a model's pixel size: one definition for Python and the exported graph."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from focas_keras.inference.resize import (  # noqa: E402
    graph_scaled_size, resize_by, scaled_size, shrink)


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_halving_averages_2x2_blocks():
    image = np.zeros((4, 6, 3), np.uint8)
    image[0:2, 0:2] = [[10], [30]]            # rows 10 and 30: block mean 20
    image[2:4, 4:6] = [[[0, 0, 0], [3, 3, 3]], [[0, 0, 0], [0, 0, 0]]]  # mean 0.75 -> 1
    small, sx, sy = resize_by(image, 0.5)
    assert small.shape == (2, 3, 3) and small.dtype == np.uint8 and (sx, sy) == (0.5, 0.5)
    assert small[0, 0, 0] == 20 and small[1, 2, 0] == 1 and small[0, 1, 0] == 0


@pytest.mark.parametrize("height, width, factor", [(2084, 2084, 0.5), (101, 157, 0.5),
                                                    (99, 64, 0.3)])
def test_within_one_grey_level_of_opencv_area(height, width, factor):
    """prepare --target-mpp resizes training images with OpenCV's INTER_AREA."""
    image = _image(height, width)
    small, sx, sy = resize_by(image, factor)
    new_h, new_w = scaled_size(height, width, factor)
    assert small.shape == (new_h, new_w, 3) and (sx, sy) == (new_w / width, new_h / height)
    want = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    assert np.abs(small.astype(int) - want).max() <= 1


def test_graph_sizes_and_pixels_equal_python():
    """The exported graph computes sizes and pixels with the same ops (bit for bit)."""
    for height, width in ((101, 157), (2084, 2085), (1, 3), (7, 7)):
        for factor in (0.5, 0.4912 / 0.2456 / 4, 0.3):
            h, w = graph_scaled_size(tf.constant(height), tf.constant(width), factor)
            assert (int(h), int(w)) == scaled_size(height, width, factor)
    image = _image(101, 157, 1)
    traced = tf.function(lambda x: shrink(x, *graph_scaled_size(tf.shape(x)[0],
                                                                tf.shape(x)[1], 0.5)))
    np.testing.assert_array_equal(traced(tf.constant(image)).numpy(), resize_by(image, 0.5)[0])


def test_sizes_round_half_to_even_and_never_vanish():
    assert scaled_size(101, 157, 0.5) == (50, 78)   # 50.5 -> 50, 78.5 -> 78
    assert scaled_size(103, 1, 0.5) == (52, 1)      # 51.5 -> 52; a side never drops to 0


def test_identity_and_enlarging():
    image = _image(10, 12)
    same, sx, sy = resize_by(image, 1.0)
    assert same is image and (sx, sy) == (1.0, 1.0)
    big, sx, sy = resize_by(image, 2.0)
    np.testing.assert_array_equal(big, cv2.resize(image, (24, 20),
                                                  interpolation=cv2.INTER_LINEAR))
    assert (sx, sy) == (2.0, 2.0)
