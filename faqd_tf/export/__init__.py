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
from faqd_tf.export.onnx import WEIGHT_TYPES, check_onnx, run_onnx, to_onnx
from faqd_tf.export.tflite import MODES, kernel_types, run_tflite, to_tflite

__all__ = [
    "FILENAMES",
    "FORMAT_VERSION",
    "KINDS",
    "MAGIC",
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

KINDS = ("packed", "tflite", "tflite-int8", "tflite-int4", "tflite-full", "onnx")
FILENAMES = {
    "packed": "student.faqd",
    "tflite": "student.tflite",
    "tflite-int8": "student-int8.tflite",
    "tflite-int4": "student-int4.tflite",
    "tflite-full": "student-full.tflite",
    "onnx": "student.onnx",
}
_TFLITE_MODES = {"tflite": "float", "tflite-int8": "int8", "tflite-int4": "int4", "tflite-full": "full"}


def needs_calibration(kind):
    """Whether export `kind` needs unlabeled calibration images (`write(..., calibration=...)`)."""
    return kind == "tflite-full"


def needs_quantized(kind):
    """Whether export `kind` stores integer codes, so needs a model with quantized kernels.

    >>> [kind for kind in KINDS if needs_quantized(kind)]
    ['tflite-int8', 'tflite-int4', 'tflite-full']
    """
    return kind in ("tflite-int8", "tflite-int4", "tflite-full")


def _check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"Unknown export kind {kind!r}; use one of {', '.join(KINDS)}.")


def check(kind, model):
    """Raises a one-line ValueError when export `kind` cannot convert a layer of `model` (ONNX has a
    fixed set, see :mod:`faqd_tf.export.onnx`); cheap, needs no converter, writes nothing. The CLI
    runs it before training, so an impossible export stops the run before it starts."""
    _check_kind(kind)
    if kind == "onnx":
        check_onnx(model)


def write(kind, model, path, calibration=None):
    """Writes `model` as export `kind` (one of `KINDS`) to `path`; returns the file size in bytes.

    ``"packed"``: :func:`pack`; ``"tflite"``, ``"tflite-int8"``, ``"tflite-int4"``, ``"tflite-full"``:
    :func:`to_tflite` in mode ``"float"``, ``"int8"``, ``"int4"``, ``"full"`` (which calibrates on
    `calibration`); ``"onnx"``: :func:`to_onnx`.
    """
    _check_kind(kind)
    if kind == "packed":
        return pack(model, path)
    if kind == "onnx":
        return to_onnx(model, path)
    return to_tflite(model, path, mode=_TFLITE_MODES[kind], calibration=calibration)
