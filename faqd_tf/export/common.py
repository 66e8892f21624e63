"""The pieces the export formats share: the quantized layers of a model and their integer codes,
rebuilding a model from its Keras config, checking an output path, and the LSB-first bit packing
that the packed format, TFLite INT4 and ONNX INT4/INT2 tensors all use. The files are written with
`faqd_tf.atomic.write_atomically`.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=2)
>>> sorted(path for path, _ in quantized_layers(model).values())[:2]
['s1b1_conv1', 's1b1_conv2']
>>> codes, scale = layer_codes(model.get_layer("stem_conv"))
>>> set(np.unique(codes).tolist()) <= {-1.0, 0.0, 1.0}  # 2-bit codes
True
>>> pack_bits([1, 2, 3, 0], 2)  # four 2-bit values in one byte, the first in the lowest bits
b'9'
"""

import os

import keras
import numpy as np

from faqd_tf.fields import is_integer
from faqd_tf.inputs import first_line
from faqd_tf.quantizers import FrozenQuantizer
from faqd_tf.summary import iter_layers, quantized_kernel_bits

__all__ = [
    "check_output_path",
    "dequantize",
    "freeze_layer",
    "is_count",
    "kernel_names",
    "layer_codes",
    "model_json",
    "pack_bits",
    "quantized_kernels",
    "quantized_layers",
    "rebuild",
]


def kernel_names(layer):
    """The names of `layer`'s kernels: ``("kernel",)``, or its `kernel_names` (two for
    `QuantSeparableConv2D`)."""
    return tuple(getattr(layer, "kernel_names", ("kernel",)))


def quantized_kernels(model):
    """{id(kernel variable): (path, layer, kernel name)} of every quantized kernel: one per layer,
    two for a `QuantSeparableConv2D` (its depthwise and pointwise kernels)."""
    found = {}
    for path, layer, _ in iter_layers(model):
        if quantized_kernel_bits(layer) is not None:
            for name in kernel_names(layer):
                found[id(getattr(layer, name))] = (path, layer, name)
    return found


def quantized_layers(model):
    """{id(first kernel variable): (path, layer)} of the layers whose kernel is quantized."""
    found = {}
    for path, layer, _ in iter_layers(model):
        if quantized_kernel_bits(layer) is not None:
            found[id(getattr(layer, kernel_names(layer)[0]))] = (path, layer)
    return found


def layer_codes(layer, kernel=None):
    """`(codes, scale)` of a quantized layer's kernel (`kernel`: its name, where the layer has two)
    as float32 NumPy arrays."""
    kernel_codes = getattr(layer, "kernel_codes", None)
    if kernel_codes is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) has a quantized kernel but no kernel_codes() "
            "method, so its kernel cannot be stored as integer codes; use the faqd_tf quantized layers."
        )
    codes, scale = kernel_codes() if kernel is None else kernel_codes(kernel)
    return np.asarray(codes, np.float32), np.asarray(scale, np.float32)


def dequantize(codes, scale, kernel_shape):
    return (codes.astype(np.float32) * scale.astype(np.float32)).reshape(kernel_shape)


def freeze_layer(layer, codes, scale, kernel="kernel"):
    """Sets `layer`'s kernel named `kernel` to ``codes * scale`` and gives the layer a
    `FrozenQuantizer` holding `scale`; a layer with two kernels keeps both kernels' scales in it
    (freeze each of them)."""
    # Codes come in the quantizer's layout (`kernel_to_quantize`): a transposed conv's last two axes
    # are swapped there, which a reshape would scramble.
    variable = getattr(layer, kernel)
    q = codes.astype(np.float32) * scale.astype(np.float32)
    restore = getattr(layer, "_restore_kernel_shape", None)
    value = restore(q, kernel, tuple(variable.shape)) if restore else q
    variable.assign(np.reshape(np.asarray(value), tuple(variable.shape)))
    bits = quantized_kernel_bits(layer)
    names = kernel_names(layer)
    if len(names) == 1:
        layer.kernel_quantizer = FrozenQuantizer(bits, layer.per_channel, scale)
        return
    old = layer.kernel_quantizer
    scales = (
        dict(old.scale) if isinstance(old, FrozenQuantizer) and isinstance(old.scale, dict) else {}
    )
    scales[kernel] = scale
    # Until every kernel is frozen, the others keep the scales their current quantizer gives.
    for name in names:
        if name not in scales:
            scales[name] = layer_codes(layer, name)[1]
    layer.kernel_quantizer = FrozenQuantizer(bits, layer.per_channel, scales)


def model_json(model):
    try:
        return model.to_json()
    except Exception as err:  # subclassed models without get_config
        raise ValueError(
            f"Model {model.name!r} has no serializable Keras config ({type(err).__name__}: {err}); "
            "pack/freeze need a Functional or Sequential model built from serializable layers."
        ) from err


def rebuild(config_json, custom_objects=None):
    try:
        return keras.models.model_from_json(config_json, custom_objects=custom_objects)
    except Exception as err:
        raise ValueError(
            f"Could not rebuild the model from its Keras config ({type(err).__name__}: {first_line(err, 300)}). "
            "Custom layers must be registered or passed as custom_objects."
        ) from err


def check_output_path(path):
    """Raises a one-line ValueError when `path` cannot receive a file: a folder, or a missing or
    non-folder parent. Checked before any conversion work (and again by the write itself)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"Output path {path} is a folder; give a file name inside it.")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.exists(folder) else "does not exist"
        raise ValueError(
            f"Output path {path}: its folder {folder} {what}; create the folder first."
        )
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"Output path {path}: the folder {folder} is not writable.")


def pack_bits(u, bits):
    """Unsigned `bits`-bit integers `u` packed ``8 / bits`` per byte, the first in the least
    significant bits (LSB first; the last byte zero-padded). ONNX INT4/INT2 and TFLite INT4 tensors
    use this layout too, on the two's-complement bits of the codes."""
    u = np.asarray(u, np.uint8).reshape(-1)
    if bits == 8:
        return u.tobytes()
    per_byte = 8 // bits
    pad = (-u.size) % per_byte
    u = np.concatenate([u, np.zeros(pad, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=1).astype(np.uint8).tobytes()


def is_count(value, limit=2**62):
    return is_integer(value) and 0 <= value <= limit
