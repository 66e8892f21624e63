"""faqd_tf.callbacks: NaN stops, the resumable history, torn backups, BinaryRelax layers."""

import csv
import json
import os
import shutil

import keras
import numpy as np
import pytest

from faqd_tf import callbacks


def test_stop_on_non_finite_names_the_term():
    from faqd_tf.distiller import Distiller
    from faqd_tf.models import resnet_cifar
    from faqd_tf.quantize import quantize_model

    teacher = resnet_cifar(8, input_shape=(16, 16, 3))
    cb = callbacks.StopOnNonFiniteLoss("ck")
    cb.set_model(Distiller(quantize_model(teacher, weight_bits=2), teacher))  # its terms: kd and fa
    cb.on_epoch_begin(2)
    cb.on_train_batch_end(
        0, {"loss": 1.0, "fa": 0.5, "accuracy": float("nan")}
    )  # metrics are not losses
    with pytest.raises(
        callbacks.NonFiniteLossError,
        match=r"the fa loss became inf at epoch 3, batch 5; .*epoch 2 .* in ck",
    ):
        cb.on_train_batch_end(4, {"loss": 1.0, "fa": float("inf")})


def test_relaxed_layers_of_a_distiller_are_its_students_each_once():
    from faqd_tf.distiller import Distiller
    from faqd_tf.models import resnet_cifar
    from faqd_tf.quantize import quantize_model

    teacher = resnet_cifar(8, input_shape=(16, 16, 3))
    student = quantize_model(teacher, weight_bits=2, relax=1.0)
    expected = {l.name for l in student.layers if l.get_config().get("relax")}
    assert expected
    for model in (student, Distiller(student, teacher)):
        found = callbacks.relaxed_layers(model)
        assert len(found) == len(expected) and {l.name for l in found} == expected
    assert callbacks.relaxed_layers(teacher) == []


class _Record(keras.callbacks.Callback):
    """Epochs run and the weights each began with (after BackupAndRestore restored them)."""

    def __init__(self):
        super().__init__()
        self.epochs, self.weights = [], {}

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)
        self.weights[epoch] = [w.copy() for w in self.model.get_weights()]


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    return model


def _history(path):
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_history_restarts_on_a_fresh_run_and_drops_repeated_rows_on_resume(tmp_path, rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    path = str(tmp_path / "history.csv")
    _model().fit(x, y, epochs=3, verbose=0, callbacks=[callbacks.ResumableCSVLogger(path)])
    assert _history(path) == [0, 1, 2]
    # Resumed at epoch 1 (a backup of epoch 1, rows of epochs 1 and 2 written after it): replaced.
    _model().fit(
        x, y, epochs=3, initial_epoch=1, verbose=0, callbacks=[callbacks.ResumableCSVLogger(path)]
    )
    assert _history(path) == [0, 1, 2]
    # Resumed where it ended: nothing to train, the history stays.
    _model().fit(
        x, y, epochs=3, initial_epoch=3, verbose=0, callbacks=[callbacks.ResumableCSVLogger(path)]
    )
    assert _history(path) == [0, 1, 2]
    # A fresh run (epoch 0) starts a new history.
    _model().fit(x, y, epochs=2, verbose=0, callbacks=[callbacks.ResumableCSVLogger(path)])
    assert _history(path) == [0, 1]


@pytest.mark.parametrize(
    "damage",
    [
        "half-written metadata",
        "metadata older than the weights",
        "metadata missing",
        "truncated weights",
        "weights of another epoch",
    ],
)
def test_torn_backup_falls_back_to_the_one_before(tmp_path, rng, damage):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    backup = str(tmp_path / "backup")
    first = _Record()
    _model().fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(backup, delete_checkpoint=False), first],
    )
    meta, weights = (
        os.path.join(backup, "training_metadata.json"),
        os.path.join(backup, "latest.weights.h5"),
    )
    assert json.load(open(meta))["epoch"] == 3
    # The kill came after the weights of epoch 3 were written, before (or while) its epoch number was.
    if damage == "half-written metadata":
        open(meta, "w").write('{"epoch": ')
    elif damage == "metadata missing":
        os.remove(meta)
    elif (
        damage == "metadata older than the weights"
    ):  # Keras's own metadata: no digest of the weights
        open(meta, "w").write(json.dumps({"epoch": 2, "batch": 0}))
        os.utime(weights, ns=(os.stat(meta).st_mtime_ns + 10**9,) * 2)
    else:  # weights that are not those the (whole, newer) metadata describes: never trusted
        if damage == "truncated weights":  # a full disk, a power cut
            data = open(weights, "rb").read()
            open(weights, "wb").write(data[: len(data) // 2])
        else:
            shutil.copy(weights + ".bkp", weights)
        os.utime(meta, ns=(os.stat(weights).st_mtime_ns + 10**9,) * 2)

    again = _Record()
    _model().fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(backup, writer=True), again],
    )
    assert again.epochs == [2]  # resumed after epoch 2, the backup before
    for restored, expected in zip(again.weights[2], first.weights[2]):
        np.testing.assert_array_equal(restored, expected)
    assert not os.path.exists(backup)  # deleted at the end (delete_checkpoint=True)


def test_a_reader_restores_the_backup_before_a_torn_one_without_writing(tmp_path, rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    backup = tmp_path / "backup"
    first = _Record()
    _model().fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(str(backup), delete_checkpoint=False), first],
    )
    (backup / "training_metadata.json").write_text('{"epoch": ')  # the writer was killed writing it
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in backup.iterdir()}
    again = _Record()
    _model().fit(
        x,
        y,
        epochs=3,
        batch_size=4,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(str(backup), writer=False), again],
    )
    assert again.epochs == [2]
    for restored, expected in zip(again.weights[2], first.weights[2]):
        np.testing.assert_array_equal(restored, expected)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in backup.iterdir()} == before


def test_a_reader_restores_without_writing(tmp_path, rng):
    x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 2))
    backup = tmp_path / "backup"
    _model().fit(
        x,
        y,
        epochs=2,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(str(backup), delete_checkpoint=False)],
    )
    before = {p.name: p.stat().st_mtime_ns for p in backup.iterdir()}
    record = _Record()
    _model().fit(
        x,
        y,
        epochs=4,
        verbose=0,
        callbacks=[callbacks.SharedBackupAndRestore(str(backup), writer=False), record],
    )
    assert record.epochs == [2, 3]
    assert {p.name: p.stat().st_mtime_ns for p in backup.iterdir()} == before
