"""The packed `.faqd` format: a quantized student's exact b-bit codes, bit-packed (`pack` / `unpack`).

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
- ``"integer"``: a weight of integer dtype ``dtype`` (``int8`` ... ``int64``, ``uint8`` ... ``uint64``),
  such as a ``Normalization`` layer's ``count``, as its little-endian values at ``offset``
  (``nbytes`` = item size * element count).
- ``"codes"``: a quantized kernel, Q(w) = codes * scale. ``bits`` (1, 2, 4, 8), ``per_channel``,
  ``code_shape`` (the kernel as quantized: a depthwise kernel ``(kh, kw, cin, m)`` is quantized as
  ``(kh, kw, 1, cin*m)``; a transposed conv's ``(kh, kw, out, in)`` as ``(kh, kw, in, out)``; a
  separable conv's depthwise and pointwise kernels are two such entries, each with its own
  scales), ``scale_shape``; the scales as float32 at ``scale_offset``
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

`unpack` gives each quantized kernel ``codes * scale`` and a
:class:`faqd_tf.quantizers.FrozenQuantizer`, as :func:`faqd_tf.export.freeze` does (see
:mod:`faqd_tf.export.frozen` for why), so the unpacked model's outputs equal the packed model's.

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
import zlib

import keras
import numpy as np
import tensorflow as tf

from faqd_tf import quantizers
from faqd_tf._version import __version__
from faqd_tf.atomic import write_atomically
from faqd_tf.export.common import (
    check_output_path,
    freeze_layer,
    is_count,
    layer_codes,
    model_json,
    pack_bits,
    quantized_kernels,
    rebuild,
)
from faqd_tf.inputs import first_line, inflate
from faqd_tf.summary import iter_layers, quantized_kernel_bits

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "MAGIC", "pack", "read_manifest", "unpack"]

MAGIC = b"FAQDPACK"
FORMAT_VERSION = 1
FORMAT_NAME = "faqd_tf.packed_model"
_HEADER = struct.Struct("<8sIQQ32s")  # magic, version, manifest length, payload length, sha256
HEADER_SIZE = _HEADER.size  # 60
# The manifest of a ResNet110 inflates to ~0.2 MB; a zlib bomb stops here.
MAX_MANIFEST_BYTES = 16 * 2**20
_MAX_RANK = 8
_INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_MAX_DIM = 2**31


# --------------------------------------------------------------------------------------------
# Bit packing


def _pack_codes(codes, bits):
    """Offset-binary, LSB-first bit packing of integer codes (see the module docstring)."""
    codes = np.asarray(codes).reshape(-1)
    if bits == 1:
        u = (codes > 0).astype(np.uint8)
    else:
        u = (np.rint(codes).astype(np.int64) + quantizers.levels(bits)).astype(np.uint8)
    return pack_bits(u, bits)


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
    check_output_path(path)
    config_json = model_json(model)
    quantized = quantized_kernels(model)
    entries, chunks, offset = [], [], 0

    def add(data):
        nonlocal offset
        chunks.append(data)
        start, offset = offset, offset + len(data)
        return start

    for variable in model.weights:
        entry = {
            "path": variable.path,
            "shape": [int(d) for d in variable.shape],
            "dtype": str(variable.dtype),
        }
        if id(variable) in quantized:
            layer_path, layer, kernel = quantized[id(variable)]
            bits = quantized_kernel_bits(layer)
            codes, scale = layer_codes(layer, kernel)
            data = _pack_codes(codes, bits)
            scale_data = scale.astype("<f4").tobytes()
            entry.update(
                encoding="codes",
                layer=layer_path,
                bits=bits,
                per_channel=layer.per_channel,
                code_shape=list(codes.shape),
                scale_shape=list(scale.shape),
                offset=add(data),
                nbytes=len(data),
                scale_offset=add(scale_data),
                scale_nbytes=len(scale_data),
            )
        else:
            value = np.asarray(keras.ops.convert_to_numpy(variable))
            if value.dtype.name in _INTEGER_DTYPES:
                # Bookkeeping such as Normalization's sample count: kept exact, in its own type.
                data = value.astype(value.dtype.newbyteorder("<")).tobytes()
                entry.update(
                    encoding="integer", dtype=value.dtype.name, offset=add(data), nbytes=len(data)
                )
            elif np.issubdtype(value.dtype, np.floating):
                data = value.astype("<f4").tobytes()
                entry.update(encoding="float32", offset=add(data), nbytes=len(data))
            else:
                raise ValueError(
                    f"Weight {variable.path!r} has dtype {value.dtype}; only float and integer weights can be packed."
                )
        entries.append(entry)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "created_by": {
            "faqd_tf": __version__,
            "keras": keras.__version__,
            "tensorflow": tf.__version__,
        },
        "code_encoding": "offset-binary (1 bit: (c+1)/2; b bits: c + 2^(b-1) - 1), LSB first, C order",
        "model_config": json.loads(config_json),
        "weights": entries,
    }
    manifest_bytes = zlib.compress(json.dumps(manifest, separators=(",", ":")).encode("utf-8"), 9)
    payload = b"".join(chunks)
    digest = hashlib.sha256(manifest_bytes + payload).digest()
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, len(manifest_bytes), len(payload), digest)
    return write_atomically(path, [header, manifest_bytes, payload])


def _read(path):
    """Validated (manifest dict, payload bytes) of a packed file; ValueError on any damage."""
    name = str(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            if MAGIC.startswith(head[: len(MAGIC)]):
                raise ValueError(
                    f"{name}: truncated packed file ({len(head)} bytes, the header alone is {HEADER_SIZE})."
                )
            raise ValueError(
                f"{name}: not a faqd_tf packed model (file too short and no {MAGIC!r} magic)."
            )
        magic, version, manifest_len, payload_len, digest = _HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(
                f"{name}: not a faqd_tf packed model (magic {magic!r}, expected {MAGIC!r}), or corrupted."
            )
        if version != FORMAT_VERSION:
            raise ValueError(
                f"{name}: unsupported packed-model format version {version} (this faqd_tf reads version "
                f"{FORMAT_VERSION}), or a corrupted header."
            )
        # The announced lengths are checked against the file size before anything is read.
        expected = HEADER_SIZE + manifest_len + payload_len
        if size < expected:
            raise ValueError(
                f"{name}: truncated or corrupted packed file: the header announces {expected} "
                f"bytes, the file has {size}."
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
        text = inflate(body[:manifest_len], MAX_MANIFEST_BYTES, f"{name}: the manifest")
        manifest = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(
            f"{name}: unreadable manifest ({type(err).__name__}: {first_line(err, 300)})."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{name}: the manifest does not describe a {FORMAT_NAME}.")
    payload = body[manifest_len:]
    _check_manifest(manifest, len(payload), name)
    return manifest, payload


def _field(record, key, where, name, check, expected):
    """`record[key]`, or a ValueError naming the field when it is missing or fails `check`."""
    if key not in record:
        raise ValueError(f"{name}: corrupted packed file: the manifest lacks {where}{key}.")
    value = record[key]
    if not check(value):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ValueError(
            f"{name}: corrupted packed file: manifest field {where}{key} must be {expected}, got {shown}."
        )
    return value


def _is_shape(value):
    return (
        isinstance(value, list)
        and len(value) <= _MAX_RANK
        and all(is_count(d, _MAX_DIM) for d in value)
    )


def _check_manifest(manifest, payload_len, name):
    """Every field present and typed, every declared size equal to the bytes present in the payload."""
    _field(manifest, "format_version", "", name, lambda v: v == FORMAT_VERSION, str(FORMAT_VERSION))
    _field(
        manifest,
        "model_config",
        "",
        name,
        lambda v: isinstance(v, dict),
        "an object (the Keras config)",
    )
    entries = _field(manifest, "weights", "", name, lambda v: isinstance(v, list), "a list")
    shape_text = f"a list of at most {_MAX_RANK} non-negative integers"

    def span(entry, where, offset_key, nbytes_key, want):
        offset = _field(entry, offset_key, where, name, is_count, "a non-negative integer")
        nbytes = _field(entry, nbytes_key, where, name, is_count, "a non-negative integer")
        if nbytes != want:
            raise ValueError(
                f"{name}: corrupted packed file: {where}{nbytes_key} is {nbytes}, the shape needs {want}."
            )
        if offset + nbytes > payload_len:
            raise ValueError(
                f"{name}: corrupted packed file: {where}{offset_key}+{nbytes_key} ({offset}+{nbytes}) lies outside "
                f"the {payload_len}-byte payload."
            )

    for i, entry in enumerate(entries):
        where = f"weights[{i}]."
        if not isinstance(entry, dict):
            raise ValueError(
                f"{name}: corrupted packed file: manifest field weights[{i}] must be an object."
            )
        _field(entry, "path", where, name, lambda v: isinstance(v, str), "a string")
        count = math.prod(_field(entry, "shape", where, name, _is_shape, shape_text))
        encoding = _field(
            entry,
            "encoding",
            where,
            name,
            lambda v: v in ("float32", "integer", "codes"),
            '"float32", "integer" or "codes"',
        )
        if encoding == "float32":
            span(entry, where, "offset", "nbytes", 4 * count)
            continue
        if encoding == "integer":
            dtype = _field(
                entry,
                "dtype",
                where,
                name,
                lambda v: v in _INTEGER_DTYPES,
                "one of " + ", ".join(_INTEGER_DTYPES),
            )
            span(entry, where, "offset", "nbytes", np.dtype(dtype).itemsize * count)
            continue
        bits = _field(
            entry,
            "bits",
            where,
            name,
            lambda v: v in quantizers.SUPPORTED_BITS and v is not True,
            "one of " + ", ".join(map(str, quantizers.SUPPORTED_BITS)),
        )
        per_channel = _field(
            entry, "per_channel", where, name, lambda v: isinstance(v, bool), "true or false"
        )
        code_shape = _field(
            entry, "code_shape", where, name, lambda v: _is_shape(v) and len(v) >= 1, shape_text
        )
        scale_shape = _field(entry, "scale_shape", where, name, _is_shape, shape_text)
        if math.prod(code_shape) != count:
            raise ValueError(
                f"{name}: corrupted packed file: {where}code_shape {code_shape} does not hold shape {entry['shape']}."
            )
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
            key: probe_name
            if key.endswith("_initializer") and value is not None
            else _with_probe(value, probe_name)
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
            f"{name}: could not rebuild the model from its Keras config "
            f"({type(err).__name__}: {first_line(err, 300)}). "
            "Custom layers must be registered or passed as custom_objects."
        ) from None


def unpack(path, custom_objects=None):
    """Rebuilds the Keras model written by :func:`pack`.

    Every weight is restored; each quantized kernel is set to ``codes * scale`` and its layer gets a
    :class:`faqd_tf.quantizers.FrozenQuantizer` (see :mod:`faqd_tf.export.frozen`), so inference outputs
    equal those of the packed model. Raises ValueError for a damaged, truncated, foreign or hostile
    file, before allocating anything the file's bytes do not account for.

    Args:
        path: a file written by :func:`pack`.
        custom_objects: extra custom layers/objects the model config needs (faqd_tf's are registered).
    """
    manifest, payload = _read(path)
    _check_config_size(manifest, custom_objects, path)
    model = rebuild(json.dumps(manifest["model_config"]), custom_objects)
    entries = manifest["weights"]
    variables = model.weights
    if len(variables) != len(entries):
        raise ValueError(
            f"{path}: the rebuilt model has {len(variables)} weights but the file stores {len(entries)}."
        )
    quantized = quantized_kernels(model)
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
        if entry["encoding"] == "integer":
            variable.assign(
                np.frombuffer(data, np.dtype(entry["dtype"]).newbyteorder("<"))
                .reshape(shape)
                .astype(entry["dtype"])
            )
            continue
        if id(variable) not in quantized:
            raise ValueError(
                f"{path}: {entry['path']!r} is stored as codes but {variable.path!r} of the rebuilt "
                "model is not a quantized kernel."
            )
        _, layer, kernel = quantized[id(variable)]
        bits, per_channel = entry["bits"], entry["per_channel"]
        if quantized_kernel_bits(layer) != bits or layer.per_channel != per_channel:
            raise ValueError(
                f"{path}: layer {layer.name!r} is configured with {quantized_kernel_bits(layer)} bits "
                f"(per_channel={layer.per_channel}) but stored with {bits} bits (per_channel={per_channel})."
            )
        to_quantize = tuple(int(d) for d in layer.kernel_to_quantize(kernel).shape)
        if tuple(entry["code_shape"]) != to_quantize:
            raise ValueError(
                f"{path}: code shape {tuple(entry['code_shape'])} of {entry['path']!r} does not match the layer's "
                f"quantized kernel shape {to_quantize}."
            )
        codes = _unpack_codes(data, bits, count).reshape(to_quantize)
        scale_data = payload[entry["scale_offset"] : entry["scale_offset"] + entry["scale_nbytes"]]
        scale = np.frombuffer(scale_data, "<f4").reshape(entry["scale_shape"])
        freeze_layer(layer, codes, scale, kernel)
    for _, layer, _ in iter_layers(model):
        # A Normalization layer computes with copies of its variables, made by finalize_state (as
        # Keras's own loading calls it).
        if isinstance(layer, keras.layers.Normalization):
            layer.finalize_state()
    return model
