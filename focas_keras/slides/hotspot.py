"""The mitotic hotspot of a slide and the Nottingham mitosis score of its count.

Pathologists take the mitotic count in the *hotspot*: the circular window of a stated area
(by default 2.0 mm2, or 10 high-power fields of a stated field diameter) that holds the most
mitoses, with its centre in tissue. :func:`find_hotspot` finds that window exactly over the
accepted detections (in um, level-0 slide coordinates); :func:`nottingham_score` turns its
count into the mitosis component of the Nottingham grade, with cut-offs scaled to the counted
area (:func:`score_cutoffs`, :func:`cutoff_table`).

Pure numpy; no TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np

#: A point is inside a window when its distance to the centre is <= radius * (1 + this).
RADIUS_TOLERANCE = 1e-9

#: Default hotspot area (mm2).
DEFAULT_AREA_MM2 = 2.0

#: Counted area the reference cut-offs are stated for: 10 HPF of 0.274 mm2 (0.59 mm diameter).
REFERENCE_AREA_MM2 = 2.74

#: Reference counts per REFERENCE_AREA_MM2: score 1 below the first, 3 above the second.
REFERENCE_CUTOFFS = (10, 20)

SCORE_SOURCE = (
    "Elston & Ellis 1991 (score 1: < 10, 2: 10-20, 3: > 20 mitoses per 10 HPF of 0.274 mm2); "
    "cut-offs scaled linearly with the counted area as in the NHSBSP / RCPath field-diameter "
    "tables (Bonert & Tate 2017)")

#: Field diameters (mm) of :func:`cutoff_table`'s default rows: 0.40, 0.41, ..., 0.69.
DEFAULT_DIAMETERS_MM = tuple(round(0.40 + 0.01 * i, 2) for i in range(30))

# Cut-offs that land within this of an integer count are that integer (10 * 2.74 / 2.74 must
# not come out as 10.000000000000002 and turn a count of 10 into score 1).
_CUTOFF_EPS = 1e-9

# Candidate centres buffered before one in_tissue call (bounds memory on dense slides).
_FLUSH_SIZE = 65536

_TWO_PI = 2.0 * math.pi


def _positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def circle_radius_um(area_mm2: float) -> float:
    """Radius (um) of the circle of area ``area_mm2`` (mm2, > 0; ValueError otherwise)."""
    area_mm2 = _positive("area_mm2", area_mm2)
    return 1000.0 * math.sqrt(area_mm2 / math.pi)


def hpf_area_mm2(n_hpf: int, field_diameter_mm: float) -> float:
    """Area (mm2) of ``n_hpf`` circular high-power fields of diameter ``field_diameter_mm`` (mm).

    ``n_hpf * pi * (D / 2) ** 2``; e.g. 10 fields of 0.59 mm: 2.734 mm2.
    """
    if isinstance(n_hpf, bool) or int(n_hpf) != n_hpf or n_hpf < 1:
        raise ValueError(f"n_hpf must be an integer >= 1, got {n_hpf!r}")
    field_diameter_mm = _positive("field_diameter_mm", field_diameter_mm)
    return int(n_hpf) * math.pi * (field_diameter_mm / 2.0) ** 2


@dataclasses.dataclass(frozen=True)
class Hotspot:
    """The circular window holding the most points.

    Attributes:
        x_um: centre x (um, level-0 slide coordinates).
        y_um: centre y (um).
        radius_um: window radius (um).
        count: number of points inside (distance to the centre <= radius * (1 + 1e-9)).
        members: indices (into the ``points_um`` given to :func:`find_hotspot`) of those
            points, ascending.
    """

    x_um: float
    y_um: float
    radius_um: float
    count: int
    members: tuple[int, ...]

    @property
    def area_mm2(self) -> float:
        """Window area (mm2)."""
        return math.pi * self.radius_um ** 2 / 1e6

    @property
    def per_mm2(self) -> float:
        """Points per mm2 of window."""
        return self.count / self.area_mm2

    def to_dict(self, mpp: float | None = None) -> dict:
        """JSON-ready values; with ``mpp`` (um/px) also the centre and radius in level-0 px."""
        out = {
            "x_um": float(self.x_um),
            "y_um": float(self.y_um),
            "radius_um": float(self.radius_um),
            "area_mm2": float(self.area_mm2),
            "count": int(self.count),
            "per_mm2": float(self.per_mm2),
            "members": [int(i) for i in self.members],
        }
        if mpp is not None:
            mpp = _positive("mpp", mpp)
            out.update(mpp=mpp, x_px=float(self.x_um) / mpp, y_px=float(self.y_um) / mpp,
                       radius_px=float(self.radius_um) / mpp)
        return out


def _check_points(points_um) -> np.ndarray:
    pts = np.asarray(points_um, dtype=np.float64)
    if pts.size == 0:
        return pts.reshape(0, 2)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points_um must have shape (N, 2), got {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points_um must be finite")
    return pts


def _sweep(p: np.ndarray, others: np.ndarray, pair_ok: np.ndarray, r: float, r_tol: float,
           floor: int):
    """Candidate centres of disks through ``p`` and their counts, where count >= ``floor``.

    The candidates are ``p`` itself and, for each other point q with ``pair_ok`` within
    ``r + r_tol``, the centres of the two radius-``r`` circles through p and q. A candidate on
    the circle of radius ``r`` about p is an angle a; the angles whose disk holds a given q
    form an arc, so sorting the arc ends counts every candidate at once.

    Args:
        p: (2,) the point (um).
        others: (K, 2) the other points that may lie within ``r + r_tol`` of p (um).
        pair_ok: (K,) bool, whether the pair (p, q) yields candidates here (each pair is
            swept once, from its lexicographically smaller point).
        r: window radius (um).
        r_tol: ``r * (1 + RADIUS_TOLERANCE)``.
        floor: smallest count worth returning.

    Returns:
        centres (M, 2) in um and counts (M,) int64.
    """
    v = others - p
    d2 = np.einsum("ij,ij->i", v, v)
    near = d2 <= (r + r_tol) ** 2
    v, d2, pair_ok = v[near], d2[near], pair_ok[near]
    own = 1 + np.count_nonzero(d2 <= r_tol * r_tol)
    centres, counts = [p[None, :]], [np.array([own], dtype=np.int64)]
    if pair_ok.any() and 1 + len(d2) >= floor:
        d = np.sqrt(d2)
        theta = np.arctan2(v[:, 1], v[:, 0])
        # Centre c = p + r (cos a, sin a) holds q iff cos(a - theta) >= num / (2 r d).
        num = d2 + r * r - r_tol * r_tol
        full = num <= -2.0 * r * d  # q (nearly) on p: inside every disk through p
        part = ~full
        phi = np.arccos(np.clip(num[part] / (2.0 * r * d[part]), -1.0, 1.0))
        start = np.mod(theta[part] - phi, _TWO_PI)
        end = start + 2.0 * phi
        # An arc past 2 pi also covers [0, end - 2 pi]: counted as on from the outset, off
        # after end - 2 pi (its start lies beyond that, as arcs are shorter than a turn).
        wrap = np.sort(end[end > _TWO_PI] - _TWO_PI)
        start, end = np.sort(start), np.sort(end)
        beta = np.arccos(np.minimum(d[pair_ok] / (2.0 * r), 1.0))
        angle = np.mod(np.concatenate([theta[pair_ok] - beta, theta[pair_ok] + beta]),
                       _TWO_PI)
        angle[angle >= _TWO_PI] -= _TWO_PI
        angle.sort()  # sorted queries make searchsorted much faster
        # The radius-r pair centres lie strictly inside q's own (r_tol-widened) arc.
        n = (1 + np.count_nonzero(full) + len(wrap) + np.searchsorted(start, angle, "right")
             - np.searchsorted(end, angle, "left") - np.searchsorted(wrap, angle, "left"))
        keep = n >= floor
        angle = angle[keep]
        centres.append(p + r * np.stack([np.cos(angle), np.sin(angle)], axis=1))
        counts.append(n[keep].astype(np.int64))
    return np.concatenate(centres), np.concatenate(counts)


def _tie_key(centre: np.ndarray) -> tuple[float, float, float, float]:
    x, y = float(centre[0]), float(centre[1])
    return (round(y, 6), round(x, 6), y, x)


def _grid(pts: np.ndarray, cell: float) -> dict[tuple[int, int], np.ndarray]:
    """Point indices by square cell of side ``cell`` (um)."""
    keys = np.floor(pts / cell).astype(np.int64)
    order = np.lexsort((keys[:, 1], keys[:, 0]))
    cells, first = np.unique(keys[order], axis=0, return_index=True)
    bounds = np.append(first, len(order))
    return {(int(cx), int(cy)): order[bounds[i]:bounds[i + 1]]
            for i, (cx, cy) in enumerate(cells)}


def find_hotspot(points_um, radius_um: float,
                 in_tissue: Callable[[np.ndarray], np.ndarray] | None = None) -> Hotspot | None:
    """The radius-``radius_um`` closed disk holding the most points, by exact search.

    A point is inside when its distance to the centre is <= ``radius_um * (1 + 1e-9)``.
    The best disk (if it holds >= 2 points) can be moved until two points lie on its
    boundary, or (1 point) centred on a point, so the candidate centres are every point and,
    for every pair at most 2 r apart, the centres of the two radius-r circles through both.
    Their counts come from an angular sweep about each point (O(N^2 log N) at worst; points
    are bucketed so that only pairs within 2 r are visited).

    With ``in_tissue``, candidate centres outside tissue are discarded: the result is then the
    best over the in-tissue candidate centres, which is exact over that set but can miss a
    disk that fits only with no point on its boundary (a narrow tissue strip, say).

    Ties (same count) go to the candidate with the smallest y, then the smallest x, both
    rounded to 1e-6 um (then the unrounded y, x), so the answer does not depend on the
    order of the points.

    Args:
        points_um: (N, 2) float, x and y of the points (um), e.g. accepted mitoses.
        radius_um: window radius (um), > 0; see :func:`circle_radius_um`.
        in_tissue: optional callable taking an (M, 2) float array of centres (um) and
            returning an (M,) bool array, True where a centre is in tissue.

    Returns:
        The :class:`Hotspot`, or None when there are no points or no candidate centre is in
        tissue (the caller reports a count of 0).

    Raises:
        ValueError: ``radius_um`` not finite and > 0, ``points_um`` not (N, 2) or not finite,
            or ``in_tissue`` returning the wrong shape.
    """
    r = _positive("radius_um", radius_um)
    pts = _check_points(points_um)
    if len(pts) == 0:
        return None
    r_tol = r * (1.0 + RADIUS_TOLERANCE)
    reach = r + r_tol
    cells = _grid(pts, reach)
    near_cells = {}
    for cx, cy in cells:
        block = [cells[k] for k in ((cx + i, cy + j) for i in (-1, 0, 1) for j in (-1, 0, 1))
                 if k in cells]
        near_cells[cx, cy] = np.concatenate(block)
    # Richest neighbourhoods first: the best count found early lets poorer cells be skipped.
    visit = sorted(cells, key=lambda k: (-len(near_cells[k]), k))

    best_count, best_key, best_centre = 0, None, None
    buf_centres, buf_counts, buffered = [], [], 0

    def flush():
        nonlocal best_count, best_key, best_centre, buf_centres, buf_counts, buffered
        if not buf_centres:
            return
        centres, counts = np.concatenate(buf_centres), np.concatenate(buf_counts)
        buf_centres, buf_counts, buffered = [], [], 0
        keep = counts >= best_count
        centres, counts = centres[keep], counts[keep]
        if in_tissue is not None and len(centres):
            inside = np.asarray(in_tissue(centres.copy()))
            if inside.shape != (len(centres),):
                raise ValueError(f"in_tissue returned shape {inside.shape} for "
                                 f"{len(centres)} centres; expected ({len(centres)},)")
            inside = inside.astype(bool)
            centres, counts = centres[inside], counts[inside]
        if not len(counts):
            return
        top = counts.max()
        if top < best_count:
            return
        centres = centres[counts == top]
        ry, rx = np.round(centres[:, 1], 6), np.round(centres[:, 0], 6)
        first = centres[np.lexsort((centres[:, 0], centres[:, 1], rx, ry))[0]]
        key = _tie_key(first)
        if top > best_count or best_key is None or key < best_key:
            best_count, best_key, best_centre = int(top), key, first

    for cell in visit:
        near = near_cells[cell]
        if len(near) < best_count:  # no disk through a point of this cell can hold more
            continue
        for i in cells[cell]:
            others = pts[near[near != i]]
            p = pts[i]
            pair_ok = (others[:, 0] > p[0]) | ((others[:, 0] == p[0]) & (others[:, 1] >= p[1]))
            centres, counts = _sweep(p, others, pair_ok, r, r_tol, best_count)
            if in_tissue is None:  # every centre counts, so only this point's best matter
                keep = counts == counts.max()
                centres, counts = centres[keep], counts[keep]
            buf_centres.append(centres)
            buf_counts.append(counts)
            buffered += len(counts)
            if buffered >= _FLUSH_SIZE:
                flush()
        flush()

    if best_centre is None:
        return None
    # The reported members are by distance from the chosen centre itself.
    d2 = np.sum((pts - best_centre) ** 2, axis=1)
    members = tuple(int(i) for i in np.flatnonzero(d2 <= r_tol * r_tol))
    return Hotspot(x_um=float(best_centre[0]), y_um=float(best_centre[1]), radius_um=r,
                   count=len(members), members=members)


def score_cutoffs(area_mm2: float) -> tuple[float, float]:
    """Counts (not rounded) at which score 2 starts and above which score 3 starts.

    The reference cut-offs (10 and 20 mitoses in 2.74 mm2) scaled linearly to a window of
    ``area_mm2`` (mm2): ``(10 * A / 2.74, 20 * A / 2.74)``.
    """
    scale = _positive("area_mm2", area_mm2) / REFERENCE_AREA_MM2
    lo, hi = REFERENCE_CUTOFFS
    return (lo * scale, hi * scale)


def _score(count: int, lo: float, hi: float) -> int:
    if count < lo - _CUTOFF_EPS:
        return 1
    if count > hi + _CUTOFF_EPS:
        return 3
    return 2


def nottingham_score(count: int, area_mm2: float) -> dict:
    """The Nottingham mitosis score of ``count`` mitoses counted in ``area_mm2`` (mm2).

    Score 1 when count < lo, 3 when count > hi, else 2, with (lo, hi) from
    :func:`score_cutoffs` (a cut-off within 1e-9 of an integer is taken as that integer).

    Returns:
        JSON-ready dict: ``score`` (1, 2 or 3), ``area_mm2``, ``count``, ``per_mm2``,
        ``cutoffs`` ([lo, hi] rounded to 2 decimals), ``rule`` (one line), ``source``.
    """
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be an integer >= 0, got {count!r}")
    count = int(count)
    area_mm2 = _positive("area_mm2", area_mm2)
    lo, hi = score_cutoffs(area_mm2)
    return {
        "score": _score(count, lo, hi),
        "area_mm2": area_mm2,
        "count": count,
        "per_mm2": count / area_mm2,
        "cutoffs": [round(lo, 2), round(hi, 2)],
        "rule": (f"score 1: < {lo:.2f}, 2: {lo:.2f}-{hi:.2f}, 3: > {hi:.2f} mitoses in "
                 f"{area_mm2:.2f} mm2"),
        "source": SCORE_SOURCE,
    }


def cutoff_table(diameters_mm=DEFAULT_DIAMETERS_MM, n_hpf: int = 10) -> list[dict]:
    """Integer count ranges of scores 1, 2, 3 for ``n_hpf`` fields of each diameter.

    Derived from :func:`score_cutoffs` of the ``n_hpf``-field area, so it agrees with
    :func:`nottingham_score`: score 1 is 0 .. ceil(lo) - 1, score 2 ceil(lo) .. floor(hi),
    score 3 floor(hi) + 1 and above.

    Returns:
        One dict per diameter: ``field_diameter_mm``, ``field_area_mm2`` (one field),
        ``area_mm2`` (``n_hpf`` fields), ``n_hpf``, ``cutoffs`` ([lo, hi], 2 decimals),
        ``score1_max``, ``score2_min``, ``score2_max`` (both None if no count scores 2),
        ``score3_min``.
    """
    rows = []
    for diameter in diameters_mm:
        area = hpf_area_mm2(n_hpf, diameter)
        lo, hi = score_cutoffs(area)
        first2 = math.ceil(lo - _CUTOFF_EPS)
        last2 = math.floor(hi + _CUTOFF_EPS)
        empty = last2 < first2
        rows.append({
            "field_diameter_mm": float(diameter),
            "field_area_mm2": hpf_area_mm2(1, diameter),
            "area_mm2": area,
            "n_hpf": int(n_hpf),
            "cutoffs": [round(lo, 2), round(hi, 2)],
            "score1_max": first2 - 1,
            "score2_min": None if empty else first2,
            "score2_max": None if empty else last2,
            "score3_min": last2 + 1,
        })
    return rows


def cutoff_table_markdown(diameters_mm=DEFAULT_DIAMETERS_MM, n_hpf: int = 10) -> str:
    """:func:`cutoff_table` as a Markdown table (one line per diameter, trailing newline)."""
    lines = [
        (f"| Field diameter (mm) | Field area (mm2) | {n_hpf} HPF area (mm2) | Score 1 | "
         "Score 2 | Score 3 |"),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in cutoff_table(diameters_mm, n_hpf):
        two = ("-" if row["score2_min"] is None
               else f"{row['score2_min']}-{row['score2_max']}")
        lines.append(
            f"| {row['field_diameter_mm']:.2f} | {row['field_area_mm2']:.3f} | "
            f"{row['area_mm2']:.3f} | 0-{row['score1_max']} | {two} | "
            f">= {row['score3_min']} |")
    return "\n".join(lines) + "\n"


def clip_ring(ring, x0: float, y0: float, x1: float, y1: float) -> list:
    """A polygon ring clipped to the rectangle ``[x0, x1] x [y0, y1]`` (Sutherland-Hodgman).

    Exact for a convex ring such as a circle's polygon: the result is their intersection.

    Args:
        ring: closed ring ``[[x, y], ..., first]`` (or open: the closing vertex is optional).
        x0, y0, x1, y1: the rectangle (x0 < x1, y0 < y1).

    Returns:
        The closed clipped ring (first vertex repeated at the end); ``[]`` when the ring lies
        outside the rectangle.
    """
    points = [(float(x), float(y)) for x, y in ring]
    if len(points) > 1 and points[0] == points[-1]:
        points = points[:-1]
    # Each side of the rectangle as (axis, bound, sign): inside where sign * (v - bound) >= 0.
    for axis, bound, sign in ((0, x0, 1.0), (0, x1, -1.0), (1, y0, 1.0), (1, y1, -1.0)):
        def inside(v, axis=axis, bound=bound, sign=sign):
            return sign * (v[axis] - bound) >= 0.0

        def cut(v, w, axis=axis, bound=bound):
            t = (bound - v[axis]) / (w[axis] - v[axis])
            return tuple(bound if a == axis else v[a] + (w[a] - v[a]) * t for a in (0, 1))

        out = []
        for k, q in enumerate(points):
            p = points[k - 1]
            if inside(q):
                if not inside(p):
                    out.append(cut(p, q))
                out.append(q)
            elif inside(p):
                out.append(cut(p, q))
        points = out
        if not points:
            break
    if len(points) < 3:
        return []
    return [list(p) for p in points] + [list(points[0])]


def ring_area(ring) -> float:
    """Area enclosed by a polygon ring (shoelace), in the ring's units squared; 0 for ``[]``."""
    if len(ring) < 3:
        return 0.0
    pts = np.asarray(ring, np.float64)
    x, y = pts[:, 0], pts[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
