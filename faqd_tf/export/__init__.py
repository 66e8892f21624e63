"""Deploying a quantized student: a packed `.faqd` file, or TFLite; and the export kinds of the CLI.

One module per format: :mod:`faqd_tf.export.packed` (the bit-packed file, its specification and
the checks that keep a hostile file from loading), :mod:`faqd_tf.export.tflite` (float, int8 and
fully integer TFLite that store the student's exact integer codes) and :mod:`faqd_tf.export.frozen`
(the frozen copy both start from). `write` is the front door the CLI's ``--export`` uses.

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
from faqd_tf.export.tflite import MODES, run_tflite, to_tflite

__all__ = [
    "FILENAMES",
    "FORMAT_VERSION",
    "KINDS",
    "MAGIC",
    "MODES",
    "freeze",
    "needs_quantized",
    "pack",
    "read_manifest",
    "run_tflite",
    "to_tflite",
    "unpack",
    "write",
]

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


def needs_quantized(kind):
    """Whether export `kind` stores integer codes, so needs a model with quantized kernels.

    >>> [kind for kind in KINDS if needs_quantized(kind)]
    ['tflite-int8', 'tflite-full']
    """
    return kind in ("tflite-int8", "tflite-full")


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
