"""A configured run of the CLI: its plan, the checks made before anything is written, and the stages.

    run = Run(config)                 # paths and the distribution strategy; nothing read yet
    stages = run.plan("all")          # the stages whose outputs are missing or were interrupted
    run.preflight(stages, exports)    # every check that needs no training; nothing written
    run.start(stages, exports)        # locks output_dir, writes config.json, runs the stages

Every stage trains with `keras.callbacks.BackupAndRestore` (`faqd_tf.callbacks.SharedBackupAndRestore`)
and ends in the same order: the model is saved (atomically), then the backup is removed. A kill at
any moment therefore leaves either a backup to resume from or the finished model, never neither.
"""

import fcntl
import json
import os
import shutil
import zipfile

from faqd_tf import inputs
from faqd_tf.report import plot_curves, print_table, write_json
from faqd_tf.training import make_optimizer, save_model

STAGES = ("teacher", "distill", "evaluate", "all")
# The stages that train, in order (the two-step distillation's activation step first).
_TRAINED = ("teacher", "distill_act", "distill")


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


class StageFailed(RuntimeError):
    """A stage that stopped on an error after it began (`error`): one line, exit code 1."""

    def __init__(self, stage, error):
        super().__init__(f"stage {stage} failed: {error}")
        self.stage, self.error = stage, error


def say(message):
    print(f"[faqd] {message}", flush=True)


def _has_quantized_kernel(model):
    from faqd_tf.summary import iter_layers, quantized_kernel_bits

    return any(quantized_kernel_bits(layer) is not None for _, layer, _ in iter_layers(model))


class FolderLock:
    """An exclusive lock on a folder, so that two runs never write one `output_dir`.

    `flock` on the folder's own descriptor: nothing is written for it, and the operating system
    releases it when the process ends, however it ends, so a crashed run leaves no stale lock.
    Filesystems without `flock` (some network mounts) run unlocked.
    """

    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self):
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

    def release(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Run:
    """One configured run: its paths, data and the stages."""

    def __init__(self, config, overwrite=False):
        from faqd_tf import distribute

        self.config = config
        self.overwrite = overwrite
        # First, before any TensorFlow operation: a multi-worker strategy configures collective ops.
        self._strategy = distribute.get_strategy(config["strategy"])
        self.chief = distribute.is_chief(self._strategy)
        # The chief writes output_dir; other workers write their own copies under it (see
        # faqd_tf.distribute.output_dir) and read the teacher and the plan from the chief's.
        self.base = config["output_dir"]
        self.out = distribute.output_dir(self.base, self._strategy)
        self.teacher_path = config["teacher"]["file"] or os.path.join(self.base, "teacher.keras")
        self.student_path = os.path.join(self.out, "student.keras")
        self.act_path = os.path.join(self.out, "student_act.keras")
        self.results_path = os.path.join(self.base, "results.json")
        self.lock = FolderLock(self.out)
        self.info = None

    def backup(self, stage):
        # The chief's, shared by all workers.
        return os.path.join(self.base, "backup", stage)

    # --- checks made before anything is written

    def _pending(self, path, stage):
        # An interrupted stage leaves its BackupAndRestore folder.
        return not os.path.exists(path) or os.path.isdir(self.backup(stage))

    def plan(self, stage):
        """The stages to run: `all` runs those whose outputs are missing or were interrupted."""
        if stage != "all":
            return [stage]
        given = self.config["teacher"]["file"] is not None and os.path.exists(self.teacher_path)
        stages = []
        if not given and (self.overwrite or self._pending(self.teacher_path, "teacher")):
            stages.append("teacher")
        if self.overwrite or stages or self._pending(self.student_path, "distill"):
            stages.append("distill")
        if self.overwrite or stages or not os.path.exists(self.results_path):
            stages.append("evaluate")
        return stages

    def preflight(self, stages, exports=()):
        """Checks every input the `stages` (or ``["tune"]``) and the `exports` (kinds of
        `faqd_tf.export.KINDS`) will use, short of training: the output folder, every split of the
        data they read, the models and their fit to the data, the FA layer names, the export paths
        and that each export can convert the student. Raises one-line errors; writes nothing."""
        from faqd_tf import data, models

        if exports and stages and "evaluate" not in stages:  # no stages: the caller says every output is there
            raise UsageError("--export writes the student at the end of the evaluate stage, which this command does "
                             "not run; run --stage evaluate (or all) with it, or leave --export out.")
        inputs.check_output_dir(self.out)
        d = self.config["dataset"]
        self.info = data.dataset_info(d["source"], d["data_dir"], image_size=d["image_size"])
        if not self.info.num_classes:
            raise UsageError(
                f"dataset {inputs.shorten(d['source'])} has no classes (unlabeled); the teacher's training "
                "and evaluation need labeled data: use a labeled source (labels are ignored while distilling)."
            )
        if "teacher" in stages:
            self._check_classes()
        for split, labels, train in self._datasets(stages, exports):
            self.dataset(split, labels, train)  # builds the pipeline: every split and argument checked
        teacher = quantized = None  # quantized: whether the final student has quantized kernels
        if "teacher" in stages:
            if self.config["teacher"]["arch"] is None:
                raise UsageError("stage 'teacher' needs teacher.arch, the architecture to train.")
            self._check_arch(self.config["teacher"]["arch"], "teacher.arch")
            self._check_free(self.teacher_path, "teacher", "teacher")
            if self.config["teacher"]["file"]:
                inputs.check_output_dir(os.path.dirname(os.path.abspath(self.teacher_path)), "teacher.file's folder")
            if "distill" in stages:  # the architecture stands in for the teacher still to train
                teacher = models.get(self.config["teacher"]["arch"], num_classes=self.info.num_classes,
                                     input_shape=self.info.image_shape)
        elif not os.path.exists(self.teacher_path):
            raise UsageError(
                f"teacher file {self.teacher_path} does not exist; run --stage teacher first or set teacher.file."
            )
        else:
            teacher = self._load_model(self.teacher_path, "teacher.file")
        if "distill" in stages:
            self._check_free(self.student_path, "student", "distill")
            s = self.config["student"]
            if s["init"] == "scratch":
                self._check_arch(s["arch"] or self.config["teacher"]["arch"], "student.arch")
            student, two_step = self._check_distiller(teacher)
            quantized = two_step or _has_quantized_kernel(student)  # two steps: weights quantized in the second
        if "evaluate" in stages and "distill" not in stages:
            if not os.path.exists(self.student_path):
                raise UsageError(f"student file {self.student_path} does not exist; run --stage distill first.")
            student = self._load_model(self.student_path, "student file")
            quantized = _has_quantized_kernel(student)
            self._check_free(self.results_path, "results", "evaluate")
        if exports and stages:
            self._check_exports(exports, quantized, student)

    def _check_classes(self):
        """The teacher learns to tell classes apart: with one, it trains to loss 0 and learns nothing."""
        classes = self.info.train_classes if self.info.train_classes is not None else self.info.num_classes
        if classes < 2:
            raise UsageError(
                f"dataset {inputs.shorten(self.config['dataset']['source'])} has one class in its train labels; "
                "a teacher needs two or more to learn anything (with one it trains to loss 0): use a dataset "
                "of several classes, or give a trained teacher in teacher.file."
            )

    def _check_exports(self, exports, quantized, student):
        """Each export kind can be written once the evaluation is done: its file name is not taken
        by a folder, the student has the quantized kernels the kind stores (`quantized`), and the
        format can convert each of its layers (`faqd_tf.export.check`)."""
        from faqd_tf import export

        for kind in dict.fromkeys(exports):
            if kind not in export.KINDS:
                raise UsageError(f"--export {inputs.shorten(kind)} is not an export; use one of {', '.join(export.KINDS)}.")
            path = os.path.join(self.out, export.FILENAMES[kind])
            if os.path.isdir(path):
                raise UsageError(f"--export {kind} writes the file {path}, which is a folder; move it away or "
                                 "choose another output_dir.")
            if export.needs_quantized(kind) and not quantized:
                others = ", ".join(k for k in export.KINDS if not export.needs_quantized(k))
                raise UsageError(f"--export {kind} stores a quantized student's integer codes, but the student has no "
                                 f"quantized kernel; set student.weight_bits, or export {others}.")
            try:
                export.check(kind, student)
            except ValueError as err:
                raise UsageError(f"--export {kind}: {err}") from None

    def _datasets(self, stages, exports=()):
        """(split, labels, training role) of every dataset the stages and exports build."""
        d = self.config["dataset"]
        wanted = []
        if "teacher" in stages:
            wanted += [("train", True, "teacher"), (d["validation_split"], True, None)]
        if "distill" in stages:
            wanted += [("train", d["labels"], "student"), (d["validation_split"], True, None)]
        if "evaluate" in stages:
            wanted.append(("test", True, None))
        if "tune" in stages:
            wanted += [("train", d["labels"], "student"), ("validation", True, None)]
        if exports and "evaluate" in stages:
            from faqd_tf import export

            if any(export.needs_calibration(kind) for kind in exports if kind in export.KINDS):
                wanted.append(("train", False, None))  # unlabeled calibration images (see `export`)
        return list(dict.fromkeys(wanted))

    def _check_arch(self, arch, key):
        from faqd_tf import models

        if arch not in models.available():
            raise UsageError(
                f"{key}={inputs.shorten(repr(arch))} is not a known architecture; use one of {', '.join(models.available())}."
            )

    def _check_free(self, path, what, stage):
        if os.path.exists(path) and not self.overwrite and not os.path.isdir(self.backup(stage)):
            raise UsageError(f"the {what} output {path} exists; pass --overwrite to replace it.")

    def _check_distiller(self, teacher):
        """Builds the stage's Distiller once, untrained: the student, the FA layer pairs, the loss
        options. Returns the student and whether it is the activation step's (two steps)."""
        from faqd_tf.distiller import Distiller

        student, two_step = self.build_student(teacher)
        try:
            Distiller(student, teacher, seed=self.config["seed"], **self.config["distill"])
        except ValueError as err:
            raise UsageError(f"distill: {str(err).strip().splitlines()[0]}") from None
        return student, two_step

    def _load_model(self, path, key):
        import keras

        from faqd_tf import layers, models  # noqa: F401  (registers the custom layers)

        if not os.path.isfile(path):
            raise UsageError(f"{key} {path} does not exist; point it at a .keras model file.")
        try:
            model = keras.models.load_model(path, safe_mode=True)
        except (ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as e:
            reason = inputs.shorten(str(e).strip().splitlines()[0], 200) if str(e).strip() else type(e).__name__
            raise UsageError(f"{key} {path} is not a loadable Keras model ({reason}); give a .keras file saved by Keras 3.") from None
        if not isinstance(model, keras.Model):
            raise UsageError(f"{key} {path} holds a {type(model).__name__}, not a Keras model.")
        self._check_fits(model, key, path)
        return model

    def _check_fits(self, model, key, path):
        """The model takes the data's images and has one logit per class."""
        source = inputs.shorten(self.config["dataset"]["source"])
        image_shape, classes = self.info.image_shape, self.info.num_classes
        shapes = model.input_shape if isinstance(model.input_shape, list) else [model.input_shape]
        shape = tuple(shapes[0][1:]) if len(shapes) == 1 and shapes[0] is not None else None
        if shape is None or len(shape) != 3 or any(s is not None and s != e for s, e in zip(shape, image_shape)):
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

    # --- shared pieces

    def strategy(self):
        # One strategy per process: a second MirroredStrategy or MultiWorkerMirroredStrategy would
        # start a second set of collectives.
        return self._strategy

    def dataset(self, split, labels, train):
        from faqd_tf import data

        d = self.config["dataset"]
        batch = (self.config["teacher"]["train"] if train == "teacher" else self.config["train"])["batch_size"]
        return data.load(
            d["source"], split, labels=labels, batch_size=batch, shuffle=bool(train),
            augment=d["augment"] if train else False, image_size=d["image_size"],
            limit=d["limit"] if train else d["eval_limit"], seed=self.config["seed"], data_dir=d["data_dir"],
        )

    def callbacks(self, stage, history_csv, extra=(), at_start=()):
        """The stage's callbacks; `extra` act at epoch ends (before the backup), `at_start` when
        training starts (after the backup restored the weights)."""
        import keras

        from faqd_tf.callbacks import ResumableCSVLogger, SharedBackupAndRestore, StopOnNonFiniteLoss

        backup = self.backup(stage)
        return [
            # Stops before any epoch-end callback, so no backup holds diverged weights.
            StopOnNonFiniteLoss(backup),
            # Before the backup and the history, so that both hold what they change (relax lambda).
            *extra,
            # Before the backup: a kill between the two leaves a row that the resumed run replaces.
            ResumableCSVLogger(os.path.join(self.out, history_csv)),
            # Every worker resumes from the chief's backup, so all restart at the same epoch. The
            # stage removes it only once its model is saved.
            SharedBackupAndRestore(backup, writer=self.chief, delete_checkpoint=False),
            *at_start,
            keras.callbacks.TensorBoard(os.path.join(self.out, "logs", stage), write_graph=False),
        ]

    def _steps(self, dataset, train):
        import tensorflow as tf

        if train["steps_per_epoch"]:
            return train["steps_per_epoch"]
        n = int(dataset.cardinality())
        if n > 0:
            return n
        return int(dataset.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))

    def _train(self, model, stage, train_ds, val_ds, train, history_csv, save, extra=(), at_start=()):
        """`fit`, then `save()` (the stage's model, saved atomically), then the backup removed.

        In this order a kill at any moment resumes with nothing lost: before the save the backup is
        there (a run restored at its last epoch trains no more and saves), after it the model is.
        """
        from faqd_tf import distribute

        if not os.path.isdir(self.backup(stage)):
            # A fresh start (--overwrite): the curves of an earlier run go with it, and so do the
            # backups of the stages after it, which started from this stage's old model.
            shutil.rmtree(os.path.join(self.out, "logs", stage), ignore_errors=True)
            if self.chief:
                for later in _TRAINED[_TRAINED.index(stage) + 1 :]:
                    shutil.rmtree(self.backup(later), ignore_errors=True)
        model.fit(train_ds.repeat() if train["steps_per_epoch"] else train_ds, epochs=train["epochs"],
                  steps_per_epoch=train["steps_per_epoch"], validation_data=val_ds,
                  callbacks=self.callbacks(stage, history_csv, extra, at_start), verbose="auto", shuffle=False)
        save()
        # Every worker has saved its copy before the chief removes the shared backup.
        distribute.barrier(self.strategy())
        if self.chief:
            shutil.rmtree(self.backup(stage), ignore_errors=True)

    # --- stages

    def start(self, stages, exports=()):
        """Runs the `stages` (after `preflight`): locks the output folder, writes config.json."""
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(self.config["seed"])
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        write_json(os.path.join(self.out, "config.json"), self.config)
        say(f"output directory {self.out}; stages: {', '.join(stages)}")
        for stage in stages:
            try:
                if stage == "teacher":
                    self.train_teacher()
                elif stage == "distill":
                    self.distill()
                elif self.chief:
                    self.evaluate(exports)
                else:
                    say("stage evaluate: left to the chief (worker 0), which writes results.json")
            except (OSError, ValueError, tf.errors.OpError) as err:
                raise StageFailed(stage, err) from err

    def train_teacher(self):
        import keras

        from faqd_tf import models

        cfg = self.config["teacher"]
        train_ds = self.dataset("train", True, "teacher")
        val_ds = self.dataset(self.config["dataset"]["validation_split"], True, None)
        steps = self._steps(train_ds, cfg["train"])
        say(f"stage teacher: training a full-precision {cfg['arch']} for {cfg['train']['epochs']} epochs "
            f"({steps} steps each) on {self.config['dataset']['source']}")
        with self.strategy().scope():
            model = models.get(cfg["arch"], num_classes=self.info.num_classes, input_shape=self.info.image_shape)
            model.compile(
                make_optimizer(cfg["train"], steps),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            )

        def save():
            if self.chief:  # the other workers read the chief's teacher
                os.makedirs(os.path.dirname(self.teacher_path) or ".", exist_ok=True)
                save_model(model, self.teacher_path)
                say(f"teacher saved to {self.teacher_path}")

        self._train(model, "teacher", train_ds, val_ds, cfg["train"], "teacher_history.csv", save)

    def build_student(self, teacher):
        from faqd_tf import models
        from faqd_tf.quantize import quantize_model

        s = self.config["student"]
        full = s["weight_bits"] is not None and s["activation_bits"] is not None and s["two_step"]
        # Two-step full quantization (as the authors do): activations first, weights after.
        weight_bits = None if full else s["weight_bits"]
        if s["init"] == "scratch":
            return models.get(
                s["arch"] or self.config["teacher"]["arch"], num_classes=self.info.num_classes,
                input_shape=self.info.image_shape, weight_bits=weight_bits,
                activation_bits=s["activation_bits"], per_channel=s["per_channel"] and weight_bits is not None,
                alpha_rate=s["alpha_rate"],
            ), full
        base = teacher if s["init"] == "teacher" else self._load_model(s["file"], "student.file")
        return quantize_model(
            base, weight_bits=weight_bits, activation_bits=s["activation_bits"],
            per_channel=s["per_channel"] and weight_bits is not None, relax=s["relax"] if weight_bits else None,
            alpha_rate=s["alpha_rate"],
        ), full

    def _distill(self, teacher, student, stage, train_ds, val_ds, steps, path):
        """One distillation of `student` from `teacher`, saved to `path`; returns the trained student."""
        import keras

        from faqd_tf.callbacks import BinaryRelaxScheduler, GradientShares
        from faqd_tf.distiller import Distiller
        from faqd_tf.quantize import set_alpha_decay

        d = self.config["distill"]
        # In the scope: the optimizer's slots and the metrics must be the strategy's variables.
        with self.strategy().scope():
            distiller = Distiller(student, teacher, seed=self.config["seed"], **d)
            optimizer = make_optimizer(self.config["train"], steps)
            # The quantized ReLUs' alphas decay as in the authors' code (their own, much smaller, decay).
            set_alpha_decay(student, optimizer, self.config["train"]["weight_decay"])
            distiller.compile(optimizer, metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        extra = [BinaryRelaxScheduler(self.config["student"]["relax_eta"])] if self.config["student"]["relax"] else []
        # A user must see when a weighted term is too weak to act (e.g. an FA weight on the wrong scale).
        shares = GradientShares(train_ds.take(1), print_fn=say)
        history = "history.csv" if stage == "distill" else f"{stage}_history.csv"
        self._train(distiller, stage, train_ds, val_ds, self.config["train"], history,
                    lambda: save_model(distiller.student, path), extra, [shares])
        return distiller.student

    def distill(self):
        from faqd_tf.quantize import quantize_model

        d, s = self.config["distill"], self.config["student"]
        labels = self.config["dataset"]["labels"]
        train_ds = self.dataset("train", labels, "student")
        val_ds = self.dataset(self.config["dataset"]["validation_split"], True, None)
        steps = self._steps(train_ds, self.config["train"])
        with self.strategy().scope():
            teacher = self._load_model(self.teacher_path, "teacher.file")
            student, two_step = self.build_student(teacher)
        from faqd_tf import options

        beta = options.default_beta(d["fa_norm"]) if d["beta"] is None else d["beta"]
        terms = f"{d['alpha']}*KD({d['kd']})" + (f" + {beta}*FA({d['fa']}, {d['fa_norm']})" if d["fa"] else "") + (
            f" + {d['gamma']}*CE" if d["gamma"] else "")
        mode = "label-free" if not labels else "with labels"
        if two_step:
            # Step 1 is done when its student is saved and not being redone: without --overwrite, or
            # when --overwrite's own run was interrupted in step 2.
            done = os.path.exists(self.act_path) and not os.path.isdir(self.backup("distill_act")) and (
                not self.overwrite or os.path.isdir(self.backup("distill")))
            if done:
                say(f"stage distill (1/2): reusing the activation-quantized student {self.act_path}")
                with self.strategy().scope():
                    student = self._load_model(self.act_path, "student_act")
            else:
                say(f"stage distill (1/2): {s['activation_bits']}-bit activations, FP weights; loss {terms}, {mode}")
                student = self._distill(teacher, student, "distill_act", train_ds, val_ds, steps, self.act_path)
            with self.strategy().scope():
                student = quantize_model(student, weight_bits=s["weight_bits"], activation_bits=s["activation_bits"],
                                         per_channel=s["per_channel"], relax=s["relax"], alpha_rate=s["alpha_rate"])
            say(f"stage distill (2/2): {s['weight_bits']}-bit weights and {s['activation_bits']}-bit activations")
        else:
            bits = f"{s['weight_bits']}-bit weights" if s["weight_bits"] else "FP weights"
            if s["activation_bits"]:
                bits += f", {s['activation_bits']}-bit activations"
            say(f"stage distill: {bits}, init {s['init']}; loss {terms}, {mode}; {self.config['train']['epochs']} "
                f"epochs of {steps} steps")
        self._distill(teacher, student, "distill", train_ds, val_ds, steps, self.student_path)
        say(f"student saved to {self.student_path}")

    def evaluate(self, exports=()):
        import keras

        from faqd_tf.summary import summary

        test_ds = self.dataset("test", True, None)
        results = {"dataset": self.config["dataset"]["source"], "split": "test"}
        say(f"stage evaluate: teacher and student on the {self.config['dataset']['source']} test split")
        for role, path in (("teacher", self.teacher_path), ("student", self.student_path)):
            model = self._load_model(path, f"{role} file")
            model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                          metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
            logs = model.evaluate(test_ds, return_dict=True, verbose="auto")
            info = summary(model, print_fn=None)
            results[role] = {
                "file": path, "accuracy": float(logs["accuracy"]), "loss": float(logs["loss"]),
                "parameters": int(info.total_params), "float32_bits": int(info.float32_bits),
                "packed_bits": int(info.packed_bits),
            }
            if role == "student":
                summary(model)
                student = model
        results["student"]["compression"] = results["teacher"]["float32_bits"] / results["student"]["packed_bits"]
        results["accuracy_gap"] = results["teacher"]["accuracy"] - results["student"]["accuracy"]
        for kind in exports:
            results.setdefault("exports", {})[kind] = self.export(student, kind)
        plot = plot_curves(self.out)
        print_table(results)
        write_json(self.results_path, results)
        say(f"results written to {self.results_path}" + (f"; curves in {plot}" if plot else ""))
        return results

    def export(self, student, kind):
        from faqd_tf import export

        path = os.path.join(self.out, export.FILENAMES[kind])
        # Full-integer TFLite calibrates its activation ranges on unlabeled training images.
        calibration = self.dataset("train", False, None) if export.needs_calibration(kind) else None
        export.write(kind, student, path, calibration=calibration)
        say(f"exported {kind}: {path} ({os.path.getsize(path):,} bytes)")
        return {"file": path, "bytes": os.path.getsize(path)}

    def tune(self, trials):
        from faqd_tf import tuning
        from faqd_tf.quantize import quantize_model

        cfg = self.config
        os.makedirs(self.out, exist_ok=True)
        self.lock.acquire()
        train_ds = self.dataset("train", cfg["dataset"]["labels"], "student")
        val_ds = self.dataset("validation", True, None)
        teacher = self._load_model(self.teacher_path, "teacher.file")
        s = cfg["student"]
        d = {k: v for k, v in cfg["distill"].items()
             if k in ("kd", "fa_norm", "ffa_k", "fa_method", "teacher_layers", "student_layers")}
        steps = self._steps(train_ds, cfg["train"])
        hypermodel = tuning.FAQDHyperModel(
            teacher,
            student_fn=lambda: quantize_model(teacher, weight_bits=s["weight_bits"], activation_bits=s["activation_bits"],
                                              per_channel=s["per_channel"], alpha_rate=s["alpha_rate"]),
            optimizer_fn=lambda: make_optimizer({**cfg["train"], "epochs": cfg["tune"]["epochs"]}, steps),
            label_free=not cfg["dataset"]["labels"], tune_fa=cfg["tune"]["tune_fa"],
            fa=cfg["distill"]["fa"] or "exact", distiller_kwargs=d,
        )
        say(f"tuning: {trials} {cfg['tune']['tuner']} trials of {cfg['tune']['epochs']} epoch(s), objective val_accuracy")
        best, _ = tuning.search(hypermodel, train_ds, val_ds, tuner=cfg["tune"]["tuner"], max_trials=trials,
                                epochs=cfg["tune"]["epochs"], directory=os.path.join(self.out, "tuning"),
                                project_name="faqd", overwrite=self.overwrite)
        best_config = json.loads(json.dumps(cfg))
        best_config["distill"].update(tuning.best_distill_config(best))
        path = os.path.join(self.out, "best_config.json")
        write_json(path, best_config)
        say(f"best loss weights {tuning.best_distill_config(best)}; config written to {path}")
