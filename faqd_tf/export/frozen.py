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

The helpers it uses (the quantized layers of a model, their codes, rebuilding from a config) are
:mod:`faqd_tf.export.common`'s, shared with the other formats.

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

import keras  # noqa: F401 (the example uses it)
import numpy as np  # noqa: F401 (the example uses it)

from faqd_tf.export.common import (
    freeze_layer,
    layer_codes,
    model_json,
    quantized_kernels,
    rebuild,
)

__all__ = ["freeze"]


def freeze(model, custom_objects=None):
    """A copy of `model` whose quantized kernels hold Q(w) and are not re-quantized.

    Same config, same weights, except that each quantized kernel is replaced by
    ``codes * scale`` and its quantizer by a :class:`faqd_tf.quantizers.FrozenQuantizer`
    (identity). In inference the copy computes exactly what `model` computes, without the Lloyd
    iterations in its graph; this is what :func:`faqd_tf.export.to_tflite` converts. `model` itself is not modified.
    """
    clone = rebuild(model_json(model), custom_objects)
    sources, targets = model.weights, clone.weights
    if [tuple(v.shape) for v in sources] != [tuple(v.shape) for v in targets]:
        raise ValueError(
            f"Could not clone {model.name!r}: the rebuilt model's weights differ in number or shape."
        )
    for source, target in zip(sources, targets):
        target.assign(source)
    source_kernels = quantized_kernels(model)
    target_kernels = quantized_kernels(clone)
    for source, target in zip(sources, targets):
        if id(source) in source_kernels:
            if id(target) not in target_kernels:
                raise ValueError(
                    f"Could not clone {model.name!r}: {target.path!r} lost its quantizer."
                )
            _, layer, name = source_kernels[id(source)]
            codes, scale = layer_codes(layer, name)
            freeze_layer(target_kernels[id(target)][1], codes, scale, name)
    return clone
