"""Quantizers of FAQD: pure functions with their straight-through estimators.

Weights (BinaryConnect, eq. 1 of arXiv 2302.10899): the forward pass uses the quantized
value Q(w); the gradient flows to the float weights unchanged (identity STE).

- 1 bit: ``Q(w) = sign(w) * mean|w|``.
- b >= 2 bits: symmetric levels ``{-L..L} * s`` with ``L = 2^(b-1) - 1``; the scale ``s`` is
  refined by Lloyd iterations (``q = clip(round(|w|/s), 0, L)``, ``s = sum|w|q / sum q^2``),
  started from max-abs scaling (and, at 2 bits, also from the TWN threshold) so the result is
  never worse than max-abs scaling.

Activations (eqs. 4-5): a b-bit quantized ReLU with learned resolution ``alpha``, updated as
the authors do: the eq. (5) gradient times ``alpha_rate`` (0.01), clamped to [-1, 1].

Example:

>>> import numpy as np
>>> w = np.array([-1.0, -0.2, 0.1, 0.9], "float32")
>>> print(np.unique(quantize_weights(w, bits=1)))
[-0.55  0.55]
"""

import keras
import numpy as np
import tensorflow as tf

from faqd_tf.options import SUPPORTED_BITS, is_integer

LLOYD_ITERATIONS = 8
# Authors' initial resolutions of the quantized ReLU (lzj994/FAQD CIFAR/quant_uni_type.py, bit_alpha);
# 8 bits continues the ~4x per 2 bits trend.
DEFAULT_ALPHA = {1: 1.2221, 2: 0.6511, 4: 0.1946, 8: 0.0125}
ALPHA_MIN, ALPHA_MAX = 1e-3, 5.0
# Authors' rate_factor: alpha's summed eq. (5) gradient is scaled by it and clamped to [-1, 1].
DEFAULT_ALPHA_RATE = 0.01
ACTIVATION_STES = ("clipped", "two_sided")
"""The quantized ReLU's input gradient: eq. (5)'s window (0, top * alpha), or (-alpha, top * alpha),
where a unit just below its threshold still gets the gradient that can turn it back on."""
# Authors' alphas decay at the weight decay times this (decay_factor of their get_optimizer_full).
ALPHA_DECAY_FACTOR = 0.01


# The width of a model's first layers (those that see the input first) by its weight width, under
# first_layer_bits="auto". 1 bit: the stem at 8 bits gained 1.1-1.4 points per seed (1-bit weights)
# and 1.4-2.4 (1W1A) in docs/binary.md's factor study, for 126 more bytes on the quickstart's ResNet8.
FIRST_LAYER_BITS = {1: 8}


def first_layer_width(weight_bits: int | None, first_layer_bits="auto") -> int | None:
    """The width of a model's first layers: `FIRST_LAYER_BITS` under `"auto"`, else `first_layer_bits`.

    >>> first_layer_width(1), first_layer_width(2), first_layer_width(1, 1)
    (8, 2, 1)
    """
    if weight_bits is None:
        return None
    if isinstance(first_layer_bits, str) and first_layer_bits == "auto":
        return FIRST_LAYER_BITS.get(weight_bits, weight_bits)
    return check_bits(first_layer_bits, "first_layer_bits", allow_none=True)


def check_bits(bits: int | None, name: str = "bits", allow_none: bool = False) -> int | None:
    """Returns `bits` as an int, or raises `ValueError` naming `name` and the allowed values."""
    if bits is None and allow_none:
        return None
    allowed = ", ".join(str(b) for b in SUPPORTED_BITS)
    if allow_none:
        allowed += " or None (full precision)"
    if not is_integer(bits) or bits not in SUPPORTED_BITS:
        raise ValueError(f"{name}={bits!r} is not supported; use one of {allowed}.")
    return int(bits)


def levels(bits: int) -> int:
    """Number of positive levels L = 2^(b-1) - 1 of a b-bit symmetric weight quantizer (b >= 2)."""
    return 2 ** (bits - 1) - 1


def _reduce_axes(w, per_channel):
    if not per_channel:
        return None
    if w.shape.rank is None or w.shape.rank < 2:
        raise ValueError(
            f"per_channel=True needs a kernel with an output-channel axis (rank >= 2), got shape "
            f"{w.shape}; use per_channel=False."
        )
    return list(range(w.shape.rank - 1))


def _lloyd_scale(abs_w, scale, n_levels, axes, iterations):
    """Alternates the optimal codes for a scale and the least-squares scale for those codes."""
    tiny = tf.constant(1e-12, abs_w.dtype)
    for _ in range(iterations):
        q = tf.clip_by_value(tf.round(abs_w / tf.maximum(scale, tiny)), 0.0, n_levels)
        num = tf.reduce_sum(abs_w * q, axis=axes, keepdims=axes is not None)
        den = tf.reduce_sum(q * q, axis=axes, keepdims=axes is not None)
        # An all-zero (or all-below-threshold) group keeps its previous scale.
        scale = tf.where(den > 0, num / tf.maximum(den, tiny), scale)
    return scale


def _uniform(abs_w, scale, n_levels):
    tiny = tf.constant(1e-12, abs_w.dtype)
    return tf.clip_by_value(tf.round(abs_w / tf.maximum(scale, tiny)), 0.0, n_levels)


def weight_codes(w, bits: int, per_channel: bool = False, iterations: int = LLOYD_ITERATIONS):
    """Integer codes and scale of the b-bit quantization of `w`, without gradients.

    Returns `(codes, scale)` with `Q(w) = codes * scale`. For 1 bit the codes are in {-1, 1};
    for b >= 2 in {-L..L}. `scale` is a scalar, or of shape `(1, ..., 1, channels)` when
    `per_channel=True`. The arithmetic runs in float32 whatever the dtype of `w`, so mixed
    precision gives the same codes as float32.
    """
    bits = check_bits(bits)
    w = tf.cast(tf.convert_to_tensor(w), tf.float32)
    axes = _reduce_axes(w, per_channel)
    keep = axes is not None
    sign = tf.where(w >= 0, 1.0, -1.0)
    abs_w = tf.abs(w)
    if bits == 1:
        return sign, tf.reduce_mean(abs_w, axis=axes, keepdims=keep)

    n_levels = float(levels(bits))
    scale = _lloyd_scale(
        abs_w, tf.reduce_max(abs_w, axis=axes, keepdims=keep) / n_levels, n_levels, axes, iterations
    )
    if bits == 2:
        # Ternary: Lloyd from max-abs can stall with most weights at zero; also start from the
        # TWN threshold 0.7*mean|w| (= scale/2) and keep whichever start fits better.
        twn = _lloyd_scale(
            abs_w, 1.4 * tf.reduce_mean(abs_w, axis=axes, keepdims=keep), n_levels, axes, iterations
        )

        def err(s):
            d = abs_w - _uniform(abs_w, s, n_levels) * s
            return tf.reduce_sum(d * d, axis=axes, keepdims=keep)

        scale = tf.where(err(twn) < err(scale), twn, scale)
    return sign * _uniform(abs_w, scale, n_levels), scale


def quantize_weights_forward(
    w, bits: int, per_channel: bool = False, iterations: int = LLOYD_ITERATIONS
):
    """Q(w) without a gradient rule (the pure projection); same dtype as `w`."""
    w = tf.convert_to_tensor(w)
    codes, scale = weight_codes(w, bits, per_channel, iterations)
    return tf.cast(codes * scale, w.dtype)


def quantize_weights(w, bits: int, per_channel: bool = False, iterations: int = LLOYD_ITERATIONS):
    """Q(w) in the forward pass, identity gradient to `w` (BinaryConnect STE).

    Args:
        w: float tensor, e.g. a Conv2D kernel `(kh, kw, c_in, c_out)`.
        bits: 1, 2, 4 or 8.
        per_channel: one scale per output channel (last axis) instead of one per tensor.
        iterations: Lloyd iterations refining the least-squares scale (b >= 2).
    """
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w)
    _reduce_axes(w, per_channel)

    @tf.custom_gradient
    def _ste(x):
        def grad(dy):
            return dy

        return quantize_weights_forward(x, bits, per_channel, iterations), grad

    return _ste(w)


def binary_relax(w, lam, bits: int, per_channel: bool = False, iterations: int = LLOYD_ITERATIONS):
    """BinaryRelax (eq. 2): `(w + lam * Q(w)) / (1 + lam)`, gradient passed straight to `w`."""
    bits = check_bits(bits)
    w = tf.convert_to_tensor(w)
    lam = tf.cast(lam, w.dtype)

    @tf.custom_gradient
    def _ste(x):
        def grad(dy):
            return dy

        q = quantize_weights_forward(x, bits, per_channel, iterations)
        return (x + lam * q) / (1.0 + lam), grad

    return _ste(w)


def check_alpha(alpha: float, name: str = "alpha") -> float:
    if isinstance(alpha, (int, float)) and not (ALPHA_MIN <= alpha <= ALPHA_MAX):
        raise ValueError(
            f"{name}={alpha!r} is out of range; the quantized ReLU resolution must lie in "
            f"[{ALPHA_MIN}, {ALPHA_MAX}]."
        )
    return alpha


def check_alpha_rate(alpha_rate: float, name: str = "alpha_rate") -> float:
    """Returns `alpha_rate` as a float (or None), or raises `ValueError` naming `name`."""
    if alpha_rate is None:
        return None
    if (
        isinstance(alpha_rate, bool)
        or not isinstance(alpha_rate, (int, float))
        or not 0 < alpha_rate < float("inf")
    ):
        raise ValueError(
            f"{name}={alpha_rate!r} is not valid; use a number > 0 (the authors' {DEFAULT_ALPHA_RATE}) "
            "or None for the raw eq. (5) gradient."
        )
    return float(alpha_rate)


def check_activation_ste(ste, name: str = "ste") -> str:
    if ste not in ACTIVATION_STES:
        raise ValueError(
            f"{name}={ste!r} is not valid; use one of {', '.join(map(repr, ACTIVATION_STES))}."
        )
    return ste


def quantized_relu(
    x, alpha, bits: int, alpha_rate: float = DEFAULT_ALPHA_RATE, ste: str = "clipped"
):
    """b-bit quantized ReLU of eq. (4) with the gradients of eq. (5).

    Forward: 0 for x < 0; k*alpha for (k-1)*alpha <= x < k*alpha, 1 <= k <= 2^b - 1;
    (2^b - 1)*alpha above. Backward: dx passes where 0 < x < (2^b-1)*alpha (clipped-ReLU STE);
    d/dalpha is 0 (x <= 0), 2^(b-1) (inside) and 2^b - 1 (x >= (2^b-1)*alpha), summed over
    every activation to the shape of `alpha`. `ste="two_sided"` passes dx on (-alpha, 0] too (a
    1-bit ReLU off by less than alpha can be turned back on; eq. (5) gives it no gradient).

    `alpha_rate` is the authors' update rule (lzj994/FAQD, `QuantReLUFunction.backward`): the
    summed alpha gradient is multiplied by `alpha_rate` and clamped to [-1, 1]. `None` returns
    the raw eq. (5) sum. The clamp acts on the gradient of the loss being differentiated: under a
    `tf.distribute` strategy each replica clamps the gradient of its share of the global-batch
    loss and the all-reduce sums the clamped values (so N replicas can move alpha by up to N
    steps' worth), as PyTorch DataParallel does with the authors' layer; their script trains on
    one GPU, which clamps the whole batch's sum. Under loss scaling (mixed_float16) the clamp
    would see the scaled gradient.

    >>> float(quantized_relu(tf.constant(0.7), alpha=0.5, bits=2))
    1.0
    """
    bits = check_bits(bits)
    check_alpha(alpha)
    alpha_rate = check_alpha_rate(alpha_rate)
    low = -1.0 if check_activation_ste(ste) == "two_sided" else 0.0
    x = tf.convert_to_tensor(x)
    alpha = tf.convert_to_tensor(alpha)
    if not alpha.dtype.is_floating:
        alpha = tf.cast(alpha, tf.float32)
    top = float(2**bits - 1)

    @tf.custom_gradient
    def _qrelu(x, alpha):
        # Levels and regions are computed in float32 so that bfloat16 inputs land on the same
        # step as float32 ones, and alpha keeps its own (float32 variable) dtype.
        x32, a32 = tf.cast(x, tf.float32), tf.cast(alpha, tf.float32)
        k = tf.clip_by_value(tf.floor(x32 / a32) + 1.0, 0.0, top)
        y = tf.cast(tf.where(x32 < 0, 0.0, k * a32), x.dtype)

        def grad(dy):
            inside = tf.logical_and(x32 > 0, x32 < top * a32)
            passes = tf.logical_and(x32 > low * a32, x32 < top * a32) if low else inside
            dx = tf.where(passes, dy, tf.zeros_like(dy))
            dsig = tf.where(inside, float(2 ** (bits - 1)), tf.where(x32 >= top * a32, top, 0.0))
            # Summed in float32: a bfloat16 sum over a whole batch of activations loses the
            # small contributions.
            dalpha = tf.cast(dy, tf.float32) * dsig
            extra = dalpha.shape.rank - alpha.shape.rank
            dalpha = tf.reduce_sum(dalpha, axis=list(range(extra))) if extra else dalpha
            # Broadcast dims of alpha (size 1) are summed too.
            for i, n in enumerate(alpha.shape):
                if n == 1 and dalpha.shape[i] != 1:
                    dalpha = tf.reduce_sum(dalpha, axis=i, keepdims=True)
            if alpha_rate is not None:
                dalpha = tf.clip_by_value(dalpha * alpha_rate, -1.0, 1.0)
            return dx, tf.cast(tf.reshape(dalpha, tf.shape(alpha)), alpha.dtype)

        return y, grad

    return _qrelu(x, alpha)


class BaseWeightQuantizer:
    """What every weight quantizer of faqd_tf has: `bits`, `per_channel`, `precision` and a config.

    A quantized layer calls `quantizer(w)` in the forward pass, `quantizer.relaxed(w, lam)` under
    BinaryRelax, and `quantizer.codes(w)` for the integer codes and scales (packing, integer
    export). Subclasses define those three; as Larq's quantizers, the class is a thin serializable
    shell around pure functions.
    """

    def __init__(self, bits: int, per_channel: bool = False):
        self.bits = check_bits(bits)
        self.per_channel = bool(per_channel)

    @property
    def precision(self) -> int:
        return self.bits

    def __call__(self, w):
        raise NotImplementedError

    def relaxed(self, w, lam):
        raise NotImplementedError

    def codes(self, w):
        raise NotImplementedError

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}(bits={self.bits}, per_channel={self.per_channel})"


@keras.saving.register_keras_serializable(package="faqd_tf")
class WeightQuantizer(BaseWeightQuantizer):
    """Serializable b-bit weight quantizer (a thin wrapper of `quantize_weights`).

    Has `precision` (bits) for bit-counting summaries.

    >>> q = WeightQuantizer(bits=2)
    >>> q.precision
    2
    """

    def __init__(
        self, bits: int = 4, per_channel: bool = False, iterations: int = LLOYD_ITERATIONS
    ):
        super().__init__(bits, per_channel)
        self.iterations = int(iterations)

    def __call__(self, w):
        return quantize_weights(w, self.bits, self.per_channel, self.iterations)

    def relaxed(self, w, lam):
        return binary_relax(w, lam, self.bits, self.per_channel, self.iterations)

    def codes(self, w):
        return weight_codes(w, self.bits, self.per_channel, self.iterations)

    def get_config(self):
        return {**super().get_config(), "iterations": self.iterations}


@keras.saving.register_keras_serializable(package="faqd_tf")
class FrozenQuantizer(BaseWeightQuantizer):
    """The quantizer of an already-quantized kernel: identity in the forward pass.

    Holds the `bits`, `per_channel` flag and `scale` (a list of floats: one, or one per output
    channel) the kernel was quantized with (a layer with two kernels, `QuantSeparableConv2D`: a dict
    of such lists by kernel name, see `for_kernel`), so `precision` and `codes()` keep working: a frozen
    model (`faqd_tf.export.freeze`, `faqd_tf.export.unpack`) can be summarized, packed again byte
    for byte, and exported with its integer codes. Re-quantizing ``codes * scale`` with
    `WeightQuantizer` is not exactly idempotent (see `faqd_tf.export.frozen`), hence this class.

    >>> q = FrozenQuantizer(bits=2, scale=[0.5])
    >>> codes, scale = q.codes(np.array([-0.5, 0.0, 0.5], "float32"))
    >>> codes.numpy().tolist(), float(scale)
    ([-1.0, 0.0, 1.0], 0.5)
    """

    def __init__(self, bits: int, per_channel: bool = False, scale=None):
        super().__init__(bits, per_channel)
        if isinstance(scale, dict):
            # A layer with two quantized kernels (`QuantSeparableConv2D`): {kernel name: scales}.
            self.scale = {str(name): self._scales(s) for name, s in scale.items()}
        else:
            self.scale = None if scale is None else self._scales(scale)

    def _scales(self, scale):
        scale = [float(s) for s in np.asarray(scale, np.float32).reshape(-1)]
        if not self.per_channel and len(scale) != 1:
            raise ValueError(f"A layer-wise FrozenQuantizer has one scale, got {len(scale)}.")
        return scale

    def for_kernel(self, name):
        """The quantizer of kernel `name` alone: itself, or where it holds the scales of several
        kernels (``scale`` a dict), a `FrozenQuantizer` of that kernel's scales."""
        if not isinstance(self.scale, dict):
            return self
        if name not in self.scale:
            raise ValueError(
                f"This FrozenQuantizer holds the scales of {sorted(self.scale)}, not of {name!r}."
            )
        return FrozenQuantizer(self.bits, self.per_channel, self.scale[name])

    def __call__(self, w):
        return tf.convert_to_tensor(w)

    def relaxed(self, w, lam):
        return tf.convert_to_tensor(w)

    def codes(self, w):
        """`(codes, scale)` of a kernel on the frozen grid (as `weight_codes`)."""
        if self.scale is None:
            raise ValueError("This FrozenQuantizer has no scales; its codes are unknown.")
        if isinstance(self.scale, dict):
            raise ValueError(
                f"This FrozenQuantizer holds the scales of {len(self.scale)} kernels "
                f"({', '.join(sorted(self.scale))}); take one with for_kernel(name)."
            )
        w = tf.cast(tf.convert_to_tensor(w), tf.float32)
        scale = tf.constant(self.scale, tf.float32)
        if self.per_channel:
            if w.shape[-1] != len(self.scale):
                raise ValueError(
                    f"Kernel has {w.shape[-1]} channels but the quantizer {len(self.scale)} scales."
                )
            scale = tf.reshape(scale, [1] * (w.shape.rank - 1) + [-1])
        else:
            scale = tf.reshape(scale, [])
        if self.bits == 1:
            codes = tf.where(w >= 0, 1.0, -1.0)
        else:
            n = float(levels(self.bits))
            codes = tf.clip_by_value(tf.round(tf.math.divide_no_nan(w, scale)), -n, n)
        return codes, scale

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


# Names a layer or config may use for a weight quantizer.
_REGISTRY = {
    "ste_sign": dict(bits=1),
    "binary": dict(bits=1),
    "ternary": dict(bits=2),
    "int2": dict(bits=2),
    "int4": dict(bits=4),
    "int8": dict(bits=8),
}


def serialize(quantizer: "BaseWeightQuantizer") -> dict:
    return keras.saving.serialize_keras_object(quantizer)


def deserialize(config: dict) -> "BaseWeightQuantizer":
    return keras.saving.deserialize_keras_object(
        config,
        module_objects={"WeightQuantizer": WeightQuantizer, "FrozenQuantizer": FrozenQuantizer},
    )


def get(identifier: "str | dict | BaseWeightQuantizer | None") -> "BaseWeightQuantizer | None":
    """A weight quantizer from a name (`"ste_sign"`, `"ternary"`, `"int4"`, ...), a config dict,
    a quantizer object (`WeightQuantizer`, `FrozenQuantizer`), or None.

    >>> get("ternary")
    WeightQuantizer(bits=2, per_channel=False)
    """
    if identifier is None or isinstance(identifier, BaseWeightQuantizer):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key.endswith("_per_channel"):
            key, per_channel = key[: -len("_per_channel")], True
        else:
            per_channel = False
        if key not in _REGISTRY:
            names = ", ".join(sorted(_REGISTRY))
            raise ValueError(
                f"Unknown quantizer {identifier!r}; use one of {names} (optionally with '_per_channel')."
            )
        return WeightQuantizer(per_channel=per_channel, **_REGISTRY[key])
    if isinstance(identifier, dict):
        return deserialize(identifier)
    if callable(identifier):
        return identifier
    raise ValueError(f"Could not interpret quantizer identifier {identifier!r}.")
