"""Deploying a quantized student: a packed `.faqd` file, TFLite or ONNX; and the export kinds of the CLI.

One module per format: :mod:`faqd_tf.export.packed` (the bit-packed file, its specification and
the checks that keep a hostile file from loading), :mod:`faqd_tf.export.tflite` (float, int8, int4
and fully integer TFLite that store the student's exact integer codes), :mod:`faqd_tf.export.onnx`
(ONNX with the codes as INT2/INT4/INT8 initializers) and :mod:`faqd_tf.export.frozen` (the frozen
copy the TFLite export starts from). `write` is the front door the CLI's ``--export`` uses, `check`
the test it runs before training. ``onnx``, ``onnxruntime`` and ``ai_edge_litert`` are imported
only when a file of theirs is written or run.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> import os, tempfile
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=2)
>>> folder = tempfile.mkdtemp()
>>> nbytes = write("packed", model, os.path.join(folder, FILENAMES["packed"]))
>>> read_manifest(os.path.join(folder, "student.faqd"))["format"]
'faqd_tf.packed_model'
>>> [kind for kind in KINDS if needs_calibration(kind)]
['tflite-full']
>>> check("onnx", model)  # raises a ValueError naming any layer the export cannot convert
"""

from faqd_tf.export.frozen import freeze
from faqd_tf.export.onnx import WEIGHT_TYPES, check_onnx, run_onnx, to_onnx
from faqd_tf.export.packed import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    MAX_MANIFEST_BYTES,
    pack,
    read_manifest,
    unpack,
)
from faqd_tf.export.tflite import MODES, kernel_types, run_tflite, to_tflite
from faqd_tf.names import EXPORTS

__all__ = [
    "FILENAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KINDS",
    "MAGIC",
    "MAX_MANIFEST_BYTES",
    "MODES",
    "WEIGHT_TYPES",
    "check",
    "check_onnx",
    "freeze",
    "kernel_types",
    "needs_quantized",
    "pack",
    "read_manifest",
    "run_onnx",
    "run_tflite",
    "to_onnx",
    "to_tflite",
    "unpack",
    "write",
]

KINDS = tuple(EXPORTS)
FILENAMES = {name: kind.file for name, kind in EXPORTS.items()}


def needs_calibration(kind):
    """Whether export `kind` needs unlabeled calibration images (`write(..., calibration=...)`)."""
    return _kind(kind).needs_calibration


def needs_quantized(kind):
    """Whether export `kind` stores integer codes, so needs a model with quantized kernels.

    >>> [kind for kind in KINDS if needs_quantized(kind)]
    ['tflite-int8', 'tflite-int4', 'tflite-full']
    """
    return _kind(kind).needs_quantized


def _kind(kind):
    if kind not in EXPORTS:
        raise ValueError(f"Unknown export kind {kind!r}; use one of {', '.join(KINDS)}.")
    return EXPORTS[kind]


def check(kind, model):
    """Raises a one-line ValueError when export `kind` cannot convert a layer of `model` (ONNX has a
    fixed set, see :mod:`faqd_tf.export.onnx`; the integer TFLite kinds refuse quantized 3-D
    convolutions, see :func:`faqd_tf.export.tflite.check_integer`); cheap, needs no converter,
    writes nothing. The CLI runs it before training, so an impossible export stops the run before
    it starts."""
    _kind(kind).check_model(model)


def write(kind, model, path, calibration=None):
    """Writes `model` as export `kind` (one of `KINDS`, `faqd_tf.names.EXPORTS`) to `path`; returns
    the file size in bytes.

    ``"packed"``: :func:`pack`; ``"tflite"``, ``"tflite-int8"``, ``"tflite-int4"``, ``"tflite-full"``:
    :func:`to_tflite` in mode ``"float"``, ``"int8"``, ``"int4"``, ``"full"`` (which calibrates on
    `calibration`); ``"onnx"``: :func:`to_onnx`.
    """
    return _kind(kind).write_model(model, path, calibration=calibration)
