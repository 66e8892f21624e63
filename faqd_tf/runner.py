"""A configured run of the CLI: its plan, the checks made before anything is written, and the
order of its stages (`faqd_tf.stages`, where each stage's work is).

    run = Run(config)                 # paths and the distribution strategy; nothing read yet
    stages = run.plan("all")          # the stages whose outputs are missing or were interrupted
    run.preflight(stages, exports)    # every check that needs no training; nothing written
    run.start(stages, exports)        # locks output_dir, writes config.json, runs the stages

Every stage trains with `keras.callbacks.BackupAndRestore` (`faqd_tf.callbacks.SharedBackupAndRestore`)
and ends in the same order: the model is saved (atomically), then the backup is removed. A kill at
any moment therefore leaves either a backup to resume from or the finished model, never neither.

This module loads no TensorFlow (the command line imports it before the config is checked); the
stages do, when a `Run` is made.
"""

import fcntl
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from faqd_tf import inputs
from faqd_tf.names import EVALUATE, PLANNED, STAGES, TEACHER, TUNE, UsageError, say

if TYPE_CHECKING:
    from faqd_tf import stages

__all__ = ["STAGES", "FolderLock", "Run", "StageFailed", "UsageError", "say"]


class StageFailed(RuntimeError):
    """A stage that stopped on an error after it began (`error`): one line, exit code 1."""

    def __init__(self, stage: str, error: BaseException):
        super().__init__(f"stage {stage} failed: {error}")
        self.stage, self.error = stage, error


class FolderLock:
    """An exclusive lock on a folder, so that two runs never write one `output_dir`.

    `flock` on the folder's own descriptor: nothing is written for it, and the operating system
    releases it when the process ends, however it ends, so a crashed run leaves no stale lock.
    Filesystems without `flock` (some network mounts) run unlocked.

    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> lock = FolderLock(folder)
    >>> lock.acquire()
    >>> FolderLock(folder).acquire()
    Traceback (most recent call last):
    ...
    faqd_tf.names.UsageError: output_dir ... is in use by another run; wait for it to end or choose another output_dir.
    >>> lock.release(); os.listdir(folder)
    []
    """

    def __init__(self, path: str):
        self.path = path
        self._fd = None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(
                f"output_dir {self.path} is in use by another run; wait for it to end or choose another output_dir."
            ) from None
        except OSError:
            pass  # no flock here: run unlocked
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Run:
    """One configured run: it plans the stages, checks them, and runs them in order.

    Args:
        config: the resolved config (`faqd_tf.config.load`).
        overwrite: replace finished outputs (the stages run again from scratch).
        callbacks: Keras callbacks added to every training stage's `fit`.
    """

    def __init__(self, config: dict, overwrite: bool = False, callbacks: Sequence = ()):
        # Here, not at the top: the stages load TensorFlow, which the command line defers.
        from faqd_tf import distribute, stages

        self.config = config
        self.overwrite = overwrite
        # First, before any TensorFlow operation: a multi-worker strategy configures collective ops.
        strategy = distribute.get_strategy(config["strategy"])
        self.workspace = stages.Workspace(config, overwrite, strategy, callbacks)
        self.out = self.workspace.out
        self.lock = FolderLock(self.out)
        self._registry = stages.REGISTRY

    def stage(self, name: str, **options) -> "stages.Stage":
        """The stage `name` of this run's config (`faqd_tf.stages.REGISTRY`)."""
        return self._registry[name].of(self.workspace, self.config, **options)

    def plan(self, stage: str) -> list[str]:
        """The stages to run: `all` runs those whose outputs are missing or were interrupted, and
        every stage after one that runs."""
        if stage != "all":
            return [stage]
        planned = []
        for name in PLANNED:
            # A given teacher is never trained; any later stage runs again after an earlier one.
            if self.stage(name).needed() or (planned and name != TEACHER):
                planned.append(name)
        return planned

    def _stages(self, names, exports):
        return [
            self.stage(name, exports=exports) if name == EVALUATE else self.stage(name)
            for name in names
        ]

    def preflight(self, names: list[str], exports: Sequence[str] = ()) -> None:
        """Checks every input the stages `names` (or ``["tune"]``) and the `exports` (kinds of
        `faqd_tf.export.KINDS`) will use, short of training: the output folder, every split of the
        data they read, the models and their fit to the data, the FA layer names, the export paths.
        Raises one-line errors; writes nothing."""
        from faqd_tf.stages import Checked

        if (
            exports and names and EVALUATE not in names
        ):  # no stages: the caller says every output is there
            raise UsageError(
                "--export writes the student at the end of the evaluate stage, which this command does "
                "not run; run --stage evaluate (or all) with it, or leave --export out."
            )
        ws = self.workspace
        inputs.check_output_dir(ws.out)
        ws.read_info()
        stages = self._stages(names, exports)
        for stage in stages:
            stage.check_source()
        for spec in dict.fromkeys(spec for stage in stages for spec in stage.datasets()):
            ws.dataset(spec)  # builds the pipeline: every split and argument checked
        found = Checked(planned=set(names), teacher=None if TEACHER in names else ws.load_teacher())
        for stage in stages:
            stage.check(found)

    def start(self, names: list[str], exports: Sequence[str] = ()) -> None:
        """Runs the stages `names` (after `preflight`): locks the output folder, writes config.json."""
        import keras
        import tensorflow as tf

        from faqd_tf.report import write_json

        keras.utils.set_random_seed(self.config["seed"])
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        write_json(os.path.join(self.out, "config.json"), self.config)
        say(f"output directory {self.out}; stages: {', '.join(names)}")
        for stage in self._stages(names, exports):
            try:
                stage.run()
            except (OSError, ValueError, tf.errors.OpError) as err:
                raise StageFailed(stage.name, err) from err

    def tune(self, trials: int | None = None) -> None:
        """Runs the keras-tuner search (after ``preflight(["tune"])``): `trials` trials, default `tune.trials`."""
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        self.stage(TUNE, trials=trials).run()
