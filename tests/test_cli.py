"""The focas-keras command line: help everywhere, one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from focas_keras.cli import main

SUBCOMMANDS = ["synth", "prepare", "inspect", "train-det", "train-cls", "mine", "detect",
               "evaluate", "calibrate", "patch-study", "export", "predict", "demo", "slide",
               "models"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_on_every_subcommand(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "Usage:" in result.output


def test_group_lists_all_subcommands():
    result = CliRunner().invoke(main, ["--help"])
    assert all(name in result.output for name in SUBCOMMANDS)


def _run(*args):
    """Runs the installed console script in a subprocess, as a user would."""
    script = [sys.executable, "-c", "from focas_keras.cli import main; main()"]
    return subprocess.run(script + list(args), capture_output=True, text=True, timeout=300)


def _assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("focas-keras: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]


def test_prepare_bad_csv_line_one_line_exit_2(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    (root / "A01_00.csv").write_text("10,20\n10,20,30\n")
    proc = _run("prepare", "--format", "icpr2012", str(root), "--out", str(tmp_path / "o"))
    _assert_user_error(proc, "A01_00.csv:2:", "odd number")
    assert not (tmp_path / "o").exists()


def test_prepare_truncated_image(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    image = root / "A00_00.png"
    image.write_bytes(image.read_bytes()[:500])
    proc = _run("prepare", "--format", "icpr2012", str(root), "--out", str(tmp_path / "o"))
    _assert_user_error(proc, "A00_00.png", "truncated PNG")


def test_prepare_existing_output_and_inspect(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    out = tmp_path / "o"
    args = ["prepare", "--format", "icpr2012", str(root), "--out", str(out),
            "--tile-size", "96", "--patch-size", "32", "--val-slides", "A02"]
    ok = _run(*args)
    assert ok.returncode == 0, ok.stderr
    assert "val" in ok.stdout and "A02" in ok.stdout
    _assert_user_error(_run(*args), "exists and is not empty")
    assert _run(*args, "--overwrite").returncode == 0
    inspected = _run("inspect", str(out), "--read")
    assert inspected.returncode == 0 and "counts match the manifest" in inspected.stdout
    shard = sorted((out / "cls").glob("*.tfrecord"))[0]
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    _assert_user_error(_run("inspect", str(out)), shard.name, "sha256")


def test_bad_values_exit_2(tiny_icpr, tmp_path):
    root, _ = tiny_icpr
    proc = _run("prepare", "--format", "icpr2012", str(root), "--out", str(tmp_path / "o"),
                "--val-slides", "ZZZ")
    _assert_user_error(proc, "unknown validation slide")
    proc = _run("prepare", "--format", "icpr2012", str(tmp_path / "none"), "--out",
                str(tmp_path / "o"))
    _assert_user_error(proc, "dataset directory not found")
    proc = _run("detect", str(root), "--det", str(tmp_path / "d"), "--cls", str(tmp_path / "c"),
                "--out", str(tmp_path / "o"), "--det-mpp", "0")
    _assert_user_error(proc, "det mpp must be > 0")


# ---------------------------------------------------------------- options: one name, help


def _options(command):
    import click

    return [p for p in command.params if isinstance(p, click.Option)]


def test_every_option_has_help_text():
    missing = [f"{name} {'/'.join(option.opts)}"
               for name, command in [("focas-keras", main), *sorted(main.commands.items())]
               for option in _options(command) if not option.hidden and not option.help]
    assert missing == [], f"options without help: {', '.join(missing)}"


def test_one_option_name_per_idea():
    visible = {name: {opt for option in _options(command) if not option.hidden
                      for opt in option.opts}
               for name, command in main.commands.items()}
    # Stage-1 threshold and match radius: the same names wherever they occur.
    for name, opts in visible.items():
        assert not opts & {"--score-threshold", "--radius"}, name
    for name in ("mine", "detect", "export"):
        assert "--det-threshold" in visible[name], name
    for name in ("mine", "evaluate", "calibrate", "patch-study"):
        assert {"--radius-px", "--radius-um"} <= visible[name], name
    hidden = {opt for option in _options(main.commands["mine"]) if option.hidden
              for opt in option.opts}
    assert hidden == {"--score-threshold", "--radius"}  # old names still accepted
    required = [option.name for option in _options(main.commands["export"]) if option.required]
    assert required == ["base"]  # --det/--cls default to the bundled model


def _fake_mine(monkeypatch):
    seen = []

    def fake(det_run, source, fmt, shard_dir, **kwargs):
        seen.append(kwargs)
        return {"false_positives": 3, "true_positives": 0, "images": 2}

    monkeypatch.setattr("focas_keras.training.mine.mine_hard_negatives", fake)
    return seen


def test_mine_new_names_and_hidden_aliases(tmp_path, monkeypatch):
    import json

    seen = _fake_mine(monkeypatch)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({
        "shards": [], "splits": {}, "tile_size": 224, "patch_size": 64,
        "parameters": {"target_mpp": 0.5}}))
    base = ["mine", "--det", str(tmp_path / "D"), "--data", str(tmp_path / "src"), "--format",
            "synth", "--out", str(shards)]
    runner = CliRunner()
    result = runner.invoke(main, base + ["--det-threshold", "0.3", "--radius-px", "15"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, base + ["--score-threshold", "0.2", "--radius", "12"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, base + ["--radius-um", "5"])  # 5 um at the shards' 0.5 um/px
    assert result.exit_code == 0, result.output
    assert [(s["score_threshold"], s["radius"]) for s in seen] == [(0.3, 15.0), (0.2, 12.0),
                                                                   (None, 10.0)]
    result = runner.invoke(main, base + ["--det-threshold", "0.3", "--score-threshold", "0.2"])
    assert result.exit_code == 2
    assert result.stderr.strip() == ("focas-keras: error: --det-threshold and --score-threshold "
                                     "(its old name) disagree: 0.3 and 0.2")
    result = runner.invoke(main, base + ["--radius-px", "9", "--radius-um", "5"])
    assert result.exit_code == 2 and "not both" in result.stderr


# ---------------------------------------------------------------- runs of the wrong kind


def _fake_runs(root):
    """(det, cls, cls without run.json, shards) directories that only say what they are."""
    import json

    det, cls_, old_cls, shards = (root / n for n in ("det", "cls", "old_cls", "shards"))
    for path in (det, cls_, old_cls, shards):
        path.mkdir(parents=True)
    (det / "run.json").write_text(json.dumps({"kind": "mdet"}))
    (det / "config.json").write_text(json.dumps({"backbone": {}, "inference": {}}))
    (cls_ / "run.json").write_text(json.dumps({"kind": "mclass"}))
    (old_cls / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    (shards / "manifest.json").write_text("{}")
    return det, cls_, old_cls, shards


def _one_error_line(result):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("focas-keras: error: "), result.stderr
    return lines[0][len("focas-keras: error: "):]


def test_a_run_of_the_wrong_kind_names_itself(tmp_path):
    import cv2
    import numpy as np

    from focas_keras.runs import run_kind

    det, cls_, old_cls, shards = _fake_runs(tmp_path)
    assert [run_kind(p) for p in (det, cls_, old_cls, shards, tmp_path)] == [
        "mdet", "mclass", "mclass", "shards", None]
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((64, 64, 3), (90, 60, 200), np.uint8))
    truth = tmp_path / "truth.csv"
    truth.write_text("image,x,y\na,10,10\n")
    swapped = f"{cls_} is a train-cls run; --det needs a train-det run"
    runner = CliRunner()
    commands = {
        "detect": ["detect", str(image), "--out", str(tmp_path / "o")],
        "export": ["export", "--out", str(tmp_path / "base")],
        "patch-study": ["patch-study", str(image), "--truth", str(truth)],
    }
    for name, args in commands.items():
        result = runner.invoke(main, args + ["--det", str(cls_), "--cls", str(det)])
        assert _one_error_line(result) == swapped, name
        result = runner.invoke(main, args + ["--det", str(det), "--cls", str(det)])
        assert _one_error_line(result) == (f"{det} is a train-det run; --cls needs a "
                                           "train-cls run"), name
        result = runner.invoke(main, args + ["--det", str(old_cls), "--cls", str(cls_)])
        assert _one_error_line(result) == (f"{old_cls} is a train-cls run; --det needs a "
                                           "train-det run"), name
    result = runner.invoke(main, ["mine", "--det", str(cls_), "--data", str(tmp_path),
                                  "--format", "synth", "--out", str(shards)])
    assert _one_error_line(result) == swapped
    result = runner.invoke(main, commands["detect"] + ["--det", str(shards), "--cls", str(cls_)])
    assert _one_error_line(result) == (f"{shards} is a shard directory (from prepare); --det "
                                       "needs a train-det run")
    assert not (tmp_path / "o").exists() and not (tmp_path / "base").exists()


def test_swapped_runs_one_line_exit_2_as_a_user_sees_it(tmp_path):
    det, cls_, _, _ = _fake_runs(tmp_path)
    _images(tmp_path, "a.png")
    proc = _run("detect", str(tmp_path / "a.png"), "--det", str(cls_), "--cls", str(det),
                "--out", str(tmp_path / "o"))
    _assert_user_error(proc, f"{cls_} is a train-cls run; --det needs a train-det run")


# ---------------------------------------------------------------- detect with a fake cascade


class _Cascade:
    """Duck-typed cascade built from the settings detect passed: one accepted and one
    rejected candidate on every image."""

    def __init__(self, settings):
        self.settings = settings
        self.det_threshold = 0.05 if settings.det_threshold is None else settings.det_threshold
        self.cls_threshold = 0.5 if settings.cls_threshold is None else settings.cls_threshold
        self.nms_iou, self.patch, self.det_mpp, self.cls_mpp = 0.5, 112, 0.2456, 0.2456

    def run(self, image):
        import pandas as pd

        return pd.DataFrame({"x": [10.0, 30.0], "y": [10.0, 30.0], "x1": [5.0, 25.0],
                             "y1": [5.0, 25.0], "x2": [15.0, 35.0], "y2": [15.0, 35.0],
                             "det_score": [0.9, 0.8], "cls_score": [0.9, 0.1],
                             "accepted": [True, False]})


@pytest.fixture()
def fake_cascade(monkeypatch):
    """Replaces Cascade.from_runs; yields the list of (det, cls, settings, which) it got."""
    from focas_keras.inference.cascade import Cascade

    seen = []

    def from_runs(det, cls_, settings, which="best"):
        seen.append((det, cls_, settings, which))
        return _Cascade(settings)

    monkeypatch.setattr(Cascade, "from_runs", staticmethod(from_runs))
    return seen


def _images(root, *names, gray=()):
    import cv2
    import numpy as np

    root.mkdir(exist_ok=True)
    for name in names:
        colour = np.full((48, 64, 3), (200, 80, 170), np.uint8)
        cv2.imwrite(str(root / name), colour[..., 0] if name in gray else colour)
    return root


def test_detect_reads_a_thresholds_file_command_line_wins(tmp_path, fake_cascade):
    import json

    src = _images(tmp_path / "in", "a.png")
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"det_threshold": 0.12, "cls_threshold": 0.66,
                                      "merge_px": 25, "tta": True,
                                      "chosen_on": {"images": ["v1"]}}))
    base = ["detect", str(src), "--det", "D", "--cls", "C", "--no-overlays", "--thresholds",
            str(thresholds)]
    runner = CliRunner()
    result = runner.invoke(main, base + ["--out", str(tmp_path / "o1")])
    assert result.exit_code == 0, result.output
    settings = fake_cascade[-1][2]
    assert (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta) == (
        0.12, 0.66, 25.0, True)
    assert f"thresholds from {thresholds}" in result.stdout
    record = json.loads((tmp_path / "o1" / "detect.json").read_text())["thresholds_file"]
    assert (record["path"], record["used"], record["command_line_won"]) == (
        str(thresholds), {"det_threshold": 0.12, "cls_threshold": 0.66, "merge_px": 25.0,
                          "tta": True}, [])
    assert record["chosen_on"] == {"images": ["v1"]} and len(record["sha256"]) == 64
    result = runner.invoke(main, base + ["--out", str(tmp_path / "o2"), "--cls-threshold",
                                         "0.9", "--merge-px", "30", "--no-tta"])
    assert result.exit_code == 0, result.output
    settings = fake_cascade[-1][2]
    assert (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta) == (
        0.12, 0.9, 30.0, False)
    record = json.loads((tmp_path / "o2" / "detect.json").read_text())["thresholds_file"]
    assert sorted(record["command_line_won"]) == ["cls_threshold", "merge_px", "tta"]
    # No file: the defaults as before (merge 30 px, TTA off), and detect.json says so.
    result = runner.invoke(main, base[:-2] + ["--out", str(tmp_path / "o3")])
    assert result.exit_code == 0, result.output
    settings = fake_cascade[-1][2]
    assert (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta) == (
        None, None, 30.0, False)
    summary = json.loads((tmp_path / "o3" / "detect.json").read_text())
    assert summary["thresholds_file"] is None
    assert summary["runs"] == {"det": str(Path("D").resolve()), "cls": str(Path("C").resolve())}


def test_detect_thresholds_file_errors_and_other_runs(tmp_path, fake_cascade):
    import json

    src = _images(tmp_path / "in", "a.png")
    bad = tmp_path / "bad.json"
    bad.write_text('{"det_threshold": 0.1}')
    base = ["detect", str(src), "--det", "D", "--cls", "C", "--no-overlays"]
    result = CliRunner().invoke(main, base + ["--thresholds", str(bad), "--out",
                                              str(tmp_path / "o")])
    assert _one_error_line(result).startswith(f"{bad}: not a thresholds file (no cls_threshold")
    assert not (tmp_path / "o").exists() and not fake_cascade
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.5, "chosen_on": {
        "detect": {"runs": {"det": "/elsewhere/mdet", "cls": "/elsewhere/mclass"}}}}))
    result = CliRunner().invoke(main, base + ["--thresholds", str(other), "--out",
                                              str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    assert result.stderr.count("warning") == 1
    assert f"{other} was chosen on the candidates of --det /elsewhere/mdet" in result.stderr


def test_thresholds_file_overrides_the_bundled_models_card(tmp_path, fake_cascade, monkeypatch):
    import contextlib
    import json

    from focas_keras import pretrained

    card = {"name": "fake_bundle", "cv_estimate": {"pooled": {"f1": 0.5}},
            "thresholds": {"det_threshold": 0.3, "cls_threshold": 0.7, "merge_px": 28.0,
                           "tta": True}}
    monkeypatch.setattr(pretrained, "load_card", lambda name=pretrained.DEFAULT: card)
    monkeypatch.setattr(pretrained, "runs", lambda name=pretrained.DEFAULT: contextlib.
                        nullcontext((tmp_path / "bdet", tmp_path / "bcls", card)))
    src = _images(tmp_path / "in", "a.png")
    base = ["detect", str(src), "--no-overlays"]
    runner = CliRunner()
    result = runner.invoke(main, base + ["--out", str(tmp_path / "o0")])
    assert result.exit_code == 0, result.output
    settings = fake_cascade[-1][2]  # the card, as before
    assert (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta) == (
        0.3, 0.7, 28.0, True)
    thresholds = tmp_path / "t.json"
    thresholds.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.4}))
    result = runner.invoke(main, base + ["--out", str(tmp_path / "o1"), "--thresholds",
                                         str(thresholds)])
    assert result.exit_code == 0, result.output
    settings = fake_cascade[-1][2]  # the file's pair; the card keeps what the file lacks
    assert (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta) == (
        0.1, 0.4, 28.0, True)
    assert fake_cascade[-1][3] == "model"
    result = runner.invoke(main, base + ["--out", str(tmp_path / "o2"), "--thresholds",
                                         str(thresholds), "--det-threshold", "0.2"])
    assert fake_cascade[-1][2].det_threshold == 0.2 and result.exit_code == 0
    summary = json.loads((tmp_path / "o2" / "detect.json").read_text())
    assert summary["bundled_model"] == "fake_bundle"
    assert summary["thresholds_file"]["used"] == {"cls_threshold": 0.4}


def test_detect_images_not_an_image_and_grayscale(tmp_path, fake_cascade):
    src = _images(tmp_path / "in", "a.png", "b.png", "c.png", gray=("b.png", "c.png"))
    result = CliRunner().invoke(main, ["detect", str(src), "--det", "D", "--cls", "C",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [f"focas-keras: warning: {src / 'b.png'} is grayscale; the models "
                        "expect H&E colour, results may be poor"]
    (src / "d.jpg").write_text("just text\n")
    not_image = "not a BMP, PNG, JPEG or TIFF image (its first bytes match none of them)"
    # Alone, a bad image is a one-line error and nothing is written.
    result = CliRunner().invoke(main, ["detect", str(src / "d.jpg"), "--det", "D", "--cls",
                                       "C", "--out", str(tmp_path / "o2")])
    assert _one_error_line(result) == f"{src / 'd.jpg'}: {not_image}"
    assert not (tmp_path / "o2").exists()
    # Among others, it is set aside: the rest run, detect.json lists it, the exit status is 1.
    result = CliRunner().invoke(main, ["detect", str(src), "--det", "D", "--cls", "C",
                                       "--out", str(tmp_path / "o3")])
    assert result.exit_code == 1, result.output
    assert f"{src / 'd.jpg'}: {not_image}" in result.stderr
    assert "1 of 4 images failed" in result.stderr and "Traceback" not in result.output
    record = json.loads((tmp_path / "o3" / "detect.json").read_text())
    assert record["failed"] == [{"image": "d", "path": str(src / "d.jpg"), "reason": not_image}]
    assert sorted(record["images"]) == ["a", "b", "c"] and record["totals"]["images"] == 3


def test_detect_no_rejected_leaves_them_off_the_overlays(tmp_path, fake_cascade, monkeypatch):
    import cv2

    from focas_keras.inference import outputs

    src = _images(tmp_path / "in", "a.png")
    runner = CliRunner()
    result = runner.invoke(main, ["detect", str(src), "--det", "D", "--cls", "C", "--out",
                                  str(tmp_path / "o1")])
    assert result.exit_code == 0 and "red = rejected candidate" in result.stdout
    result = runner.invoke(main, ["detect", str(src), "--det", "D", "--cls", "C", "--out",
                                  str(tmp_path / "o2"), "--no-rejected"])
    assert result.exit_code == 0 and "red = rejected" not in result.stdout
    with_red, without = (cv2.imread(str(tmp_path / o / "overlays" / "a.jpg")).astype(int)
                         for o in ("o1", "o2"))
    # The rejected box's top edge (y 25, x 25..34), 1 px red: drawn in one (JPEG blurs it),
    # the image colour in the other; the accepted box's edge is green in both.
    edge = (slice(25, 26), slice(27, 33))
    assert (abs(without[edge] - (200, 80, 170)) < 25).all()  # BGR of the image colour
    assert (with_red[edge][..., 0] < without[edge][..., 0] - 50).all()  # less blue: redder
    for overlay in (with_red, without):
        b, g, r = overlay[5, 8:12].T  # top edge of the accepted box (y 5, x 5..14)
        assert (g > 180).all() and (r < 110).all() and (b < 110).all()
    assert outputs.REJECTED_RGB == (255, 0, 0)


def test_demo_help_and_refusal(tmp_path):
    result = CliRunner().invoke(main, ["demo", "--help"])
    assert "--overwrite" in result.output
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "d")])
    assert _one_error_line(result) == (f"{tmp_path / 'd'}: output directory exists and is not "
                                       "empty (use --overwrite)")
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["mine.txt"]
