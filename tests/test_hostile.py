"""Hostile and unlucky inputs to the CLI, its config and data sources (issues 17 and 26), built here.

The promise (README, "What happens when..."): bad input ends in one line naming it and what to do,
exit code 2 and nothing written; a run killed at any moment, or stopped by a full disk, resumes with
nothing lost; a file of a few MB never makes the process grow past a few hundred MB (checked under an
address-space limit).
"""

import csv
import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

from faqd_tf import callbacks, cli, config, export, models, runner, training
from tests import helpers
from tests.helpers import (
    assert_one_line_exit_2,
    idx_bytes,
    make_idx,
    make_tiny,
    pixels,
    png_with_size,
    write_idx,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HW, CLASSES = (12, 12), 4


@pytest.fixture
def idx(tmp_path, rng):
    """A tiny IDX dataset: 64 train and 16 test images of 12 x 12 pixels, 4 classes."""
    make_idx(tmp_path / "idx", rng, n_train=64, n_test=16, hw=HW, classes=CLASSES)
    return tmp_path / "idx"


def write_config(tmp_path, source, **sections):
    base = {
        "dataset": {"source": source},
        "teacher": {"arch": "resnet8", "train": {"epochs": 2, "batch_size": 32, "lr": 0.05}},
        "train": {"epochs": 2, "batch_size": 32, "lr": 0.01},
        "output_dir": str(tmp_path / "out"),
    }
    return helpers.write_config(tmp_path, base, **sections)


def refused(tmp_path, capsys, argv, pattern):
    assert_one_line_exit_2(argv, pattern, capsys, tmp_path / "out")


def history(path):
    with open(path) as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def save_model_file(path, **kwargs):
    keras.utils.set_random_seed(5)
    models.get("resnet8", **kwargs).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------------
# Kills: a run killed at any moment resumes with nothing lost


class Killed(BaseException):
    """A kill: nothing catches it, nothing after it runs."""


def kill_at(monkeypatch, point):
    """Makes the next model save die at `point`; returns the weights of the model it was saving."""
    real = training.save_model
    seen = {}

    def save_model(model, path):
        seen["weights"] = [w.copy() for w in model.get_weights()]
        if point == "during the save":
            open(path[: -len(".keras")] + ".partial.keras", "wb").write(b"half a zip")
            raise Killed
        if point == "after the save":
            real(model, path)
        raise Killed

    monkeypatch.setattr(training, "save_model", save_model)  # the stages save through it
    return seen


# A kill before the save leaves what a kill during it leaves, less the half-written file.
@pytest.mark.parametrize("point", ["during the save", "after the save"])
def test_teacher_killed_at_its_end_resumes_with_nothing_lost(
    tmp_path, idx, capsys, monkeypatch, point
):
    cfg = write_config(tmp_path, f"idx:{idx}")
    out = tmp_path / "out"
    trained = kill_at(monkeypatch, point)
    with pytest.raises(Killed):
        cli.main(["--config", cfg, "--stage", "teacher"])
    assert (out / "backup" / "teacher").is_dir()  # the backup outlives every kill before it is done
    assert history(out / "teacher_history.csv") == [0, 1]

    monkeypatch.undo()
    assert cli.main(["--config", cfg, "--stage", "teacher"]) == 0
    assert history(out / "teacher_history.csv") == [0, 1]  # no epoch lost, none trained twice
    assert (
        not (out / "backup" / "teacher").exists() and not (out / "teacher.partial.keras").exists()
    )
    for saved, expected in zip(
        keras.models.load_model(out / "teacher.keras").get_weights(), trained["weights"]
    ):
        np.testing.assert_array_equal(saved, expected)

    if point == "after the save":  # --overwrite on the finished run starts a clean history
        assert (
            cli.main(
                [
                    "--config",
                    cfg,
                    "--stage",
                    "teacher",
                    "--overwrite",
                    "--set",
                    "teacher.train.epochs=1",
                ]
            )
            == 0
        )
        assert history(out / "teacher_history.csv") == [0]
        assert (
            len(os.listdir(out / "logs" / "teacher" / "train")) == 1
        )  # one run's TensorBoard events


# With recalibrate_bn, the statistics are re-estimated in the save: the resumed run recomputes the same.
@pytest.mark.parametrize("recalibrate_bn", [None, 48])
def test_distillation_killed_during_its_save_resumes_with_nothing_lost(
    tmp_path, idx, monkeypatch, recalibrate_bn
):
    teacher = save_model_file(tmp_path / "teacher.keras", num_classes=CLASSES, input_shape=(*HW, 1))
    # KD alone on an FP student: the stage's save-then-remove order is what is tested, on a short trace.
    cfg = write_config(
        tmp_path,
        f"idx:{idx}",
        teacher={"arch": None, "file": teacher},
        distill={"fa": None},
        student={"weight_bits": None, "recalibrate_bn": recalibrate_bn},
    )
    out = tmp_path / "out"
    trained = kill_at(monkeypatch, "during the save")
    with pytest.raises(Killed):
        cli.main(["--config", cfg, "--stage", "distill"])
    monkeypatch.undo()
    assert cli.main(["--config", cfg, "--stage", "distill"]) == 0
    assert history(out / "history.csv") == [0, 1]
    assert not (out / "backup" / "distill").exists()
    for saved, expected in zip(
        keras.models.load_model(out / "student.keras").get_weights(), trained["weights"]
    ):
        np.testing.assert_array_equal(saved, expected)


class _TrainingState(keras.callbacks.Callback):
    """Kills the run (`Killed`) before batch `kill_at = (epoch, batch)`, or records, when training
    ends, the student's weights and the optimizer's state (iterations, momenta)."""

    def __init__(self, kill_at=None):
        super().__init__()
        self.kill_at, self.state = kill_at, None

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._epoch, batch) == self.kill_at:
            raise Killed

    def on_train_end(self, logs=None):
        self.state = [
            np.array(v) for v in self.model.student.weights + self.model.optimizer.variables
        ]


def test_distillation_killed_mid_run_resumes_as_if_never_killed(tmp_path, idx):
    """Killed in its second epoch, the same command resumes from the first epoch's backup and ends
    with the weights and the optimizer state of a run that was never killed, bit for bit (the
    shuffled data of each epoch comes in the same order: `callbacks.ResumeDataOrder`)."""
    teacher = save_model_file(tmp_path / "teacher.keras", num_classes=CLASSES, input_shape=(*HW, 1))
    argv = {}
    for name in ("whole", "killed"):
        # KD alone on an FP student (a short trace): the resume is what is tested.
        argv[name] = [
            "--stage",
            "distill",
            "--config",
            write_config(
                tmp_path,
                f"idx:{idx}",
                teacher={"arch": None, "file": teacher},
                output_dir=str(tmp_path / name),
                distill={"fa": None},
                student={"weight_bits": None},
                dataset={"limit": 32, "eval_limit": 16},
                train={"epochs": 2, "batch_size": 16, "lr": 0.05},
            ),
        ]
    whole = _TrainingState()
    assert cli.main(argv["whole"], callbacks=[whole]) == 0
    with pytest.raises(Killed):
        cli.main(argv["killed"], callbacks=[_TrainingState(kill_at=(1, 1))])
    assert history(tmp_path / "killed" / "history.csv") == [0]
    resumed = _TrainingState()
    assert cli.main(argv["killed"], callbacks=[resumed]) == 0
    assert history(tmp_path / "killed" / "history.csv") == [0, 1]
    assert len(resumed.state) == len(whole.state)
    for got, want in zip(resumed.state, whole.state):
        np.testing.assert_array_equal(got, want)
    assert (
        int(resumed.state[len(resumed.model.student.weights)]) == 2 * 2
    )  # the optimizer's iterations


def test_busy_output_dir_stops_at_once(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    other = runner.FolderLock(str(tmp_path / "out"))
    other.acquire()  # another run holds the folder
    try:
        # The data source is missing too: the lock is checked before anything else.
        argv = ["--config", write_config(tmp_path, f"idx:{tmp_path / 'nowhere'}")]
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [
            f"train.py: error: output_dir {tmp_path / 'out'} is in use by another run; "
            "wait for it to end or choose another output_dir."
        ]
        assert os.listdir(tmp_path / "out") == []
    finally:
        other.release()


# ------------------------------------------------------------------------------------------------
# A full disk while an epoch's backup is written: one line, the backup before kept, the rerun resumes


def distill_case(tmp_path, rng, out):
    """Distillation of 2 epochs from a given teacher, writing to `out`; returns the config path.

    KD alone on an FP student keeps tracing short; its backups are as large as FAQD's 4-bit ones
    (1.08 MB: the student, the teacher, the optimizer's slots).
    """
    make_idx(tmp_path / "idx", rng, n_train=64, n_test=16, hw=HW, classes=CLASSES)
    teacher = save_model_file(tmp_path / "teacher.keras", num_classes=CLASSES, input_shape=(*HW, 1))
    return write_config(
        tmp_path,
        f"idx:{tmp_path / 'idx'}",
        teacher={"arch": None, "file": teacher},
        distill={"fa": None},
        student={"weight_bits": None},
        output_dir=str(out),
    )


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def small_disk(tmp_path, request):
    """A tmpfs of `request.param` bytes; a backup of `distill_case` takes 1.08 MB."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        mount = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={request.param}", "tmpfs", str(disk)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip(
            "no mount command here; test_a_backup_write_that_fails_keeps_the_one_before covers it"
        )
    if mount.returncode:
        pytest.skip(
            f"cannot mount a tmpfs here ({mount.stderr.strip()}); "
            "test_a_backup_write_that_fails_keeps_the_one_before covers it without root"
        )
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


# 1.4 MB: room for the backup of epoch 1, not for epoch 2's beside it (the reported case). 1 MB: not
# even for the first, which h5py used to fail writing (tracebacks, then a segmentation fault).
@pytest.mark.parametrize(
    "small_disk, kept", [("1400k", 1), ("1000k", None)], indirect=["small_disk"]
)
def test_disk_full_at_an_epoch_backup_keeps_the_one_before_and_resumes(
    tmp_path, rng, small_disk, kept
):
    out = small_disk / "out"
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        distill_case(tmp_path, rng, out),
        "--stage",
        "distill",
    ]
    full = subprocess.run(command, capture_output=True, text=True, timeout=300)
    backup = out / "backup" / "distill"
    failed, before = (
        (2, f"the backup of epoch {kept} is kept") if kept else (1, "no earlier backup exists")
    )
    # One line (no h5py tracebacks, no segmentation fault), exit code 1.
    assert full.returncode == 1, full.stderr[-3000:]
    assert full.stderr.strip().splitlines() == [
        f"train.py: error: stage distill ran out of disk space: the backup of epoch {failed} could not be written "
        f"to {backup} (No space left on device); {before}; free some space, then run the same command to resume "
        "from the last finished epoch."
    ]
    if not kept:
        assert os.listdir(backup) == []  # nothing half-written stays
        return
    assert sorted(os.listdir(backup)) == ["latest.weights.h5", "training_metadata.json"]
    assert json.loads((backup / "training_metadata.json").read_text())["epoch"] == kept
    first = rows(out / "history.csv")[0]

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)  # space freed
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Epoch 2/2" in again.stdout and "Epoch 1/2" not in again.stdout  # resumed after epoch 1
    assert history(out / "history.csv") == [0, 1] and rows(out / "history.csv")[0] == first
    assert (out / "student.keras").is_file() and not backup.exists()


def test_a_backup_write_that_fails_keeps_the_one_before(tmp_path, rng, capsys, monkeypatch):
    """The same without root: the kernel refuses the write of epoch 2's backup (RLIMIT_FSIZE: EFBIG)."""
    out = tmp_path / "out"
    argv = ["--config", distill_case(tmp_path, rng, out), "--stage", "distill"]
    save = callbacks.SharedBackupAndRestore.write_backup

    def save_under_a_file_size_limit(self):
        if self.position()[0] != 2:
            return save(self)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        handler = signal.signal(
            signal.SIGXFSZ, signal.SIG_IGN
        )  # the write fails instead of the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        try:
            return save(self)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, handler)

    monkeypatch.setattr(
        callbacks.SharedBackupAndRestore, "write_backup", save_under_a_file_size_limit
    )
    assert cli.main(argv) == 1
    backup = out / "backup" / "distill"
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: error: stage distill failed: the backup of epoch 2 could not be written to {backup} "
        "(File too large); the backup of epoch 1 is kept; fix what it names, then run the same command to "
        "resume from the last finished epoch."
    ]
    assert sorted(os.listdir(backup)) == ["latest.weights.h5", "training_metadata.json"]
    first = rows(out / "history.csv")[0]

    monkeypatch.undo()
    assert cli.main(argv) == 0
    assert "Epoch 1/2" not in capsys.readouterr().out
    assert history(out / "history.csv") == [0, 1] and rows(out / "history.csv")[0] == first
    assert (out / "student.keras").is_file() and not backup.exists()


# ------------------------------------------------------------------------------------------------
# Bad data, caught before anything is written


def _png(path, rng, hw=HW):
    Image.fromarray(pixels(rng, (*hw, 3))).save(path)


def _folder(root, rng, test=True, per_class=3):
    for split in ("train", "test") if test else ("train",):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                _png(root / split / cls / f"{i}.png", rng)
    return root


def _damage(kind, path, rng):
    if kind == "truncated":
        _png(path, rng)
        path.write_bytes(path.read_bytes()[:-30])
    elif kind == "zero-byte":
        path.write_bytes(b"")
    else:
        path.write_text("<html>not an image</html>")


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", "is truncated"),
        ("zero-byte", "is an empty file"),
        ("non-image", "is not a readable image"),
    ],
)
@pytest.mark.parametrize("split", ["train", "test"])
def test_broken_image_in_a_folder_is_named(tmp_path, rng, capsys, kind, words, split):
    root = _folder(tmp_path / "pics", rng)
    bad = root / split / "b" / "9.png"
    _damage(kind, bad, rng)
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"folder:{root}")],
        f"image file {bad} {words}",
    )


def test_huge_image_needs_an_image_size(tmp_path, rng, capsys):
    root = _folder(tmp_path / "pics", rng)
    Image.new("L", (6000, 6000)).save(
        root / "train" / "a" / "0.png"
    )  # the first image sets the size
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"folder:{root}")],
        r"are 6000 x 6000 pixels, too large for a network's input as they are; pass image_size",
    )


def test_symlink_loop_in_a_folder_is_named(tmp_path, rng, capsys):
    root = _folder(tmp_path / "pics", rng)
    loop = root / "train" / "a" / "again"
    loop.symlink_to(root / "train" / "a")
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"folder:{root}")],
        f"{loop} leads back to",
    )


def _without(path):
    os.remove(path)


@pytest.mark.parametrize(
    "layout, extra, words",
    [
        ("idx", {}, r"has no t10k-images-idx3-ubyte.gz"),
        (
            "idx",
            {"dataset": {"validation_split": "validation"}},
            r"has no t10k-images-idx3-ubyte.gz",
        ),
        ("folder", {}, r"has no test split"),
        ("tiny", {}, r"has no val/val_annotations.txt"),
    ],
)
def test_missing_test_split_is_caught_before_training(tmp_path, rng, capsys, layout, extra, words):
    if layout == "idx":
        make_idx(tmp_path / "d", rng, hw=HW)
        _without(tmp_path / "d" / "t10k-images-idx3-ubyte.gz")
        source = f"idx:{tmp_path / 'd'}"
    elif layout == "folder":
        source = f"folder:{_folder(tmp_path / 'd', rng, test=False, per_class=10)}"
    else:
        make_tiny(tmp_path / "d", rng)
        _without(tmp_path / "d" / "val" / "val_annotations.txt")
        source = f"tiny_imagenet:{tmp_path / 'd'}"
    refused(tmp_path, capsys, ["--config", write_config(tmp_path, source, **extra)], words)


def test_test_labels_outside_the_classes(tmp_path, rng, capsys):
    make_idx(tmp_path / "d", rng, hw=HW, classes=CLASSES)
    labels = rng.integers(0, CLASSES, 12).astype(np.uint8)
    labels[5] = CLASSES + 3
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", labels)
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"idx:{tmp_path / 'd'}")],
        r"t10k-labels-idx1-ubyte.gz has label 7 \(at position 5\), but the train labels have 4 classes",
    )


def test_constant_images_name_the_file(tmp_path, rng, capsys):
    make_idx(tmp_path / "d", rng, hw=HW)
    write_idx(tmp_path / "d" / "train-images-idx3-ubyte.gz", np.zeros((40, *HW), np.uint8))
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"idx:{tmp_path / 'd'}")],
        r"train-images-idx3-ubyte.gz has every pixel 0 \(std 0\)",
    )


def _one_class(tmp_path, rng, layout):
    if layout == "folder":
        for split in ("train", "test"):
            (tmp_path / "d" / split / "a").mkdir(parents=True)
            for i in range(4):
                _png(tmp_path / "d" / split / "a" / f"{i}.png", rng)
        return f"folder:{tmp_path / 'd'}"
    label = {"idx, every label 0": 0, "idx, every label 2": 2}[
        layout
    ]  # 2: three class ids, one present
    make_idx(tmp_path / "d", rng, hw=HW)
    write_idx(tmp_path / "d" / "train-labels-idx1-ubyte.gz", np.full(40, label, np.uint8))
    write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte.gz", np.full(12, label, np.uint8))
    return f"idx:{tmp_path / 'd'}"


@pytest.mark.parametrize("layout", ["idx, every label 0", "idx, every label 2", "folder"])
def test_one_class_dataset_is_refused_before_the_teacher_trains(tmp_path, rng, capsys, layout):
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, _one_class(tmp_path, rng, layout))],
        r"has one class in its train labels; a teacher needs two or more to learn anything",
    )


def test_one_class_dataset_still_distills_from_a_given_teacher(tmp_path, rng):
    # Distillation reads no labels: only a teacher trained here needs classes to tell apart.
    source = _one_class(tmp_path, rng, "idx, every label 2")
    teacher = save_model_file(tmp_path / "t.keras", num_classes=3, input_shape=(*HW, 1))
    run = runner.Run(
        config.load(write_config(tmp_path, source, teacher={"arch": None, "file": teacher}))
    )
    run.preflight(run.plan("all"))


# ------------------------------------------------------------------------------------------------
# Models that do not fit the data, FA layers that do not exist: caught before training


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (
            {"num_classes": CLASSES, "input_shape": (32, 32, 3)},
            r"takes inputs of shape \(32, 32, 3\), but .* yields images of \(12, 12, 1\)",
        ),
        ({"num_classes": 10, "input_shape": (*HW, 1)}, r"has 10 outputs, but .* has 4 classes"),
    ],
)
def test_teacher_that_does_not_fit_the_data(tmp_path, idx, capsys, kwargs, words):
    teacher = save_model_file(tmp_path / "t.keras", **kwargs)
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"idx:{idx}", teacher={"arch": None, "file": teacher})],
        f"teacher.file .*t.keras {words}",
    )


class _ScaleByTwo(keras.layers.Layer):
    def call(self, x):
        return 2.0 * x


def test_teacher_with_a_class_nobody_registered_is_named_with_its_module(tmp_path, idx, capsys):
    keras.saving.register_keras_serializable(package="elsewhere")(_ScaleByTwo)
    try:
        inputs = keras.Input((*HW, 1))
        outputs = keras.layers.Dense(CLASSES)(keras.layers.Flatten()(_ScaleByTwo()(inputs)))
        keras.Model(inputs, outputs).save(tmp_path / "t.keras")
    finally:
        del keras.saving.get_custom_objects()["elsewhere>_ScaleByTwo"]
    refused(
        tmp_path,
        capsys,
        [
            "--config",
            write_config(
                tmp_path, f"idx:{idx}", teacher={"arch": None, "file": str(tmp_path / "t.keras")}
            ),
        ],
        r"teacher.file .*t.keras needs the class elsewhere>_ScaleByTwo \(module tests.test_hostile\), which is not "
        r"registered; load it from Python after `import tests.test_hostile`",
    )


def test_recalibrating_a_student_without_batchnorm_is_refused_before_training(
    tmp_path, idx, capsys
):
    teacher = keras.Sequential(
        [
            keras.Input((*HW, 1)),
            keras.layers.Conv2D(4, 3),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(CLASSES),
        ],
        name="no_bn",
    )
    teacher.save(tmp_path / "t.keras")
    cfg = write_config(
        tmp_path,
        f"idx:{idx}",
        teacher={"arch": None, "file": str(tmp_path / "t.keras")},
        distill={"fa": None},
        student={"recalibrate_bn": 1000},
    )
    for argv in ([], ["--tune"]):  # the tuning trials recalibrate too
        refused(
            tmp_path,
            capsys,
            ["--config", cfg, *argv],
            r"student.recalibrate_bn: the student 'no_bn' has no "
            r"BatchNormalization layer to recalibrate; set student.recalibrate_bn to null\.$",
        )


def test_recalibration_that_would_not_fit_in_memory_is_refused_before_training(
    tmp_path, idx, capsys, monkeypatch
):
    from faqd_tf import stages

    monkeypatch.setattr(
        stages, "RECALIBRATION_BYTES", 40 * 12 * 12 * 4
    )  # 40 images of the 12 x 12 x 1 dataset
    cfg = write_config(tmp_path, f"idx:{idx}", student={"recalibrate_bn": 41})
    refused(
        tmp_path,
        capsys,
        ["--config", cfg],
        r"student.recalibrate_bn=41 would hold 0.0 GiB of 12x12x1 images "
        r"in memory; use at most 40\.$",
    )
    cfg = write_config(
        tmp_path, f"idx:{idx}", student={"recalibrate_bn": 41}, dataset={"limit": 40}
    )
    # dataset.limit keeps 40 images: they fit.
    assert (
        cli.main(["--config", cfg, "--set", "teacher.train.epochs=1", "--set", "train.epochs=1"])
        == 0
    )
    assert "BatchNormalization layers on 40 unlabeled training images" in capsys.readouterr().out


def test_unknown_fa_layer_is_caught_before_the_teacher_trains(tmp_path, idx, capsys):
    cfg = write_config(
        tmp_path,
        f"idx:{idx}",
        distill={"teacher_layers": ["stage1", "nope"], "student_layers": ["stage1", "nope"]},
    )
    refused(
        tmp_path, capsys, ["--config", cfg], r"distill: Model 'resnet8' has no layer named 'nope'"
    )


# ------------------------------------------------------------------------------------------------
# Exports: what would fail after the evaluation is refused before any work


@pytest.mark.parametrize("kind", export.KINDS)
def test_export_path_taken_by_a_folder_is_refused_before_any_work(tmp_path, idx, capsys, kind):
    folder = tmp_path / "out" / export.FILENAMES[kind]
    folder.mkdir(parents=True)
    assert cli.main(["--config", write_config(tmp_path, f"idx:{idx}"), "--export", kind]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: error: --export {kind} writes the file {folder}, which is a folder; move it away or choose "
        "another output_dir."
    ]
    assert os.listdir(tmp_path / "out") == [folder.name]  # no teacher trained, nothing written


@pytest.mark.parametrize("kind", [k for k in export.KINDS if export.needs_quantized(k)])
@pytest.mark.parametrize("stage", ["all", "evaluate"])
def test_integer_export_of_a_float_student_is_refused_before_any_work(
    tmp_path, idx, capsys, kind, stage
):
    cfg = write_config(tmp_path, f"idx:{idx}", student={"weight_bits": None})
    out = tmp_path / "out"
    if stage == "evaluate":  # a float student distilled earlier
        out.mkdir()
        for name in ("teacher.keras", "student.keras"):
            save_model_file(out / name, num_classes=CLASSES, input_shape=(*HW, 1))
    before = sorted(os.listdir(out)) if out.exists() else None
    assert cli.main(["--config", cfg, "--stage", stage, "--export", kind]) == 2
    float_kinds = ", ".join(k for k in export.KINDS if not export.needs_quantized(k))
    assert capsys.readouterr().err.strip().splitlines() == [
        f"train.py: error: --export {kind} stores a quantized student's integer codes, but the student has no "
        f"quantized kernel; set student.weight_bits, or export {float_kinds}."
    ]
    assert (sorted(os.listdir(out)) if out.exists() else None) == before


@pytest.mark.parametrize("argv", [["--stage", "teacher"], ["--tune"]])
def test_export_without_the_evaluate_stage_is_refused(tmp_path, idx, capsys, argv):
    refused(
        tmp_path,
        capsys,
        ["--config", write_config(tmp_path, f"idx:{idx}"), "--export", "packed", *argv],
        r"--export writes the student at the end of the evaluate stage, which this command does not run",
    )


@pytest.mark.parametrize(
    "stage, advice",
    [
        ("evaluate", "run the same command again."),  # no epochs in an evaluation
        ("distill", "run the same command to resume from the last finished epoch."),
    ],
)
def test_failure_line_ends_one_sentence_with_the_advice_of_its_stage(stage, advice):
    error = ValueError(
        "TFLite conversion of 'student' (mode 'int8') failed: ConverterError: it broke.\nmore"
    )
    assert cli._stage_failure(runner.StageFailed(stage, error)) == (
        f"stage {stage} failed: TFLite conversion of 'student' (mode 'int8') failed: ConverterError: it broke; "
        f"fix what it names, then {advice}"
    )


# ------------------------------------------------------------------------------------------------
# Config and command line


def _deep(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text('{"a":' * 50_000)  # 250 KB, deeper than Python's parser goes
    return str(path)


def _bytes(tmp_path, raw):
    path = tmp_path / "raw.json"
    path.write_bytes(raw)
    return str(path)


CONFIG_CASES = {
    "deep JSON": (
        lambda t, c: ["--config", _deep(t)],
        r"nests lists and objects deeper than 32 levels",
    ),
    "--set into a non-object": (
        lambda t, c: [
            "--config",
            _bytes(t, b'{"dataset": {"source": "idx:x"}, "train": 5}'),
            "--set",
            "train.epochs=1",
        ],
        r"'train' is 5 in the config file, not an object",
    ),
    "lr inf": (
        lambda t, c: ["--config", c, "--set", "train.lr=1e999"],
        r"train.lr=Infinity is not valid",
    ),
    "temperature 1e-300": (
        lambda t, c: ["--config", c, "--set", "distill.temperature=1e-300"],
        r"distill.temperature=1e-300 is not valid; use a number >= 0.05",
    ),
    "unknown augment": (
        lambda t, c: ["--config", c, "--set", "dataset.augment=mixup"],
        r'dataset.augment="mixup" is not valid',
    ),
    "5000-digit int": (
        lambda t, c: ["--config", c, "--set", "train.batch_size=" + "9" * 5000],
        r"train.batch_size=<an integer of 5,000 digits> is not valid",
    ),
    "5000-digit --trials": (
        lambda t, c: ["--config", c, "--tune", "--trials", "9" * 5000],
        r"invalid int value: '9{60}\.\.\.9{20} \(5,000 characters\)'",
    ),
    "non-UTF-8": (
        lambda t, c: ["--config", _bytes(t, b'{"output_dir": "\xff"}')],
        r"raw.json is not UTF-8 text \(byte 0xff",
    ),
    "50 MB string": (
        lambda t, c: ["--config", _bytes(t, b'{"output_dir": "' + b"x" * 50 * 2**20 + b'"}')],
        r"raw.json is 50.0 MiB, more than the 1.0 MiB it may be",
    ),
    "100 KB string": (
        lambda t, c: ["--config", c, "--set", "dataset.labels=" + "y" * 100_000],
        r"dataset.labels=\"y{59}\.\.\.y{19}\" \(100,002 characters\) is not valid",
    ),
    "recalibrate_bn 0": (
        lambda t, c: ["--config", c, "--set", "student.recalibrate_bn=0"],
        r"student.recalibrate_bn=0 is not valid; use an integer >= 1 and <= 100000 or null",
    ),
    "empty output_dir": (
        lambda t, c: ["--config", c, "--set", 'output_dir=""'],
        r"output_dir=\"\" is not valid; use a non-empty string",
    ),
    "output_dir in /proc": (
        lambda t, c: ["--config", c, "--set", "output_dir=/proc/faqd"],
        r"output_dir /proc/faqd cannot be written",
    ),
    "output_dir is a file": (
        lambda t, c: ["--config", c, "--set", f"output_dir={c}"],
        r"is a file, not a folder",
    ),
    "output_dir under a file": (
        lambda t, c: ["--config", c, "--set", f"output_dir={c}/run"],
        r"lies under .*, which is a file",
    ),
    # The value is shortened, the reason kept.
    "120,000-character source": (
        lambda t, c: [
            "--config",
            _bytes(t, json.dumps({"dataset": {"source": "idx:/" + "d" * 120_000}}).encode()),
        ],
        r"idx:/d{55}\.\.\.d{20} \(120,005 characters\) does not exist; check the path",
    ),
    "key twice": (
        lambda t, c: [
            "--config",
            _bytes(t, b'{"dataset": {"source": "idx:x"}, "output_dir": "a", "output_dir": "b"}'),
        ],
        r"raw.json gives the key 'output_dir' twice; keep one of them\.$",
    ),
    "nested key twice": (
        lambda t, c: [
            "--config",
            _bytes(
                t,
                b'{"dataset": {"source": "idx:x"}, "train": {"epochs": 1, "lr": 0.1, "epochs": 2}}',
            ),
        ],
        r"raw.json gives the key 'train.epochs' twice; keep one of them\.$",
    ),
    "key twice in --set": (
        lambda t, c: ["--config", c, "--set", 'train={"lr": 0.1, "lr": 0.2}'],
        r"--set train gives the key 'lr' twice",
    ),
    "config is a folder": (
        lambda t, c: ["--config", str(t)],
        r"config file .* is a directory; pass --config with a JSON file",
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_hostile_config_and_arguments(tmp_path, idx, capsys, case):
    argv, pattern = CONFIG_CASES[case]
    argv = argv(tmp_path, write_config(tmp_path, f"idx:{idx}"))
    refused(tmp_path, capsys, argv, pattern)


def test_tfds_offline_says_so_at_once(tmp_path, capsys, monkeypatch):
    import socket

    from faqd_tf.data import tfds

    def no_network(*args, **kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(tfds.socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)  # and TFDS's own downloads with it
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    cfg = write_config(tmp_path, "tfds:mnist", dataset={"data_dir": str(tmp_path / "tfds")})
    refused(
        tmp_path,
        capsys,
        ["--config", cfg],
        r"tfds:mnist is not prepared in .* and this machine cannot reach storage.googleapis.com",
    )


# ------------------------------------------------------------------------------------------------
# TensorFlow: not loaded for a config error or --help; its start-up lines hidden from either command

# What pip writes for the console script `faqd-tf = "faqd_tf.cli:main"` (pyproject.toml).
CONSOLE_SCRIPT = """import re
import sys
from faqd_tf.cli import main
if __name__ == "__main__":
    sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
    sys.exit(main())
"""

_MODULES_AFTER = textwrap.dedent(
    """
    import json, sys
    from faqd_tf import cli
    try:
        code = cli.main(sys.argv[1:])
    except SystemExit as exit:
        code = exit.code
    print(json.dumps({"code": code, "loaded": [m for m in ("tensorflow", "keras") if m in sys.modules]}))
    """
)


def _env_without_tf_logging():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "PYTHONPATH")}
    return {**env, "PYTHONPATH": ROOT}


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["--config", "quickstart", "--set", "train.epochs=0"],
        ["--config", "quickstart", "--set", "dataset.augment=mixup"],
    ],
)
def test_help_and_config_errors_load_no_tensorflow(tmp_path, argv):
    proc = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *argv],
        capture_output=True,
        text=True,
        env=_env_without_tf_logging(),
        cwd=tmp_path,
        timeout=120,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"code": 0 if argv == ["--help"] else 2, "loaded": []}, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == (0 if argv == ["--help"] else 1), proc.stderr


@pytest.mark.parametrize("entry", ["train.py", "faqd-tf"])
def test_error_after_tensorflow_loads_is_one_line_from_either_command(tmp_path, entry):
    if entry == "faqd-tf":
        script = tmp_path / "bin" / "faqd-tf"
        script.parent.mkdir()
        script.write_text(CONSOLE_SCRIPT)
    else:
        script = os.path.join(ROOT, "train.py")
    missing = tmp_path / "nowhere"  # found missing after TensorFlow loads, by the data's preflight
    proc = subprocess.run(
        [sys.executable, str(script), "--config", write_config(tmp_path, f"idx:{missing}")],
        capture_output=True,
        text=True,
        env=_env_without_tf_logging(),
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"{entry}: error: idx:{missing} does not exist; check the path (relative paths start at data_dir, or at "
        "the working directory without one)."
    ]


# ------------------------------------------------------------------------------------------------
# Memory: small files that claim gigabytes, read under an address-space limit

_BOUNDED = textwrap.dedent(
    """
    import json, resource, sys
    from faqd_tf import data
    # Everything imported; from here the process may grow by at most 400 MB.
    size = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (size + 400 * 2**20, resource.RLIM_INFINITY))
    results = {}
    for name, source in json.loads(sys.argv[1]).items():
        try:
            data.dataset_info(source, image_size=None)
            results[name] = "accepted"
        except MemoryError:
            results[name] = "MemoryError"
        except (ValueError, OSError) as err:
            results[name] = str(err)
    print(json.dumps(results))
    """
)


def _gzip_members(path, head, zeros, repeat, more=None):
    """A gzip file of `head` + `zeros` zero bytes, then `repeat` more members of `more` (or `zeros`) zero bytes."""
    member = gzip.compress(b"\0" * (more or zeros), compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(head + b"\0" * zeros, compresslevel=9))
        for _ in range(repeat):
            f.write(member)


def test_small_files_never_grow_the_process_past_a_few_hundred_mb(tmp_path, rng):
    sources = {}

    def idx_folder(name, images=None, labels=None):
        folder = tmp_path / name
        make_idx(folder, rng, n_train=40, hw=HW)
        if labels is not None:
            write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
        if images is not None:
            images(folder / "train-images-idx3-ubyte.gz")
        sources[name] = f"idx:{folder}"

    absurd = rng.integers(0, 4, 40).astype(np.int32)
    absurd[7] = 2**31 - 1
    idx_folder("absurd label", labels=absurd)
    # 3 GiB of images declared, all of them present as zeros: 3 MB of gzip.
    n = 3 * 2**30 // 784
    header = bytes([0, 0, 8, 3]) + np.asarray([n, 28, 28], ">u4").tobytes()
    idx_folder("gzip bomb", images=lambda p: _gzip_members(p, header, 2**24, 191))
    # Declares 60,000 images, holds 40.
    idx_folder(
        "declared beyond the bytes",
        images=lambda p: p.write_bytes(
            gzip.compress(
                bytes([0, 0, 8, 3])
                + np.asarray([60000, *HW], ">u4").tobytes()
                + idx_bytes(pixels(rng, (40, *HW)))[16:]
            )
        ),
    )
    # 60 MiB of black images, under the inflation floor: read whole, statistics in bounded chunks.
    black = 60 * 2**20 // 144
    header = bytes([0, 0, 8, 3]) + np.asarray([black, *HW], ">u4").tobytes()
    idx_folder(
        "black",
        images=lambda p: _gzip_members(p, header, black * 144 - 59 * 2**20, 59, 2**20),
        labels=rng.integers(0, 4, black).astype(np.uint8),
    )
    # A PNG that claims 100,000 x 100,000 pixels.
    pics = tmp_path / "pics" / "a"
    pics.mkdir(parents=True)
    png_with_size(pics / "0.png", 100_000, 100_000)
    sources["png bomb"] = f"folder:{tmp_path / 'pics'}"

    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": ROOT}
    proc = subprocess.run(
        [sys.executable, "-c", _BOUNDED, json.dumps(sources)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {
        "absurd label": "has label 2147483647 (at position 7); class ids must be below 100,000",
        "gzip bomb": "declares 3.0 GiB of data, more than its",
        "declared beyond the bytes": "is truncated",
        "black": "has every pixel 0 (std 0)",
        "png bomb": "has more than 67,108,864 pixels",
    }
    for name, words in expected.items():
        assert words in results[name], (name, results[name])
