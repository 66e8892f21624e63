"""Keras callbacks of FAQD."""

import csv
import json
import os
import shutil

import keras
import numpy as np


def _walk(layer, seen):
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    # `Model.layers` lists a model's layers, and for a subclassed model (a Distiller) the layers
    # and models it tracks as attributes (its student and teacher).
    for sub in getattr(layer, "layers", ()):
        yield from _walk(sub, seen)


def relaxed_layers(model):
    """Every layer under `model` (nested models and a Distiller's student included) with a
    BinaryRelax factor, each once."""
    return [layer for layer in _walk(model, set()) if getattr(layer, "relax_lambda", None) is not None]


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

    def __init__(self, eta=1.02):
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
    faqd_tf.callbacks.NonFiniteLossError: the loss became nan at epoch 1, batch 2; no epoch had finished, so there is no checkpoint
    """

    def __init__(self, backup_dir=None):
        super().__init__()
        self.backup_dir = backup_dir
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        for name, value in (logs or {}).items():
            if name not in ("loss", "kd", "fa", "ce"):
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

    def __init__(self, filename, separator=","):
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
        partial = self.filename + ".partial"
        with open(partial, "w", newline="") as f:
            csv.writer(f, delimiter=self.sep).writerows(kept)
        os.replace(partial, self.filename)


class SharedBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` for a job of several workers sharing one backup folder.

    Every worker restores from the folder, so a restarted job resumes at one epoch on all of them;
    only the writer (the chief) saves and, with `delete_checkpoint`, finally deletes it. Backups are
    double (`double_checkpoint=True`): a backup cut short by a kill falls back to the one before it,
    also when the kill came between its weights and its epoch number (a metadata file older than
    the weights, or not whole).

    Args:
        backup_dir: the shared folder.
        writer: True on the one process that writes it.
        save_freq: as for `keras.callbacks.BackupAndRestore`.
        delete_checkpoint: delete the folder at the end of training; False leaves that to the
            caller, e.g. after it has saved the trained model.
    """

    def __init__(self, backup_dir, writer=True, save_freq="epoch", delete_checkpoint=True):
        super().__init__(backup_dir, save_freq=save_freq, double_checkpoint=True, delete_checkpoint=delete_checkpoint)
        self.writer = bool(writer)

    def on_train_begin(self, logs=None):
        # BackupAndRestore names its files only in these attributes (Keras 3.12-3.15); there is no
        # public hook for a torn backup, so the repair reads and, on a worker, redirects them.
        weights, meta = self._weights_path, self._training_metadata_path
        prev_weights, prev_meta = self._prev_weights_path, self._prev_training_metadata_path
        if _torn(weights, meta):
            # Fall back to the backup before (none: start over, as before the first backup).
            whole = os.path.exists(prev_weights) and not _torn(prev_weights, prev_meta)
            if self.writer:
                for source, target in ((prev_weights, weights), (prev_meta, meta)):
                    if whole:
                        shutil.copy(source, target)
                    elif os.path.exists(target):
                        os.remove(target)
            elif whole:  # the writer repairs the folder; read the whole backup meanwhile
                self._weights_path, self._training_metadata_path = prev_weights, prev_meta
            else:
                self._weights_path = self._training_metadata_path = os.path.join(self.backup_dir, "none")
        super().on_train_begin(logs)

    def _save_model(self):
        if self.writer:
            super()._save_model()

    def on_train_end(self, logs=None):
        if self.writer:
            super().on_train_end(logs)


def _torn(weights, meta):
    """Whether a backup's weights exist without a whole metadata file written after them."""
    if not os.path.exists(weights):
        return False
    try:
        with open(meta) as f:
            json.load(f)["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return True
    # BackupAndRestore writes the weights, then the metadata: metadata older than the weights
    # belongs to the backup before.
    return os.stat(meta).st_mtime_ns < os.stat(weights).st_mtime_ns


def describe_gradient_norms(norms, weights):
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
        f"{name} {value:.3g} ({100 * value / total:.1f}%)" for name, value in norms.items())
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

    def __init__(self, batch, print_fn=print):
        super().__init__()
        self.batch = batch
        self.print_fn = print_fn
        self.norms = None

    def on_train_begin(self, logs=None):
        model = self.model
        self.norms = model.gradient_norms(self.batch)
        weights = {"kd": model.alpha, "fa": model.beta, "ce": model.gamma}
        line, warnings = describe_gradient_norms(self.norms, weights)
        self.print_fn(line)
        for warning in warnings:
            self.print_fn(f"warning: {warning}")
