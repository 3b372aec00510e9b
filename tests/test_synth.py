"""Synthetic H&E generator: labels on dark pixels, layout, determinism, atomic writes, speed."""

import json
import time

import cv2
import numpy as np
import pytest

from focas_keras.datasets import synth
from focas_keras.datasets.annotations import HARD_NEGATIVE, MITOSIS
from focas_keras.datasets.readers import read_dataset
from focas_keras.datasets.readers.icpr2012 import parse_icpr_csv
from focas_keras.datasets.synth import NEGATIVE_KINDS, PHASES, synthesize_image, write_dataset
from focas_keras.errors import InputError

SIZE = 512


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """(directory, summary) of a 6-image, 512 px dataset over 2 slides."""
    out = tmp_path_factory.mktemp("synth") / "data"
    return out, write_dataset(out, images=6, size=SIZE, seed=3, per_slide=3)


@pytest.fixture(scope="module")
def dense():
    """A crowded 1024 px field: enough mitoses and look-alikes to see every kind."""
    return synthesize_image(1024, seed=5, image_id="dense", density=4.0, mimics=1.0)


def _rgb(path):
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _hematoxylin(image, stain):
    """Per-pixel hematoxylin OD by colour deconvolution with the image's own stain vectors."""
    od = -np.log(np.clip(image.astype(np.float64), 1, None) / np.asarray(stain["background"]))
    stains = np.stack([np.asarray(stain["h_vector"]) * stain["h_scale"],
                       np.asarray(stain["e_vector"]) * stain["e_scale"]], 1)
    return (od.reshape(-1, 3) @ np.linalg.pinv(stains).T)[:, 0].reshape(image.shape[:2])


def _values(image_map, pixels):
    return image_map[pixels[:, 1], pixels[:, 0]]


def _extent(pixels):
    return max(np.ptp(pixels[:, 0]), np.ptp(pixels[:, 1])) + 1


def _files(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


# ---------------------------------------------------------------- written layout


def test_layout_and_summary(dataset):
    out, summary = dataset
    names = sorted(p.name for p in out.iterdir())
    stems = [f"S{s:02d}_{k:02d}" for s in range(2) for k in range(3)]
    assert names == sorted([f"{s}.png" for s in stems] + [f"{s}.csv" for s in stems]
                           + ["hard_negatives.csv", "synth.json"])
    assert json.loads((out / "synth.json").read_text()) == summary
    assert summary["generator"] == "focas_keras synth" and summary["mpp"] == 0.2456
    assert [item["image"] for item in summary["per_image"]] == stems
    for item in summary["per_image"]:
        assert _rgb(out / f"{item['image']}.png").shape == (SIZE, SIZE, 3)
        assert sum(item["phases"].values()) == item["mitoses"] >= 1  # >= 1 from 512 px up
        assert set(item["stain"]) >= {"h_vector", "e_vector", "h_scale", "e_scale"}
    stains = [json.dumps(item["stain"]) for item in summary["per_image"]]
    assert len(set(stains)) == len(stains)


def test_csv_lines_are_pixel_lists_inside_the_image(dataset):
    out, summary = dataset
    for item in summary["per_image"]:
        text = (out / f"{item['image']}.csv").read_text()
        assert "\r" not in text and " " not in text
        lines = text.splitlines()
        assert len(lines) == item["mitoses"]
        for line in lines:
            values = [int(v) for v in line.split(",")]  # ints only
            assert len(values) % 2 == 0 and len(values) >= 2 * 50
            pixels = np.asarray(values).reshape(-1, 2)
            assert pixels.min() >= 0 and pixels.max() < SIZE
            assert len(np.unique(pixels, axis=0)) == len(pixels)
            assert 20 <= _extent(pixels) <= 80


def test_hard_negative_table(dataset):
    out, summary = dataset
    lines = (out / "hard_negatives.csv").read_text().splitlines()
    assert lines[0] == "image,x,y,x1,y1,x2,y2,kind"
    assert len(lines) - 1 == sum(item["hard_negatives"] for item in summary["per_image"])
    for line in lines[1:]:
        image, *coords, kind = line.split(",")
        x, y, x1, y1, x2, y2 = map(float, coords)
        assert kind in NEGATIVE_KINDS and image.startswith("S0")
        assert 0 <= x1 < x < x2 <= SIZE and 0 <= y1 < y < y2 <= SIZE


def test_reader_round_trip(dataset):
    out, summary = dataset
    aset = read_dataset("synth", out)
    counts = aset.annotations.label.value_counts()
    assert counts.get(MITOSIS, 0) == sum(item["mitoses"] for item in summary["per_image"])
    assert counts.get(HARD_NEGATIVE, 0) == sum(
        item["hard_negatives"] for item in summary["per_image"])
    assert sorted(aset.images.slide_id.unique()) == ["S00", "S01"]


# ---------------------------------------------------------------- labels on the image


def test_mitosis_pixels_are_hematoxylin_dark(dataset):
    out, summary = dataset
    for item in summary["per_image"]:
        image = _rgb(out / f"{item['image']}.png")
        hema = _hematoxylin(image, item["stain"])
        grey = image.astype(np.float64) @ (0.299, 0.587, 0.114)
        background_grey, background_h = np.median(grey), np.median(hema)
        for _, obj in parse_icpr_csv(out / f"{item['image']}.csv"):
            h_values = _values(hema, obj["pixels"])
            assert h_values.min() > 0.8, item["image"]  # every pixel, not just most
            assert h_values.mean() > max(1.4, 3 * background_h)
            assert _values(grey, obj["pixels"]).mean() < 0.7 * background_grey


def test_mitoses_darker_than_interphase_nuclei(dense):
    hema = _hematoxylin(dense.image, dense.stain)
    labelled = np.zeros(hema.shape, bool)
    for obj in dense.mitoses + dense.hard_negatives:
        x1, y1, x2, y2 = (int(obj[k]) for k in ("x1", "y1", "x2", "y2"))
        labelled[max(y1 - 8, 0):y2 + 8, max(x1 - 8, 0):x2 + 8] = True
    nuclear = (hema > 0.3) & ~labelled  # interphase and stromal nuclei
    assert nuclear.mean() > 0.1  # a crowded field
    for mitosis in dense.mitoses:
        assert _values(hema, mitosis["pixels"]).mean() > 1.5 * hema[nuclear].mean()


def test_all_phases_and_all_negative_kinds(dense):
    assert {m["phase"] for m in dense.mitoses} == set(PHASES)
    assert {n["kind"] for n in dense.hard_negatives} == set(NEGATIVE_KINDS)
    for mitosis in dense.mitoses:
        assert synth._MIN_EXTENT <= _extent(mitosis["pixels"]) <= synth._MAX_EXTENT
        assert mitosis["pixels"].dtype == np.int32 and mitosis["pixels"].shape[1] == 2


def test_hard_negatives_are_dark(dense):
    hema = _hematoxylin(dense.image, dense.stain)
    for neg in dense.hard_negatives:
        values = _values(hema, neg["pixels"])
        assert values.mean() > 1.0, neg["kind"]
        x1, y1, x2, y2 = (neg[k] for k in ("x1", "y1", "x2", "y2"))
        assert (x1, y1, x2, y2) == (neg["pixels"][:, 0].min(), neg["pixels"][:, 1].min(),
                                    neg["pixels"][:, 0].max() + 1, neg["pixels"][:, 1].max() + 1)


def test_objects_inside_and_disjoint(dense):
    h, w = dense.image.shape[:2]
    owner = np.zeros((h, w), np.int32)
    objects = dense.mitoses + dense.hard_negatives
    for number, obj in enumerate(objects, start=1):
        px = obj["pixels"]
        assert px[:, 0].min() >= 4 and px[:, 1].min() >= 4
        assert px[:, 0].max() < w - 4 and px[:, 1].max() < h - 4
        assert not owner[px[:, 1], px[:, 0]].any()
        owner[px[:, 1], px[:, 0]] = number
    # Mitoses keep clear of every other object (no touching boxes).
    for i, m in enumerate(dense.mitoses):
        for other in objects[:i] + objects[i + 1:]:
            assert (m["x2"] <= other["x1"] or other["x2"] <= m["x1"]
                    or m["y2"] <= other["y1"] or other["y2"] <= m["y1"])


def test_counts_scale_with_area():
    small = synthesize_image(256, seed=1)
    assert small.image.shape == (256, 256, 3) and small.image.dtype == np.uint8
    assert len(small.mitoses) <= 3 and len(small.hard_negatives) <= 6
    wide = synthesize_image((200, 300), seed=1)
    assert wide.image.shape == (200, 300, 3)


# ---------------------------------------------------------------- determinism and writing


def test_same_seed_same_bytes_and_other_seed_differs(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    write_dataset(again, images=6, size=SIZE, seed=3, per_slide=3)
    assert _files(again) == _files(out)
    other = tmp_path / "other"
    write_dataset(other, images=2, size=SIZE, seed=4, per_slide=3)
    for name in ("S00_00.png", "S00_01.png", "S00_00.csv"):
        assert (other / name).read_bytes() != (out / name).read_bytes()
    first = synthesize_image(300, seed=9)
    assert np.array_equal(first.image, synthesize_image(300, seed=9).image)


def test_refuses_existing_output_and_overwrites_atomically(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(InputError, match=r"exists and is not empty \(use --overwrite\)"):
        write_dataset(out, images=1, size=128, seed=0)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    write_dataset(out, images=2, size=128, seed=0, overwrite=True)
    assert not (out / "old.txt").exists() and (out / "S00_01.png").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp or old dir left


def test_empty_existing_directory_is_fine(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    write_dataset(out, images=1, size=128, seed=0, progress=True)
    assert (out / "synth.json").is_file()


def test_failure_leaves_no_temp_and_keeps_old_output(tmp_path, monkeypatch):
    out = tmp_path / "data"
    write_dataset(out, images=1, size=128, seed=0)
    before = _files(out)
    monkeypatch.setattr(synth, "synthesize_image", _failing_on_second(synth.synthesize_image))
    with pytest.raises(RuntimeError, match="boom"):
        write_dataset(out, images=3, size=128, seed=1, overwrite=True)
    assert _files(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def _failing_on_second(function):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return function(*args, **kwargs)

    return wrapper


@pytest.mark.parametrize("kwargs, message", [
    ({"images": 0}, "images must be >= 1"),
    ({"size": 100}, "size must be >= 128"),
    ({"per_slide": 0}, "per_slide must be >= 1"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"size": 256.5}, "size must be an integer"),
])
def test_bad_arguments(tmp_path, kwargs, message):
    args = {"images": 1, "size": 128, "seed": 0, **kwargs}
    with pytest.raises(InputError, match=message):
        write_dataset(tmp_path / "out", **args)
    assert not (tmp_path / "out").exists()


def test_output_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        write_dataset(target, images=1, size=128, seed=0, overwrite=True)


def test_full_size_field_is_fast():
    synthesize_image(256, seed=0)  # warm-up (imports, allocator)
    start = time.perf_counter()
    field = synthesize_image(2084, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{elapsed:.2f} s for a 2084 x 2084 field"
    assert 1 <= len(field.mitoses) <= 25 and 3 <= len(field.hard_negatives) <= 45


def test_mimics_are_opt_in_and_look_like_metaphase_plates():
    plain = synthesize_image(512, seed=3)
    assert np.array_equal(synthesize_image(512, seed=3, mimics=0.0).image, plain.image)
    mimicked = synthesize_image(1024, seed=3, mimics=3.0)
    hyper = [n for n in mimicked.hard_negatives if n["kind"] == "hyperchromatic"]
    assert len(hyper) >= 3
    assert not any(n["kind"] == "hyperchromatic" for n in plain.hard_negatives)
    hema = _hematoxylin(mimicked.image, mimicked.stain)
    for obj in hyper:  # as dark as mitotic chromatin and within its size range
        assert _values(hema, obj["pixels"]).mean() > 1.2
        assert 20 <= _extent(obj["pixels"]) <= synth._MAX_EXTENT
    with pytest.raises(InputError, match="mimics"):
        synthesize_image(256, seed=0, mimics=-1)
