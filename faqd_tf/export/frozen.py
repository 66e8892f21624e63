"""Frozen copies of a quantized model: each quantized kernel holds Q(w) and is not re-quantized.

Re-quantizing an already-quantized kernel is *not* exactly idempotent with the Lloyd/mean scales of
:mod:`faqd_tf.quantizers` (measured: ``Q(codes*scale)`` differs from ``codes*scale`` by up to
~2e-6 relative at 1 bit, where ``mean|w|`` of equal magnitudes rounds; at 8 bits per channel the
Lloyd iteration can even move codes when a channel's top code is below ``L``). So `freeze` (and
:func:`faqd_tf.export.unpack`) sets each quantized kernel to ``codes * scale`` (computed in float32,
the same product the quantized model forms) and gives the layer a
:class:`faqd_tf.quantizers.FrozenQuantizer`: it has the layer's ``bits``/``per_channel``/``precision``
(so summaries count bits), remembers the scales, and passes the kernel through unchanged. The frozen
model's outputs are then identical to the quantized model's in inference. To resume
quantization-aware training from it, give the layers a fresh quantizer, e.g.
``layer.kernel_quantizer = faqd_tf.quantizers.WeightQuantizer(layer.weight_bits, layer.per_channel)``.

The helpers here (the quantized layers of a model, their codes, rebuilding from a config) serve
both exports, :mod:`faqd_tf.export.packed` and :mod:`faqd_tf.export.tflite`.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=2)
>>> frozen = freeze(model)
>>> codes, scale = model.get_layer("stem_conv").kernel_codes()
>>> kernel = keras.ops.convert_to_numpy(frozen.get_layer("stem_conv").kernel)
>>> bool(np.array_equal(kernel, np.asarray(codes) * np.asarray(scale)))
True
>>> frozen.get_layer("stem_conv").kernel_quantizer
FrozenQuantizer(bits=2, per_channel=False)
"""

import keras
import numpy as np

from faqd_tf.quantizers import FrozenQuantizer
from faqd_tf.summary import iter_layers, quantized_kernel_bits

__all__ = ["freeze"]


def _quantized_layers(model):
    """{id(kernel variable): (path, layer)} of the layers whose kernel is quantized."""
    found = {}
    for path, layer, _ in iter_layers(model):
        if quantized_kernel_bits(layer) is not None:
            found[id(layer.kernel)] = (path, layer)
    return found


def _layer_codes(layer):
    """`(codes, scale)` of a quantized layer's kernel as float32 NumPy arrays."""
    kernel_codes = getattr(layer, "kernel_codes", None)
    if kernel_codes is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has a quantized kernel but no kernel_codes() "
            "method, so its kernel cannot be stored as integer codes; use the faqd_tf quantized layers."
        )
    codes, scale = kernel_codes()
    return np.asarray(codes, np.float32), np.asarray(scale, np.float32)


def _dequantize(codes, scale, kernel_shape):
    return (codes.astype(np.float32) * scale.astype(np.float32)).reshape(kernel_shape)


def _model_json(model):
    try:
        return model.to_json()
    except Exception as err:  # subclassed models without get_config
        raise ValueError(
            f"Model {model.name!r} has no serializable Keras config ({type(err).__name__}: {err}); "
            "pack/freeze need a Functional or Sequential model built from serializable layers."
        ) from err


def _rebuild(config_json, custom_objects=None):
    try:
        return keras.models.model_from_json(config_json, custom_objects=custom_objects)
    except Exception as err:
        raise ValueError(
            f"Could not rebuild the model from its Keras config ({type(err).__name__}: {_first_line(err)}). "
            "Custom layers must be registered or passed as custom_objects."
        ) from err


def _first_line(err):
    return (str(err).strip().splitlines() or [""])[0][:300]


def _freeze_layer(layer, codes, scale):
    layer.kernel.assign(_dequantize(codes, scale, tuple(layer.kernel.shape)))
    layer.kernel_quantizer = FrozenQuantizer(quantized_kernel_bits(layer), layer.per_channel, scale)


def freeze(model, custom_objects=None):
    """A copy of `model` whose quantized kernels hold Q(w) and are not re-quantized.

    Same config, same weights, except that each quantized kernel is replaced by
    ``codes * scale`` and its quantizer by a :class:`faqd_tf.quantizers.FrozenQuantizer`
    (identity). In inference the copy computes exactly what `model` computes, without the Lloyd
    iterations in its graph; this is what :func:`faqd_tf.export.to_tflite` converts. `model` itself is not modified.
    """
    clone = _rebuild(_model_json(model), custom_objects)
    sources, targets = model.weights, clone.weights
    if [tuple(v.shape) for v in sources] != [tuple(v.shape) for v in targets]:
        raise ValueError(f"Could not clone {model.name!r}: the rebuilt model's weights differ in number or shape.")
    for source, target in zip(sources, targets):
        target.assign(source)
    source_layers = _quantized_layers(model)
    target_layers = _quantized_layers(clone)
    for source, target in zip(sources, targets):
        if id(source) in source_layers:
            if id(target) not in target_layers:
                raise ValueError(f"Could not clone {model.name!r}: {target.path!r} lost its quantizer.")
            codes, scale = _layer_codes(source_layers[id(source)][1])
            _freeze_layer(target_layers[id(target)][1], codes, scale)
    return clone
