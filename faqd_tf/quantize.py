"""`quantize_model`: clone a Keras model into its quantized twin.

Conv2D -> QuantConv2D, DepthwiseConv2D -> QuantDepthwiseConv2D, Dense -> QuantDense; with
`activation_bits`, every ReLU (a `ReLU` layer, an `Activation("relu")` layer, a fused
`activation="relu"`, or a `QuantReLU`) becomes a `QuantReLU`. Layer names are kept, so feature
taps and weight copies by name still resolve; the weights are copied (fine-tune quantization).

>>> from faqd_tf.models import resnet_cifar
>>> student = quantize_model(resnet_cifar(20), weight_bits=2)
>>> student.get_layer("stem_conv").weight_bits, student.get_layer("logits").weight_bits
(2, None)
"""

import re
import warnings

import keras

from faqd_tf import quantizers
from faqd_tf.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D, QuantReLU

# Most specific first: QuantConv2D is a Conv2D, so a quantized model can be re-quantized.
_KERNEL_LAYERS = (
    (keras.layers.DepthwiseConv2D, QuantDepthwiseConv2D),
    (keras.layers.Conv2D, QuantConv2D),
    (keras.layers.Dense, QuantDense),
)


def _is_relu_activation(fn):
    return fn is keras.activations.relu or getattr(fn, "__name__", None) == "relu"


def _is_relu_layer(layer):
    if isinstance(layer, QuantReLU):
        return True
    if isinstance(layer, keras.layers.ReLU):
        # ReLU6 (MobileNet) maps too: the quantized ReLU clips at (2^b - 1) * alpha anyway.
        return not layer.negative_slope and not layer.threshold
    return isinstance(layer, keras.layers.Activation) and _is_relu_activation(layer.activation)


def _last_dense(model):
    dense = [layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    return dense[-1:]


def _kernel_layers(model):
    return [layer for layer in model.layers if any(isinstance(layer, base) for base, _ in _KERNEL_LAYERS)]


def resolve_layer_bits(model, weight_bits=4, layer_bits=None, skip=None) -> dict:
    """The weight width of each layer of `model` that `quantize_model` quantizes, by name.

    A layer gets the most specific entry of `layer_bits` that matches it (an exact name before a
    regular expression matching its whole name, and among expressions the one matching the fewest
    layers), else None when `skip` names it (by default the last Dense, the classifier), else
    `weight_bits`. Widths are 1, 2, 4, 8, or None for full precision.

    >>> from faqd_tf.models import resnet_cifar
    >>> widths = resolve_layer_bits(resnet_cifar(8), 1, {"stem_conv": 8})
    >>> widths["stem_conv"], widths["s1b1_conv1"], widths["logits"]
    (8, 1, None)
    """
    weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
    kernel_names = [layer.name for layer in _kernel_layers(model)]
    names = {layer.name for layer in model.layers}
    explicit_skip = skip is not None
    skip = set(_last_dense(model) if skip is None else skip)
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"skip names layers the model does not have: {unknown}.")
    if layer_bits is None:
        layer_bits = {}
    if not isinstance(layer_bits, dict):
        raise ValueError(f"layer_bits must be a dict of layer name (or regex) -> bits, got {layer_bits!r}.")
    matches = {}
    for pattern, bits in layer_bits.items():
        quantizers.check_bits(bits, f"layer_bits[{pattern!r}]", allow_none=True)
        if not isinstance(pattern, str):
            raise ValueError(f"layer_bits keys are layer names or regular expressions, got {pattern!r}.")
        if pattern in kernel_names:
            matches[pattern] = [pattern]
            continue
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"layer_bits key {pattern!r} is neither a layer name nor a regular expression ({err}).") from None
        matches[pattern] = [n for n in kernel_names if regex.fullmatch(n)]
        if not matches[pattern]:
            raise ValueError(
                f"layer_bits key {pattern!r} matches no layer with a kernel; such layers are: "
                f"{', '.join(kernel_names[:8])}{', ...' if len(kernel_names) > 8 else ''}."
            )
    widths = {}
    for name in kernel_names:
        hits = [p for p, ns in matches.items() if name in ns]
        if not hits:
            widths[name] = None if name in skip else weight_bits
            continue
        if explicit_skip and name in skip:
            raise ValueError(f"layer {name!r} is both in skip and in layer_bits ({hits[0]!r}); name it in one.")
        # Exact names first, then the expression that matches the fewest layers.
        ranked = sorted(hits, key=lambda p: (p != name, len(matches[p])))
        if len(ranked) > 1 and (ranked[0] != name) and len(matches[ranked[0]]) == len(matches[ranked[1]]):
            raise ValueError(
                f"layer {name!r} matches layer_bits keys {ranked[0]!r} and {ranked[1]!r} equally; make one "
                "more specific."
            )
        widths[name] = layer_bits[ranked[0]]
    return widths


def _as_functional(model):
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    return model


def quantize_model(
    model, weight_bits=4, activation_bits=None, per_channel=False, skip=None, relax=None, copy_weights=True,
    alpha_rate=quantizers.DEFAULT_ALPHA_RATE, layer_bits=None,
):
    """Returns the quantized twin of a Sequential or Functional Keras model.

    Args:
        model: a built Keras model (e.g. a trained FP teacher, or `keras.applications.ResNet50(weights=None)`).
        weight_bits: 1, 2, 4, 8, or None to keep kernels in full precision.
        activation_bits: 1, 2, 4, 8, or None to keep ReLUs in full precision.
        per_channel: one weight scale per output channel.
        skip: names of layers left in full precision; default: the last Dense layer (the paper
            quantizes every convolution and keeps the classifier in full precision).
        relax: None, or the initial BinaryRelax lambda of the quantized layers.
        copy_weights: start from the model's weights (fine-tuning); False keeps fresh
            initial weights (end-to-end quantization).
        alpha_rate: the alpha update of every `QuantReLU` (see `QuantReLU`); None: raw eq. (5).
        layer_bits: per-layer weight widths, ``{"layer name or regex": bits or None}``, over
            `weight_bits` and `skip` (see `resolve_layer_bits`), e.g. ``{"stem_conv": 8}``.

    The twin is trainable even when `model` was frozen (as a Distiller's teacher is).
    Layers with a kernel but no quantized counterpart (e.g. SeparableConv2D) stay in full
    precision and are listed in a warning, as is a model in which `activation_bits` finds no ReLU.
    """
    weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
    activation_bits = quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
    alpha_rate = quantizers.check_alpha_rate(alpha_rate)
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError(
            f"quantize_model needs a built Sequential or Functional Keras model, got {model!r}."
        )
    widths = resolve_layer_bits(model, weight_bits, layer_bits, skip)
    skip = set(_last_dense(model) if skip is None else skip)

    fused_relu = set()
    unsupported = []
    quantized_relus = []

    def quant_relu(name, dtype, source=None):
        quantized_relus.append(name)
        # A QuantReLU keeps its alpha regularizer (a builder's weight decay) when re-quantized.
        regularizer = getattr(source, "alpha_regularizer", None)
        return QuantReLU(bits=activation_bits, alpha_rate=alpha_rate, alpha_regularizer=regularizer, name=name, dtype=dtype)

    def clone(layer):
        if not isinstance(layer, keras.layers.Layer):
            # Keras operations written on tensors (`x + c`, `keras.ops.*` in a functional graph) hold
            # no weights: the twin reuses them.
            return layer
        config = layer.get_config()
        # A teacher is frozen once a Distiller holds it; its quantized twin is there to be trained.
        config["trainable"] = True
        for base, quant in _KERNEL_LAYERS:
            if isinstance(layer, base):
                config.pop("kernel_quantizer", None)
                bits = widths.get(layer.name, None if layer.name in skip else weight_bits)
                config.update(
                    weight_bits=bits, per_channel=per_channel and bits is not None,
                    relax=relax if bits is not None else None,
                )
                if activation_bits is not None and _is_relu_activation(layer.activation):
                    config["activation"] = None
                    fused_relu.add(layer.name)
                return quant.from_config(config)
        if activation_bits is not None and _is_relu_layer(layer) and layer.name not in skip:
            return quant_relu(layer.name, layer.dtype_policy, layer)
        if weight_bits is not None and any("kernel" in w.path for w in layer.weights):
            unsupported.append(f"{layer.name} ({type(layer).__name__})")
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name in fused_relu:
            outputs = quant_relu(f"{layer.name}_relu", None)(outputs)
        return outputs

    twin = keras.models.clone_model(_as_functional(model), clone_function=clone, call_function=call)
    if unsupported:
        warnings.warn(
            "quantize_model left these layers in full precision (no quantized counterpart): "
            + ", ".join(unsupported),
            stacklevel=2,
        )
    if activation_bits is not None and not quantized_relus:
        warnings.warn(
            f"quantize_model found no ReLU to quantize in model {model.name!r}: its activations stay "
            f"in full precision despite activation_bits={activation_bits} (only ReLU layers, "
            "Activation('relu') and fused activation='relu' are quantized).",
            stacklevel=2,
        )
    if copy_weights:
        copy_weights_by_name(model, twin)
    return twin


def copy_weights_by_name(source, target):
    """Copies each layer's weights from `source` to the same-named layer of `target`.

    The quantized layers add weights after the float ones (BinaryRelax lambda) and QuantReLU
    adds alpha to a weightless ReLU, so the source weights are a prefix of the target's.
    """
    for layer in source.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        twin = target.get_layer(layer.name)
        if len(twin.weights) < len(weights):
            raise ValueError(
                f"Layer {layer.name!r} has {len(weights)} weights but its twin only {len(twin.weights)}."
            )
        for variable, value in zip(twin.weights, weights):
            variable.assign(value)


def _quant_relus(model):
    for layer in model.layers:
        if isinstance(layer, QuantReLU):
            yield layer
        elif isinstance(layer, keras.Model):
            yield from _quant_relus(layer)


def set_alpha_decay(model, optimizer, weight_decay, factor=quantizers.ALPHA_DECAY_FACTOR):
    """Gives the alphas of `model`'s QuantReLUs the authors' weight decay, `weight_decay * factor`.

    The authors put the alphas in their own SGD parameter group with the weight decay times 0.01.
    Here the alphas leave `optimizer`'s decoupled weight decay and get an
    `L2(weight_decay * factor / 2)` regularizer instead (the coupled PyTorch rule: the decay adds
    `weight_decay * factor * alpha` to alpha's clamped gradient). Call it before the optimizer's
    first step; it replaces any earlier `optimizer.exclude_from_weight_decay` setting. Returns
    the alpha variables.

    >>> from faqd_tf.models import resnet_cifar
    >>> student = quantize_model(resnet_cifar(8, input_shape=(8, 8, 3)), activation_bits=2)
    >>> optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    >>> len(set_alpha_decay(student, optimizer, weight_decay=1e-4))
    7
    """
    for name, value in (("weight_decay", weight_decay), ("factor", factor)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"set_alpha_decay: {name}={value!r} must be a number >= 0.")
    decay = float(weight_decay) * float(factor)
    relus = [layer for layer in _quant_relus(model) if layer.alpha is not None]
    for layer in relus:
        layer.alpha_regularizer = keras.regularizers.L2(decay / 2) if decay else None
    alphas = [layer.alpha for layer in relus]
    if alphas:
        optimizer.exclude_from_weight_decay(var_list=alphas)
    return alphas
