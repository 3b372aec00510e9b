"""2D convolution with Weight Standardisation (Qiao et al., 2019)."""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="focas_keras")
class WSConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose kernel is standardised at every call.

    For every output filter ``o`` the kernel slice ``w[..., o]`` of shape
    ``(kh, kw, c_in // groups)`` is replaced by ``(w - mean) / sqrt(var + ws_eps)``, with the
    mean and the (population, biased) variance taken over those three axes. The stored
    variable stays unstandardised (it is what the optimiser updates and what weight files
    hold); `standardized_kernel()` returns the kernel actually convolved with.

    The standardisation is computed in float32 and the result cast to the layer's compute
    dtype, so the layer is safe under mixed precision (``"mixed_float16"`` /
    ``"mixed_bfloat16"``). To get the float32 variable in that setting the layer disables
    Keras' variable autocasting (``autocast=False``) and casts its inputs and bias to the
    compute dtype itself. Grouped convolutions (``groups > 1``) are supported: each filter
    is standardised over its own ``c_in // groups`` input channels.

    Args:
        filters: int, number of output channels.
        kernel_size: int or tuple of 2 ints, the spatial size of the kernel.
        strides: int or tuple of 2 ints.
        padding: ``"valid"`` or ``"same"``.
        data_format: ``"channels_last"`` (default) or ``"channels_first"``.
        dilation_rate: int or tuple of 2 ints.
        groups: int, number of groups; ``filters`` and the input channels must be
            divisible by it.
        activation: activation applied to the output, or None.
        use_bias: bool, whether to add a (non-standardised) bias.
        kernel_initializer: initializer of the (raw) kernel.
        bias_initializer: initializer of the bias.
        kernel_regularizer: regularizer of the raw kernel, or None.
        bias_regularizer: regularizer of the bias, or None.
        activity_regularizer: regularizer of the output, or None.
        kernel_constraint: constraint on the raw kernel, or None.
        bias_constraint: constraint on the bias, or None.
        ws_eps: float, the epsilon added to the variance (default 1e-5).
        **kwargs: base layer arguments (``name``, ``dtype``, ``trainable``, ...).

    Input shape:
        ``[B, H, W, C_in]`` (channels_last) or ``[B, C_in, H, W]`` (channels_first).

    Output shape:
        ``[B, H', W', filters]`` (or channels_first equivalent), with ``H' = ceil(H / s)``
        for ``"same"`` padding, exactly as `keras.layers.Conv2D`.
    """

    def __init__(
        self,
        filters,
        kernel_size,
        strides=(1, 1),
        padding="valid",
        data_format=None,
        dilation_rate=(1, 1),
        groups=1,
        activation=None,
        use_bias=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        activity_regularizer=None,
        kernel_constraint=None,
        bias_constraint=None,
        ws_eps=1e-5,
        **kwargs,
    ):
        # Variables are read in float32 and cast by hand in call() (see class docstring).
        kwargs["autocast"] = False
        super().__init__(
            filters=filters,
            kernel_size=kernel_size,
            strides=strides,
            padding=padding,
            data_format=data_format,
            dilation_rate=dilation_rate,
            groups=groups,
            activation=activation,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            activity_regularizer=activity_regularizer,
            kernel_constraint=kernel_constraint,
            bias_constraint=bias_constraint,
            **kwargs,
        )
        ws_eps = float(ws_eps)
        if ws_eps < 0:
            raise ValueError(f"`ws_eps` must be >= 0, got {ws_eps}.")
        self.ws_eps = ws_eps

    def standardized_kernel(self):
        """The standardised kernel, float32, shape ``(kh, kw, c_in // groups, filters)``."""
        kernel = ops.cast(self.kernel, "float32")
        mean = ops.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = ops.var(kernel, axis=(0, 1, 2), keepdims=True)
        return (kernel - mean) * ops.rsqrt(var + self.ws_eps)

    def call(self, inputs):
        dtype = self.compute_dtype
        inputs = ops.cast(inputs, dtype)
        kernel = ops.cast(self.standardized_kernel(), dtype)
        outputs = self.convolution_op(inputs, kernel)
        if self.use_bias:
            if self.data_format == "channels_last":
                bias_shape = (1, 1, 1, self.filters)
            else:
                bias_shape = (1, self.filters, 1, 1)
            outputs = ops.add(outputs, ops.reshape(ops.cast(self.bias, dtype), bias_shape))
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def get_config(self):
        config = super().get_config()
        config["ws_eps"] = self.ws_eps
        return config
