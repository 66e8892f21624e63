"""`summary`: a per-layer table of weight/activation bits, parameters and memory, in the spirit of
Larq's ``lq.models.summary``.

Memory is counted two ways:

- **float32**: every stored parameter at 32 bits (what ``model.save`` keeps);
- **packed**: a quantized kernel at ``weight_bits`` bits per weight plus its 32-bit scale(s) (one per
  layer, or one per output channel), every other stored parameter (biases, BatchNormalization gamma,
  beta *and* moving statistics, quantized-ReLU alphas, BinaryRelax lambdas, full-precision layers) at
  32 bits. This is exactly the payload :func:`faqd_tf.export.pack` writes (up to rounding each
  packed kernel up to whole bytes).

Parameters are all stored weights (``layer.weights``); non-trainable ones (BN moving statistics,
lambdas, frozen alphas) are counted too and listed in their own column. Nested models are walked and
their layers appear as ``outer/inner`` (as do the layers inside Keras wrappers such as
``TimeDistributed``).

Example:

>>> from faqd_tf.layers import QuantConv2D, QuantReLU
>>> model = keras.Sequential([keras.Input((8, 8, 3)),
...                           QuantConv2D(4, 3, weight_bits=2, use_bias=False, name="conv"),
...                           QuantReLU(bits=2, name="relu")])
>>> result = summary(model, print_fn=None)
>>> result.total_params, result.float32_bits, result.packed_bits
(109, 3488, 280)
>>> round(result.compression_ratio, 2)
12.46
"""

import dataclasses
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from faqd_tf.options import is_integer

if TYPE_CHECKING:
    import keras

__all__ = [
    "LayerSummary",
    "ModelSummary",
    "iter_layers",
    "kernel_scale_count",
    "quantized_kernel_bits",
    "summary",
]


def _sublayers(layer):
    import keras  # here, not at the top: `import faqd_tf` (which binds `summary`) loads no TensorFlow

    # The public ways to a layer's children: a model's `layers`, a wrapper's (TimeDistributed...)
    # `layer`. Any other layer is a leaf, its sub-layers' weights counted as its own.
    if isinstance(layer, keras.Model):
        return list(layer.layers)
    if isinstance(layer, keras.layers.Wrapper):
        return [layer.layer]
    return []


def iter_layers(
    model: "keras.Layer", prefix: str = ""
) -> Iterator[tuple[str, "keras.Layer", list]]:
    """Yields `(path, layer, own_weights)` for every layer of `model`, nested models walked depth first.

    `path` is ``outer/inner`` for a layer of a nested model; `own_weights` are the variables the layer
    itself holds (not those of its sub-layers). A layer shared by several parents is yielded once.
    """
    seen = set()

    def walk(layer, path):
        children = _sublayers(layer)
        if id(layer) in seen:
            return
        seen.add(id(layer))
        if not children:
            yield path, layer, list(layer.weights)
            return
        child_ids = {id(w) for child in children for w in child.weights}
        own = [w for w in layer.weights if id(w) not in child_ids]
        if own and path:
            yield path, layer, own
        for child in children:
            yield from walk(child, f"{path}/{child.name}" if path else child.name)

    yield from walk(model, prefix)


def _kernel_names(layer):
    return tuple(getattr(layer, "kernel_names", ("kernel",)))


def quantized_kernel_bits(layer: "keras.Layer") -> int | None:
    """Bits of `layer`'s quantized kernel(s), or None if its kernel is stored in full precision.

    A layer has a quantized kernel when it has a `kernel` (or the kernels its `kernel_names` list,
    as `QuantSeparableConv2D`) and a `kernel_quantizer` whose `precision` is an int (the faqd_tf
    layers; Larq- or QKeras-like layers following the same convention work).
    """
    quantizer = getattr(layer, "kernel_quantizer", None)
    bits = getattr(quantizer, "precision", None)
    if quantizer is None or any(
        getattr(layer, name, None) is None for name in _kernel_names(layer)
    ):
        return None
    if not is_integer(bits):
        return None
    return int(bits)


def kernel_scale_count(layer: "keras.Layer") -> int:
    """Number of 32-bit scales of the quantized kernel(s): 1 per kernel (layer-wise), or one per
    output channel (the last axis of the kernel as quantized; depthwise: input channels x depth
    multiplier), summed over the kernels of a layer with two (`QuantSeparableConv2D`)."""
    names = _kernel_names(layer)
    if not getattr(getattr(layer, "kernel_quantizer", None), "per_channel", False):
        return len(names)
    to_quantize = getattr(layer, "kernel_to_quantize", None)
    if to_quantize is None:
        return int(layer.kernel.shape[-1])
    if len(names) == 1:
        return int(to_quantize().shape[-1])
    return sum(int(to_quantize(name).shape[-1]) for name in names)


def _size(variable):
    n = 1
    for d in variable.shape:
        n *= int(d)
    return n


@dataclasses.dataclass
class LayerSummary:
    """One row of :func:`summary`. Sizes are in bits; `*_bytes` properties divide by 8."""

    name: str
    type: str
    weight_bits: int | None  # None: no weights; 32: full-precision weights
    activation_bits: (
        int | None
    )  # bits of the activations this layer quantizes (QuantReLU), else None
    params: int
    trainable_params: int
    non_trainable_params: int
    quantized_params: int
    scales: int
    float32_bits: int
    packed_bits: int
    output_shape: str = ""

    @property
    def float32_bytes(self) -> float:
        return self.float32_bits / 8

    @property
    def packed_bytes(self) -> float:
        return self.packed_bits / 8


@dataclasses.dataclass
class ModelSummary:
    """Result of :func:`summary`: per-layer rows and totals (sizes in bits)."""

    name: str
    rows: list
    float_kernels: dict = dataclasses.field(
        default_factory=dict
    )  # path -> why it stays full precision

    def _total(self, field):
        return sum(getattr(row, field) for row in self.rows)

    @property
    def total_params(self) -> int:
        return self._total("params")

    @property
    def trainable_params(self) -> int:
        return self._total("trainable_params")

    @property
    def non_trainable_params(self) -> int:
        return self._total("non_trainable_params")

    @property
    def quantized_params(self) -> int:
        return self._total("quantized_params")

    @property
    def float32_bits(self) -> int:
        return self._total("float32_bits")

    @property
    def packed_bits(self) -> int:
        return self._total("packed_bits")

    @property
    def float32_bytes(self) -> float:
        return self.float32_bits / 8

    @property
    def packed_bytes(self) -> float:
        return self.packed_bits / 8

    @property
    def compression_ratio(self) -> float:
        """float32 size / packed size (1.0 for a model without quantized kernels)."""
        return self.float32_bits / self.packed_bits if self.packed_bits else 1.0

    def lines(self) -> list[str]:
        """The table as a list of text lines."""

        def bits(value):
            return "-" if value is None else str(value)

        header = (
            "Layer (type)",
            "Output shape",
            "W bits",
            "A bits",
            "Params",
            "Non-train.",
            "Float32 kB",
            "Packed kB",
        )
        body = [
            (
                f"{row.name} ({row.type})",
                row.output_shape,
                bits(row.weight_bits),
                bits(row.activation_bits),
                f"{row.params:,}",
                f"{row.non_trainable_params:,}",
                f"{row.float32_bytes / 1024:.2f}",
                f"{row.packed_bytes / 1024:.2f}",
            )
            for row in self.rows
        ]
        total = (
            "Total",
            "",
            "",
            "",
            f"{self.total_params:,}",
            f"{self.non_trainable_params:,}",
            f"{self.float32_bytes / 1024:.2f}",
            f"{self.packed_bytes / 1024:.2f}",
        )
        widths = [max(len(r[i]) for r in [header, total, *body]) for i in range(len(header))]

        def fmt(r):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )

        rule = "-" * len(fmt(header))
        return [
            f'Model: "{self.name}"',
            rule,
            fmt(header),
            "=" * len(rule),
            *[fmt(r) for r in body],
            rule,
            fmt(total),
            rule,
            f"Total params: {self.total_params:,} (trainable {self.trainable_params:,}, "
            f"non-trainable {self.non_trainable_params:,}; quantized kernels {self.quantized_params:,})",
            f"Size as float32: {self.float32_bytes / 1024:.2f} kB ({self.float32_bytes:,.0f} bytes)",
            f"Size packed:     {self.packed_bytes / 1024:.2f} kB ({self.packed_bytes:,.1f} bytes: quantized "
            "kernels at their bits + 32-bit scales, the rest float32)",
            f"Compression ratio (float32 / packed): {self.compression_ratio:.2f}x",
            *(
                [
                    "Full-precision kernels: "
                    + ", ".join(f"{p} ({why})" for p, why in self.float_kernels.items())
                ]
                if self.float_kernels
                else []
            ),
            rule,
        ]

    def __str__(self):
        return "\n".join(self.lines())


def _output_shape(layer):
    try:
        shape = layer.output.shape
    except Exception:  # layers called several times or never called have no single output
        return "?"
    return str(tuple(shape))


def summary(model: "keras.Model", print_fn: Callable[[str], None] | None = print) -> "ModelSummary":
    """Prints and returns a per-layer table of bits, parameters and memory of a (quantized) Keras model.

    Args:
        model: a built Keras model (Functional, Sequential; nested models are walked).
        print_fn: called with each line of the table; None prints nothing.

    Returns:
        A :class:`ModelSummary` (``rows`` of :class:`LayerSummary`, totals, ``compression_ratio``,
        and ``float_kernels``: the layers whose kernels stay in full precision and why, also printed
        as the table's last line, see `faqd_tf.quantize.float_kernel_layers`).
    """
    import keras

    if not isinstance(model, keras.layers.Layer):
        raise ValueError(f"summary needs a Keras model or layer, got {type(model).__name__}.")
    if not model.built:
        raise ValueError(f"Model {model.name!r} is not built; call it on data or build it first.")
    rows = []
    for path, layer, weights in iter_layers(model):
        trainable = {id(w) for w in layer.trainable_weights}
        params = sum(_size(w) for w in weights)
        trainable_params = sum(_size(w) for w in weights if id(w) in trainable)
        kbits = quantized_kernel_bits(layer)
        kernels = (
            [getattr(layer, name) for name in _kernel_names(layer)] if kbits is not None else []
        )
        kernel_in_row = kbits is not None and all(any(w is k for w in weights) for k in kernels)
        quantized = sum(_size(k) for k in kernels) if kernel_in_row else 0
        scales = kernel_scale_count(layer) if kernel_in_row else 0
        if kernel_in_row:
            weight_bits = kbits
        else:
            weight_bits = 32 if params else None
        activation_bits = None
        if not hasattr(layer, "kernel_quantizer") and hasattr(layer, "precision"):
            # An activation quantizer (QuantReLU); precision None is a full-precision ReLU.
            activation_bits = layer.precision if layer.precision is not None else 32
        rows.append(
            LayerSummary(
                name=path,
                type=type(layer).__name__,
                weight_bits=weight_bits,
                activation_bits=activation_bits,
                params=params,
                trainable_params=trainable_params,
                non_trainable_params=params - trainable_params,
                quantized_params=quantized,
                scales=scales,
                float32_bits=32 * params,
                packed_bits=kbits * quantized + 32 * scales + 32 * (params - quantized)
                if kernel_in_row
                else 32 * params,
                output_shape=_output_shape(layer),
            )
        )
    float_kernels = {}
    if isinstance(model, keras.Model) and getattr(model, "inputs", None):
        from faqd_tf.quantize import float_kernel_layers

        float_kernels = float_kernel_layers(model)
    result = ModelSummary(name=model.name, rows=rows, float_kernels=float_kernels)
    if print_fn is not None:
        for line in result.lines():
            print_fn(line)
    return result
