"""Feature Pyramid Network (Lin et al., 2017) with RetinaNet-style extra levels."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="focas_keras")
class FPN(keras.layers.Layer):
    """Builds pyramid levels ``P{min_level}..P{max_level}`` from backbone levels ``C*``.

    For the input levels ``l >= min_level``: a lateral 1x1 conv maps ``C_l`` to ``channels``;
    going top-down, the merged map of level ``l + 1`` is upsampled x2 (nearest), cropped to
    the lateral's spatial size (they differ by one row / column when the input size is not a
    multiple of ``2**(l+1)``) and added to the lateral; each merged map then goes through a
    3x3 output conv, giving ``P_l``. Levels above the highest input level ``L`` come from
    stride-2 3x3 convs: the first from ``P_L`` (``extra_from="p5"``) or from ``C_L``
    (``extra_from="c5"``), each next one from the previous extra level, through a ReLU if
    ``use_relu_between_extra`` (RetinaNet: ``P6 = conv(C5 or P5)``, ``P7 = conv(ReLU(P6))``).
    Input levels below ``min_level`` are accepted and ignored; levels of the top-down
    path above ``max_level`` are computed (they feed the lower ones) but not returned.

    All convs use ``"same"`` padding and bias, so for an image of ``H x W`` pixels whose
    ``C_l`` are ``ceil(H / 2**l) x ceil(W / 2**l)``, every ``P_l`` is too.

    Layer names: ``lateral_c{l}``, ``output_p{l}``, ``extra_p{l}``.

    Args:
        channels: int, channels of every output level (default 256).
        min_level: int, lowest output level (default 3); must be one of ``input_levels``.
        max_level: int, highest output level (default 7), ``>= min_level``.
        input_levels: contiguous increasing ints, the ``C`` levels fed in (default 3, 4, 5).
        extra_from: ``"p5"`` or ``"c5"``: whether the first level above the highest input
            level is computed from that input level's pyramid output or its raw input.
        use_relu_between_extra: ReLU before each extra conv after the first (default True).
        kernel_initializer: initializer of every conv kernel.
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Call args:
        inputs: dict ``{"C{l}": [B, H_l, W_l, C_in_l]}`` for every ``l`` in
            ``input_levels`` (extra keys are ignored).

    Returns:
        dict ``{"P{l}": [B, H_l, W_l, channels]}`` for ``l`` in ``min_level..max_level``.
    """

    def __init__(
        self,
        channels=256,
        min_level=3,
        max_level=7,
        input_levels=(3, 4, 5),
        extra_from="p5",
        use_relu_between_extra=True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        input_levels = tuple(int(level) for level in input_levels)
        if not input_levels or list(input_levels) != list(
                range(input_levels[0], input_levels[0] + len(input_levels))):
            raise ValueError(
                f"`input_levels` must be contiguous and increasing, got {input_levels}.")
        if min_level not in input_levels:
            raise ValueError(
                f"`min_level` ({min_level}) must be one of `input_levels` {input_levels}.")
        if max_level < min_level:
            raise ValueError(f"`max_level` ({max_level}) < `min_level` ({min_level}).")
        if extra_from not in ("p5", "c5"):
            raise ValueError(f"`extra_from` must be 'p5' or 'c5', got {extra_from!r}.")
        self.channels = int(channels)
        self.min_level = int(min_level)
        self.max_level = int(max_level)
        self.input_levels = input_levels
        self.extra_from = extra_from
        self.use_relu_between_extra = bool(use_relu_between_extra)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        self._top = max(input_levels)
        # Levels of the top-down path: from min_level up to the highest input level.
        self._td_levels = list(range(self.min_level, self._top + 1))
        self._out_levels = [lv for lv in self._td_levels if lv <= self.max_level]
        self._extra_levels = list(range(self._top + 1, self.max_level + 1))

        def conv(kernel, strides, name):
            return keras.layers.Conv2D(
                self.channels, kernel, strides=strides, padding="same",
                kernel_initializer=keras.initializers.get(
                    keras.initializers.serialize(self.kernel_initializer)),
                dtype=self.dtype_policy, name=name)

        # Lists aligned with the level lists above (tracked by Keras for saving).
        self.lateral_convs = [conv(1, 1, f"lateral_c{lv}") for lv in self._td_levels]
        self.output_convs = [conv(3, 1, f"output_p{lv}") for lv in self._out_levels]
        self.extra_convs = [conv(3, 2, f"extra_p{lv}") for lv in self._extra_levels]
        self.upsample = keras.layers.UpSampling2D(
            2, interpolation="nearest", dtype=self.dtype_policy, name="upsample")

    def build(self, input_shape):
        for lv, layer in zip(self._td_levels, self.lateral_convs):
            key = f"C{lv}"
            if key not in input_shape:
                raise ValueError(f"FPN input is missing {key!r}; got keys {list(input_shape)}.")
            layer.build(tuple(input_shape[key]))
        feature = (None, None, None, self.channels)
        for layer in self.output_convs:
            layer.build(feature)
        for k, layer in enumerate(self.extra_convs):
            if k == 0 and self.extra_from == "c5":
                layer.build(tuple(input_shape[f"C{self._top}"]))
            else:
                layer.build(feature)
        self.built = True

    def call(self, inputs):
        merged = {}
        previous = None
        for lv, layer in reversed(list(zip(self._td_levels, self.lateral_convs))):
            x = layer(inputs[f"C{lv}"])
            if previous is not None:
                up = self.upsample(previous)
                shape = ops.shape(x)
                x = x + up[:, : shape[1], : shape[2], :]
            merged[lv] = x
            previous = x

        outputs = {f"P{lv}": layer(merged[lv])
                   for lv, layer in zip(self._out_levels, self.output_convs)}
        if self._extra_levels:
            # Extra levels exist only when max_level > top, so P{top} is an output.
            x = inputs[f"C{self._top}"] if self.extra_from == "c5" else outputs[f"P{self._top}"]
            for k, (lv, layer) in enumerate(zip(self._extra_levels, self.extra_convs)):
                if k > 0 and self.use_relu_between_extra:
                    x = ops.relu(x)
                x = layer(x)
                outputs[f"P{lv}"] = x
        return outputs

    def compute_output_shape(self, input_shape):
        batch = input_shape[f"C{self.min_level}"][0]
        shapes = {}
        for lv in self._out_levels:
            s = input_shape[f"C{lv}"]
            shapes[f"P{lv}"] = (batch, s[1], s[2], self.channels)
        s = input_shape[f"C{self._top}"]
        h, w = s[1], s[2]
        for lv in self._extra_levels:
            h = None if h is None else (h + 1) // 2
            w = None if w is None else (w + 1) // 2
            shapes[f"P{lv}"] = (batch, h, w, self.channels)
        return shapes

    def get_config(self):
        config = super().get_config()
        config.update({
            "channels": self.channels,
            "min_level": self.min_level,
            "max_level": self.max_level,
            "input_levels": list(self.input_levels),
            "extra_from": self.extra_from,
            "use_relu_between_extra": self.use_relu_between_extra,
            "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
        })
        return config
