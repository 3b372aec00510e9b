"""``focas-keras demo``'s default: the bundled pretrained cascade on the bundled real field.

One real ICPR 2012 HPF ships with the package (``focas_keras/pretrained/sample``) with its
mitosis centroids. The demo runs ``detect`` on it with the bundled model, scores the result
against those centroids (5 um, one-to-one) and prints what a pathologist reads first: the
count, the density per mm2, where the outputs are, and how far to trust it.
"""

from __future__ import annotations

from pathlib import Path

from focas_keras.datasets.annotations import ICPR2012_MPP


def run_sample_demo(out, overwrite: bool = False, echo=print) -> dict:
    """Runs the bundled cascade on the sample field into ``out``; returns the evaluation.

    Returns:
        ``evaluate``'s dict (tp, fp, fn, precision, recall, f1, ...) plus ``accepted``,
        ``area_mm2`` and ``model``.
    """
    from focas_keras import pretrained
    from focas_keras.evaluation import evaluate as ev
    from focas_keras.inference.outputs import detect_to_dir

    sample = pretrained.sample_field()
    card = pretrained.load_card()
    echo(f"bundled model {card['name']} on the real field {sample.name} (ICPR 2012, "
         f"scanner A, {ICPR2012_MPP} um/px)")
    cascade = pretrained.load_cascade()
    counts = detect_to_dir(cascade, [sample], out, overlays=True, progress=False,
                           overwrite=overwrite, extra={"bundled_model": card["name"]})
    truth = ev.read_truth(sample.with_suffix(".csv").parent, "icpr2012")
    truth = {k: v for k, v in truth.points.items() if k == sample.stem}
    preds = ev.read_predictions(Path(out) / "detections.csv")
    result = ev.evaluate(truth, preds, ev.DEFAULT_RADIUS_PX)
    row = counts.iloc[0]
    accepted = int(row["accepted"])
    area = float(row["area_mm2"]) if "area_mm2" in row else None
    density = f", {accepted / area:.0f} per mm2 over {area:.3f} mm2" if area else ""
    cv = card["cv_estimate"]["pooled"]
    echo(f"{accepted} mitoses found{density} ({int(row['candidates'])} stage-1 candidates "
         f"checked by Mclass)")
    echo(f"against the field's {len(next(iter(truth.values())))} annotated mitoses (within "
         f"5 um): {result['tp']} found, {result['fp']} false, {result['fn']} missed "
         f"(F1 {result['f1']:.2f})")
    echo(f"note: this field was among the 15 the model was trained on; on slides it had not "
         f"seen, cross-validation gives F1 {cv['f1']:.2f} (precision {cv['precision']:.2f}, "
         f"recall {cv['recall']:.2f}); see `focas-keras models`")
    echo(f"outputs in {out}: overlays/{sample.stem}.jpg (green = counted mitosis), "
         f"detections.csv, detections.geojson (QuPath), counts.csv")
    echo(f"your own fields: focas-keras detect FIELDS... --out RESULTS  (same model; --mpp if "
         f"not {ICPR2012_MPP} um/px)")
    echo("the synthetic training demo (train both stages from scratch): "
         "focas-keras demo --synthetic")
    return {**{k: result[k] for k in ("tp", "fp", "fn", "precision", "recall", "f1")},
            "accepted": accepted, "area_mm2": area, "model": card["name"]}
