"""The focas-keras command line: help everywhere, one-line errors with exit code 2."""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from focas_keras.cli import main

SUBCOMMANDS = ["synth", "prepare", "inspect", "train-det", "train-cls", "mine", "detect",
               "evaluate", "calibrate", "patch-study", "export", "predict", "demo"]


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
