"""Outputs of ``detect``: detections CSV, QuPath GeoJSON, counts per mm^2, overlays."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from focas_keras.errors import InputError  # noqa: E402
from focas_keras.inference import outputs  # noqa: E402


def _frame(rows):
    """A Cascade.run-like table from (x1, y1, x2, y2, det, cls, accepted) tuples."""
    df = pd.DataFrame(rows, columns=["x1", "y1", "x2", "y2", "det_score", "cls_score",
                                     "accepted"])
    df.insert(0, "y", (df.y1 + df.y2) / 2)
    df.insert(0, "x", (df.x1 + df.x2) / 2)
    return df


A = _frame([(10.123456, 10, 40.5, 40, 0.9123456, 0.8765432, True),
            (60, 60, 90, 90, 0.5, 0.1, False)])
B = _frame([(5, 6, 25, 30, 0.7, 0.95, True)])


def _all():
    return pd.concat([A.assign(image="img_a"), B.assign(image="img_b")], ignore_index=True)


def _no_tmp(root):
    return [p for p in Path(root).rglob("*") if ".tmp" in p.name]


def test_detections_csv_columns_and_rounding(tmp_path):
    path = tmp_path / "detections.csv"
    outputs.write_detections_csv(_all(), path)
    header = path.read_text().splitlines()[0]
    assert header == "image,x,y,x1,y1,x2,y2,det_score,cls_score,accepted"
    back = pd.read_csv(path)
    assert list(back.image) == ["img_a", "img_a", "img_b"]
    assert back.x1[0] == 10.12 and back.det_score[0] == 0.9123 and back.cls_score[0] == 0.8765
    assert back.accepted.dtype == bool and list(back.accepted) == [True, False, True]
    assert not _no_tmp(tmp_path)
    with pytest.raises(ValueError, match="image"):
        outputs.write_detections_csv(A, tmp_path / "x.csv")


def test_geojson_is_a_qupath_feature_collection(tmp_path):
    path = tmp_path / "d.geojson"
    outputs.write_geojson(_all(), path)
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection"
    assert len(data["features"]) == 2  # accepted only
    first = data["features"][0]
    assert first["type"] == "Feature"
    geometry = first["geometry"]
    assert geometry["type"] == "Polygon"
    ring = geometry["coordinates"][0]
    assert len(ring) == 5 and ring[0] == ring[-1]
    assert ring == [[10.12, 10.0], [40.5, 10.0], [40.5, 40.0], [10.12, 40.0], [10.12, 10.0]]
    xs, ys = np.array(ring).T
    assert 0.5 * np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0  # counter-clockwise numbers
    props = first["properties"]
    assert props["objectType"] == "detection" and props["isLocked"] is False
    assert props["classification"] == {"name": "Mitosis", "color": [0, 200, 0]}
    assert props["measurements"] == {"det_score": 0.9123, "cls_score": 0.8765}
    assert [f["properties"]["image"] for f in data["features"]] == ["img_a", "img_b"]
    assert not _no_tmp(tmp_path)


def test_counts_per_mm2():
    counts = outputs.counts_table([
        outputs.count_row("hpf", A.assign(accepted=[True, True]), 2084, 2084, 0.2456),
        {"image": "none", "accepted": 0, "candidates": 0, "width_px": 100, "height_px": 50,
         "mpp": 0.5}])
    assert list(counts.columns) == outputs.COUNT_COLUMNS
    hpf = counts.iloc[0]
    assert hpf.area_mm2 == pytest.approx(0.26197, rel=1e-4)
    assert hpf.per_mm2 == pytest.approx(2 / 0.26197, rel=1e-4)
    assert hpf.candidates == 2 and hpf.accepted == 2
    assert counts.iloc[1].area_mm2 == pytest.approx(100 * 50 * 0.25 / 1e6)
    assert counts.iloc[1].per_mm2 == 0


def test_overlay_colours_at_box_edges(tmp_path):
    image = np.full((100, 120, 3), 128, np.uint8)
    df = _frame([(10, 10, 40, 40, 0.9, 0.9, True), (60, 60, 90, 90, 0.8, 0.1, False)])
    drawn = outputs.draw_overlay(image, df)
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape
    assert (image == 128).all()  # input untouched
    assert tuple(drawn[25, 10]) == outputs.ACCEPTED_RGB  # left edge
    assert tuple(drawn[39, 25]) == outputs.ACCEPTED_RGB  # bottom edge (y2 exclusive)
    assert tuple(drawn[75, 60]) == outputs.REJECTED_RGB
    assert tuple(drawn[89, 75]) == outputs.REJECTED_RGB
    assert tuple(drawn[25, 25]) == (128, 128, 128)  # inside untouched
    png = tmp_path / "o.png"
    outputs.write_overlay(image, df, png)
    read = cv2.cvtColor(cv2.imread(str(png)), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(read, drawn)
    outputs.write_overlay(image, df, tmp_path / "o.jpg")
    jpg = cv2.cvtColor(cv2.imread(str(tmp_path / "o.jpg")), cv2.COLOR_BGR2RGB).astype(int)
    assert jpg[25, 10, 1] > 180 and jpg[25, 10, 0] < 80  # still green
    with pytest.raises(ValueError):
        outputs.write_overlay(image, df, tmp_path / "o.gif")
    assert not _no_tmp(tmp_path)


def _is(pixel, rgb):
    return tuple(int(v) for v in pixel) == tuple(rgb)


@pytest.mark.parametrize("accepted_first", [True, False])
def test_accepted_stay_green_where_a_rejected_box_crosses_them(accepted_first):
    image = np.full((100, 120, 3), 128, np.uint8)
    rows = [(20, 20, 60, 60, 0.9, 0.9, True), (40, 40, 80, 80, 0.95, 0.2, False)]
    drawn = outputs.draw_overlay(image, _frame(rows if accepted_first else rows[::-1]),
                                 legend=False)
    # Where the two boxes' edges cross, the accepted one is on top.
    assert _is(drawn[59, 40], outputs.ACCEPTED_RGB)  # accepted bottom x rejected left
    assert _is(drawn[40, 59], outputs.ACCEPTED_RGB)  # accepted right x rejected top
    assert _is(drawn[50, 59], outputs.ACCEPTED_RGB)  # accepted right edge inside rejected
    # Rejected edges are 1 px: red on the edge, untouched beside it.
    assert _is(drawn[79, 70], outputs.REJECTED_RGB) and _is(drawn[40, 70], outputs.REJECTED_RGB)
    assert _is(drawn[78, 70], (128, 128, 128)) and _is(drawn[41, 70], (128, 128, 128))
    # Accepted edges are thicker (2 px here).
    assert _is(drawn[20, 30], outputs.ACCEPTED_RGB) and _is(drawn[21, 30], outputs.ACCEPTED_RGB)
    # Without the rejected ones, their edges stay the image.
    plain = outputs.draw_overlay(image, _frame(rows), rejected=False, legend=False)
    assert _is(plain[79, 70], (128, 128, 128)) and _is(plain[59, 40], outputs.ACCEPTED_RGB)
    assert not (np.all(plain == outputs.REJECTED_RGB, axis=-1)).any()


def test_overlay_legend_names_colours_and_counts_away_from_the_boxes():
    assert outputs._legend_lines(1, 2, True) == [
        ("accepted (mitoses): 1", outputs.ACCEPTED_RGB),
        ("rejected candidates: 2", outputs.REJECTED_RGB)]
    assert outputs._legend_lines(0, 3, False)[1][0] == "rejected candidates: 3 (not drawn)"
    image = np.full((600, 800, 3), 200, np.uint8)
    df = _frame([(10, 10, 60, 60, 0.9, 0.9, True), (20, 30, 70, 80, 0.8, 0.1, False),
                 (5, 500, 50, 550, 0.7, 0.2, False)])  # top left and bottom left taken
    drawn = outputs.draw_overlay(image, df)
    changed = np.any(drawn != 200, axis=-1)
    ys, xs = np.nonzero(changed[:, 400:])  # right half: the legend only
    assert (ys.min(), xs.max() + 400) == (0, 799) and ys.max() < 60  # flush top right
    legend = drawn[:ys.max() + 1, xs.min() + 400:].astype(int)
    assert np.median(legend) < 100  # a dark box...
    green = (legend[..., 1] > 150) & (legend[..., 0] < 100)
    red = (legend[..., 0] > 150) & (legend[..., 1] < 100)
    half = legend.shape[0] // 2
    assert green[:half].sum() > 20 and not green[half:].any()  # ...first line green
    assert red[half:].sum() > 20 and not red[:half].any()      # second line red
    assert (drawn[100:400, 300:500] == 200).all()              # the middle untouched
    tiny = outputs.draw_overlay(np.full((40, 40, 3), 200, np.uint8), df.iloc[:0])
    assert (tiny == 200).all()  # no room for a legend: none


def test_write_outputs_layout(tmp_path):
    image = np.full((100, 120, 3), 200, np.uint8)
    empty = A.iloc[:0]
    counts = outputs.write_outputs(tmp_path / "out", {"img_a": (A, image, 0.25),
                                                      "img_e": (empty, image, 0.25)})
    out = tmp_path / "out"
    for name in ("detections.csv", "detections.geojson", "counts.csv", "overlays/img_a.jpg",
                 "overlays/img_e.jpg", "geojson/img_a.geojson", "geojson/img_e.geojson"):
        assert (out / name).is_file(), name
    assert not _no_tmp(out)
    assert list(counts.accepted) == [1, 0] and list(counts.candidates) == [2, 0]
    back = pd.read_csv(out / "counts.csv")
    assert list(back.columns) == outputs.COUNT_COLUMNS
    assert back.area_mm2[0] == pytest.approx(120 * 100 * 0.0625 / 1e6, abs=1e-6)
    assert len(pd.read_csv(out / "detections.csv")) == 2
    assert json.loads((out / "geojson/img_e.geojson").read_text())["features"] == []


@dataclasses.dataclass(frozen=True)
class _Settings:
    mpp: float = 0.25


class _FakeCascade:
    """Duck-typed cascade: one accepted box on every image."""

    settings = _Settings()
    det_threshold, cls_threshold, nms_iou, patch = 0.05, 0.5, 0.5, 112
    det_mpp, cls_mpp = 0.4912, 0.2456

    def run(self, image):
        return _frame([(1, 2, 11, 12, 0.9, 0.8, True)])


def test_detect_to_dir(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    for name in ("b", "a"):
        cv2.imwrite(str(src / f"{name}.png"), np.full((40, 60, 3), 90, np.uint8))
    out = tmp_path / "out"
    counts = outputs.detect_to_dir(_FakeCascade(), [src], out, progress=False)
    assert list(counts.image) == ["a", "b"]
    assert (out / "overlays" / "a.jpg").is_file() and (out / "counts.csv").is_file()
    summary = json.loads((out / "detect.json").read_text())
    assert summary["totals"] == {"images": 2, "candidates": 2, "accepted": 2}
    assert summary["resolved"]["cls_threshold"] == 0.5
    assert (summary["resolved"]["det_mpp"], summary["resolved"]["cls_mpp"]) == (0.4912, 0.2456)
    assert not _no_tmp(out)
    with pytest.raises(InputError, match="not empty"):
        outputs.detect_to_dir(_FakeCascade(), [src], out, progress=False)
    outputs.detect_to_dir(_FakeCascade(), [src / "a.png"], out, overlays=False, progress=False,
                          overwrite=True)
    assert not (out / "overlays").exists()
    assert list(pd.read_csv(out / "detections.csv").image) == ["a"]
    (src / "c.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty image"):
        outputs.detect_to_dir(_FakeCascade(), [src], tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out2")]


class _CappedCascade(_FakeCascade):
    """As _FakeCascade, with real settings and the cap of the last image: it binds on the
    wider image only."""

    def __init__(self):
        from focas_keras.inference.cascade import CascadeSettings

        self.settings = CascadeSettings(mpp=0.25, max_candidates_per_mm2=1500.0, tta=True)
        self.stage1_info = None

    def run(self, image):
        bound = image.shape[1] > 50
        self.stage1_info = {"candidates": 1, "cap": 1 if bound else 2, "cap_bound": bound,
                                 "calls": 1, "calls_at_cap": int(bound)}
        return super().run(image)


def test_detect_json_records_the_cap_and_where_it_bound(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    cv2.imwrite(str(src / "wide.png"), np.full((40, 60, 3), 90, np.uint8))
    cv2.imwrite(str(src / "narrow.png"), np.full((40, 30, 3), 90, np.uint8))
    outputs.detect_to_dir(_CappedCascade(), [src], tmp_path / "out", progress=False)
    summary = json.loads((tmp_path / "out" / "detect.json").read_text())
    assert summary["settings"]["max_candidates_per_mm2"] == 1500.0
    assert summary["settings"]["tta"] is True
    assert summary["stage1_cap"] == {
        "max_candidates_per_mm2": 1500.0, "cap_bound_images": ["wide"],
        "images": {"narrow": {"candidates": 1, "cap": 2, "cap_bound": False, "calls": 1,
                              "calls_at_cap": 0},
                   "wide": {"candidates": 1, "cap": 1, "cap_bound": True, "calls": 1,
                            "calls_at_cap": 1}}}


def test_detect_cli_passes_the_cap_and_tta_into_the_settings(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from focas_keras.cli import main
    from focas_keras.inference.cascade import Cascade

    seen = []
    monkeypatch.setattr(Cascade, "from_runs", staticmethod(
        lambda det, cls, settings, which="best": seen.append(settings) or _CappedCascade()))
    src = tmp_path / "a.png"
    cv2.imwrite(str(src), np.full((40, 60, 3), 90, np.uint8))
    base = ["detect", str(src), "--det", "D", "--cls", "C", "--no-overlays"]
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "o1")])
    assert result.exit_code == 0, result.output
    assert (seen[0].max_candidates_per_mm2, seen[0].tta) == (2000.0, False)
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "o2"), "--tta",
                                              "--max-candidates-per-mm2", "750"])
    assert result.exit_code == 0, result.output
    assert (seen[1].max_candidates_per_mm2, seen[1].tta) == (750.0, True)
    result = CliRunner().invoke(main, base + ["--out", str(tmp_path / "o3"),
                                              "--max-candidates-per-mm2", "0"])
    assert result.exit_code == 2 and "max candidates per mm^2 must be > 0" in result.output
    help_text = CliRunner().invoke(main, ["detect", "--help"]).output
    assert "--max-candidates-per-mm2" in help_text and "--tta / --no-tta" in help_text


def test_detect_to_dir_warns_once_about_grayscale_and_records_them(tmp_path):
    src = tmp_path / "images"
    src.mkdir()
    colour = np.zeros((40, 60, 3), np.uint8)
    colour[..., 2] = 200  # blue-ish in BGR: not grayscale
    cv2.imwrite(str(src / "a.png"), colour)
    cv2.imwrite(str(src / "b.png"), np.full((40, 60), 90, np.uint8))
    cv2.imwrite(str(src / "c.jpg"), np.full((40, 60), 70, np.uint8))
    messages = []
    counts = outputs.detect_to_dir(_FakeCascade(), [src], tmp_path / "out", progress=False,
                                   warn=messages.append)
    assert list(counts.image) == ["a", "b", "c"]  # still run
    assert messages == [f"{src / 'b.png'} is grayscale; the models expect H&E colour, "
                        "results may be poor"]
    summary = json.loads((tmp_path / "out" / "detect.json").read_text())
    assert summary["grayscale_images"] == [str(src / "b.png"), str(src / "c.jpg")]
