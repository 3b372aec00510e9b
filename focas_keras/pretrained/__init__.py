"""Pretrained cascades shipped inside the package (no download): find, verify and load them.

Each bundled model is a directory ``focas_keras/pretrained/<name>/`` holding the two training
runs it was made from (``det/`` and ``cls/``: ``model.keras``, ``config.json``, ``run.json``),
``card.json`` (what it was trained on, how, the thresholds to use, the cross-validated estimate,
the sha256 of every file, and reference detections on the bundled sample field) and the same
card for people, ``MODEL_CARD.md``. ``sample/`` holds one real field to try it on.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
from pathlib import Path

from focas_keras.errors import InputError

#: The model ``detect`` and ``export`` use when no ``--det``/``--cls`` is given.
DEFAULT = "icpr2012_cpu"
#: The bundled sample field (ICPR 2012 scanner A, A03_00) and its mitosis centroids.
SAMPLE = "A03_00.jpg"
CITATION = ("Roux L, Racoceanu D, Lomenie N, et al. Mitosis detection in breast cancer "
            "histological images. An ICPR 2012 contest. J Pathol Inform 2013;4:8.")


def _root() -> Path:
    return Path(str(importlib.resources.files(__name__)))


def names() -> list[str]:
    """The bundled models (directories with a ``card.json``), sorted."""
    root = _root()
    return sorted(p.name for p in root.iterdir() if (p / "card.json").is_file())


def model_dir(name: str = DEFAULT) -> Path:
    """The directory of bundled model ``name``; InputError when there is no such model."""
    path = _root() / name
    if not (path / "card.json").is_file():
        known = ", ".join(names()) or "none"
        raise InputError(f"no bundled model '{name}' (bundled: {known})")
    return path


def sample_field() -> Path:
    """The bundled real sample field (with its ``.csv`` of mitosis centroids beside it)."""
    return _root() / "sample" / SAMPLE


def load_card(name: str = DEFAULT) -> dict:
    """The ``card.json`` of a bundled model."""
    return json.loads((model_dir(name) / "card.json").read_text(encoding="utf-8"))


def verify(name: str = DEFAULT) -> None:
    """Checks every file the card lists against its sha256 (InputError naming the first bad
    one), so a damaged install is reported before it gives wrong detections."""
    from focas_keras.io import sha256_file

    root, card = model_dir(name), load_card(name)
    for relative, digest in sorted(card["files"].items()):
        path = root / relative
        if not path.is_file():
            raise InputError("bundled model file missing", path)
        if sha256_file(path) != digest:
            raise InputError("bundled model file fails its sha256 checksum", path)


@contextlib.contextmanager
def runs(name: str = DEFAULT):
    """``with runs() as (det_run, cls_run, card):`` the two run directories (verified)."""
    verify(name)
    root = model_dir(name)
    yield root / "det", root / "cls", load_card(name)


def settings_from_card(card: dict, **overrides):
    """:class:`~focas_keras.inference.cascade.CascadeSettings` with the card's thresholds, TTA
    and merge distance; ``overrides`` (not None) win."""
    from focas_keras.inference.cascade import CascadeSettings

    t = card["thresholds"]
    values = {"det_threshold": t["det_threshold"], "cls_threshold": t["cls_threshold"],
              "merge_px": t.get("merge_px", 30.0), "tta": bool(t.get("tta", False))}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return CascadeSettings(**values)


def load_cascade(name: str | None = None, **overrides):
    """The bundled cascade ``name`` (None: :data:`DEFAULT`), ready to run:
    :func:`focas_keras.inference.load_cascade` without runs (``overrides``: settings that
    replace the card's; None values are not given)."""
    from focas_keras.inference.loading import load_cascade

    return load_cascade(bundle=name, **overrides)


def reference_detections(bundle: Path, image_path: Path) -> dict:
    """What the cascade in ``bundle`` (card thresholds) accepts on one image: recorded in the
    card and checked by the tests (positions in px, scores)."""
    from focas_keras.datasets.annotations import load_image
    from focas_keras.inference.cascade import Cascade

    card = json.loads((Path(bundle) / "card.json").read_text(encoding="utf-8"))
    cascade = Cascade.from_runs(Path(bundle) / "det", Path(bundle) / "cls",
                                settings_from_card(card), which="model")
    table = cascade.run(load_image(image_path))
    accepted = table[table["accepted"]]
    return {"image": Path(image_path).name, "candidates": int(len(table)),
            "accepted": [[round(float(r.x), 3), round(float(r.y), 3), round(float(r.det_score), 6),
                          round(float(r.cls_score), 6)] for r in accepted.itertuples()],
            "columns": ["x", "y", "det_score", "cls_score"]}


def make_card(name: str, preset: str, seed: int, thresholds: dict, command: str,
              train_seconds: float, date: str, overrides: dict | None = None,
              selection: dict | None = None, domain: dict | None = None,
              extra_data: dict | None = None, scanners: dict | None = None) -> dict:
    """The machine-readable card of a model trained by ``experiments/train_bundled.py``.

    ``overrides``: {"train-det": [...], "train-cls": [...]} ``--set`` options given on top of
    the preset (named in the recipe text when there are any). ``selection``: None when all 15
    fields trained and the final weights ship; else ``{"val_slide": S, "det_epoch": e,
    "cls_epoch": e}``: slide S validated and the checkpoints selected on it ship.
    ``domain``: the model's domain block (pixel sizes and the training fields' colour
    statistics, :class:`focas_keras.domain.DomainCard`; ``experiments/domain_stats.py``
    computes it), which ``detect`` and ``slide`` check inputs against. ``overrides`` may also
    hold ``cls_preset`` (Mclass's preset, where it differs) and ``amibr`` ({"extra_share"}).
    ``extra_data``: a second training set (name, crops, scanners, licence, citation) whose
    crops joined Mclass's batches. ``scanners``: per-scanner estimates on held-out scanners
    ({scanner: {"recall", "fp_per_crop", ...}} and how they were measured under ``protocol``).

    ``thresholds``: the pair (``det_threshold``, ``cls_threshold``, ``tta``, ``oof_f1_at_pair``)
    and the CV (``cv``, its summary; ``cv_key``, the pooled row that estimates the recipe).
    A rule other than the best-F1 pair on pooled ICPR predictions also gives ``chosen_on``
    (what chose the pair), ``cv_rule`` (how each held-out slide's pair was chosen) and
    ``cv_pooled`` (the CV's pooled counts under that rule, replacing the ``cv_key`` row).
    """
    cv = thresholds["cv"]
    overrides = overrides or {}
    extra = [f"{k} --set {o}" for k in ("train-cls", "train-det") for o in overrides.get(k, [])]
    if overrides.get("cls_preset"):
        extra.append(f"Mclass preset '{overrides['cls_preset']}'")
    if overrides.get("amibr"):
        extra.append(f"AMi-Br crops in Mclass's batches (train.extra_share "
                     f"{overrides['amibr']['extra_share']:g})")
    if selection is None:
        split = "on all 15 fields with no validation split"
        steps = ("train-det, mine --keep-tp (every candidate on every field), train-cls; "
                 "final weights of both")
        weights = "final weights"
    else:
        split = (f"on the fields of 4 slides, slide {selection['val_slide']}'s fields "
                 "validating")
        steps = ("train-det selected on the whole validation fields, mine --keep-tp "
                 "--include-val (every candidate on every training field; the validation "
                 "fields' for selection only), train-cls selected by the cascade's F1 on the "
                 f"whole validation fields; selected checkpoints (Mdet epoch "
                 f"{selection['det_epoch']}, Mclass epoch {selection['cls_epoch']})")
        weights = "checkpoints selected on each fold's validation slide"
    card = {
        "name": name, "date": date, "preset": preset, "seed": seed,
        "data": {"name": "ICPR 2012 MITOSIS contest, scanner A (Aperio XT), 15 test HPFs",
                 "fields": 15, "mitoses": 101, "slides": ["A00", "A01", "A02", "A03", "A04"],
                 "licence": "research use; cite the contest paper", "citation": CITATION},
        "pixel_sizes_um": {"input": 0.2456, "mdet": 0.4912, "mclass_crops": 0.2456},
        "recipe": (f"the whole-field recipe {split}: prepare --det-grid at 0.4912 um/px "
                   "(Mdet) and 112 px patches at 0.2456 um/px (Mclass), "
                   f"{steps}; thresholds from the CV's pooled out-of-fold predictions of the "
                   f"{weights}"
                   + (f"; on top of preset '{preset}': {', '.join(extra)}" if extra else "")),
        "command": command,
        "train_seconds": train_seconds,
        "thresholds": {"det_threshold": thresholds["det_threshold"],
                       "cls_threshold": thresholds["cls_threshold"], "merge_px": 30.0,
                       "tta": thresholds["tta"],
                       "chosen_on": thresholds.get(
                           "chosen_on", "pooled out-of-fold predictions of the 5-fold "
                                        "leave-one-slide-out CV (all 101 mitoses)"),
                       "oof_f1_at_pair": thresholds["oof_f1_at_pair"]},
        "cv_estimate": {"protocol": f"leave-one-slide-out, 5 folds, the recipe with the "
                                    f"{weights} (as shipped), {cv_folds_text(cv)}, "
                                    + thresholds.get("cv_rule", "thresholds for each held-out "
                                                     "slide chosen on the other folds' pooled "
                                                     "out-of-fold predictions"),
                        "pooled": (dict(thresholds["cv_pooled"]) if "cv_pooled" in thresholds
                                   else cv["pooled"][thresholds["cv_key"]]),
                        "candidate_recall": cv["candidate_recall"]},
        "limits": ["one scanner (Aperio XT) and one tissue type (breast cancer, H&E) from one "
                   "lab: expect lower accuracy on other scanners, stains and tissues",
                   "15 fields, 101 mitoses: the CV estimate has wide error bars",
                   "trained on the bundled sample field itself: its detections are a "
                   "regression check, not evidence",
                   f"preset '{preset}' (sized for a 2-core CPU), not the paper's ResNet-50"],
    }
    card["overrides"] = {"train-det": list(overrides.get("train-det", [])),
                         "train-cls": list(overrides.get("train-cls", []))}
    options = {k: overrides[k] for k in ("cls_preset", "amibr") if overrides.get(k)}
    if options:
        card["recipe_options"] = options
    if extra_data is not None:
        card["data"]["extra"] = dict(extra_data)
        card["limits"][0] = ("Mdet learned from one scanner (Aperio XT); Mclass also from "
                             f"{len(extra_data['scanners'])} other scanners' mitoses "
                             f"({', '.join(extra_data['scanners'])}); expect lower accuracy "
                             "on other scanners, stains and tissues (estimates per scanner "
                             "below)")
    if scanners is not None:
        card["scanners"] = dict(scanners)
    if selection is not None:
        card["selection"] = dict(selection)
    if domain is not None:
        from focas_keras.domain import DomainCard

        DomainCard.from_dict(domain)  # refuses a malformed block before it ships
        card["domain"] = domain
    return card


def cv_folds_text(cv: dict) -> str:
    """What each CV fold trained on: ``recipe_cv.py --no-val`` records
    ``validation_slide: false`` (the 4 other slides train); otherwise 3 slides train and a
    4th validates."""
    if cv.get("validation_slide", True):
        return "each fold's models trained on 3 slides with a 4th validating"
    return "each fold's models trained on the other 4 slides (no validation slide)"


def card_markdown(card: dict) -> str:
    """``MODEL_CARD.md``: the card for people."""
    t, cv = card["thresholds"], card["cv_estimate"]
    p = cv["pooled"]
    trained = ("all 5 slides" if "selection" not in card else
               f"4 slides, {card['selection']['val_slide']} validating")
    lines = [
        f"# Model card: {card['name']}", "",
        f"FoCasNet cascade (Mdet + Mclass), preset `{card['preset']}`, seed {card['seed']}, "
        f"trained {card['date']} in {card['train_seconds'] / 60:.0f} min on a 2-core CPU.", "",
        "## Data", "",
        f"{card['data']['name']}: {card['data']['fields']} fields of 2084 x 2084 px, "
        f"{card['data']['mitoses']} mitoses (centroids), slides "
        f"{', '.join(card['data']['slides'])}. Licence: {card['data']['licence']}.", "",
        f"Cite: {card['data']['citation']}", "",
        *_extra_data_markdown(card),
        "## Pixel sizes", "",
        f"Input fields at {card['pixel_sizes_um']['input']} um/px; Mdet runs at "
        f"{card['pixel_sizes_um']['mdet']} um/px (the field shrunk 2x), Mclass scores 112 px "
        f"crops at {card['pixel_sizes_um']['mclass_crops']} um/px. Give `detect --mpp` for "
        "fields at another pixel size.", "",
        "## Recipe", "", card["recipe"] + ".", "",
        f"Reproduce: `{card['command']}`.", "",
        "## Thresholds", "",
        f"Stage 1 >= {t['det_threshold']:.4f}, Mclass >= {t['cls_threshold']:.4f}, merge "
        f"{t['merge_px']:g} px, Mclass TTA {'on' if t['tta'] else 'off'}; chosen on "
        f"{t['chosen_on']}.", "",
        "## Cross-validated estimate", "",
        f"{cv['protocol']}: TP {p['tp']}, FP {p['fp']}, FN {p['fn']}, precision "
        f"{p['precision']:.3f}, recall {p['recall']:.3f}, **F1 {p['f1']:.3f}**; stage-1 "
        f"candidates reach {cv['candidate_recall']:.3f} of the mitoses. This estimates the "
        f"recipe, not this model ({trained}).", "",
        *_domain_markdown(card.get("domain")),
        "## Known limits", ""] + [f"- {item}" for item in card["limits"]] + [
        "", "## Files (sha256)", ""] + [f"- `{k}`: `{v}`" for k, v in
                                         sorted(card["files"].items())]
    if "reference" in card:
        ref = card["reference"]
        lines += ["", f"Reference on the sample field `{ref['image']}`: {ref['candidates']} "
                      f"candidates, {len(ref['accepted'])} accepted (listed in card.json)."]
    return "\n".join(lines) + "\n"


def _extra_data_markdown(card: dict) -> list[str]:
    """The second training set and the held-out-scanner estimates (empty without them)."""
    lines = []
    extra = card["data"].get("extra")
    if extra:
        lines += [f"{extra['name']}: {extra['crops']} crops of mitoses from "
                  f"{', '.join(extra['scanners'])}, in Mclass's batches only. Licence: "
                  f"{extra['licence']}.", "", f"Cite: {extra['citation']}", ""]
    scanners = card.get("scanners")
    if scanners:
        lines += ["## Other scanners", "", scanners["protocol"], "",
                  "| held-out scanner | crops | recall | false positives per crop |",
                  "|---|---:|---:|---:|"]
        for name, row in sorted(scanners["held_out"].items()):
            lines.append(f"| {name} | {row['crops']} | {row['recall']:.3f} | "
                         f"{row['fp_per_crop']:.3f} |")
        lines.append("")
    return lines


def _domain_markdown(block: dict | None) -> list[str]:
    """The card's "Domain" section (empty without a domain block)."""
    if not block:
        return []
    from focas_keras import domain

    stain, mpp = block["stain"], block["stage_mpp"]
    lines = ["## Domain (what `detect` and `slide` check)", "",
             f"- Pixel size: stages trained at {', '.join(f'{k} {v:g}' for k, v in mpp.items())}"
             f" um/px; an input coarser than {min(mpp.values()):g} um/px by more than "
             f"{domain.MPP_TOLERANCE:.0%} is refused (`--allow-coarser` runs it, flagged).",
             f"- Stain: mean and spread over the {stain['fields']} training fields of "
             f"{', '.join(stain['features'])} (haematoxylin/eosin/DAB deconvolution and Macenko "
             f"stain vectors of the tissue pixels); an input further than {stain['limit']:g} "
             f"(RMS z-score) is flagged. Limit: {stain['limit_rule']}.",
             f"- Density: more than {domain.DENSITY_LIMIT_PER_MM2:g} mitoses per mm2 (with at "
             f"least {domain.DENSITY_MIN_COUNT}) is flagged as implausible.", ""]
    measured = block.get("measured")
    if measured:
        lines += [f"Measured `{measured['command']}` ({measured['date']}):", "",
                  *measured["table"], ""]
    return lines
