"""(CBAM-)ResNet / ResNeXt backbone with BatchNorm or GroupNorm(+WS), as a functional model.

Mdet's backbone is ``build_backbone(depth=50, norm="gn", ws=True, cbam=True)``: a
ResNet-50 (v1.5: the stride of a down-sampling bottleneck sits on its 3x3 conv) whose
convolutions are `WSConv2D`, whose normalisation is GroupNorm with 32 groups and whose
residual blocks each end with a `CBAM` module (after the last conv + norm, before the add).

Layer names are deterministic so that weight files can be matched by name::

    stem_conv, stem_norm, stem_relu, stem_pool,
    stage{s}_block{b}_conv{i}, stage{s}_block{b}_norm{i}, stage{s}_block{b}_relu{i},
    stage{s}_block{b}_shortcut_conv, stage{s}_block{b}_shortcut_norm,
    stage{s}_block{b}_cbam, stage{s}_block{b}_add, stage{s}_block{b}_out

with ``s`` in 2..5 (the stage producing ``C{s}``, stride ``2**s``) and ``b``, ``i`` from 1.

Parameter count: with ``norm="bn", ws=False, cbam=False, width=1`` the depth-50 model has
23,561,152 parameters (trainable + BN moving statistics), which is exactly
``keras.applications.ResNet50(include_top=False, weights=None).count_params()``
(23,587,712) minus the 26,560 conv biases that the Keras model carries and this one drops
(every conv here is followed by a norm). The v1 / v1.5 stride placement does not change it.
"""

from __future__ import annotations

import math

import keras

from focas_keras.layers.cbam import CBAM
from focas_keras.layers.group_norm import GroupNorm
from focas_keras.layers.ws_conv2d import WSConv2D

_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
_BOTTLENECK = {18: False, 34: False, 50: True, 101: True}
_NORM_EPS = 1e-5
_BN_MOMENTUM = 0.9


def round_channels(channels, divisor=8):
    """Rounds ``channels`` to the nearest multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(channels / divisor + 0.5) * divisor)


def gn_group_count(channels, gn_groups):
    """Largest divisor of ``channels`` that is <= ``gn_groups``."""
    for g in range(min(gn_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class _Builder:
    """Creates the named layers of one backbone (conv / norm / activation factories)."""

    def __init__(self, norm, ws, cbam, gn_groups):
        self.norm, self.ws, self.cbam, self.gn_groups = norm, ws, cbam, gn_groups

    def conv(self, x, filters, kernel, strides, name, groups=1):
        cls = WSConv2D if self.ws else keras.layers.Conv2D
        return cls(filters, kernel, strides=strides, padding="same", groups=groups,
                   use_bias=False, kernel_initializer="he_normal", name=name)(x)

    def normalize(self, x, name):
        if self.norm == "bn":
            layer = keras.layers.BatchNormalization(
                momentum=_BN_MOMENTUM, epsilon=_NORM_EPS, name=name)
        else:
            layer = GroupNorm(
                groups=gn_group_count(int(x.shape[-1]), self.gn_groups), epsilon=_NORM_EPS,
                name=name)
        return layer(x)

    def conv_norm(self, x, filters, kernel, strides, prefix, index, relu, groups=1):
        x = self.conv(x, filters, kernel, strides, f"{prefix}_conv{index}", groups)
        x = self.normalize(x, f"{prefix}_norm{index}")
        if relu:
            x = keras.layers.ReLU(name=f"{prefix}_relu{index}")(x)
        return x

    def finish(self, x, shortcut, in_channels, out_channels, strides, prefix):
        """CBAM on the residual branch, projection shortcut if needed, add, ReLU."""
        if self.cbam:
            x = CBAM(name=f"{prefix}_cbam")(x)
        if strides != 1 or in_channels != out_channels:
            shortcut = self.conv(shortcut, out_channels, 1, strides, f"{prefix}_shortcut_conv")
            shortcut = self.normalize(shortcut, f"{prefix}_shortcut_norm")
        x = keras.layers.Add(name=f"{prefix}_add")([shortcut, x])
        return keras.layers.ReLU(name=f"{prefix}_out")(x)

    def basic_block(self, x, filters, strides, prefix):
        in_channels = int(x.shape[-1])
        y = self.conv_norm(x, filters, 3, strides, prefix, 1, relu=True)
        y = self.conv_norm(y, filters, 3, 1, prefix, 2, relu=False)
        return self.finish(y, x, in_channels, filters, strides, prefix)

    def bottleneck_block(self, x, mid, out, strides, prefix, groups=1):
        in_channels = int(x.shape[-1])
        y = self.conv_norm(x, mid, 1, 1, prefix, 1, relu=True)
        y = self.conv_norm(y, mid, 3, strides, prefix, 2, relu=True, groups=groups)
        y = self.conv_norm(y, out, 1, 1, prefix, 3, relu=False)
        return self.finish(y, x, in_channels, out, strides, prefix)


def stage_channels(depth=50, width=1.0, resnext=False, groups=32):
    """Per-stage (bottleneck/inner channels, output channels) for stages 2..5.

    Returns:
        list of 4 ``(mid, out)`` int pairs. For basic blocks ``mid == out``.
    """
    if resnext:
        # ResNeXt {groups}x4d: inner width groups * 4 * 2**i, a multiple of `groups`.
        divisor = math.lcm(8, groups)
        mids = [round_channels(groups * 4 * 2 ** i * width, divisor) for i in range(4)]
    else:
        mids = [round_channels(64 * 2 ** i * width) for i in range(4)]
    if _BOTTLENECK[depth]:
        outs = [round_channels(256 * 2 ** i * width) for i in range(4)]
    else:
        outs = list(mids)
    return list(zip(mids, outs))


def build_backbone(
    depth=50,
    norm="gn",
    ws=True,
    cbam=True,
    width=1.0,
    resnext=False,
    groups=32,
    gn_groups=32,
    input_shape=(None, None, 3),
    name=None,
) -> keras.Model:
    """Builds a (CBAM-)ResNet / ResNeXt feature extractor.

    The model takes already-normalised float images (whatever normalisation the weights
    were trained with, e.g. per-channel mean/std); it contains no preprocessing layer.

    Architecture: stem ``7x7/2 conv (64 * width) -> norm -> ReLU -> 3x3/2 max pool``
    (``"same"`` padding), then four stages of residual blocks. The first block of stages
    3, 4 and 5 down-samples with stride 2 on its 3x3 conv (ResNet v1.5) and a ``1x1/2``
    projection shortcut + norm; any block whose channel count changes also gets a
    (stride-1) projection shortcut. Every conv has no bias (all are followed by a norm).

    Args:
        depth: 18 or 34 (basic blocks, 2-2-2-2 / 3-4-6-3) or 50 or 101 (bottleneck blocks,
            3-4-6-3 / 3-4-23-3).
        norm: ``"gn"`` (:class:`GroupNorm`, a faster `keras.layers.GroupNormalization`) or ``"bn"``
            (`keras.layers.BatchNormalization`); epsilon 1e-5 for both.
        ws: use `WSConv2D` (weight standardisation) for every conv, stem included;
            otherwise `keras.layers.Conv2D`.
        cbam: add a `CBAM` module at the end of every residual branch.
        width: channel multiplier; counts are rounded to a multiple of 8 (min 8).
        resnext: ResNeXt ``{groups}x4d`` bottlenecks (depth 50 / 101 only): inner width
            ``groups * 4 * 2**i * width`` (128, 256, 512, 1024 for 32x4d, rounded to a
            multiple of ``lcm(8, groups)``) with a grouped 3x3 conv; outputs as ResNet.
        groups: cardinality of the ResNeXt grouped convs (ignored unless ``resnext``).
        gn_groups: GroupNorm groups; a layer whose channels are not divisible by it uses
            the largest divisor of its channel count that is <= ``gn_groups``.
        input_shape: ``(H, W, C)`` of the input, ``None`` for unknown sizes.
        name: model name; default ``"resnet{depth}"`` / ``"resnext{depth}"`` with
            ``"_cbam"`` / ``"_gn"`` / ``"_ws"`` suffixes.

    Returns:
        A functional `keras.Model` mapping float ``[B, H, W, C]`` to the dict
        ``{"C2": [B, ceil(H/4), ceil(W/4), c2], "C3": [.., ceil(H/8), ..],
        "C4": [.., ceil(H/16), ..], "C5": [.., ceil(H/32), ..]}`` with channels ``c2..c5``
        = 256, 512, 1024, 2048 (depth >= 50) or 64, 128, 256, 512 (depth < 50), times
        ``width``. (The ceil sizes hold for every input size: all convs and the pool use
        ``"same"`` padding.)
    """
    if depth not in _BLOCKS:
        raise ValueError(f"`depth` must be one of {sorted(_BLOCKS)}, got {depth}.")
    if norm not in ("bn", "gn"):
        raise ValueError(f"`norm` must be 'bn' or 'gn', got {norm!r}.")
    if resnext and not _BOTTLENECK[depth]:
        raise ValueError(f"`resnext=True` needs depth 50 or 101, got {depth}.")
    if width <= 0 or groups < 1 or gn_groups < 1:
        raise ValueError(
            f"`width`, `groups` and `gn_groups` must be positive, got {width}, {groups}, "
            f"{gn_groups}.")
    if name is None:
        name = f"{'resnext' if resnext else 'resnet'}{depth}"
        name += "".join(s for s, on in (("_cbam", cbam), ("_gn", norm == "gn"), ("_ws", ws))
                        if on)

    b = _Builder(norm, ws, cbam, gn_groups)
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = b.conv(inputs, round_channels(64 * width), 7, 2, "stem_conv")
    x = b.normalize(x, "stem_norm")
    x = keras.layers.ReLU(name="stem_relu")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)

    outputs = {}
    for i, (blocks, (mid, out)) in enumerate(zip(_BLOCKS[depth],
                                                  stage_channels(depth, width, resnext,
                                                                 groups))):
        stage = i + 2
        for j in range(blocks):
            strides = 2 if (j == 0 and stage > 2) else 1
            prefix = f"stage{stage}_block{j + 1}"
            if _BOTTLENECK[depth]:
                x = b.bottleneck_block(x, mid, out, strides, prefix,
                                       groups=groups if resnext else 1)
            else:
                x = b.basic_block(x, out, strides, prefix)
        outputs[f"C{stage}"] = x
    return keras.Model(inputs, outputs, name=name)
