"""load_cascade: the cascade the commands build, built by the library (bundled model or runs,
thresholds file precedence, TTA default, model key)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402

from focas_keras import pretrained  # noqa: E402
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.inference import load_cascade  # noqa: E402
from focas_keras.inference.cascade import Cascade  # noqa: E402
from focas_keras.inference.loading import bundled_announcement, model_runs  # noqa: E402

CARD_THRESHOLDS = {"det_threshold": 0.3, "cls_threshold": 0.7, "merge_px": 28.0, "tta": True}


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A tiny train-det run (model.keras only) and a tiny train-cls run (model.keras, an
    other best.keras, best.json with a 0.62 best-F1 threshold)."""
    from focas_keras.models.mclass import build_mclass
    from focas_keras.models.mclass_config import preset as mclass_preset
    from focas_keras.models.mdet import build_mdet
    from focas_keras.models.mdet_config import preset as mdet_preset

    root = tmp_path_factory.mktemp("runs")
    det, cls_ = root / "det", root / "cls"
    det.mkdir()
    cls_.mkdir()
    det_config, cls_config = mdet_preset("tiny"), mclass_preset("tiny")
    (det / "config.json").write_text(det_config.to_json())
    (det / "run.json").write_text(json.dumps({"kind": "mdet"}))
    build_mdet(det_config).save(det / "model.keras")
    (cls_ / "config.json").write_text(cls_config.to_json())
    (cls_ / "run.json").write_text(json.dumps({"kind": "mclass"}))
    build_mclass(cls_config).save(cls_ / "model.keras")
    build_mclass(cls_config).save(cls_ / "best.keras")
    (cls_ / "best.json").write_text(json.dumps({"score": 0.9,
                                                "metrics": {"val_best_threshold": 0.62}}))
    return det, cls_


@pytest.fixture()
def bundle(tiny_runs, tmp_path, monkeypatch):
    """The tiny runs as the bundled model (its card: CARD_THRESHOLDS, sha256 of its files);
    each run also keeps a best.keras, which a bundle must not load."""
    root = tmp_path / "pretrained"
    for kind, run in zip(("det", "cls"), tiny_runs):
        shutil.copytree(run, root / "tiny_bundle" / kind)
    files = {f"{kind}/{name}": _sha256(root / "tiny_bundle" / kind / name)
             for kind in ("det", "cls") for name in ("model.keras", "config.json", "run.json")}
    card = {"name": "tiny_bundle", "cv_estimate": {"pooled": {"f1": 0.5}},
            "thresholds": dict(CARD_THRESHOLDS), "files": files}
    (root / "tiny_bundle" / "card.json").write_text(json.dumps(card))
    monkeypatch.setattr(pretrained, "_root", lambda: root)
    monkeypatch.setattr(pretrained, "DEFAULT", "tiny_bundle")
    return root / "tiny_bundle", card


@pytest.fixture()
def recorded(monkeypatch):
    """Cascade.from_runs replaced by a recorder of (det, cls, settings, which): for the
    precedence rules alone, without loading models."""
    seen = []

    class Loaded:
        def __init__(self, settings):
            self.settings = settings

    def from_runs(det, cls_, settings, which="best"):
        seen.append((det, cls_, settings, which))
        return Loaded(settings)

    monkeypatch.setattr(Cascade, "from_runs", staticmethod(from_runs))
    return seen


def _key(settings):
    return (settings.det_threshold, settings.cls_threshold, settings.merge_px, settings.tta)


def test_bundled_model_uses_its_card_and_final_weights(bundle):
    root, card = bundle
    lines = []
    cascade = load_cascade(announce=lines.append)
    assert lines == [bundled_announcement(card)] and "tiny_bundle" in lines[0]
    assert cascade.card == card
    assert (cascade.det_threshold, cascade.cls_threshold) == (0.3, 0.7)
    assert (cascade.settings.merge_px, cascade.settings.tta) == (28.0, True)  # TTA: the card's
    # Final weights whatever `which`: the key is model.keras's, not best.keras's.
    assert cascade.model_key == {"det": _sha256(root / "det" / "model.keras"),
                                 "cls": _sha256(root / "cls" / "model.keras")}
    assert cascade.model_key["cls"] != _sha256(root / "cls" / "best.keras")
    assert (cascade.runs.det, cascade.runs.cls) == (root / "det", root / "cls")
    assert cascade.thresholds_file is None
    off = pretrained.load_cascade(tta=False, det_threshold=0.2)  # the same call
    assert (off.settings.tta, off.det_threshold, off.cls_threshold) == (False, 0.2, 0.7)
    assert off.model_key == cascade.model_key


def test_a_damaged_bundle_is_refused_before_loading(bundle):
    root, _ = bundle
    with open(root / "cls" / "config.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(InputError, match="fails its sha256 checksum"):
        load_cascade()


def test_user_runs_tta_off_by_default_thresholds_from_the_runs(tiny_runs):
    det, cls_ = tiny_runs
    lines = []
    cascade = load_cascade(det, cls_, announce=lines.append)
    assert lines == [] and cascade.card is None and cascade.thresholds_file is None
    assert cascade.settings.tta is False and cascade.settings.merge_px == 30.0
    # det: no validation metrics, the config's 0.05; cls: best.json's best-F1 threshold.
    assert (cascade.det_threshold, cascade.cls_threshold) == (0.05, 0.62)
    assert cascade.model_key == {"det": _sha256(det / "model.keras"),  # no best.keras
                                 "cls": _sha256(cls_ / "best.keras")}
    final = load_cascade(str(det), str(cls_), which="model", tta=True, tile=64, overlap=16)
    assert final.model_key == {"det": _sha256(det / "model.keras"),
                               "cls": _sha256(cls_ / "model.keras")}
    assert final.model_key["cls"] != cascade.model_key["cls"]
    assert (final.settings.tta, final.settings.tile, final.settings.overlap) == (True, 64, 16)


def test_one_run_only_or_an_unknown_setting_is_an_input_error(tiny_runs, recorded):
    det, cls_ = tiny_runs
    for kwargs in (dict(det=det), dict(cls=cls_)):
        with pytest.raises(InputError, match="give both --det and --cls, or neither"):
            load_cascade(**kwargs)
        with pytest.raises(InputError, match="give both"):
            model_runs(**kwargs)
    with pytest.raises(InputError, match="unknown cascade setting.*det_treshold"):
        load_cascade(det, cls_, det_treshold=0.3)
    assert recorded == []  # nothing was loaded


def test_thresholds_file_precedence(tiny_runs, bundle, recorded, tmp_path):
    det, cls_ = tiny_runs
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"det_threshold": 0.12, "cls_threshold": 0.66, "merge_px": 25,
                                "tta": True, "chosen_on": {"images": ["v1"]}}))
    # User runs: the file's four values replace the defaults.
    cascade = load_cascade(det, cls_, path)
    assert _key(recorded[-1][2]) == (0.12, 0.66, 25.0, True) and recorded[-1][3] == "best"
    assert cascade.thresholds_file == {
        "path": str(path), "sha256": _sha256(path), "chosen_on": {"images": ["v1"]},
        "used": {"det_threshold": 0.12, "cls_threshold": 0.66, "merge_px": 25, "tta": True},
        "command_line_won": []}
    # Values given win over the file.
    cascade = load_cascade(det, cls_, path, tta=False, cls_threshold=0.9, merge_px=30.0)
    assert _key(recorded[-1][2]) == (0.12, 0.9, 30.0, False)
    assert cascade.thresholds_file["command_line_won"] == ["cls_threshold", "merge_px", "tta"]
    # None means "not given": the file still sets it.
    load_cascade(det, cls_, path, tta=None, merge_px=None, det_threshold=None)
    assert _key(recorded[-1][2]) == (0.12, 0.66, 25.0, True)
    # Bundled model: the file's pair over the card; the card keeps what the file lacks.
    pair = tmp_path / "pair.json"
    pair.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.4}))
    cascade = load_cascade(thresholds=pair)
    assert _key(recorded[-1][2]) == (0.1, 0.4, 28.0, True) and recorded[-1][3] == "model"
    assert cascade.card["name"] == "tiny_bundle"
    assert cascade.thresholds_file["used"] == {"det_threshold": 0.1, "cls_threshold": 0.4}
    load_cascade(thresholds=pair, det_threshold=0.2)
    assert _key(recorded[-1][2]) == (0.2, 0.4, 28.0, True)
    # No file: the card's four values.
    load_cascade()
    assert _key(recorded[-1][2]) == tuple(CARD_THRESHOLDS.values())


def test_thresholds_file_of_other_runs_warns(tiny_runs, recorded, tmp_path):
    det, cls_ = tiny_runs
    path = tmp_path / "t.json"
    chosen = {"detect": {"runs": {"det": "/elsewhere/mdet", "cls": "/elsewhere/mclass"}}}
    path.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.5,
                                "chosen_on": chosen}))
    warnings = []
    load_cascade(det, cls_, path, warn=warnings.append)
    assert warnings == [f"{path} was chosen on the candidates of --det /elsewhere/mdet --cls "
                        "/elsewhere/mclass, not of these runs; its thresholds may not fit them"]
    chosen["detect"]["runs"] = {"det": str(det.resolve()), "cls": str(cls_.resolve())}
    path.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.5,
                                "chosen_on": chosen}))
    warnings.clear()
    load_cascade(det, cls_, path, warn=warnings.append)
    assert warnings == []
    with pytest.warns(UserWarning, match="was chosen on the candidates"):
        path.write_text(json.dumps({"det_threshold": 0.1, "cls_threshold": 0.5,
                                    "chosen_on": {"detect": {"runs": {"det": "/x"}}}}))
        load_cascade(det, cls_, path)


def test_model_runs_names_the_runs_without_loading(bundle, tiny_runs, recorded):
    root, card = bundle
    source = model_runs()
    assert (source.det, source.cls, source.card, source.bundled) == (
        root / "det", root / "cls", card, True)
    det, cls_ = tiny_runs
    source = model_runs(str(det), str(cls_))
    assert (source.det, source.cls, source.card, source.bundled) == (det, cls_, None, False)
    assert recorded == []
