"""The FoCasNet cascade on whole images: Mdet candidates (stage 1), Mclass verification (stage 2).

Stage 1 runs Mdet on the whole image or on overlapping tiles. Each tile *owns* the box centres
up to the middle of its overlaps with its neighbours and keeps only those detections, so an
object no larger than the overlap is taken from a tile holding it whole, never as a copy cut by
a tile edge; class-agnostic NMS in image coordinates then merges whatever still overlaps.
Where Mdet's input must be larger than the image (a multiple of 32, or one tile), the image is
mirrored into the padding, and boxes mostly in the padding are dropped. Each Mdet call and
each image keep at most :func:`candidate_cap` candidates for their area, and each FPN level of
a call its :func:`level_topk` boxes before NMS (both grow with the area). Whole-image mode
tiles an image of more than :data:`WHOLE_IMAGE_MAX_PIXELS` Mdet pixels, to bound memory.
Stage 2 scores a reflect-padded crop around each candidate centre. Each stage runs at its own
pixel size (``det_mpp``, ``cls_mpp``; by default the one its training run's shards were prepared
at): the image is resized by ``mpp / stage mpp`` for that stage, and boxes come back in input
pixels. Stage 1 at half resolution (``prepare --target-mpp 0.4912`` for Mdet's shards) costs
about a quarter of the FLOPs, while stage 2 still sees full-resolution crops.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd

from focas_keras.datasets.annotations import ICPR2012_MPP, IMAGE_EXTENSIONS
from focas_keras.errors import InputError
from focas_keras.inference.resize import resize_by
from focas_keras.inference.tiling import (  # noqa: F401  (crop_patches, tile_starts: API)
    crop_patches, tile_starts)
from focas_keras.models.mclass import predict_proba, predict_proba_tta
from focas_keras.models.mclass_config import MclassConfig
from focas_keras.models.fold import fold_weight_standardization
from focas_keras.models.mdet import INPUT_MULTIPLE, Detector
from focas_keras.inference.engine import (  # noqa: F401  (RESULT_COLUMNS, merge_points: API)
    RESULT_COLUMNS, detect_field, merge_points, padded_size, run_field)


@dataclasses.dataclass(frozen=True)
class CascadeSettings:
    """How the cascade runs on an image; validated on construction (:class:`InputError`).

    Attributes:
        mpp: pixel size of the input images (um/px).
        model_mpp: pixel size both models were trained at, where a stage has no ``det_mpp`` /
            ``cls_mpp`` of its own; None: each stage's run decides (the ``--target-mpp`` its
            shards were prepared at), else the same as ``mpp`` (no rescaling).
        det_mpp: pixel size Mdet runs at (overrides ``model_mpp`` and the det run).
        cls_mpp: pixel size Mclass's crops are taken at (overrides ``model_mpp`` and the cls
            run).
        tile: 0 runs Mdet on the whole image at once (in :data:`AUTO_TILE` px tiles beyond
            :data:`WHOLE_IMAGE_MAX_PIXELS` Mdet pixels); otherwise the tile side (px, a
            multiple of 32), in Mdet's pixels.
        overlap: overlap of neighbouring tiles (px, < ``tile``); objects up to this size are
            always seen whole by some tile.
        tile_batch: tiles per Mdet forward pass.
        det_threshold: stage-1 score threshold; None: the det run's
            ``inference.score_threshold``.
        cls_threshold: stage-2 acceptance threshold (``cls_score >= cls_threshold``); None: the
            cls run's validation-best threshold (see
            :func:`~focas_keras.runs.run_cls_threshold`), but not below
            :data:`~focas_keras.runs.MIN_AUTO_CLS_THRESHOLD`.
        patch: side (px, Mclass's pixels) of the crop around each candidate centre, resized to the
            Mclass input; None: the cls run's ``crop_size`` (112, as in the paper).
        cls_batch: crops per Mclass forward pass.
        nms_iou: IoU of the class-agnostic NMS in image coordinates; None: the det run's
            ``inference.nms_iou``.
        merge_px: accepted detections whose centres lie within this distance (input px) of a
            higher-scored accepted one are the same cell and are no longer accepted (0: off).
            Box NMS at IoU 0.5 leaves offset boxes around one mitosis; each of their crops
            shows the mitosis, so stage 2 accepts them all. 30 px (7.4 um) is below the
            26-68 px size of a mitosis.
        max_candidates_per_mm2: the stage-1 candidate cap per mm^2 of image (see
            :func:`candidate_cap`): each Mdet call (the whole image or one tile) keeps at most
            the cap of its own area, and an image at most the cap of its area, so a 512 px
            tile and a 2084 px field no longer get the same fixed number. 2000 per mm^2 is
            about 524 on a 2084 px ICPR 2012 field at 0.2456 um/px.
        tta: stage 2 averages Mclass's probabilities over the 8 rotations/flips of each crop
            (:func:`~focas_keras.models.mclass.predict_proba_tta`; 8x its cost).
    """

    mpp: float = ICPR2012_MPP
    model_mpp: float | None = None
    det_mpp: float | None = None
    cls_mpp: float | None = None
    tile: int = 0
    overlap: int = 64
    tile_batch: int = 8
    det_threshold: float | None = None
    cls_threshold: float | None = None
    patch: int | None = None
    cls_batch: int = 256
    nms_iou: float | None = None
    merge_px: float = 30.0
    max_candidates_per_mm2: float = 2000.0
    tta: bool = False

    def __post_init__(self):
        def integer(v, low=0):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= low

        def number(v, low=0.0, high=math.inf, open_low=False):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            return ok and (v > low if open_low else v >= low) and v <= high

        rules = [  # (name, value, may be None, valid, what it must be)
            ("mpp", self.mpp, False, number(self.mpp, open_low=True), "> 0"),
            ("model mpp", self.model_mpp, True, number(self.model_mpp, open_low=True), "> 0"),
            ("det mpp", self.det_mpp, True, number(self.det_mpp, open_low=True), "> 0"),
            ("cls mpp", self.cls_mpp, True, number(self.cls_mpp, open_low=True), "> 0"),
            ("tile", self.tile, False, integer(self.tile) and self.tile % INPUT_MULTIPLE == 0,
             f"0 (whole image) or a positive multiple of {INPUT_MULTIPLE}"),
            ("overlap", self.overlap, False,
             integer(self.overlap) and (self.tile == 0 or self.overlap < self.tile),
             "an integer >= 0 and below the tile"),
            ("tile batch", self.tile_batch, False, integer(self.tile_batch, 1), "an integer >= 1"),
            ("detection threshold", self.det_threshold, True, number(self.det_threshold, 0, 1),
             "in [0, 1]"),
            ("classification threshold", self.cls_threshold, True,
             number(self.cls_threshold, 0, 1), "in [0, 1]"),
            ("patch", self.patch, True, integer(self.patch, 1), "an integer >= 1"),
            ("classification batch", self.cls_batch, False, integer(self.cls_batch, 1),
             "an integer >= 1"),
            ("NMS IoU", self.nms_iou, True, number(self.nms_iou, 0, 1, open_low=True),
             "in (0, 1]"),
            ("merge distance", self.merge_px, False, number(self.merge_px), ">= 0"),
            ("max candidates per mm^2", self.max_candidates_per_mm2, False,
             number(self.max_candidates_per_mm2, open_low=True), "> 0"),
            ("tta", self.tta, False, isinstance(self.tta, (bool, np.bool_)), "True or False")]
        for name, value, optional, valid, rule in rules:
            if not (valid or (optional and value is None)):
                raise InputError(f"{name} must be {rule}, got {value!r}")

    def stage_mpp(self, stage: str, run_mpp: float | None = None) -> float:
        """Pixel size ``stage`` (``det`` or ``cls``) runs at: its own setting, else
        ``model_mpp``, else ``run_mpp`` (what its training run recorded), else ``mpp``."""
        own = {"det": self.det_mpp, "cls": self.cls_mpp}[stage]
        for value in (own, self.model_mpp, run_mpp):
            if value is not None:
                return float(value)
        return float(self.mpp)


def candidate_cap(height_px: int, width_px: int, mpp: float, per_mm2: float) -> int:
    """The most stage-1 candidates an image (or tile) of this size may keep.

    ``ceil(per_mm2 * area_mm2)``, at least 1, with ``area_mm2 = height_px * width_px *
    (mpp / 1000)^2``. A product within 1e-6 above an integer counts as that integer, so float
    noise (0.25 mm^2 x 2000 = 500.0000000001) does not add a candidate. The exported graph
    computes the same float64 expression (:mod:`focas_keras.export.graph`).

    Args:
        height_px, width_px: the size in pixels of ``mpp`` um.
        mpp: pixel size (um/px).
        per_mm2: candidates per mm^2 (> 0).
    """
    return max(1, math.ceil(height_px * width_px * candidate_density(mpp, per_mm2) - 1e-6))


def candidate_density(mpp: float, per_mm2: float) -> float:
    """Candidates per pixel of ``mpp`` um at ``per_mm2`` candidates per mm^2."""
    return float(per_mm2) * (float(mpp) / 1000.0) ** 2


#: Side (Mdet px) of the square that the Mdet config's ``topk_per_level`` is meant for (the
#: default tile). A larger Mdet call keeps proportionally more boxes per level before NMS
#: (:func:`level_topk`): a fixed 1000 let a 10000 px image (5000 px at Mdet's 0.4912 um/px)
#: keep only the best 1000 boxes of its finest level, several boxes per cell, so whole-image
#: mode returned a third of the candidates tiles found. On a 1042 px ICPR field at most 747
#: boxes of a level reach the bundled model's stage-1 threshold, so the scaled top-k changes
#: nothing there.
TOPK_REFERENCE_PX = 512
#: Whole-image stage 1 on an image of more Mdet pixels than this runs in tiles of
#: :data:`AUTO_TILE` (one per call, the settings' overlap) instead: Mdet on a 5000 px image
#: at once needed about 4.5 GB. 3072^2 px is about 6144 px at 0.2456 um/px for an Mdet at
#: half resolution (about 9 ICPR fields).
WHOLE_IMAGE_MAX_PIXELS = 3072 * 3072
#: The tile (Mdet px) of whole-image mode beyond :data:`WHOLE_IMAGE_MAX_PIXELS`.
AUTO_TILE = 2048


def level_topk(height: int, width: int, topk_per_level: int) -> int:
    """Boxes each FPN level keeps before NMS in one Mdet call on ``height`` x ``width`` px:
    ``topk_per_level`` per :data:`TOPK_REFERENCE_PX` square, never fewer than
    ``topk_per_level``, so the top-k scales with the area as the candidate cap does."""
    ref = TOPK_REFERENCE_PX * TOPK_REFERENCE_PX
    return max(int(topk_per_level), math.ceil(int(topk_per_level) * height * width / ref))


class Cascade:
    """Mdet + Mclass on whole images; thresholds resolved once, at construction.

    Args:
        det_model, det_config: Mdet and its :class:`MdetConfig`.
        cls_model, cls_config: Mclass and its :class:`MclassConfig`; both None for stage 1
            only (:func:`~focas_keras.inference.loading.load_stage1`, what ``mine`` runs).
        settings: how to run.
        cls_threshold_default: the acceptance threshold when ``settings.cls_threshold`` is None
            (e.g. the run's validation-best threshold).
        det_threshold_default: the candidate threshold when ``settings.det_threshold`` is None
            (e.g. the run's :func:`~focas_keras.runs.run_det_threshold`); never below the config's
            ``inference.score_threshold``, which is used when this is None.
        det_mpp_default, cls_mpp_default: the pixel size each model was trained at (e.g. its
            run's :func:`~focas_keras.runs.run_data_mpp`), used where the settings name none.

    Attributes:
        det_threshold, cls_threshold, nms_iou, patch: the resolved settings in use.
        det_mpp, cls_mpp: the resolved pixel size of each stage (um/px).
        det_scale, cls_scale: each stage's pixels per input pixel (``mpp / stage mpp``).
        stage1_info: stage 1 of the last image run (None before the first):
            ``{"candidates": n kept, "cap": the image's candidate_cap, "cap_bound": bool,
            "calls": Mdet calls, "calls_at_cap": calls that returned their own cap,
            "tile": the tile side (0: whole image), "auto_tiled": bool, "call_cap": each
            call's NMS max output (its candidate_cap), "topk_per_level": each call's
            :func:`level_topk`, "calls_at_topk": calls where a level's top-k was full of
            boxes over the threshold, "bound": which caps may have cut candidates}``.
            ``bound`` lists ``per_level_topk`` (some call's top-k), ``call_nms_max`` (some
            call returned as many as its own cap) and ``image_cap`` (more than ``cap``
            survived the final NMS); ``cap_bound`` is True when it is not empty.
    """

    def __init__(self, det_model, det_config, cls_model, cls_config: MclassConfig,
                 settings: CascadeSettings = CascadeSettings(), cls_threshold_default=0.5,
                 det_threshold_default=None, det_mpp_default=None, cls_mpp_default=None):
        self.det_model, self.det_config = det_model, det_config
        self.cls_model, self.cls_config = cls_model, cls_config
        self.settings = settings
        self.det_mpp = settings.stage_mpp("det", det_mpp_default)
        self.cls_mpp = settings.stage_mpp("cls", cls_mpp_default)
        self.det_scale = float(settings.mpp) / self.det_mpp
        self.cls_scale = float(settings.mpp) / self.cls_mpp
        inference, s = det_config.inference, settings
        if s.det_threshold is not None:
            self.det_threshold = float(s.det_threshold)
        else:
            self.det_threshold = float(max(inference.score_threshold,
                                           det_threshold_default or 0.0))
        self.cls_threshold = float(cls_threshold_default if s.cls_threshold is None
                                   else s.cls_threshold)
        self.nms_iou = float(inference.nms_iou if s.nms_iou is None else s.nms_iou)
        if s.patch is not None:
            self.patch = int(s.patch)
        else:
            self.patch = None if cls_config is None else int(cls_config.crop_size)
        self._detectors = {}  # {(max_detections, top-k): Detector}, one per call size
        self.stage1_info = None

    @classmethod
    def from_runs(cls, det_run, cls_run, settings: CascadeSettings = CascadeSettings(),
                  which: str = "best") -> "Cascade":
        """Loads a ``train-det`` and a ``train-cls`` run directory
        (:func:`focas_keras.runs.load_cascade_runs` reads them); the cascade's ``model_key``
        is ``{"det": sha256, "cls": sha256}`` of the checkpoints loaded.

        Args:
            det_run, cls_run: the run directories.
            settings: how to run; its None thresholds come from the runs.
            which: ``best`` (``best.keras``, falling back to ``model.keras`` where a run has no
                best checkpoint) or ``model`` (the final weights).

        Raises:
            InputError: a missing directory, config or checkpoint, an unreadable file, or a
                run of the other kind (:func:`~focas_keras.runs.check_run_kind`).
        """
        from focas_keras.runs import load_cascade_runs

        runs = load_cascade_runs(det_run, cls_run, which)
        # Inference only: each WSConv2D's standardised kernel computed once, not per call
        # (outputs equal: tests/test_fold.py).
        cascade = cls(fold_weight_standardization(runs.det_model), runs.det_config,
                      runs.cls_model, runs.cls_config, settings, runs.cls_threshold,
                      runs.det_threshold, runs.det_mpp, runs.cls_mpp)
        cascade.model_key = runs.model_key
        return cascade

    # ------------------------------------------------------------------ overridable models

    def level_topk(self, height: int, width: int) -> int:
        """:func:`level_topk` of one Mdet call on ``height`` x ``width`` px."""
        return level_topk(height, width, self.det_config.inference.topk_per_level)

    def detect_images(self, batch: np.ndarray, max_detections: int, valid_size=None) -> list:
        """Mdet itself on float32 [N, h, w, 3] images in [0, 1], at most ``max_detections``
        each, each level keeping :meth:`level_topk` boxes of the batch's size before NMS;
        per image (boxes (D, 4), scores (D,), whether a level's top-k was full of boxes over
        the threshold), best first. Tests override it with a fake detector (which may leave
        out the flag or return more than ``max_detections``).

        ``valid_size`` (height, width): the top-left part of every image that is image, where
        the rest is padding (an image smaller than a tile); None: all of it.
        """
        topk = self.level_topk(*padded_size(*batch.shape[1:3]))
        detector = self._detectors.get((max_detections, topk))
        if detector is None:
            inference = dataclasses.replace(self.det_config.inference, topk_per_level=topk)
            detector = Detector(self.det_model,
                                dataclasses.replace(self.det_config, inference=inference),
                                self.det_threshold, max_detections=max_detections)
            self._detectors[(max_detections, topk)] = detector
        dets = detector(batch, *(valid_size or (None, None)))
        counts = dets["num_detections"].numpy()
        boxes, scores = dets["boxes"].numpy(), dets["scores"].numpy()
        full = dets["topk_full"].numpy()
        return [(boxes[i, :n], scores[i, :n], bool(full[i])) for i, n in enumerate(counts)]

    def classify_patches(self, patches: np.ndarray) -> np.ndarray:
        """Mclass itself: probabilities (float (N,)) of uint8 [N, P, P, 3] crops (averaged over
        the 8 dihedral transforms when ``settings.tta``); tests override it with a fake."""
        if self.cls_model is None:
            raise ValueError("this cascade has stage 1 only (no Mclass)")
        predict = predict_proba_tta if self.settings.tta else predict_proba
        return predict(self.cls_model, patches, self.cls_config.model.input_size,
                       self.settings.cls_batch)

    # ------------------------------------------------------------------ stages (public: the
    # engine, focas_keras.inference.engine, runs fields and slides through them)

    def model_image(self, image: np.ndarray, stage: str = "cls"
                    ) -> tuple[np.ndarray, float, float]:
        """The image in ``stage``'s pixels (``det`` or ``cls``) and the (x, y) scale factors
        from input pixels."""
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.size:
            raise ValueError(f"expected a uint8 RGB (H, W, 3) image, got {image.dtype} "
                             f"{image.shape}")
        return resize_by(image, self.det_scale if stage == "det" else self.cls_scale)

    def candidate_cap(self, height: int, width: int) -> int:
        """:func:`candidate_cap` of ``height`` x ``width`` Mdet pixels (``det_mpp``)."""
        return candidate_cap(height, width, self.det_mpp, self.settings.max_candidates_per_mm2)

    def detect_batch(self, batch: np.ndarray, cap: int, valid_size=None) -> list:
        """Stage 1 on a batch of images or tiles, each cut to its ``cap`` best candidates.

        Args:
            batch: float32 [N, h, w, 3] in [0, 1] (Mdet's pixels).
            cap: the most candidates per image (:meth:`candidate_cap` of its area).
            valid_size: (height, width) of every image's part that is image (the rest is
                mirrored padding); None: all of it.

        Returns:
            Per image (boxes float32 (D, 4) x1, y1, x2, y2 in its pixels, scores float32 (D,),
            best first; it reached ``cap``; a level's top-k was full of boxes over the
            threshold).
        """
        capped = []
        for found in self.detect_images(batch, cap, valid_size):
            boxes = np.asarray(found[0], np.float32).reshape(-1, 4)
            scores = np.asarray(found[1], np.float32).reshape(-1)
            order = np.argsort(-scores, kind="stable")[:cap]
            topk_full = bool(found[2]) if len(found) > 2 else False
            capped.append((boxes[order], scores[order], len(scores) >= cap, topk_full))
        return capped

    def stage1_tile(self, height: int, width: int) -> int:
        """The tile side stage 1 uses on ``height`` x ``width`` Mdet px: the settings' tile,
        or for whole-image mode :data:`AUTO_TILE` beyond :data:`WHOLE_IMAGE_MAX_PIXELS`
        (0: the whole image in one call)."""
        tile = self.settings.tile
        if tile == 0 and height * width > WHOLE_IMAGE_MAX_PIXELS:
            return AUTO_TILE
        return tile

    def detect_resized(self, image: np.ndarray):
        """Stage 1 on a uint8 (H, W, 3) image already in Mdet's pixels
        (:func:`~focas_keras.inference.engine.detect_field`); (boxes float32 (D, 4) in those
        pixels, scores float32 (D,)), best first. Sets :attr:`stage1_info`."""
        boxes, scores, self.stage1_info = detect_field(self, image)
        return boxes, scores

    def classify_boxes(self, image: np.ndarray, boxes) -> np.ndarray:
        """Stage 2: Mclass scores (float32 (D,)) of the crops around the centres of ``boxes``
        (float (D, 4) x1, y1, x2, y2), both the uint8 image and the boxes in Mclass's pixels;
        crops of :attr:`patch` px, reflect-padded at the image's edge."""
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
        centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
        scores = [np.zeros((0,), np.float32)]
        for start in range(0, len(centres), self.settings.cls_batch):
            patches = crop_patches(image, centres[start:start + self.settings.cls_batch],
                                   self.patch)
            scores.append(np.asarray(self.classify_patches(patches), np.float32).reshape(-1))
        return np.concatenate(scores)

    def stage1(self, image: np.ndarray):
        """Stage-1 candidates of a uint8 RGB (H, W, 3) image.

        Returns:
            (boxes float32 (D, 4) x1, y1, x2, y2 input pixels, det_scores float32 (D,)), best
            first, after the threshold and class-agnostic NMS, at most the image's
            :meth:`candidate_cap` (see :attr:`stage1_info`).
        """
        resized, sx, sy = self.model_image(image, "det")
        boxes, scores = self.detect_resized(resized)
        return boxes / np.array([sx, sy, sx, sy], np.float32), scores

    def stage2(self, image: np.ndarray, boxes) -> np.ndarray:
        """Mclass scores (float32 (D,)) of candidate boxes given in input pixels."""
        resized, sx, sy = self.model_image(image, "cls")
        boxes = np.asarray(boxes, np.float64).reshape(-1, 4) * np.array([sx, sy, sx, sy])
        return self.classify_boxes(resized, boxes)

    def run(self, image: np.ndarray) -> pd.DataFrame:
        """Both stages on one uint8 RGB image (:func:`~focas_keras.inference.engine.run_field`).

        Returns:
            One row per candidate, columns :data:`RESULT_COLUMNS` (x, y: box centre; input
            pixels), ``accepted`` = ``cls_score >= cls_threshold`` after the point merge
            (:func:`merge_points`); sorted by det_score, best first.
        """
        return run_field(self, image)


def list_inputs(paths) -> list[Path]:
    """Image files named by ``paths``: files as given, directories expanded (sorted).

    A directory contributes the files with :data:`IMAGE_EXTENSIONS` directly inside it.

    Raises:
        InputError: a path that does not exist, a file that is not an image by its extension,
            a directory holding no image, or two inputs with the same file stem (the stem
            names the image in every output).
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files, seen = [], {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.iterdir()
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not found:
                raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in directory", path)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"not an image file ({', '.join(IMAGE_EXTENSIONS)})", path)
            found = [path]
        else:
            raise InputError("input not found", path)
        for file in found:
            if file.stem in seen:
                raise InputError(f"duplicate image name '{file.stem}' (also {seen[file.stem]})",
                                 file)
            seen[file.stem] = file
            files.append(file)
    if not files:
        raise InputError("no input images given")
    return files
