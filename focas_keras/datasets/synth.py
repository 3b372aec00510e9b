"""Synthetic H&E high-power fields with pixel-exact mitosis labels and look-alike hard negatives.

Images are rendered in optical-density (OD) space: one float map for hematoxylin, one for
eosin, turned into RGB by Beer-Lambert with per-image stain vectors,
``rgb = I0 * exp(-(OD_h * h_vec + OD_e * e_vec))``. The tissue is eosin stroma with fibres and
fat/lumen gaps, tumour nests of cells with textured interphase nuclei, mitoses in four phases
(very dark chromatin, usually in a clear cell) and the objects a detector confuses with them:
apoptotic bodies and lymphocytes. Objects are drawn in small local windows, so a 2084 x 2084
field renders in about a second.

:func:`write_dataset` writes the ICPR 2012 layout (``S00_00.png`` + ``S00_00.csv`` pixel lists)
plus ``hard_negatives.csv`` and ``synth.json``; same seed, same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np

from focas_keras.datasets.annotations import ICPR2012_MPP, object_from_pixels
from focas_keras.errors import InputError
from focas_keras.io import atomic_output_dir

PHASES = ("prophase", "metaphase", "anaphase", "telophase")
PHASE_WEIGHTS = (0.3, 0.3, 0.2, 0.2)
NEGATIVE_KINDS = ("apoptotic", "lymphocyte", "hyperchromatic")
#: Counts are given for an ICPR-sized field and scaled by area.
REFERENCE_AREA = 2084 * 2084
_CANVAS = 72  # half side of the local window a figure is drawn in
_MIN_EXTENT, _MAX_EXTENT = 26, 68
# Reference stain vectors (OD per unit stain, RGB): a blue-purple hematoxylin, the magenta one of
# the ICPR scanner-A images, and eosin.
_H_BLUE = np.array([0.65, 0.70, 0.29])
_H_MAGENTA = np.array([0.38, 0.80, 0.48])
_E_REF = np.array([0.12, 0.86, 0.50])


@dataclasses.dataclass(frozen=True)
class SynthImage:
    """One synthetic field and its labels.

    Attributes:
        image: uint8 RGB (H, W, 3).
        mitoses: dicts with ``phase`` and ``pixels`` ((N, 2) int32 (x, y) pixels of the
            chromatin mask), plus centroid ``x, y`` and box ``x1, y1, x2, y2`` (x2/y2 exclusive).
        hard_negatives: dicts with ``kind`` (``apoptotic`` or ``lymphocyte``), ``x, y``,
            ``x1, y1, x2, y2`` and ``pixels`` of the dark nucleus.
        stain: the per-image stain parameters used.
        image_id: the id given to :func:`synthesize_image`.
    """

    image: np.ndarray
    mitoses: list
    hard_negatives: list
    stain: dict
    image_id: str = "img"


@dataclasses.dataclass
class _Figure:
    """A mitosis or look-alike drawn in a local window, before placement.

    ``mask`` is the labelled chromatin; ``cell`` the cytoplasm region around it (cleared to
    ``cell_e`` x eosin), ``rim`` a membrane or eosinophilic ring (eosin x ``rim_e``).
    """

    kind: str
    mask: np.ndarray
    cell: np.ndarray
    rim: np.ndarray
    od: float
    texture: float
    cell_e: float
    cell_h: float
    rim_e: float
    radius: float = 0.0
    top_left: tuple = (0, 0)


# ----------------------------------------------------------------------------- noise fields


def _field(rng, shape, scale, aspect=1.0, angle=0.0, bend=None):
    """Smooth noise, zero mean and unit variance, correlation length ``scale`` px.

    A small white-noise grid is warped (bicubic) onto the image in one pass; ``aspect`` > 1
    stretches it along ``angle`` (radians), which gives fibres, and ``bend`` (an image-sized
    displacement across them, px) makes the fibres wavy.
    """
    h, w = shape
    along, across = scale * aspect, scale
    diag = math.hypot(h, w) + (0 if bend is None else 200)
    gw, gh = int(diag / along) + 6, int(diag / across) + 6
    grid = rng.standard_normal((gh, gw), dtype=np.float32)
    c, s = math.cos(angle), math.sin(angle)
    if bend is None:
        xc, yc = w / 2.0, h / 2.0
        matrix = np.float32([
            [c / along, s / along, gw / 2.0 - (c * xc + s * yc) / along],
            [-s / across, c / across, gh / 2.0 - (-s * xc + c * yc) / across]])
        out = cv2.warpAffine(grid, matrix, (w, h), flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
                             borderMode=cv2.BORDER_REFLECT)
    else:
        x = np.arange(w, dtype=np.float32)[None, :] - np.float32(w / 2.0)
        y = np.arange(h, dtype=np.float32)[:, None] - np.float32(h / 2.0)
        u = (np.float32(c / along) * x + np.float32(s / along) * y) + np.float32(gw / 2.0)
        v = (np.float32(-s) * x + np.float32(c) * y + bend) * np.float32(1 / across)
        v += np.float32(gh / 2.0)
        out = cv2.remap(grid, np.broadcast_to(u, (h, w)).astype(np.float32), v, cv2.INTER_CUBIC,
                        borderMode=cv2.BORDER_REFLECT)
    sample = out[::7, ::7]
    out -= np.float32(sample.mean())
    out *= np.float32(1.0 / max(float(sample.std()), 1e-6))
    return out


def _smooth_radius(rng, n, rough):
    """Radial profile of an irregular closed outline: 1 + a few random low harmonics."""
    t = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    r = np.ones(n)
    for k in range(2, 6):
        r += rough * rng.standard_normal() / k * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return t, np.clip(r, 0.55, 1.6)


def _blob(rng, cx, cy, rx, ry, angle, rough, n=24):
    """Integer polygon of an irregular ellipse centred on (cx, cy)."""
    t, r = _smooth_radius(rng, n, rough)
    x, y = rx * r * np.cos(t), ry * r * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    pts = np.stack([cx + c * x - s * y, cy + s * x + c * y], 1)
    return np.round(pts).astype(np.int32)


def _rotate(x, y, angle, cx=_CANVAS, cy=_CANVAS):
    c, s = math.cos(angle), math.sin(angle)
    return cx + c * x - s * y, cy + s * x + c * y


# ----------------------------------------------------------------------------- figures


def _canvas():
    return np.zeros((2 * _CANVAS + 1, 2 * _CANVAS + 1), np.uint8)


def _hairs(rng, mask, count, reach):
    """Short thick threads sticking out of the chromatin edge (condensed chromosome arms)."""
    edge = mask & ~cv2.erode(mask, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero(edge)
    if not len(xs):
        return
    out = mask.copy()
    for i in rng.integers(0, len(xs), count):
        # Point away from the figure's centre of mass, give or take.
        base = math.atan2(ys[i] - _CANVAS, xs[i] - _CANVAS)
        angle = base + rng.normal(0, 0.6)
        length = rng.uniform(3, reach)
        end = (int(round(xs[i] + length * math.cos(angle))),
               int(round(ys[i] + length * math.sin(angle))))
        cv2.line(out, (int(xs[i]), int(ys[i])), end, 1, 2)
    mask[:] = out


def _prophase(rng, angle):
    mask = _canvas()
    r = rng.uniform(9, 16)
    cv2.fillPoly(mask, [_blob(rng, _CANVAS, _CANVAS, r, r * rng.uniform(0.75, 1), angle, 0.35)],
                 1)
    for _ in range(rng.integers(3, 7)):  # clumps of condensing chromatin around the core
        dx, dy = rng.normal(0, r * 0.45, 2)
        q = rng.uniform(3, 6)
        cv2.fillPoly(mask, [_blob(rng, _CANVAS + dx, _CANVAS + dy, q, q * 0.7,
                                  rng.uniform(0, np.pi), 0.3, 12)], 1)
    _hairs(rng, mask, rng.integers(6, 16), rng.uniform(5, 9))
    return (mask,) + _cell_around(rng, r + 8, r + 8, angle)


def _metaphase(rng, angle):
    mask = _canvas()
    length, thick = rng.uniform(28, 56), rng.uniform(6, 12)
    t = np.linspace(-1, 1, 12)
    half = thick / 2 * np.sqrt(np.clip(1 - t ** 2, 0.15, 1)) ** 0.5
    upper = half * (1 + 0.25 * rng.standard_normal(12))
    lower = -half * (1 + 0.25 * rng.standard_normal(12))
    x = np.concatenate([t * length / 2, t[::-1] * length / 2])
    y = np.concatenate([upper, lower[::-1]])
    px, py = _rotate(x, y, angle)
    cv2.fillPoly(mask, [np.round(np.stack([px, py], 1)).astype(np.int32)], 1)
    _hairs(rng, mask, rng.integers(10, 20), 6)
    return (mask,) + _cell_around(rng, length / 2 + rng.uniform(5, 10),
                                  thick / 2 + rng.uniform(10, 16), angle)


def _anaphase(rng, angle):
    mask = _canvas()
    length, thick = rng.uniform(24, 44), rng.uniform(5, 9)
    gap, bow = rng.uniform(8, 18), rng.uniform(0, 6)
    t = np.linspace(-1, 1, 9)
    for sign in (-1, 1):
        # The bar's middle leads towards its pole; its ends trail back towards the equator.
        y = sign * (gap / 2 + thick / 2 + bow * (1 - t ** 2)) + rng.normal(0, 0.7, 9)
        px, py = _rotate(t * length / 2, y, angle)
        pts = np.round(np.stack([px, py], 1)).astype(np.int32)
        cv2.polylines(mask, [pts], False, 1, int(round(thick)))
    _hairs(rng, mask, rng.integers(6, 14), 5)
    return (mask,) + _cell_around(rng, length / 2 + rng.uniform(6, 10),
                                  gap / 2 + thick + bow + rng.uniform(8, 13), angle)


def _telophase(rng, angle):
    mask, cell, rim = _canvas(), _canvas(), _canvas()
    dist = rng.uniform(28, 46)
    cell_r = max(dist / 2 + 4, rng.uniform(14, 21))
    for sign in (-1, 1):
        cx, cy = _rotate(sign * dist / 2, 0, angle)
        rx, ry = rng.uniform(5, 9), rng.uniform(7, 12)  # flattened across the division axis
        cv2.fillPoly(mask, [_blob(rng, cx, cy, rx, ry, angle, 0.3, 16)], 1)
        dcx, dcy = _rotate(sign * (dist / 2 + 2), 0, angle)
        args = ((int(round(dcx)), int(round(dcy))),
                (int(cell_r), int(cell_r * rng.uniform(0.8, 1.0))), math.degrees(angle), 0, 360, 1)
        # Both daughter outlines: where they cross sits the pinch of the cleavage furrow.
        cv2.ellipse(cell, *args, -1)
        cv2.ellipse(rim, *args, 2)
    _hairs(rng, mask, rng.integers(4, 10), 4)
    return mask, cell, rim


def _cell_around(rng, half_length, half_width, angle):
    """Cell body (cytoplasm region) and membrane outline around a figure."""
    cell, rim = _canvas(), _canvas()
    pts = _blob(rng, _CANVAS, _CANVAS, half_length, half_width, angle, 0.12)
    cv2.fillPoly(cell, [pts], 1)
    cv2.polylines(rim, [pts], True, 1, 1)
    return cell, rim


_SHAPES = {"prophase": _prophase, "metaphase": _metaphase, "anaphase": _anaphase,
           "telophase": _telophase}


def _mitosis(rng, phase):
    """A mitotic figure of ``phase`` whose pixel extent lies in [26, 68] px."""
    for _ in range(100):
        mask, cell, rim = _SHAPES[phase](rng, rng.uniform(0, np.pi))
        ys, xs = np.nonzero(mask)
        if _MIN_EXTENT <= max(np.ptp(xs), np.ptp(ys)) + 1 <= _MAX_EXTENT:
            break
    clear = rng.random() < 0.7
    return _Figure(phase, mask, cell, rim, od=rng.uniform(1.8, 2.5),
                   texture=0.2 if phase == "prophase" else 0.12,
                   cell_e=rng.uniform(0.15, 0.4) if clear else rng.uniform(0.7, 1.0),
                   cell_h=0.03, rim_e=rng.uniform(1.1, 1.5))


def _apoptotic(rng):
    mask, cell, rim = _canvas(), _canvas(), _canvas()
    if rng.random() < 0.6:
        r = rng.uniform(5, 10)
        cv2.ellipse(mask, (_CANVAS, _CANVAS), (int(r), int(r * rng.uniform(0.85, 1))),
                    rng.uniform(0, 180), 0, 360, 1, -1)
    else:  # nuclear fragments (karyorrhexis)
        r = 9
        for _ in range(rng.integers(2, 4)):
            dx, dy = rng.normal(0, 3.5, 2)
            cv2.circle(mask, (int(_CANVAS + dx), int(_CANVAS + dy)), int(rng.uniform(3.5, 6.5)),
                       1, -1)
    body = r + rng.uniform(3, 8)
    halo = body + rng.uniform(2, 6)
    cv2.circle(cell, (_CANVAS, _CANVAS), int(halo), 1, -1)
    # Shrunken, hypereosinophilic cytoplasm inside the clear retraction halo.
    cv2.fillPoly(rim, [_blob(rng, _CANVAS, _CANVAS, body, body * 0.85, rng.uniform(0, np.pi),
                             0.1)], 1)
    return _Figure("apoptotic", mask, cell, rim, od=rng.uniform(1.7, 2.4), texture=0.04,
                   cell_e=rng.uniform(0.25, 0.5), cell_h=0.02, rim_e=rng.uniform(1.5, 2.2))


def _hyperchromatic(rng):
    """An enlarged hyperchromatic interphase nucleus, the look-alike that fools detectors: as
    dark and about as large as a metaphase plate, in a clear cell, but one smooth oval with a
    membrane and no chromosome arms."""
    mask = _canvas()
    half_length = rng.uniform(11, 20)
    half_width = half_length * rng.uniform(0.4, 0.75)
    angle = rng.uniform(0, np.pi)
    cv2.fillPoly(mask, [_blob(rng, _CANVAS, _CANVAS, half_length, half_width, angle, 0.06)], 1)
    cell, rim = _cell_around(rng, half_length + rng.uniform(6, 11),
                             half_width + rng.uniform(9, 15), angle)
    return _Figure("hyperchromatic", mask, cell, rim, od=rng.uniform(1.7, 2.4), texture=0.22,
                   cell_e=rng.uniform(0.15, 0.5), cell_h=0.03, rim_e=rng.uniform(1.1, 1.5))


def _lymphocyte(rng):
    mask, cell, rim = _canvas(), _canvas(), _canvas()
    r = rng.uniform(9, 13)
    cv2.fillPoly(mask, [_blob(rng, _CANVAS, _CANVAS, r, r * rng.uniform(0.85, 1), 0, 0.06)], 1)
    cv2.circle(cell, (_CANVAS, _CANVAS), int(r + rng.uniform(1.5, 3.5)), 1, -1)
    return _Figure("lymphocyte", mask, cell, rim, od=rng.uniform(1.4, 2.0), texture=0.15,
                   cell_e=0.6, cell_h=0.12, rim_e=1.0)


def _crop(fig, pad=4):
    """Crops a figure's layers to their bounding box (+pad) and sets its footprint radius."""
    union = fig.mask | fig.cell | fig.rim
    ys, xs = np.nonzero(union)
    y1, y2 = max(ys.min() - pad, 0), min(ys.max() + pad + 1, union.shape[0])
    x1, x2 = max(xs.min() - pad, 0), min(xs.max() + pad + 1, union.shape[1])
    fig.radius = float(np.hypot(xs - _CANVAS, ys - _CANVAS).max()) + 2
    fig.top_left = (x1 - _CANVAS, y1 - _CANVAS)  # relative to the figure centre
    for name in ("mask", "cell", "rim"):
        setattr(fig, name, getattr(fig, name)[y1:y2, x1:x2].copy())
    return fig


# ----------------------------------------------------------------------------- placement


class _Placer:
    """Reject-samples figure centres: inside the image, off lumens, not overlapping."""

    def __init__(self, rng, shape, nest, gaps, margin=4):
        self.rng, self.shape, self.nest, self.gaps, self.margin = rng, shape, nest, gaps, margin
        self.centers, self.radii = [], []

    def place(self, fig, in_nest=True, near=None, spread=0.0, tries=150):
        """Places ``fig`` (sets ``top_left`` absolute) and returns True, or False if no room."""
        h, w = self.shape
        fh, fw = fig.mask.shape
        ox, oy = fig.top_left
        lo_x, hi_x = self.margin - ox, w - self.margin - (ox + fw)
        lo_y, hi_y = self.margin - oy, h - self.margin - (oy + fh)
        if lo_x > hi_x or lo_y > hi_y:
            return False
        for attempt in range(tries):
            if near is not None:
                cx, cy = np.round(np.asarray(near) + self.rng.normal(0, spread, 2)).astype(int)
                if not (lo_x <= cx <= hi_x and lo_y <= cy <= hi_y):
                    continue
            else:
                cx, cy = int(self.rng.integers(lo_x, hi_x + 1)), int(self.rng.integers(lo_y,
                                                                                   hi_y + 1))
            if self.gaps[cy, cx] > 0.05:
                continue
            # Prefer tumour nests (or stroma) but settle for anywhere after many misses.
            if attempt < tries // 2 and (self.nest[cy, cx] > 0.5) != in_nest:
                continue
            if self.centers:
                d = np.hypot(*(np.asarray(self.centers) - (cx, cy)).T)
                if np.any(d < np.asarray(self.radii) + fig.radius + 3):
                    continue
            self.centers.append((cx, cy))
            self.radii.append(fig.radius)
            fig.top_left = (cx + ox, cy + oy)
            return True
        return False


# ----------------------------------------------------------------------------- tissue


def _stain(rng):
    """Per-image stain: H between blue-purple and magenta, jittered E, intensities, white."""
    t = rng.uniform(0.3, 1.0)
    h_vec = (1 - t) * _H_BLUE + t * _H_MAGENTA + rng.normal(0, 0.03, 3)
    e_vec = _E_REF + rng.normal(0, 0.04, 3)
    h_vec, e_vec = (np.clip(v, 0.02, None) for v in (h_vec, e_vec))
    h_vec, e_vec = h_vec / np.linalg.norm(h_vec), e_vec / np.linalg.norm(e_vec)
    white = 255.0 * rng.uniform(0.93, 1.0) * rng.uniform(0.98, 1.0, 3)
    return {"h_vector": [round(float(v), 4) for v in h_vec],
            "e_vector": [round(float(v), 4) for v in e_vec],
            "h_scale": round(float(rng.uniform(0.85, 1.2)), 4),
            "e_scale": round(float(rng.uniform(0.7, 1.3)), 4),
            "background": [round(float(v), 2) for v in white],
            "noise": round(float(rng.uniform(1.5, 3.0)), 3),
            "blur": round(float(rng.uniform(0.5, 0.8)), 3)}


def _layout(rng, shape, scale):
    """Tumour-nest weight map, fibre angle, eosin map and lumen/fat gap map."""
    h, w = shape
    nest_field = _field(rng, shape, rng.uniform(180, 320))
    cut = np.quantile(nest_field[::9, ::9], 1 - rng.uniform(0.45, 0.8))
    nest = np.clip((nest_field - cut) * 2.5 + 0.5, 0, 1)
    angle = rng.uniform(0, np.pi)
    bend = _field(rng, shape, rng.uniform(50, 110)) * np.float32(rng.uniform(5, 14))
    fibres = (_field(rng, shape, rng.uniform(2, 3.5), rng.uniform(6, 12), angle, bend)
              + 0.6 * _field(rng, shape, 2, 8, angle + rng.uniform(-0.3, 0.3), bend))
    bundles = _field(rng, shape, rng.uniform(10, 18), rng.uniform(4, 8), angle, bend)
    # Fibre texture inside bundles, pale loose gaps between them.
    stroma = np.clip(0.8 + 0.25 * fibres, 0.1, 1.5) * np.clip(1.5 + 0.7 * bundles, 0.12, 1.1)
    cyto = 0.55 * (1 + 0.2 * _field(rng, shape, 2.5))
    eosin = (stroma + nest * (cyto - stroma)) * rng.uniform(0.6, 1.0)
    gaps = np.zeros(shape, np.uint8)
    for _ in range(rng.poisson(rng.uniform(3, 9) * scale)):
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = rng.uniform(12, 60)
        cv2.fillPoly(gaps, [_blob(rng, cx, cy, r, r * rng.uniform(0.4, 1), rng.uniform(0, np.pi),
                                  0.25)], 255)
    gaps = cv2.GaussianBlur(gaps, (0, 0), 2).astype(np.float32) / 255.0
    return nest, angle, eosin, gaps


def _draw_nuclei(rng, shape, nest, fibre_angle, placer, density):
    """Interphase and stromal nuclei (OD map) and per-cell cytoplasm factor (eosin multiplier)."""
    h, w = shape
    nuclei = np.zeros(shape, np.float32)
    cyto = np.ones(shape, np.float32)
    step = rng.uniform(40, 48) / math.sqrt(max(density, 1e-3))
    gy, gx = np.mgrid[step / 2:h:step * 0.87, step / 2:w:step]
    gx = gx + (np.arange(gx.shape[0])[:, None] % 2) * step / 2  # hexagonal packing
    pts = np.stack([gx.ravel(), gy.ravel()], 1) + rng.uniform(-0.35, 0.35, (gx.size, 2)) * step
    pts = pts[(pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)]
    weight = nest[pts[:, 1].astype(int), pts[:, 0].astype(int)]
    in_nest = rng.random(len(pts)) < weight
    keep = in_nest | (rng.random(len(pts)) < 0.1)
    a = np.clip(rng.normal(16.5, 3.5, len(pts)), 12, 25)
    if placer.centers:
        d = np.hypot(pts[:, None, 0] - np.asarray(placer.centers)[None, :, 0],
                     pts[:, None, 1] - np.asarray(placer.centers)[None, :, 1])
        keep &= np.all(d > np.asarray(placer.radii)[None] + 0.5 * a[:, None], axis=1)
    pts, in_nest, a = pts[keep], in_nest[keep], a[keep]
    _draw_tumour_cells(rng, nuclei, cyto, np.round(pts[in_nest]).astype(int), a[in_nest])
    spindle = np.round(pts[~in_nest]).astype(int)
    n = len(spindle)
    # Fibroblasts: thin, dark, lying along the fibres.
    for (x, y), major, minor, ang, od in zip(
            spindle, rng.uniform(10, 22, n), rng.uniform(3, 5.5, n),
            np.degrees(fibre_angle + rng.normal(0, 0.25, n)), rng.uniform(0.55, 0.85, n)):
        cv2.ellipse(nuclei, (int(x), int(y)), (int(major), int(minor)), float(ang), 0, 360,
                    float(od), -1)
    return nuclei, cyto


def _draw_tumour_cells(rng, nuclei, cyto, centers, major):
    """Tumour cells: cytoplasm patch, some retraction halos, vesicular nuclei."""
    n = len(centers)
    minor = major * rng.uniform(0.6, 0.95, n)
    angle = rng.uniform(0, 180, n)
    patch = rng.uniform(0.7, 1.3, n)
    halo = rng.random(n) < 0.08
    dark = rng.random(n) < 0.1  # hyperchromatic: a paler look-alike of a mitosis
    inside = np.where(dark, rng.uniform(0.5, 0.8, n), rng.uniform(0.16, 0.36, n))
    clumps = rng.normal(0, 0.35, (n, 6, 2)) * np.stack([major, minor], 1)[:, None]
    clump_r = rng.integers(1, 3, (n, 6))
    nucleoli = rng.normal(0, 0.3, (n, 2, 2)) * minor[:, None, None]
    n_nucleoli = rng.integers(0, 3, n)
    nucleolus_od = rng.uniform(0.9, 1.2, n)
    for i, (x, y) in enumerate(centers.tolist()):
        axes, ang = (int(major[i]), int(minor[i])), float(angle[i])
        cell_axes = (int(major[i] * 1.45), int(minor[i] * 1.5))
        cv2.ellipse(cyto, (x, y), cell_axes, ang, 0, 360, float(patch[i]), -1)
        cv2.ellipse(cyto, (x, y), cell_axes, ang, 0, 360, 0.7, 1)
        if halo[i]:
            cv2.ellipse(cyto, (x, y), (axes[0] + 4, axes[1] + 4), ang, 0, 360, 0.45, -1)
        od = float(inside[i])
        cv2.ellipse(nuclei, (x, y), axes, ang, 0, 360, od, -1)
        cv2.ellipse(nuclei, (x, y), axes, ang, 0, 360, min(od * 2.4, 0.95), 2)
        for (dx, dy), r in zip(clumps[i].tolist(), clump_r[i].tolist()):  # chromatin clumps
            cv2.circle(nuclei, (int(x + dx), int(y + dy)), r, od * 2.0, -1)
        for dx, dy in nucleoli[i, :n_nucleoli[i]].tolist():
            cv2.circle(nuclei, (int(x + dx), int(y + dy)), 2, float(nucleolus_od[i]), -1)


def _composite(fig, hema, eosin, speckle):
    """Draws a placed figure into the OD maps: cleared cell, membrane, dark chromatin."""
    x0, y0 = fig.top_left
    fh, fw = fig.mask.shape
    h_win, e_win = hema[y0:y0 + fh, x0:x0 + fw], eosin[y0:y0 + fh, x0:x0 + fw]
    cell = cv2.GaussianBlur(fig.cell.astype(np.float32), (0, 0), 1.5)
    h_win *= 1 - cell
    h_win += fig.cell_h * cell
    if fig.rim.any():
        rim = cv2.GaussianBlur(fig.rim.astype(np.float32), (0, 0), 1.0)
        cell *= 1 - rim
        e_win *= 1 + (fig.rim_e - 1) * rim
    e_win *= 1 - (1 - fig.cell_e) * cell
    # A faint unlabelled fringe keeps the edge from looking cut out.
    fringe = cv2.dilate(fig.mask, np.ones((3, 3), np.uint8)).astype(bool)
    h_win[fringe] = np.maximum(h_win[fringe], 0.45 * fig.od)
    inside = fig.mask.astype(bool)
    tex = speckle[y0:y0 + fh, x0:x0 + fw][inside]
    h_win[inside] = fig.od * np.clip(1 + fig.texture * tex, 0.75, 1.3)


# ----------------------------------------------------------------------------- rendering


def _figures(rng, scale, min_side):
    """The mitoses and hard negatives of one image, not yet placed."""
    n_mitoses = int(rng.poisson(rng.uniform(5, 12) * scale))
    if min_side >= 512 and scale > 0:
        n_mitoses = max(n_mitoses, 1)
    n_negatives = int(rng.poisson(rng.uniform(10, 25) * scale))
    n_apoptotic = int(rng.binomial(n_negatives, 0.4))
    phases = rng.choice(len(PHASES), n_mitoses, p=PHASE_WEIGHTS)
    mitoses = [_crop(_mitosis(rng, PHASES[p])) for p in phases]
    apoptotic = [_crop(_apoptotic(rng)) for _ in range(n_apoptotic)]
    return mitoses, apoptotic, n_negatives - n_apoptotic


def _place_lymphocytes(rng, placer, count):
    """Lymphocytes in small clusters, mostly in stroma."""
    placed = []
    while count > 0:
        size = min(count, 1 + int(rng.poisson(2.0)))
        count -= size
        first = _crop(_lymphocyte(rng))
        if not placer.place(first, in_nest=False):
            continue
        placed.append(first)
        anchor = placer.centers[-1]
        for _ in range(size - 1):
            fig = _crop(_lymphocyte(rng))
            if placer.place(fig, in_nest=False, near=anchor, spread=22, tries=40):
                placed.append(fig)
    return placed


def _render(hema, eosin, stain, rng):
    """Beer-Lambert: OD maps -> uint8 RGB, with optical blur and sensor noise."""
    sigma = stain["blur"]
    hema = cv2.GaussianBlur(hema, (0, 0), sigma)
    eosin = cv2.GaussianBlur(eosin, (0, 0), sigma)
    noise = rng.standard_normal(hema.shape, dtype=np.float32)
    noise *= np.float32(stain["noise"])
    channels = []
    for c in range(3):
        # I0 * exp(-od) as one exp: exp(ln I0 - h_scale*h_c*H - e_scale*e_c*E)
        log_rgb = cv2.addWeighted(hema, -stain["h_scale"] * stain["h_vector"][c], eosin,
                                  -stain["e_scale"] * stain["e_vector"][c],
                                  math.log(stain["background"][c]))
        rgb = cv2.exp(log_rgb)
        rgb += noise
        channels.append(cv2.convertScaleAbs(rgb))  # rounds and saturates to uint8
    return cv2.merge(channels)


def _labels(figs, key):
    """Label dicts of placed figures: pixels in image coordinates plus centroid and box."""
    rows = []
    for fig in figs:
        ys, xs = np.nonzero(fig.mask)
        pixels = np.stack([xs + fig.top_left[0], ys + fig.top_left[1]], 1).astype(np.int32)
        rows.append({key: fig.kind, **object_from_pixels(pixels)})
    return rows


def synthesize_image(size, seed: int, image_id: str = "img", density: float = 1.0,
                     mimics: float = 0.0) -> SynthImage:
    """Renders one synthetic H&E field.

    Args:
        size: side in pixels, or (height, width).
        seed: random seed; the same seed gives the same image.
        image_id: id stored in the result.
        density: multiplies the counts of nuclei, mitoses and hard negatives.
        mimics: hyperchromatic look-alikes per ICPR-sized field, in units of 12 (0: none,
            and the image is byte-identical to one made without this option).

    Returns:
        The :class:`SynthImage`.
    """
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if min(h, w) < 16:
        raise InputError(f"image size {w}x{h} too small")
    if not density >= 0:
        raise InputError(f"density must be >= 0, got {density}")
    if not mimics >= 0:
        raise InputError(f"mimics must be >= 0, got {mimics}")
    rng = np.random.default_rng(seed)
    scale = h * w / REFERENCE_AREA * float(density)
    stain = _stain(rng)
    nest, fibre_angle, eosin, gaps = _layout(rng, (h, w), scale)
    mitoses, apoptotic, n_lymph = _figures(rng, scale, min(h, w))
    hyper = []
    if mimics > 0:  # drawn only when asked, so that mimics=0 keeps the old random stream
        hyper = [_crop(_hyperchromatic(rng)) for _ in range(int(rng.poisson(12 * scale * mimics)))]
    placer = _Placer(rng, (h, w), nest, gaps)
    mitoses = [f for f in mitoses if placer.place(f)]
    negatives = [f for f in apoptotic + hyper if placer.place(f)]
    negatives += _place_lymphocytes(rng, placer, n_lymph)
    nuclei, cyto = _draw_nuclei(rng, (h, w), nest, fibre_angle, placer, density)
    speckle = _field(rng, (h, w), 1.6) + 0.6 * _field(rng, (h, w), 4)
    hema = (nuclei + (0.04 + 0.12 * nest) * cyto) * np.exp(0.4 * speckle)
    eosin *= cyto
    open_tissue = 1 - 0.93 * gaps
    hema *= open_tissue
    eosin *= open_tissue
    for fig in negatives + mitoses:  # mitoses last: nothing covers their chromatin
        _composite(fig, hema, eosin, speckle)
    image = _render(hema, eosin, stain, rng)
    return SynthImage(image=image, mitoses=_labels(mitoses, "phase"),
                      hard_negatives=_labels(negatives, "kind"), stain=stain, image_id=image_id)


# ----------------------------------------------------------------------------- dataset


def _image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


def _write_image(directory: Path, synth: SynthImage, neg_writer) -> dict:
    image_id = synth.image_id
    if not cv2.imwrite(str(directory / f"{image_id}.png"),
                       cv2.cvtColor(synth.image, cv2.COLOR_RGB2BGR)):
        raise InputError("cannot write image", directory / f"{image_id}.png")
    lines = [",".join(map(str, m["pixels"].ravel().tolist())) + "\n" for m in synth.mitoses]
    with open(directory / f"{image_id}.csv", "w", encoding="utf-8", newline="") as handle:
        handle.write("".join(lines))
    for neg in synth.hard_negatives:
        neg_writer.writerow([image_id, f"{neg['x']:.2f}", f"{neg['y']:.2f}"]
                            + [f"{neg[k]:g}" for k in ("x1", "y1", "x2", "y2")] + [neg["kind"]])
    phases = {p: sum(m["phase"] == p for m in synth.mitoses) for p in PHASES}
    return {"image": image_id, "mitoses": len(synth.mitoses), "phases": phases,
            "hard_negatives": len(synth.hard_negatives), "stain": synth.stain}


def _check_args(images, size, seed, per_slide):
    for name, value, low in (("images", images, 1), ("size", size, 128),
                             ("per_slide", per_slide, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be an integer, got {value!r}")
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")


def write_dataset(out_dir, images: int, size: int, seed: int, per_slide: int = 4,
                  overwrite: bool = False, progress: bool = False, mimics: float = 0.0) -> dict:
    """Writes a synthetic dataset in the ICPR 2012 layout, atomically.

    Image ``i`` is ``S{i // per_slide:02d}_{i % per_slide:02d}.png`` with a same-stem ``.csv``
    (one line per mitosis: its flat ``x,y,x,y,...`` pixel list). ``hard_negatives.csv`` lists
    the look-alikes of all images and ``synth.json`` the parameters and per-image counts.

    Args:
        out_dir: output directory (written as a temporary sibling, then renamed).
        images: number of images (>= 1).
        size: image side in pixels (>= 128).
        seed: random seed (>= 0); the same seed writes the same bytes.
        per_slide: images per synthetic slide.
        overwrite: replace an existing non-empty ``out_dir``.
        progress: show a progress bar.
        mimics: hyperchromatic look-alikes (see :func:`synthesize_image`).

    Returns:
        The summary written to ``synth.json``.
    """
    _check_args(images, size, seed, per_slide)
    if isinstance(mimics, bool) or not isinstance(mimics, (int, float)) or not mimics >= 0:
        raise InputError(f"mimics must be a number >= 0, got {mimics!r}")
    with atomic_output_dir(out_dir, overwrite) as tmp:
        summary = _write_all(tmp, images, size, seed, per_slide, progress, mimics)
    return summary


def _write_all(directory: Path, images, size, seed, per_slide, progress, mimics) -> dict:
    from tqdm import tqdm

    per_image = []
    with open(directory / "hard_negatives.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "x", "y", "x1", "y1", "x2", "y2", "kind"])
        for i in tqdm(range(images), desc="synth", unit="image", disable=not progress):
            image_id = f"S{i // per_slide:02d}_{i % per_slide:02d}"
            synth = synthesize_image(size, _image_seed(seed, i), image_id, mimics=mimics)
            per_image.append(_write_image(directory, synth, writer))
    summary = {"generator": "focas_keras synth", "seed": int(seed), "images": int(images),
               "size": int(size), "per_slide": int(per_slide), "mpp": ICPR2012_MPP,
               "per_image": per_image}
    if mimics:
        summary["mimics"] = float(mimics)
    (directory / "synth.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                          encoding="utf-8")
    return summary
