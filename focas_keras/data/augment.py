"""Deterministic, graph-mode augmentations for detection tiles and classification patches.

Every function runs inside ``tf.data.Dataset.map`` and draws its randomness only from
stateless ops keyed by an explicit ``seed`` (int32/int64 tensor of shape [2]), so an element
gets the same augmentation however many threads run the map. Each op gets its own sub-seed
split from the element seed.

Conventions: images are float32 [H, W, 3] in [0, 1] (one example, not batched; square where
rotated); boxes are float32 [N, 4] as (x1, y1, x2, y2) tile pixels with x = column, y = row
and x2/y2 exclusive; ``mask`` [N] (bool or float) marks real boxes. Invalid boxes stay invalid
and finite. Static shapes are preserved.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

# Stain optical-density vectors (rows: haematoxylin, eosin, DAB; columns: R, G, B) from
# A. C. Ruifrok and D. A. Johnston, "Quantification of histochemical staining by color
# deconvolution", Analytical and Quantitative Cytology and Histology 23(4), 2001.
HEMATOXYLIN_OD = (0.65, 0.70, 0.29)
EOSIN_OD = (0.07, 0.99, 0.11)
DAB_OD = (0.27, 0.57, 0.78)

_STAINS = np.array([HEMATOXYLIN_OD, EOSIN_OD, DAB_OD], np.float64)
_STAINS /= np.linalg.norm(_STAINS, axis=1, keepdims=True)
# numpy, not tf.constant, so that no eager tensor gets captured by traced map functions.
_RGB_FROM_HED = _STAINS.astype(np.float32)                  # OD = C @ this
_HED_FROM_RGB = np.linalg.inv(_STAINS).astype(np.float32)   # C = OD @ this
_MIN_INTENSITY = 1e-6  # keeps -log finite on black pixels


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Augmentation settings; a zero (or False) value switches that augmentation off.

    Attributes:
        flip: random horizontal and vertical flips.
        rot90: random rotation by a multiple of 90 degrees (square images only).
        translate_px: largest shift in pixels per axis (reflect fill); must be < H and W.
        scale: zoom about the image centre by a factor drawn log-uniformly in
            [1 / (1 + scale), 1 + scale] (bilinear; reflect fill when zooming out), so that
            cells and mitoses of other sizes than the training slides' are seen; 0 is off.
        brightness: largest brightness delta.
        contrast: contrast factor range [1 - contrast, 1 + contrast].
        saturation: saturation factor range [1 - saturation, 1 + saturation].
        hue: largest hue delta (at most 0.5).
        stain_sigma: HED stain jitter, per-stain scale in 1 +- sigma and shift in +- sigma.
        noise_std: largest Gaussian noise std (the std is drawn in [0, noise_std]).
        blur_prob: probability of a Gaussian blur.
        blur_sigma: largest blur sigma in pixels; the kernel spans +- ceil(3 * blur_sigma).
        min_visible: least fraction of a box's area that must stay in the tile after the
            shift for the box to stay valid.
    """

    flip: bool = True
    rot90: bool = True
    translate_px: int = 8
    scale: float = 0.0
    brightness: float = 0.08
    contrast: float = 0.15
    saturation: float = 0.15
    hue: float = 0.03
    stain_sigma: float = 0.05
    noise_std: float = 0.02
    blur_prob: float = 0.2
    blur_sigma: float = 1.0
    min_visible: float = 0.5

    def __post_init__(self):
        checks = {
            "translate_px": self.translate_px >= 0 and int(self.translate_px) == self.translate_px,
            "scale": 0 <= self.scale < 1,
            "brightness": self.brightness >= 0,
            "contrast": 0 <= self.contrast < 1,
            "saturation": 0 <= self.saturation < 1,
            "hue": 0 <= self.hue <= 0.5,
            "stain_sigma": 0 <= self.stain_sigma < 1,
            "noise_std": self.noise_std >= 0,
            "blur_prob": 0 <= self.blur_prob <= 1,
            "blur_sigma": self.blur_sigma >= 0,
            "min_visible": 0 <= self.min_visible <= 1,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"AugmentConfig.{name} out of range: {getattr(self, name)!r}")

    @classmethod
    def none(cls) -> "AugmentConfig":
        """Every augmentation off: augment_det / augment_cls return their inputs unchanged."""
        return cls(flip=False, rot90=False, translate_px=0, scale=0.0, brightness=0.0, contrast=0.0,
                   saturation=0.0, hue=0.0, stain_sigma=0.0, noise_std=0.0, blur_prob=0.0,
                   blur_sigma=0.0)


def _split(seed, num):
    """[num, 2] independent sub-seeds of ``seed``."""
    return tf.random.experimental.stateless_split(tf.convert_to_tensor(seed), num=num)


def _coin(seed):
    """A fair stateless coin flip, bool scalar."""
    return tf.random.stateless_uniform([], seed) < 0.5


def _image(image):
    return tf.convert_to_tensor(image, tf.float32)


def _keep_shape(result, like):
    result.set_shape(like.shape)
    return result


def flip_rot90(image, boxes, mask, seed, flip=True, rot90=True):
    """Random horizontal/vertical flips, then a random rotation by k * 90 degrees.

    Args:
        image: float32 [S, S, 3]; must be square when ``rot90`` (checked).
        boxes: float32 [N, 4] (x1, y1, x2, y2).
        mask: [N] validity, returned unchanged.
        seed: int [2].
        flip: draw the flips.
        rot90: draw the rotation (k in 0..3, counter-clockwise as ``tf.image.rot90``).

    Returns:
        (image [S, S, 3], boxes [N, 4], mask [N]) with the boxes following the pixels exactly.
    """
    image = out = _image(image)
    hseed, vseed, kseed = tf.unstack(_split(seed, 3))
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    height = tf.cast(tf.shape(image)[0], tf.float32)
    width = tf.cast(tf.shape(image)[1], tf.float32)
    x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
    if flip:
        hflip, vflip = _coin(hseed), _coin(vseed)
        out = tf.cond(hflip, lambda: tf.reverse(out, [1]), lambda: out)
        x1, x2 = tf.where(hflip, width - x2, x1), tf.where(hflip, width - x1, x2)
        out = tf.cond(vflip, lambda: tf.reverse(out, [0]), lambda: out)
        y1, y2 = tf.where(vflip, height - y2, y1), tf.where(vflip, height - y1, y2)
    if rot90:
        square = tf.debugging.assert_equal(tf.shape(image)[0], tf.shape(image)[1],
                                           message="rot90 needs square images")
        k = tf.random.stateless_uniform([], kseed, minval=0, maxval=4, dtype=tf.int32)
        with tf.control_dependencies([square] if square is not None else []):
            out = tf.image.rot90(out, k)
        size = width
        # Counter-clockwise by 90: pixel (row r, col c) moves to (size - 1 - c, r).
        candidates = tf.stack([
            tf.stack([x1, y1, x2, y2], -1),
            tf.stack([y1, size - x2, y2, size - x1], -1),
            tf.stack([size - x2, size - y2, size - x1, size - y1], -1),
            tf.stack([size - y2, x1, size - y1, x2], -1),
        ])
        boxes = tf.gather(candidates, k)
    else:
        boxes = tf.stack([x1, y1, x2, y2], -1)
    return _keep_shape(out, image), boxes, tf.convert_to_tensor(mask)


def _draw_shift(seed, max_px):
    """(dy, dx) int32 scalars, each uniform in [-max_px, max_px]."""
    shift = tf.random.stateless_uniform([2], seed, minval=-max_px, maxval=max_px + 1,
                                        dtype=tf.int32)
    return shift[0], shift[1]


def _shift_image(image, dy, dx, max_px):
    """Moves the content by (dy, dx) pixels, filling the uncovered border by reflection."""
    padded = tf.pad(image, [[max_px, max_px], [max_px, max_px], [0, 0]], mode="REFLECT")
    out = tf.slice(padded, tf.stack([max_px - dy, max_px - dx, 0]), tf.shape(image))
    return _keep_shape(out, image)


def _and_mask(mask, keep):
    """``mask AND keep`` in the dtype of ``mask`` (bool, or float 0/1)."""
    mask = tf.convert_to_tensor(mask)
    if mask.dtype == tf.bool:
        return tf.logical_and(mask, keep)
    return mask * tf.cast(keep, mask.dtype)


def translate(image, boxes, mask, seed, max_px, min_visible=0.5):
    """Random integer shift in [-max_px, max_px] per axis with reflect fill.

    Args:
        image: float32 [H, W, 3]; H and W must exceed ``max_px`` (reflect padding).
        boxes: float32 [N, 4] (x1, y1, x2, y2).
        mask: [N] validity (bool or float).
        seed: int [2].
        max_px: Python int, largest shift; 0 returns the inputs unchanged.
        min_visible: a box stays valid only if at least this fraction of its area is left
            in the tile; zero-area boxes become invalid.

    Returns:
        (image [H, W, 3], boxes [N, 4] shifted and clipped to the tile, mask [N]).
    """
    image = _image(image)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    if not max_px:
        return image, boxes, tf.convert_to_tensor(mask)
    dy, dx = _draw_shift(seed, int(max_px))
    out = _shift_image(image, dy, dx, int(max_px))
    fdx, fdy = tf.cast(dx, tf.float32), tf.cast(dy, tf.float32)
    shifted = boxes + tf.stack([fdx, fdy, fdx, fdy])
    clipped, keep = _clip_visible(shifted, tf.shape(image), min_visible)
    return out, clipped, _and_mask(mask, keep)


def _clip_visible(moved, shape, min_visible):
    """(boxes [N, 4] clipped to an image of ``shape``, keep [N]): a box stays valid when it
    has area and at least ``min_visible`` of that area is left inside the image."""
    height = tf.cast(shape[0], tf.float32)
    width = tf.cast(shape[1], tf.float32)
    clipped = tf.clip_by_value(moved, 0.0, tf.stack([width, height, width, height]))

    def area(b):
        return tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)

    visible = tf.math.divide_no_nan(area(clipped), area(moved))
    return clipped, tf.logical_and(area(moved) > 0, visible >= min_visible)


def _zoom_seed(seed):
    # Folded in rather than split off, so that the other augmentations of an element draw the
    # same values whether zoom is on or off.
    return tf.random.experimental.stateless_fold_in(tf.convert_to_tensor(seed), 7919)


def zoom(image, boxes, mask, seed, max_scale, min_visible=0.5):
    """Random zoom about the image centre, log-uniform in [1 / (1 + s), 1 + s].

    The image is resized (bilinear, antialiased when shrinking) to round(z * H) x round(z * W),
    then cut back to H x W around its centre, or padded to it by reflection when z < 1.

    Args:
        image: float32 [H, W, 3].
        boxes: float32 [N, 4] (x1, y1, x2, y2).
        mask: [N] validity (bool or float).
        seed: int [2].
        max_scale: Python float ``s`` in [0, 1); 0 returns the inputs unchanged.
        min_visible: a box stays valid only if at least this fraction of its zoomed area is
            left in the image.

    Returns:
        (image [H, W, 3], boxes [N, 4] scaled with the pixels and clipped, mask [N]).
    """
    image = _image(image)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    if not max_scale:
        return image, boxes, tf.convert_to_tensor(mask)
    bound = math.log1p(max_scale)
    factor = tf.exp(tf.random.stateless_uniform([], seed, minval=-bound, maxval=bound))
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    new_h = tf.maximum(tf.cast(tf.round(tf.cast(height, tf.float32) * factor), tf.int32), 1)
    new_w = tf.maximum(tf.cast(tf.round(tf.cast(width, tf.float32) * factor), tf.int32), 1)
    resized = tf.image.resize(image, tf.stack([new_h, new_w]), antialias=True)
    pad_h, pad_w = tf.maximum(height - new_h, 0), tf.maximum(width - new_w, 0)
    top, left = pad_h // 2, pad_w // 2
    padded = tf.pad(resized, [[top, pad_h - top], [left, pad_w - left], [0, 0]],
                    mode="REFLECT")
    off_y = (tf.shape(padded)[0] - height) // 2
    off_x = (tf.shape(padded)[1] - width) // 2
    out = tf.slice(padded, tf.stack([off_y, off_x, 0]), tf.stack([height, width, 3]))
    # The exact per-axis factors (rounding), then the pad/crop offsets.
    zy = tf.cast(new_h, tf.float32) / tf.cast(height, tf.float32)
    zx = tf.cast(new_w, tf.float32) / tf.cast(width, tf.float32)
    dy = tf.cast(top - off_y, tf.float32)
    dx = tf.cast(left - off_x, tf.float32)
    moved = boxes * tf.stack([zx, zy, zx, zy]) + tf.stack([dx, dy, dx, dy])
    clipped, keep = _clip_visible(moved, shape, min_visible)
    return _keep_shape(out, image), clipped, _and_mask(mask, keep)


def color_jitter(image, seed, cfg: AugmentConfig):
    """Random brightness, contrast, saturation and hue (``tf.image.stateless_random_*``).

    Args:
        image: float32 [H, W, 3] in [0, 1].
        seed: int [2].
        cfg: uses ``brightness``, ``contrast``, ``saturation`` and ``hue``; zero skips one.

    Returns:
        float32 [H, W, 3] clipped to [0, 1] after every step.
    """
    image = out = _image(image)
    seeds = tf.unstack(_split(seed, 4))
    if cfg.brightness:
        out = tf.image.stateless_random_brightness(out, cfg.brightness, seeds[0])
        out = tf.clip_by_value(out, 0.0, 1.0)
    if cfg.contrast:
        out = tf.image.stateless_random_contrast(out, 1 - cfg.contrast, 1 + cfg.contrast,
                                                 seeds[1])
        out = tf.clip_by_value(out, 0.0, 1.0)
    if cfg.saturation:
        out = tf.image.stateless_random_saturation(out, 1 - cfg.saturation,
                                                   1 + cfg.saturation, seeds[2])
        out = tf.clip_by_value(out, 0.0, 1.0)
    if cfg.hue:
        out = tf.image.stateless_random_hue(out, cfg.hue, seeds[3])
        out = tf.clip_by_value(out, 0.0, 1.0)
    return _keep_shape(out, image)


def rgb_to_hed(image):
    """Colour deconvolution: float32 [..., 3] RGB in [0, 1] -> stain concentrations (H, E, DAB)."""
    density = -tf.math.log(tf.maximum(_image(image), _MIN_INTENSITY))
    return tf.tensordot(density, _HED_FROM_RGB, axes=1)


def hed_to_rgb(hed):
    """Inverse of :func:`rgb_to_hed`: float32 [..., 3] concentrations -> RGB clipped to [0, 1]."""
    density = tf.tensordot(_image(hed), _RGB_FROM_HED, axes=1)
    return tf.clip_by_value(tf.exp(-density), 0.0, 1.0)


def stain_jitter(image, seed, sigma):
    """HED stain augmentation (Tellez et al. 2018): per stain ``c' = alpha * c + beta``.

    alpha is uniform in [1 - sigma, 1 + sigma] and beta in [-sigma, sigma], one pair per
    stain channel. With sigma 0 the result equals the image up to float rounding (~1e-6).

    Args:
        image: float32 [H, W, 3] in [0, 1].
        seed: int [2].
        sigma: Python float jitter strength.

    Returns:
        float32 [H, W, 3] in [0, 1].
    """
    image = _image(image)
    aseed, bseed = tf.unstack(_split(seed, 2))
    alpha = tf.random.stateless_uniform([3], aseed, minval=1.0 - sigma, maxval=1.0 + sigma)
    beta = tf.random.stateless_uniform([3], bseed, minval=-sigma, maxval=sigma)
    out = hed_to_rgb(rgb_to_hed(image) * alpha + beta)
    return _keep_shape(out, image)


def gaussian_noise(image, seed, max_std):
    """Adds Gaussian noise whose std is drawn uniformly in [0, max_std].

    Args:
        image: float32 [H, W, 3] in [0, 1].
        seed: int [2].
        max_std: Python float; 0 returns the image unchanged.

    Returns:
        float32 [H, W, 3] clipped to [0, 1].
    """
    image = _image(image)
    if not max_std:
        return image
    sseed, nseed = tf.unstack(_split(seed, 2))
    std = tf.random.stateless_uniform([], sseed, minval=0.0, maxval=max_std)
    noise = tf.random.stateless_normal(tf.shape(image), nseed) * std
    return _keep_shape(tf.clip_by_value(image + noise, 0.0, 1.0), image)


def _blur(image, sigma, radius):
    """Separable Gaussian blur (reflect border) of float32 [H, W, C] with a 2*radius+1 kernel."""
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * tf.square(taps / sigma))
    kernel /= tf.reduce_sum(kernel)
    channels = tf.shape(image)[-1]
    rows = tf.tile(tf.reshape(kernel, [-1, 1, 1, 1]), [1, 1, channels, 1])
    cols = tf.reshape(rows, [1, -1, channels, 1])
    padded = tf.pad(image, [[radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    out = tf.nn.depthwise_conv2d(padded[None], rows, [1, 1, 1, 1], "VALID")
    out = tf.nn.depthwise_conv2d(out, cols, [1, 1, 1, 1], "VALID")
    return out[0]


def gaussian_blur(image, seed, prob, max_sigma):
    """With probability ``prob``, a Gaussian blur with sigma uniform in (0, max_sigma].

    The kernel size is fixed per ``max_sigma``: 2 * ceil(3 * max_sigma) + 1 (7 for sigma 1).

    Args:
        image: float32 [H, W, 3]; H and W must exceed the kernel radius.
        seed: int [2].
        prob: Python float probability; 0 returns the image unchanged.
        max_sigma: Python float largest sigma in pixels; 0 returns the image unchanged.

    Returns:
        float32 [H, W, 3].
    """
    image = _image(image)
    if not prob or not max_sigma:
        return image
    radius = max(1, math.ceil(3 * max_sigma))
    pseed, sseed = tf.unstack(_split(seed, 2))
    apply = tf.random.stateless_uniform([], pseed) < prob
    # A sigma near 0 would make the kernel 0/0; below 1e-3 it is a delta anyway.
    sigma = tf.maximum(tf.random.stateless_uniform([], sseed, maxval=max_sigma), 1e-3)
    out = tf.cond(apply, lambda: _blur(image, sigma, radius), lambda: tf.identity(image))
    return _keep_shape(out, image)


def _photometric(image, seeds, cfg):
    """Stain, colour, blur then noise, with one sub-seed each from ``seeds`` [4, 2]."""
    if cfg.stain_sigma:
        image = stain_jitter(image, seeds[0], cfg.stain_sigma)
    image = color_jitter(image, seeds[1], cfg)
    image = gaussian_blur(image, seeds[2], cfg.blur_prob, cfg.blur_sigma)
    return gaussian_noise(image, seeds[3], cfg.noise_std)


def augment_det(image, boxes, mask, seed, cfg: AugmentConfig):
    """Detection augmentation: flips/rot90, zoom and translation, then photometric changes.

    Args:
        image: float32 [S, S, 3] in [0, 1].
        boxes: float32 [N, 4] (x1, y1, x2, y2) tile pixels.
        mask: [N] validity (bool or float); boxes mostly shifted out become invalid.
        seed: int [2], e.g. (global seed, element index).
        cfg: the settings; ``AugmentConfig.none()`` returns the inputs unchanged.

    Returns:
        (image float32 [S, S, 3] in [0, 1], boxes float32 [N, 4], mask [N]).
    """
    image, boxes = _image(image), tf.convert_to_tensor(boxes, tf.float32)
    mask = tf.convert_to_tensor(mask)
    seeds = _split(seed, 6)
    if cfg.flip or cfg.rot90:
        image, boxes, mask = flip_rot90(image, boxes, mask, seeds[0], cfg.flip, cfg.rot90)
    image, boxes, mask = zoom(image, boxes, mask, _zoom_seed(seed), cfg.scale, cfg.min_visible)
    image, boxes, mask = translate(image, boxes, mask, seeds[1], cfg.translate_px,
                                   cfg.min_visible)
    return _photometric(image, seeds[2:], cfg), boxes, mask


def augment_cls(image, seed, cfg: AugmentConfig):
    """Classification augmentation: as :func:`augment_det` without boxes.

    Args:
        image: float32 [P, P, 3] in [0, 1].
        seed: int [2].
        cfg: the settings.

    Returns:
        float32 [P, P, 3] in [0, 1].
    """
    image = _image(image)
    seeds = _split(seed, 6)
    if cfg.flip or cfg.rot90:
        image, _, _ = flip_rot90(image, tf.zeros([0, 4]), tf.zeros([0], tf.bool), seeds[0],
                                 cfg.flip, cfg.rot90)
    if cfg.scale:
        image, _, _ = zoom(image, tf.zeros([0, 4]), tf.zeros([0], tf.bool), _zoom_seed(seed),
                           cfg.scale)
    if cfg.translate_px:
        dy, dx = _draw_shift(seeds[1], int(cfg.translate_px))
        image = _shift_image(image, dy, dx, int(cfg.translate_px))
    return _photometric(image, seeds[2:], cfg)
