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

Files are hostile: `unpack` checks everything before it allocates anything sized by the file:
magic, version, that the file is exactly ``60 + M + P`` bytes (a truncated file is reported as
such), the SHA-256, the manifest (inflated to at most ``MAX_MANIFEST_BYTES``; every field present
and of its type), that every declared size matches the bytes present (``nbytes``, shapes, scale
layouts), and that the model config asks for no more weights than the file stores (the config is
first built with initializers that count before they allocate). Any failure is one ``ValueError``
naming the problem; a damaged file never loads.

Quantized kernels in an unpacked (or frozen) model
==================================================

Re-quantizing an already-quantized kernel is *not* exactly idempotent with the Lloyd/mean scales of
:mod:`faqd_tf.quantizers` (measured: ``Q(codes*scale)`` differs from ``codes*scale`` by up to
~2e-6 relative at 1 bit, where ``mean|w|`` of equal magnitudes rounds; at 8 bits per channel the
Lloyd iteration can even move codes when a channel's top code is below ``L``). So `unpack` sets each
quantized kernel to ``codes * scale`` (computed in float32, the same product the quantized model
forms) and gives the layer a :class:`faqd_tf.quantizers.FrozenQuantizer`: it has the layer's
``bits``/``per_channel``/``precision`` (so summaries count bits), remembers the scales, and passes
the kernel through unchanged. The unpacked model's outputs are then identical to the quantized
model's in inference. To resume quantization-aware training from it, give the layers a fresh
quantizer, e.g. ``layer.kernel_quantizer = faqd_tf.quantizers.WeightQuantizer(layer.weight_bits,
layer.per_channel)``.

TFLite (`to_tflite`)
====================

Converted with Keras's public route (``model.export(format="litert")``) from :func:`freeze` (model),
builtin TFLite ops only, in one of three modes:

- ``"float"``: float32 weights and activations; outputs equal Keras' up to float rounding.
- ``"int8"``: every quantized kernel is stored as an int8 tensor whose values are the student's
  integer codes (``layer.kernel_codes()``: 1-bit and ternary codes included) with the layer's scale
  as the TFLite quantization scale (one, or one per output channel); activations stay float
  (TFLite's hybrid kernels). Other weights (BatchNormalization folded into biases, full-precision
  layers) stay float32.
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
located by its values (the codes times a per-channel factor, or the converter's rounding of that),
its integers and scales replaced, and, in ``"full"`` mode, its int32 bias re-expressed in the new
``input_scale * weight_scale``. int4 storage is not offered: the TFLite converter has no option to
produce int4 weights for these ops (tensorflow/tensorflow#64193, moved to LiteRT#73, open).

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
import math
import os
import struct
import tempfile
import zlib

import keras
import numpy as np
import tensorflow as tf

from faqd_tf import quantizers
from faqd_tf._version import __version__
from faqd_tf.layers import QuantReLU
from faqd_tf.quantizers import FrozenQuantizer
from faqd_tf.summary import iter_layers, quantized_kernel_bits

__all__ = [
    "FILENAMES",
    "FORMAT_VERSION",
    "KINDS",
    "MAGIC",
    "MODES",
    "freeze",
    "pack",
    "read_manifest",
    "run_tflite",
    "to_tflite",
    "unpack",
    "write",
]

MAGIC = b"FAQDPACK"
FORMAT_VERSION = 1
FORMAT_NAME = "faqd_tf.packed_model"
_HEADER = struct.Struct("<8sIQQ32s")  # magic, version, manifest length, payload length, sha256
HEADER_SIZE = _HEADER.size  # 60
# The manifest of a ResNet110 inflates to ~0.2 MB; a zlib bomb stops here.
MAX_MANIFEST_BYTES = 16 * 2**20
_MAX_RANK = 8
_MAX_DIM = 2**31

# --------------------------------------------------------------------------------------------
# Helpers


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
    iterations in its graph; this is what :func:`to_tflite` converts. `model` itself is not modified.
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


def _write_atomically(path, chunks):
    """Writes `chunks` to `path` through a temporary file: a failure leaves no partial file."""
    partial = f"{path}.partial"
    try:
        with open(partial, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return sum(len(chunk) for chunk in chunks)


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
                encoding="codes", layer=layer_path, bits=bits, per_channel=layer.per_channel,
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
        "created_by": {"faqd_tf": __version__, "keras": keras.__version__, "tensorflow": tf.__version__},
        "code_encoding": "offset-binary (1 bit: (c+1)/2; b bits: c + 2^(b-1) - 1), LSB first, C order",
        "model_config": json.loads(config_json),
        "weights": entries,
    }
    manifest_bytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), 9)
    payload = b"".join(chunks)
    digest = hashlib.sha256(manifest_bytes + payload).digest()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), len(payload), digest)
    return _write_atomically(path, [header, manifest_bytes, payload])


def _inflate(data, name):
    """The zlib-compressed manifest, inflated to at most MAX_MANIFEST_BYTES."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_MANIFEST_BYTES)
    except zlib.error as err:
        raise ValueError(f"{name}: unreadable manifest ({err}).") from err
    if inflater.unconsumed_tail:
        raise ValueError(
            f"{name}: corrupted packed file: the manifest inflates to more than {MAX_MANIFEST_BYTES:,} bytes "
            "(the limit for a model config)."
        )
    if not inflater.eof or inflater.unused_data:
        raise ValueError(f"{name}: unreadable manifest (incomplete or trailing zlib data).")
    return text


def _read(path):
    """Validated (manifest dict, payload bytes) of a packed file; ValueError on any damage."""
    name = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            if MAGIC.startswith(head[: len(MAGIC)]):
                raise ValueError(f"{name}: truncated packed file ({len(head)} bytes, the header alone is {HEADER_SIZE}).")
            raise ValueError(f"{name}: not a faqd_tf packed model (file too short and no {MAGIC!r} magic).")
        magic, version, manifest_len, payload_len, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"{name}: not a faqd_tf packed model (magic {magic!r}, expected {MAGIC!r}), or corrupted.")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{name}: unsupported packed-model format version {version} (this faqd_tf reads version "
                f"{FORMAT_VERSION}), or a corrupted header."
            )
        # The announced lengths are checked against the file size before anything is read.
        expected = HEADER_SIZE + manifest_len + payload_len
        if size < expected:
            raise ValueError(
                f"{name}: truncated or corrupted packed file: the header announces {expected} bytes, the file has {size}."
            )
        if size > expected:
            raise ValueError(
                f"{name}: corrupted packed file: {size - expected} unexpected bytes after the announced "
                f"{expected} bytes."
            )
        body = f.read()
    if len(body) != manifest_len + payload_len:
        raise ValueError(f"{name}: the file changed while it was read.")
    if hashlib.sha256(body).digest() != digest:
        raise ValueError(f"{name}: corrupted packed file: SHA-256 checksum mismatch.")
    try:
        manifest = json.loads(_inflate(body[:manifest_len], name).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{name}: unreadable manifest ({type(err).__name__}: {_first_line(err)}).") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{name}: the manifest does not describe a {FORMAT_NAME}.")
    payload = body[manifest_len:]
    _check_manifest(manifest, len(payload), name)
    return manifest, payload


def _is_count(value, limit=2**62):
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= limit


def _field(record, key, where, name, check, expected):
    """`record[key]`, or a ValueError naming the field when it is missing or fails `check`."""
    if key not in record:
        raise ValueError(f"{name}: corrupted packed file: the manifest lacks {where}{key}.")
    value = record[key]
    if not check(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(f"{name}: corrupted packed file: manifest field {where}{key} must be {expected}, got {shown}.")
    return value


def _is_shape(value):
    return (
        isinstance(value, list) and len(value) <= _MAX_RANK and all(_is_count(d, _MAX_DIM) for d in value)
    )


def _check_manifest(manifest, payload_len, name):
    """Every field present and typed, every declared size equal to the bytes present in the payload."""
    _field(manifest, "format_version", "", name, lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION))
    _field(manifest, "model_config", "", name, lambda v: isinstance(v, dict), "an object (the Keras config)")
    entries = _field(manifest, "weights", "", name, lambda v: isinstance(v, list), "a list")
    shape_text = f"a list of at most {_MAX_RANK} non-negative integers"

    def span(entry, where, offset_key, nbytes_key, want):
        offset = _field(entry, offset_key, where, name, _is_count, "a non-negative integer")
        nbytes = _field(entry, nbytes_key, where, name, _is_count, "a non-negative integer")
        if nbytes != want:
            raise ValueError(f"{name}: corrupted packed file: {where}{nbytes_key} is {nbytes}, the shape needs {want}.")
        if offset + nbytes > payload_len:
            raise ValueError(
                f"{name}: corrupted packed file: {where}{offset_key}+{nbytes_key} ({offset}+{nbytes}) lies outside "
                f"the {payload_len}-byte payload."
            )

    for i, entry in enumerate(entries):
        where = f"weights[{i}]."
        if not isinstance(entry, dict):
            raise ValueError(f"{name}: corrupted packed file: manifest field weights[{i}] must be an object.")
        _field(entry, "path", where, name, lambda v: isinstance(v, str), "a string")
        count = math.prod(_field(entry, "shape", where, name, _is_shape, shape_text))
        encoding = _field(entry, "encoding", where, name, lambda v: v in ("float32", "codes"), '"float32" or "codes"')
        if encoding == "float32":
            span(entry, where, "offset", "nbytes", 4 * count)
            continue
        bits = _field(entry, "bits", where, name, lambda v: v in quantizers.SUPPORTED_BITS and v is not True,
                      "one of " + ", ".join(map(str, quantizers.SUPPORTED_BITS)))
        per_channel = _field(entry, "per_channel", where, name, lambda v: isinstance(v, bool), "true or false")
        code_shape = _field(entry, "code_shape", where, name, lambda v: _is_shape(v) and len(v) >= 1, shape_text)
        scale_shape = _field(entry, "scale_shape", where, name, _is_shape, shape_text)
        if math.prod(code_shape) != count:
            raise ValueError(f"{name}: corrupted packed file: {where}code_shape {code_shape} does not hold shape {entry['shape']}.")
        # The scales must broadcast onto the codes without expanding them: one scale, or one per
        # output channel (the last axis).
        if per_channel:
            layout_ok = scale_shape == [1] * (len(code_shape) - 1) + [code_shape[-1]]
        else:
            layout_ok = len(scale_shape) <= len(code_shape) and all(d == 1 for d in scale_shape)
        if not layout_ok:
            raise ValueError(
                f"{name}: corrupted packed file: {where}scale_shape {scale_shape} does not fit code_shape {code_shape} "
                f"(per_channel={per_channel})."
            )
        span(entry, where, "offset", "nbytes", _nbytes_codes(count, bits))
        span(entry, where, "scale_offset", "scale_nbytes", 4 * math.prod(scale_shape))


def read_manifest(path):
    """The validated manifest (a dict, see the module docstring) of a packed file, without building the model."""
    return _read(path)[0]


def _size_probe(budget):
    """An initializer class that counts the weights a config builds and stops before `budget` is exceeded."""

    class SizeProbe(keras.initializers.Initializer):
        remaining = budget
        exceeded = None

        def __call__(self, shape, dtype=None):
            count = math.prod(int(d) for d in shape)
            if count > SizeProbe.remaining:
                SizeProbe.exceeded = tuple(int(d) for d in shape)
                raise ValueError("the model config declares more weights than the file stores")
            SizeProbe.remaining -= count
            return keras.ops.zeros(shape, dtype=dtype)

    return SizeProbe


def _with_probe(config, probe_name):
    if isinstance(config, dict):
        return {
            key: probe_name if key.endswith("_initializer") and value is not None else _with_probe(value, probe_name)
            for key, value in config.items()
        }
    if isinstance(config, list):
        return [_with_probe(value, probe_name) for value in config]
    return config


def _check_config_size(manifest, custom_objects, name):
    """Builds the config once with counting initializers: a config that asks for more weights than
    the file stores is refused before its weights are allocated."""
    budget = sum(math.prod(entry["shape"]) for entry in manifest["weights"])
    probe = _size_probe(budget)
    probe_name = "faqd_tf_size_probe"
    try:
        keras.models.model_from_json(
            json.dumps(_with_probe(manifest["model_config"], probe_name)),
            custom_objects={**(custom_objects or {}), probe_name: probe},
        )
    except Exception as err:
        if probe.exceeded is not None:
            raise ValueError(
                f"{name}: corrupted packed file: the model config declares a weight of shape {probe.exceeded} "
                f"beyond the {budget:,} stored parameters; refusing to build it."
            ) from None
        raise ValueError(
            f"{name}: could not rebuild the model from its Keras config ({type(err).__name__}: {_first_line(err)}). "
            "Custom layers must be registered or passed as custom_objects."
        ) from None


def unpack(path, custom_objects=None):
    """Rebuilds the Keras model written by :func:`pack`.

    Every weight is restored; each quantized kernel is set to ``codes * scale`` and its layer gets a
    :class:`faqd_tf.quantizers.FrozenQuantizer` (see the module docstring), so inference outputs
    equal those of the packed model. Raises ValueError for a damaged, truncated, foreign or hostile
    file, before allocating anything the file's bytes do not account for.

    Args:
        path: a file written by :func:`pack`.
        custom_objects: extra custom layers/objects the model config needs (faqd_tf's are registered).
    """
    manifest, payload = _read(path)
    _check_config_size(manifest, custom_objects, path)
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
        count = math.prod(shape)
        data = payload[entry["offset"] : entry["offset"] + entry["nbytes"]]
        if entry["encoding"] == "float32":
            variable.assign(np.frombuffer(data, "<f4").reshape(shape))
            continue
        if id(variable) not in quantized:
            raise ValueError(
                f"{path}: {entry['path']!r} is stored as codes but {variable.path!r} of the rebuilt "
                "model is not a quantized kernel."
            )
        layer = quantized[id(variable)][1]
        bits, per_channel = entry["bits"], entry["per_channel"]
        if quantized_kernel_bits(layer) != bits or layer.per_channel != per_channel:
            raise ValueError(
                f"{path}: layer {layer.name!r} is configured with {quantized_kernel_bits(layer)} bits "
                f"(per_channel={layer.per_channel}) but stored with {bits} bits (per_channel={per_channel})."
            )
        to_quantize = tuple(int(d) for d in layer.kernel_to_quantize().shape)
        if tuple(entry["code_shape"]) != to_quantize:
            raise ValueError(
                f"{path}: code shape {tuple(entry['code_shape'])} of {entry['path']!r} does not match the layer's "
                f"quantized kernel shape {to_quantize}."
            )
        codes = _unpack_codes(data, bits, count).reshape(to_quantize)
        scale_data = payload[entry["scale_offset"] : entry["scale_offset"] + entry["scale_nbytes"]]
        scale = np.frombuffer(scale_data, "<f4").reshape(entry["scale_shape"])
        _freeze_layer(layer, codes, scale)
    return model


# --------------------------------------------------------------------------------------------
# TFLite

MODES = ("float", "int8", "full")
# Ops whose input 1 is a kernel, and the channel axis of that kernel in TFLite's layout.
_KERNEL_AXIS = {"CONV_2D": 0, "FULLY_CONNECTED": 0, "DEPTHWISE_CONV_2D": 3}
# The op versions TFLite gives a hybrid (float input, int8 kernel) op: per-tensor, per-channel
# (tensorflow/lite/tools/versioning/op_version.cc).
_HYBRID_VERSION = {"CONV_2D": (2, 5), "DEPTHWISE_CONV_2D": (4, 6), "FULLY_CONNECTED": (3, 3)}


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
        return tf.quantization.fake_quant_with_min_max_args(x, min=0.0, max=255.0 * self.alpha, num_bits=8)


def _integer_graph(model):
    """`model` with each quantized ReLU replaced by `_GridReLU` (layers otherwise shared)."""

    def swap(layer):
        if isinstance(layer, QuantReLU) and layer.bits is not None:
            return _GridReLU(float(keras.ops.convert_to_numpy(layer.alpha)), layer.bits, name=layer.name)
        return layer

    return keras.models.clone_model(model, clone_function=swap, recursive=True)


def _calibration_images(calibration, model, samples):
    """Up to `samples` float32 images (N, *input shape) from an array, a tf.data.Dataset or an
    iterable of batches (`x` or `(x, ...)`)."""
    if len(model.inputs) != 1:
        raise ValueError(f"mode='full' calibrates models with one input; {model.name!r} has {len(model.inputs)}.")
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
        raise ValueError("The calibration data hold no images; mode='full' needs unlabeled images to calibrate.")
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
            deploy.export(target, format="litert", verbose=False, input_signature=signature, **kwargs)
        except Exception as err:
            raise ValueError(
                f"TFLite conversion of {deploy.name!r} (mode {mode!r}) failed: {type(err).__name__}: {_first_line(err)}"
            ) from err
        with open(target, "rb") as f:
            return f.read()


def to_tflite(model, path, mode="float", calibration=None, calibration_samples=200, batch_size=None):
    """Converts `model` (inference mode) to a TFLite flatbuffer at `path`; returns its size in bytes.

    Args:
        model: a built Functional or Sequential model; quantized for `"int8"` and `"full"`.
        path: output file; written atomically (no partial file on failure).
        mode: `"float"`, `"int8"` (the integer codes as int8 kernels, float activations) or
            `"full"` (int8 kernels and activations); see the module docstring.
        calibration: for `"full"`: unlabeled images, an array ``(N, *input_shape)``, a
            `tf.data.Dataset` or an iterable of batches (`x` or `(x, ...)`; labels are ignored).
        calibration_samples: how many of those images calibrate the activation ranges.
        batch_size: fixed batch size of the converted signature; None (default) leaves it dynamic
            (``interpreter.resize_tensor_input`` sets it).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a TFLite export mode; use one of {', '.join(MODES)}.")
    if mode != "float" and not _quantized_layers(model):
        raise ValueError(
            f"mode={mode!r} stores a quantized student's integer codes, but {model.name!r} has no quantized "
            "kernels; quantize it first (faqd_tf.quantize_model) or use mode='float'."
        )
    if mode == "full" and calibration is None:
        raise ValueError("mode='full' needs calibration images (calibration=x_train[:200], labels not needed).")
    if not _is_count(calibration_samples) or calibration_samples < 1:
        raise ValueError(f"calibration_samples={calibration_samples!r} must be a positive integer.")
    images = _calibration_images(calibration, model, calibration_samples) if mode == "full" else None
    deploy = freeze(model)
    flatbuffer = _convert(_integer_graph(deploy) if mode == "full" else deploy, mode, images, batch_size)
    if mode != "float":
        flatbuffer = _store_codes(flatbuffer, deploy, mode)
    return _write_atomically(path, [flatbuffer])


def _builtin_name(schema, code):
    names = {value: key for key, value in vars(schema.BuiltinOperator).items() if not key.startswith("_")}
    return names.get(max(code.builtinCode, code.deprecatedBuiltinCode))


def _tfl_codes(codes, op_name):
    """Codes in the layout of the TFLite kernel: output channels first for CONV_2D/FULLY_CONNECTED
    (OHWI, (out, in)), ``(1, kh, kw, channels)`` for DEPTHWISE_CONV_2D."""
    if op_name == "DEPTHWISE_CONV_2D":
        return np.moveaxis(codes, -2, 0)
    return np.moveaxis(codes, -1, 0)


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
        scale = np.asarray(converter_scale, np.float64) * np.divide(127.0, top, out=np.zeros(len(k)), where=live)
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
            raise ValueError(f"The converted model has {len(self.model.subgraphs)} subgraphs; expected one.")
        self.graph = self.model.subgraphs[0]
        self.tensors = self.graph.tensors

    def values(self, index):
        tensor = self.tensors[index]
        buffer = self.model.buffers[tensor.buffer]
        if buffer.data is None or getattr(buffer, "offset", 0):
            return None
        dtype = {self.schema.TensorType.FLOAT32: "<f4", self.schema.TensorType.INT8: "i1",
                 self.schema.TensorType.INT32: "<i4"}.get(tensor.type)
        if dtype is None:
            return None
        return np.frombuffer(np.asarray(buffer.data, np.uint8).tobytes(), dtype).reshape(tensor.shape)

    def kernel_sites(self):
        """`(op, op name, weight tensor index)` of the conv/FC ops with a constant kernel."""
        sites = []
        for op in self.graph.operators:
            name = _builtin_name(self.schema, self.model.operatorCodes[op.opcodeIndex])
            if name in _KERNEL_AXIS and len(op.inputs) > 1 and self.values(op.inputs[1]) is not None:
                sites.append((op, name, int(op.inputs[1])))
        return sites

    def set_values(self, index, values, tensor_type, scales, axis):
        tensor = self.tensors[index]
        others = [t for i, t in enumerate(self.tensors) if i != index and t.buffer == tensor.buffer]
        if not others and tensor.buffer:
            self.model.buffers[tensor.buffer].data = None  # no longer referenced
        buffer = self.schema.BufferT()
        buffer.data = np.frombuffer(values.tobytes(), np.uint8)
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
                code.builtinCode, code.deprecatedBuiltinCode, version
            ):
                op.opcodeIndex = i
                return
        new = self.schema.OperatorCodeT()
        new.builtinCode, new.deprecatedBuiltinCode, new.version = code.builtinCode, code.deprecatedBuiltinCode, version
        self.model.operatorCodes.append(new)
        op.opcodeIndex = len(self.model.operatorCodes) - 1

    def serialize(self):
        import flatbuffers

        builder = flatbuffers.Builder(1024)
        builder.Finish(self.model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _store_codes(flatbuffer, model, mode):
    """`flatbuffer` with every quantized kernel of `model` stored as its int8 codes."""
    fb = _Flatbuffer(flatbuffer)
    sites = fb.kernel_sites()
    used = set()
    for _, layer in _quantized_layers(model).values():
        codes, _ = _layer_codes(layer)
        matches = []
        for op, op_name, index in sites:
            tfl_codes = _tfl_codes(codes, op_name)
            tensor = fb.tensors[index]
            if index in used or tuple(tensor.shape) != tfl_codes.shape:
                continue
            axis = _KERNEL_AXIS[op_name]
            converter_scale = None
            if tensor.type == fb.schema.TensorType.INT8:
                converter_scale = np.broadcast_to(np.asarray(tensor.quantization.scale, np.float64), (tfl_codes.shape[axis],))
            fit = _fit(fb.values(index), tfl_codes, axis, converter_scale)
            if fit is not None:
                matches.append((op, op_name, index, tfl_codes, axis, fit))
        if len(matches) != 1:
            raise ValueError(
                f"Could not locate the kernel of layer {layer.name!r} in the converted model "
                f"({len(matches)} candidates fit its codes); the TFLite converter rewrote it beyond recognition."
            )
        op, op_name, index, tfl_codes, axis, (sign, scale) = matches[0]
        used.add(index)
        shape = [1] * tfl_codes.ndim
        shape[axis] = -1
        values = (tfl_codes * sign.reshape(shape)).astype(np.int8)
        # Equal up to the float rounding of recovering them: one scale, as trained (layer-wise).
        per_tensor = np.all(np.abs(scale - scale[0]) <= 1e-6 * scale[0])
        scales = scale[:1] if per_tensor else scale
        fb.set_values(index, values, fb.schema.TensorType.INT8, scales, axis)
        if mode == "int8":
            fb.set_version(op, _HYBRID_VERSION[op_name][0 if per_tensor else 1])
        elif len(op.inputs) > 2 and op.inputs[2] >= 0:
            _rescale_bias(fb, op, scales)
    return fb.serialize()


def _rescale_bias(fb, op, weight_scales):
    """Re-expresses an int32 bias in ``input_scale * weight_scale`` after the weight scales changed."""
    index = int(op.inputs[2])
    bias = fb.values(index)
    input_scale = fb.tensors[op.inputs[0]].quantization.scale[0]
    old = np.asarray(fb.tensors[index].quantization.scale, np.float64)
    new = input_scale * np.asarray(weight_scales, np.float64)
    rescaled = np.rint(bias.astype(np.float64) * old / new).astype(np.int32)
    fb.set_values(index, rescaled, fb.schema.TensorType.INT32, new, 0)


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


# --------------------------------------------------------------------------------------------
# Export kinds (the CLI's --export choices)

KINDS = ("packed", "tflite", "tflite-int8", "tflite-full")
FILENAMES = {
    "packed": "student.faqd",
    "tflite": "student.tflite",
    "tflite-int8": "student-int8.tflite",
    "tflite-full": "student-full.tflite",
}


def needs_calibration(kind):
    """Whether export `kind` needs unlabeled calibration images (`write(..., calibration=...)`)."""
    return kind == "tflite-full"


def write(kind, model, path, calibration=None):
    """Writes `model` as export `kind` (one of `KINDS`) to `path`; returns the file size in bytes.

    ``"packed"``: :func:`pack`; ``"tflite"``, ``"tflite-int8"``, ``"tflite-full"``: :func:`to_tflite`
    in mode ``"float"``, ``"int8"``, ``"full"`` (which calibrates on `calibration`).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown export kind {kind!r}; use one of {', '.join(KINDS)}.")
    if kind == "packed":
        return pack(model, path)
    mode = {"tflite": "float", "tflite-int8": "int8", "tflite-full": "full"}[kind]
    return to_tflite(model, path, mode=mode, calibration=calibration)
