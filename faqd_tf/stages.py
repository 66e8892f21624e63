"""The stages of a run as objects: teacher, distill, evaluate (which writes the exports) and tune.

A stage reads the resolved config sections it names (`sections`; the `Stage.of` constructor hands
them over), lists the datasets it builds (`datasets`), checks what it can before anything is written
(`check_source`, then `check`: small named checks), and runs (`run`). `faqd_tf.runner.Run` plans
which stages run and sequences them; they share a `Workspace`: the run's paths, the distribution
strategy, what the dataset is (`info`), the data pipelines, model loading, and the protocol every
training stage follows (`Workspace.train`). The distill and tune stages build their students the
one way `StudentStage.build_student` does.

>>> sorted(REGISTRY)
['distill', 'evaluate', 'teacher', 'tune']
>>> REGISTRY["distill"].sections
('distill', 'student', 'train', 'dataset', 'teacher')
"""

import dataclasses
import json
import math
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Sequence

import keras
import numpy as np
import tensorflow as tf

from faqd_tf import data, distribute, inputs, models, quantize, registration, terms, training
from faqd_tf.batchnorm import recalibrate_batchnorm
from faqd_tf.callbacks import (
    AlphaStats,
    BinaryRelaxScheduler,
    GradientShares,
    ResumableCSVLogger,
    ResumeDataOrder,
    SharedBackupAndRestore,
    StopOnNonFiniteLoss,
)
from faqd_tf.distiller import Distiller, teacher_cache_obstacles
from faqd_tf.names import (
    ACTIVATION_STEP,
    DISTILL,
    EVALUATE,
    EXPORTS,
    HISTORIES,
    TEACHER,
    TRAINED,
    TUNE,
    UsageError,
    say,
)
from faqd_tf.options import SUPPORTED_BITS, DistillOptions
from faqd_tf.quantize import quantize_model, quantized_relus, set_alpha_decay
from faqd_tf.report import plot_curves, print_table, write_json
from faqd_tf.summary import iter_layers, quantized_kernel_bits, summary

RECALIBRATION_BYTES = 2**31
"""The most memory `student.recalibrate_bn`'s images may take (float32): 2 GiB, as the data cache."""


@dataclasses.dataclass(frozen=True)
class Data:
    """A dataset a stage builds: a training set (shuffled, augmented, `dataset.limit`) when
    `batch_size` is given, else an evaluation set (`dataset.eval_limit`, batches of `train.batch_size`)."""

    split: str
    labels: bool
    batch_size: int | None = None

    @property
    def training(self) -> bool:
        return self.batch_size is not None


@dataclasses.dataclass
class Checked:
    """What the checks of the planned stages learn for the ones after them."""

    planned: set
    teacher: keras.Model | None = (
        None  # the teacher, or an untrained stand-in for one still to train
    )
    quantized: bool = False  # whether the final student has quantized kernels
    student: keras.Model | None = (
        None  # the student the exports will convert (untrained when distill runs)
    )


class Workspace:
    """What the stages of one run share: paths, the strategy, the dataset's info and pipelines,
    model loading and the training protocol.

    Args:
        config: the resolved config; the workspace reads `output_dir`, `teacher.file`, `dataset`,
            `seed` and `train.batch_size` (the batch size of every evaluation set).
        overwrite: replace finished outputs.
        strategy: the run's `tf.distribute` strategy (`faqd_tf.distribute.get_strategy`).
        callbacks: Keras callbacks added to every training stage's `fit` (after the stop on a
            non-finite loss, before the history and the backup).
    """

    def __init__(
        self,
        config: dict,
        overwrite: bool,
        strategy: tf.distribute.Strategy,
        callbacks: Sequence = (),
    ):
        self.overwrite = overwrite
        self.strategy = strategy
        self.chief = distribute.is_chief(strategy)
        self.dataset_config = config["dataset"]
        self.seed = config["seed"]
        self.eval_batch_size = config["train"]["batch_size"]
        self.extra_callbacks = list(callbacks)
        # The chief writes output_dir; other workers write their own copies under it (see
        # faqd_tf.distribute.output_dir) and read the teacher and the plan from the chief's.
        self.base = config["output_dir"]
        self.out = distribute.output_dir(self.base, strategy)
        self.teacher_file_given = config["teacher"]["file"] is not None
        self.teacher_path = config["teacher"]["file"] or os.path.join(self.base, "teacher.keras")
        self.student_path = os.path.join(self.out, "student.keras")
        self.act_path = os.path.join(self.out, "student_act.keras")
        self.results_path = os.path.join(self.base, "results.json")
        self.info = None

    # --- paths and what is there

    def backup(self, stage: str) -> str:
        """The `stage`'s backup folder: the chief's, shared by all workers."""
        return os.path.join(self.base, "backup", stage)

    def interrupted(self, stage: str) -> bool:
        # An interrupted stage leaves its BackupAndRestore folder.
        return os.path.isdir(self.backup(stage))

    def pending(self, path: str, stage: str) -> bool:
        return not os.path.exists(path) or self.interrupted(stage)

    def check_free(self, path: str, what: str, stage: str) -> None:
        if os.path.exists(path) and not self.overwrite and not self.interrupted(stage):
            raise UsageError(f"the {what} output {path} exists; pass --overwrite to replace it.")

    # --- data

    def read_info(self) -> data.DatasetInfo:
        """The dataset's info (`faqd_tf.data.dataset_info`); a dataset without classes is refused."""
        d = self.dataset_config
        self.info = data.dataset_info(d["source"], d["data_dir"], image_size=d["image_size"])
        if not self.info.num_classes:
            raise UsageError(
                f"dataset {inputs.shorten(d['source'], inputs.PATH_CHARS)} has no classes (unlabeled); "
                "the teacher's training and evaluation need labeled data: use a labeled source "
                "(labels are ignored while distilling)."
            )
        return self.info

    def dataset(self, spec: Data, index: bool = False) -> tf.data.Dataset:
        d = self.dataset_config
        return data.load(
            d["source"],
            spec.split,
            labels=spec.labels,
            batch_size=spec.batch_size or self.eval_batch_size,
            shuffle=spec.training,
            augment=d["augment"] if spec.training else False,
            image_size=d["image_size"],
            limit=d["limit"] if spec.training else d["eval_limit"],
            seed=self.seed,
            data_dir=d["data_dir"],
            index=index,
        )

    def validation(self) -> list[Data]:
        """The validation set of the training stages (`dataset.validation_split`), if any."""
        split = self.dataset_config["validation_split"]
        return [] if split is None else [Data(split, True)]

    def training_sets(
        self, train: Data, index: bool = False
    ) -> tuple[tf.data.Dataset, tf.data.Dataset | None]:
        """The pipelines of a training stage: `train` (its examples numbered with `index`, see
        `faqd_tf.data.load`), and the validation set or None."""
        validation = self.validation()
        return self.dataset(train, index), self.dataset(validation[0]) if validation else None

    def augmentation(self):
        """The training set's augmentation policy, None for none (`dataset.augment`)."""
        augment = self.dataset_config["augment"]
        if augment is False:
            return None
        if augment in (None, True):
            return (self.info or self.read_info()).augmentation
        return augment

    def recalibration_images(self, count: int) -> np.ndarray:
        """The first `count` training images (of `dataset.limit`'s subset when set) for
        `student.recalibrate_bn`: as the model sees images at test time (no augmentation), in the
        file order (class-mixed), so every run and every worker takes the same ones."""
        d = self.dataset_config
        images = data.load(
            d["source"],
            "train",
            labels=False,
            batch_size=self.eval_batch_size,
            shuffle=False,
            augment=False,
            image_size=d["image_size"],
            limit=min(count, d["limit"] or count),
            data_dir=d["data_dir"],
            cache=False,
        )
        return np.concatenate(list(images.as_numpy_iterator()))

    # --- models

    def load_model(self, path: str, key: str) -> keras.Model:
        """The Keras model in `path`, checked against the data (`key` names it in messages). The
        package's layers are registered: this module imports `faqd_tf.models` and `faqd_tf.quantize`."""
        if not os.path.isfile(path):
            raise UsageError(f"{key} {path} does not exist; point it at a .keras model file.")
        try:
            model = keras.models.load_model(path, safe_mode=True)
        except (ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as e:
            missing = _unregistered(path) if isinstance(e, TypeError) else []
            if missing:
                (name, module), more = (
                    missing[0],
                    f" (and {len(missing) - 1} more)" if len(missing) > 1 else "",
                )
                module = inputs.shorten(module)
                raise UsageError(
                    f"{key} {path} needs the class {name}{more} (module {module}), which is not "
                    f"registered; load it from Python after `import {module}` (the command line knows "
                    "Keras's and faqd-tf's classes only)."
                ) from None
            raise UsageError(
                f"{key} {path} is not a loadable Keras model ({inputs.first_line(e, 200)}); give a .keras "
                "file saved by Keras 3."
            ) from None
        if not isinstance(model, keras.Model):
            raise UsageError(f"{key} {path} holds a {type(model).__name__}, not a Keras model.")
        self.check_fits(model, key, path)
        return model

    def load_teacher(self) -> keras.Model:
        if not os.path.exists(self.teacher_path):
            raise UsageError(
                f"teacher file {self.teacher_path} does not exist; run --stage teacher first or set teacher.file."
            )
        return self.load_model(self.teacher_path, "teacher.file")

    def check_fits(self, model: keras.Model, key: str, path: str) -> None:
        """The model takes the data's images and has one logit per class."""
        source = inputs.shorten(self.dataset_config["source"], inputs.PATH_CHARS)
        image_shape, classes = self.info.image_shape, self.info.num_classes
        shapes = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]
        shape = tuple(shapes[0][1:]) if len(shapes) == 1 and shapes[0] is not None else None
        if (
            shape is None
            or len(shape) != 3
            or any(s is not None and s != e for s, e in zip(shape, image_shape))
        ):
            raise UsageError(
                f"{key} {path} takes inputs of shape {shape if shape is not None else shapes}, but {source} yields "
                f"images of {image_shape}; use a model for this data (or set dataset.image_size)."
            )
        outputs = model.output_shape
        if not isinstance(outputs, tuple) or outputs[-1] != classes:
            raise UsageError(
                f"{key} {path} has {outputs[-1] if isinstance(outputs, tuple) else outputs} outputs, but {source} has "
                f"{classes} classes; use a model trained on this dataset's classes."
            )

    @staticmethod
    def check_arch(arch: str | None, key: str) -> None:
        if arch not in models.available():
            raise UsageError(
                f"{key}={inputs.shorten(repr(arch))} is not a known architecture; "
                f"use one of {', '.join(models.available())}."
            )

    # --- training

    @staticmethod
    def steps(dataset: tf.data.Dataset, train: dict) -> int:
        if train["steps_per_epoch"]:
            return train["steps_per_epoch"]
        n = int(dataset.cardinality())
        if n > 0:
            return n
        return int(dataset.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))

    def callbacks(
        self,
        stage: str,
        history_csv: str,
        extra: Sequence = (),
        at_start: Sequence = (),
        train_ds: tf.data.Dataset | None = None,
    ) -> list[keras.callbacks.Callback]:
        """A training stage's callbacks; `extra` act at epoch ends (before the backup), `at_start`
        when training starts (after the backup restored the weights). With `train_ds` (a pipeline
        that `fit` passes once an epoch), a resumed run sees it in the uninterrupted run's order."""
        # Every worker resumes from the chief's backup, so all restart at the same epoch. The stage
        # removes it only once its model is saved.
        backup = SharedBackupAndRestore(
            self.backup(stage), writer=self.chief, delete_checkpoint=False
        )
        return [
            # Stops before any epoch-end callback, so no backup holds diverged weights.
            StopOnNonFiniteLoss(self.backup(stage)),
            # Before the backup and the history, so that both hold what they change (relax lambda).
            *extra,
            *self.extra_callbacks,
            # Before the backup: a kill between the two leaves a row that the resumed run replaces.
            ResumableCSVLogger(os.path.join(self.out, history_csv)),
            backup,
            *([ResumeDataOrder(train_ds, backup)] if train_ds is not None else []),
            *at_start,
            keras.callbacks.TensorBoard(os.path.join(self.out, "logs", stage), write_graph=False),
        ]

    def train(
        self,
        model: keras.Model,
        stage: str,
        train_ds: tf.data.Dataset,
        val_ds: tf.data.Dataset | None,
        train: dict,
        history_csv: str,
        save: Callable[[], None],
        extra: Sequence = (),
        at_start: Sequence = (),
    ) -> None:
        """`fit`, then `save()` (the stage's model, saved atomically), then the backup removed.

        In this order a kill at any moment resumes with nothing lost: before the save the backup is
        there (a run restored at its last epoch trains no more and saves), after it the model is.
        """
        if not self.interrupted(stage):
            # A fresh start (--overwrite): the curves of an earlier run go with it, and so do the
            # backups of the stages after it, which started from this stage's old model.
            shutil.rmtree(os.path.join(self.out, "logs", stage), ignore_errors=True)
            if self.chief:
                for later in TRAINED[TRAINED.index(stage) + 1 :]:
                    shutil.rmtree(self.backup(later), ignore_errors=True)
        # One pass a epoch, unless steps_per_epoch sets epochs apart from passes (then a resumed run
        # starts a fresh pass).
        passes = train_ds if not train["steps_per_epoch"] else None
        model.fit(
            train_ds.repeat() if train["steps_per_epoch"] else train_ds,
            epochs=train["epochs"],
            steps_per_epoch=train["steps_per_epoch"],
            validation_data=val_ds,
            callbacks=self.callbacks(stage, history_csv, extra, at_start, passes),
            verbose=training.progress_verbosity(),
            shuffle=False,
        )
        save()
        # Every worker has saved its copy before the chief removes the shared backup.
        distribute.barrier(self.strategy)
        if self.chief:
            shutil.rmtree(self.backup(stage), ignore_errors=True)


def _unregistered(path: str) -> list[tuple[str, str]]:
    try:
        return registration.unregistered_classes(path)
    except ValueError:
        return []


class Stage:
    """One stage of a run. Subclasses set `name` and `sections` and override what they do."""

    name: str = ""
    sections: tuple[str, ...] = ()

    def __init__(self, workspace: Workspace):
        self.ws = workspace

    @classmethod
    def of(cls, workspace: Workspace, config: dict, **options) -> "Stage":
        """The stage of a resolved `config`: it receives the sections it names, and `options`."""
        return cls(workspace, **{section: config[section] for section in cls.sections}, **options)

    def needed(self) -> bool:
        """Whether `all` runs it: its output is missing or was interrupted (or --overwrite)."""
        return True

    def datasets(self) -> list[Data]:
        return []

    def check_source(self):
        """Checks of what the dataset is (`ws.info`), before any pipeline is built."""

    def check(self, checked: Checked):
        """Every check short of training; raises a one-line `UsageError`, writes nothing."""

    def run(self):
        raise NotImplementedError


def _check_recalibration(
    ws: Workspace, student_config: dict, dataset: dict, student: keras.Model
) -> None:
    """`student.recalibrate_bn` can work on `student`: it has BatchNormalization layers, and the
    images fit in memory (`recalibrate_batchnorm` holds them all)."""
    count = student_config["recalibrate_bn"]
    if not count:
        return
    if not any(
        isinstance(layer, keras.layers.BatchNormalization) for _, layer, _ in iter_layers(student)
    ):
        raise UsageError(
            f"student.recalibrate_bn: the student {student.name!r} has no BatchNormalization "
            "layer to recalibrate; set student.recalibrate_bn to null."
        )
    per_image = 4 * int(np.prod(ws.info.image_shape))
    fits = RECALIBRATION_BYTES // per_image
    if min(count, dataset["limit"] or count) > fits:
        raise UsageError(
            f"student.recalibrate_bn={count} would hold {count * per_image / 2**30:.1f} GiB of "
            f"{'x'.join(map(str, ws.info.image_shape))} images in memory; use at most {fits}."
        )


def _has_quantized_kernel(model):
    return any(quantized_kernel_bits(layer) is not None for _, layer, _ in iter_layers(model))


class TeacherStage(Stage):
    """Trains the full-precision teacher with labels (`teacher.arch`, `teacher.train`) and saves it."""

    name = TEACHER
    sections = ("teacher", "dataset")

    def __init__(self, workspace: Workspace, teacher: dict, dataset: dict):
        super().__init__(workspace)
        self.teacher, self.dataset = teacher, dataset

    def needed(self):
        given = self.ws.teacher_file_given and os.path.exists(self.ws.teacher_path)
        return not given and (self.ws.overwrite or self.ws.pending(self.ws.teacher_path, TEACHER))

    def datasets(self):
        return [Data("train", True, self.teacher["train"]["batch_size"]), *self.ws.validation()]

    def check_source(self):
        self._check_classes()

    def _check_classes(self):
        """The teacher learns to tell classes apart: with one, it trains to loss 0 and learns nothing."""
        info = self.ws.info
        classes = info.train_classes if info.train_classes is not None else info.num_classes
        if classes < 2:
            raise UsageError(
                f"dataset {inputs.shorten(self.dataset['source'], inputs.PATH_CHARS)} has one class "
                "in its train labels; a teacher needs two or more to learn anything (with one it "
                "trains to loss 0): use a dataset of several classes, or give a trained teacher in "
                "teacher.file."
            )

    def check(self, checked):
        if self.teacher["arch"] is None:
            raise UsageError("stage 'teacher' needs teacher.arch, the architecture to train.")
        self.ws.check_arch(self.teacher["arch"], "teacher.arch")
        self.ws.check_free(self.ws.teacher_path, "teacher", TEACHER)
        if self.teacher["file"]:
            inputs.check_output_dir(
                os.path.dirname(os.path.abspath(self.ws.teacher_path)), "teacher.file's folder"
            )
        if DISTILL in checked.planned:  # the architecture stands in for the teacher still to train
            checked.teacher = self.build()

    def build(self):
        return models.get(
            self.teacher["arch"],
            num_classes=self.ws.info.num_classes,
            input_shape=self.ws.info.image_shape,
        )

    def run(self):
        cfg, ws = self.teacher, self.ws
        train_ds, val_ds = ws.training_sets(self.datasets()[0])
        steps = ws.steps(train_ds, cfg["train"])
        say(
            f"stage teacher: training a full-precision {cfg['arch']} for {cfg['train']['epochs']} epochs "
            f"({steps} steps each) on {self.dataset['source']}"
        )
        with ws.strategy.scope():
            model = training.compile_classifier(
                self.build(), training.make_optimizer(cfg["train"], steps)
            )

        def save():
            if ws.chief:  # the other workers read the chief's teacher
                os.makedirs(os.path.dirname(ws.teacher_path) or ".", exist_ok=True)
                training.save_model(model, ws.teacher_path)
                say(f"teacher saved to {ws.teacher_path}")

        ws.train(model, TEACHER, train_ds, val_ds, cfg["train"], HISTORIES[TEACHER], save)


class StudentStage(Stage):
    """A stage that builds the config's student (distill, tune), the one way it is built: from
    `student.init` (the teacher's copy, the FP model of `student.file`, or a fresh `student.arch`),
    quantized as the `student` section says."""

    def __init__(self, workspace: Workspace, student: dict, teacher: dict):
        super().__init__(workspace)
        self.student = student
        self.student_arch = (
            student["arch"] or teacher["arch"]
        )  # a fresh student: the teacher's by default
        # `student.size_budget_kb`'s choice replaces this once `choose_widths` has run.
        self.layer_bits = student["layer_bits"]

    @property
    def budget_bytes(self) -> float | None:
        kb = self.student["size_budget_kb"]
        return None if kb is None else kb * 1024

    @property
    def widths_path(self) -> str:
        return os.path.join(self.ws.out, "layer_bits.json")

    def _budget_layers(self, model: keras.Model) -> list[str]:
        """The layers a size budget gives widths to: those `quantize_model` quantizes by default
        (`faqd_tf.sensitivity`'s), the classifier left float."""
        widths = quantize.resolve_layer_bits(model, 8, None, None, first_layer_bits=8)
        return [name for name, bits in widths.items() if bits is not None]

    def _uniform_bytes(self, base: keras.Model, layers: list[str], bits: int) -> float:
        """The packed size of `base` with every layer of `layers` at `bits` and the student's
        activations: what a size budget is compared with."""
        s = self.student
        twin = quantize_model(
            base,
            weight_bits=None,
            activation_bits=s["activation_bits"],
            per_channel=s["per_channel"],
            layer_bits={name: bits for name in layers},
        )
        return summary(twin, print_fn=None).packed_bytes

    def _measured_model(self, base: keras.Model | None, teacher: keras.Model) -> keras.Model:
        """The FP model whose layers' sensitivity stands for the student's: the one quantized,
        or for a fresh student (random weights) the teacher, whose layers it must share."""
        if base is not None:
            return base
        fresh = self._budget_layers(self.build_student(None, None))
        theirs = self._budget_layers(teacher)
        if fresh != theirs:
            raise UsageError(
                f"student: size_budget_kb measures each layer's sensitivity on the trained teacher, "
                f"but the fresh {self.student_arch} has other layers ({inputs.shorten(', '.join(fresh))}) "
                f"than the teacher; use student.init 'teacher' or 'file', or give student.layer_bits."
            )
        return teacher

    def check_budget(self, base: keras.Model | None, teacher: keras.Model) -> None:
        """A size budget below every layer at 1 bit is a `UsageError` naming the smallest size."""
        if self.budget_bytes is None:
            return
        model = self._measured_model(base, teacher)
        smallest = self._uniform_bytes(model, self._budget_layers(model), 1)
        if smallest > self.budget_bytes:
            need = math.ceil(smallest / 1024 * 100) / 100  # rounded up: a budget of `need` fits
            raise UsageError(
                f"student.size_budget_kb={self.student['size_budget_kb']:g} is below the smallest "
                f"packed size of this student, {need:g} kB (every quantized layer at 1 bit, the "
                f"classifier float); set it to at least {need:g}."
            )

    def choose_widths(self, base: keras.Model | None, teacher: keras.Model) -> None:
        """With `student.size_budget_kb`: measures each layer's label-free sensitivity
        (`faqd_tf.sensitivity` on `student.sensitivity_samples` training images), picks the widths
        under the budget (`faqd_tf.allocate_bits`) and writes them (layer_bits.json, with
        sensitivity.csv and .png beside it). A resumed run reuses the choice it trains with."""
        budget = self.budget_bytes
        if budget is None:
            return
        s, ws = self.student, self.ws
        model = self._measured_model(base, teacher)
        saved = None if ws.overwrite else self._saved_widths(model)
        if saved is not None:
            self.layer_bits = saved
            say(f"student widths: reusing {self.widths_path}")
            return
        from faqd_tf.sensitivity import allocate_bits, sensitivity

        images = ws.recalibration_images(s["sensitivity_samples"])
        result = sensitivity(model, images, samples=None, per_channel=s["per_channel"])
        layers = result.layers
        # What the allocation does not see (the quantized ReLUs' alphas) comes off the budget.
        extra = self._uniform_bytes(model, layers, 1) - result.packed_bytes({n: 1 for n in layers})
        chosen = allocate_bits(result, budget - extra)
        packed = result.packed_bytes(chosen) + extra
        counts = {b: sum(1 for v in chosen.values() if v == b) for b in result.bits}
        parts = [f"{n} at {b} bit{'s' * (b != 1)}" for b, n in counts.items() if n]
        say(
            f"student widths: layers {', '.join(parts)} for "
            f"{packed / 1024:.2f} kB packed (budget {s['size_budget_kb']:g} kB), from the sensitivity "
            f"of {len(layers)} layers on {result.samples} unlabeled images in {result.seconds:.1f} s"
        )
        if ws.chief:
            os.makedirs(ws.out, exist_ok=True)
            result.to_csv(os.path.join(ws.out, "sensitivity.csv"))
            result.plot(os.path.join(ws.out, "sensitivity.png"))
            write_json(
                self.widths_path,
                {
                    "size_budget_kb": s["size_budget_kb"],
                    "packed_kb": packed / 1024,
                    "predicted_kd_increase": result.predicted_kd_increase(chosen),
                    "sensitivity_seconds": result.seconds,
                    "layer_bits": chosen,
                },
            )
        self.layer_bits = chosen

    def _saved_widths(self, model: keras.Model) -> dict | None:
        """The widths an earlier run of this budget chose (layer_bits.json), or None when there is
        no such file or it does not fit: another budget, other layers, a width that is not one."""
        try:
            with open(self.widths_path) as f:
                saved = json.load(f)
            widths = saved["layer_bits"]
            fits = (
                saved["size_budget_kb"] == self.student["size_budget_kb"]
                and isinstance(widths, dict)
                and sorted(widths) == sorted(self._budget_layers(model))
                and all(type(b) is int and b in SUPPORTED_BITS for b in widths.values())
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return widths if fits else None

    def student_base(self, teacher: keras.Model) -> keras.Model | None:
        """The FP model `student.init` quantizes: the teacher, `student.file`'s, or None (a fresh one)."""
        init = self.student["init"]
        if init == "scratch":
            return None
        return (
            teacher
            if init == "teacher"
            else self.ws.load_model(self.student["file"], "student.file")
        )

    def build_student(self, base: keras.Model | None, weight_bits: int | None) -> keras.Model:
        """The student with `weight_bits`-bit weights (None: FP, the first of two steps): `base`
        quantized (`student_base`, or a first step's trained student), or with `base` None a fresh
        `student.arch`."""
        s = self.student
        layer_bits = self.layer_bits if weight_bits else None
        if base is None:
            base = models.get(
                self.student_arch,
                num_classes=self.ws.info.num_classes,
                input_shape=self.ws.info.image_shape,
                weight_bits=None if layer_bits else weight_bits,
                activation_bits=s["activation_bits"],
                per_channel=s["per_channel"] and weight_bits is not None,
                alpha_rate=s["alpha_rate"],
                activation_ste=s["activation_ste"],
            )
            if not layer_bits:
                return base
            # else its fresh weights, quantized layer by layer below
        return quantize_model(
            base,
            weight_bits=weight_bits,
            activation_bits=s["activation_bits"],
            per_channel=s["per_channel"] and weight_bits is not None,
            relax=s["relax"] if weight_bits else None,
            alpha_rate=s["alpha_rate"],
            layer_bits=layer_bits,
            activation_ste=s["activation_ste"],
        )

    def check_student(self, teacher: keras.Model, weight_bits: int | None) -> keras.Model:
        """The stage's first student, built once untrained; a bad `student` section is a `UsageError`."""
        if self.student["init"] == "scratch":
            self.ws.check_arch(self.student_arch, "student.arch")
        try:
            base = self.student_base(teacher)
            self.check_budget(base, teacher)
            return self.build_student(base, weight_bits)
        except UsageError:
            raise
        except ValueError as err:
            raise UsageError(f"student: {inputs.first_line(err)}") from None

    def describe_widths(self) -> str:
        """The weights' widths as the log lines say them, e.g. ``2-bit weights``."""
        kb = self.student["size_budget_kb"]
        if kb is not None:
            return f"weights of 1-8 bits a layer under {kb:g} kB"
        return f"{self.student['weight_bits']}-bit weights"

    def relax_schedule(self) -> list[keras.callbacks.Callback]:
        """BinaryRelax's growing lambda (`student.relax_eta`), when `student.relax` sets one."""
        return [BinaryRelaxScheduler(self.student["relax_eta"])] if self.student["relax"] else []


class DistillStage(StudentStage):
    """Distills the student from the teacher (`distill`, `student`, `train`), in two steps for full
    quantization (`student.two_step`: activations first, then weights too, as the authors do)."""

    name = DISTILL
    sections = ("distill", "student", "train", "dataset", "teacher")

    def __init__(
        self,
        workspace: Workspace,
        distill: dict,
        student: dict,
        train: dict,
        dataset: dict,
        teacher: dict,
    ):
        super().__init__(workspace, student, teacher)
        self.train, self.dataset = train, dataset
        self.distill = DistillOptions(**distill)

    def needed(self):
        return self.ws.overwrite or self.ws.pending(self.ws.student_path, DISTILL)

    @property
    def two_step(self) -> bool:
        s = self.student
        return s["weight_bits"] is not None and s["activation_bits"] is not None and s["two_step"]

    @property
    def first_bits(self) -> int | None:
        """The weight bits of the first student: none (FP weights) in the first of two steps."""
        return None if self.two_step else self.student["weight_bits"]

    def datasets(self):
        return [
            Data("train", self.dataset["labels"], self.train["batch_size"]),
            *self.ws.validation(),
        ]

    def check(self, checked):
        self.ws.check_free(self.ws.student_path, "student", DISTILL)
        if self.student["freeze_alpha_in_step2"] and not self.two_step:
            raise UsageError(
                "student.freeze_alpha_in_step2 acts in the second of two steps only; set "
                "student.weight_bits, student.activation_bits and student.two_step=true, or drop it."
            )
        obstacles = self.train["teacher_cache"] is True and self.teacher_cache_obstacles(
            checked.teacher
        )
        if obstacles:
            raise UsageError(
                f"train.teacher_cache=true cannot keep the teacher's logits: "
                f'{"; ".join(obstacles)}; set it to "auto" or false.'
            )
        student = self.check_student(checked.teacher, self.first_bits)
        try:  # the FA layer pairs
            Distiller(student, checked.teacher, self.distill, seed=self.ws.seed)
        except ValueError as err:
            raise UsageError(f"distill: {inputs.first_line(err)}") from None
        _check_recalibration(self.ws, self.student, self.dataset, student)
        # Two steps: the weights are quantized in the second.
        checked.quantized = self.two_step or _has_quantized_kernel(student)
        checked.student = student

    def describe_loss(self) -> str:
        """The loss as the log line shows it, e.g. ``1.0*KD(kl) + 30.0*FA(exact, fro2)``."""
        return " + ".join(str(term) for term in terms.from_options(self.distill))

    def teacher_cache_obstacles(self, teacher: keras.Model) -> list[str]:
        """Why the teacher's logits cannot be kept across epochs here ([] when they can)."""
        found = teacher_cache_obstacles(
            self.distill.fa,
            teacher,
            key="distill.fa",
            replicas=self.ws.strategy.num_replicas_in_sync,
        )
        if self.ws.augmentation() is not None:
            found.append("dataset.augment gives new images every epoch")
        return found

    def use_teacher_cache(self, teacher: keras.Model) -> bool:
        setting = self.train["teacher_cache"]
        if setting is False or self.teacher_cache_obstacles(teacher):
            return False
        # One pass computes every logit once anyway.
        return setting is True or self.train["epochs"] > 1 or bool(self.train["steps_per_epoch"])

    def examples_bound(self, train_ds: tf.data.Dataset) -> int:
        """At least the number of training examples: a pass's batches times the batch size."""
        return self.ws.steps(train_ds, {"steps_per_epoch": None}) * self.train["batch_size"]

    def _distill(self, teacher, student, stage, train_ds, val_ds, steps, path, cache=False):
        """One distillation of `student` from `teacher`, saved to `path`; returns the trained
        student. With `cache` (`train_ds` numbered, see `use_teacher_cache`) the teacher's logits
        are computed in the first epoch only."""
        ws = self.ws
        # In the scope: the optimizer's slots and the metrics must be the strategy's variables.
        with ws.strategy.scope():
            distiller = Distiller(
                student,
                teacher,
                self.distill,
                seed=ws.seed,
                # Every number is below a pass's batches times the batch size.
                teacher_cache=self.examples_bound(train_ds) if cache else None,
            )
            optimizer = training.make_optimizer(self.train, steps)
            # The quantized ReLUs' alphas decay as in the authors' code (their own, much smaller, decay).
            set_alpha_decay(student, optimizer, self.train["weight_decay"])
            distiller.compile(
                optimizer, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
            )
        # A user must see when a weighted term is too weak to act (e.g. an FA weight on the wrong scale).
        shares = GradientShares(train_ds.take(1), print_fn=say)
        ws.train(
            distiller,
            stage,
            train_ds,
            val_ds,
            self.train,
            HISTORIES[stage],
            lambda: self._save(distiller.student, stage, path),
            [*self.relax_schedule(), AlphaStats()],
            [shares],
        )
        return distiller.student

    def _save(self, student, stage, path):
        """Saves the trained `student`; the final one with its BatchNormalization statistics
        re-estimated first when `student.recalibrate_bn` asks. Part of the stage's save: a kill
        before the file is written resumes at the last epoch and recalibrates again (the same
        images in the same order, so the same statistics)."""
        count = self.student["recalibrate_bn"]
        if count and stage == DISTILL:
            start = time.perf_counter()
            images = self.ws.recalibration_images(count)
            names = recalibrate_batchnorm(student, images)
            say(
                f"stage distill: re-estimated the statistics of {len(names)} BatchNormalization layers on "
                f"{len(images)} unlabeled training images in {time.perf_counter() - start:.1f} s"
            )
        training.save_model(student, path)

    def run(self):
        ws, s = self.ws, self.student
        with ws.strategy.scope():
            teacher = ws.load_model(ws.teacher_path, "teacher.file")
        cache = self.use_teacher_cache(teacher)
        train_ds, val_ds = ws.training_sets(self.datasets()[0], index=cache)
        steps = ws.steps(train_ds, self.train)
        if cache:
            say(
                "stage distill: the teacher's logits are computed in the first epoch and kept (train.teacher_cache)"
            )
        with ws.strategy.scope():
            base = self.student_base(teacher)
            self.choose_widths(base, teacher)
            student = self.build_student(base, self.first_bits)
        loss = self.describe_loss()
        mode = "label-free" if not self.dataset["labels"] else "with labels"
        if self.two_step:
            # Step 1 is done when its student is saved and not being redone: without --overwrite, or
            # when --overwrite's own run was interrupted in step 2.
            done = (
                os.path.exists(ws.act_path)
                and not ws.interrupted(ACTIVATION_STEP)
                and (not ws.overwrite or ws.interrupted(DISTILL))
            )
            if done:
                say(f"stage distill (1/2): reusing the activation-quantized student {ws.act_path}")
                with ws.strategy.scope():
                    student = ws.load_model(ws.act_path, "student_act")
            else:
                say(
                    f"stage distill (1/2): {s['activation_bits']}-bit activations, FP weights; loss {loss}, {mode}"
                )
                student = self._distill(
                    teacher, student, ACTIVATION_STEP, train_ds, val_ds, steps, ws.act_path, cache
                )
            with ws.strategy.scope():
                student = self.build_student(student, s["weight_bits"])
            frozen = ""
            if s["freeze_alpha_in_step2"]:
                for layer in quantized_relus(student):
                    layer.alpha.trainable = False
                frozen = ", alphas kept from step 1"
            say(
                f"stage distill (2/2): {self.describe_widths()} and {s['activation_bits']}-bit activations{frozen}"
            )
        else:
            bits = self.describe_widths() if s["weight_bits"] else "FP weights"
            if s["activation_bits"]:
                bits += f", {s['activation_bits']}-bit activations"
            say(
                f"stage distill: {bits}, init {s['init']}; loss {loss}, {mode}; {self.train['epochs']} "
                f"epochs of {steps} steps"
            )
        self._distill(teacher, student, DISTILL, train_ds, val_ds, steps, ws.student_path, cache)
        say(f"student saved to {ws.student_path}")


class Exports:
    """The `--export` kinds (`faqd_tf.names.EXPORTS`) the evaluate stage writes next to the student
    it scored; its results list the files."""

    def __init__(self, workspace: Workspace, kinds: Sequence[str] = ()):
        self.ws = workspace
        self.kinds = list(dict.fromkeys(kinds))

    def datasets(self) -> list[Data]:
        if any(EXPORTS[kind].needs_calibration for kind in self.kinds if kind in EXPORTS):
            return [Data("train", False)]  # unlabeled calibration images (see `faqd_tf.export`)
        return []

    def check(self, quantized: bool, student: keras.Model | None) -> None:
        """Each export kind can be written once the evaluation is done: its file name is not taken
        by a folder, the student has the quantized kernels the kind stores (`quantized`), and the
        format can convert each of its layers."""
        for kind in self.kinds:
            if kind not in EXPORTS:
                raise UsageError(
                    f"--export {inputs.shorten(kind)} is not an export; use one of {', '.join(EXPORTS)}."
                )
            path = os.path.join(self.ws.out, EXPORTS[kind].file)
            if os.path.isdir(path):
                raise UsageError(
                    f"--export {kind} writes the file {path}, which is a folder; move it away or "
                    "choose another output_dir."
                )
            if EXPORTS[kind].needs_quantized and not quantized:
                others = ", ".join(k for k, e in EXPORTS.items() if not e.needs_quantized)
                raise UsageError(
                    f"--export {kind} stores a quantized student's integer codes, but the student has no "
                    f"quantized kernel; set student.weight_bits, or export {others}."
                )
            if student is not None:
                try:
                    EXPORTS[kind].check_model(student)
                except ValueError as err:
                    raise UsageError(f"--export {kind}: {inputs.first_line(err)}") from None

    def write(self, student: keras.Model) -> dict:
        """Writes every kind of `student`; returns ``{kind: {"file": path, "bytes": size}}``."""
        written = {}
        for kind in self.kinds:
            path = os.path.join(self.ws.out, EXPORTS[kind].file)
            # Full-integer TFLite calibrates its activation ranges on unlabeled training images.
            calibration = (
                self.ws.dataset(Data("train", False)) if EXPORTS[kind].needs_calibration else None
            )
            EXPORTS[kind].write_model(student, path, calibration=calibration)
            say(f"exported {kind}: {path} ({os.path.getsize(path):,} bytes)")
            written[kind] = {"file": path, "bytes": os.path.getsize(path)}
        return written


class EvaluateStage(Stage):
    """Scores the teacher and the student on the test split, writes the `exports` of the student,
    `results.json`, the table and the curves."""

    name = EVALUATE
    sections = ("dataset",)

    def __init__(self, workspace: Workspace, dataset: dict, exports: Sequence[str] = ()):
        super().__init__(workspace)
        self.dataset = dataset
        self.exports = Exports(workspace, exports)

    def needed(self):
        return self.ws.overwrite or not os.path.exists(self.ws.results_path)

    def datasets(self):
        return [Data("test", True), *self.exports.datasets()]

    def check(self, checked):
        if DISTILL not in checked.planned:
            ws = self.ws
            if not os.path.exists(ws.student_path):
                raise UsageError(
                    f"student file {ws.student_path} does not exist; run --stage distill first."
                )
            checked.student = ws.load_model(ws.student_path, "student file")
            checked.quantized = _has_quantized_kernel(checked.student)
            ws.check_free(ws.results_path, "results", EVALUATE)
        self.exports.check(checked.quantized, checked.student)

    def run(self):
        ws = self.ws
        if not ws.chief:
            say("stage evaluate: left to the chief (worker 0), which writes results.json")
            return None
        test_ds = ws.dataset(self.datasets()[0])
        results = {"dataset": self.dataset["source"], "split": "test"}
        say(f"stage evaluate: teacher and student on the {self.dataset['source']} test split")
        for role, path in (("teacher", ws.teacher_path), ("student", ws.student_path)):
            model = ws.load_model(path, f"{role} file")
            logs = training.evaluate_classifier(
                model, test_ds, verbose=training.progress_verbosity()
            )
            info = summary(model, print_fn=None)
            results[role] = {
                "file": path,
                "accuracy": float(logs["accuracy"]),
                "loss": float(logs["loss"]),
                "parameters": int(info.total_params),
                "float32_bits": int(info.float32_bits),
                "packed_bits": int(info.packed_bits),
            }
            if role == "student":
                summary(model)
                student = model
        results["student"]["compression"] = (
            results["teacher"]["float32_bits"] / results["student"]["packed_bits"]
        )
        results["accuracy_gap"] = results["teacher"]["accuracy"] - results["student"]["accuracy"]
        if self.exports.kinds:
            results["exports"] = self.exports.write(student)
        plot = plot_curves(ws.out)
        print_table(results)
        write_json(ws.results_path, results)
        say(f"results written to {ws.results_path}" + (f"; curves in {plot}" if plot else ""))
        return results


class TuneStage(StudentStage):
    """keras-tuner search over the loss weights (`tune`); writes `best_config.json` (the config with
    the best trial's `distill` values). Each trial distills a fresh student, built as the distill
    stage builds it (`student.init`, `relax`), in one step."""

    name = TUNE
    sections = ("tune", "distill", "student", "train", "dataset", "teacher")

    def __init__(
        self,
        workspace: Workspace,
        tune: dict,
        distill: dict,
        student: dict,
        train: dict,
        dataset: dict,
        teacher: dict,
        whole: dict | None = None,
        trials: int | None = None,
    ):
        super().__init__(workspace, student, teacher)
        self.tune, self.distill, self.train, self.dataset = tune, distill, train, dataset
        self.whole = whole  # the whole config, written back with the best values
        self.trials = trials or tune["trials"]

    @classmethod
    def of(cls, workspace: Workspace, config: dict, **options) -> "TuneStage":
        return super().of(workspace, config, whole=config, **options)

    def datasets(self):
        return [
            Data("train", self.dataset["labels"], self.train["batch_size"]),
            Data("validation", True),
        ]

    def student_fn(self, teacher: keras.Model) -> Callable[[], keras.Model]:
        """A fresh student for each trial (`student.file` is read once, here)."""
        base = self.student_base(teacher)
        self.choose_widths(base, teacher)
        return lambda: self.build_student(base, self.student["weight_bits"])

    def check(self, checked):
        student = self.check_student(checked.teacher, self.student["weight_bits"])
        _check_recalibration(self.ws, self.student, self.dataset, student)

    def run(self):
        from faqd_tf import tuning

        ws, s, tune = self.ws, self.student, self.tune
        train_ds, val_ds = (ws.dataset(spec) for spec in self.datasets())
        teacher = ws.load_model(ws.teacher_path, "teacher.file")
        steps = ws.steps(train_ds, self.train)
        hypermodel = tuning.FAQDHyperModel.from_config(
            teacher,
            self.distill,
            student_fn=self.student_fn(teacher),
            optimizer_fn=lambda: training.make_optimizer(
                {**self.train, "epochs": tune["epochs"]}, steps
            ),
            label_free=not self.dataset["labels"],
            tune_fa=tune["tune_fa"],
            # A trial scores the student the distill stage would save.
            recalibrate_images=ws.recalibration_images(s["recalibrate_bn"])
            if s["recalibrate_bn"]
            else None,
        )
        after = " after BN recalibration" if s["recalibrate_bn"] else ""
        say(
            f"tuning: {self.trials} {tune['tuner']} trials of {tune['epochs']} epoch(s), objective val_accuracy{after}"
        )
        best, _ = tuning.search(
            hypermodel,
            train_ds,
            val_ds,
            tuner=tune["tuner"],
            max_trials=self.trials,
            epochs=tune["epochs"],
            directory=os.path.join(ws.out, "tuning"),
            project_name="faqd",
            overwrite=ws.overwrite,
            callbacks=self.relax_schedule(),
        )
        best_config = json.loads(json.dumps(self.whole))
        best_config["distill"].update(tuning.best_distill_config(best))
        path = os.path.join(ws.out, "best_config.json")
        write_json(path, best_config)
        say(f"best loss weights {tuning.best_distill_config(best)}; config written to {path}")


REGISTRY: dict[str, type[Stage]] = {
    stage.name: stage for stage in (TeacherStage, DistillStage, EvaluateStage, TuneStage)
}
"""The stages by name."""
