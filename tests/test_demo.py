"""The demo's pipeline end to end, at a reduced size."""

import json

from focas_keras.demo import run_demo


def test_demo_pipeline_reduced(tmp_path):
    lines = []
    result = run_demo(tmp_path / "demo", images=4, size=512, test_images=2, seed=0,
                      det_epochs=1, cls_epochs=1, echo=lines.append)
    out = tmp_path / "demo"
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
