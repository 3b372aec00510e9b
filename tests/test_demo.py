"""The demo's pipeline end to end, at a reduced size; its all-or-nothing output directory."""

import json
import shlex

import pandas as pd
import pytest

from focas_keras.demo import run_demo
from focas_keras.errors import InputError


def test_demo_pipeline_reduced(tmp_path):
    lines = []
    out = tmp_path / "demo"
    result = run_demo(out, images=4, size=512, test_images=2, seed=0,
                      det_epochs=1, cls_epochs=1, echo=lines.append)
    for key in ("tp", "fp", "fn", "precision", "recall", "f1"):
        assert key in result["stage1"] and key in result["cascade"]
    n_truth = sum(len(line.split(",")) > 1 for f in sorted((out / "synth_test").glob("*.csv"))
                  if f.name != "hard_negatives.csv" for line in f.read_text().splitlines())
    assert result["cascade"]["tp"] + result["cascade"]["fn"] == n_truth
    detections = out / "detections"
    header = (detections / "detections.csv").read_text().splitlines()[0]
    assert header == "image,x,y,x1,y1,x2,y2,det_score,cls_score,accepted"
    geo = json.loads((detections / "detections.geojson").read_text())
    assert geo["type"] == "FeatureCollection"
    assert len(list((detections / "overlays").iterdir())) == 2
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert "mining" in manifest
    assert any("cascade (det >= " in line for line in lines)
    assert "stage1_merged" in result
    # Built aside and renamed: nothing else beside it, nothing recorded under the temporary name.
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    recorded = " ".join(p.read_text() for p in out.rglob("*.json"))
    assert ".tmp-" not in recorded and str(out.resolve()) in recorded
    # The thresholds travel with the runs; the last lines say how to use them.
    saved = json.loads((out / "thresholds.json").read_text())
    chosen = result["thresholds"]["cascade"]
    assert (saved["det_threshold"], saved["cls_threshold"], saved["merge_px"]) == (
        chosen["det_threshold"], chosen["cls_threshold"], 30.0)
    assert saved["written_by"] == "focas-keras demo" and saved["chosen_on"]["format"] == "synth"
    assert saved["chosen_on"]["images"] == sorted(manifest["splits"]["val"]["images"])
    assert result["runs"] == {"det": str(out / "mdet"), "cls": str(out / "mclass")}
    assert any(str(out / "mdet") in line and str(out / "mclass") in line for line in lines)
    command = result["reproduce"]["detect"]
    assert f"  {command}" in lines and f"  {result['reproduce']['evaluate']}" in lines
    assert command == (f"focas-keras detect {out / 'synth_test'} --det {out / 'mdet'} --cls "
                       f"{out / 'mclass'} --thresholds {out / 'thresholds.json'} --out "
                       f"{out / 'detections_again'}")
    # ... and that line gives the demo's held-out detections again.
    from click.testing import CliRunner

    from focas_keras.cli import main

    ran = CliRunner().invoke(main, shlex.split(command)[1:] + ["--no-overlays"])
    assert ran.exit_code == 0, ran.output
    assert "warning" not in ran.stderr  # the file names these very runs
    pd.testing.assert_frame_equal(pd.read_csv(out / "detections_again" / "detections.csv"),
                                  pd.read_csv(detections / "detections.csv"))
    evaluated = CliRunner().invoke(main, shlex.split(result["reproduce"]["evaluate"])[1:]
                                   + ["--json"])
    assert evaluated.exit_code == 0, evaluated.output
    scored = json.loads(evaluated.output)
    assert [scored[k] for k in ("tp", "fp", "fn")] == [result["cascade"][k]
                                                       for k in ("tp", "fp", "fn")]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_demo_leaves_the_old_directory_untouched(tmp_path, monkeypatch, error):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("an earlier demo")
    started = []

    def failing_prepare(*args, **kwargs):  # after the synthesis: the demo is half built
        started.append(sorted(p.name for p in tmp_path.iterdir()))
        raise error

    monkeypatch.setattr("focas_keras.datasets.prepare.prepare", failing_prepare)
    with pytest.raises(type(error)):
        run_demo(out, images=2, size=256, test_images=2, overwrite=True, echo=lambda line: None)
    assert len(started[0]) == 2  # the demo was being built beside it...
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # ...and is gone
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert (out / "notes.txt").read_text() == "an earlier demo"


def test_demo_refuses_a_non_empty_directory_without_overwrite(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="exists and is not empty"):
        run_demo(out, images=2, size=256, test_images=2, echo=lambda line: None)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
