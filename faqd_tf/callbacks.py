"""Keras callbacks of FAQD."""

import contextlib
import csv
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np

from faqd_tf import compat
from faqd_tf.atomic import PARTIAL, write_synced, written_aside
from faqd_tf.quantize import quantized_relus
from faqd_tf.summary import iter_layers

if TYPE_CHECKING:
    import tensorflow as tf


def relaxed_layers(model: keras.Layer) -> list[keras.Layer]:
    """Every layer under `model` (nested models and a Distiller's student included) with a
    BinaryRelax factor, each once."""
    return [
        layer
        for _, layer, _ in iter_layers(model)
        if getattr(layer, "relax_lambda", None) is not None
    ]


class BinaryRelaxScheduler(keras.callbacks.Callback):
    """Grows the BinaryRelax lambda of eq. (2) by `eta` after every epoch: lam <- eta * lam.

    Layers built with `relax=lam0` train on `(w + lam*Q(w)) / (1 + lam)`; as lam grows the
    blend approaches the quantized weights Q(w), which inference always uses.

    >>> from faqd_tf.layers import QuantDense
    >>> model = keras.Sequential([keras.Input((4,)), QuantDense(2, weight_bits=1, relax=1.0)])
    >>> model.compile("sgd", "mse")
    >>> _ = model.fit(np.random.rand(8, 4), np.random.rand(8, 2), epochs=2, verbose=0,
    ...               callbacks=[BinaryRelaxScheduler(eta=2.0)])
    >>> float(model.layers[0].relax_lambda.numpy())
    4.0
    """

    def __init__(self, eta: float = 1.02):
        super().__init__()
        if not eta > 1:
            raise ValueError(f"eta={eta!r} must be greater than 1 (lambda grows each epoch).")
        self.eta = float(eta)

    def on_epoch_end(self, epoch, logs=None):
        layers = relaxed_layers(self.model)
        for layer in layers:
            layer.relax_lambda.assign(layer.relax_lambda * self.eta)
        if logs is not None and layers:
            logs["relax_lambda"] = float(layers[0].relax_lambda.numpy())


class AlphaStats(keras.callbacks.Callback):
    """Puts the quantized ReLUs' alphas into the epoch's logs (`alpha_min`, `alpha_mean`,
    `alpha_max`), so the history CSV shows a resolution that drifts toward its clip bounds, the
    first thing to look at when a 1- or 2-bit-activation student stops learning.

    >>> from faqd_tf.layers import QuantReLU
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), QuantReLU(bits=1)])
    >>> model.compile("sgd", "mse")
    >>> h = model.fit(np.random.rand(8, 4), np.random.rand(8, 3), verbose=0, callbacks=[AlphaStats()])
    >>> sorted(k for k in h.history if k.startswith("alpha"))
    ['alpha_max', 'alpha_mean', 'alpha_min']
    """

    def on_epoch_end(self, epoch, logs=None):
        layers = quantized_relus(self.model)
        if logs is None or not layers:
            return
        alphas = np.array([float(np.asarray(layer.alpha)) for layer in layers])
        logs.update(
            alpha_min=float(alphas.min()),
            alpha_mean=float(alphas.mean()),
            alpha_max=float(alphas.max()),
        )


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the message says where and what was kept."""


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops `fit` at the first NaN or infinite logged loss by raising `NonFiniteLossError`.

    Unlike `keras.callbacks.TerminateOnNaN`, which ends the epoch normally, the error skips the
    epoch-end callbacks: `BackupAndRestore` keeps the checkpoint of the last good epoch instead of
    overwriting it with diverged weights (and then deleting it at the end of training).

    Args:
        backup_dir: the `BackupAndRestore` folder, named in the message.

    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> x = np.array([[1.0, 2.0], [np.nan, 0.0]], "float32")
    >>> model.fit(x, np.ones((2, 1)), batch_size=1, shuffle=False, verbose=0, callbacks=[StopOnNonFiniteLoss()])
    Traceback (most recent call last):
    ...
    faqd_tf.callbacks.NonFiniteLossError: the loss became nan at epoch 1, batch 2; no epoch had
    finished, so there is no checkpoint
    """

    def __init__(self, backup_dir: str | None = None):
        super().__init__()
        self.backup_dir = backup_dir
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        # The total and, for a Distiller, each of its loss terms.
        losses = {"loss", *(term.name for term in getattr(self.model, "terms", ()))}
        for name, value in (logs or {}).items():
            if name not in losses:
                continue
            value = float(np.asarray(value))
            if not np.isfinite(value):
                where = f"at epoch {self._epoch + 1}, batch {batch + 1}"
                label = "the loss" if name == "loss" else f"the {name} loss"
                raise NonFiniteLossError(f"{label} became {value} {where}; {self._kept()}")

    def _kept(self):
        if self._epoch == 0:
            return "no epoch had finished, so there is no checkpoint"
        where = f" in {self.backup_dir}" if self.backup_dir else ""
        return f"the checkpoint of epoch {self._epoch} (the last good one) is kept{where}"


class ResumableCSVLogger(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` whose file holds one row per epoch of the run, however often the
    run was interrupted and resumed.

    At the first epoch of a `fit` (after `BackupAndRestore` has restored where training stopped)
    it drops the rows of that epoch and later ones: a run that starts at epoch 0 begins an empty
    history, a resumed run does not repeat the row of an epoch it trains again.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "history.csv")
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    >>> model.compile("sgd", "mse")
    >>> x, y = np.ones((4, 2)), np.ones((4, 1))
    >>> for _ in range(2):  # run twice from scratch: one history, not two
    ...     _ = model.fit(x, y, epochs=2, verbose=0, callbacks=[ResumableCSVLogger(path)])
    >>> [row["epoch"] for row in csv.DictReader(open(path))]
    ['0', '1']
    """

    def __init__(self, filename: str, separator: str = ","):
        super().__init__(filename, separator=separator, append=True)
        self._opened = False

    def on_train_begin(self, logs=None):
        self._opened = False  # opened at the first epoch, once the epoch it starts at is known

    def on_epoch_begin(self, epoch, logs=None):
        if not self._opened:
            self._keep_before(epoch)
            super().on_train_begin()
            self._opened = True

    def _keep_before(self, epoch):
        if not os.path.exists(self.filename):
            return
        if epoch == 0:
            os.remove(self.filename)  # a new run: a new header too
            return
        with open(self.filename, newline="") as f:
            rows = list(csv.reader(f, delimiter=self.sep))
        kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) < epoch]
        with written_aside(self.filename) as partial, open(partial, "w", newline="") as f:
            csv.writer(f, delimiter=self.sep).writerows(kept)


class ResumeDataOrder(keras.callbacks.Callback):
    """Makes a resumed `fit` see its epochs' data in the order an uninterrupted one would.

    A seeded, shuffled `tf.data` pipeline (and a per-epoch random stream, like the augmentation's)
    draws a new order for every iterator made on it, and `fit` makes new ones every epoch: a run
    resumed after epoch e would train epoch e + 1 in the order of epoch 1. Once `backup` has restored
    the training state, this makes (and drops) as many iterators of `dataset` as `fit` had made by
    then (`faqd_tf.compat.fit_iterators_before`), so the next epoch gets the order it would have had.
    For `fit` without `steps_per_epoch` (one pass per epoch).

    Args:
        dataset: the training `tf.data.Dataset` that `fit` iterates.
        backup: the `faqd_tf.compat.BackupAndRestore` (e.g. `SharedBackupAndRestore`) before it.
    """

    def __init__(self, dataset: "tf.data.Dataset", backup: compat.BackupAndRestore):
        super().__init__()
        self.dataset = dataset
        self.backup = backup

    def on_train_begin(self, logs=None):
        for _ in range(compat.fit_iterators_before(self.backup.restored_epoch(), self.dataset)):
            iter(self.dataset)


class BackupWriteError(OSError):
    """An epoch backup that could not be written (a full disk); the message says which backup is kept."""


class SharedBackupAndRestore(compat.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for a job of several workers sharing one backup folder,
    whose backups neither a kill nor a full disk can leave unusable.

    Every worker restores from the folder, so a restarted job resumes at one epoch on all of them;
    only the writer (the chief) saves and, with `delete_checkpoint`, finally deletes it. Backups are
    double, in Keras's files (``latest.weights.h5`` with ``training_metadata.json``, and the
    generation before as ``*.bkp``), but written differently: the weights are serialized in memory,
    the new generation is written next to the others and renamed into place, so a write that fails
    (`BackupWriteError`) or is killed leaves both generations as they were. The metadata records
    the weights' size and SHA-256: a generation whose weights do not match it (or, for a backup of
    plain Keras, whose metadata is older than its weights or not whole) is never restored; the one
    before it is.

    Args:
        backup_dir: the shared folder.
        writer: True on the one process that writes it.
        save_freq: as for `keras.callbacks.BackupAndRestore`.
        delete_checkpoint: delete the folder at the end of training; False leaves that to the
            caller, e.g. after it has saved the trained model.
    """

    def __init__(
        self,
        backup_dir: str,
        writer: bool = True,
        save_freq: str | int = "epoch",
        delete_checkpoint: bool = True,
    ):
        super().__init__(
            backup_dir,
            save_freq=save_freq,
            double_checkpoint=True,
            delete_checkpoint=delete_checkpoint,
        )
        self.writer = bool(writer)

    def on_train_begin(self, logs=None):
        latest, previous = self.generations()
        if self.writer:
            self._repair()
            super().on_train_begin(logs)
            return
        # A reader leaves the folder to the writer; it restores the first whole generation.
        whole = next((g for g in (latest, previous) if _whole(*g)), None)
        with tempfile.TemporaryDirectory() as scratch:
            if whole is None:
                restore = (os.path.join(scratch, "none"),) * 2
            elif whole is latest:
                restore = latest
            else:  # Keras loads weights only from a file named *.weights.h5
                restore = (
                    os.path.join(scratch, "restore.weights.h5"),
                    os.path.join(scratch, "restore.json"),
                )
                for source, target in zip(previous, restore):
                    shutil.copy2(source, target)
            with self.restoring_from(*restore):
                super().on_train_begin(logs)

    def _repair(self):
        """Leaves the folder as a whole latest generation (or none), and no partial files."""
        latest, previous = self.generations()
        for path in (*latest, *previous):
            _remove(path + PARTIAL)  # what a killed or failed write left
        if not _whole(*previous):
            for path in previous:
                _remove(path)
        if not _whole(*latest):
            # Never trusted: the one before becomes the latest (as a link: no space, whole at every step).
            for path in latest:
                _remove(path)
            for source, target in zip(previous, latest) if os.path.exists(previous[0]) else ():
                with written_aside(target) as partial:
                    _link_or_copy(source, partial)

    def write_backup(self):
        if not self.writer:
            return
        (weights, meta), (prev_weights, prev_meta) = self.generations()
        data = compat.weights_bytes(self.model)
        epoch, batch = self.position()
        record = {
            "epoch": epoch,
            "batch": batch,
            "weights_bytes": len(data),
            "weights_sha256": hashlib.sha256(data).hexdigest(),
        }
        rotate = os.path.exists(weights)  # the latest becomes the one before
        # Renamed into place when every file is written, in this order, each rename leaving a whole
        # generation to fall back to: the one before (weights, then metadata), then the latest (its
        # weights, whose old metadata no longer matches them, then its metadata). The contexts are
        # entered in the reverse order: they finish (rename) last in, first out.
        order = [*((prev_weights, prev_meta) if rotate else ()), weights, meta]
        try:
            os.makedirs(self.backup_dir, exist_ok=True)
            with contextlib.ExitStack() as stack:
                aside = {path: stack.enter_context(written_aside(path)) for path in reversed(order)}
                if rotate:
                    _link_or_copy(weights, aside[prev_weights])
                    _link_or_copy(meta, aside[prev_meta])
                write_synced(aside[weights], data)
                write_synced(aside[meta], json.dumps(record).encode())
        except OSError as err:
            failure = BackupWriteError(self._failure(err))
            failure.errno = err.errno  # the CLI tells a full disk from other failures by it
            raise failure from err

    def _failure(self, err):
        (weights, meta), _ = self.generations()
        kept = "no earlier backup exists"
        if _whole(weights, meta):
            with open(meta) as f:
                kept = f"the backup of epoch {json.load(f)['epoch']} is kept"
        return (
            f"the backup of epoch {self.position()[0]} could not be written to {self.backup_dir} "
            f"({err.strerror or err}); {kept}"
        )

    def on_train_end(self, logs=None):
        if self.writer:
            super().on_train_end(logs)


def _link_or_copy(source, target):
    # A hard link costs no space and keeps the file's mtime; some filesystems have none.
    _remove(target)
    try:
        os.link(source, target)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        shutil.copy2(source, target)


def _remove(path):
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def _whole(weights, meta):
    """Whether a backup generation can be restored: its weights and a whole metadata file that
    matches them (size and SHA-256), or, for Keras's own metadata, was written after them."""
    try:
        with open(meta) as f:
            record = json.load(f)
        int(record["epoch"])
        if "weights_sha256" not in record:
            # BackupAndRestore writes the weights, then the metadata: metadata older than the
            # weights belongs to the backup before.
            return os.stat(meta).st_mtime_ns >= os.stat(weights).st_mtime_ns
        if os.path.getsize(weights) != record["weights_bytes"]:
            return False
        digest = hashlib.sha256()
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
        return digest.hexdigest() == record["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def describe_gradient_norms(
    norms: dict[str, float], weights: dict[str, float]
) -> tuple[str, list[str]]:
    """One line of each weighted term's gradient norm and share, and a warning per inert term.

    A term whose gradient is below 1% of the largest term's barely moves the weights: its weight
    is probably on the wrong scale (e.g. an FA weight meant for another norm).

    >>> line, warnings = describe_gradient_norms({"kd": 2.0, "fa": 0.01}, {"kd": 1.0, "fa": 0.1})
    >>> line
    'gradient norms at the start: kd 2 (99.5%), fa 0.01 (0.5%)'
    >>> warnings
    ['the weighted fa term (weight 0.1) has 0.5% of the gradient norm of kd; it barely acts: raise its weight']
    """
    total = sum(norms.values()) or 1.0
    line = "gradient norms at the start: " + ", ".join(
        f"{name} {value:.3g} ({100 * value / total:.1f}%)" for name, value in norms.items()
    )
    largest = max(norms, key=norms.get)
    warnings = [
        f"the weighted {name} term (weight {weights[name]:g}) has {100 * value / norms[largest]:.1f}% of the gradient "
        f"norm of {largest}; it barely acts: raise its weight"
        for name, value in norms.items()
        if name != largest and value < 0.01 * norms[largest] and weights.get(name, 0) > 0
    ]
    return line, warnings


class GradientShares(keras.callbacks.Callback):
    """Prints, when training starts, each weighted loss term's gradient norm on one batch.

    For a `faqd_tf.Distiller` (it calls `model.gradient_norms`): a line with the norm and share
    of `alpha * KD`, `beta * FA` and `gamma * CE`, and a warning for a term below 1% of the
    largest, which would then barely act.

    Args:
        batch: one batch as `fit` takes it, or a `tf.data.Dataset` (its first batch).
        print_fn: where the line goes (default `print`).
    """

    def __init__(
        self,
        batch: "tf.Tensor | np.ndarray | tuple | tf.data.Dataset",
        print_fn: Callable[[str], None] = print,
    ):
        super().__init__()
        self.batch = batch
        self.print_fn = print_fn
        self.norms = None

    def on_train_begin(self, logs=None):
        model = self.model
        self.norms = model.gradient_norms(self.batch)
        line, warnings = describe_gradient_norms(
            self.norms, {term.name: term.weight for term in model.terms}
        )
        self.print_fn(line)
        for warning in warnings:
            self.print_fn(f"warning: {warning}")
