"""Stateless augmentations: boxes follow pixels, determinism, stain round trip, tf.data use."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from focas_keras.data import augment as aug  # noqa: E402

SIZE = 64
SEEDS = [(7, i) for i in range(40)]


def _object_image(box, size=SIZE):
    """Zero image with the pixels of box (x1, y1, x2, y2) set to 1."""
    x1, y1, x2, y2 = box
    image = np.zeros((size, size, 3), np.float32)
    image[y1:y2, x1:x2] = 1.0
    return image


def _extent(image):
    """(x1, y1, x2, y2) of the pixels above 0.5, x2/y2 exclusive."""
    rows, cols = np.nonzero(np.asarray(image).max(-1) > 0.5)
    return (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def _random_image(seed=0, size=SIZE, low=0.0):
    return np.random.default_rng(seed).uniform(low, 1.0, (size, size, 3)).astype(np.float32)


_flip_rot90 = tf.function(aug.flip_rot90)
_translate = tf.function(aug.translate, reduce_retracing=True)


def test_flip_rot90_boxes_follow_the_object():
    box = (10, 20, 25, 28)
    image = _object_image(box)
    boxes = np.array([box, (0, 0, 0, 0), (3, 4, 5, 6)], np.float32)
    mask = np.array([True, False, False])
    seen = set()
    for seed in SEEDS:
        out, out_boxes, out_mask = _flip_rot90(image, boxes, mask, tf.constant(seed))
        assert _extent(out) == tuple(out_boxes.numpy()[0])
        np.testing.assert_array_equal(out_mask, mask)
        assert np.isfinite(out_boxes.numpy()).all()
        seen.add(tuple(out_boxes.numpy()[0]))
    assert len(seen) == 8  # all flip/rotation combinations of an asymmetric box occur


def test_flip_rot90_matches_numpy_rotation():
    image = _random_image(1)
    for seed in SEEDS[:8]:
        out, _, _ = aug.flip_rot90(image, np.zeros((0, 4), np.float32), np.zeros(0, bool),
                                   tf.constant(seed))
        candidates = [np.rot90(f, k) for f in (image, image[:, ::-1], image[::-1],
                                               image[::-1, ::-1]) for k in range(4)]
        assert any(np.array_equal(out.numpy(), c) for c in candidates)


def test_rot90_requires_square_images():
    image = np.zeros((32, 48, 3), np.float32)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError)):
        aug.flip_rot90(image, np.zeros((0, 4), np.float32), np.zeros(0, bool),
                       tf.constant([1, 2]))
    out, _, _ = aug.flip_rot90(image, np.zeros((0, 4), np.float32), np.zeros(0, bool),
                               tf.constant([1, 2]), rot90=False)
    assert out.shape == (32, 48, 3)


def test_translate_shifts_clips_and_invalidates():
    center = (24, 28, 36, 38)
    edge = (0, 30, 10, 40)  # at the left border: a shift left of more than 5 px hides half
    image = _object_image(center)
    boxes = np.array([center, edge, (5, 5, 5, 5)], np.float32)
    mask = np.array([True, True, False])
    max_px = 8
    kept = dropped = 0
    for seed in SEEDS:
        out, out_boxes, out_mask = _translate(image, boxes, mask, tf.constant(seed), max_px)
        out_boxes, out_mask = out_boxes.numpy(), out_mask.numpy()
        x1, y1, x2, y2 = _extent(out)
        dx, dy = x1 - center[0], y1 - center[1]
        assert abs(dx) <= max_px and abs(dy) <= max_px
        assert (x1, y1, x2, y2) == tuple(out_boxes[0]) and out_mask[0]
        shifted = np.array(edge, np.float32) + [dx, dy, dx, dy]
        clipped = np.clip(shifted, 0, SIZE)
        np.testing.assert_array_equal(out_boxes[1], clipped)
        visible = ((clipped[2] - clipped[0]) * (clipped[3] - clipped[1])
                   / ((shifted[2] - shifted[0]) * (shifted[3] - shifted[1])))
        assert out_mask[1] == (visible >= 0.5)
        kept += out_mask[1]
        dropped += not out_mask[1]
        assert not out_mask[2] and np.isfinite(out_boxes).all()
    assert kept and dropped


def test_translate_reflect_fill_and_float_mask():
    image = _random_image(2)
    mask = np.array([1.0, 0.0], np.float32)
    boxes = np.array([[20, 20, 30, 30], [0, 0, 0, 0]], np.float32)
    out, _, out_mask = aug.translate(image, boxes, mask, tf.constant([3, 4]), 8)
    assert out_mask.dtype == tf.float32
    np.testing.assert_array_equal(out_mask, [1.0, 0.0])
    padded = np.pad(image, [(8, 8), (8, 8), (0, 0)], mode="reflect")
    matches = [(dy, dx) for dy in range(-8, 9) for dx in range(-8, 9)
               if np.array_equal(out, padded[8 - dy:8 - dy + SIZE, 8 - dx:8 - dx + SIZE])]
    assert len(matches) == 1


def test_determinism():
    image = _random_image(3)
    boxes = np.array([[10, 10, 20, 20], [30, 30, 50, 44]], np.float32)
    mask = np.array([True, True])
    cfg = dataclasses.replace(aug.AugmentConfig(), blur_prob=0.5)
    first = aug.augment_det(image, boxes, mask, tf.constant([1, 2], tf.int64), cfg)
    again = aug.augment_det(image, boxes, mask, tf.constant([1, 2], tf.int64), cfg)
    other = aug.augment_det(image, boxes, mask, tf.constant([1, 3], tf.int64), cfg)
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])
    np.testing.assert_array_equal(aug.augment_cls(image, tf.constant([5, 6]), cfg),
                                  aug.augment_cls(image, tf.constant([5, 6]), cfg))
    assert not np.array_equal(aug.augment_cls(image, tf.constant([5, 6]), cfg),
                              aug.augment_cls(image, tf.constant([5, 7]), cfg))


def test_stain_round_trip_and_jitter():
    image = _random_image(4, low=0.01)
    hed = aug.rgb_to_hed(image)
    np.testing.assert_allclose(aug.hed_to_rgb(hed), image, atol=1e-4)
    np.testing.assert_allclose(aug.stain_jitter(image, tf.constant([1, 1]), 0.0), image,
                               atol=1e-4)
    dark = np.zeros((8, 8, 3), np.float32)  # -log(0) is guarded
    np.testing.assert_allclose(aug.stain_jitter(dark, tf.constant([1, 1]), 0.0), dark,
                               atol=1e-3)
    out = aug.stain_jitter(image, tf.constant([1, 1]), 0.1).numpy()
    assert out.min() >= 0 and out.max() <= 1 and np.isfinite(out).all()
    assert np.abs(out - image).max() > 1e-2


def test_stain_of_pure_haematoxylin_is_the_h_channel():
    od = np.array(aug.HEMATOXYLIN_OD, np.float32)
    od /= np.linalg.norm(od)
    pixel = np.exp(-0.8 * od)[None, None]
    np.testing.assert_allclose(aug.rgb_to_hed(pixel)[0, 0], [0.8, 0, 0], atol=1e-4)


def test_none_config_is_the_identity():
    image = _random_image(5)
    boxes = np.array([[1, 2, 3, 4], [0, 0, 0, 0]], np.float32)
    mask = np.array([True, False])
    out, out_boxes, out_mask = aug.augment_det(image, boxes, mask, tf.constant([9, 9]),
                                               aug.AugmentConfig.none())
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_boxes, boxes)
    np.testing.assert_array_equal(out_mask, mask)
    np.testing.assert_array_equal(
        aug.augment_cls(image, tf.constant([9, 9]), aug.AugmentConfig.none()), image)


def test_blur_and_noise():
    flat = np.full((SIZE, SIZE, 3), 0.4, np.float32)
    np.testing.assert_allclose(aug.gaussian_blur(flat, tf.constant([1, 1]), 1.0, 2.0), flat,
                               atol=1e-6)
    image = _random_image(6)
    blurred = aug.gaussian_blur(image, tf.constant([1, 1]), 1.0, 1.0).numpy()
    assert blurred.std() < image.std()
    np.testing.assert_array_equal(aug.gaussian_blur(image, tf.constant([1, 1]), 0.0, 1.0),
                                  image)
    noisy = aug.gaussian_noise(flat, tf.constant([2, 2]), 0.05).numpy()
    assert 0 < noisy.std() <= 0.06


def test_shapes_dtypes_and_range():
    cfg = dataclasses.replace(aug.AugmentConfig(), blur_prob=1.0, noise_std=0.1,
                              brightness=0.3)
    boxes = np.array([[10, 10, 20, 20]], np.float32)

    @tf.function(input_signature=[tf.TensorSpec([SIZE, SIZE, 3]), tf.TensorSpec([2], tf.int64)])
    def run(image, seed):
        out, out_boxes, out_mask = aug.augment_det(image, boxes, tf.constant([True]), seed, cfg)
        patch = aug.augment_cls(image[:32, :32], seed, cfg)
        assert out.shape == (SIZE, SIZE, 3) and patch.shape == (32, 32, 3)
        assert out_boxes.shape == (1, 4) and out_mask.shape == (1,)
        return out, out_boxes, out_mask, patch

    for i in range(5):
        out, out_boxes, out_mask, patch = run(_random_image(i), tf.constant([0, i], tf.int64))
        for image in (out, patch):
            assert image.dtype == tf.float32
            assert image.numpy().min() >= 0 and image.numpy().max() <= 1
        assert out_boxes.dtype == tf.float32 and out_mask.dtype == tf.bool


def test_inside_parallel_tf_data_map():
    images = np.stack([_random_image(i) for i in range(12)])
    boxes = np.tile(np.array([[[10, 12, 30, 28], [0, 0, 0, 0]]], np.float32), (12, 1, 1))
    masks = np.tile(np.array([[True, False]]), (12, 1))
    cfg = dataclasses.replace(aug.AugmentConfig(), blur_prob=0.5)

    def parse(index, element):
        image, box, mask = element
        seed = tf.stack([tf.constant(42, tf.int64), index])
        return aug.augment_det(image, box, mask, seed, cfg)

    ds = tf.data.Dataset.from_tensor_slices((images, boxes, masks)).enumerate()
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    assert ds.element_spec[0].shape == (SIZE, SIZE, 3)
    runs = [list(ds.as_numpy_iterator()) for _ in range(2)]
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    eager = aug.augment_det(images[3], boxes[3], masks[3], tf.constant([42, 3], tf.int64), cfg)
    np.testing.assert_allclose(runs[0][3][0], eager[0], atol=1e-6)
    np.testing.assert_array_equal(runs[0][3][1], eager[1])
    assert not np.array_equal(runs[0][0][0], runs[0][1][0])


def test_config_validation():
    with pytest.raises(ValueError, match="contrast"):
        aug.AugmentConfig(contrast=1.5)
    with pytest.raises(ValueError, match="blur_prob"):
        aug.AugmentConfig(blur_prob=-0.1)
    none = aug.AugmentConfig.none()
    assert not (none.flip or none.rot90 or none.translate_px or none.stain_sigma)


_zoom = tf.function(aug.zoom, reduce_retracing=True)


def test_zoom_boxes_follow_the_object_and_cover_the_range():
    box = (20, 26, 36, 34)
    image = _object_image(box)
    boxes = np.array([box, (0, 0, 0, 0)], np.float32)
    mask = np.array([True, False])
    widths = []
    for seed in SEEDS:
        out, out_boxes, out_mask = _zoom(image, boxes, mask, tf.constant(seed), 0.25)
        got = np.asarray(_extent(out), np.float64)
        # Bilinear edges land within a pixel of the scaled box.
        np.testing.assert_allclose(got, out_boxes.numpy()[0], atol=1.0)
        np.testing.assert_array_equal(out_mask, mask)
        widths.append(out_boxes.numpy()[0, 2] - out_boxes.numpy()[0, 0])
    factors = np.asarray(widths) / (box[2] - box[0])
    assert factors.min() >= 1 / 1.25 - 0.02 and factors.max() <= 1.25 + 0.02
    assert factors.min() < 0.9 and factors.max() > 1.1  # both ways occur in 40 draws


def test_zoom_off_is_the_identity_and_zoom_in_drops_boxes_pushed_out():
    image = _random_image(3)
    boxes = np.array([(0, 0, 6, 6), (28, 28, 36, 36)], np.float32)
    mask = np.array([True, True])
    out, out_boxes, out_mask = aug.zoom(image, boxes, mask, tf.constant((1, 1)), 0.0)
    np.testing.assert_array_equal(out, image)
    np.testing.assert_array_equal(out_boxes, boxes)
    dropped = kept = 0
    for seed in SEEDS:
        _, out_boxes, out_mask = _zoom(image, boxes, mask, tf.constant(seed), 0.5, 0.5)
        zoomed_in = out_boxes.numpy()[1, 2] - out_boxes.numpy()[1, 0] > 8
        assert out_mask.numpy()[1]  # the central box always stays
        if zoomed_in and out_boxes.numpy()[1, 2] - out_boxes.numpy()[1, 0] > 10:
            dropped += not out_mask.numpy()[0]  # the corner box is pushed half out
        kept += out_mask.numpy()[0]
    assert dropped > 0 and kept > 0


def test_zoom_leaves_the_other_draws_alone():
    """Turning zoom on does not change which flip and rotation an element gets: the box centre
    only moves along its ray from the image centre."""
    geometric = dict(translate_px=0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0,
                     stain_sigma=0.0, noise_std=0.0, blur_prob=0.0)
    plain = aug.AugmentConfig(scale=0.0, **geometric)
    zoomed = aug.AugmentConfig(scale=0.2, **geometric)
    box = np.array([[8, 12, 20, 18]], np.float32)
    image = _object_image((8, 12, 20, 18))
    for seed in SEEDS[:12]:
        _, a, _ = aug.augment_det(image, box, np.array([True]), tf.constant(seed), plain)
        _, b, _ = aug.augment_det(image, box, np.array([True]), tf.constant(seed), zoomed)
        ca = a.numpy()[0].reshape(2, 2).mean(0) - SIZE / 2
        cb = b.numpy()[0].reshape(2, 2).mean(0) - SIZE / 2
        factor = cb @ ca / (ca @ ca)
        np.testing.assert_allclose(cb, factor * ca, atol=0.6)
        assert 1 / 1.2 - 0.05 < factor < 1.2 + 0.05
    with pytest.raises(ValueError, match="scale"):
        aug.AugmentConfig(scale=1.0)
