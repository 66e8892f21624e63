"""The command line (`train.py`, or `faqd-tf` when installed): teacher -> (activation step) -> FAQD
distillation -> evaluation.

    python train.py --config configs/cifar10.json                    # every stage still missing
    python train.py --config configs/cifar10.json --stage distill    # one stage
    python train.py --config configs/cifar10.json --set train.epochs=5 --overwrite
    python train.py --config configs/cifar10.json --tune --trials 20 # keras-tuner over the loss weights
    faqd-tf --config quickstart                                      # a shipped config, by name

A run killed at any moment resumes from its last finished epoch when started again with the same
command (`keras.callbacks.BackupAndRestore`). Finished outputs are not replaced without
`--overwrite`. Bad input ends with one line on stderr and exit code 2, before anything is written;
a run that fails once training began ends with one line and exit code 1. This module is the one
place where errors become those lines (`main`); set FAQD_TRACEBACK=1 to see the traceback instead.
"""

import argparse
import errno
import os
import re
import sys
from collections.abc import Sequence

from faqd_tf import config as config_module
from faqd_tf import inputs
from faqd_tf.names import EVALUATE, EXPORTS, STAGES, UsageError
from faqd_tf.options import TuneOptions
from faqd_tf.runner import Run, StageFailed

# The longest line an error may print; longer values in it are shortened first (never its reason).
MAX_LINE = 300
# The levels of TF_CPP_MIN_LOG_LEVEL: 0 logs INFO, which TensorFlow's start-up notices are.
_INFO = "0"


def _prog():
    # Installed, the command is faqd-tf; from a checkout, train.py.
    return "faqd-tf" if os.path.basename(sys.argv[0] or "") == "faqd-tf" else "train.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # argparse quotes the values it rejects: keep them short.
        message = re.sub(r"'([^']{80,})'", lambda m: repr(inputs.shorten(m.group(1))), message)
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=_prog(), description="FAQD: label-free quantization by feature-affinity distillation."
    )
    parser.add_argument(
        "--config",
        required=True,
        help="JSON config file, e.g. configs/quickstart.json, or a shipped config's name (quickstart)",
    )
    parser.add_argument(
        "--stage", choices=STAGES, default="all", help="stage to run (default: all)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=5 (repeatable)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace finished outputs")
    parser.add_argument(
        "--tune",
        action="store_true",
        help="search alpha, beta, gamma, temperature with keras-tuner",
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="number of tuning trials (default: tune.trials)"
    )
    parser.add_argument(
        "--export",
        choices=list(EXPORTS),
        action="append",
        default=[],
        help="also export the student after evaluation (repeatable)",
    )
    return parser


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow (and Keras) with its C++ start-up notices hidden.

    While it loads, TensorFlow's runtime prints notices (oneDNN, "Could not find cuda drivers",
    cpu_feature_guard) straight to file descriptor 2, whatever TF_CPP_MIN_LOG_LEVEL says; they would
    bury the one-line errors of this command. They are hidden unless the user asked for TensorFlow's
    INFO lines (TF_CPP_MIN_LOG_LEVEL=0). Python exceptions still surface.
    """
    if "tensorflow" in sys.modules:
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"].strip() == _INFO:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401
        import tensorflow as tf

        # The runtime's first device notices come with the first operation; a multi-worker run
        # (TF_CONFIG) must configure its collectives before any, so it skips this.
        if not os.environ.get("TF_CONFIG"):
            tf.constant(0.0)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def run(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Parses `argv`, checks every input, then runs; raises on any error (see `main`).

    The config is read and checked before TensorFlow loads: a bad one costs no TensorFlow start-up.
    """
    args = build_parser().parse_args(argv)
    cfg = config_module.load(args.config, args.set)
    if args.tune and cfg["strategy"] == "multi_worker":
        raise UsageError(
            '--tune runs its trials in one process; set strategy to "default" or "mirrored" for tuning.'
        )
    trials = TuneOptions.specs()["trials"]
    if args.trials is not None and not trials.accepts(args.trials):
        raise UsageError(f"--trials={args.trials} must be >= {trials.low} and <= {trials.high}.")
    import_tensorflow_quietly()
    from faqd_tf import compat

    compat.check_keras_version()  # before anything is written: this Keras's private API is known
    runner = Run(cfg, overwrite=args.overwrite, callbacks=callbacks)
    try:
        if os.path.isdir(runner.out):
            runner.lock.acquire()  # a second run on a busy output_dir stops here, at once
        if args.tune:
            runner.preflight(["tune"], args.export)
            runner.tune(args.trials)
            return 0
        stages = runner.plan(args.stage)
        runner.preflight(stages, args.export)
        if not stages:
            raise UsageError(
                f"every output of this run is in {runner.out} already; pass --overwrite to run it again."
            )
        runner.start(stages, args.export)
    finally:
        runner.lock.release()
    return 0


def _first_line(error):
    return inputs.first_line(error, MAX_LINE)


def _reason(error):
    """The error's line, to go inside a sentence (its full stop would end up before a semicolon)."""
    if isinstance(error, OSError) and error.strerror:  # without Python's "[Errno 28] " prefix
        where = f": {error.filename}" if error.filename else ""
        return inputs.clip(f"{error.strerror}{where}", MAX_LINE).rstrip(".")
    return _first_line(error).rstrip(".")


def _stage_failure(failure):
    """The line for a stage that failed after it began."""
    import tensorflow as tf

    error = failure.error
    if failure.stage == EVALUATE:  # no epochs to resume: the trained models are kept
        again = "run the same command again"
    else:
        again = "run the same command to resume from the last finished epoch"
    if isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)):
        # A worker died or stopped answering; the others' collectives fail with this.
        cause = _first_line(error).split("aborted by: ")[-1].strip()[:200]
        return (
            f"the multi-worker job lost a worker ({cause}); start every worker again with the same "
            "command to resume from the last backup."
        )
    if isinstance(error, tf.errors.ResourceExhaustedError):
        return (
            f"stage {failure.stage} ran out of memory ({_first_line(error)[:120]}); lower train.batch_size "
            f"or dataset.image_size, then {again}."
        )
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        what = f" writing {error.filename}" if error.filename else f": {_reason(error)}"
        return f"stage {failure.stage} ran out of disk space{what}; free some space, then {again}."
    return f"stage {failure.stage} failed: {_reason(error)}; fix what it names, then {again}."


def _loaded(module, name):
    """`(module.name,)` if `module` is loaded, else `()` (an `except` clause that matches nothing):
    an error class of a module that never loaded cannot have been raised."""
    return (getattr(sys.modules[module], name),) if module in sys.modules else ()


def main(argv: list[str] | None = None, callbacks: Sequence = ()) -> int:
    """Runs the command line; every error ends as one line on stderr with exit code 2 (bad input,
    nothing written) or 1 (the run failed once it began). `callbacks` (Keras callbacks) join every
    training stage's `fit`, for tools and tests that drive the command line from Python."""

    def fail(message, code):
        if os.environ.get("FAQD_TRACEBACK"):
            raise
        print(f"{_prog()}: error: {message}", file=sys.stderr)
        return code

    try:
        return run(argv, callbacks)
    except StageFailed as e:
        return fail(_stage_failure(e), 1)
    except _loaded("faqd_tf.callbacks", "NonFiniteLossError") as e:
        return fail(
            f"{_reason(e)}; lower train.lr (or check the data), then run the same command to resume.",
            1,
        )
    # UsageError, ConfigError, the data's errors and a Keras whose private API is not known.
    except (
        ValueError,
        OSError,
        *_loaded("faqd_tf.data", "SourceUnavailableError"),
        *_loaded("faqd_tf.compat", "KerasVersionError"),
    ) as e:
        return fail(_first_line(e), 2)
    except KeyboardInterrupt:
        print(
            f"{_prog()}: interrupted; run the same command again to resume from the last finished epoch.",
            file=sys.stderr,
        )
        return 130
