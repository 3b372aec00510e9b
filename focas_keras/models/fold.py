"""Folding Weight Standardisation into plain convolutions for inference.

A `WSConv2D` standardises its kernel at every call: per output filter a mean, a variance
and a rescale over ``kh * kw * c_in / groups`` values, i.e. a few extra ops and one extra
kernel-sized tensor per conv and forward pass. Once training is over the kernel no longer
changes, so the standardised kernel can be computed once and stored in an ordinary
`keras.layers.Conv2D`: the convolution is the same, the per-call work is gone.
"""

from __future__ import annotations

import keras

from focas_keras.layers.ws_conv2d import WSConv2D

#: Entries of a WSConv2D config that describe the raw (unstandardised) kernel: a regulariser
#: or constraint of the raw kernel means nothing for the standardised one, and the epsilon is
#: already spent. The folded conv gets none of them.
_RAW_KERNEL_KEYS = ("ws_eps", "kernel_regularizer", "kernel_constraint")


def _sublayers(model: keras.Model):
    """All layers of ``model`` at any depth (nested models and layers inside layers)."""
    return model._flatten_layers(include_self=False, recursive=True)


def has_ws_conv(model: keras.Model) -> bool:
    """Whether any layer of ``model``, at any depth, is a `WSConv2D`."""
    return any(isinstance(layer, WSConv2D) for layer in _sublayers(model))


def folded_conv(layer: WSConv2D) -> keras.layers.Conv2D:
    """An unbuilt `keras.layers.Conv2D` with ``layer``'s configuration.

    Filters, kernel size, strides, padding, data format, dilation, groups, activation,
    use_bias, bias initializer/regulariser/constraint, activity regulariser, name, trainable
    flag and dtype policy (a mixed policy stays mixed: float32 kernel, bfloat16/float16
    compute) are kept; the raw-kernel settings in :data:`_RAW_KERNEL_KEYS` are dropped.
    Its weights are set by :func:`fold_weight_standardization` once it is built.
    """
    config = layer.get_config()
    for key in _RAW_KERNEL_KEYS:
        config.pop(key, None)
    # WSConv2D turns autocasting off to read its float32 kernel itself. get_config does not
    # carry that flag, so the Conv2D autocasts (the default): under a mixed policy its float32
    # kernel is cast to the compute dtype at call time, as WSConv2D casts its own.
    return keras.layers.Conv2D.from_config(config)


def _clone_layer(layer):
    if isinstance(layer, WSConv2D):
        return folded_conv(layer)
    return layer.__class__.from_config(layer.get_config())


def _copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copies ``source``'s weights into its clone ``target``, layer by layer.

    Nested functional / Sequential models are walked recursively (``clone_model`` with
    ``recursive=True`` clones them layer for layer, in the same order). A `WSConv2D` gives its
    standardised kernel (float32, computed once here) and its bias.
    """
    if len(source.layers) != len(target.layers):
        raise ValueError(f"clone of '{source.name}' has {len(target.layers)} layers, the "
                         f"original {len(source.layers)}")
    for old, new in zip(source.layers, target.layers):
        # Unnamed input layers get fresh names in the clone; they hold no weights.
        if isinstance(old, keras.layers.InputLayer) and isinstance(new, keras.layers.InputLayer):
            continue
        if old.name != new.name:
            raise ValueError(f"layer order differs in the clone: '{old.name}' vs '{new.name}'")
        if isinstance(old, keras.Model) and isinstance(new, keras.Model):
            _copy_weights(old, new)
        elif isinstance(old, WSConv2D):
            kernel = keras.ops.convert_to_numpy(old.standardized_kernel()).astype("float32")
            new.set_weights([kernel, old.bias.numpy()] if old.use_bias else [kernel])
        elif old.weights:
            new.set_weights(old.get_weights())


def fold_weight_standardization(model: keras.Model) -> keras.Model:
    """An inference-only copy of ``model`` in which every `WSConv2D` is a plain `Conv2D`.

    Each replacement (see :func:`folded_conv`) holds the standardised kernel
    ``WSConv2D.standardized_kernel()`` of shape ``(kh, kw, c_in // groups, filters)``,
    computed once in float32, and the layer's bias; every other layer keeps its weights
    (copied, not shared). The copy computes the same function as ``model`` up to float32
    round-off (the standardisation is no longer re-evaluated inside the graph), takes the
    same inputs and gives the same outputs (e.g. for Mdet: float32 [B, H, W, 3] in, the head's
    output dict out). Training the copy would train the folded kernels without standardising
    them, which is not what ``model`` learnt: it is meant for inference and export only.

    ``model`` itself is left unchanged. Nested functional / Sequential models (Mdet's
    backbone) are cloned recursively.

    Args:
        model: a built functional (or Sequential) `keras.Model`.

    Returns:
        The folded copy, with ``model``'s name; ``model`` itself (the same object) when it
        contains no `WSConv2D`.

    Raises:
        ValueError: a `WSConv2D` sits inside a custom layer or subclassed model, where
            ``clone_model`` cannot reach it.
    """
    if not has_ws_conv(model):
        return model
    folded = keras.models.clone_model(model, clone_function=_clone_layer, recursive=True)
    if has_ws_conv(folded):
        names = [layer.name for layer in _sublayers(folded) if isinstance(layer, WSConv2D)]
        raise ValueError("WSConv2D layers inside custom layers cannot be folded: "
                         + ", ".join(names))
    _copy_weights(model, folded)
    return folded
