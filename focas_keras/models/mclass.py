"""Mclass: FoCasNet's stage-2 patch classifier (mitosis vs not) and its helpers.

``build_mclass`` makes ``Rescaling([0, 1] -> [-1, 1]) -> ResNet (BatchNorm) -> global average
pooling -> [Dropout] -> Dense(1)``, or with ``model.backbone="efficientnet_lite0"``
``Rescaling([0, 1] -> (255 x - 127) / 128) -> EfficientNet-Lite0 (optionally from ImageNet
weights) -> ...`` the same head; the output is a logit. ``resize_patches`` and
``predict_proba`` turn candidate crops (112 px at test time) into probabilities, and
``load_init_weights`` initialises a model from a local ``.weights.h5`` file holding either a
whole Mclass or just its backbone (e.g. converted ImageNet ResNet-34 weights).
"""

from __future__ import annotations

import re
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

from focas_keras.errors import InputError
from focas_keras.models.backbone import build_backbone
from focas_keras.models.efficientnet_lite0 import build_efficientnet_lite0, input_normalization
from focas_keras.models.lite0_weights import load_lite0_weights
from focas_keras.models.mclass_config import MclassConfig


def build_mclass(config: MclassConfig) -> keras.Model:
    """Builds the Mclass model under the current global dtype policy.

    Args:
        config: its ``model`` section is used (backbone, depth, width, dropout, pretrained);
            ``input_size`` is the training size, but the model accepts any spatial size.

    Returns:
        A functional `keras.Model` named ``"mclass"`` mapping float32 RGB ``[B, S, S, 3]`` in
        ``[0, 1]`` to float32 logits ``[B, 1]`` (float32 also under mixed precision). Its
        layers: ``image`` (input), ``rescale``, ``backbone`` (the nested
        :func:`build_backbone` model, ``norm="bn"``, no WS, no CBAM; or the
        :func:`build_efficientnet_lite0` model without top, its ImageNet weights loaded when
        ``pretrained``), ``pool``, ``dropout`` (only when ``dropout > 0``) and ``logit``.

    Raises:
        InputError: ``pretrained`` names a missing or unreadable ``.pth``, or is True and the
            weights package is not installed.
    """
    m = config.model
    inputs = keras.Input(shape=(None, None, 3), dtype="float32", name="image")
    if m.backbone == "efficientnet_lite0":
        x = input_normalization("rescale")(inputs)
        backbone = build_efficientnet_lite0(name="backbone")
        if m.pretrained:
            load_lite0_weights(backbone, None if m.pretrained is True else m.pretrained)
        features = backbone(x)
    else:
        x = keras.layers.Rescaling(2.0, offset=-1.0, name="rescale")(inputs)
        features = build_backbone(m.depth, norm="bn", ws=False, cbam=False, width=m.width,
                                  name="backbone")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(features["C5"])
    if m.dropout > 0:
        x = keras.layers.Dropout(m.dropout, name="dropout")(x)
    logits = keras.layers.Dense(1, dtype="float32", name="logit")(x)
    return keras.Model(inputs, logits, name="mclass")


def _resize_float(images, size):
    """float32 ``[N, h, w, 3]`` -> ``[N, size, size, 3]`` (area down, bilinear up)."""
    h, w = images.shape[1], images.shape[2]
    if h is not None and w is not None:
        if h == size and w == size:
            return images
        method = "area" if h >= size and w >= size else "bilinear"
        return tf.image.resize(images, (size, size), method=method)
    shape = tf.shape(images)
    shrink = tf.logical_and(shape[1] >= size, shape[2] >= size)
    return tf.cond(shrink,
                   lambda: tf.image.resize(images, (size, size), method="area"),
                   lambda: tf.image.resize(images, (size, size), method="bilinear"))


def resize_patches(patches, size: int) -> tf.Tensor:
    """Scales patches to ``[0, 1]`` and resizes them to the model input size.

    Args:
        patches: uint8 ``[N, h, w, 3]`` (0..255) or float ``[N, h, w, 3]`` (already in
            ``[0, 1]``), any ``h``, ``w``; a NumPy array or a tensor.
        size: output side ``S``.

    Returns:
        float32 ``[N, S, S, 3]`` in ``[0, 1]``: area interpolation when shrinking (both sides
        >= ``S``), bilinear otherwise; the values unchanged when the size already matches.
    """
    patches = tf.convert_to_tensor(patches)
    if patches.shape.rank != 4:
        raise ValueError(f"patches must be [N, h, w, 3], got shape {patches.shape}.")
    if patches.dtype == tf.uint8:
        images = tf.cast(patches, tf.float32) / 255.0
    else:
        images = tf.cast(patches, tf.float32)
    return _resize_float(images, int(size))


def predict_proba(model, patches, size: int, batch_size: int = 256) -> np.ndarray:
    """Mitosis probabilities of patches, in batches.

    Args:
        model: an Mclass model (logits ``[B, 1]``).
        patches: uint8 or float ``[N, h, w, 3]`` (see :func:`resize_patches`); N may be 0.
        size: model input side the patches are resized to.
        batch_size: patches per forward pass.

    Returns:
        float32 ``[N]`` sigmoid of the logits, in ``[0, 1]``.
    """
    n = int(patches.shape[0])
    if n == 0:
        return np.zeros([0], np.float32)
    scores = []
    for start in range(0, n, batch_size):
        images = resize_patches(patches[start:start + batch_size], size)
        logits = model(images, training=False)
        scores.append(tf.sigmoid(tf.cast(logits, tf.float32))[:, 0].numpy())
    return np.concatenate(scores).astype(np.float32)


def predict_proba_tta(model, patches, size: int, batch_size: int = 256) -> np.ndarray:
    """:func:`predict_proba` averaged over the 8 dihedral transforms of each patch.

    Mitotic figures have no orientation in a section, so each rotation/flip is an equally
    valid view; averaging the 8 probabilities smooths out the classifier's
    orientation-specific errors, at 8x the cost. The transforms: ``np.rot90(p, k, axes=(1,
    2))`` for k = 0..3 of the patches ``p`` and of ``p[:, :, ::-1]`` (flipped left-right); a
    quarter turn swaps h and w, which :func:`resize_patches` then makes square again.

    Args:
        model, size, batch_size: as for :func:`predict_proba` (each transform runs in batches
            of ``batch_size``).
        patches: uint8 or float ``[N, h, w, 3]`` (NumPy); N may be 0.

    Returns:
        float32 ``[N]``, the mean of the 8 probabilities.
    """
    patches = np.asarray(patches)
    if patches.shape[0] == 0:
        return np.zeros([0], np.float32)
    views = [np.rot90(p, k, axes=(1, 2)) for p in (patches, patches[:, :, ::-1])
             for k in range(4)]
    probs = [predict_proba(model, np.ascontiguousarray(v), size, batch_size) for v in views]
    return np.mean(np.stack(probs), axis=0).astype(np.float32)


# --------------------------------------------------------------------------- weight files


class _Mismatch(Exception):
    """The first difference between a weights file and a model (message only)."""


def _file_layers(group):
    """``({layer id: h5 group}, by_name)`` for the layers under ``group['layers']``.

    The id is the layer name stored as the ``name`` attribute of each ``vars`` group; where
    the file has no such attributes (``by_name`` False) it is the group key (``conv2d_5``).
    """
    children = {key: child for key, child in group.get("layers", {}).items()
                if isinstance(child, h5py.Group)}
    names = {}
    for key, child in children.items():
        vars_group = child.get("vars")
        if isinstance(vars_group, h5py.Group) and "name" in vars_group.attrs:
            name = vars_group.attrs["name"]
            names[key] = name.decode() if isinstance(name, bytes) else str(name)
    by_name = bool(names)
    return {names.get(key, key) if by_name else key: child
            for key, child in children.items()}, by_name


def _layer_keys(model) -> list:
    """The group keys Keras gives ``model.layers`` in a weights file (``conv2d``, ``conv2d_1``).

    Snake-cased class name, numbered from the second layer of a class on.
    """
    keys, used = [], {}
    for layer in model.layers:
        base = re.sub(r"\W+", "", type(layer).__name__)
        base = re.sub(r"([a-z])([A-Z])", r"\1_\2",
                      re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", base)).lower()
        used[base] = used.get(base, -1) + 1
        keys.append(base if used[base] == 0 else f"{base}_{used[base]}")
    return keys


def _file_vars(layer_group) -> list:
    """The h5 datasets ``vars/0, vars/1, ...`` of one layer, in index order."""
    vars_group = layer_group.get("vars")
    if not isinstance(vars_group, h5py.Group):
        return []
    keys = sorted((k for k in vars_group if k.isdigit()), key=int)
    return [vars_group[k] for k in keys]


def _model_vars(layer) -> list:
    """What ``layer.save_own_variables`` writes: the layer's own variables, in order."""
    store = {}
    layer.save_own_variables(store)
    return [store[k] for k in sorted(store, key=int)]


def _is_nested(obj) -> bool:
    return isinstance(obj, keras.Model) or (isinstance(obj, h5py.Group) and "layers" in obj)


def _match(model, group, plan, prefix=""):
    """Compares the model's layers with a file level; appends ``(layer, arrays)`` to ``plan``.

    Raises:
        _Mismatch: the first difference, in model layer order, then extra file layers.
    """
    file_layers, by_name = _file_layers(group)
    seen = set()
    for layer, key in zip(model.layers, _layer_keys(model)):
        name = prefix + layer.name
        layer_id = layer.name if by_name else key
        entry = file_layers.get(layer_id)
        if _is_nested(layer):
            if entry is None or not _is_nested(entry):
                raise _Mismatch(f"sub-model '{name}' is in the model but not in the file")
            seen.add(layer_id)
            _match(layer, entry, plan, prefix=name + "/")
            continue
        wanted = _model_vars(layer)
        if entry is None:
            if wanted:
                raise _Mismatch(f"layer '{name}' is in the model but not in the file")
            continue
        seen.add(layer_id)
        if _is_nested(entry):
            raise _Mismatch(f"layer '{name}' is a sub-model in the file but not in the model")
        stored = _file_vars(entry)
        if len(stored) != len(wanted):
            raise _Mismatch(f"layer '{name}' has {len(stored)} variables in the file but "
                            f"{len(wanted)} in the model")
        for i, (data, var) in enumerate(zip(stored, wanted)):
            if tuple(data.shape) != tuple(var.shape):
                label = getattr(var, "name", None) or f"variable {i}"
                raise _Mismatch(f"layer '{name}' {label} has shape {tuple(data.shape)} in the "
                                f"file but {tuple(var.shape)} in the model")
        if wanted:
            plan.append((layer, [data[()] for data in stored]))
    extras = sorted((layer_id for layer_id, entry in file_layers.items()
                     if layer_id not in seen and (_is_nested(entry) or _file_vars(entry))),
                    key=_natural)
    if extras:
        more = f" (and {len(extras) - 1} more)" if len(extras) > 1 else ""
        raise _Mismatch(f"layer '{prefix}{extras[0]}'{more} is in the file but not in the model")


def _natural(name: str) -> list:
    """Sort key ordering embedded numbers by value (``stage2_block10`` after ``block9``)."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part)
            for part in re.split(r"(\d+)", name)]


def load_init_weights(model: keras.Model, path) -> str:
    """Initialises an Mclass model from a local Keras 3 ``.weights.h5`` file.

    Nothing is downloaded. The file is what ``some_model.save_weights(path)`` writes, for
    either a whole Mclass of the same architecture (everything is loaded) or a bare backbone
    (``build_backbone(depth, "bn", ws=False, cbam=False, width)``, e.g. converted ImageNet
    ResNet-34 weights; loaded into ``model.get_layer("backbone")``, the head keeps its
    initialisation). Whole-model matching is tried first.

    Supported layout (Keras 3 ``H5IOStore``): a root group holding ``layers/<key>/vars/<i>``
    datasets per layer (``<key>`` is the snake-cased class name plus a counter, e.g.
    ``conv2d_5``; the ``vars`` group's ``name`` attribute holds the layer name) and, for a
    nested functional model, ``layers/<key>/layers/...`` recursively. Layers are matched by
    that ``name`` attribute (by ``<key>`` where it is missing); layers without variables are
    ignored. Variables are assigned with each layer's ``load_own_variables``.

    Args:
        model: a model from :func:`build_mclass`.
        path: the weights file.

    Returns:
        ``"mclass"`` or ``"backbone"``: what the file held.

    Raises:
        InputError: the file is missing or not a Keras HDF5 weights file, or its layers do not
            match (the message names the first mismatching layer and shapes, and the file).
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("initial weights file not found", path)
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"not an HDF5 weights file ({error})", path) from None
    with handle:
        if not isinstance(handle.get("layers"), h5py.Group):
            raise InputError("not a Keras 3 weights file (no 'layers' group; write it with "
                             "model.save_weights('....weights.h5'))", path)
        backbone = model.get_layer("backbone")
        errors = {}
        for kind, target in (("mclass", model), ("backbone", backbone)):
            plan = []
            try:
                _match(target, handle, plan)
            except _Mismatch as mismatch:
                errors[kind] = str(mismatch)
                continue
            for layer, arrays in plan:
                layer.load_own_variables({str(i): a for i, a in enumerate(arrays)})
            return kind
        # A file with a nested sub-model is meant as a whole Mclass; otherwise as a backbone.
        nested = any(_is_nested(g) for g in _file_layers(handle)[0].values())
        kind = "mclass" if nested else "backbone"
        what = "an Mclass" if nested else "the Mclass backbone"
        raise InputError(f"weights do not fit {what}: {errors[kind]}", path)
