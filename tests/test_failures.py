"""Failing one thing at a time, never with a traceback; and a command line that starts fast.

Unwritable --out refused before any model loads; a bad slide or image among several recorded
while the rest run (exit 1); a slide without a pyramid; one run per --out (a lock that a
crashed run does not leave stuck); what Ctrl-C keeps; --help without TensorFlow.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from focas_keras.cli import main  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.slides import lock as lock_mod  # noqa: E402
from focas_keras.slides import reader as reader_mod  # noqa: E402
from focas_keras.slides import run as slide_run  # noqa: E402
from focas_keras.slides.reader import SlideReader  # noqa: E402
from focas_keras.slides.run import SlideSettings, run_slide, run_slides  # noqa: E402
from test_cli import _images, fake_cascade  # noqa: E402,F401
from test_slide_run import MPP, TILE, _fake, _slide, _tissue_image  # noqa: E402

SETTINGS = SlideSettings(tile=TILE, overlap=32)


def _error_line(result) -> str:
    """The single stderr line of a user error (exit 2), without its prefix."""
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("focas-keras: error: "), result.stderr
    return lines[0][len("focas-keras: error: "):]


# ---------------------------------------------------------------- fast start (no TensorFlow)


def test_help_version_and_usage_errors_do_not_import_tensorflow(tmp_path):
    """--help, --version, a subcommand's --help and usage errors: answered with none of
    TensorFlow, Keras, pandas or OpenCV imported (they cost seconds at start-up)."""
    record = tmp_path / "record.json"
    code = textwrap.dedent(f"""
        import json, sys
        from focas_keras.cli import main
        codes = []
        for args in (["--help"], ["--version"], ["slide", "--help"], ["detect", "--help"],
                     ["train-det", "--help"], ["detect"], ["no-such-command"],
                     ["slide", "x.svs", "--tile", "abc", "--out", "o"]):
            try:
                main(args, prog_name="focas-keras")
            except SystemExit as stop:
                codes.append(stop.code)
        heavy = [m for m in ("tensorflow", "keras", "pandas", "cv2", "openslide")
                 if m in sys.modules]
        json.dump({{"codes": codes, "heavy": heavy}}, open({str(record)!r}, "w"))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(record.read_text())
    assert result["codes"] == [0, 0, 0, 0, 0, 2, 2, 2]
    assert result["heavy"] == []
    assert "Traceback" not in proc.stderr and "0.1.0" in proc.stdout


def test_import_focas_keras_registers_layers_whichever_comes_first(tmp_path):
    """``import focas_keras`` is light, yet Keras knows our layers as soon as it is imported:
    before (the import hook) or after (at once) ``import focas_keras``."""
    check = textwrap.dedent("""
        import sys
        import keras
        from focas_keras import import_hooks
        names = ["focas_keras>CBAM", "focas_keras>GroupNorm"]
        found = [keras.saving.get_registered_object(n) is not None for n in names]
        print(all(found), "tensorflow" in sys.modules)
    """)
    light = ("import importlib.util, sys\nimport focas_keras\n"
             "assert 'tensorflow' not in sys.modules\n"
             "importlib.util.find_spec('keras')  # a probe for an optional dependency\n")
    for first in (light, "import keras\nimport focas_keras\n"):
        proc = subprocess.run([sys.executable, "-c", first + check], capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["True", "True"], (first, proc.stdout)


# ---------------------------------------------------------------- unwritable --out


@pytest.fixture()
def no_models(monkeypatch):
    """Makes loading TensorFlow (and so any model) fail the test."""
    from focas_keras.commands import data, detection, slides, training

    def loaded():
        raise AssertionError("TensorFlow was imported (a model would load) before --out was "
                             "checked")

    for module in (data, detection, slides, training):
        monkeypatch.setattr(module, "_import_tensorflow", loaded)


def _commands(tmp_path, out):
    slide = _slide(tmp_path, _tissue_image(256, 256), name="tiny")
    image = _images(tmp_path / "in", "a.png") / "a.png"
    return {
        "slide": ["slide", str(slide), "--out", out],
        "detect": ["detect", str(image), "--out", out],
        "export": ["export", "--out", out],
        "predict": ["predict", str(image), "--rest", "http://127.0.0.1:9", "--out", out],
        "demo": ["demo", "--out", out],
        "mine": ["mine", "--det", str(tmp_path), "--data", str(tmp_path), "--format", "synth",
                 "--out", out],
        "train-det": ["train-det", "--data", str(tmp_path), "--out", out],
        "train-cls": ["train-cls", "--data", str(tmp_path), "--out", out],
        "prepare": ["prepare", str(tmp_path), "--format", "icpr2012", "--out", out],
    }


def test_out_under_a_file_is_refused_before_any_model_loads(tmp_path, no_models):
    blocker = tmp_path / "results.txt"
    blocker.write_text("a file, not a directory\n")
    out = str(blocker / "run")
    runner = CliRunner()
    for name, args in _commands(tmp_path, out).items():
        line = _error_line(runner.invoke(main, args))
        assert line == f"{out}: cannot create the output directory: {blocker} is a file", name
    assert blocker.read_text() == "a file, not a directory\n"


def test_unwritable_out_is_refused_in_one_line(tmp_path, no_models, monkeypatch):
    """A directory that cannot be written (here the probe file is refused, as in a read-only
    directory): one line, exit 2, for every command; nothing is created."""
    import tempfile

    commands = _commands(tmp_path, str(tmp_path / "new" / "out"))

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    for name, args in commands.items():
        line = _error_line(CliRunner().invoke(main, args))
        assert line == (f"{tmp_path / 'new' / 'out'}: cannot write the output here "
                        f"({tmp_path}: Permission denied)"), name
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path, no_models):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        for name, args in _commands(tmp_path, str(locked / "out")).items():
            assert "cannot write the output here" in _error_line(
                CliRunner().invoke(main, args)), name
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------- one bad input among several


@pytest.fixture()
def fake_slide_models(monkeypatch):
    """``slide`` with test_slide_run's fake cascade instead of the bundled models."""
    from focas_keras.commands import slides

    monkeypatch.setattr(slides, "_slide_cascade", lambda *a, **k: (_fake(), {"det": "fake"}))
    monkeypatch.setattr(slides, "_domain_check", lambda settings, *a, **k: settings,
                        raising=False)


def test_a_bad_slide_among_several_is_recorded_and_the_rest_run(tmp_path, fake_slide_models):
    good = [_slide(tmp_path, _tissue_image(seed=s), name=f"good{s}") for s in (1, 2)]
    bad = tmp_path / "broken.svs"
    bad.write_text("not a slide\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["slide", str(good[0]), str(bad), str(good[1]),
                                       "--out", str(out), "--tile", str(TILE),
                                       "--overlap", "32"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "Traceback" not in result.output
    table = pd.read_csv(out / "slides.csv", keep_default_na=False).set_index("slide")
    assert sorted(table.index) == ["broken", "good1", "good2"]
    assert list(table["status"].loc[["good1", "broken", "good2"]]) == ["done", "failed", "done"]
    reason = ("OpenSlide does not recognise this .svs file (truncated, corrupt or not a "
              "slide)")
    assert table.loc["broken", "reason"] == reason
    assert table.loc["good1", "reason"] == "" and table.loc["broken", "mitoses"] == ""
    assert f"1 of 3 slides failed (the rest ran)" in result.stderr
    assert f"{bad}: {reason}" in result.stderr
    for name in ("good1", "good2"):
        assert (out / name / "summary.json").is_file()
    assert not (out / lock_mod.LOCK_FILE).exists()
    # A single bad slide is still a one-line error, before anything is written.
    result = CliRunner().invoke(main, ["slide", str(bad), "--out", str(tmp_path / "o2")])
    assert _error_line(result) == f"{bad}: {reason}"
    assert not (tmp_path / "o2").exists()


def test_a_slide_failing_while_it_runs_is_recorded(tmp_path):
    """A slide whose directory holds another run's journal fails; the next one runs."""
    paths = [_slide(tmp_path, _tissue_image(seed=s), name=f"s{s}") for s in (1, 2)]
    out = tmp_path / "out"
    (out / "s1").mkdir(parents=True)
    (out / "s1" / slide_run.JOURNAL).write_text('{"another": "run"}\n')
    failed, warnings = [], []
    summaries = run_slides(_fake(), paths, out, SETTINGS, progress=False, failed=failed,
                           warn=warnings.append)
    assert [s["slide"] for s in summaries] == ["s2"]
    assert [row["slide"] for row in failed] == ["s1"]
    assert "holds the tiles of another run" in failed[0]["reason"]
    table = pd.read_csv(out / "slides.csv")
    assert list(table["status"]) == ["failed", "done"]
    with pytest.raises(InputError, match="holds the tiles of another run"):
        run_slides(_fake(), paths, tmp_path / "out", SETTINGS, progress=False)


def test_a_bad_image_among_several_is_recorded_by_the_library(tmp_path):
    from test_cascade import FakeCascade, _uncapped

    from focas_keras.inference.outputs import detect_to_dir

    src = _images(tmp_path / "in", "a.png", "b.png")
    (src / "c.png").write_bytes((src / "a.png").read_bytes()[:60])  # a PNG cut short
    cascade = FakeCascade(_uncapped(det_threshold=0.0, mpp=MPP))
    failed = []
    counts = detect_to_dir(cascade, [src], tmp_path / "o", progress=False, failed=failed)
    assert list(counts["image"]) == ["a", "b"]
    assert [f["image"] for f in failed] == ["c"]
    record = json.loads((tmp_path / "o" / "detect.json").read_text())
    assert record["failed"] == failed and record["totals"]["images"] == 2
    with pytest.raises(InputError, match="c.png"):  # without a list: the first stops all
        detect_to_dir(cascade, [src], tmp_path / "o2", progress=False)
    assert not (tmp_path / "o2").exists()


# ---------------------------------------------------------------- a slide without a pyramid


def _flat_slide(path, image, mpp=MPP):
    """A single-level tiled TIFF (no reduced pages, no thumbnail page), as a plain big scan
    saved as TIFF is: OpenSlide opens it as generic-tiff with one level."""
    import tifffile

    with tifffile.TiffWriter(path) as writer:
        writer.write(image, tile=(64, 64), photometric="rgb", compression="zlib",
                     metadata=None, resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER")
    return path


def test_slide_without_a_pyramid_runs(tmp_path, monkeypatch):
    image = _tissue_image()
    path = _flat_slide(tmp_path / "flat.tif", image)
    reads = []
    original = SlideReader.read

    def counted(self, x, y, width, height, level):
        reads.append((x, y, width, height, level))
        return original(self, x, y, width, height, level)

    monkeypatch.setattr(SlideReader, "read", counted)
    with SlideReader.open(path) as reader:
        assert reader.level_count == 1 and reader.vendor == "generic-tiff"
        from focas_keras.slides.tissue import tissue_map

        mask = tissue_map(reader, 8.0, detect=False)  # --no-tissue-mask reads no pixel
        assert reads == [] and mask.mask.all()
        assert mask.mask.shape == reader.thumbnail(8.0)[0].shape[:2]
        # The overview of a level bigger than one read comes from level 0 in strips.
        monkeypatch.setattr(reader_mod, "MAX_READ_PIXELS", 200_000)
        reads.clear()
        thumb, sx, sy = reader.thumbnail(2.0)
        assert len(reads) > 1 and all(r[2] == reader.width and r[4] == 0 for r in reads)
        assert max(r[2] * r[3] for r in reads) <= 200_000
        assert thumb.shape[:2] == (round(image.shape[0] * MPP / 2), round(image.shape[1] *
                                                                           MPP / 2))
        for masked in (False, True):
            settings = SlideSettings(tile=TILE, overlap=32, tissue_mask=masked)
            summary = run_slide(_fake(), reader, tmp_path / f"out{masked}", settings,
                                progress=False)
            assert summary["tiles"]["processed"] > 0 and summary["mitoses"] > 0
            for name in slide_run.OUTPUT_FILES:
                assert (tmp_path / f"out{masked}" / name).is_file()


def test_a_plain_image_over_pillows_bomb_limit_opens(tmp_path, monkeypatch):
    from PIL import Image

    import cv2

    png = tmp_path / "scan.png"
    cv2.imwrite(str(png), _tissue_image(256, 256))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # as if 256 x 256 were huge
    with SlideReader.open(png, mpp=MPP) as reader:
        assert (reader.width, reader.height) == (256, 256)
    assert Image.MAX_IMAGE_PIXELS == 10_000  # the guard is back for everything else


# ---------------------------------------------------------------- one run per --out


def test_out_in_use_is_refused_and_a_stale_lock_is_taken_over(tmp_path, fake_slide_models):
    path = _slide(tmp_path, _tissue_image(), name="s")
    out = tmp_path / "out"
    out.mkdir()
    lock = out / lock_mod.LOCK_FILE
    args = ["slide", str(path), "--out", str(out), "--tile", str(TILE), "--overlap", "32"]
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "earlier"}
    lock.write_text(json.dumps(holder))  # a live run: this very process
    line = _error_line(CliRunner().invoke(main, args))
    assert line.startswith(f"{out}: in use by another focas-keras run (pid {os.getpid()} on "
                           f"{socket.gethostname()}, started earlier)")
    assert str(lock) in line and not (out / "s").exists()
    assert json.loads(lock.read_text()) == holder  # not someone else's to remove
    # A run that crashed: its pid is gone, so the lock is stale and taken over.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps(dict(holder, pid=gone.pid)))
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (result.output, result.exception)
    assert f"taking over the lock of a run that is no longer running (pid {gone.pid}" in (
        result.stderr)
    assert (out / "s" / "summary.json").is_file() and not lock.exists()


def test_lock_from_another_host_is_refused_and_released_after_an_error(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    lock = out / lock_mod.LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "t"}))
    with pytest.raises(InputError, match="pid 1 on elsewhere"):
        with lock_mod.out_dir_lock(out):
            pass
    lock.unlink()
    with pytest.raises(RuntimeError):
        with lock_mod.out_dir_lock(out):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
            raise RuntimeError("the run failed")
    assert not lock.exists()


# ---------------------------------------------------------------- what Ctrl-C keeps


def test_interrupted_slide_says_what_it_kept(tmp_path, fake_slide_models, monkeypatch):
    path = _slide(tmp_path, _tissue_image(), name="s")
    out = tmp_path / "out"
    original, calls = slide_run.run_tile, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(slide_run, "run_tile", interrupted)
    args = ["slide", str(path), "--out", str(out), "--tile", str(TILE), "--overlap", "32",
            "--no-tissue-mask"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130
    journal = out / "s" / slide_run.JOURNAL
    assert (f"focas-keras: interrupted: the finished tiles are kept in {journal}; rerun the "
            "same command to resume") in result.stderr
    assert "no partial output" not in result.stderr
    assert len(journal.read_text().splitlines()) == 1 + 2  # header and two tiles
    assert not (out / lock_mod.LOCK_FILE).exists()
    monkeypatch.setattr(slide_run, "run_tile", original)
    result = CliRunner().invoke(main, args)  # the rerun resumes
    assert result.exit_code == 0 and (out / "s" / "summary.json").is_file()


def test_interrupted_detect_says_nothing_was_written(tmp_path, fake_cascade, monkeypatch):
    from test_cli import _Cascade

    def interrupted(self, image):
        raise KeyboardInterrupt

    monkeypatch.setattr(_Cascade, "run", interrupted)
    src = _images(tmp_path / "in", "a.png")
    result = CliRunner().invoke(main, ["detect", str(src), "--det", "D", "--cls", "C",
                                       "--out", str(tmp_path / "o")])
    assert result.exit_code == 130
    assert ("focas-keras: interrupted: nothing was written (the output directory is put in "
            "place only when complete)") in result.stderr
    assert not (tmp_path / "o").exists()
