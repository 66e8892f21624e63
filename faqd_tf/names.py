"""The names a run is made of, written once: its stages, history files, export kinds, tuners and
strategies, and how it speaks to its user (`UsageError`, `say`).

Every module reads them from here, so none has to import another's to learn a name; the module
loads no TensorFlow (the command line builds its choices from it before TensorFlow starts), and an
export kind names its check and its writer by import path, loaded only when called.

>>> STAGES
('teacher', 'distill', 'evaluate', 'all')
>>> EXPORTS["tflite-full"].file, EXPORTS["tflite-full"].needs_calibration, EXPORTS["packed"].needs_quantized
('student-full.tflite', True, False)
>>> HISTORIES[DISTILL], HISTORIES[ACTIVATION_STEP]
('history.csv', 'distill_act_history.csv')
"""

import dataclasses
import importlib
from collections.abc import Callable

# --- stages

TEACHER, DISTILL, EVALUATE, TUNE = "teacher", "distill", "evaluate", "tune"
ACTIVATION_STEP = (
    "distill_act"  # the first step of a two-step distillation: its own backup and history
)
PLANNED = (TEACHER, DISTILL, EVALUATE)
"""The stages `all` runs, in order (`tune` runs alone; the exports are written by evaluate)."""
STAGES = (*PLANNED, "all")
"""The command line's `--stage` choices."""
TRAINED = (TEACHER, ACTIVATION_STEP, DISTILL)
"""The stages that train, in order (each one's backup is void once an earlier one trains again)."""
HISTORIES = {
    TEACHER: f"{TEACHER}_history.csv",
    ACTIVATION_STEP: f"{ACTIVATION_STEP}_history.csv",
    DISTILL: "history.csv",
}
"""The CSV history (one row an epoch) each training stage writes in the output folder."""

# --- what a search and a run may use

TUNERS = ("random", "bayesian", "hyperband")
"""keras-tuner's searches by the config's name (`tune.tuner`, `faqd_tf.tuning.make_tuner`)."""
STRATEGIES = ("default", "mirrored", "multi_worker")
"""The `tf.distribute` strategies by the config's name (`strategy`, `faqd_tf.distribute.get_strategy`)."""


# --- export kinds


def _load(path: str) -> Callable:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


@dataclasses.dataclass(frozen=True)
class ExportKind:
    """One `--export` kind: the file it writes next to the student, what it needs, and its functions.

    `write` and `check` are import paths (``"module:function"``) of `write(model, path, **arguments)`
    and of `check(model)` (None: nothing to check before training); `arguments` are the writer's own.
    """

    name: str
    file: str
    write: str
    arguments: dict = dataclasses.field(default_factory=dict)
    needs_calibration: bool = False  # unlabeled training images (`calibration=`)
    needs_quantized: bool = (
        False  # a student with quantized kernels (it stores their integer codes)
    )
    check: str | None = None

    def write_model(self, model, path: str, calibration=None) -> int:
        """Writes `model` to `path` (`calibration`: its images, when it needs them); returns the bytes written."""
        extra = {"calibration": calibration} if self.needs_calibration else {}
        return _load(self.write)(model, path, **self.arguments, **extra)

    def check_model(self, model) -> None:
        """Raises a one-line ValueError when this kind cannot convert a layer of `model`."""
        if self.check is not None:
            _load(self.check)(model)


def _tflite(name, file, mode, **needs):
    check = None if mode == "float" else "faqd_tf.export.tflite:check_integer"
    return ExportKind(
        name, file, "faqd_tf.export.tflite:to_tflite", {"mode": mode}, check=check, **needs
    )


EXPORTS = {
    kind.name: kind
    for kind in (
        ExportKind("packed", "student.faqd", "faqd_tf.export.packed:pack"),
        _tflite("tflite", "student.tflite", "float"),
        _tflite("tflite-int8", "student-int8.tflite", "int8", needs_quantized=True),
        _tflite("tflite-int4", "student-int4.tflite", "int4", needs_quantized=True),
        _tflite(
            "tflite-full",
            "student-full.tflite",
            "full",
            needs_quantized=True,
            needs_calibration=True,
        ),
        ExportKind(
            "onnx",
            "student.onnx",
            "faqd_tf.export.onnx:to_onnx",
            check="faqd_tf.export.onnx:check_onnx",
        ),
    )
}
"""The export kinds by name, in the order the command line lists them."""


# --- speaking to the user


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def say(message: str) -> None:
    """A progress line of the run, as the command line prints them."""
    print(f"[faqd] {message}", flush=True)
