"""The one tiled-inference engine: the cascade's stages on fields and on whole slides.

Every source runs through the same stage functions:

* **stage 1 on tiles** (:func:`detect_cells`): Mdet on a batch of tiles
  (:meth:`Cascade.detect_batch`, each tile capped by its area), each tile keeping only the
  box centres it *owns* in its :class:`~focas_keras.inference.tiling.TileGrid`;
* **stage 2** (:meth:`Cascade.classify_boxes`): Mclass on crops around candidate centres of an
  image (or a region of a slide) in Mclass's pixels;
* **merge** (:func:`~focas_keras.inference.tiling.merge_candidates`): clip, threshold,
  class-agnostic NMS and the source's candidate cap;
* **table** (:func:`detections_table`): best first, acceptance, the point merge, the columns
  :data:`RESULT_COLUMNS`.

A **field** (``detect``, :meth:`Cascade.run` -> :func:`run_field`) is in memory: it is resized
to each stage's pixels once and run as one Mdet call (whole-image mode) or as a grid of tiles
cut from the resized image, merged, then stage 2 scores the survivors.

A **slide** (``slide``, the cohort pipeline) is planned (:func:`plan_tiles`: its grid in Mdet's
pixels, the tissue share of each tile and which tiles are skipped; no pixels), then each tile
is read (:func:`read_tile`: the tile in Mdet's pixels and the stage-2 region around it, from
the pyramid level nearest each stage's pixel size) and run (:func:`run_tile`: both stages; a
JSON-able record in level-0 px), and the records are assembled (:func:`assemble`). Tiles are
independent, so they may run in any order, on any worker, and be journaled; only
:func:`assemble` needs all of a slide's records.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pandas as pd

from focas_keras.inference.tiling import TileGrid, merge_candidates, pad_to_tile

#: Columns of :meth:`Cascade.run`'s table (and of :func:`assemble`'s).
RESULT_COLUMNS = ["x", "y", "x1", "y1", "x2", "y2", "det_score", "cls_score", "accepted"]


# --------------------------------------------------------------------------- shared stages


def detect_cells(cascade, cells, tiles, cap: int) -> list[tuple]:
    """Stage 1 on tiles in one Mdet call, each tile keeping the detections it owns.

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade`.
        cells: (grid, (row, col)) per tile; the grids (Mdet pixels) share the tile side and
            the valid part (:attr:`TileGrid.valid`), so tiles of several sources may share a
            call.
        tiles: uint8 (tile, tile, 3) pixels per cell (mirrored where the image is shorter
            than a tile: :meth:`TileGrid.pad`, :func:`pad_to_tile`).
        cap: each tile's candidate cap (:meth:`Cascade.candidate_cap` of a tile).

    Returns:
        Per cell (boxes float32 (K, 4) in its grid's image pixels, scores float32 (K,), the
        call reached ``cap``, a level's top-k was full).
    """
    cells = list(cells)
    batch = np.stack(list(tiles)).astype(np.float32) / 255.0
    owned = []
    for (grid, cell), (boxes, scores, at_cap, topk_full) in zip(
            cells, cascade.detect_batch(batch, cap, cells[0][0].valid)):
        owned.append((*grid.keep(cell, boxes, scores), at_cap, topk_full))
    return owned


def detections_table(boxes, det_scores, cls_scores, cls_threshold: float,
                     merge_radius: float) -> pd.DataFrame:
    """The result table of merged candidates.

    Args:
        boxes: (D, 4) x1, y1, x2, y2 in the source's pixels.
        det_scores, cls_scores: (D,) stage-1 and stage-2 scores.
        cls_threshold: acceptance (``cls_score >= cls_threshold``).
        merge_radius: :func:`merge_points`' radius in the source's pixels (0: off).

    Returns:
        One row per candidate, columns :data:`RESULT_COLUMNS` (x, y: box centre), sorted by
        det_score, best first (ties: input order).
    """
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    det_scores, cls_scores = np.asarray(det_scores), np.asarray(cls_scores)
    order = np.argsort(-det_scores, kind="stable")
    boxes, det_scores, cls_scores = boxes[order], det_scores[order], cls_scores[order]
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2.0
    accepted = merge_points(centres, cls_scores, cls_scores >= cls_threshold, merge_radius)
    return pd.DataFrame({
        "x": centres[:, 0], "y": centres[:, 1], "x1": boxes[:, 0], "y1": boxes[:, 1],
        "x2": boxes[:, 2], "y2": boxes[:, 3], "det_score": det_scores.astype(np.float64),
        "cls_score": cls_scores.astype(np.float64), "accepted": accepted},
        columns=RESULT_COLUMNS)


def merge_points(centres, scores, accepted, radius: float) -> np.ndarray:
    """Greedy point suppression among accepted detections.

    Args:
        centres: (D, 2) detection centres.
        scores: (D,) ranking scores (higher wins; ties: input order).
        accepted: (D,) bool, which detections are candidates for acceptance.
        radius: a detection within this distance of a kept one is dropped (0: no merging).

    Returns:
        (D,) bool: the accepted detections that survive.
    """
    keep = np.zeros(len(scores), bool)
    accepted = np.asarray(accepted, bool)
    if radius <= 0:
        return accepted.copy()
    kept = []
    for i in np.argsort(-np.asarray(scores, np.float64), kind="stable"):
        if not accepted[i]:
            continue
        if kept and np.min(np.hypot(*(centres[kept] - centres[i]).T)) <= radius:
            continue
        kept.append(i)
        keep[i] = True
    return keep


# --------------------------------------------------------------------------- fields


def padded_size(height: int, width: int) -> tuple[int, int]:
    """The size Mdet sees an image at: padded to a multiple of its input multiple (32)."""
    from focas_keras.models.mdet import INPUT_MULTIPLE as m

    return -(-height // m) * m, -(-width // m) * m


def detect_field(cascade, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """Stage 1 on a field already in Mdet's pixels.

    One Mdet call on the whole image (``tile`` 0 up to
    :data:`~focas_keras.inference.cascade.WHOLE_IMAGE_MAX_PIXELS`), else its
    :meth:`Cascade.stage1_tile` grid in batches of ``tile_batch`` tiles (one per call when
    auto-tiled, to bound memory), then :func:`merge_candidates` with the image's cap.

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade`.
        image: uint8 (H, W, 3) in Mdet's pixels.

    Returns:
        (boxes float32 (D, 4) in Mdet px, scores float32 (D,), best first; the stage-1 info
        documented at :attr:`Cascade.stage1_info`).
    """
    height, width = image.shape[:2]
    tile = cascade.stage1_tile(height, width)
    found, at_cap, at_topk = [], [], []
    if tile == 0:
        call_cap = cascade.candidate_cap(height, width)
        topk = cascade.level_topk(*padded_size(height, width))
        owned = cascade.detect_batch(image[None].astype(np.float32) / 255.0, call_cap)
    else:
        grid = TileGrid(height, width, tile, cascade.settings.overlap)
        padded, cells = grid.pad(image), grid.cells()
        call_cap, step = cascade.candidate_cap(tile, tile), cascade.settings.tile_batch
        if tile != cascade.settings.tile:  # auto-tiled: one tile per call bounds the memory
            step = 1
        topk = cascade.level_topk(tile, tile)
        owned = []
        for start in range(0, len(cells), step):
            chunk = cells[start:start + step]
            owned += detect_cells(cascade, [(grid, c) for c in chunk],
                                  [grid.cut(padded, c) for c in chunk], call_cap)
    for boxes, scores, full, topk_full in owned:
        found.append((boxes, scores))
        at_cap.append(full)
        at_topk.append(topk_full)
    cap = cascade.candidate_cap(height, width)
    boxes, scores, survived, _ = merge_candidates(found, height, width, cascade.det_threshold,
                                                  cascade.nms_iou, cap)
    bound = [name for name, hit in (("per_level_topk", any(at_topk)),
                                    ("call_nms_max", any(at_cap)),
                                    ("image_cap", survived > cap)) if hit]
    info = {"candidates": int(len(scores)), "cap": int(cap), "cap_bound": bool(bound),
            "calls": len(at_cap), "calls_at_cap": int(sum(at_cap)), "tile": int(tile),
            "auto_tiled": bool(tile != cascade.settings.tile), "call_cap": int(call_cap),
            "topk_per_level": int(topk), "calls_at_topk": int(sum(at_topk)), "bound": bound}
    return boxes, scores, info


def run_field(cascade, image: np.ndarray) -> pd.DataFrame:
    """Both stages on one in-memory uint8 RGB (H, W, 3) field: :meth:`Cascade.run`.

    Stage 1 (:meth:`Cascade.detect_resized`) on the image resized to Mdet's pixels, stage 2
    (:meth:`Cascade.classify_boxes`) on the survivors' crops from the image in Mclass's
    pixels (the same resized image where both stages share a pixel size), then
    :func:`detections_table` in input pixels.
    """
    det_image, sx, sy = cascade.model_image(image, "det")
    boxes, det_scores = cascade.detect_resized(det_image)
    det_to_input = np.array([sx, sy, sx, sy])
    if cascade.cls_scale == cascade.det_scale:  # one resized image serves both stages
        cls_scores = cascade.classify_boxes(det_image, boxes)
    else:
        cls_image, cx, cy = cascade.model_image(image, "cls")
        cls_scores = cascade.classify_boxes(
            cls_image, boxes.astype(np.float64) / det_to_input * np.array([cx, cy, cx, cy]))
    return detections_table(boxes.astype(np.float64) / det_to_input, det_scores, cls_scores,
                            cascade.cls_threshold, cascade.settings.merge_px)


# --------------------------------------------------------------------------- slides


@dataclasses.dataclass(frozen=True)
class StageView:
    """One stage's view of a slide: the level it reads and the slide's size in its pixels.

    Attributes:
        mpp: the stage's pixel size, um/px.
        level: the pyramid level read; level_mpp its pixel size.
        width, height: the slide in the stage's pixels (as ``detect`` would resize it).
    """

    mpp: float
    level: int
    level_mpp: float
    width: int
    height: int

    @classmethod
    def of(cls, reader, stage_mpp: float) -> StageView:
        from focas_keras.inference.resize import scaled_size

        level = reader.level_for_mpp(stage_mpp)
        height, width = scaled_size(reader.height, reader.width, reader.mpp / stage_mpp)
        return cls(float(stage_mpp), level, reader.level_mpp(level), width, height)

    def read(self, reader, x0: int, y0: int, width: int, height: int) -> np.ndarray:
        """The stage-pixel rectangle ``[x0, x0 + width) x [y0, y0 + height)`` (inside the slide)
        as uint8 (height, width, 3): read from :attr:`level`, resized to the stage's pixels."""
        from focas_keras.inference.resize import resize_to

        level_w, level_h = reader.level_dimensions[self.level]
        down = reader.level_downsamples[self.level]
        # stage px -> level px along each axis, with the slide's exact side ratios
        fx, fy = level_w / self.width, level_h / self.height
        lx0, ly0 = int(round(x0 * fx)), int(round(y0 * fy))
        lx1 = min(level_w, max(lx0 + 1, int(round((x0 + width) * fx))))
        ly1 = min(level_h, max(ly0 + 1, int(round((y0 + height) * fy))))
        region = reader.read(int(round(lx0 * down)), int(round(ly0 * down)), lx1 - lx0,
                             ly1 - ly0, self.level)
        return resize_to(region, height, width)


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """What a slide's tiles are: cheap, picklable, no pixels and no models.

    Attributes:
        name, path: the slide's name (its file stem) and path.
        size: level-0 (width, height).
        mpp: level-0 pixel size (um/px).
        det, cls: each stage's :class:`StageView`.
        tile, overlap: stage-1 tile side and overlap (Mdet px).
        patch: stage-2 crop side (Mclass px).
        cells: every cell of the grid, row-major.
        skip: ``{cell: tissue share}`` of the cells skipped for too little tissue.
        tissue: ``{cell: tissue share}`` of every cell (1.0 without a tissue map).
    """

    name: str
    path: str
    size: tuple
    mpp: float
    det: StageView
    cls: StageView
    tile: int
    overlap: int
    patch: int
    cells: tuple
    skip: dict
    tissue: dict

    def grid(self) -> TileGrid:
        """The stage-1 :class:`TileGrid` (Mdet px)."""
        return _grid(self.det.height, self.det.width, self.tile, self.overlap)

    @property
    def to_level0(self) -> tuple[float, float]:
        """Level-0 px per Mdet px along x and y."""
        return self.size[0] / self.det.width, self.size[1] / self.det.height

    def level0_origin(self, cell) -> tuple[int, int]:
        """A tile's top-left corner in level-0 px (rounded), for messages."""
        x0, y0 = self.grid().origin(cell)
        return round(x0 * self.to_level0[0]), round(y0 * self.to_level0[1])


@functools.lru_cache(maxsize=64)
def _grid(height: int, width: int, tile: int, overlap: int) -> TileGrid:
    return TileGrid(height, width, tile, overlap)  # its origins and ownership computed once


def plan_tiles(reader, det_mpp: float, cls_mpp: float, patch: int, tile: int, overlap: int,
               tissue=None, min_tissue: float = 0.0) -> TilePlan:
    """The tiles of a slide and which of them run.

    Args:
        reader: a :class:`~focas_keras.slides.reader.SlideReader` or anything with its
            interface (``width``, ``height``, ``mpp``, ``name``, ``path``,
            ``level_dimensions``, ``level_downsamples``, ``level_for_mpp``, ``level_mpp``,
            ``read(x, y, w, h, level)``).
        det_mpp, cls_mpp: each stage's pixel size (um/px).
        patch: stage-2 crop side (Mclass px).
        tile, overlap: stage-1 tile side and overlap (Mdet px).
        tissue: a :class:`~focas_keras.slides.tissue.TissueMap`; None: no skipping.
        min_tissue: a cell whose footprint (the tile's part inside the slide) holds a smaller
            share of tissue is skipped.
    """
    det, cls = StageView.of(reader, det_mpp), StageView.of(reader, cls_mpp)
    grid = _grid(det.height, det.width, int(tile), int(overlap))
    fx, fy = reader.width / det.width, reader.height / det.height
    shares, skip = {}, {}
    for cell in grid.cells():
        share = 1.0
        if tissue is not None:
            x0, y0 = grid.origin(cell)
            x1, y1 = min(x0 + grid.tile, det.width), min(y0 + grid.tile, det.height)
            share = tissue.fraction(x0 * fx, y0 * fy, x1 * fx, y1 * fy)
            if share < min_tissue:
                skip[cell] = share
        shares[cell] = share
    return TilePlan(name=reader.name, path=str(reader.path),
                    size=(int(reader.width), int(reader.height)), mpp=float(reader.mpp),
                    det=det, cls=cls, tile=int(tile), overlap=int(overlap), patch=int(patch),
                    cells=tuple(grid.cells()), skip=skip, tissue=shares)


def read_tile(reader, plan: TilePlan, cell) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """A tile's pixels for both stages.

    Returns:
        (stage 1's tile uint8 (tile, tile, 3), mirrored where the slide is shorter than a tile;
        stage 2's region uint8 (h, w, 3): the tile's footprint in Mclass's pixels plus half a
        crop, clipped to the slide; the region's (x, y) origin in Mclass px).

    Raises:
        SlideReadError: the reader cannot read the pixels.
    """
    det, cls, tile = plan.det, plan.cls, plan.tile
    x0, y0 = plan.grid().origin(cell)
    width, height = min(tile, det.width - x0), min(tile, det.height - y0)
    pixels = det.read(reader, x0, y0, width, height)
    if (height, width) != (tile, tile):  # a slide side shorter than a tile: mirrored
        pixels = pad_to_tile(pixels, tile)
    sx, sy = cls.width / det.width, cls.height / det.height
    margin = plan.patch // 2 + 2
    cx0 = max(0, int(math.floor(x0 * sx)) - margin)
    cy0 = max(0, int(math.floor(y0 * sy)) - margin)
    cx1 = min(cls.width, int(math.ceil((x0 + width) * sx)) + margin)
    cy1 = min(cls.height, int(math.ceil((y0 + height) * sy)) + margin)
    region = cls.read(reader, cx0, cy0, cx1 - cx0, cy1 - cy0)
    return pixels, region, (cx0, cy0)


def run_tile(cascade, plan: TilePlan, cell, pixels, region, origin) -> dict:
    """Both stages on one tile (:func:`run_tiles` of one).

    Returns:
        The tile's record ``{"cell": [row, col], "status": "done", "at_cap": bool, "boxes":
        [[x1, y1, x2, y2], ...] (level-0 px), "det": [...], "cls": [...]}``: the candidates
        it owns over the stage-1 threshold, with both scores (JSON-able; the slide journal's
        line).
    """
    return run_tiles(cascade, [(plan, cell, pixels, region, origin)])[0]


def run_tiles(cascade, items) -> list[dict]:
    """Both stages on several tiles: stage 1 in one Mdet call per group of tiles of the same
    size and grid padding (so tiles of several slides can share a batch), stage 2 per tile.

    Args:
        cascade: a :class:`~focas_keras.inference.cascade.Cascade` whose stage pixel sizes and
            crop size are the plans' (``det_mpp``, ``cls_mpp``, ``patch``).
        items: (plan, cell, pixels, region, origin) per tile, as :func:`read_tile` gives.

    Returns:
        One :func:`run_tile` record per item, in order.
    """
    items = list(items)
    groups = {}
    for i, (plan, *_rest) in enumerate(items):
        groups.setdefault((plan.tile, plan.grid().valid), []).append(i)
    owned = [None] * len(items)
    for (tile, _valid), members in groups.items():
        found = detect_cells(cascade, [(items[i][0].grid(), items[i][1]) for i in members],
                             [items[i][2] for i in members], cascade.candidate_cap(tile, tile))
        for i, (boxes, scores, at_cap, topk_full) in zip(members, found):
            owned[i] = (boxes, scores, at_cap or topk_full)
    records = []
    for (plan, cell, _pixels, region, origin), (boxes, scores, full) in zip(items, owned):
        keep = scores >= cascade.det_threshold
        boxes, scores = boxes[keep], scores[keep]
        sx, sy = plan.cls.width / plan.det.width, plan.cls.height / plan.det.height
        cls_boxes = boxes.astype(np.float64) * np.array([sx, sy, sx, sy])
        cls_boxes -= np.array([origin[0], origin[1], origin[0], origin[1]], np.float64)
        cls_scores = (cascade.classify_boxes(region, cls_boxes) if len(boxes)
                      else np.zeros((0,), np.float32))
        boxes0 = boxes.astype(np.float64) * np.array(list(plan.to_level0) * 2)
        records.append({"cell": list(cell), "status": "done", "at_cap": bool(full),
                        "boxes": [[float(v) for v in b] for b in boxes0],
                        "det": [float(v) for v in scores],
                        "cls": [float(v) for v in cls_scores]})
    return records


def assemble(cascade, plan: TilePlan, records) -> pd.DataFrame:
    """A slide's candidates from its tiles' records (any order; those not ``done`` ignored):
    :func:`merge_candidates` in level-0 px with the slide's cap (of its area in Mdet px), then
    :func:`detections_table` with the merge radius in level-0 px (the same distance in um as
    ``merge_px`` at the cascade's input ``mpp``).

    Returns:
        Columns :data:`RESULT_COLUMNS`, level-0 px, best stage-1 score first.
    """
    records = sorted((r for r in records if r.get("status") == "done"),
                     key=lambda r: tuple(r["cell"]))
    found = [(np.asarray(r["boxes"], np.float32).reshape(-1, 4),
              np.asarray(r["det"], np.float32)) for r in records]
    cls_all = [np.asarray(r["cls"], np.float64) for r in records]
    cap = cascade.candidate_cap(plan.det.height, plan.det.width)
    width, height = plan.size
    boxes, det_scores, _, index = merge_candidates(found, height, width, cascade.det_threshold,
                                                   cascade.nms_iou, cap)
    cls_scores = np.concatenate(cls_all + [np.zeros((0,))])[index]
    radius = cascade.settings.merge_px * cascade.settings.mpp / plan.mpp
    return detections_table(boxes, det_scores, cls_scores, cascade.cls_threshold, radius)
