"""The FoCasNet cascade as one TensorFlow graph, for SavedModel export and TF Serving.

Every step of :meth:`focas_keras.inference.cascade.Cascade.run` in tiled mode runs inside the
graph, with the same arithmetic: uint8 pixels -> mirror-pad to at least one tile (as
:func:`~focas_keras.models.mdet.mirror_indices`) -> tiles on the
:func:`~focas_keras.inference.tiling.tile_starts` grid -> Mdet on batches of ``tile_batch``
tiles (static tile size, so anchors are built once), each tile keeping at most the
:func:`~focas_keras.inference.cascade.candidate_cap` of its area -> boxes offset to image
pixels, kept only in the tile that owns their centre -> clip, threshold, class-agnostic NMS
(the best ``min(max_detections, candidate_cap of the image)`` kept) -> ``patch`` px crops
around each candidate centre,
reflect-padded exactly like :func:`~focas_keras.inference.tiling.crop_patches` -> resized
to the Mclass input like :func:`~focas_keras.models.mclass.resize_patches` -> Mclass ->
``accepted = probability >= cls_threshold`` -> the greedy ``merge_px`` point merge of
:func:`~focas_keras.inference.cascade.merge_points`. With ``tta`` (the bundled model's
default, as for ``detect``), Mclass scores each crop under its 8 rotations/flips and the
probability is their mean, as :func:`~focas_keras.models.mclass.predict_proba_tta`. Each Mdet
call keeps the :func:`~focas_keras.inference.cascade.level_topk` of its tile's size per FPN
level before NMS, as the Python cascade does.

Outputs per image (TF Model Garden names), padded with zeros to ``max_detections`` (D) rows,
sorted by the stage-1 score, best first, as the rows of ``Cascade.run``:

- ``detection_boxes`` float32 [B, D, 4]: ``[ymin, xmin, ymax, xmax]`` in input pixels (Model
  Garden's order; ``xmax``/``ymax`` exclusive, as in ``detections.csv``).
- ``detection_scores`` float32 [B, D]: stage-2 (Mclass) probability.
- ``detection_det_scores`` float32 [B, D]: stage-1 (Mdet) score.
- ``detection_classes`` int32 [B, D]: 1 = accepted mitosis, 0 = rejected candidate (and
  padding; ``num_detections`` says how many rows are real).
- ``num_detections`` int32 [B]: candidates returned (<= D).

The arithmetic is the same, not bit for bit the same (TensorFlow fuses the exported graph
differently, Mclass sees other batches): scores differ by ~1e-6, which can swap near-ties.
:mod:`focas_keras.export.compare` says which differences that explains.

Images must be at Mclass's pixel size. Where Mdet was trained at a coarser one (``det_scale``
< 1, e.g. 0.5 for stage 1 at half resolution), the graph shrinks each image for stage 1 with
the same ops as the Python cascade (:mod:`focas_keras.inference.resize`) and maps the boxes
back; stage 2 crops the full-resolution image. The export never enlarges images.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from focas_keras.errors import InputError
from focas_keras.export.requests import checked_bytes, checked_images, decode_checked
from focas_keras.inference.cascade import candidate_cap, candidate_density, level_topk
from focas_keras.inference.resize import graph_scaled_size, shrink
from focas_keras.models.mclass import resize_patches
from focas_keras.models.mdet import INPUT_MULTIPLE, detect_batch, mirror_indices

#: Output keys of the cascade signatures, in a fixed order.
CASCADE_OUTPUTS = ("detection_boxes", "detection_scores", "detection_det_scores",
                   "detection_classes", "num_detections")
#: Output keys of the Mdet-only signatures.
MDET_OUTPUTS = ("detection_boxes", "detection_scores", "num_detections")
#: Input names of the signatures (REST: a ``{"b64": ...}`` value needs a name ending in
#: ``_bytes``).
IMAGES_KEY, BYTES_KEY, PATCHES_KEY = "images", "image_bytes", "patches"
#: Signature names.
DEFAULT_SIGNATURE, BYTES_SIGNATURE = "serving_default", "serving_bytes"


@dataclasses.dataclass(frozen=True)
class GraphSettings:
    """The resolved settings baked into an exported graph.

    Attributes:
        tile, overlap, tile_batch: the tiling of stage 1 (tile a multiple of 32, overlap <
            tile); the graph always runs tiled.
        det_threshold, nms_iou: stage-1 score threshold and NMS IoU.
        cls_threshold: stage-2 acceptance threshold (``probability >= cls_threshold``).
        patch: crop side (px) around each candidate centre.
        merge_px: the accepted-point merge radius (0: off).
        max_detections: D, the candidates kept per image (best stage-1 scores first).
        max_pixels: the largest image (height x width) a request may send.
        det_scale: Mdet pixels per input pixel, in (0, 1] (1: stage 1 on the image as sent).
        det_mpp, max_candidates_per_mm2: Mdet's pixel size (um/px) and the per-area
            candidate cap of :class:`~focas_keras.inference.cascade.CascadeSettings`; each tile
            keeps at most :meth:`tile_cap` and each image at most ``min(max_detections,
            candidate_cap(its size in Mdet's pixels))``. Both None: tiles keep the Mdet
            config's ``max_detections``, images ``max_detections``.
        tta: stage 2 averages Mclass's probabilities over the 8 rotations/flips of each crop
            (:func:`classify`), as ``CascadeSettings.tta``.
    """

    tile: int
    overlap: int
    tile_batch: int
    det_threshold: float
    nms_iou: float
    cls_threshold: float
    patch: int
    merge_px: float
    max_detections: int = 300
    max_pixels: int = 25_000_000
    det_scale: float = 1.0
    det_mpp: float | None = None
    max_candidates_per_mm2: float | None = None
    tta: bool = False

    def __post_init__(self):
        per_area = (self.det_mpp, self.max_candidates_per_mm2)
        ok = (self.tile > 0 and self.tile % INPUT_MULTIPLE == 0 and 0 <= self.overlap < self.tile
              and self.tile_batch >= 1 and self.patch >= 1 and self.max_detections >= 1
              and self.max_pixels >= 1 and self.merge_px >= 0 and 0 < self.det_scale <= 1
              and (per_area == (None, None) or (None not in per_area and min(per_area) > 0)))
        if not ok:
            raise InputError(f"invalid export settings {self}: tile must be a positive multiple "
                             f"of {INPUT_MULTIPLE}, overlap below it, batches, patch, max "
                             "detections and max pixels >= 1, det scale in (0, 1], det mpp and "
                             "max candidates per mm^2 both None or both > 0")

    @property
    def per_area(self) -> bool:
        """Whether candidates are capped per area (else by fixed numbers)."""
        return self.max_candidates_per_mm2 is not None

    def tile_cap(self, default: int) -> int:
        """Candidates one tile's Mdet call keeps: ``candidate_cap(tile, tile)``, or
        ``default`` (the Mdet config's ``max_detections``) without a per-area cap."""
        if not self.per_area:
            return int(default)
        return candidate_cap(self.tile, self.tile, self.det_mpp, self.max_candidates_per_mm2)

    @classmethod
    def from_cascade(cls, cascade, max_detections: int = 300,
                     max_pixels: int = 25_000_000) -> "GraphSettings":
        """The settings of a tiled :class:`Cascade` whose Mclass runs on the images as sent
        and whose Mdet runs on them as sent or shrunk (``cls_scale == 1``, ``det_scale <= 1``).
        """
        s = cascade.settings
        if s.tile <= 0:
            raise InputError("the export runs stage 1 in tiles: give a tile size (e.g. 512)")
        if cascade.cls_scale != 1.0 or cascade.det_scale > 1.0:
            raise InputError(
                f"the export takes images at Mclass's pixel size and can only shrink them for "
                f"Mdet; here the images are at {s.mpp:g} um/px, Mdet runs at "
                f"{cascade.det_mpp:g} and Mclass at {cascade.cls_mpp:g} um/px (set --mpp to "
                "Mclass's)")
        if not (isinstance(max_detections, int) and max_detections >= 1):
            raise InputError(f"max detections must be an integer >= 1, got {max_detections!r}")
        if not (isinstance(max_pixels, int) and max_pixels >= 1):
            raise InputError(f"max pixels must be an integer >= 1, got {max_pixels!r}")
        return cls(tile=int(s.tile), overlap=int(s.overlap), tile_batch=int(s.tile_batch),
                   det_threshold=float(cascade.det_threshold), nms_iou=float(cascade.nms_iou),
                   cls_threshold=float(cascade.cls_threshold), patch=int(cascade.patch),
                   merge_px=float(s.merge_px), max_detections=int(max_detections),
                   max_pixels=int(max_pixels), det_scale=float(cascade.det_scale),
                   det_mpp=float(cascade.det_mpp),
                   max_candidates_per_mm2=float(s.max_candidates_per_mm2), tta=bool(s.tta))


# --------------------------------------------------------------------------- building blocks


def tile_grid(length, tile: int, overlap: int):
    """In-graph :func:`~focas_keras.inference.tiling.tile_starts` for ``length >= tile``.

    Returns:
        (starts int32 [n], lo float32 [n], hi float32 [n]): tile origins and the half-open
        centre range each tile owns (:func:`~focas_keras.inference.tiling.ownership`: up to
        the middle of each overlap).
    """
    starts = tf.concat([tf.range(0, length - tile, tile - overlap), [length - tile]], 0)
    s = tf.cast(starts, tf.float32)  # exact below 2^23 px
    mids = (s[:-1] + float(tile) + s[1:]) / 2.0
    lo = tf.concat([[-math.inf], mids], 0)
    hi = tf.concat([mids, [math.inf]], 0)
    return starts, lo, hi


def reflect_indices(centre, size: int, length):
    """Source indices along one axis of ``size`` px crops centred on ``centre``.

    Reproduces :func:`focas_keras.inference.tiling.reflect_crop` exactly: the part of the crop
    inside the image,
    then OpenCV ``BORDER_REFLECT_101`` padding repeated (each step at most ``inner - 1`` px,
    as cv2 requires) until the crop is full.

    Args:
        centre: int32 [N] centre pixels, already inside ``[0, length)``.
        size: the crop side.
        length: int32 scalar, the image side.

    Returns:
        int32 [N, size] indices into ``[0, length)``.
    """
    x0 = centre - size // 2
    a = tf.maximum(x0, 0)
    b = tf.minimum(x0 + size, length)
    pad_lo, pad_hi = a - x0, x0 + size - b
    lo, hi = a, b
    bounds = []
    for _ in range(int(size).bit_length() + 2):  # the inner part at least ~doubles per step
        limit = tf.maximum(1, hi - lo - 1)
        step_lo, step_hi = tf.minimum(pad_lo, limit), tf.minimum(pad_hi, limit)
        bounds.append((lo[:, None], hi[:, None]))
        lo, hi = lo - step_lo, hi + step_hi
        pad_lo, pad_hi = pad_lo - step_lo, pad_hi - step_hi
    u = x0[:, None] + tf.range(size)[None, :]
    for lo, hi in reversed(bounds):  # undo the paddings, last first
        u = tf.where(u < lo, 2 * lo - u, u)
        u = tf.where(u >= hi, 2 * (hi - 1) - u, u)
        u = tf.clip_by_value(u, lo, hi - 1)  # a 1-px inner part repeats (cv2's rule)
    return u


def crop_patches(image, centres, size: int):
    """In-graph :func:`~focas_keras.inference.tiling.crop_patches`.

    Args:
        image: uint8 [H, W, 3].
        centres: float64 [N, 2] x, y; rounded half to even (as ``np.round``) and clamped.
        size: crop side.

    Returns:
        uint8 [N, size, size, 3].
    """
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    centres = tf.cast(tf.round(centres), tf.int32)
    cx = tf.clip_by_value(centres[:, 0], 0, width - 1)
    cy = tf.clip_by_value(centres[:, 1], 0, height - 1)
    rows = reflect_indices(cy, size, height)
    cols = reflect_indices(cx, size, width)
    flat = rows[:, :, None] * width + cols[:, None, :]
    patches = tf.gather(tf.reshape(image, [-1, 3]), flat)
    return tf.ensure_shape(patches, [None, size, size, 3])


def merge_points(centres, scores, accepted, radius: float):
    """In-graph :func:`~focas_keras.inference.cascade.merge_points` (greedy, by score).

    Args:
        centres: float64 [N, 2]; scores: float32 [N]; accepted: bool [N].
        radius: python float; 0 turns merging off.

    Returns:
        bool [N].
    """
    if radius <= 0:
        return accepted
    n = tf.shape(scores)[0]
    order = tf.argsort(-scores, stable=True)
    diff = centres[:, None, :] - centres[None, :, :]
    close = tf.sqrt(tf.reduce_sum(diff * diff, -1)) <= radius

    def body(k, keep):
        i = order[k]
        ok = tf.logical_and(accepted[i],
                            tf.logical_not(tf.reduce_any(tf.logical_and(keep, close[i]))))
        return k + 1, tf.tensor_scatter_nd_update(keep, [[i]], [ok])

    _, keep = tf.while_loop(lambda k, keep: k < n, body, (0, tf.zeros([n], tf.bool)))
    return keep


def _pad_rows(tensor, rows: int):
    """Zero-pads (or cuts) the first axis to ``rows``."""
    tensor = tensor[:rows]
    extra = rows - tf.shape(tensor)[0]
    paddings = [[0, extra]] + [[0, 0]] * (tensor.shape.rank - 1)
    return tf.pad(tensor, paddings)


# --------------------------------------------------------------------------- modules


class _Untracked:
    """Holds Keras models and functions out of ``tf.Module``'s attribute tracking."""

    def __init__(self, **items):
        self.__dict__.update(items)


_IMAGE_SPEC = tf.TensorSpec([None, None, 3], tf.uint8)


def _function(fn, *specs):
    return tf.function(fn, autograph=False, input_signature=list(specs))


def _batch_signatures(per_image, output_spec: dict, max_pixels: int) -> dict:
    """The two serving functions over a per-image function: uint8 pixels and encoded bytes."""

    def images_fn(images):
        images = checked_images(images, max_pixels)
        return tf.map_fn(per_image, images, parallel_iterations=1,
                         fn_output_signature=output_spec)

    def bytes_fn(image_bytes):
        image_bytes = checked_bytes(image_bytes)
        return tf.map_fn(lambda data: per_image(decode_checked(data, max_pixels)), image_bytes,
                         parallel_iterations=1, fn_output_signature=output_spec)

    return {DEFAULT_SIGNATURE: _function(images_fn, tf.TensorSpec(None, tf.uint8, IMAGES_KEY)),
            BYTES_SIGNATURE: _function(bytes_fn, tf.TensorSpec(None, tf.string, BYTES_KEY))}


class ServingModule(tf.Module):
    """A ``tf.Module`` that tracks only its models' variables and serves its signatures.

    Tracking the Keras models themselves would make ``tf.saved_model.save`` walk every layer;
    tf.function attributes would be traced a second time under the save context. So only the
    variables are attributes (as ``keras.export.ExportArchive`` does) and the functions reach
    the SavedModel as signatures, traced once.
    """

    def __init__(self, models: dict, name: str):
        super().__init__(name=name)
        self._held = _Untracked(concrete=None, **models)
        self.model_variables = [v for model in models.values() for v in model.variables]

    def _signature_functions(self) -> dict:
        """``{signature name: tf.function}``; every subclass defines its own."""
        raise NotImplementedError

    def signatures(self) -> dict:
        """``{signature name: concrete function}`` (traced on the first call)."""
        if self._held.concrete is None:
            self._held.concrete = {key: fn.get_concrete_function()
                                   for key, fn in self._signature_functions().items()}
        return self._held.concrete


class TiledStage1:
    """Stage 1 in tiles as one traced function, shared by the cascade and Mdet-only modules.

    Args:
        det_model, det_config: Mdet and its config (decoding settings).
        settings: :class:`GraphSettings`.
    """

    def __init__(self, det_model, det_config, settings: GraphSettings):
        inference = det_config.inference
        topk = level_topk(settings.tile, settings.tile, inference.topk_per_level)
        self.det_model, self.settings = det_model, settings
        self.det_config = dataclasses.replace(
            det_config, inference=dataclasses.replace(inference, topk_per_level=topk))
        self.tile_cap = settings.tile_cap(inference.max_detections)
        self.function = _function(self.stage1, _IMAGE_SPEC)

    def _detect_chunk(self, tiles, valid_height, valid_width):
        """Mdet on uint8 [b, T, T, 3] -> boxes [b, K, 4], scores [b, K], counts [b]; K =
        :attr:`tile_cap`; ``valid_*``: int32 scalars, the part of each tile that is image."""
        dets = detect_batch(self.det_model, tf.cast(tiles, tf.float32) / 255.0, self.det_config,
                            score_threshold=self.settings.det_threshold,
                            max_detections=self.tile_cap, valid_height=valid_height,
                            valid_width=valid_width)
        return dets["boxes"], dets["scores"], dets["num_detections"]

    def _detect_tiles(self, tiles, count, valid_height, valid_width):
        """Mdet on ``count`` uint8 tiles [count, T, T, 3] in consecutive chunks of
        ``tile_batch`` (the last one shorter), as the Python cascade batches them: the same
        batch shapes give the same convolution arithmetic, so near-equal scores keep their
        order. ``valid_*``: int32 scalars, the part of every tile that is image (below the
        tile side only where the image is smaller than a tile, whose tiles all start at 0
        there). Returns boxes [count, K, 4], scores [count, K], counts [count]."""
        batch, k = self.settings.tile_batch, self.tile_cap
        chunks = (count + batch - 1) // batch
        arrays = [tf.TensorArray(dtype, size=chunks, infer_shape=False, element_shape=shape)
                  for dtype, shape in ((tf.float32, [None, k, 4]), (tf.float32, [None, k]),
                                       (tf.int32, [None]))]

        def body(c, *arrays):
            found = self._detect_chunk(tiles[c * batch:(c + 1) * batch], valid_height,
                                       valid_width)
            return (c + 1,) + tuple(a.write(c, x) for a, x in zip(arrays, found))

        _, *arrays = tf.while_loop(lambda c, *_: c < chunks, body, [0] + arrays,
                                   parallel_iterations=1)
        return tuple(a.concat() for a in arrays)

    def stage1(self, image):
        """uint8 [H, W, 3] -> (boxes float64 [N, 4] x1 y1 x2 y2 input pixels, scores float32
        [N]), N <= D, best first: ``Cascade.detect_resized`` (with its per-area caps) capped at
        ``max_detections`` on the image shrunk by ``det_scale``, boxes divided by the exact
        factors as in ``Cascade.run``."""
        scale = self.settings.det_scale
        if scale == 1.0:
            boxes, scores = self._stage1_tiled(image)
            return tf.cast(boxes, tf.float64), scores
        shape = tf.shape(image)
        height, width = graph_scaled_size(shape[0], shape[1], scale)
        boxes, scores = self._stage1_tiled(shrink(image, height, width))
        sx = tf.cast(width, tf.float64) / tf.cast(shape[1], tf.float64)
        sy = tf.cast(height, tf.float64) / tf.cast(shape[0], tf.float64)
        return tf.cast(boxes, tf.float64) / tf.stack([sx, sy, sx, sy]), scores

    def _stage1_tiled(self, image):
        """Stage 1 in Mdet's pixels: boxes float32 [N, 4], scores [N]."""
        s = self.settings
        tile = s.tile
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        ph, pw = tf.maximum(height, tile), tf.maximum(width, tile)
        padded = tf.gather(tf.gather(image, mirror_indices(height, ph)),
                           mirror_indices(width, pw), axis=1)
        ys, y_lo, y_hi = tile_grid(ph, tile, s.overlap)
        xs, x_lo, x_hi = tile_grid(pw, tile, s.overlap)
        ny, nx = tf.shape(ys)[0], tf.shape(xs)[0]
        strips = tf.gather(padded, ys[:, None] + tf.range(tile)[None, :])  # [ny, T, pw, 3]
        tiles = tf.gather(strips, xs[:, None] + tf.range(tile)[None, :], axis=2)
        tiles = tf.reshape(tf.transpose(tiles, [0, 2, 1, 3, 4]), [-1, tile, tile, 3])
        count = ny * nx
        boxes, scores, counts = self._detect_tiles(tiles, count, tf.minimum(height, tile),
                                                   tf.minimum(width, tile))
        k = tf.shape(boxes)[1]
        row, col = tf.range(count) // nx, tf.range(count) % nx
        ox, oy = tf.cast(tf.gather(xs, col), tf.float32), tf.cast(tf.gather(ys, row), tf.float32)
        boxes = boxes + tf.stack([ox, oy, ox, oy], -1)[:, None, :]
        cx = (boxes[..., 0] + boxes[..., 2]) / 2.0
        cy = (boxes[..., 1] + boxes[..., 3]) / 2.0
        fw, fh = tf.cast(width, tf.float32), tf.cast(height, tf.float32)
        keep = ((tf.range(k)[None, :] < counts[:, None])
                & (cx >= tf.gather(x_lo, col)[:, None]) & (cx < tf.gather(x_hi, col)[:, None])
                & (cy >= tf.gather(y_lo, row)[:, None]) & (cy < tf.gather(y_hi, row)[:, None])
                & (cx <= fw) & (cy <= fh))
        boxes, scores = tf.boolean_mask(boxes, keep), tf.boolean_mask(scores, keep)
        boxes = tf.stack([tf.clip_by_value(boxes[:, 0], 0.0, fw),
                          tf.clip_by_value(boxes[:, 1], 0.0, fh),
                          tf.clip_by_value(boxes[:, 2], 0.0, fw),
                          tf.clip_by_value(boxes[:, 3], 0.0, fh)], 1)
        keep = ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                & (scores >= tf.constant(s.det_threshold, tf.float32)))
        boxes, scores = tf.boolean_mask(boxes, keep), tf.boolean_mask(scores, keep)
        chosen = tf.image.non_max_suppression(tf.gather(boxes, [1, 0, 3, 2], axis=1), scores,
                                              max_output_size=self._image_cap(height, width),
                                              iou_threshold=s.nms_iou)
        return tf.gather(boxes, chosen), tf.gather(scores, chosen)

    def _image_cap(self, height, width):
        """int32 scalar: ``min(max_detections, candidate_cap(height, width))`` for an image of
        int32 ``height`` x ``width`` Mdet pixels, in the float64 arithmetic of
        :func:`~focas_keras.inference.cascade.candidate_cap`."""
        s = self.settings
        if not s.per_area:
            return tf.constant(s.max_detections, tf.int32)
        pixels = tf.cast(height, tf.float64) * tf.cast(width, tf.float64)  # exact below 2^53
        density = tf.constant(candidate_density(s.det_mpp, s.max_candidates_per_mm2),
                              tf.float64)
        cap = tf.maximum(tf.math.ceil(pixels * density - 1e-6), 1.0)
        return tf.minimum(tf.cast(cap, tf.int32), s.max_detections)


class CascadeGraph(ServingModule):
    """Both stages: signatures ``serving_default`` (uint8 ``images`` [batch, H, W, 3]) and
    ``serving_bytes`` (``image_bytes``: encoded JPEG/PNG string [batch]), outputs
    :data:`CASCADE_OUTPUTS` (see the module docstring).

    Args:
        stage1: the :class:`TiledStage1` (its Mdet and settings are used).
        cls_model, cls_config: Mclass and its config (input size).
    """

    def __init__(self, stage1: TiledStage1, cls_model, cls_config, name="focasnet"):
        super().__init__({"det": stage1.det_model, "cls": cls_model}, name=name)
        self._stage1, self._settings = stage1, stage1.settings
        self._input_size = int(cls_config.model.input_size)

    def classify(self, patches):
        """Mclass probabilities (float32 [N]) of uint8 [N, h, w, 3] patches (with the
        settings' TTA)."""
        return classify(self._held.cls, patches, self._input_size, self._settings.tta)

    def detect_image(self, image):
        """Both stages on one uint8 [H, W, 3] image; a dict of the D-row outputs."""
        s = self._settings
        d = s.max_detections
        wide, det_scores = self._stage1.function(image)
        boxes = tf.cast(wide, tf.float32)
        centres = (wide[:, :2] + wide[:, 2:]) / 2.0
        cls_scores = self.classify(crop_patches(image, centres, s.patch))
        accepted = merge_points(centres, cls_scores,
                                cls_scores >= tf.constant(s.cls_threshold, tf.float32),
                                s.merge_px)
        return {
            "detection_boxes": _pad_rows(tf.gather(boxes, [1, 0, 3, 2], axis=1), d),
            "detection_scores": _pad_rows(cls_scores, d),
            "detection_det_scores": _pad_rows(det_scores, d),
            "detection_classes": _pad_rows(tf.cast(accepted, tf.int32), d),
            "num_detections": tf.shape(boxes)[0],
        }

    def _signature_functions(self) -> dict:
        d = self._settings.max_detections
        spec = {"detection_boxes": tf.TensorSpec([d, 4], tf.float32),
                "detection_scores": tf.TensorSpec([d], tf.float32),
                "detection_det_scores": tf.TensorSpec([d], tf.float32),
                "detection_classes": tf.TensorSpec([d], tf.int32),
                "num_detections": tf.TensorSpec([], tf.int32)}
        return _batch_signatures(_function(self.detect_image, _IMAGE_SPEC), spec,
                                 self._settings.max_pixels)


class MdetGraph(ServingModule):
    """Stage 1 alone (the same tiling, threshold and NMS): ``serving_default`` and
    ``serving_bytes`` as for the cascade, outputs :data:`MDET_OUTPUTS`."""

    def __init__(self, stage1: TiledStage1, name="mdet"):
        super().__init__({"det": stage1.det_model}, name=name)
        self._stage1, self._settings = stage1, stage1.settings

    def detect_candidates(self, image):
        d = self._settings.max_detections
        boxes, scores = self._stage1.function(image)
        boxes = tf.cast(boxes, tf.float32)
        return {"detection_boxes": _pad_rows(tf.gather(boxes, [1, 0, 3, 2], axis=1), d),
                "detection_scores": _pad_rows(scores, d),
                "num_detections": tf.shape(boxes)[0]}

    def _signature_functions(self) -> dict:
        d = self._settings.max_detections
        spec = {"detection_boxes": tf.TensorSpec([d, 4], tf.float32),
                "detection_scores": tf.TensorSpec([d], tf.float32),
                "num_detections": tf.TensorSpec([], tf.int32)}
        return _batch_signatures(_function(self.detect_candidates, _IMAGE_SPEC), spec,
                                 self._settings.max_pixels)


def classify(cls_model, patches, input_size: int, tta: bool = False):
    """Mclass probabilities (float32 [N]) of uint8 [N, h, w, 3] patches (N may be 0), as
    :func:`~focas_keras.models.mclass.predict_proba`, or with ``tta`` as
    :func:`~focas_keras.models.mclass.predict_proba_tta`: the mean of the probabilities of
    the 8 views ``np.rot90(p, k, axes=(1, 2))`` for k = 0..3 of the patches and of them
    flipped left-right, each view scored on its own as there."""
    def probabilities(images):
        logits = cls_model(resize_patches(images, input_size), training=False)
        return tf.sigmoid(tf.cast(logits, tf.float32))[:, 0]

    def run():
        if not tta:
            return probabilities(patches)
        views = [_rot90(p, k) for p in (patches, tf.reverse(patches, [2])) for k in range(4)]
        return tf.reduce_mean(tf.stack([probabilities(v) for v in views]), 0)

    return tf.cond(tf.shape(patches)[0] > 0, run, lambda: tf.zeros([0], tf.float32))


def _rot90(patches, k: int):
    """``np.rot90(patches, k, axes=(1, 2))`` of [N, h, w, C] (counter-clockwise quarter
    turns), without ``tf.image.rot90``'s runtime asserts inside the serving graph."""
    if k % 4 == 1:
        return tf.reverse(tf.transpose(patches, [0, 2, 1, 3]), [1])
    if k % 4 == 2:
        return tf.reverse(patches, [1, 2])
    if k % 4 == 3:
        return tf.transpose(tf.reverse(patches, [1]), [0, 2, 1, 3])
    return patches


class MclassGraph(ServingModule):
    """Stage 2 alone: ``serving_default`` takes uint8 ``patches`` [N, h, w, 3] of any size
    (e.g. 112 px crops around candidates), resizes them to the Mclass input and returns
    ``probabilities`` float32 [N] (averaged over the 8 rotations/flips with ``tta``)."""

    def __init__(self, cls_model, cls_config, max_pixels: int = 25_000_000, name="mclass",
                 tta: bool = False):
        super().__init__({"cls": cls_model}, name=name)
        self._input_size, self._max_pixels = int(cls_config.model.input_size), int(max_pixels)
        self._tta = bool(tta)

    def _signature_functions(self) -> dict:
        def patches_fn(patches):
            patches = checked_images(patches, self._max_pixels)
            return {"probabilities": classify(self._held.cls, patches, self._input_size,
                                              self._tta)}

        return {DEFAULT_SIGNATURE: _function(patches_fn,
                                             tf.TensorSpec(None, tf.uint8, PATCHES_KEY))}
