"""Every use of Keras's private API in faqd-tf, in one place, behind a version check.

Keras has no public way to do a few things this package needs: build a model's compiled metrics
from a label spec before a label-free `fit` under a strategy, tell whether a model was created under
a `tf.distribute` strategy, redirect or replace how `keras.callbacks.BackupAndRestore` reads and
writes its files (and learn the epoch it restored), serialize a model's weights (with its optimizer
state) to memory, and know how many times `fit` iterates a dataset before an epoch. Each is done
here, and only here, through private attributes whose names and meaning were checked on the Keras
versions of `VERIFIED_KERAS` (the private pieces' source compared on Keras 3.12.0, 3.13.0 and 3.14.0;
the test suite run on 3.15.1). On another Keras the first use fails with one line
(`KerasVersionError`) instead of misbehaving silently; setting the environment variable
``FAQD_UNVERIFIED_KERAS=1`` turns that into a warning, for a user who wants to try.

>>> check_keras_version("3.15.1")
'3.15.1'
>>> check_keras_version("3.99.0")
Traceback (most recent call last):
...
faqd_tf.compat.KerasVersionError: faqd-tf uses private parts of Keras verified on Keras 3.12 to
3.15, not on this Keras 3.99.0; install one of those (pip install "keras>=3.12,<3.16"), or set
FAQD_UNVERIFIED_KERAS=1 to try anyway.
"""

import contextlib
import io
import os
import re
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import keras

if TYPE_CHECKING:
    import tensorflow as tf

VERIFIED_KERAS = ((3, 12), (3, 15))
"""The (major, minor) range of Keras, both ends included, whose private API this module was checked on."""

ESCAPE_HATCH = "FAQD_UNVERIFIED_KERAS"

_checked = False


class KerasVersionError(RuntimeError):
    """This Keras is not one whose private API faqd-tf was verified on; one line says what to do."""


def check_keras_version(version: str | None = None) -> str:
    """Raises `KerasVersionError` (or warns, with ``FAQD_UNVERIFIED_KERAS=1``) unless `version`
    (default: the installed Keras) is within `VERIFIED_KERAS`; returns the version."""
    version = keras.__version__ if version is None else version
    match = re.match(r"(\d+)\.(\d+)", version)
    (low, high) = VERIFIED_KERAS
    if match and low <= (int(match.group(1)), int(match.group(2))) <= high:
        return version
    message = (
        f"faqd-tf uses private parts of Keras verified on Keras {low[0]}.{low[1]} to {high[0]}.{high[1]}, "
        f'not on this Keras {version}; install one of those (pip install "keras>={low[0]}.{low[1]},'
        f'<{high[0]}.{high[1] + 1}"), or set {ESCAPE_HATCH}=1 to try anyway.'
    )
    if os.environ.get(ESCAPE_HATCH, "").strip() not in ("", "0"):
        warnings.warn(
            message.split(";")[0] + f"; trying anyway ({ESCAPE_HATCH} is set).", stacklevel=2
        )
        return version
    raise KerasVersionError(message)


def _verified():
    # Once per process: the check is cheap, but its warning should not repeat at every step.
    global _checked
    if not _checked:
        check_keras_version()
        _checked = True


# ------------------------------------------------------------------------------------ Model


def compiled_metrics(model: keras.Model) -> object | None:
    """The `CompileMetrics` that `model.compile(metrics=...)` made (``model._compile_metrics``), or None.

    Keras builds them from the first labeled batch; a `Distiller` fitted on images alone under a
    strategy must build them itself (see `Distiller.fit`).
    """
    _verified()
    return getattr(model, "_compile_metrics", None)


def created_under_strategy(model: keras.Model) -> bool:
    """Whether `model` was created in a `tf.distribute` strategy's scope (``model._distribute_strategy``;
    the public `distribute_strategy` falls back to the default strategy and cannot tell)."""
    _verified()
    return getattr(model, "_distribute_strategy", None) is not None


def weights_bytes(model: keras.Model) -> bytes:
    """The `model.save_weights` file (``.weights.h5``, the optimizer state included) of `model`, in memory.

    Keras saves weights only to a path; this is what `save_weights` does with one
    (``keras.src.saving.saving_lib.H5IOStore`` and ``_save_state``), given a buffer instead.
    """
    _verified()
    from keras.src.saving import saving_lib

    buffer = io.BytesIO()
    store = saving_lib.H5IOStore(buffer, mode="w")
    try:
        saving_lib._save_state(
            model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set()
        )
    finally:
        store.close()
    return buffer.getvalue()


def fit_iterators_before(epoch: int, dataset: "tf.data.Dataset") -> int:
    """How many iterators `fit` (without `steps_per_epoch`) has made on the finite `tf.data`
    `dataset` when epoch `epoch` (0-based) begins.

    Keras's epoch iterator makes one at the start of every epoch and, when the dataset's cardinality
    gives the number of batches, one more at the end of it, which the next epoch replaces
    (``keras.src.trainers.epoch_iterator.EpochIterator._enumerate_iterator``; measured, for both
    cases, by tests/test_compat.py).
    """
    _verified()
    import tensorflow as tf

    known = int(dataset.cardinality()) != int(tf.data.UNKNOWN_CARDINALITY)
    return max(epoch, 0) * (2 if known else 1)


# --------------------------------------------------------------------------- BackupAndRestore


class BackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` with public names for what Keras keeps private.

    Keras names its backup files only in private attributes and writes them in a private method;
    subclasses use these instead:

    - `generations()`: ``((weights, metadata), (previous weights, previous metadata))`` paths;
    - `position()`: ``(epoch, batch)`` that the next backup records;
    - `restored_epoch()`: the epoch training resumes at;
    - `restoring_from(weights, metadata)`: a context in which `on_train_begin` restores from other files;
    - `write_backup()`: called where Keras would write a backup (its ``_save_model``); by default
      Keras's own write.
    """

    def __init__(self, *args, **kwargs):
        _verified()
        super().__init__(*args, **kwargs)

    def generations(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return (
            (self._weights_path, self._training_metadata_path),
            (self._prev_weights_path, self._prev_training_metadata_path),
        )

    def position(self) -> tuple[int, int]:
        return self._current_epoch, self._last_batch_seen

    def restored_epoch(self) -> int:
        """The epoch `fit` resumes at once `on_train_begin` restored a backup (0: none restored);
        Keras tells only the model (``model._initial_epoch``)."""
        return int(getattr(self.model, "_initial_epoch", None) or 0)

    @contextlib.contextmanager
    def restoring_from(self, weights: str, metadata: str) -> Iterator[None]:
        saved = self._weights_path, self._training_metadata_path
        self._weights_path, self._training_metadata_path = weights, metadata
        try:
            yield
        finally:
            self._weights_path, self._training_metadata_path = saved

    def _save_model(self):  # Keras's hook, called at each backup point
        self.write_backup()

    def write_backup(self):
        super()._save_model()
