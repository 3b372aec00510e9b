"""Writing, verifying and describing the TF Serving export (``focas-keras export``).

Layout (what ``tensorflow_model_server --model_config_file`` reads)::

    BASE/models.config                 model_config_list naming every model under BASE
    BASE/<name>/<version>/             the cascade (default name ``focasnet``)
    BASE/<det_name>/<version>/         Mdet alone (stage 1, tiled; default ``mdet``)
    BASE/<cls_name>/<version>/         Mclass alone (patches -> probabilities; ``mclass``)

One export writes the same version number for its three models: by default one above the
highest version any of them has. An existing version is never replaced. The SavedModels are
written and verified in a temporary directory under BASE and renamed into place only when
all three reproduce the Python cascade on a sample image, so a failed export leaves nothing.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from focas_keras.errors import InputError
from focas_keras.export.compare import SCORE_TOLERANCE, ExportError, compare_tables
from focas_keras.export.graph import (
    CASCADE_OUTPUTS, DEFAULT_SIGNATURE, IMAGES_KEY, PATCHES_KEY, CascadeGraph, GraphSettings,
    MclassGraph, MdetGraph, TiledStage1)

CONFIG_NAME = "models.config"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# --------------------------------------------------------------------------- layout


def versions(model_dir) -> list[int]:
    """The numeric version directories of one model directory, ascending."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir()
                  if p.is_dir() and p.name.isdigit())


def exported_models(base) -> dict:
    """``{name: [versions]}`` of the models under ``base`` (a version holds saved_model.pb)."""
    base = Path(base)
    found = {}
    if base.is_dir():
        for child in sorted(base.iterdir()):
            if child.is_dir() and not child.name.startswith("."):
                served = [v for v in versions(child)
                          if (child / str(v) / "saved_model.pb").is_file()]
                if served:
                    found[child.name] = served
    return found


def models_config_text(names, config_base: str = "/models") -> str:
    """TF Serving's ``model_config_list`` (protobuf text format) for ``names``.

    ``base_path`` is ``config_base/<name>``: the path of BASE *inside the server* (the
    ``tensorflow/serving`` container mounts it at ``/models``). No version policy is written,
    so the server serves the highest version of each model (its default, ``latest``).
    """
    lines = ["# Written by `focas-keras export`; rewritten by every export into this directory.",
             "model_config_list {"]
    for name in names:
        path = config_base.rstrip("/") + "/" + name
        lines += ["  config {", f'    name: "{name}"', f'    base_path: "{path}"',
                  '    model_platform: "tensorflow"', "  }"]
    return "\n".join(lines + ["}"]) + "\n"


def write_models_config(base, config_base: str = "/models") -> Path:
    """(Re)writes ``BASE/models.config`` listing every exported model; atomic."""
    base = Path(base)
    path = base / CONFIG_NAME
    tmp = base / (CONFIG_NAME + ".tmp")
    tmp.write_text(models_config_text(sorted(exported_models(base)), config_base),
                   encoding="utf-8")
    os.replace(tmp, path)
    return path


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InputError(f"{what} must be letters, digits, '_', '-', '.' (got {name!r})")
    return name


def choose_version(base, names, version=None) -> int:
    """The version to write: ``version`` when given (and no model has it yet), else one above
    the highest version any of ``names`` has under ``base``.

    Raises:
        InputError: ``version`` is not a positive integer or already exists for a model.
    """
    base = Path(base)
    if version is None:
        return 1 + max([0] + [v for name in names for v in versions(base / name)])
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InputError(f"version must be an integer >= 1, got {version!r}")
    for name in names:
        if (base / name / str(version)).exists():
            raise InputError(f"version {version} exists (versions are never overwritten; "
                             "omit --version to write the next one)", base / name / str(version))
    return version


def _place(staged: dict, base: Path, version: int) -> list:
    """Renames ``{name: staged dir}`` to ``base/name/version``; all or nothing."""
    placed = []
    try:
        for name, src in staged.items():
            (base / name).mkdir(parents=True, exist_ok=True)
            dest = base / name / str(version)
            if dest.exists():
                raise InputError(f"version {version} appeared while exporting", dest)
            os.rename(src, dest)
            placed.append((src, dest))
    except BaseException:
        for src, dest in reversed(placed):
            os.rename(dest, src)
        raise
    return [dest for _, dest in placed]


# --------------------------------------------------------------------------- building


def build_modules(cascade, settings: GraphSettings, names: dict) -> dict:
    """``{model name: tf.Module}`` for the cascade, Mdet alone and Mclass alone."""
    stage1 = TiledStage1(cascade.det_model, cascade.det_config, settings)
    return {names["cascade"]: CascadeGraph(stage1, cascade.cls_model, cascade.cls_config),
            names["det"]: MdetGraph(stage1),
            names["cls"]: MclassGraph(cascade.cls_model, cascade.cls_config, settings.max_pixels,
                                      tta=settings.tta)}


def save_module(module, path) -> None:
    """``tf.saved_model.save`` with the module's serving signatures."""
    import tensorflow as tf

    tf.saved_model.save(module, str(path), signatures=module.signatures())


# --------------------------------------------------------------------------- reference


def reference_table(cascade, image: np.ndarray, max_detections: int) -> pd.DataFrame:
    """The Python cascade's table as the export returns it: the ``max_detections`` best
    candidates by stage-1 score, the merge of accepted points redone among them (it is the
    same unless the image has more candidates than that)."""
    from focas_keras.inference.cascade import merge_points

    table = cascade.run(image).iloc[:max_detections].reset_index(drop=True)
    centres = table[["x", "y"]].to_numpy(np.float64)
    scores = table["cls_score"].to_numpy(np.float32)
    table["accepted"] = merge_points(centres, scores, scores >= np.float32(cascade.cls_threshold),
                                     cascade.settings.merge_px)
    return table


def image_cut(cascade, max_detections: int) -> int:
    """The most candidates the export returns for the image ``cascade`` ran on last:
    ``min(max_detections, its stage-1 candidate cap)`` (``max_detections`` before any run)."""
    info = getattr(cascade, "stage1_info", None)
    return int(max_detections if info is None else min(max_detections, info["cap"]))


def outputs_to_tables(outputs: dict) -> list[pd.DataFrame]:
    """Cascade signature outputs (numpy or tensors, batch B) -> B ``Cascade.run``-style tables.

    Columns :data:`~focas_keras.inference.cascade.RESULT_COLUMNS`; boxes turned from
    ``[ymin, xmin, ymax, xmax]`` to x1, y1, x2, y2; x, y = box centre.
    """
    from focas_keras.inference.cascade import RESULT_COLUMNS

    arrays = {key: np.asarray(outputs[key]) for key in CASCADE_OUTPUTS}
    tables = []
    for i, count in enumerate(arrays["num_detections"].reshape(-1)):
        count = int(count)
        boxes = arrays["detection_boxes"][i, :count].astype(np.float32).astype(np.float64)
        y1, x1, y2, x2 = boxes.reshape(-1, 4).T
        tables.append(pd.DataFrame({
            "x": (x1 + x2) / 2.0, "y": (y1 + y2) / 2.0, "x1": x1, "y1": y1, "x2": x2, "y2": y2,
            "det_score": arrays["detection_det_scores"][i, :count].astype(np.float64),
            "cls_score": arrays["detection_scores"][i, :count].astype(np.float64),
            "accepted": arrays["detection_classes"][i, :count].astype(np.int64) == 1,
        }, columns=RESULT_COLUMNS))
    return tables


def _stage1_table(boxes, scores) -> pd.DataFrame:
    """Stage-1 candidates as a :func:`compare_tables` table (no stage 2)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    return pd.DataFrame({"x1": boxes[:, 0], "y1": boxes[:, 1], "x2": boxes[:, 2],
                         "y2": boxes[:, 3], "det_score": np.asarray(scores, np.float64),
                         "cls_score": 0.0, "accepted": False})


def default_sample(tile: int, seed: int = 0) -> np.ndarray:
    """A synthetic H&E field of about 1.5 x 1.25 tiles, so the sample crosses tile borders."""
    from focas_keras.datasets.synth import synthesize_image

    size = (max(16, tile + tile // 2 + 5), max(16, tile + tile // 4 + 3))
    return synthesize_image(size, seed=seed).image


def verify(paths: dict, names: dict, cascade, settings: GraphSettings, image: np.ndarray,
           log=None) -> dict:
    """Reloads each SavedModel and compares it with the Python cascade on ``image``.

    ``cascade`` is the one the graphs were built from, so both run the same tiling,
    thresholds and TTA (``settings.tta``: the 8 rotations/flips averaged in both).

    The cascade is checked through ``serving_default`` (``serving_bytes`` runs the same
    per-image function after decoding); Mdet alone against ``Cascade.stage1``; Mclass alone
    against the Python stage 2 on crops around the candidates (or the image centre when there
    are none).

    Returns:
        ``{"candidates": n, "accepted": n}`` of the sample.

    Raises:
        ExportError (:mod:`focas_keras.export.compare`): the first mismatch.
    """
    import tensorflow as tf

    from focas_keras.inference.cascade import crop_patches

    d = settings.max_detections
    want = reference_table(cascade, image, d)
    cut = image_cut(cascade, d)
    loaded = tf.saved_model.load(str(paths[names["cascade"]]))
    got = outputs_to_tables(loaded.signatures[DEFAULT_SIGNATURE](
        **{IMAGES_KEY: tf.constant(image[None])}))[0]
    ties = compare_tables(got, want, f"{names['cascade']} ({DEFAULT_SIGNATURE})", settings,
                          cut)
    del loaded
    if log:
        log(f"verified {names['cascade']}: {len(want)} candidates, "
            f"{int(want['accepted'].sum())} accepted on the {image.shape[1]}x{image.shape[0]} "
            "sample, as the Python cascade"
            + (f" ({ties} near-tie differences let through)" if ties else ""))

    boxes, scores = cascade.stage1(image)
    boxes, scores = boxes[:d], scores[:d]
    loaded = tf.saved_model.load(str(paths[names["det"]]))
    out = loaded.signatures[DEFAULT_SIGNATURE](**{IMAGES_KEY: tf.constant(image[None])})
    count = int(out["num_detections"][0])
    compare_tables(_stage1_table(out["detection_boxes"][0, :count].numpy()[:, [1, 0, 3, 2]],
                                 out["detection_scores"][0, :count].numpy()),
                   _stage1_table(boxes, scores), names["det"], settings, cut)
    del loaded

    height, width = image.shape[:2]
    centres = ((boxes[:, :2] + boxes[:, 2:]) / 2.0)[:16] if len(boxes) else np.array(
        [[width / 2.0, height / 2.0]])
    patches = crop_patches(image, centres, cascade.patch)
    want_p = cascade.classify_patches(patches)
    loaded = tf.saved_model.load(str(paths[names["cls"]]))
    got_p = loaded.signatures[DEFAULT_SIGNATURE](**{PATCHES_KEY: tf.constant(patches)})
    err = float(np.max(np.abs(got_p["probabilities"].numpy() - want_p)))
    if not err <= SCORE_TOLERANCE:
        raise ExportError(f"{names['cls']}: probabilities differ from the Python Mclass by "
                          f"up to {err:.3g}")
    return {"candidates": int(len(want)), "accepted": int(want["accepted"].sum())}


# --------------------------------------------------------------------------- export


def export(cascade, base, name: str = "focasnet", det_name: str = "mdet",
           cls_name: str = "mclass", version=None, max_detections: int = 300,
           max_pixels: int = 25_000_000, sample=None, config_base: str = "/models",
           log=None) -> dict:
    """Exports the cascade, Mdet and Mclass as SavedModels in TF Serving's layout.

    Args:
        cascade: a tiled :class:`~focas_keras.inference.cascade.Cascade` (its resolved
            thresholds, patch, NMS IoU, tiling and merge distance are baked into the graphs).
        base: BASE directory (created if needed).
        name, det_name, cls_name: model names (directory names under BASE).
        version: the version to write (refused if any of the three has it); None: next free.
        max_detections: D, candidates returned per image.
        max_pixels: largest height x width a request may send.
        sample: uint8 RGB image for the self-check; None: a synthetic field.
        config_base: BASE's path inside the server, for ``models.config``.
        log: called with progress lines.

    Returns:
        ``{"version": v, "paths": {name: path}, "config": path, "check": {...}}``.

    Raises:
        InputError: bad names, settings or version.
        ExportError (:mod:`focas_keras.export.compare`): the self-check failed (nothing was
            written).
    """
    log = log or (lambda line: None)
    names = {"cascade": _check_name(name, "model name"),
             "det": _check_name(det_name, "Mdet model name"),
             "cls": _check_name(cls_name, "Mclass model name")}
    if len(set(names.values())) != 3:
        raise InputError(f"the three model names must differ, got {sorted(names.values())}")
    settings = GraphSettings.from_cascade(cascade, max_detections, max_pixels)
    base = Path(base)
    if base.exists() and not base.is_dir():
        raise InputError("export base exists and is not a directory", base)
    chosen = choose_version(base, names.values(), version)
    if sample is None:
        sample = default_sample(int(math.ceil(settings.tile / settings.det_scale)))
    sample = np.asarray(sample)
    if sample.dtype != np.uint8 or sample.ndim != 3 or sample.shape[2] != 3 or not sample.size:
        raise InputError(f"the sample must be a uint8 RGB image, got {sample.dtype} "
                         f"{sample.shape}")
    if sample.shape[0] * sample.shape[1] > max_pixels:
        raise InputError(f"the sample image is larger than --max-pixels ({max_pixels})")
    created_base = not base.exists()
    base.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=base))
    try:
        modules = build_modules(cascade, settings, names)
        staged = {}
        for model_name, module in modules.items():
            log(f"writing {model_name} ...")
            save_module(module, staging / model_name)
            staged[model_name] = staging / model_name
        check = verify(staged, names, cascade, settings, sample, log=log)
        placed = _place(staged, base, chosen)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for model_name in names.values():
            model_dir = base / model_name
            if model_dir.is_dir() and not any(model_dir.iterdir()):
                model_dir.rmdir()
        if created_base and base.is_dir() and not any(base.iterdir()):
            base.rmdir()
        raise
    shutil.rmtree(staging, ignore_errors=True)
    config = write_models_config(base, config_base)
    return {"version": chosen, "paths": {n: str(p) for n, p in zip(staged, placed)},
            "config": str(config), "check": check, "settings": settings}


# --------------------------------------------------------------------------- describing


def _shape_text(shape_proto) -> str:
    if shape_proto.unknown_rank:
        return "unknown_rank"
    return "(" + ", ".join(str(d.size) for d in shape_proto.dim) + ("," if len(
        shape_proto.dim) == 1 else "") + ")"


def describe(path) -> str:
    """The serving signatures of one SavedModel, like ``saved_model_cli show --all``.

    Reads ``saved_model.pb`` only (nothing is loaded or run).
    """
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    path = Path(path)
    proto = saved_model_pb2.SavedModel()
    try:
        proto.ParseFromString((path / "saved_model.pb").read_bytes())
    except OSError as err:
        raise InputError(f"not a SavedModel ({err.strerror or err})", path) from None
    lines = [f"{path}"]
    for meta in proto.meta_graphs:
        lines.append(f"  MetaGraphDef with tag-set: {', '.join(meta.meta_info_def.tags)}")
        for sig_name in sorted(meta.signature_def):
            sig = meta.signature_def[sig_name]
            if sig_name.startswith("__"):
                continue
            lines.append(f"  signature_def['{sig_name}']:")
            for kind, items in (("inputs", sig.inputs), ("outputs", sig.outputs)):
                for key in sorted(items):
                    info = items[key]
                    dtype = types_pb2.DataType.Name(info.dtype)
                    lines.append(f"    {kind}['{key}']: dtype {dtype} shape "
                                 f"{_shape_text(info.tensor_shape)} name {info.name}")
            lines.append(f"    method: {sig.method_name}")
    return "\n".join(lines)


def describe_base(base, names=None, version=None) -> str:
    """:func:`describe` for the newest (or the given) version of each model under BASE."""
    base = Path(base)
    found = exported_models(base)
    if not found:
        raise InputError("no exported models (no <name>/<version>/saved_model.pb)", base)
    names = list(names) if names else sorted(found)
    parts = []
    for name in names:
        if name not in found:
            raise InputError(f"no exported model '{name}'", base)
        chosen = found[name][-1] if version is None else version
        if chosen not in found[name]:
            raise InputError(f"model '{name}' has no version {chosen} "
                             f"(has {', '.join(map(str, found[name]))})", base)
        parts.append(f"{name} version {chosen}:\n" + describe(base / name / str(chosen)))
    return "\n".join(parts)


def format_summary(result: dict) -> str:
    """One paragraph on what an export wrote."""
    s = result["settings"]
    lines = [f"exported version {result['version']}:"]
    lines += [f"  {name}: {path}" for name, path in result["paths"].items()]
    lines.append(f"  config: {result['config']}")
    lines.append(f"  tile {s.tile} overlap {s.overlap}, stage-1 threshold {s.det_threshold:g}, "
                 f"NMS IoU {s.nms_iou:g}, patch {s.patch}, stage-2 threshold "
                 f"{s.cls_threshold:g}, merge {s.merge_px:g} px, at most {s.max_detections} "
                 f"detections, images up to {s.max_pixels} px"
                 + ("" if s.det_scale == 1.0 else f", stage 1 on images shrunk by {s.det_scale:g}")
                 + (", stage 2 averaged over 8 rotations/flips (TTA)" if s.tta else "")
                 + ("" if not s.per_area else
                    f", at most {s.max_candidates_per_mm2:g} candidates per mm^2 "
                    f"({s.tile_cap(0)} per tile of {s.det_mpp:g} um/px)"))
    return "\n".join(lines)

