"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" edge variant) as a functional Keras model.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish, and with the stem (32 channels) and head (1280) not scaled: a 3x3 stride-2 stem, 16
MBConv blocks (inverted residual bottlenecks: 1x1 expand, depthwise kxk, 1x1 project, a skip
where stride is 1 and the channels do not change), a 1x1 head conv, then (``include_top``)
global average pooling, dropout and a 1000-way classifier. 4,652,008 parameters with the
classifier (plus 42,016 BatchNorm moving statistics).

Every conv uses TensorFlow's ``"same"`` padding (``keras.layers.Conv2D(padding="same")``):
for stride 2 the extra row / column of padding goes at the bottom / right. That is what the
original TensorFlow model and the PyTorch port the weights come from (static "same" padding,
``Conv2dStaticSamePadding`` at 224 px) do; symmetric padding would shift every stride-2
output by half a pixel. BatchNorm uses the weights' epsilon 1e-3 and momentum 0.99 (PyTorch
momentum 0.01).

The network expects RGB scaled as in its ImageNet training, ``(x - 127) / 128`` for ``x`` in
0..255; :func:`input_normalization` is that map for images in ``[0, 1]``.

Layer names (matched to the PyTorch keys by
:func:`~focas_keras.models.lite0_weights.keras_targets`)::

    stem_conv, stem_bn, stem_relu,
    block{i}_expand_conv, block{i}_expand_bn, block{i}_expand_relu   (i > 0: expand ratio 6)
    block{i}_dw_conv, block{i}_dw_bn, block{i}_dw_relu,
    block{i}_project_conv, block{i}_project_bn, block{i}_add         (add: skip blocks only)
    head_conv, head_bn, head_relu, [pool, dropout, fc]

with ``i`` = 0..15 (the index of ``_blocks.{i}`` in the PyTorch state dict).
"""

from __future__ import annotations

import keras

_BN_EPSILON = 1e-3
_BN_MOMENTUM = 0.99
#: ``(repeats, kernel, stride, expand ratio, output channels)`` per stage (B0's, no SE).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
#: The block whose output is ``C3`` (stride 8, 40 ch) and ``C4`` (stride 16, 112 ch).
_LEVEL_BLOCKS = {"C3": 4, "C4": 10}
#: ImageNet training's input scaling: ``(x - 127) / 128`` for x in 0..255.
INPUT_MEAN, INPUT_STD = 127.0, 128.0


def block_layout() -> list:
    """The 16 MBConv blocks in order: dicts with ``kernel, stride, expand, in, out``."""
    blocks, channels = [], STEM_CHANNELS
    for repeats, kernel, stride, expand, out in STAGES:
        for j in range(repeats):
            blocks.append({"kernel": kernel, "stride": stride if j == 0 else 1,
                           "expand": expand, "in": channels, "out": out})
            channels = out
    return blocks


def input_normalization(name: str = "rescale") -> keras.layers.Layer:
    """Maps float RGB in ``[0, 1]`` to the network's input scale ``(255 x - 127) / 128``."""
    return keras.layers.Rescaling(255.0 / INPUT_STD, offset=-INPUT_MEAN / INPUT_STD, name=name)


def _bn(x, name):
    return keras.layers.BatchNormalization(epsilon=_BN_EPSILON, momentum=_BN_MOMENTUM,
                                           name=name)(x)


def _relu6(x, name):
    return keras.layers.ReLU(max_value=6.0, name=name)(x)


def _mbconv(x, block: dict, name: str):
    """One inverted residual block (no squeeze-excitation)."""
    inputs = x
    mid = block["in"] * block["expand"]
    if block["expand"] != 1:
        x = keras.layers.Conv2D(mid, 1, padding="same", use_bias=False,
                                name=f"{name}_expand_conv")(x)
        x = _relu6(_bn(x, f"{name}_expand_bn"), f"{name}_expand_relu")
    x = keras.layers.DepthwiseConv2D(block["kernel"], strides=block["stride"], padding="same",
                                     use_bias=False, name=f"{name}_dw_conv")(x)
    x = _relu6(_bn(x, f"{name}_dw_bn"), f"{name}_dw_relu")
    x = keras.layers.Conv2D(block["out"], 1, padding="same", use_bias=False,
                            name=f"{name}_project_conv")(x)
    x = _bn(x, f"{name}_project_bn")
    if block["stride"] == 1 and block["in"] == block["out"]:
        x = keras.layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_efficientnet_lite0(include_top: bool = False, classes: int = 1000,
                             dropout: float = 0.2, input_shape=(None, None, 3),
                             name: str = "efficientnet_lite0") -> keras.Model:
    """Builds EfficientNet-Lite0 from Keras layers (randomly initialised).

    Load the ImageNet weights with
    :func:`~focas_keras.models.lite0_weights.load_lite0_weights`. The model is made of
    built-in Keras layers only, so it saves and loads (``safe_mode=True``) like any
    functional model.

    Args:
        include_top: end in global average pooling, dropout and a ``classes``-way Dense
            (logits); otherwise return the feature levels.
        classes: classifier outputs (1000 for the ImageNet weights).
        dropout: dropout rate before the classifier (0.2 in the original).
        input_shape: ``(H, W, 3)``; None for unknown sizes.
        name: model name.

    Returns:
        A functional `keras.Model` taking float ``[B, H, W, 3]`` already scaled by
        :func:`input_normalization`. Without top: the dict ``{"C3": [B, ceil(H/8),
        ceil(W/8), 40], "C4": [B, ceil(H/16), ceil(W/16), 112], "C5": [B, ceil(H/32),
        ceil(W/32), 1280]}`` (``C5`` is the head conv's ReLU6 output, the features the
        ImageNet classifier pools). With top: logits ``[B, classes]``.
    """
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = keras.layers.Conv2D(STEM_CHANNELS, 3, strides=2, padding="same", use_bias=False,
                            name="stem_conv")(inputs)
    x = _relu6(_bn(x, "stem_bn"), "stem_relu")
    outputs = {}
    for i, block in enumerate(block_layout()):
        x = _mbconv(x, block, f"block{i}")
        for level, index in _LEVEL_BLOCKS.items():
            if index == i:
                outputs[level] = x
    x = keras.layers.Conv2D(HEAD_CHANNELS, 1, padding="same", use_bias=False,
                            name="head_conv")(x)
    x = _relu6(_bn(x, "head_bn"), "head_relu")
    if not include_top:
        outputs["C5"] = x
        return keras.Model(inputs, outputs, name=name)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    logits = keras.layers.Dense(classes, dtype="float32", name="fc")(x)
    return keras.Model(inputs, logits, name=name)
