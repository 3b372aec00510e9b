"""TF Serving export: signatures, equality with the Python cascade, versions, bad requests,
and the predict clients against in-process servers backed by the exported SavedModel.

One export (tiny random-weight models, 64 px tiles, a 150 x 130 sample) is shared by the
whole module: exporting costs tens of seconds on 2 cores.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import base64  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras.cli import main  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.export import compare, graph, savedmodel  # noqa: E402
from focas_keras.inference.cascade import Cascade, CascadeSettings, crop_patches  # noqa: E402
from focas_keras.inference.outputs import write_outputs  # noqa: E402
from focas_keras.models.mclass import build_mclass  # noqa: E402
from focas_keras.models.mclass_config import preset as mclass_preset  # noqa: E402
from focas_keras.models.mdet import build_mdet  # noqa: E402
from focas_keras.models.mdet_config import preset as mdet_preset  # noqa: E402

TILE, OVERLAP, TILE_BATCH = 64, 16, 3  # 150 x 130 -> 3 x 3 tiles; 100 x 160 -> 2 x 3
# Per-area caps that leave D (MAX_DETECTIONS) in charge on these small images: a 64 px tile
# at 0.2456 um/px keeps ceil(1e6 x 2.47e-4) = 248 (the default 2000 per mm^2 would keep 1).
PER_MM2 = 1e6
SETTINGS = dict(tile=TILE, overlap=OVERLAP, tile_batch=TILE_BATCH, det_threshold=0.3,
                cls_threshold=0.5, merge_px=30.0, max_candidates_per_mm2=PER_MM2)
MAX_DETECTIONS, MAX_PIXELS = 60, 100_000
EXPORT_ARGS = ["--tile", str(TILE), "--overlap", str(OVERLAP), "--tile-batch", str(TILE_BATCH),
               "--det-threshold", "0.3", "--cls-threshold", "0.5",
               "--max-detections", str(MAX_DETECTIONS), "--max-pixels", str(MAX_PIXELS),
               "--max-candidates-per-mm2", str(PER_MM2)]


def _image(height, width, seed):
    """A noisy pink field with dark blobs (gives a spread of stage-1 scores)."""
    rng = np.random.default_rng(seed)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = (225, 160, 195)
    image += rng.integers(0, 30, image.shape, dtype=np.uint8)
    for _ in range(8):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(6, 16)
        cv2.circle(image, (int(x), int(y)), int(r), (60, 30, 100), -1)
    return image


def _png(image):
    return cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))[1].tobytes()


def _models(sample):
    """Random-weight tiny models whose scores spread: sharper stage-1 logits, and Mclass
    logits centred on crops of ``sample`` (so about half the candidates are accepted)."""
    keras.utils.set_random_seed(0)
    det_config, cls_config = mdet_preset("tiny"), mclass_preset("tiny")
    det, cls = build_mdet(det_config), build_mclass(cls_config)
    head = det.get_layer("head")
    for conv in (head.anchor_cls_conv, head.free_cls_conv):
        conv.kernel.assign(conv.kernel * 30.0)
        conv.bias.assign(conv.bias + 2.5)
    for conv in head.cls_tower:
        conv.kernel.assign(conv.kernel * 3.0)
    logit = cls.get_layer("logit")
    logit.kernel.assign(logit.kernel * 30.0)
    rng = np.random.default_rng(0)
    centres = np.stack([rng.uniform(0, sample.shape[1], 32),
                        rng.uniform(0, sample.shape[0], 32)], 1)
    patches = crop_patches(sample, centres, cls_config.crop_size)
    logits = cls(tf.image.resize(tf.cast(patches, tf.float32) / 255.0, (64, 64), "area")).numpy()
    logit.bias.assign(logit.bias - float(np.median(logits)))
    return det, det_config, cls, cls_config


_FRESH_PROCESS = """
import json, sys, tensorflow as tf
base, png = sys.argv[1], open(sys.argv[2], "rb").read()
cascade = tf.saved_model.load(base + "/focasnet/1")
assert set(cascade.signatures) == {"serving_default", "serving_bytes"}
mdet = tf.saved_model.load(base + "/mdet/1")
out = mdet.signatures["serving_bytes"](image_bytes=tf.constant([png]))
assert not [k for k in sys.modules if k.startswith(("focas_keras", "data_tools"))]
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One export of tiny models through the library (the CLI's plumbing is tested with
    stand-in modules below), the Python cascade it was checked against, and a fresh Python
    process (started here, to overlap) that loads the export without this package."""
    root = tmp_path_factory.mktemp("export")
    sample, other = _image(150, 130, 1), _image(100, 160, 2)
    det, det_config, cls, cls_config = _models(sample)
    cascade = Cascade(det, det_config, cls, cls_config, CascadeSettings(**SETTINGS), 0.5)
    base = root / "base"
    lines, reloaded, real_load = [], {}, tf.saved_model.load

    def recording_load(path, *args, **kwargs):  # keeps what the self-check reloads
        reloaded[Path(path).name] = real_load(path, *args, **kwargs)
        return reloaded[Path(path).name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.saved_model, "load", recording_load)
        result = savedmodel.export(cascade, base, sample=sample, max_detections=MAX_DETECTIONS,
                                   max_pixels=MAX_PIXELS, log=lines.append)
    assert sorted(reloaded) == ["focasnet", "mclass", "mdet"]
    assert result["version"] == 1 and result["check"]["candidates"] > 5
    assert any("as the Python cascade" in line for line in lines)
    (root / "other.png").write_bytes(_png(other))
    fresh = subprocess.Popen(
        [sys.executable, "-c", _FRESH_PROCESS, str(base), str(root / "other.png")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    yield {"base": base, "sample": sample, "other": other, "cascade": cascade,
           "root": root, "references": {}, "fresh": fresh, "reloaded": reloaded}
    if fresh.poll() is None:
        fresh.kill()
        fresh.communicate()


@pytest.fixture(scope="module")
def loaded(exported):
    """The cascade SavedModel as ``tf.saved_model.load`` returned it to the export's own check
    (loaded and run once already: loading again costs seconds on 2 cores)."""
    return exported["reloaded"]["focasnet"]


@pytest.fixture(scope="module")
def cascade_layer(exported, loaded):
    """A ``keras.layers.TFSMLayer`` over the same reloaded object."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.saved_model, "load", lambda path, *args, **kwargs: loaded)
        return keras.layers.TFSMLayer(str(exported["base"] / "focasnet" / "1"),
                                      call_endpoint="serving_default")


def _settings(exported):
    return graph.GraphSettings.from_cascade(exported["cascade"], MAX_DETECTIONS, MAX_PIXELS)


def _reference(exported, which):
    """The Python cascade's table (capped at D) for "sample" or "other", computed once."""
    if which not in exported["references"]:
        exported["references"][which] = savedmodel.reference_table(
            exported["cascade"], exported[which], MAX_DETECTIONS)
    return exported["references"][which]


# --------------------------------------------------------------------------- layout


def test_layout_config_and_signatures(exported):
    base = exported["base"]
    assert savedmodel.exported_models(base) == {"focasnet": [1], "mclass": [1], "mdet": [1]}
    assert sorted(p.name for p in base.iterdir()) == ["focasnet", "mclass", "mdet",
                                                      "models.config"]
    config = (base / "models.config").read_text()
    for name in ("focasnet", "mdet", "mclass"):
        assert f'name: "{name}"' in config and f'base_path: "/models/{name}"' in config
    assert config.count("config {") == 3 and 'model_platform: "tensorflow"' in config
    text = savedmodel.describe(base / "focasnet" / "1")
    assert "signature_def['serving_default']" in text and "signature_def['serving_bytes']" in text
    assert "inputs['images']: dtype DT_UINT8 shape unknown_rank" in text
    assert "inputs['image_bytes']: dtype DT_STRING" in text
    assert f"outputs['detection_boxes']: dtype DT_FLOAT shape (-1, {MAX_DETECTIONS}, 4)" in text
    assert "outputs['detection_classes']: dtype DT_INT32" in text
    assert "outputs['num_detections']: dtype DT_INT32 shape (-1,)" in text
    assert "inputs['patches']" in savedmodel.describe(base / "mclass" / "1")


def test_loaded_signatures_and_outputs(exported, loaded):
    sig = loaded.signatures["serving_default"]
    assert set(loaded.signatures) == {"serving_default", "serving_bytes"}
    spec = sig.structured_input_signature[1]
    assert spec["images"].dtype == tf.uint8 and spec["images"].shape.rank is None
    outputs = sig.structured_outputs
    assert set(outputs) == set(graph.CASCADE_OUTPUTS)
    assert outputs["detection_boxes"].shape.as_list() == [None, MAX_DETECTIONS, 4]
    assert outputs["detection_classes"].dtype == tf.int32
    assert loaded.signatures["serving_bytes"].structured_input_signature[1][
        "image_bytes"].dtype == tf.string


def test_equals_python_cascade_both_signatures(exported, loaded):
    sample, other = exported["sample"], exported["other"]
    want = [_reference(exported, "sample"), _reference(exported, "other")]
    assert len(want[0]) > 5 and want[0]["accepted"].any() and (~want[0]["accepted"]).any()
    out = loaded.signatures["serving_default"](images=tf.constant(sample[None]))
    got = savedmodel.outputs_to_tables(out)[0]
    compare.compare_tables(got, want[0], "pixels", _settings(exported))
    # Model Garden box order [ymin, xmin, ymax, xmax], input pixels; padding rows are zeros.
    n = int(out["num_detections"][0])
    boxes = out["detection_boxes"][0].numpy()
    np.testing.assert_allclose(boxes[:n], want[0][["y1", "x1", "y2", "x2"]].to_numpy(),
                               atol=1e-3)
    assert not boxes[n:].any() and not out["detection_classes"][0, n:].numpy().any()
    assert set(out["detection_classes"][0, :n].numpy()) <= {0, 1}
    # Bytes: a batch of images of different sizes; a JPEG is decoded by TF's own decoder
    # (not OpenCV's), so only its answer's form is checked.
    jpeg = cv2.imencode(".jpg", cv2.cvtColor(other, cv2.COLOR_RGB2BGR))[1].tobytes()
    out = loaded.signatures["serving_bytes"](
        image_bytes=tf.constant([_png(sample), _png(other), jpeg]))
    tables = savedmodel.outputs_to_tables(out)
    for got, table, what in zip(tables, want, ("sample", "other")):
        assert compare.compare_tables(got, table, what, _settings(exported)) == 0
    assert len(tables) == 3 and 0 < len(tables[2]) <= MAX_DETECTIONS


def test_compare_tables_catches_differences_and_lets_near_ties_through(exported):
    settings = _settings(exported)
    want = _reference(exported, "sample")
    assert compare.compare_tables(want.copy(), want, "same", settings) == 0
    moved = want.copy()
    moved.loc[0, ["x1", "x2"]] += 60.0
    with pytest.raises(compare.ExportError, match="is missing"):
        compare.compare_tables(moved, want, "moved", settings)
    scored = want.copy()
    scored.loc[3, "cls_score"] += 0.01
    with pytest.raises(compare.ExportError, match="has cls_score"):
        compare.compare_tables(scored, want, "scored", settings)
    sure = int(np.argmin(want["cls_score"]))  # far below the stage-2 threshold
    flipped = want.copy()
    flipped.loc[sure, "accepted"] = True
    with pytest.raises(compare.ExportError, match="is accepted, but its stage-2 score"):
        compare.compare_tables(flipped, want, "flipped", settings)
    alone = want[want["accepted"]].iloc[:1]  # accepted, with no neighbour to merge with
    rejected = alone.assign(accepted=False)
    with pytest.raises(compare.ExportError, match="is rejected, the Python cascade accepts it"):
        compare.compare_tables(rejected, alone, "merged away", settings)
    with pytest.raises(compare.ExportError, match="is missing"):
        compare.compare_tables(want.iloc[1:], want, "short", settings)
    # Near-ties: two rows of almost equal stage-1 score swapped, a candidate at the stage-1
    # threshold missing, an acceptance flipped at the stage-2 threshold.
    tied = want.copy()
    tied.loc[1, "det_score"] = tied.loc[2, "det_score"] + 1e-6
    swapped = tied.iloc[[0, 2, 1] + list(range(3, len(tied)))].reset_index(drop=True)
    assert compare.compare_tables(swapped, tied, "swapped", settings) == 1
    low = want.copy()
    low.loc[len(low) - 1, "det_score"] = settings.det_threshold + 1e-5
    assert compare.compare_tables(low.iloc[:-1], low, "at the threshold", settings) == 1
    edge = want.copy()
    edge.loc[sure, "cls_score"] = settings.cls_threshold + 1e-5
    flipped = edge.copy()
    flipped.loc[sure, "accepted"] = not flipped.loc[sure, "accepted"]
    assert compare.compare_tables(flipped, edge, "at the threshold", settings) == 1


def test_tfsm_layer_serves_the_cascade_and_mclass(exported, cascade_layer):
    out = cascade_layer(tf.constant(exported["other"][None]))
    assert set(out) == set(graph.CASCADE_OUTPUTS)
    compare.compare_tables(savedmodel.outputs_to_tables(out)[0],
                           _reference(exported, "other"), "TFSMLayer", _settings(exported))
    # Mclass alone: uint8 patches of any size -> probabilities, as the Python stage 2.
    # (Mdet alone is compared with Cascade.stage1 by the export's own check.)
    layer = keras.layers.TFSMLayer(str(exported["base"] / "mclass" / "1"),
                                   call_endpoint="serving_default")
    patches = crop_patches(exported["sample"], [[10, 10], [60, 70], [129, 149]], 112)
    got = layer(tf.constant(patches))["probabilities"].numpy()
    # The served graph fuses Mclass differently from eager Keras: on some machines the last
    # digits differ by ~3e-5, so this uses the export's own self-check tolerance.
    np.testing.assert_allclose(got, exported["cascade"].classify_patches(patches),
                               atol=compare.SCORE_TOLERANCE)
    assert layer(tf.zeros([0, 112, 112, 3], tf.uint8))["probabilities"].shape == (0,)


def test_loads_in_a_fresh_process_without_focas_keras(exported):
    """The SavedModels need none of this package's custom layers (WSConv2D, CBAM, FPN,
    HybridHead) at load time: a fresh process loads the cascade and runs Mdet alone."""
    stdout, stderr = exported["fresh"].communicate(timeout=600)
    assert exported["fresh"].returncode == 0, stderr[-2000:]
    out = json.loads(stdout.strip().splitlines()[-1])
    boxes, scores = exported["cascade"].stage1(exported["other"])
    n = out["num_detections"][0]
    assert n == min(len(boxes), MAX_DETECTIONS) > 0
    np.testing.assert_allclose(np.array(out["detection_boxes"][0][:n])[:, [1, 0, 3, 2]],
                               boxes[:n], atol=1e-3)
    np.testing.assert_allclose(out["detection_scores"][0][:n], scores[:n], atol=1e-5)


# --------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("images, message", [
    (np.zeros((120, 100, 3), np.uint8), "must be uint8 \\[batch, height, width, 3\\]"),
    (np.zeros((1, 20, 20, 4), np.uint8), "must have 3 channels"),
    (np.zeros((1, 0, 20, 3), np.uint8), "height and width must be > 0"),
    (np.zeros((1, 400, 300, 3), np.uint8), f"image too large.*<= {MAX_PIXELS} pixels"),
])
def test_bad_pixel_requests_are_invalid_argument(loaded, images, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["serving_default"](images=tf.constant(images))


def test_wrong_dtype_is_refused_by_the_signature(loaded):
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)) as info:
        loaded.signatures["serving_default"](images=tf.zeros([1, 20, 20, 3], tf.float32))
    assert "uint8" in str(info.value)


@pytest.mark.parametrize("payload, message", [
    ([b"GIF89a not an image at all"], "not a JPEG or PNG image"),
    ([b""], "not a JPEG or PNG image"),
    (b"\x89PNG", "must be a string tensor \\[batch\\]"),
    ([_png(np.zeros((400, 300, 3), np.uint8))], "image too large"),
    ([_png(np.zeros((20, 20, 3), np.uint8))[:60]], "Invalid PNG data"),  # truncated
])
def test_bad_byte_requests_are_invalid_argument(loaded, payload, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["serving_bytes"](image_bytes=tf.constant(payload))


def test_empty_batch_is_an_empty_answer(loaded):
    out = loaded.signatures["serving_default"](images=tf.zeros([0, 30, 30, 3], tf.uint8))
    assert out["detection_boxes"].shape == (0, MAX_DETECTIONS, 4)
    assert out["num_detections"].shape == (0,)


# --------------------------------------------------------------------------- versions, CLI


def _tree(base):
    return sorted(str(p.relative_to(base)) for p in Path(base).rglob("*"))


def test_cli_export_versions_and_failed_check(exported, tmp_path, monkeypatch):
    """The CLI's plumbing, with the fixture's models standing in for the runs and trivial
    modules for the (slow) graphs."""
    calls = []

    def from_runs(det_run, cls_run, settings, which="best"):
        calls.append((det_run, cls_run, which))
        c = exported["cascade"]
        return Cascade(c.det_model, c.det_config, c.cls_model, c.cls_config, settings, 0.5)

    monkeypatch.setattr(Cascade, "from_runs", staticmethod(from_runs))
    before = _tree(exported["base"])
    args = ["export", "--det", "RUN_D", "--cls", "RUN_C", "--which", "model"] + EXPORT_ARGS
    result = CliRunner().invoke(main, args + ["--out", str(exported["base"]), "--version", "1"])
    assert result.exit_code == 2 and calls == [("RUN_D", "RUN_C", "model")]
    assert "version 1 exists" in result.output and "never overwritten" in result.output
    monkeypatch.setattr(savedmodel, "build_modules",
                        lambda cascade, settings, names: {n: _Tiny() for n in names.values()})
    monkeypatch.setattr(savedmodel, "verify", lambda *a, **k: {"candidates": 0, "accepted": 0})
    base = tmp_path / "base"
    result = CliRunner().invoke(main, args + ["--out", str(base), "--check"])
    assert result.exit_code == 0, result.output
    assert "exported version 1" in result.output
    assert (f"tile 64 overlap 16, stage-1 threshold 0.3, NMS IoU 0.5, patch 112, stage-2 "
            f"threshold 0.5, merge 30 px, at most {MAX_DETECTIONS} detections, images up to "
            f"{MAX_PIXELS} px, at most 1e+06 candidates per mm^2 (248 per tile of 0.2456 "
            "um/px)") in result.output
    assert "signature_def['serving_default']" in result.output
    # A self-check failure: exit 1, one line, nothing new under BASE (not even a temp dir).
    def fail(*args, **kwargs):
        raise compare.ExportError("focasnet: 3 detections, the Python cascade has 4")

    monkeypatch.setattr(savedmodel, "verify", fail)
    before_base = _tree(base)
    result = CliRunner().invoke(main, args + ["--out", str(base)])
    monkeypatch.setattr(savedmodel, "verify", lambda *a, **k: {"candidates": 0, "accepted": 0})
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("focas-keras: error: export failed its check, nothing was "
                                    "written: focasnet: 3 detections")
    assert _tree(base) == before_base and _tree(exported["base"]) == before
    result = CliRunner().invoke(main, args + ["--out", str(base), "--name", "other"])
    assert result.exit_code == 0 and "exported version 2" in result.output


class _Tiny(tf.Module):
    """A trivial stand-in for the graphs (saves in well under a second)."""

    def __init__(self):
        super().__init__()
        self.v = tf.Variable(1.0)

    def signatures(self):
        fn = tf.function(lambda x: {"y": x * self.v},
                         input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
        return {"serving_default": fn.get_concrete_function()}


def test_second_export_is_version_two(tmp_path, monkeypatch):
    """The version logic of export(), with trivial modules standing in for the graphs."""
    monkeypatch.setattr(savedmodel, "build_modules",
                        lambda cascade, settings, names: {n: _Tiny() for n in names.values()})
    monkeypatch.setattr(savedmodel, "verify", lambda *a, **k: {"candidates": 0, "accepted": 0})
    cascade = Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny"),
                      CascadeSettings(tile=64, overlap=16))
    sample = np.zeros((10, 10, 3), np.uint8)
    base = tmp_path / "base"
    assert savedmodel.export(cascade, base, sample=sample)["version"] == 1
    second = savedmodel.export(cascade, base, sample=sample, name="other")
    assert second["version"] == 2 and (base / "other" / "2" / "saved_model.pb").is_file()
    assert savedmodel.exported_models(base) == {"focasnet": [1], "mclass": [1, 2], "mdet": [1, 2],
                                                "other": [2]}
    assert (base / "models.config").read_text().count("config {") == 4
    assert savedmodel.export(cascade, base, sample=sample, version=7)["version"] == 7
    with pytest.raises(InputError, match="version 7 exists"):
        savedmodel.export(cascade, base, sample=sample, version=7)
    with pytest.raises(InputError, match="must differ"):
        savedmodel.export(cascade, base, sample=sample, name="mdet")
    with pytest.raises(InputError, match="tile"):
        savedmodel.export(Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny")),
                          base, sample=sample)
    assert not [p for p in base.iterdir() if p.name.startswith(".")]


def test_check_prints_signatures_of_an_existing_export(exported):
    result = CliRunner().invoke(main, ["export", "--out", str(exported["base"]), "--check"])
    assert result.exit_code == 0, result.output
    for needle in ("focasnet version 1:", "mdet version 1:", "mclass version 1:",
                   "signature_def['serving_bytes']", "inputs['patches']"):
        assert needle in result.output
    result = CliRunner().invoke(main, ["export", "--out", str(exported["base"]), "--det",
                                       str(exported["base"])])
    assert result.exit_code == 2 and "give both --det and --cls, or neither" in result.output


def test_help_of_export_and_predict():
    for command in ("export", "predict"):
        result = CliRunner().invoke(main, [command, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output


# --------------------------------------------------------------------------- graph pieces


@pytest.mark.parametrize("shape, centres, size", [
    ((80, 100), [[3, 5], [50, 40], [99, 79], [0, 0], [50.5, 39.5]], 112),
    ((80, 100), [[0, 0], [99, 79], [49, 2]], 21),
    ((7, 5), [[0, 0], [4, 6], [2, 3]], 40),   # pads larger than the image: repeated reflection
    ((1, 3), [[0, 0], [2, 0]], 9),            # a 1-px side repeats
])
def test_in_graph_crops_equal_crop_patches(shape, centres, size):
    image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    got = graph.crop_patches(tf.constant(image), tf.constant(centres, tf.float64), size)
    np.testing.assert_array_equal(got.numpy(), crop_patches(image, centres, size))


def test_in_graph_merge_equals_merge_points():
    from focas_keras.inference.cascade import merge_points

    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 100, (40, 2))
    scores = rng.uniform(0, 1, 40).astype(np.float32)
    scores[5] = scores[6]  # a tie: input order wins
    accepted = scores > 0.3
    got = graph.merge_points(tf.constant(centres), tf.constant(scores), tf.constant(accepted),
                             30.0)
    np.testing.assert_array_equal(got.numpy(), merge_points(centres, scores, accepted, 30.0))


def test_in_graph_tile_grid_equals_tile_starts():
    from focas_keras.inference.tiling import ownership as _ownership, tile_starts

    for length in (64, 65, 150, 320, 2084):
        starts, lo, hi = graph.tile_grid(tf.constant(length), 64, 16)
        assert starts.numpy().tolist() == tile_starts(length, 64, 16)
        assert list(zip(lo.numpy(), hi.numpy())) == _ownership(tile_starts(length, 64, 16), 64)


def test_export_settings_refuse_whole_image_and_rescaling():
    cascade = Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny"),
                      CascadeSettings(tile=0))
    with pytest.raises(InputError, match="tiles"):
        graph.GraphSettings.from_cascade(cascade)
    cascade = Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny"),
                      CascadeSettings(tile=64, overlap=16, mpp=0.25, model_mpp=0.5))
    with pytest.raises(InputError, match="at Mclass's pixel size and can only shrink"):
        graph.GraphSettings.from_cascade(cascade)
    cascade = Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny"),
                      CascadeSettings(tile=64, overlap=16, mpp=0.5, det_mpp=0.25))
    with pytest.raises(InputError, match="only shrink"):   # Mdet finer than the images
        graph.GraphSettings.from_cascade(cascade)
    cascade = Cascade(None, mdet_preset("tiny"), None, mclass_preset("tiny"),
                      CascadeSettings(tile=64, overlap=16, tta=True))
    assert graph.GraphSettings.from_cascade(cascade).tta  # TTA runs inside the graph


@pytest.mark.parametrize("shape", [(5, 48, 48, 3), (4, 40, 56, 3), (0, 48, 48, 3)])
def test_in_graph_tta_equals_predict_proba_tta(shape):
    """The 8 rotations/flips in the graph average Mclass's probabilities exactly as the Python
    cascade's predict_proba_tta (square and non-square crops, and none)."""
    from focas_keras.models.mclass import predict_proba, predict_proba_tta

    _, _, cls, cls_config = _models(_image(150, 130, 1))
    patches = np.random.default_rng(3).integers(0, 256, shape, dtype=np.uint8)
    size = cls_config.model.input_size
    got = graph.classify(cls, tf.constant(patches), size, tta=True).numpy()
    want = predict_proba_tta(cls, patches, size, 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    plain = graph.classify(cls, tf.constant(patches), size).numpy()
    np.testing.assert_allclose(plain, predict_proba(cls, patches, size), atol=1e-6)
    if shape[0]:
        assert np.abs(got - plain).max() > 1e-3  # TTA really changes the scores


@pytest.mark.parametrize("shape", [(150, 130), (50, 40)])  # tiles; one mirror-padded tile
def test_in_graph_stage1_keeps_the_per_area_caps_of_the_python_cascade(shape):
    """Stage 1 of the graph (traced, not saved) against Cascade.stage1 with caps that bind:
    20000 per mm^2 keeps ceil(4.94) = 5 per 64 px tile and 24 on a 150 x 130 image (3 on
    50 x 40, which both mirror to one tile)."""
    sample = _image(*shape, seed=5)
    det, det_config, cls, cls_config = _models(_image(150, 130, 1))
    cascade = Cascade(det, det_config, cls, cls_config,
                      CascadeSettings(**dict(SETTINGS, max_candidates_per_mm2=20000.0,
                                             det_threshold=0.05)), 0.5)
    settings = graph.GraphSettings.from_cascade(cascade, MAX_DETECTIONS, MAX_PIXELS)
    stage1 = graph.TiledStage1(det, det_config, settings)
    assert stage1.tile_cap == 5 == cascade.candidate_cap(TILE, TILE)
    boxes, scores = cascade.stage1(sample)
    info = cascade.stage1_info
    assert info["cap"] == {(150, 130): 24, (50, 40): 3}[shape] and info["cap_bound"]
    assert len(boxes) == info["candidates"] == info["cap"]
    got_boxes, got_scores = stage1.function(tf.constant(sample))
    assert len(got_boxes) == len(boxes)
    cut = savedmodel.image_cut(cascade, MAX_DETECTIONS)
    assert cut == info["cap"]
    assert compare.compare_tables(savedmodel._stage1_table(got_boxes.numpy(), got_scores.numpy()),
                                  savedmodel._stage1_table(boxes, scores), "capped", settings,
                                  cut) == 0


def test_export_with_stage1_at_half_resolution(tmp_path):
    """Mdet trained at twice the pixel size: the graph shrinks each image for stage 1 exactly
    as the Python cascade does, maps boxes back, and crops the full-resolution image."""
    sample, other = _image(260, 300, 3), _image(101, 157, 4)  # odd sides: rounding of sizes
    det, det_config, cls, cls_config = _models(sample)
    cascade = Cascade(det, det_config, cls, cls_config,
                      CascadeSettings(**SETTINGS, mpp=0.25, det_mpp=0.5), 0.5)
    settings = graph.GraphSettings.from_cascade(cascade, MAX_DETECTIONS, MAX_PIXELS)
    assert settings.det_scale == 0.5
    result = savedmodel.export(cascade, tmp_path / "base", sample=sample,
                               max_detections=MAX_DETECTIONS, max_pixels=MAX_PIXELS)
    assert result["check"]["candidates"] > 3          # the built-in check compared them all
    loaded = tf.saved_model.load(str(tmp_path / "base" / "focasnet" / "1"))
    for image in (sample, other):
        got = savedmodel.outputs_to_tables(loaded.signatures["serving_default"](
            images=tf.constant(image[None])))[0]
        want = savedmodel.reference_table(cascade, image, MAX_DETECTIONS)
        compare.compare_tables(got, want, "half", settings)
        assert len(got) == len(want)
    # The boxes are in input pixels and stage 1 really ran on the half-size image: a cascade
    # running Mdet at full resolution finds other candidates.
    assert float(want[["x2", "y2"]].max().max()) > 100
    full = Cascade(det, det_config, cls, cls_config, CascadeSettings(**SETTINGS, mpp=0.25), 0.5)
    assert not np.array_equal(full.stage1(other)[1], cascade.stage1(other)[1])


#: Two real ICPR 2012 fields for the bundled model's export (the first is its self-check
#: sample).
REAL_FIELDS = ("A02_01", "A04_07")


@pytest.fixture(scope="module")
def bundled_export(icpr_dir, tmp_path_factory):
    """The bundled cascade as ``export`` builds it (the card's thresholds and TTA, 512 px
    tiles), exported with the first real field as the self-check sample, and the reloaded
    cascade SavedModel."""
    from focas_keras.datasets.annotations import load_image
    from focas_keras import pretrained

    fields = {name: load_image(icpr_dir / "images" / f"{name}.jpg") for name in REAL_FIELDS}
    cascade = pretrained.load_cascade(tile=512)
    reloaded, real_load = {}, tf.saved_model.load

    def recording_load(path, *args, **kwargs):
        reloaded[Path(path).name] = real_load(path, *args, **kwargs)
        return reloaded[Path(path).name]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tf.saved_model, "load", recording_load)
        result = savedmodel.export(cascade, tmp_path_factory.mktemp("bundled") / "base",
                                   sample=fields[REAL_FIELDS[0]])
    return {"cascade": cascade, "fields": fields, "result": result,
            "loaded": reloaded["focasnet"]}


def test_bundled_export_applies_tta_and_accepts_what_detect_accepts(bundled_export):
    """On real fields the exported graph (TTA inside) accepts the same detections as the
    Python cascade that ``detect --tile 512`` runs: candidates matched by box within 0.01 px,
    scores within 1e-4, acceptances equal except at the near-ties compare_tables allows."""
    cascade, result = bundled_export["cascade"], bundled_export["result"]
    settings = result["settings"]
    assert cascade.settings.tta and settings.tta
    assert settings.det_threshold == cascade.det_threshold
    assert settings.cls_threshold == cascade.cls_threshold
    # The export's own check compared the first field as below (and would have failed).
    assert result["check"]["candidates"] > 50 and result["check"]["accepted"] > 0
    for name in REAL_FIELDS[1:]:
        image = bundled_export["fields"][name]
        out = bundled_export["loaded"].signatures["serving_default"](
            images=tf.constant(image[None]))
        got = savedmodel.outputs_to_tables(out)[0]
        want = savedmodel.reference_table(cascade, image, settings.max_detections)
        assert len(want) < settings.max_detections  # no cut by D on a field
        ties = compare.compare_tables(got, want, name, settings)
        assert abs(int(got.accepted.sum()) - int(want.accepted.sum())) <= ties
        assert len(want) > 50 and want.accepted.sum() > 0


# --------------------------------------------------------------------------- clients


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _assert_same_outputs(got_dir, want_dir):
    got, want = (pd.read_csv(Path(d) / "detections.csv") for d in (got_dir, want_dir))
    assert list(got.columns) == list(want.columns) and len(got) == len(want) > 0
    assert (got["image"] == want["image"]).all() and (got["accepted"] == want["accepted"]).all()
    coords = ["x", "y", "x1", "y1", "x2", "y2"]
    np.testing.assert_allclose(got[coords], want[coords], atol=0.011)
    np.testing.assert_allclose(got[["det_score", "cls_score"]], want[["det_score", "cls_score"]],
                               atol=2e-4)
    assert (Path(got_dir) / "counts.csv").read_text() == (Path(want_dir) / "counts.csv").read_text()
    got_geo, want_geo = (json.loads((Path(d) / "detections.geojson").read_text())
                         for d in (got_dir, want_dir))
    assert len(got_geo["features"]) == len(want_geo["features"])


@pytest.fixture(scope="module")
def images_and_detect(exported):
    """Two image files and what ``detect`` writes for them with the Python cascade (its
    tables capped at D candidates, as the export returns them)."""
    root = exported["root"]
    folder = root / "images"
    folder.mkdir()
    cv2.imwrite(str(folder / "a.png"), cv2.cvtColor(exported["sample"], cv2.COLOR_RGB2BGR))
    cv2.imwrite(str(folder / "b.bmp"), cv2.cvtColor(exported["other"], cv2.COLOR_RGB2BGR))
    mpp = exported["cascade"].settings.mpp
    write_outputs(root / "python_detect", {
        "a": (_reference(exported, "sample"), exported["sample"], mpp),
        "b": (_reference(exported, "other"), exported["other"], mpp)}, overlays=False)
    return folder, root / "python_detect"


def test_rest_predict_against_a_server_running_the_export(exported, loaded, images_and_detect,
                                                          tmp_path):
    folder, want_dir = images_and_detect
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append((self.path, body["signature_name"]))
            data = [base64.b64decode(row["image_bytes"]["b64"]) for row in body["instances"]]
            out = loaded.signatures[body["signature_name"]](image_bytes=tf.constant(data))
            rows = [{k: v[i].numpy().tolist() for k, v in out.items()} for i in range(len(data))]
            payload = json.dumps({"predictions": rows}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = CliRunner().invoke(main, ["predict", str(folder), "--rest", url, "--out",
                                           str(tmp_path / "rest"), "--no-overlays"])
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 0, result.output
    assert seen == [("/v1/models/focasnet:predict", "serving_bytes")] * 2
    _assert_same_outputs(tmp_path / "rest", want_dir)
    meta = json.loads((tmp_path / "rest" / "predict.json").read_text())
    assert meta["server"]["transport"] == "rest" and meta["totals"]["images"] == 2


def test_grpc_predict_against_an_in_process_prediction_service(exported, loaded,
                                                               images_and_detect, tmp_path):
    grpc = pytest.importorskip("grpc")
    apis = pytest.importorskip("tensorflow_serving.apis.prediction_service_pb2_grpc")
    from tensorflow_serving.apis import predict_pb2

    folder, want_dir = images_and_detect
    seen = []

    class Service(apis.PredictionServiceServicer):
        def Predict(self, request, context):
            seen.append((request.model_spec.name, request.model_spec.signature_name))
            images = tf.make_ndarray(request.inputs["images"])
            out = loaded.signatures["serving_default"](images=tf.constant(images))
            response = predict_pb2.PredictResponse()
            response.model_spec.name = request.model_spec.name
            response.model_spec.version.value = 1
            for key, value in out.items():
                response.outputs[key].CopyFrom(tf.make_tensor_proto(value.numpy()))
            return response

    from concurrent import futures

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    apis.add_PredictionServiceServicer_to_server(Service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = CliRunner().invoke(main, ["predict", str(folder), "--server",
                                           f"127.0.0.1:{port}", "--out", str(tmp_path / "grpc"),
                                           "--no-overlays"])
    finally:
        server.stop(0)
    assert result.exit_code == 0, result.output
    assert seen == [("focasnet", "serving_default")] * 2
    _assert_same_outputs(tmp_path / "grpc", want_dir)
    meta = json.loads((tmp_path / "grpc" / "predict.json").read_text())
    assert meta["server"]["answered_version"] == 1


def test_grpc_predict_against_a_real_tensorflow_model_server(exported, images_and_detect,
                                                             tmp_path):
    binary = shutil.which("tensorflow_model_server")
    if binary is None:
        pytest.skip("tensorflow_model_server is not on PATH (not installable here: not on PyPI "
                    "or Debian; use the tensorflow/serving container)")
    pytest.importorskip("tensorflow_serving.apis")
    folder, want_dir = images_and_detect
    config = tmp_path / "models.config"
    config.write_text(savedmodel.models_config_text(["focasnet"], str(exported["base"])))
    grpc_port, rest_port = _free_port(), _free_port()
    proc = subprocess.Popen([binary, f"--port={grpc_port}", f"--rest_api_port={rest_port}",
                             f"--model_config_file={config}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{rest_port}/v1/models/focasnet", timeout=5) as r:
                    if b"AVAILABLE" in r.read():
                        break
            except OSError:
                pass
            assert time.time() < deadline and proc.poll() is None, "server did not start"
            time.sleep(1)
        for flag, address, out in (("--server", f"127.0.0.1:{grpc_port}", "grpc"),
                                   ("--rest", f"http://127.0.0.1:{rest_port}", "rest")):
            result = CliRunner().invoke(main, ["predict", str(folder), flag, address, "--out",
                                               str(tmp_path / out), "--no-overlays"])
            assert result.exit_code == 0, result.output
            _assert_same_outputs(tmp_path / out, want_dir)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
