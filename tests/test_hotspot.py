"""The exact hotspot search and the Nottingham mitosis score (focas_keras.slides.hotspot)."""

import dataclasses
import json
import math

import numpy as np
import pytest

from focas_keras.slides.hotspot import (
    DEFAULT_DIAMETERS_MM,
    RADIUS_TOLERANCE,
    REFERENCE_AREA_MM2,
    REFERENCE_CUTOFFS,
    SCORE_SOURCE,
    Hotspot,
    circle_radius_um,
    cutoff_table,
    cutoff_table_markdown,
    find_hotspot,
    hpf_area_mm2,
    nottingham_score,
    score_cutoffs,
)


def counts_at(centres, points, radius):
    """Brute force: points within radius * (1 + tolerance) of each centre."""
    d2 = ((centres[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    return (d2 <= (radius * (1 + RADIUS_TOLERANCE)) ** 2).sum(1)


def candidate_centres(points, radius):
    """Every point, and both radius-r circle centres of every pair at most 2 r apart."""
    out = [points]
    for i in range(len(points)):
        for j in range(i + 1, len(points)):
            p, q = points[i], points[j]
            d = math.dist(p, q)
            if 0 < d <= 2 * radius:
                mid = (p + q) / 2
                h = math.sqrt(max(radius ** 2 - (d / 2) ** 2, 0.0))
                perp = np.array([-(q - p)[1], (q - p)[0]]) / d
                out.append(np.stack([mid + h * perp, mid - h * perp]))
    return np.concatenate(out)


def test_circle_radius_and_hpf_area():
    r = circle_radius_um(2.0)
    assert r == pytest.approx(797.8846, abs=1e-4)
    assert math.pi * r ** 2 / 1e6 == pytest.approx(2.0, rel=1e-12)
    assert hpf_area_mm2(10, 0.59) == pytest.approx(2.734, abs=5e-4)
    assert hpf_area_mm2(1, 0.5) == pytest.approx(math.pi * 0.0625)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            circle_radius_um(bad)
    with pytest.raises(ValueError):
        hpf_area_mm2(0, 0.59)
    with pytest.raises(ValueError):
        hpf_area_mm2(10, 0.0)


def test_three_points_on_a_circle_need_the_two_boundary_centre():
    r = 100.0
    centre = np.array([500.0, 700.0])
    angles = 0.3 + np.array([0, 2, 4]) * math.pi / 3
    pts = centre + r * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    # sides are r * sqrt(3) > r: a window centred on any of the points holds that point only
    assert (counts_at(pts, pts, r) == 1).all()
    h = find_hotspot(pts, r)
    assert h.count == 3 and h.members == (0, 1, 2)
    assert (h.x_um, h.y_um) == pytest.approx(tuple(centre), abs=1e-6)
    assert h.radius_um == r


def test_cluster_beats_outlier():
    pts = np.array([[5000.0, 5000.0], [1000, 1000], [1030, 1010], [990, 1050], [1020, 980]])
    h = find_hotspot(pts, 80.0)
    assert h.count == 4
    assert h.members == (1, 2, 3, 4)
    assert math.dist((h.x_um, h.y_um), (1010, 1010)) < 80


def test_points_exactly_2r_apart_only_at_the_midpoint():
    h = find_hotspot(np.array([[0.0, 0.0], [200.0, 0.0]]), 100.0)
    assert h.count == 2 and h.members == (0, 1)
    assert (h.x_um, h.y_um) == pytest.approx((100.0, 0.0), abs=1e-6)
    # a hair further apart: no window holds both; tie of two singles -> smaller x
    h = find_hotspot(np.array([[200.001, 0.0], [0.0, 0.0]]), 100.0)
    assert h.count == 1 and h.members == (1,)
    assert (h.x_um, h.y_um) == (0.0, 0.0)


def test_slide_edge_tissue_moves_the_centre():
    pts = np.array([[0.0, 0.0], [0.0, 150.0]])
    half = math.sqrt(100.0 ** 2 - 75.0 ** 2)
    free = find_hotspot(pts, 100.0)
    # the two centres through both points tie at y = 75: the smaller x, off the slide, wins
    assert free.count == 2
    assert (free.x_um, free.y_um) == pytest.approx((-half, 75.0), abs=1e-6)
    edge = find_hotspot(pts, 100.0, in_tissue=lambda c: c[:, 0] >= 0)
    assert edge.count == 2 and edge.members == (0, 1)
    assert (edge.x_um, edge.y_um) == pytest.approx((half, 75.0), abs=1e-6)


def test_tissue_drops_the_count():
    pts = np.array([[0.0, -90.0], [0.0, 90.0], [120.0, 300.0]])
    free = find_hotspot(pts, 100.0)
    assert free.count == 2 and free.members == (0, 1)
    # every window holding both points is centred at x <= 43.6 um, outside this tissue
    calls = []

    def tissue(c):
        calls.append(c.shape)
        return c[:, 0] >= 60

    h = find_hotspot(pts, 100.0, in_tissue=tissue)
    assert h.count == 1 and h.members == (2,)
    assert (h.x_um, h.y_um) == (120.0, 300.0)
    assert calls and all(len(s) == 2 and s[1] == 2 for s in calls)


def test_no_points_or_no_centre_in_tissue_gives_none():
    assert find_hotspot(np.empty((0, 2)), 100.0) is None
    assert find_hotspot([], 100.0) is None
    # the only candidates (the points, the two pair centres at x = +-43.6) are all at x < 60
    pts = np.array([[0.0, -90.0], [0.0, 90.0]])
    assert find_hotspot(pts, 100.0, in_tissue=lambda c: c[:, 0] >= 60) is None
    rng = np.random.default_rng(3)
    assert find_hotspot(rng.uniform(0, 500, (30, 2)), 100.0,
                        in_tissue=lambda c: np.zeros(len(c), bool)) is None


def test_ties_go_to_smaller_y_then_x_whatever_the_order():
    cluster = np.array([[0.0, 0.0], [20.0, 5.0], [8.0, 25.0]])
    high, low = cluster + [300.0, 1000.0], cluster + [300.0, 0.0]
    pts = np.concatenate([high, low])
    h = find_hotspot(pts, 50.0)
    assert h.count == 3 and h.members == (3, 4, 5)
    assert h.y_um < 500
    rng = np.random.default_rng(0)
    for order in (np.arange(6)[::-1], rng.permutation(6), rng.permutation(6)):
        g = find_hotspot(pts[order], 50.0)
        assert (g.x_um, g.y_um) == pytest.approx((h.x_um, h.y_um), abs=1e-9)
        assert sorted(order[list(g.members)]) == [3, 4, 5]
    # same y: the smaller x wins, in either order
    left, right = cluster + [0.0, 0.0], cluster + [1000.0, 0.0]
    for pts in (np.concatenate([right, left]), np.concatenate([left, right])):
        g = find_hotspot(pts, 50.0)
        assert g.count == 3 and g.x_um < 500


def test_validation():
    with pytest.raises(ValueError):
        find_hotspot([[0.0, 0.0]], 0.0)
    with pytest.raises(ValueError):
        find_hotspot([[0.0, 0.0]], float("nan"))
    with pytest.raises(ValueError):
        find_hotspot([], -1.0)
    with pytest.raises(ValueError):
        find_hotspot([1.0, 2.0, 3.0], 10.0)
    with pytest.raises(ValueError):
        find_hotspot(np.zeros((2, 3)), 10.0)
    with pytest.raises(ValueError):
        find_hotspot([[0.0, float("nan")]], 10.0)
    with pytest.raises(ValueError):
        find_hotspot([[0.0, 0.0]], 10.0, in_tissue=lambda c: np.ones(len(c) + 1, bool))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tissue", [False, True])
def test_matches_brute_force(seed, tissue):
    rng = np.random.default_rng(seed)
    r = 80.0
    pts = np.concatenate([rng.uniform(0, 600, (40, 2)),
                          rng.normal(rng.uniform(150, 450, 2), 40, (15, 2))])
    in_tissue = None
    if tissue:  # a disk of tissue that cuts through the cluster's neighbourhood
        centre = rng.uniform(200, 400, 2)

        def in_tissue(c):
            return ((c - centre) ** 2).sum(1) <= 220.0 ** 2

    h = find_hotspot(pts, r, in_tissue=in_tissue)

    cands = candidate_centres(pts, r)
    if in_tissue is not None:
        cands = cands[in_tissue(cands)]
    counts = counts_at(cands, pts, r)
    assert h.count == counts.max()
    # ties: the smallest y, then x (both rounded to 1e-6 um) among the best candidates
    best = cands[counts == counts.max()]
    first = min(best, key=lambda c: (round(c[1], 6), round(c[0], 6)))
    assert (h.x_um, h.y_um) == pytest.approx(tuple(first), abs=1e-6)
    d = np.hypot(pts[:, 0] - h.x_um, pts[:, 1] - h.y_um)
    assert h.members == tuple(np.flatnonzero(d <= r * (1 + RADIUS_TOLERANCE)))

    # no window on a fine grid of centres holds more than the exact search found
    xs = np.arange(pts[:, 0].min() - r, pts[:, 0].max() + r, 3.0)
    ys = np.arange(pts[:, 1].min() - r, pts[:, 1].max() + r, 3.0)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    if in_tissue is not None:
        grid = grid[in_tissue(grid)]
    grid_best = counts_at(grid, pts, r).max()
    assert grid_best <= h.count
    assert grid_best >= h.count - 2  # a 3 um grid comes close


def test_hotspot_dict_and_frozen():
    h = Hotspot(x_um=1000.0, y_um=500.0, radius_um=circle_radius_um(2.0), count=7,
                members=(1, 4, 9, 10, 11, 12, 20))
    assert h.area_mm2 == pytest.approx(2.0)
    assert h.per_mm2 == pytest.approx(3.5)
    d = h.to_dict()
    assert "x_px" not in d
    assert d["count"] == 7 and d["members"] == [1, 4, 9, 10, 11, 12, 20]
    d = h.to_dict(mpp=0.25)
    assert (d["x_px"], d["y_px"]) == (4000.0, 2000.0)
    assert d["radius_px"] == pytest.approx(4 * h.radius_um)
    json.dumps(d)
    json.dumps(find_hotspot(np.array([[1.0, 2.0], [3.0, 4.0]]), 5.0).to_dict(mpp=0.5))
    with pytest.raises(dataclasses.FrozenInstanceError):
        h.count = 8
    with pytest.raises(ValueError):
        h.to_dict(mpp=0)


def test_score_cutoffs_scale_with_area():
    assert REFERENCE_AREA_MM2 == 2.74 and REFERENCE_CUTOFFS == (10, 20)
    assert "Elston" in SCORE_SOURCE and "Bonert" in SCORE_SOURCE
    assert score_cutoffs(2.74) == pytest.approx((10.0, 20.0))
    assert score_cutoffs(2.0) == pytest.approx((10 * 2 / 2.74, 20 * 2 / 2.74))
    assert score_cutoffs(5.48) == pytest.approx((20.0, 40.0))
    with pytest.raises(ValueError):
        score_cutoffs(0.0)


@pytest.mark.parametrize("count, area, score", [
    (0, 2.74, 1), (9, 2.74, 1), (10, 2.74, 2), (20, 2.74, 2), (21, 2.74, 3),
    # 2.0 mm2: cut-offs 7.30 and 14.60
    (7, 2.0, 1), (8, 2.0, 2), (14, 2.0, 2), (15, 2.0, 3)])
def test_nottingham_score(count, area, score):
    out = nottingham_score(count, area)
    assert out["score"] == score
    assert out["count"] == count and out["area_mm2"] == area
    assert out["per_mm2"] == pytest.approx(count / area)
    json.dumps(out)


def test_nottingham_rule_and_validation():
    out = nottingham_score(12, 2.0)
    assert out["cutoffs"] == [7.3, 14.6]
    assert out["rule"] == "score 1: < 7.30, 2: 7.30-14.60, 3: > 14.60 mitoses in 2.00 mm2"
    assert out["source"] == SCORE_SOURCE
    assert nottingham_score(np.int64(10), 2.74)["score"] == 2
    for count in (-1, 2.5, True):
        with pytest.raises(ValueError):
            nottingham_score(count, 2.0)
    with pytest.raises(ValueError):
        nottingham_score(3, 0.0)


def test_cutoff_table_059_row_and_agreement_with_the_score():
    rows = cutoff_table()
    assert [r["field_diameter_mm"] for r in rows] == list(DEFAULT_DIAMETERS_MM)
    assert len(rows) == 30 and rows[0]["field_diameter_mm"] == 0.40
    assert rows[-1]["field_diameter_mm"] == 0.69
    (row,) = cutoff_table((0.59,))
    assert row["area_mm2"] == pytest.approx(2.734, abs=5e-4)
    assert row["field_area_mm2"] == pytest.approx(0.2734, abs=5e-5)
    # hi = 20 * 2.734 / 2.74 = 19.96, so 20 mitoses already score 3 in 10 fields of 0.59 mm
    assert row["cutoffs"] == [9.98, 19.96]
    assert (row["score1_max"], row["score2_min"], row["score2_max"], row["score3_min"]) == (
        9, 10, 19, 20)
    for row in rows:
        for count in range(40):
            expect = (1 if count <= row["score1_max"] else
                      3 if count >= row["score3_min"] else 2)
            assert nottingham_score(count, row["area_mm2"])["score"] == expect


def test_cutoff_table_markdown():
    md = cutoff_table_markdown()
    lines = md.splitlines()
    assert len(lines) == 2 + 30
    assert lines[0].startswith("| Field diameter (mm) |")
    assert "| 0.59 | 0.273 | 2.734 | 0-9 | 10-19 | >= 20 |" in lines
    assert cutoff_table_markdown((0.5,), n_hpf=5).count("\n") == 3
