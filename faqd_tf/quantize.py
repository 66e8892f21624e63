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


def _as_functional(model):
    if isinstance(model, keras.Sequential):
        inputs = keras.Input(batch_shape=model.inputs[0].shape, dtype=model.inputs[0].dtype)
        x = inputs
        for layer in model.layers:
            x = layer(x)
        return keras.Model(inputs, x, name=model.name)
    return model


def quantize_model(
    model, weight_bits=4, activation_bits=None, per_channel=False, skip=None, relax=None, copy_weights=True
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

    The twin is trainable even when `model` was frozen (as a Distiller's teacher is).
    Layers with a kernel but no quantized counterpart (e.g. SeparableConv2D) stay in full
    precision and are listed in a warning.
    """
    weight_bits = quantizers.check_bits(weight_bits, "weight_bits", allow_none=True)
    activation_bits = quantizers.check_bits(activation_bits, "activation_bits", allow_none=True)
    if not isinstance(model, keras.Model) or not model.built or not model.inputs:
        raise ValueError(
            f"quantize_model needs a built Sequential or Functional Keras model, got {model!r}."
        )
    names = {layer.name for layer in model.layers}
    skip = set(_last_dense(model) if skip is None else skip)
    unknown = sorted(skip - names)
    if unknown:
        raise ValueError(f"skip names layers the model does not have: {unknown}.")

    fused_relu = set()
    unsupported = []

    def clone(layer):
        config = layer.get_config()
        # A teacher is frozen once a Distiller holds it; its quantized twin is there to be trained.
        config["trainable"] = True
        for base, quant in _KERNEL_LAYERS:
            if isinstance(layer, base):
                config.pop("kernel_quantizer", None)
                bits = None if layer.name in skip else weight_bits
                config.update(
                    weight_bits=bits, per_channel=per_channel and bits is not None,
                    relax=relax if bits is not None else None,
                )
                if activation_bits is not None and _is_relu_activation(layer.activation):
                    config["activation"] = None
                    fused_relu.add(layer.name)
                return quant.from_config(config)
        if activation_bits is not None and _is_relu_layer(layer) and layer.name not in skip:
            return QuantReLU(bits=activation_bits, name=layer.name, dtype=layer.dtype_policy)
        if weight_bits is not None and any("kernel" in w.path for w in layer.weights):
            unsupported.append(f"{layer.name} ({type(layer).__name__})")
        return layer.__class__.from_config(config)

    def call(layer, *args, **kwargs):
        outputs = layer(*args, **kwargs)
        if layer.name in fused_relu:
            outputs = QuantReLU(bits=activation_bits, name=f"{layer.name}_relu")(outputs)
        return outputs

    twin = keras.models.clone_model(_as_functional(model), clone_function=clone, call_function=call)
    if unsupported:
        warnings.warn(
            "quantize_model left these layers in full precision (no quantized counterpart): "
            + ", ".join(unsupported),
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
