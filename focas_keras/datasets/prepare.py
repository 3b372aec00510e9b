"""``focas-keras prepare``: an annotation set -> det and cls TFRecord shards + manifest.json.

Every image is first brought to ``target_mpp``. Shards hold one pixel size, so a dataset whose
images come at several pixel sizes needs one: the AMi-Br format (per-crop 0.23 / 0.25 um/px)
defaults to :data:`~focas_keras.datasets.annotations.ICPR2012_MPP` (0.2456 um/px, the stage pixel size
of the ICPR-trained models); other formats keep their pixel size unless told.

Images smaller than a det tile (AMi-Br's 128 px crops: 120-130 px at 0.2456 um/px, against
224 px tiles) give no det tiles by default for AMi-Br (``det_small_images="skip"``): a tile
would be mostly reflection, a border Mdet never meets on whole fields. ``"pad"`` (the default
of the other formats) cuts them reflect-padded as before. Their cls patches are cut as
everywhere (reflect-padded where a patch leaves the crop; 112 px patches around a centred
figure fit inside such a crop up to the positive jitter).

``"mosaic"`` packs them into mosaic tiles instead (:mod:`~focas_keras.datasets.mosaic`):
tiles filled with windows of several crops of one split and scanner at random cells and
offsets, every labelled figure boxed, each crop shown in about ``det_tiles_per_mitosis``
tiles. That is how other scanners' mitoses reach Mdet (``train-det --extra-data``).
"""

from __future__ import annotations

import dataclasses
import datetime
import zlib
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from focas_keras.datasets import mosaic, sampling
from focas_keras.datasets.annotations import (
    HARD_NEGATIVE, ICPR2012_MPP, MITOSIS, AnnotationSet, load_image)
from focas_keras.datasets.shards import ShardWriter
from focas_keras import __version__
from focas_keras.data import records
from focas_keras.errors import InputError
from focas_keras.io import atomic_output_dir, write_json_atomic

TRAIN, VAL = "train", "val"
#: ``target_mpp`` used when none is given, per format (formats with one pixel size per image).
FORMAT_TARGET_MPP = {"amibr": ICPR2012_MPP}
#: ``det_small_images`` used when none is given, per format (else ``pad``).
FORMAT_DET_SMALL = {"amibr": "skip"}
DET_SMALL_CHOICES = ("skip", "pad", "mosaic")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Parameters of shard preparation (all recorded in the manifest).

    Attributes:
        tile_size: det tile side, px.
        det_tiles_per_mitosis: det tiles cut around each mitosis at random offsets
            (oversampling of tiles with mitoses).
        det_empty_share: share of det tiles that hold no mitosis (0 <= share < 1).
        det_grid: also cut a grid of tiles covering every training field whole
            (:func:`~focas_keras.datasets.sampling.grid_origins`), so that each epoch shows Mdet all the
            tissue it will meet at test time, not only the surroundings of mitoses.
        val_fields: also store every validation field whole (``field`` records), for
            selecting models and thresholds on whole fields (``train-det``, ``mine``).
        det_margin: a mitosis centre lies at least this many px inside its tile.
        min_visible: a box cut by a tile border is kept if this share of it is visible.
        patch_size: cls patch side, px.
        cls_per_mitosis: positive patches per mitosis, centred on random pixels of it (or on the
            centroid jittered by ``cls_jitter`` px when only the centroid is known).
        cls_jitter: max offset from a centroid-only mitosis, px.
        cls_per_hard_negative: patches per ``hard_negative`` annotation (jittered centres).
        cls_background_per_image: random background patches per image.
        cls_background_distance: background centres keep this distance from every annotated
            object, px.
        val_slides: slides forming the validation split; when empty (and ``val_scanners``
            too), ``val_fraction`` of the slides (at least one, if the fraction is > 0) are
            drawn with ``seed``.
        val_scanners: scanners whose slides all go to validation (with ``val_slides``, if
            any), for holding out whole scanners; needs a dataset that knows its scanners.
        val_fraction: share of slides in validation when ``val_slides`` and
            ``val_scanners`` are empty.
        seed: seed of the split and of every sampled position.
        target_mpp: rescale images to this pixel size (um/px) first; None keeps them (or the
            format's :data:`FORMAT_TARGET_MPP`).
        det_small_images: images smaller than a det tile on either side: ``skip`` (no det
            tiles), ``pad`` (reflect-padded tiles) or ``mosaic`` (mosaic tiles of several such
            images of one split and scanner, see :mod:`~focas_keras.datasets.mosaic`); None:
            the format's
            :data:`FORMAT_DET_SMALL`, else ``pad``.
        shard_mb: size bound of one shard, MiB.
    """

    tile_size: int = 224
    det_tiles_per_mitosis: int = 4
    det_empty_share: float = 0.3
    det_grid: bool = False
    val_fields: bool = False
    det_margin: int = 16
    min_visible: float = 0.5
    patch_size: int = 64
    cls_per_mitosis: int = 8
    cls_jitter: float = 4.0
    cls_per_hard_negative: int = 4
    cls_background_per_image: int = 40
    cls_background_distance: float = 40.0
    val_slides: tuple = ()
    val_scanners: tuple = ()
    val_fraction: float = 0.2
    seed: int = 0
    target_mpp: float | None = None
    det_small_images: str | None = None
    shard_mb: float = 64.0

    def validate(self) -> None:
        """Raises InputError on values that cannot work."""
        checks = [
            (self.tile_size >= 32, "tile size must be >= 32"),
            (self.patch_size >= 16, "patch size must be >= 16"),
            (0 <= self.det_empty_share < 1, "det empty share must be in [0, 1)"),
            (0 <= self.val_fraction < 1, "validation fraction must be in [0, 1)"),
            (0 < self.min_visible <= 1, "min visible must be in (0, 1]"),
            (2 * self.det_margin < self.tile_size, "det margin must be < tile size / 2"),
            (self.shard_mb > 0, "shard size must be > 0"),
            (self.target_mpp is None or self.target_mpp > 0, "target mpp must be > 0"),
            (self.det_small_images in (None,) + DET_SMALL_CHOICES,
             f"det small images must be one of {', '.join(DET_SMALL_CHOICES)}"),
            (min(self.det_tiles_per_mitosis, self.cls_per_mitosis, self.cls_per_hard_negative,
                 self.cls_background_per_image) >= 0, "sample counts must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def for_format(config: PrepareConfig, fmt: str) -> PrepareConfig:
    """``config`` with the format's defaults where it leaves ``target_mpp`` and
    ``det_small_images`` None (:data:`FORMAT_TARGET_MPP`, :data:`FORMAT_DET_SMALL`)."""
    return dataclasses.replace(
        config,
        target_mpp=config.target_mpp if config.target_mpp is not None
        else FORMAT_TARGET_MPP.get(fmt),
        det_small_images=config.det_small_images or FORMAT_DET_SMALL.get(fmt, "pad"))


def split_slides(slides, config: PrepareConfig, scanner_of: dict | None = None
                 ) -> dict[str, list[str]]:
    """Assigns whole slides to ``train`` / ``val`` (deterministic for a seed).

    Args:
        slides: slide ids present in the dataset.
        config: gives ``val_slides`` and/or ``val_scanners``, or ``val_fraction`` and
            ``seed``.
        scanner_of: ``{slide: scanner}`` (needed for ``val_scanners``; "" = unknown).

    Returns:
        ``{"train": [...], "val": [...]}``, sorted slide ids, disjoint.
    """
    slides = sorted(set(slides))
    if config.val_slides or config.val_scanners:
        unknown = sorted(set(config.val_slides) - set(slides))
        if unknown:
            raise InputError(f"unknown validation slide(s) {', '.join(unknown)} "
                             f"(dataset slides: {', '.join(slides)})")
        val = set(config.val_slides)
        if config.val_scanners:
            scanner_of = scanner_of or {}
            known = sorted({v for v in scanner_of.values() if v})
            if not known:
                raise InputError("--val-scanners needs a dataset that records scanners "
                                 "(e.g. --format amibr); this one records none")
            missing = sorted(set(config.val_scanners) - set(known))
            if missing:
                raise InputError(f"unknown validation scanner(s) {', '.join(missing)} "
                                 f"(dataset scanners: {', '.join(known)})")
            val |= {s for s in slides if scanner_of.get(s, "") in config.val_scanners}
        if config.val_scanners and len(val) == len(slides):
            raise InputError("the validation split would hold every slide; nothing is left "
                             "to train on")
        val = sorted(val)
    elif config.val_fraction > 0 and len(slides) > 1:
        count = min(len(slides) - 1, max(1, int(round(config.val_fraction * len(slides)))))
        order = np.random.default_rng(config.seed).permutation(len(slides))
        val = sorted(slides[i] for i in order[:count])
    else:
        val = []
    return {TRAIN: [s for s in slides if s not in val], VAL: val}


def _column(table, name: str) -> list[str]:
    """A text column of the images table, "" for every row where the table has none."""
    if name not in table.columns:
        return [""] * len(table)
    return ["" if v is None or v != v else str(v) for v in table[name]]


def _image_rng(seed: int, image_id: str) -> np.random.Generator:
    # Keyed by image id, not by position, so adding images does not move other images' samples.
    return np.random.default_rng([seed, zlib.crc32(image_id.encode())])


def _encode_png(array: np.ndarray) -> bytes:
    ok, data = cv2.imencode(".png", cv2.cvtColor(array, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _rescale(image, objects, factor):
    if factor == 1.0:
        return image, objects
    height, width = image.shape[:2]
    size = (max(1, int(round(width * factor))), max(1, int(round(height * factor))))
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(image, size, interpolation=interp)
    objects = objects.copy()
    for col in ("x", "y", "x1", "y1", "x2", "y2"):
        objects[col] = objects[col] * factor
    objects["pixels"] = [None if p is None else np.unique(
        np.floor(np.asarray(p) * factor).astype(np.int32), axis=0) for p in objects["pixels"]]
    return image, objects


def det_samples(image, mitoses, config: PrepareConfig, rng, grid: bool = False):
    """Det tiles of one image: oversampled tiles around mitoses plus some empty tiles, and
    with ``grid`` a grid of tiles covering the whole image.

    Args:
        image: uint8 (H, W, 3).
        mitoses: table of the image's mitoses (x, y, x1..y2).
        config: preparation parameters.
        rng: random generator of this image.

    Returns:
        list of (tile uint8 (T, T, 3), origin (x0, y0), boxes (M, 4) float32).
    """
    size, (height, width) = config.tile_size, image.shape[:2]
    boxes = mitoses[["x1", "y1", "x2", "y2"]].to_numpy(np.float64)
    origins = []
    for cx, cy in mitoses[["x", "y"]].to_numpy():
        for _ in range(config.det_tiles_per_mitosis):
            origins.append(sampling.tile_origin_around(
                cx, cy, size, width, height, config.det_margin, rng))
    share = config.det_empty_share
    if origins:
        empty = int(round(len(origins) * share / (1 - share)))
    else:  # an image without mitoses still gives a few background tiles
        empty = int(np.ceil(config.det_tiles_per_mitosis * share)) if share > 0 else 0
    for _ in range(empty):
        origin = sampling.random_empty_tile(boxes, size, width, height, rng)
        if origin is not None:
            origins.append(origin)
    if grid:
        origins += sampling.grid_origins(width, height, size)
    return [(sampling.crop(image, x0, y0, size), (x0, y0),
             sampling.boxes_in_tile(boxes, x0, y0, size, config.min_visible))
            for x0, y0 in origins]


def cls_samples(image, objects, config: PrepareConfig, rng):
    """Cls patches of one image.

    Args:
        image: uint8 (H, W, 3).
        objects: table of the image's annotations (mitoses and hard negatives).
        config: preparation parameters.
        rng: random generator of this image.

    Returns:
        list of (patch uint8 (P, P, 3), label 0/1, source, centre (x, y)).
    """
    size, (height, width) = config.patch_size, image.shape[:2]
    centres = []
    for row in objects.itertuples():
        if row.label == MITOSIS:
            points = sampling.positive_centers(row.pixels, row.x, row.y, config.cls_per_mitosis,
                                               config.cls_jitter, rng)
            centres += [(p, 1, MITOSIS) for p in points]
        elif row.label == HARD_NEGATIVE:
            points = sampling.positive_centers(None, row.x, row.y, config.cls_per_hard_negative,
                                               config.cls_jitter, rng)
            centres += [(p, 0, HARD_NEGATIVE) for p in points]
    background = sampling.background_centers(
        objects[["x", "y"]].to_numpy(), config.cls_background_per_image, width, height,
        config.cls_background_distance, rng)
    centres += [(p, 0, "background") for p in background]
    half = size // 2
    return [(sampling.crop(image, int(p[0]) - half, int(p[1]) - half, size), label, source,
             (int(p[0]), int(p[1]))) for p, label, source in centres]


def prepare(aset: AnnotationSet, out_dir, config: PrepareConfig = PrepareConfig(),
            overwrite: bool = False, progress: bool = False) -> dict:
    """Writes det and cls shards for every split, and ``manifest.json``.

    Args:
        aset: the dataset.
        out_dir: output directory (``det/``, ``cls/``, ``manifest.json``); written aside and
            renamed into place when complete.
        config: preparation parameters.
        overwrite: replace an existing output.
        progress: show a progress bar over images.

    Returns:
        The manifest.
    """
    config.validate()
    config = for_format(config, aset.fmt)
    if aset.images.empty:
        raise InputError("the dataset has no images", aset.source or None)
    scanners = _column(aset.images, "scanner")
    scanner_of = dict(zip(aset.images.slide_id, scanners))
    splits = split_slides(aset.images.slide_id, config, scanner_of)
    max_bytes = int(config.shard_mb * (1 << 20))
    counts = {s: {"images": [], "slides": splits[s],
                  "det": {"records": 0, "boxes": 0, "tiles_with_mitoses": 0, "empty_tiles": 0,
                          "grid_tiles": 0, "skipped_small_images": 0, "mosaic_tiles": 0},
                  "field": {"records": 0, "mitoses": 0},
                  "scanners": sorted({scanner_of[x] for x in splits[s] if scanner_of[x]}),
                  "cls": {"records": 0, "positive": 0, "negative": 0, MITOSIS: 0,
                          "background": 0, HARD_NEGATIVE: 0}} for s in (TRAIN, VAL)}
    split_of = {slide: s for s in (TRAIN, VAL) for slide in splits[s]}
    small = {}  # {(split, scanner): ([image], [boxes])}: the mosaic's crops
    with atomic_output_dir(out_dir, overwrite) as tmp:
        writers = {(kind, s): ShardWriter(tmp, kind, s, max_bytes)
                   for kind in records.KINDS for s in (TRAIN, VAL)}
        if config.val_fields:
            writers[records.FIELD, VAL] = ShardWriter(tmp, records.FIELD, VAL, max_bytes)
        try:
            rows = list(aset.images.itertuples())
            for info, scanner in tqdm(zip(rows, scanners), total=len(rows), desc="prepare",
                                      unit="image", disable=not progress):
                split = split_of[info.slide_id]
                c = counts[split]
                c["images"].append(info.image_id)
                image = load_image(info.image_path)
                objects = aset.annotations[aset.annotations.image_id == info.image_id]
                factor = 1.0 if config.target_mpp is None else info.mpp / config.target_mpp
                image, objects = _rescale(image, objects, factor)
                rng = _image_rng(config.seed, info.image_id)
                mitoses = objects[objects.label == MITOSIS]
                grid = config.det_grid and split == TRAIN
                if config.val_fields and split == VAL:
                    writers[records.FIELD, VAL].write(records.field_example(
                        _encode_png(image), info.image_id, info.slide_id,
                        float(config.target_mpp or info.mpp),
                        mitoses[["x", "y"]].to_numpy(np.float64)))
                    c["field"]["records"] += 1
                    c["field"]["mitoses"] += len(mitoses)
                is_small = min(image.shape[:2]) < config.tile_size
                skip = config.det_small_images in ("skip", "mosaic") and is_small
                if config.det_small_images == "mosaic" and is_small:
                    pool = small.setdefault((split, scanner), ([], []))
                    pool[0].append(image)
                    pool[1].append(mitoses[["x1", "y1", "x2", "y2"]].to_numpy(np.float64))
                else:
                    c["det"]["skipped_small_images"] += int(skip)
                if grid and not skip:
                    c["det"]["grid_tiles"] += len(sampling.grid_origins(
                        image.shape[1], image.shape[0], config.tile_size))
                det = [] if skip else det_samples(image, mitoses, config, rng, grid)
                for tile, origin, boxes in det:
                    writers[records.DET, split].write(records.det_example(
                        _encode_png(tile), info.image_id, info.slide_id, origin, boxes))
                    c["det"]["records"] += 1
                    c["det"]["boxes"] += len(boxes)
                    c["det"]["tiles_with_mitoses" if len(boxes) else "empty_tiles"] += 1
                for patch, label, source, centre in cls_samples(image, objects, config, rng):
                    writers[records.CLS, split].write(records.cls_example(
                        _encode_png(patch), label, source, info.image_id, info.slide_id,
                        centre, scanner=scanner))
                    c["cls"]["records"] += 1
                    c["cls"]["positive" if label else "negative"] += 1
                    c["cls"][source] += 1
            for (split, scanner), (crops, crop_boxes) in sorted(
                    small.items(), key=lambda item: item[0]):
                rng = _image_rng(config.seed, f"mosaic/{split}/{scanner}")
                tiles = mosaic.mosaic_tiles(crops, crop_boxes, config.tile_size,
                                            config.det_tiles_per_mitosis, rng,
                                            config.min_visible)
                name = scanner or "unknown scanner"
                for index, (tile, boxes) in enumerate(tiles):
                    writers[records.DET, split].write(records.det_example(
                        _encode_png(tile), f"mosaic/{name}/{index}", f"mosaic/{name}",
                        (0, 0), boxes))
                    c = counts[split]["det"]
                    c["records"] += 1
                    c["mosaic_tiles"] += 1
                    c["boxes"] += len(boxes)
                    c["tiles_with_mitoses" if len(boxes) else "empty_tiles"] += 1
            shards = [entry for writer in writers.values() for entry in writer.close()]
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        manifest = {
            "format_version": 1,
            "package": {"name": "focas_keras", "version": __version__},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source": {
                "format": aset.fmt, "path": aset.source, "images": len(aset.images),
                "annotations": aset.annotations.label.value_counts().sort_index().to_dict(),
            },
            "parameters": {**dataclasses.asdict(config), "val_slides": splits[VAL]},
            "tile_size": config.tile_size,
            "patch_size": config.patch_size,
            "splits": counts,
            "shards": sorted(shards, key=lambda e: e["path"]),
        }
        write_json_atomic(Path(tmp) / records.MANIFEST, manifest)
    return manifest
