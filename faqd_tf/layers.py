"""Quantized Keras layers: `QuantConv1D`, `QuantConv2D`, `QuantConv3D`, `QuantDepthwiseConv2D`,
`QuantSeparableConv2D`, `QuantConv2DTranspose`, `QuantDense`, `QuantReLU`.

The conv and dense layers are the Keras layers with the kernel quantized in `call` (as QKeras
does): the float kernel is kept and trained, the forward pass uses Q(kernel) and the gradient
passes straight through (BinaryConnect, eq. 1 of arXiv 2302.10899). With `relax` set, training
uses the BinaryRelax blend `(w + lam*Q(w)) / (1 + lam)` (eq. 2) and `lam` grows each epoch under
`faqd_tf.callbacks.BinaryRelaxScheduler`; inference always uses Q(w). `weight_bits=None` is full
precision, so one class serves the FP teacher and the quantized student.

Example:

>>> import keras, numpy as np
>>> model = keras.Sequential([
...     keras.Input((8, 8, 3)),
...     QuantConv2D(4, 3, weight_bits=2, name="conv"),
...     QuantReLU(bits=2),
... ])
>>> model(np.random.rand(1, 8, 8, 3)).shape
TensorShape([1, 6, 6, 4])
"""

import warnings

import keras
import tensorflow as tf
from keras import ops

from faqd_tf import quantizers


@keras.saving.register_keras_serializable(package="faqd_tf")
class Clip(keras.constraints.Constraint):
    """Keeps a weight in `[min_value, max_value]` (the quantized ReLU's resolution alpha)."""

    def __init__(
        self, min_value: float = quantizers.ALPHA_MIN, max_value: float = quantizers.ALPHA_MAX
    ):
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, w):
        return ops.clip(w, self.min_value, self.max_value)

    def get_config(self):
        return {"min_value": self.min_value, "max_value": self.max_value}


class QuantizedKernelMixin:
    """What the quantized conv and dense layers share: the kernel quantizer, the BinaryRelax
    factor, and their configuration.

    `kernel_names` are the layer's quantized kernels (two for `QuantSeparableConv2D`: each gets
    its own codes and scales from the one `kernel_quantizer`)."""

    kernel_names = ("kernel",)

    def __init__(
        self,
        *args,
        weight_bits: int | None = None,
        per_channel: bool = False,
        relax: float | None = None,
        kernel_quantizer=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self._init_quantizer(weight_bits, per_channel, relax, kernel_quantizer)

    def build(self, input_shape):
        super().build(input_shape)
        self._build_relax()

    def _init_quantizer(self, weight_bits, per_channel, relax, kernel_quantizer):
        if kernel_quantizer is not None and weight_bits is not None:
            raise ValueError(
                "Give either weight_bits or kernel_quantizer, not both "
                f"(got weight_bits={weight_bits!r}, kernel_quantizer={kernel_quantizer!r})."
            )
        if kernel_quantizer is not None:
            self.kernel_quantizer = quantizers.get(kernel_quantizer)
        else:
            weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
            if per_channel and weight_bits is None:
                raise ValueError(
                    "per_channel=True needs a quantized kernel; set weight_bits to 1, 2, 4 or 8, "
                    "or use per_channel=False."
                )
            self.kernel_quantizer = (
                None
                if weight_bits is None
                else quantizers.WeightQuantizer(weight_bits, per_channel)
            )
        if relax is not None and relax is not False:
            if isinstance(relax, bool):
                relax = 1.0
            if not isinstance(relax, (int, float)) or relax <= 0:
                raise ValueError(
                    f"relax={relax!r} is not valid; use None (plain quantization) or a positive "
                    "initial BinaryRelax lambda such as 1.0."
                )
            if not hasattr(self.kernel_quantizer, "relaxed"):
                raise ValueError(
                    "relax needs a quantized kernel whose quantizer has a relaxed() form; "
                    "set weight_bits to 1, 2, 4 or 8."
                )
            relax = float(relax)
        else:
            relax = None
        self.relax = relax
        self.relax_lambda = None

    @property
    def weight_bits(self) -> int | None:
        return getattr(self.kernel_quantizer, "bits", None)

    @property
    def per_channel(self) -> bool:
        return bool(getattr(self.kernel_quantizer, "per_channel", False))

    @property
    def precision(self) -> int | None:
        """Bits of a stored weight (None: full precision); read by bit-counting summaries."""
        return getattr(self.kernel_quantizer, "precision", None)

    def _build_relax(self):
        if self.relax is not None:
            self.relax_lambda = self.add_weight(
                name="relax_lambda",
                shape=(),
                initializer=keras.initializers.Constant(self.relax),
                trainable=False,
            )

    def _base_saves_every_variable(self) -> bool:
        # Keras's Conv and Dense save only their kernel and bias; Depthwise, Separable and
        # Transpose convolutions inherit Layer's rule, which saves every variable, the lambda too.
        for klass in type(self).__mro__:
            if "save_own_variables" in vars(klass) and not issubclass(klass, QuantizedKernelMixin):
                return klass is keras.layers.Layer
        return True

    # The BinaryRelax lambda goes after the kernel and bias where the base class leaves it out, or
    # a relaxed model would neither load nor resume.
    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self.built and self.relax_lambda is not None and not self._base_saves_every_variable():
            store[str(len(store.keys()))] = self.relax_lambda

    def load_own_variables(self, store):
        super().load_own_variables(store)
        if self.built and self.relax_lambda is not None and not self._base_saves_every_variable():
            self.relax_lambda.assign(store[str(len(store.keys()) - 1)])

    def add_weight(self, *args, **kwargs):
        # The kernel is never autocast: under mixed precision the quantizer reads the stored float32
        # weights, so the codes equal those of the float32 path; quantized_kernel() casts the
        # result to the compute dtype itself.
        if kwargs.get("name") in self.kernel_names:
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    def _kernel_name(self, kernel):
        if kernel is None:
            if len(self.kernel_names) > 1:
                raise ValueError(
                    f"Layer {self.name!r} ({type(self).__name__}) has {len(self.kernel_names)} quantized kernels; "
                    f"name one: kernel={self.kernel_names[0]!r} or {self.kernel_names[1]!r}."
                )
            return self.kernel_names[0]
        if kernel not in self.kernel_names:
            raise ValueError(
                f"Layer {self.name!r} has no quantized kernel {kernel!r}; its kernels are {list(self.kernel_names)}."
            )
        return kernel

    def quantized_kernel(self, training: bool | None = None, kernel: str | None = None):
        """The kernel the forward pass uses: Q(w), the BinaryRelax blend in training, or w.

        `kernel` names one of `kernel_names` (needed only where there are two)."""
        name = self._kernel_name(kernel)
        variable = getattr(self, name)
        if self.kernel_quantizer is None:
            return ops.cast(variable, self.compute_dtype)
        w = tf.convert_to_tensor(self.kernel_to_quantize(name))
        if training and self.relax_lambda is not None:
            q = self.kernel_quantizer.relaxed(w, tf.convert_to_tensor(self.relax_lambda))
        else:
            q = self.kernel_quantizer(w)
        return ops.cast(self._restore_kernel_shape(q, name, variable.shape), self.compute_dtype)

    def kernel_to_quantize(self, kernel: str | None = None):
        """The float kernel as the quantizer sees it: its last axis is the output channels.

        The kernel itself, except for depthwise kernels ``(kh, kw, 1, channels * multiplier)``
        (`QuantDepthwiseConv2D`, the depthwise kernel of `QuantSeparableConv2D`) and transposed
        convolutions, ``(kh, kw, in, out)`` (`QuantConv2DTranspose` stores ``(kh, kw, out, in)``).
        """
        name = self._kernel_name(kernel)
        return self._kernel_as_quantized(getattr(self, name), name)

    def kernel_codes(self, kernel: str | None = None) -> tuple:
        """`(codes, scale)` of the quantized kernel, ``Q(w) = codes * scale``, as float32 tensors.

        `codes` has the shape of `kernel_to_quantize()`; `scale` is a scalar, or one per output
        channel (shape ``(1, ..., 1, channels)``). Raises ValueError for a full-precision kernel.

        >>> layer = QuantDense(3, weight_bits=2)
        >>> _ = layer(np.ones((1, 4), "float32"))
        >>> codes, scale = layer.kernel_codes()
        >>> sorted(set(np.unique(codes)) - {-1.0, 0.0, 1.0})
        []
        """
        name = self._kernel_name(kernel)
        quantizer = self.kernel_quantizer
        # A frozen two-kernel layer's quantizer holds both kernels' scales.
        if callable(getattr(quantizer, "for_kernel", None)):
            quantizer = quantizer.for_kernel(name)
        codes = getattr(quantizer, "codes", None)
        if not callable(codes):
            raise ValueError(
                f"Layer {self.name!r}: its kernel is not quantized to integer codes (kernel_quantizer="
                f"{self.kernel_quantizer!r}); give it weight_bits or a faqd_tf quantizer."
            )
        return codes(self.kernel_to_quantize(name))

    def _kernel_as_quantized(self, w, name):
        return w

    def _restore_kernel_shape(self, q, name, shape):
        return q

    def _bias_and_activation(self, outputs):
        if getattr(self, "bias", None) is not None:
            bias = self.bias
            if getattr(self, "data_format", "channels_last") == "channels_first":
                bias = ops.reshape(bias, (1, -1) + (1,) * self.rank)
            outputs = ops.add(outputs, bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs

    def _quantizer_config(self):
        q = self.kernel_quantizer
        if (
            q is None
            or type(q) is quantizers.WeightQuantizer
            and q.iterations == quantizers.LLOYD_ITERATIONS
        ):
            return {
                "weight_bits": self.weight_bits,
                "per_channel": self.per_channel,
                "relax": self.relax,
            }
        return {"kernel_quantizer": keras.saving.serialize_keras_object(q), "relax": self.relax}


def _depthwise_as_quantized(w):
    # Every depthwise filter (input channel x multiplier) counts as an output channel.
    shape = ops.shape(w)
    return ops.reshape(w, (*shape[:-2], 1, -1))


def _swap_last_axes(w):
    rank = len(w.shape)
    return ops.transpose(w, (*range(rank - 2), rank - 1, rank - 2))


class _QuantConv(QuantizedKernelMixin):
    """The `call` of a quantized Conv1D/2D/3D: Keras's, with Q(kernel) in place of the kernel."""

    def call(self, inputs, training=None):
        kernel = self.quantized_kernel(training)
        if self.padding == "causal":
            # Conv1D's causal padding, as keras.layers.Conv1D.call applies it.
            inputs = ops.pad(inputs, self._compute_causal_padding())
            outputs = ops.conv(
                inputs,
                kernel,
                strides=list(self.strides),
                padding="valid",
                dilation_rate=self.dilation_rate,
                data_format=self.data_format,
            )
        else:
            outputs = self.convolution_op(inputs, kernel)
        return self._bias_and_activation(outputs)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantConv1D(_QuantConv, keras.layers.Conv1D):
    """`keras.layers.Conv1D` whose kernel ``(k, in, out)`` is quantized in the forward pass
    (signal and sequence classifiers; causal padding works). Same extra arguments as `QuantConv2D`.

    >>> layer = QuantConv1D(4, 3, weight_bits=2, padding="causal")
    >>> layer(np.random.rand(2, 10, 3).astype("float32")).shape
    TensorShape([2, 10, 4])
    """


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantConv2D(_QuantConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose kernel is quantized to `weight_bits` in the forward pass.

    Args (besides those of Conv2D):
        weight_bits: 1, 2, 4, 8, or None for full precision.
        per_channel: one scale per output channel instead of one per layer.
        relax: None, or the initial lambda of BinaryRelax (eq. 2).
        kernel_quantizer: instead of `weight_bits`, a quantizer name (`"ste_sign"`, `"ternary"`,
            `"int4"`, ...), config or object from `faqd_tf.quantizers`.

    >>> layer = QuantConv2D(8, 3, weight_bits=1)
    >>> y = layer(np.random.rand(2, 5, 5, 3).astype("float32"))
    >>> len(np.unique(layer.quantized_kernel()))
    2
    """


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantConv3D(_QuantConv, keras.layers.Conv3D):
    """`keras.layers.Conv3D` whose kernel ``(kd, kh, kw, in, out)`` is quantized in the forward pass.

    >>> QuantConv3D(2, 2, weight_bits=4)(np.random.rand(1, 3, 4, 4, 2).astype("float32")).shape
    TensorShape([1, 2, 3, 3, 2])
    """


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantDepthwiseConv2D(QuantizedKernelMixin, keras.layers.DepthwiseConv2D):
    """`keras.layers.DepthwiseConv2D` with a quantized depthwise kernel (MobileNet-style models).

    Per-channel scales are per (input channel x multiplier), the kernel's flattened last two axes.

    >>> layer = QuantDepthwiseConv2D(3, depth_multiplier=2, weight_bits=2, per_channel=True)
    >>> layer(np.random.rand(1, 5, 5, 3).astype("float32")).shape
    TensorShape([1, 3, 3, 6])
    """

    def _kernel_as_quantized(self, w, name):
        return _depthwise_as_quantized(w)

    def _restore_kernel_shape(self, q, name, shape):
        return ops.reshape(q, shape)

    def call(self, inputs, training=None):
        outputs = ops.depthwise_conv(
            inputs,
            self.quantized_kernel(training),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._bias_and_activation(outputs)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantSeparableConv2D(QuantizedKernelMixin, keras.layers.SeparableConv2D):
    """`keras.layers.SeparableConv2D` with both kernels quantized (NASNet, Xception).

    The depthwise kernel ``(kh, kw, in, multiplier)`` and the pointwise kernel
    ``(1, 1, in * multiplier, filters)`` are quantized separately, each with its own codes and
    scale(s): per channel, one per depthwise filter and one per output filter. Name the kernel
    where one is asked for: ``quantized_kernel(kernel="pointwise_kernel")``, ``kernel_codes("depthwise_kernel")``.

    >>> layer = QuantSeparableConv2D(4, 3, weight_bits=1)
    >>> y = layer(np.random.rand(1, 5, 5, 2).astype("float32"))
    >>> [len(np.unique(layer.quantized_kernel(kernel=k))) for k in layer.kernel_names]
    [2, 2]
    """

    kernel_names = ("depthwise_kernel", "pointwise_kernel")

    def _kernel_as_quantized(self, w, name):
        return _depthwise_as_quantized(w) if name == "depthwise_kernel" else w

    def _restore_kernel_shape(self, q, name, shape):
        return ops.reshape(q, shape)

    def call(self, inputs, training=None):
        outputs = ops.separable_conv(
            inputs,
            self.quantized_kernel(training, "depthwise_kernel"),
            self.quantized_kernel(training, "pointwise_kernel"),
            strides=self.strides,
            padding=self.padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._bias_and_activation(outputs)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantConv2DTranspose(QuantizedKernelMixin, keras.layers.Conv2DTranspose):
    """`keras.layers.Conv2DTranspose` (segmentation decoders) with a quantized kernel.

    Keras stores the kernel as ``(kh, kw, filters, in)``: the output channels are its third axis,
    so the quantizer sees it transposed to ``(kh, kw, in, filters)`` and per-channel scales are
    one per output filter.

    >>> layer = QuantConv2DTranspose(3, 2, strides=2, weight_bits=2, per_channel=True)
    >>> layer(np.random.rand(1, 4, 4, 5).astype("float32")).shape
    TensorShape([1, 8, 8, 3])
    """

    def _kernel_as_quantized(self, w, name):
        return _swap_last_axes(w)

    def _restore_kernel_shape(self, q, name, shape):
        return _swap_last_axes(q)

    def call(self, inputs, training=None):
        outputs = ops.conv_transpose(
            inputs,
            self.quantized_kernel(training),
            strides=list(self.strides),
            padding=self.padding,
            output_padding=self.output_padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        return self._bias_and_activation(outputs)

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantDense(QuantizedKernelMixin, keras.layers.Dense):
    """`keras.layers.Dense` whose kernel is quantized to `weight_bits` in the forward pass.

    Same extra arguments as `QuantConv2D`.

    >>> layer = QuantDense(3, weight_bits=2)
    >>> layer(np.random.rand(4, 5).astype("float32")).shape
    TensorShape([4, 3])
    """

    def call(self, inputs, training=None):
        return self._bias_and_activation(ops.matmul(inputs, self.quantized_kernel(training)))

    def get_config(self):
        return {**super().get_config(), **self._quantizer_config()}


@keras.saving.register_keras_serializable(package="faqd_tf")
class QuantReLU(keras.layers.Layer):
    """ReLU, or the b-bit quantized ReLU of eq. (4) with a learned resolution `alpha`.

    Args:
        bits: 1, 2, 4, 8, or None for a plain ReLU.
        alpha_initializer: initial resolution: a float in [1e-3, 5] or a Keras initializer;
            default: the authors' value for `bits` (1.2221, 0.6511, 0.1946 for 1, 2, 4 bits).
        trainable_alpha: learn alpha with the gradient of eq. (5).
        alpha_rate: the authors' alpha update: eq. (5) summed over the batch, times `alpha_rate`,
            clamped to [-1, 1] (default 0.01, their `rate_factor`); None: the raw eq. (5) sum.
            Under a `tf.distribute` strategy each replica clamps its own gradient before the
            all-reduce sums them (see `faqd_tf.quantizers.quantized_relu`).
        alpha_regularizer: a Keras regularizer of alpha, e.g. the authors' alpha weight decay
            (see `faqd_tf.quantize.set_alpha_decay`).
        ste: the input gradient: `"clipped"` (eq. 5: where 0 < x < top * alpha) or
            `"two_sided"` (also where -alpha < x <= 0); see `faqd_tf.quantizers.quantized_relu`.

    Alpha is kept in [1e-3, 5] by a `Clip` constraint.

    >>> relu = QuantReLU(bits=2, alpha_initializer=0.5)
    >>> np.asarray(relu(np.array([-1.0, 0.2, 0.7, 9.0], "float32"))).tolist()
    [0.0, 0.5, 1.0, 1.5]
    """

    def __init__(
        self,
        bits: int | None = None,
        alpha_initializer=None,
        trainable_alpha: bool = True,
        alpha_rate: float = quantizers.DEFAULT_ALPHA_RATE,
        alpha_regularizer=None,
        ste: str = "clipped",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.bits = quantizers.check_bits(bits, "bits", allow_none=True)
        self.ste = quantizers.check_activation_ste(ste)
        if isinstance(alpha_initializer, (int, float)) and not isinstance(alpha_initializer, bool):
            quantizers.check_alpha(alpha_initializer, "alpha_initializer")
            alpha_initializer = keras.initializers.Constant(float(alpha_initializer))
        elif alpha_initializer is None and self.bits is not None:
            alpha_initializer = keras.initializers.Constant(quantizers.DEFAULT_ALPHA[self.bits])
        self.alpha_initializer = (
            keras.initializers.get(alpha_initializer) if alpha_initializer is not None else None
        )
        self.trainable_alpha = bool(trainable_alpha)
        self.alpha_rate = quantizers.check_alpha_rate(alpha_rate)
        self.alpha = None
        self.alpha_regularizer = alpha_regularizer
        if self.bits is not None and self.trainable_alpha and self.alpha_rate is not None:
            if self.dtype_policy.name == "mixed_float16":
                warnings.warn(
                    f"QuantReLU {self.name!r}: under mixed_float16 the optimizer scales the loss, so "
                    "the [-1, 1] clamp of alpha's gradient acts on the scaled gradient; use "
                    "mixed_bfloat16, or alpha_rate=None.",
                    stacklevel=2,
                )

    @property
    def alpha_regularizer(self):
        return self._alpha_regularizer

    @alpha_regularizer.setter
    def alpha_regularizer(self, regularizer):
        self._alpha_regularizer = keras.regularizers.get(regularizer)
        if self.alpha is not None:
            self.alpha.regularizer = self._alpha_regularizer

    @property
    def precision(self) -> int | None:
        """Bits of an activation (None: full precision)."""
        return self.bits

    def build(self, input_shape):
        if self.bits is not None:
            self.alpha = self.add_weight(
                name="alpha",
                shape=(),
                initializer=self.alpha_initializer,
                regularizer=self.alpha_regularizer,
                constraint=Clip(quantizers.ALPHA_MIN, quantizers.ALPHA_MAX),
                trainable=self.trainable_alpha,
                # Read as the float32 variable under mixed precision: alpha's gradient is summed
                # and clamped in float32 (see `quantized_relu`).
                autocast=False,
            )

    def call(self, inputs):
        if self.bits is None:
            return ops.relu(inputs)
        return quantizers.quantized_relu(
            inputs, tf.convert_to_tensor(self.alpha), self.bits, self.alpha_rate, self.ste
        )

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "bits": self.bits,
                "alpha_initializer": (
                    keras.initializers.serialize(self.alpha_initializer)
                    if self.alpha_initializer
                    else None
                ),
                "trainable_alpha": self.trainable_alpha,
                "alpha_rate": self.alpha_rate,
                "alpha_regularizer": keras.regularizers.serialize(self.alpha_regularizer),
                "ste": self.ste,
            }
        )
        return config
