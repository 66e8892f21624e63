"""TFLite export of a quantized student (`to_tflite`), a runner for the result (`run_tflite`) and
what its kernels are stored as (`kernel_types`).

Converted with Keras's public route (``model.export(format="litert")``) from
:func:`faqd_tf.export.freeze` (model), builtin TFLite ops only, in one of four modes:

- ``"float"``: float32 weights and activations; outputs equal Keras' up to float rounding.
- ``"int8"``: every quantized kernel is stored as an int8 tensor whose values are the student's
  integer codes (``layer.kernel_codes()``: 1-bit and ternary codes included) with the layer's scale
  as the TFLite quantization scale (one, or one per output channel; a DEPTHWISE_CONV_2D always gets
  one per channel, as its hybrid kernel reads that many); activations stay float (TFLite's hybrid
  kernels). Other weights (BatchNormalization folded into biases, full-precision layers) stay
  float32. A quantized Conv3D is refused (`check_integer`).
- ``"int4"``: as ``"int8"``, but the kernels of CONV_2D and FULLY_CONNECTED ops are INT4 tensors
  (two codes per byte, the first in the low nibble, two's complement: LiteRT's
  ``UnpackPackedIntToInt8``), which LiteRT's hybrid CONV_2D and FULLY_CONNECTED kernels run with
  float activations. 1-, 2- and 4-bit codes fit. Kernels LiteRT cannot run at int4 stay int8 and
  are named in a warning: DEPTHWISE_CONV_2D (its hybrid kernel refuses INT4 filters: "Type FLOAT32
  with filter type INT4 not currently supported"), TRANSPOSE_CONV (not tried at int4) and 8-bit
  layers (their codes need 8 bits).
- ``"full"``: the same int8 codes, and int8 activations calibrated on unlabeled images (the
  converter's representative dataset). Where a ``QuantReLU`` is the activation, its output is an
  int8 tensor of scale ``alpha`` and zero point -128: level ``k * alpha`` is the integer ``k - 128``
  exactly (for this the export graph writes the quantized ReLU as ``min(x + alpha/2, top*alpha)``
  rounded on that grid, the same function in float).

The converter folds a BatchNormalization that follows a convolution into its kernel, multiplying
output channel ``c`` by ``m_c = gamma_c / sqrt(var_c + eps)``; the stored scale of that channel is then
``|m_c| * scale``, and where ``m_c < 0`` the stored integers are ``-codes`` (TFLite scales are
positive). The converter alone cannot store the codes: it always re-quantizes float weights with its
own max-abs scale (``max|w| / 127``, so 4-bit codes become multiples of 127/7 rounded), whatever the
trained grid (tensorflow/model-optimization#574). So the codes are written into the converted
flatbuffer afterwards (with ``ai_edge_litert``'s flatbuffer schema): each quantized layer's kernel is
located by its values (the codes times a per-channel factor, or the converter's rounding of that;
in TFLite's layout: a Conv1D's ``(k, in, out)`` runs as a CONV_2D of ``(out, 1, k, in)``, a
Conv2DTranspose's ``(kh, kw, out, in)`` as a TRANSPOSE_CONV of ``(out, kh, kw, in)``, a
SeparableConv2D as a DEPTHWISE_CONV_2D and a 1x1 CONV_2D, each kernel with its own codes),
its integers and scales replaced, and, in ``"full"`` mode, its int32 bias re-expressed in the new
``input_scale * weight_scale``.

Why int4 is written here rather than by ai-edge-quantizer: the TFLite converter has no option for
int4 weights of these ops (tensorflow/tensorflow#64193, moved to LiteRT#73). ai-edge-quantizer's
``DEQUANTIZED_WEIGHT_RECOVERY`` installs and runs offline and produces INT4 CONV_2D/FULLY_CONNECTED
kernels from a float file whose weights lie on a grid, but it infers each channel's grid from the
float values (the smallest gap between distinct magnitudes): a channel whose codes share a factor
(only +-2, +-4, +-6, say) comes back with halved codes and a doubled scale, and the scales carry
the float rounding of the products (checked with ai-edge-quantizer 0.10: codes 2, -2, 6, -4 at
scale 0.01 came back as 1, -1, 3, -2 at 0.02; a scale of 0.03 as 0.02999999). Here the codes come
from ``kernel_codes()`` itself, through the same flatbuffer pass as ``"int8"``, and no further
dependency is needed.
INT2 is not written: LiteRT's FULLY_CONNECTED runs INT2 weights, but its CONV_2D hybrid kernel
accepts an INT2 filter and silently computes wrong outputs (measured: errors as large as the
logits), so 1- and 2-bit codes are stored as INT4.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> import os, tempfile
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=2)
>>> path = os.path.join(tempfile.mkdtemp(), "student.tflite")
>>> nbytes = to_tflite(model, path, mode="int8")
>>> x = np.random.rand(2, 16, 16, 3).astype("float32")
>>> run_tflite(path, x).shape
(2, 10)
>>> nbytes = to_tflite(model, path, mode="int4")
>>> sorted(set(kernel_types(path).values()))
['FLOAT32', 'INT4']
"""

import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from faqd_tf.atomic import write_atomically
from faqd_tf.export.common import (
    check_output_path,
    is_count,
    kernel_names,
    layer_codes,
    pack_bits,
    quantized_kernels,
    quantized_layers,
)
from faqd_tf.export.frozen import freeze
from faqd_tf.inputs import first_line
from faqd_tf.layers import QuantReLU
from faqd_tf.summary import quantized_kernel_bits

__all__ = ["MODES", "check_integer", "kernel_types", "run_tflite", "to_tflite"]

MODES = ("float", "int8", "int4", "full")
# The ops whose hybrid (float activation) kernels in LiteRT run INT4 filters.
_INT4_OPS = ("CONV_2D", "FULLY_CONNECTED")
# Ops whose input 1 is a kernel, and the channel axis of that kernel in TFLite's layout
# (TRANSPOSE_CONV: OHWI too, Keras's (h, w, out, in) moved).
_KERNEL_AXIS = {"CONV_2D": 0, "FULLY_CONNECTED": 0, "DEPTHWISE_CONV_2D": 3, "TRANSPOSE_CONV": 0}
# The op versions TFLite gives a hybrid (float input, int8 kernel) op: per-tensor, per-channel
# (tensorflow/lite/tools/versioning/op_version.cc; TRANSPOSE_CONV: what the converter's dynamic
# range quantization writes).
_HYBRID_VERSION = {
    "CONV_2D": (2, 5),
    "DEPTHWISE_CONV_2D": (4, 6),
    "FULLY_CONNECTED": (3, 3),
    "TRANSPOSE_CONV": (2, 2),
}
# Inputs (activation, bias) of each kernel op: TRANSPOSE_CONV takes (output shape, kernel, input, bias).
_DATA_BIAS = {"TRANSPOSE_CONV": (2, 3)}


class _GridReLU(keras.layers.Layer):
    """`QuantReLU` written for integer export: the same levels ``k * alpha``, k = 0..2^b - 1.

    ``floor(x / alpha) + 1`` (clipped) equals ``x + alpha/2`` rounded half up on the grid of step
    alpha, which is what a FakeQuant of range ``[0, 255 * alpha]`` computes; the converter then gives
    the output tensor scale alpha and zero point -128, and folds the ``+ alpha/2`` into the bias of
    the preceding convolution.
    """

    def __init__(self, alpha, bits, **kwargs):
        super().__init__(**kwargs)
        self.alpha = float(alpha)
        self.top = float(2**bits - 1)

    def call(self, x):
        x = keras.ops.minimum(x + 0.5 * self.alpha, self.top * self.alpha)
        return tf.quantization.fake_quant_with_min_max_args(
            x, min=0.0, max=255.0 * self.alpha, num_bits=8
        )


def _integer_graph(model):
    """`model` with each quantized ReLU replaced by `_GridReLU` (layers otherwise shared)."""

    def swap(layer):
        if isinstance(layer, QuantReLU) and layer.bits is not None:
            return _GridReLU(
                float(keras.ops.convert_to_numpy(layer.alpha)), layer.bits, name=layer.name
            )
        return layer

    return keras.models.clone_model(model, clone_function=swap, recursive=True)


def _calibration_images(calibration, model, samples):
    """Up to `samples` float32 images (N, *input shape) from an array, a tf.data.Dataset or an
    iterable of batches (`x` or `(x, ...)`)."""
    if len(model.inputs) != 1:
        raise ValueError(
            f"mode='full' calibrates models with one input; {model.name!r} has {len(model.inputs)}."
        )
    shape = tuple(model.inputs[0].shape[1:])
    if isinstance(calibration, tf.data.Dataset):
        calibration = calibration.as_numpy_iterator()
    if hasattr(calibration, "shape") and hasattr(calibration, "dtype"):
        batches = [calibration]
    else:
        batches = calibration
    images, count = [], 0
    for batch in batches:
        if isinstance(batch, (tuple, list)):
            batch = batch[0]
        batch = np.asarray(batch)
        if batch.shape[1:] != shape or not np.issubdtype(batch.dtype, np.number):
            raise ValueError(
                f"Calibration images have shape {batch.shape[1:]} and dtype {batch.dtype}; the model takes "
                f"{shape} float images (pass unlabeled training images, e.g. x_train[:200])."
            )
        batch = batch[: samples - count].astype(np.float32)
        if not np.all(np.isfinite(batch)):
            raise ValueError("Calibration images contain NaN or infinite values.")
        images.append(batch)
        count += len(batch)
        if count >= samples:
            break
    if not count:
        raise ValueError(
            "The calibration data hold no images; mode='full' needs unlabeled images to calibrate."
        )
    return np.concatenate(images)


def _convert(deploy, mode, images, batch_size):
    """The flatbuffer bytes of `deploy` converted through ``model.export(format="litert")``."""
    kwargs = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if mode == "full":

        def representative():
            for image in images:
                yield [image[None]]

        kwargs = {
            "optimizations": [tf.lite.Optimize.DEFAULT],
            "representative_dataset": representative,
            "target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        }
    signature = None
    if batch_size is not None:
        specs = [tf.TensorSpec([batch_size, *x.shape[1:]], x.dtype) for x in deploy.inputs]
        signature = specs if len(specs) == 1 else [specs]
    with tempfile.TemporaryDirectory() as tmp:
        target = os.path.join(tmp, "model.tflite")
        try:
            deploy.export(
                target, format="litert", verbose=False, input_signature=signature, **kwargs
            )
        except Exception as err:
            raise ValueError(
                f"TFLite conversion of {deploy.name!r} (mode {mode!r}) failed: "
                f"{type(err).__name__}: {first_line(err, 300)}"
            ) from err
        with open(target, "rb") as f:
            return f.read()


def check_integer(model):
    """Raises a one-line ValueError naming the first quantized layer of `model` whose codes the
    integer modes (``"int8"``, ``"int4"``, ``"full"``) cannot store: a 3-D convolution, which the
    converter writes as CONV_3D, an op LiteRT runs with float kernels only (no hybrid or int8 form
    to hold the codes). Cheap, writes nothing; the CLI runs it before training."""
    for path, layer in quantized_layers(model).values():
        if isinstance(layer, (keras.layers.Conv3D, keras.layers.Conv3DTranspose)):
            raise ValueError(
                f"Integer TFLite cannot store the codes of layer {path!r} ({type(layer).__name__}): LiteRT's "
                "CONV_3D runs float kernels only; keep it float (quantize_model(..., skip=[...])), or "
                "export with mode='float' or as packed."
            )


def to_tflite(
    model, path, mode="float", calibration=None, calibration_samples=200, batch_size=None
):
    """Converts `model` (inference mode) to a TFLite flatbuffer at `path`; returns its size in bytes.

    Args:
        model: a built Functional or Sequential model; quantized for `"int8"` and `"full"`.
        path: output file; written atomically (no partial file on failure).
        mode: `"float"`, `"int8"` (the integer codes as int8 kernels, float activations), `"int4"`
            (int4 kernels where LiteRT runs them, int8 elsewhere, with a warning naming those
            layers) or `"full"` (int8 kernels and activations); see the module docstring.
        calibration: for `"full"`: unlabeled images, an array ``(N, *input_shape)``, a
            `tf.data.Dataset` or an iterable of batches (`x` or `(x, ...)`; labels are ignored).
        calibration_samples: how many of those images calibrate the activation ranges.
        batch_size: fixed batch size of the converted signature; None (default) leaves it dynamic
            (``interpreter.resize_tensor_input`` sets it).
    """
    if mode not in MODES:
        raise ValueError(
            f"mode={mode!r} is not a TFLite export mode; use one of {', '.join(MODES)}."
        )
    if mode != "float" and not quantized_layers(model):
        raise ValueError(
            f"mode={mode!r} stores a quantized student's integer codes, but {model.name!r} has no quantized "
            "kernels; quantize it first (faqd_tf.quantize_model) or use mode='float'."
        )
    if mode != "float":
        check_integer(model)
    if mode == "full" and calibration is None:
        raise ValueError(
            "mode='full' needs calibration images (calibration=x_train[:200], labels not needed)."
        )
    if not is_count(calibration_samples) or calibration_samples < 1:
        raise ValueError(f"calibration_samples={calibration_samples!r} must be a positive integer.")
    check_output_path(path)
    images = (
        _calibration_images(calibration, model, calibration_samples) if mode == "full" else None
    )
    deploy = freeze(model)
    flatbuffer = _convert(
        _integer_graph(deploy) if mode == "full" else deploy, mode, images, batch_size
    )
    if mode != "float":
        flatbuffer, as_int8 = _store_codes(flatbuffer, deploy, mode)
        if as_int8:
            reasons = {}
            for name, reason in as_int8:
                reasons.setdefault(reason, []).append(name)
            warnings.warn(
                "to_tflite(mode='int4') stored these kernels as int8: "
                + "; ".join(f"{', '.join(names)} ({reason})" for reason, names in reasons.items()),
                stacklevel=2,
            )
    return write_atomically(path, [flatbuffer])


def _builtin_name(schema, code):
    names = {
        value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")
    }
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode))


def _tfl_codes(codes, op_name, shape):
    """Codes in the layout of the TFLite kernel of `shape`: output channels first for CONV_2D,
    TRANSPOSE_CONV and FULLY_CONNECTED (OHWI, (out, in)), ``(1, kh, kw, channels)`` for
    DEPTHWISE_CONV_2D; None where they do not fit `shape`. A Conv1D's ``(k, in, out)`` runs as a
    CONV_2D of kernel ``(out, 1, k, in)``: a size-1 axis more, which only a reshape can place."""
    codes = np.moveaxis(codes, -2 if op_name == "DEPTHWISE_CONV_2D" else -1, 0)
    shape = tuple(int(d) for d in shape)
    if codes.shape == shape:
        return codes
    axis = _KERNEL_AXIS[op_name]
    if (
        len(shape) == len(codes.shape) + 1
        and shape[axis] == codes.shape[axis]
        and [d for d in codes.shape if d != 1] == [d for d in shape if d != 1]
    ):
        return codes.reshape(shape)
    return None


def _fit(values, codes, axis, converter_scale):
    """Per-channel `(sign, scale)` such that the kernel `values` hold ``sign * codes * scale``: exactly
    (float32 values, up to float rounding) or as the converter's own max-abs int8 rounding of it
    (`converter_scale` given); None when they do not."""
    v = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1).astype(np.float64)
    k = np.moveaxis(codes, axis, 0).reshape(codes.shape[axis], -1).astype(np.float64)
    rows = np.arange(len(k))
    top_index = np.argmax(np.abs(k), axis=1)
    top = np.abs(k[rows, top_index])
    live = top > 0
    ratio = np.divide(v[rows, top_index], k[rows, top_index], out=np.zeros(len(k)), where=live)
    sign = np.sign(ratio)
    if converter_scale is None:
        scale = np.abs(ratio)
        fits = np.abs(v - ratio[:, None] * k) <= 1e-5 * (np.abs(ratio) * top)[:, None]
    else:
        # The converter stores round(w / (max|w| / 127)): codes * 127 / max|codes| rounded.
        want = sign[:, None] * k * np.divide(127.0, top, out=np.zeros(len(k)), where=live)[:, None]
        fits = np.abs(v - want) <= 0.5 + 1e-3
        scale = np.asarray(converter_scale, np.float64) * np.divide(
            127.0, top, out=np.zeros(len(k)), where=live
        )
    if not fits.all() or not np.any(sign != 0):
        return None
    # A channel without codes, or one that a folded BatchNormalization zeroes, stores zeros; any
    # positive scale serves it.
    scale = np.where(sign != 0, scale, 1.0)
    return np.where(sign != 0, sign, 1.0), scale


class _Flatbuffer:
    """The parts of a converted TFLite model that `_store_codes` reads and rewrites."""

    def __init__(self, data):
        from ai_edge_litert import schema_py_generated as schema  # the LiteRT flatbuffer schema

        self.schema = schema
        self.model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
        if len(self.model.subgraphs) != 1:
            raise ValueError(
                f"The converted model has {len(self.model.subgraphs)} subgraphs; expected one."
            )
        self.graph = self.model.subgraphs[0]
        self.tensors = self.graph.tensors

    def values(self, index):
        tensor = self.tensors[index]
        buffer = self.model.buffers[tensor.buffer]
        if buffer.data is None or getattr(buffer, "offset", 0):
            return None
        dtype = {
            self.schema.TensorType.FLOAT32: "<f4",
            self.schema.TensorType.INT8: "i1",
            self.schema.TensorType.INT32: "<i4",
        }.get(tensor.type)
        if dtype is None:
            return None
        return np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype).reshape(
            tensor.shape
        )

    def kernel_sites(self):
        """`(op, op name, weight tensor index)` of the conv/FC ops with a constant kernel."""
        sites = []
        for op in self.graph.operators:
            name = _builtin_name(self.schema, self.model.operatorCodes[op.opcodeIndex])
            if (
                name in _KERNEL_AXIS
                and len(op.inputs) > 1
                and self.values(op.inputs[1]) is not None
            ):
                sites.append((op, name, int(op.inputs[1])))
        return sites

    def set_values(self, index, data, tensor_type, scales, axis):
        """Points tensor `index` at a new buffer holding `data` (bytes) of `tensor_type`, quantized
        with `scales` (zero points 0) along `axis`."""
        tensor = self.tensors[index]
        others = [t for i, t in enumerate(self.tensors) if i != index and t.buffer == tensor.buffer]
        if not others and tensor.buffer:
            self.model.buffers[tensor.buffer].data = None  # no longer referenced
        buffer = self.schema.BufferT()
        buffer.data = np.frombuffer(data, np.uint8)
        self.model.buffers.append(buffer)
        tensor.buffer = len(self.model.buffers) - 1
        tensor.type = tensor_type
        quantization = self.schema.QuantizationParametersT()
        quantization.scale = [float(s) for s in scales]
        quantization.zeroPoint = [0] * len(scales)
        quantization.quantizedDimension = axis if len(scales) > 1 else 0
        tensor.quantization = quantization

    def set_version(self, op, version):
        code = self.model.operatorCodes[op.opcodeIndex]
        if code.version >= version:
            return
        for i, other in enumerate(self.model.operatorCodes):
            if (other.builtinCode, other.deprecatedBuiltinCode, other.version) == (
                code.builtinCode,
                code.deprecatedBuiltinCode,
                version,
            ):
                op.opcodeIndex = i
                return
        new = self.schema.OperatorCodeT()
        new.builtinCode, new.deprecatedBuiltinCode, new.version = (
            code.builtinCode,
            code.deprecatedBuiltinCode,
            version,
        )
        self.model.operatorCodes.append(new)
        op.opcodeIndex = len(self.model.operatorCodes) - 1

    def serialize(self):
        import flatbuffers

        builder = flatbuffers.Builder(1024)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _store_codes(flatbuffer, model, mode):
    """`flatbuffer` with every quantized kernel of `model` stored as its codes: int8, or in mode
    ``"int4"`` int4 where LiteRT runs it; and the `(layer name, reason)` of the kernels that mode
    ``"int4"`` left at int8."""
    fb = _Flatbuffer(flatbuffer)
    sites = fb.kernel_sites()
    used, as_int8 = set(), []
    for _, layer, kernel in quantized_kernels(model).values():
        codes, _ = layer_codes(layer, kernel)
        matches = []
        for op, op_name, index in sites:
            tensor = fb.tensors[index]
            tfl_codes = _tfl_codes(codes, op_name, tensor.shape)
            if index in used or tfl_codes is None:
                continue
            axis = _KERNEL_AXIS[op_name]
            converter_scale = None
            if tensor.type == fb.schema.TensorType.INT8:
                converter_scale = np.broadcast_to(
                    np.asarray(tensor.quantization.scale, np.float64), (tfl_codes.shape[axis],)
                )
            fit = _fit(fb.values(index), tfl_codes, axis, converter_scale)
            if fit is not None:
                matches.append((op, op_name, index, tfl_codes, axis, fit))
        if len(matches) != 1:
            which = f" ({kernel})" if len(kernel_names(layer)) > 1 else ""
            raise ValueError(
                f"Could not locate the kernel of layer {layer.name!r}{which} in the converted model "
                f"({len(matches)} candidates fit its codes); the TFLite converter rewrote it beyond recognition."
            )
        op, op_name, index, tfl_codes, axis, (sign, scale) = matches[0]
        used.add(index)
        shape = [1] * tfl_codes.ndim
        shape[axis] = -1
        values = (tfl_codes * sign.reshape(shape)).astype(np.int8)
        # Equal up to the float rounding of recovering them: one scale, as trained (layer-wise).
        per_tensor = np.all(np.abs(scale - scale[0]) <= 1e-6 * scale[0])
        if op_name == "DEPTHWISE_CONV_2D" and mode in ("int8", "int4"):
            # LiteRT's hybrid depthwise kernel reads one scale per output channel whatever the
            # tensor holds: with a layer-wise scale it read past it (measured: outputs of 1e34).
            per_tensor = False
        scales = scale[:1] if per_tensor else scale
        if mode == "int4" and op_name in _INT4_OPS and quantized_kernel_bits(layer) <= 4:
            # Two's complement nibbles, LSB first (LiteRT's UnpackPackedIntToInt8).
            fb.set_values(
                index,
                pack_bits(values.astype(np.uint8) & 0x0F, 4),
                fb.schema.TensorType.INT4,
                scales,
                axis,
            )
        else:
            if mode == "int4":
                as_int8.append(
                    (
                        layer.name,
                        f"{quantized_kernel_bits(layer)}-bit codes"
                        if op_name in _INT4_OPS
                        else f"{op_name}: no int4 kernel in LiteRT"
                        if op_name == "DEPTHWISE_CONV_2D"
                        # Not tried at int4 here: written as int8, which LiteRT runs.
                        else f"{op_name}: int4 is written for {' and '.join(_INT4_OPS)} only",
                    )
                )
            fb.set_values(index, values.tobytes(), fb.schema.TensorType.INT8, scales, axis)
        if mode in ("int8", "int4"):
            fb.set_version(op, _HYBRID_VERSION[op_name][0 if per_tensor else 1])
        else:
            data, bias = _DATA_BIAS.get(op_name, (0, 2))
            if len(op.inputs) > bias and op.inputs[bias] >= 0:
                _rescale_bias(fb, op, scales, data, bias)
    return fb.serialize(), as_int8


def _rescale_bias(fb, op, weight_scales, data=0, bias=2):
    """Re-expresses an int32 bias (input `bias` of `op`) in ``input_scale * weight_scale`` after the
    weight scales changed (`data`: the input that carries the activations)."""
    index = int(op.inputs[bias])
    bias = fb.values(index)
    input_scale = fb.tensors[op.inputs[data]].quantization.scale[0]
    old = np.asarray(fb.tensors[index].quantization.scale, np.float64)
    new = input_scale * np.asarray(weight_scales, np.float64)
    rescaled = np.rint(bias.astype(np.float64) * old / new).astype(np.int32)
    fb.set_values(index, rescaled.tobytes(), fb.schema.TensorType.INT32, new, 0)


def kernel_types(path):
    """``{tensor name: storage type}`` of the kernels (input 1 of every CONV_2D, DEPTHWISE_CONV_2D,
    TRANSPOSE_CONV and FULLY_CONNECTED op) of a `.tflite` file, read from the file: ``"INT4"``, ``"INT8"``,
    ``"FLOAT32"``, ... The tensor names hold the Keras layer names."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        fb = _Flatbuffer(f.read())
    names = {
        value: key for key, value in vars(schema.TensorType).items() if not key.startswith("_")
    }
    found = {}
    for op in fb.graph.operators:
        if (
            _builtin_name(schema, fb.model.operatorCodes[op.opcodeIndex]) in _KERNEL_AXIS
            and len(op.inputs) > 1
        ):
            tensor = fb.tensors[op.inputs[1]]
            found[tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name] = names[
                tensor.type
            ]
    return found


def run_tflite(path, x, num_threads=None):
    """Runs a `.tflite` file on the batch `x` with the LiteRT interpreter; returns its first output."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
