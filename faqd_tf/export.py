"""Deploying a quantized student: bit-packed files (`pack` / `unpack`), frozen copies and TFLite.

Packed file format (``.faqd``), version 1
=========================================

A small binary container; no pickle anywhere. All integers are little-endian.

====== ======= =================================================================================
offset size    content
====== ======= =================================================================================
0      8       magic ``b"FAQDPACK"``
8      4       format version, uint32 (1)
12     8       manifest length M in bytes, uint64
20     8       payload length P in bytes, uint64
28     32      SHA-256 of the manifest bytes followed by the payload bytes
60     M       manifest: zlib-compressed UTF-8 JSON (see below)
60+M   P       payload: the arrays, concatenated; the file ends exactly here
====== ======= =================================================================================

The manifest holds ``format`` (``"faqd_tf.packed_model"``), ``format_version``, the versions of
faqd_tf/Keras/TensorFlow that wrote it, ``model_config`` (the model's Keras config, i.e. the parsed
``model.to_json()``), and ``weights``: one entry per variable of ``model.weights`` (Keras order:
every stored parameter, trainable or not), each with its ``path``, ``shape`` and ``encoding``:

- ``"float32"``: the values as little-endian float32 at ``offset`` (``nbytes`` bytes). BN gamma/beta
  and moving statistics, biases, quantized-ReLU alphas, BinaryRelax lambdas and kernels of
  full-precision layers are stored this way.
- ``"codes"``: a quantized kernel, Q(w) = codes * scale. ``bits`` (1, 2, 4, 8), ``per_channel``,
  ``code_shape`` (the kernel as quantized: a depthwise kernel ``(kh, kw, cin, m)`` is quantized as
  ``(kh, kw, 1, cin*m)``), ``scale_shape``; the scales as float32 at ``scale_offset``
  (``scale_nbytes``), the codes bit-packed at ``offset`` (``nbytes``):

  * codes are stored as unsigned **offset-binary** integers u: 1 bit: ``u = (c + 1) / 2``
    (c = -1 -> 0, c = +1 -> 1); b >= 2 bits: ``u = c + L`` with ``L = 2^(b-1) - 1``, so
    ``u`` is in ``[0, 2^b - 2]`` (``2^b - 1`` never occurs and is rejected on reading);
  * in C (row-major) order of ``code_shape``, ``8 / b`` codes per byte, the first code in the
    least significant bits (LSB first); the last byte is zero-padded.

`unpack` checks everything before building a model: magic, version, that the file is exactly
``60 + M + P`` bytes (a truncated file is reported as such), the SHA-256, then the manifest, shapes
and codes; any failure raises ``ValueError``; a damaged file never loads.

Quantized kernels in an unpacked (or frozen) model
==================================================

Re-quantizing an already-quantized kernel is *not* exactly idempotent with the Lloyd/mean scales of
:mod:`faqd_tf.quantizers` (measured: ``Q(codes*scale)`` differs from ``codes*scale`` by up to
~2e-6 relative at 1 bit, where ``mean|w|`` of equal magnitudes rounds; at 8 bits per channel the
Lloyd iteration can even move codes when a channel's top code is below ``L``). So `unpack` sets each
quantized kernel to ``codes * scale`` (computed in float32, the same product the quantized model
forms) and gives the layer a :class:`FrozenQuantizer`: it has the layer's ``bits``/``per_channel``/
``precision`` (so summaries count bits), remembers the scales, and passes the kernel through
unchanged. The unpacked model's outputs are then identical to the quantized model's in inference.
To resume quantization-aware training from it, give the layers a fresh quantizer, e.g.
``layer.kernel_quantizer = faqd_tf.quantizers.WeightQuantizer(layer.weight_bits, layer.per_channel)``.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> import os, tempfile
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=2)
>>> path = os.path.join(tempfile.mkdtemp(), "student.faqd")
>>> nbytes = pack(model, path)
>>> twin = unpack(path)
>>> x = np.random.rand(2, 16, 16, 3).astype("float32")
>>> bool(np.allclose(twin(x), model(x), rtol=1e-6, atol=1e-6))
True
>>> twin.get_layer("stem_conv").kernel_quantizer
FrozenQuantizer(bits=2, per_channel=False)
"""

import hashlib
import json
import struct
import warnings
import zlib

import keras
import numpy as np
import tensorflow as tf
from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2  # no public equivalent

import faqd_tf
import faqd_tf.layers  # noqa: F401  registers the quantized layers for model_from_json
import faqd_tf.models  # noqa: F401  registers ChannelPad
from faqd_tf import quantizers
from faqd_tf.summary import iter_layers, quantized_kernel_bits

__all__ = ["FORMAT_VERSION", "MAGIC", "FrozenQuantizer", "freeze", "pack", "read_manifest", "to_tflite", "unpack"]

MAGIC = b"FAQDPACK"
FORMAT_VERSION = 1
FORMAT_NAME = "faqd_tf.packed_model"
_HEADER = struct.Struct("<8sIQQ32s")  # magic, version, manifest length, payload length, sha256
HEADER_SIZE = _HEADER.size  # 60


@keras.saving.register_keras_serializable(package="faqd_tf")
class FrozenQuantizer:
    """The quantizer of an already-quantized kernel: identity in the forward pass.

    Holds the `bits`, `per_channel` flag and `scale` (a list of floats: one, or one per output
    channel) the kernel was quantized with, so `precision` and `codes()` keep working (a frozen
    model can be summarized and packed again, byte for byte the same payload).

    >>> q = FrozenQuantizer(bits=2, scale=[0.5])
    >>> codes, scale = q.codes(np.array([-0.5, 0.0, 0.5], "float32"))
    >>> codes.numpy().tolist(), float(scale)
    ([-1.0, 0.0, 1.0], 0.5)
    """

    def __init__(self, bits, per_channel=False, scale=None):
        self.bits = quantizers.check_bits(bits)
        self.per_channel = bool(per_channel)
        self.scale = None if scale is None else [float(s) for s in np.asarray(scale, np.float32).reshape(-1)]
        if self.scale is not None and not self.per_channel and len(self.scale) != 1:
            raise ValueError(f"A layer-wise FrozenQuantizer has one scale, got {len(self.scale)}.")

    @property
    def precision(self):
        return self.bits

    def __call__(self, w):
        return tf.convert_to_tensor(w)

    def relaxed(self, w, lam):
        return tf.convert_to_tensor(w)

    def codes(self, w):
        """`(codes, scale)` of a kernel on the frozen grid (as `faqd_tf.quantizers.weight_codes`)."""
        if self.scale is None:
            raise ValueError("This FrozenQuantizer has no scales; its codes are unknown.")
        w = tf.cast(tf.convert_to_tensor(w), tf.float32)
        scale = tf.constant(self.scale, tf.float32)
        if self.per_channel:
            if w.shape[-1] != len(self.scale):
                raise ValueError(f"Kernel has {w.shape[-1]} channels but the quantizer {len(self.scale)} scales.")
            scale = tf.reshape(scale, [1] * (w.shape.rank - 1) + [-1])
        else:
            scale = tf.reshape(scale, [])
        if self.bits == 1:
            codes = tf.where(w >= 0, 1.0, -1.0)
        else:
            n = float(quantizers.levels(self.bits))
            codes = tf.clip_by_value(tf.round(tf.math.divide_no_nan(w, scale)), -n, n)
        return codes, scale

    def get_config(self):
        return {"bits": self.bits, "per_channel": self.per_channel, "scale": self.scale}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"FrozenQuantizer(bits={self.bits}, per_channel={self.per_channel})"


# --------------------------------------------------------------------------------------------
# Helpers


def _quantized_layers(model):
    """{id(kernel variable): (path, layer)} of the layers whose kernel is quantized."""
    found = {}
    for path, layer, _ in iter_layers(model):
        if quantized_kernel_bits(layer) is not None:
            found[id(layer.kernel)] = (path, layer)
    return found


def _per_channel(layer):
    return bool(getattr(layer.kernel_quantizer, "per_channel", False))


def _layer_codes(layer):
    """Integer codes (float32 array), scales (float32 array) and the quantized-kernel shape."""
    quantizer = layer.kernel_quantizer
    if not callable(getattr(quantizer, "codes", None)):
        raise ValueError(
            f"Layer {layer.name!r}: its kernel quantizer {quantizer!r} has no codes(w) method, so "
            "the kernel cannot be stored as integer codes."
        )
    to_quantize = layer._kernel_to_quantize() if hasattr(layer, "_kernel_to_quantize") else layer.kernel
    codes, scale = quantizer.codes(to_quantize)
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
            f"Could not rebuild the model from its Keras config ({type(err).__name__}: {err}). "
            "Custom layers must be registered or passed as custom_objects."
        ) from err


def _freeze_layer(layer, codes, scale):
    layer.kernel.assign(_dequantize(codes, scale, tuple(layer.kernel.shape)))
    layer.kernel_quantizer = FrozenQuantizer(quantized_kernel_bits(layer), _per_channel(layer), scale)


def freeze(model, custom_objects=None):
    """A copy of `model` whose quantized kernels hold Q(w) and are not re-quantized.

    Same config, same weights, except that each quantized kernel is replaced by
    ``codes * scale`` and its quantizer by a :class:`FrozenQuantizer` (identity). In inference the
    copy computes exactly what `model` computes, without the Lloyd iterations in its graph; this is
    what :func:`to_tflite` converts. `model` itself is not modified.
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


# --------------------------------------------------------------------------------------------
# Bit packing


def _pack_codes(codes, bits):
    """Offset-binary, LSB-first bit packing of integer codes (see the module docstring)."""
    codes = np.asarray(codes).reshape(-1)
    if bits == 1:
        u = (codes > 0).astype(np.uint8)
    else:
        u = (np.rint(codes).astype(np.int64) + quantizers.levels(bits)).astype(np.uint8)
    if bits == 8:
        return u.tobytes()
    per_byte = 8 // bits
    pad = (-u.size) % per_byte
    u = np.concatenate([u, np.zeros(pad, np.uint8)]).reshape(-1, per_byte)
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=1).astype(np.uint8).tobytes()


def _unpack_codes(data, bits, count):
    raw = np.frombuffer(data, np.uint8)
    if bits == 8:
        u = raw[:count]
    else:
        per_byte = 8 // bits
        shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
        u = ((raw[:, None] >> shifts) & np.uint8(2**bits - 1)).reshape(-1)
        if np.any(u[count:]):
            raise ValueError("Corrupted packed file: non-zero padding bits after the last code.")
        u = u[:count]
    if bits == 1:
        return np.where(u > 0, 1.0, -1.0).astype(np.float32)
    if np.any(u == 2**bits - 1):
        raise ValueError(f"Corrupted packed file: invalid {bits}-bit code {2**bits - 1}.")
    return (u.astype(np.int64) - quantizers.levels(bits)).astype(np.float32)


def _nbytes_codes(count, bits):
    return -(-count * bits // 8)


# --------------------------------------------------------------------------------------------
# pack / unpack


def pack(model, path):
    """Writes `model` bit-packed to `path` (format in the module docstring); returns the file size.

    Quantized kernels are stored as their integer codes at `weight_bits` bits plus float32 scales;
    every other weight in float32; plus the model's Keras config, so :func:`unpack` rebuilds it.
    """
    config_json = _model_json(model)
    quantized = _quantized_layers(model)
    entries, chunks, offset = [], [], 0

    def add(data):
        nonlocal offset
        chunks.append(data)
        start, offset = offset, offset + len(data)
        return start

    for variable in model.weights:
        entry = {"path": variable.path, "shape": [int(d) for d in variable.shape], "dtype": str(variable.dtype)}
        if id(variable) in quantized:
            layer_path, layer = quantized[id(variable)]
            bits = quantized_kernel_bits(layer)
            codes, scale = _layer_codes(layer)
            data = _pack_codes(codes, bits)
            scale_data = scale.astype("<f4").tobytes()
            entry.update(
                encoding="codes", layer=layer_path, bits=bits, per_channel=_per_channel(layer),
                code_shape=list(codes.shape), scale_shape=list(scale.shape),
                offset=add(data), nbytes=len(data), scale_offset=add(scale_data), scale_nbytes=len(scale_data),
            )
        else:
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if not np.issubdtype(value.dtype, np.floating):
                raise ValueError(f"Weight {variable.path!r} has dtype {value.dtype}; only float weights can be packed.")
            data = value.astype("<f4").tobytes()
            entry.update(encoding="float32", offset=add(data), nbytes=len(data))
        entries.append(entry)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": {"faqd_tf": faqd_tf.__version__, "keras": keras.__version__, "tensorflow": tf.__version__},
        "code_encoding": "offset-binary (1 bit: (c+1)/2; b bits: c + 2^(b-1) - 1), LSB first, C order",
        "model_config": json.loads(config_json),
        "weights": entries,
    }
    manifest_bytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), 9)
    payload = b"".join(chunks)
    digest = hashlib.sha256(manifest_bytes + payload).digest()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), len(payload), digest)
    with open(path, "wb") as f:
        f.write(header)
        f.write(manifest_bytes)
        f.write(payload)
    return len(header) + len(manifest_bytes) + len(payload)


def _read(path):
    """Validated (manifest dict, payload bytes) of a packed file; ValueError on any damage."""
    with open(path, "rb") as f:
        data = f.read()
    name = str(path)
    if len(data) < HEADER_SIZE:
        if MAGIC.startswith(data[: len(MAGIC)]):
            raise ValueError(f"{name}: truncated packed file ({len(data)} bytes, the header alone is {HEADER_SIZE}).")
        raise ValueError(f"{name}: not a faqd_tf packed model (file too short and no {MAGIC!r} magic).")
    magic, version, manifest_len, payload_len, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError(f"{name}: not a faqd_tf packed model (magic {magic!r}, expected {MAGIC!r}), or corrupted.")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{name}: unsupported packed-model format version {version} (this faqd_tf reads version "
            f"{FORMAT_VERSION}), or a corrupted header."
        )
    expected = HEADER_SIZE + manifest_len + payload_len
    if len(data) < expected:
        raise ValueError(
            f"{name}: truncated or corrupted packed file: the header announces {expected} bytes, the file has {len(data)}."
        )
    if len(data) > expected:
        raise ValueError(
            f"{name}: corrupted packed file: {len(data) - expected} unexpected bytes after the announced "
            f"{expected} bytes."
        )
    body = data[HEADER_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{name}: corrupted packed file: SHA-256 checksum mismatch.")
    try:
        manifest = json.loads(zlib.decompress(body[:manifest_len]).decode("utf-8"))
    except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{name}: unreadable manifest ({err}).") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{name}: the manifest does not describe a {FORMAT_NAME}.")
    return manifest, body[manifest_len:]


def read_manifest(path):
    """The validated manifest (a dict, see the module docstring) of a packed file, without building the model."""
    return _read(path)[0]


def _slice(payload, offset, nbytes, what):
    if not (isinstance(offset, int) and isinstance(nbytes, int) and 0 <= offset and offset + nbytes <= len(payload)):
        raise ValueError(f"Corrupted packed file: {what} lies outside the payload.")
    return payload[offset : offset + nbytes]


def unpack(path, custom_objects=None):
    """Rebuilds the Keras model written by :func:`pack`.

    Every weight is restored; each quantized kernel is set to ``codes * scale`` and its layer gets a
    :class:`FrozenQuantizer` (see the module docstring), so inference outputs equal those of the
    packed model. Raises ValueError for a damaged, truncated or foreign file.

    Args:
        path: a file written by :func:`pack`.
        custom_objects: extra custom layers/objects the model config needs (faqd_tf's are registered).
    """
    manifest, payload = _read(path)
    model = _rebuild(json.dumps(manifest["model_config"]), custom_objects)
    entries = manifest["weights"]
    variables = model.weights
    if len(variables) != len(entries):
        raise ValueError(
            f"{path}: the rebuilt model has {len(variables)} weights but the file stores {len(entries)}."
        )
    quantized = _quantized_layers(model)
    for variable, entry in zip(variables, entries):
        shape = tuple(int(d) for d in variable.shape)
        if tuple(entry["shape"]) != shape:
            raise ValueError(
                f"{path}: weight {entry['path']!r} has shape {tuple(entry['shape'])} in the file but "
                f"{variable.path!r} has shape {shape} in the rebuilt model."
            )
        count = int(np.prod(shape, dtype=np.int64))
        if entry["encoding"] == "float32":
            data = _slice(payload, entry["offset"], entry["nbytes"], entry["path"])
            if len(data) != 4 * count:
                raise ValueError(f"{path}: weight {entry['path']!r} has {len(data)} bytes, expected {4 * count}.")
            variable.assign(np.frombuffer(data, "<f4").reshape(shape))
        elif entry["encoding"] == "codes":
            if id(variable) not in quantized:
                raise ValueError(
                    f"{path}: {entry['path']!r} is stored as codes but {variable.path!r} of the rebuilt "
                    "model is not a quantized kernel."
                )
            layer = quantized[id(variable)][1]
            bits = quantizers.check_bits(entry["bits"], "bits")
            if int(np.prod(entry["code_shape"], dtype=np.int64)) != count:
                raise ValueError(f"{path}: code shape {entry['code_shape']} does not match kernel shape {shape}.")
            data = _slice(payload, entry["offset"], entry["nbytes"], entry["path"])
            if len(data) != _nbytes_codes(count, bits):
                raise ValueError(f"{path}: codes of {entry['path']!r} have {len(data)} bytes, expected {_nbytes_codes(count, bits)}.")
            codes = _unpack_codes(data, bits, count).reshape(entry["code_shape"])
            n_scales = int(np.prod(entry["scale_shape"], dtype=np.int64))
            scale_data = _slice(payload, entry["scale_offset"], entry["scale_nbytes"], entry["path"] + " scales")
            if len(scale_data) != 4 * n_scales:
                raise ValueError(f"{path}: scales of {entry['path']!r} have {len(scale_data)} bytes, expected {4 * n_scales}.")
            scale = np.frombuffer(scale_data, "<f4").reshape(entry["scale_shape"])
            if quantized_kernel_bits(layer) != bits or _per_channel(layer) != bool(entry["per_channel"]):
                raise ValueError(
                    f"{path}: layer {layer.name!r} is configured with {quantized_kernel_bits(layer)} bits "
                    f"(per_channel={_per_channel(layer)}) but stored with {bits} bits (per_channel={entry['per_channel']})."
                )
            _freeze_layer(layer, codes, scale)
        else:
            raise ValueError(f"{path}: unknown encoding {entry['encoding']!r} of {entry['path']!r}.")
    return model


# --------------------------------------------------------------------------------------------
# TFLite


def to_tflite(model, path, int8_weights=False, batch_size=None, frozen=True):
    """Converts `model` (inference mode) to a TFLite flatbuffer at `path`; returns its size in bytes.

    Args:
        model: a built Functional or Sequential model, quantized or not.
        path: output file (``.tflite``).
        int8_weights: also apply TFLite's dynamic-range quantization (``Optimize.DEFAULT``: float
            weights of large tensors stored as int8 with per-channel scales). This is a second
            quantization: 1-bit and layer-wise ternary kernels map onto the int8 grid exactly, other
            grids only approximately. Default False: weights are float32 and outputs match Keras.
        batch_size: fixed batch size of the converted signature; None (default) leaves it dynamic
            (``interpreter.resize_tensor_input`` sets it).
        frozen: convert :func:`freeze` (model) (default): the kernels are the constants Q(w) and the
            quantizers' Lloyd iterations are not in the graph. False converts the model as is.
    """
    deploy = freeze(model) if frozen else model
    specs = [tf.TensorSpec([batch_size, *x.shape[1:]], x.dtype, name=x.name) for x in deploy.inputs]

    @tf.function
    def serve(*inputs):
        return deploy(list(inputs) if len(inputs) > 1 else inputs[0], training=False)

    # Variables become graph constants first: converting the variable-holding function keeps some
    # of them (those read inside the tf.custom_gradient of QuantReLU) as TFLite resource variables
    # that the interpreter then cannot read ("READ_VARIABLE failed"), and goes through a slow
    # SavedModel round trip.
    concrete = convert_variables_to_constants_v2(serve.get_concrete_function(*specs))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    if int8_weights:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    try:
        flatbuffer = converter.convert()
    except Exception as err:
        raise ValueError(f"TFLite conversion of {model.name!r} failed: {type(err).__name__}: {err}") from err
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return len(flatbuffer)


def run_tflite(path, x):
    """Runs a `.tflite` file on the batch `x` with the TFLite interpreter; returns its first output."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_path=str(path))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
