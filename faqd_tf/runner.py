"""A configured run of the CLI: its plan, the checks made before anything is written, and the stages."""

import json
import os
import zipfile

from faqd_tf.report import plot_curves, print_table, write_json
from faqd_tf.training import make_optimizer, save_model


STAGES = ("teacher", "distill", "evaluate", "all")


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


def _say(message):
    print(f"[faqd] {message}", flush=True)


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

    # --- checks made before anything is written

    def _pending(self, path, stage):
        # An interrupted stage leaves its BackupAndRestore folder (the chief's, shared by all workers).
        return not os.path.exists(path) or os.path.isdir(os.path.join(self.base, "backup", stage))

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

    def preflight(self, stages):
        from faqd_tf import data

        self.info = data.dataset_info(self.config["dataset"]["source"], self.config["dataset"]["data_dir"],
                                      image_size=self.config["dataset"]["image_size"])
        if not self.info.num_classes:
            raise UsageError(
                f"dataset {self.config['dataset']['source']} has no classes (unlabeled); the teacher's training "
                "and evaluation need labeled data: use a labeled source (labels are ignored while distilling)."
            )
        if "teacher" in stages:
            if self.config["teacher"]["arch"] is None:
                raise UsageError("stage 'teacher' needs teacher.arch, the architecture to train.")
            self._check_arch(self.config["teacher"]["arch"], "teacher.arch")
            self._check_free(self.teacher_path, "teacher", "teacher")
        elif not os.path.exists(self.teacher_path):
            raise UsageError(
                f"teacher file {self.teacher_path} does not exist; run --stage teacher first or set teacher.file."
            )
        else:
            self._load_model(self.teacher_path, "teacher.file")
        if "distill" in stages:
            self._check_free(self.student_path, "student", "distill")
            student = self.config["student"]
            if student["init"] == "scratch":
                self._check_arch(student["arch"] or self.config["teacher"]["arch"], "student.arch")
            if student["init"] == "file":
                self._load_model(student["file"], "student.file")
        if "evaluate" in stages and "distill" not in stages:
            if not os.path.exists(self.student_path):
                raise UsageError(f"student file {self.student_path} does not exist; run --stage distill first.")
            self._check_free(self.results_path, "results", "evaluate")

    def _check_arch(self, arch, key):
        from faqd_tf import models

        if arch not in models.available():
            raise UsageError(f"{key}={arch!r} is not a known architecture; use one of {', '.join(models.available())}.")

    def _check_free(self, path, what, stage):
        backup = os.path.join(self.base, "backup", stage)
        if os.path.exists(path) and not self.overwrite and not os.path.isdir(backup):
            raise UsageError(f"the {what} output {path} exists; pass --overwrite to replace it.")

    def _load_model(self, path, key):
        import keras

        from faqd_tf import layers, models  # noqa: F401  (registers the custom layers)

        if not os.path.isfile(path):
            raise UsageError(f"{key} {path} does not exist; point it at a .keras model file.")
        try:
            model = keras.models.load_model(path, safe_mode=True)
        except (ValueError, OSError, zipfile.BadZipFile, KeyError, TypeError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"{key} {path} is not a loadable Keras model ({reason}); give a .keras file saved by Keras 3.") from None
        if not isinstance(model, keras.Model):
            raise UsageError(f"{key} {path} holds a {type(model).__name__}, not a Keras model.")
        return model

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

    def callbacks(self, stage, history_csv, extra=()):
        import keras

        from faqd_tf.callbacks import SharedBackupAndRestore, StopOnNonFiniteLoss

        backup = os.path.join(self.base, "backup", stage)
        return [
            # Stops before BackupAndRestore's epoch end, which would save the diverged weights.
            StopOnNonFiniteLoss(backup),
            # Every worker resumes from the chief's backup, so all restart at the same epoch.
            SharedBackupAndRestore(backup, writer=self.chief),
            keras.callbacks.CSVLogger(os.path.join(self.out, history_csv), append=True),
            keras.callbacks.TensorBoard(os.path.join(self.out, "logs", stage), write_graph=False),
            *extra,
        ]

    def _steps(self, dataset, train):
        import tensorflow as tf

        if train["steps_per_epoch"]:
            return train["steps_per_epoch"]
        n = int(dataset.cardinality())
        if n > 0:
            return n
        return int(dataset.reduce(tf.constant(0, tf.int64), lambda c, _: c + 1))

    # --- stages

    def train_teacher(self):
        import keras

        from faqd_tf import distribute, models

        cfg = self.config["teacher"]
        train_ds = self.dataset("train", True, "teacher")
        val_ds = self.dataset(self.config["dataset"]["validation_split"], True, None)
        steps = self._steps(train_ds, cfg["train"])
        _say(f"stage teacher: training a full-precision {cfg['arch']} for {cfg['train']['epochs']} epochs "
             f"({steps} steps each) on {self.config['dataset']['source']}")
        with self.strategy().scope():
            model = models.get(cfg["arch"], num_classes=self.info.num_classes, input_shape=self.info.image_shape)
            model.compile(
                make_optimizer(cfg["train"], steps),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
            )
        model.fit(train_ds.repeat() if cfg["train"]["steps_per_epoch"] else train_ds, epochs=cfg["train"]["epochs"],
                  steps_per_epoch=cfg["train"]["steps_per_epoch"], validation_data=val_ds,
                  callbacks=self.callbacks("teacher", "teacher_history.csv"), verbose="auto", shuffle=False)
        if self.chief:
            os.makedirs(os.path.dirname(self.teacher_path) or ".", exist_ok=True)
            save_model(model, self.teacher_path)
            _say(f"teacher saved to {self.teacher_path}")
        # The other workers read the chief's teacher next: wait until it is written.
        distribute.barrier(self.strategy())

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
            ), full
        base = teacher if s["init"] == "teacher" else self._load_model(s["file"], "student.file")
        return quantize_model(
            base, weight_bits=weight_bits, activation_bits=s["activation_bits"],
            per_channel=s["per_channel"] and weight_bits is not None, relax=s["relax"] if weight_bits else None,
        ), full

    def _distill(self, teacher, student, stage, train_ds, val_ds, steps):
        import keras

        from faqd_tf.callbacks import BinaryRelaxScheduler
        from faqd_tf.distiller import Distiller

        d = self.config["distill"]
        # In the scope: the optimizer's slots and the metrics must be the strategy's variables.
        with self.strategy().scope():
            distiller = Distiller(student, teacher, seed=self.config["seed"], **d)
            distiller.compile(make_optimizer(self.config["train"], steps),
                              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        extra = [BinaryRelaxScheduler(self.config["student"]["relax_eta"])] if self.config["student"]["relax"] else []
        train = self.config["train"]
        distiller.fit(train_ds.repeat() if train["steps_per_epoch"] else train_ds, epochs=train["epochs"],
                      steps_per_epoch=train["steps_per_epoch"], validation_data=val_ds,
                      callbacks=self.callbacks(stage, "history.csv" if stage == "distill" else f"{stage}_history.csv", extra),
                      verbose="auto", shuffle=False)
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
        terms = f"{d['alpha']}*KD({d['kd']})" + (f" + {d['beta']}*FA({d['fa']})" if d["fa"] else "") + (
            f" + {d['gamma']}*CE" if d["gamma"] else "")
        mode = "label-free" if not labels else "with labels"
        if two_step:
            if os.path.exists(self.act_path) and not os.path.isdir(os.path.join(self.base, "backup", "distill")):
                _say(f"stage distill (1/2): reusing the activation-quantized student {self.act_path}")
                with self.strategy().scope():
                    student = self._load_model(self.act_path, "student_act")
            else:
                _say(f"stage distill (1/2): {s['activation_bits']}-bit activations, FP weights; loss {terms}, {mode}")
                student = self._distill(teacher, student, "distill_act", train_ds, val_ds, steps)
                save_model(student, self.act_path)
            with self.strategy().scope():
                student = quantize_model(student, weight_bits=s["weight_bits"], activation_bits=s["activation_bits"],
                                         per_channel=s["per_channel"], relax=s["relax"])
            _say(f"stage distill (2/2): {s['weight_bits']}-bit weights and {s['activation_bits']}-bit activations")
        else:
            bits = f"{s['weight_bits']}-bit weights" if s["weight_bits"] else "FP weights"
            if s["activation_bits"]:
                bits += f", {s['activation_bits']}-bit activations"
            _say(f"stage distill: {bits}, init {s['init']}; loss {terms}, {mode}; {self.config['train']['epochs']} "
                 f"epochs of {steps} steps")
        student = self._distill(teacher, student, "distill", train_ds, val_ds, steps)
        save_model(student, self.student_path)
        _say(f"student saved to {self.student_path}")

    def evaluate(self, exports=()):
        import keras

        from faqd_tf.summary import summary

        test_ds = self.dataset("test", True, None)
        results = {"dataset": self.config["dataset"]["source"], "split": "test"}
        _say(f"stage evaluate: teacher and student on the {self.config['dataset']['source']} test split")
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
        _say(f"results written to {self.results_path}" + (f"; curves in {plot}" if plot else ""))
        return results

    def export(self, student, kind):
        from faqd_tf import export

        if kind == "tflite":
            path = os.path.join(self.out, "student.tflite")
            export.to_tflite(student, path)
        else:
            path = os.path.join(self.out, "student.faqd")
            export.pack(student, path)
        _say(f"exported {kind}: {path} ({os.path.getsize(path):,} bytes)")
        return {"file": path, "bytes": os.path.getsize(path)}

    def tune(self, trials):
        from faqd_tf import tuning
        from faqd_tf.quantize import quantize_model

        cfg = self.config
        train_ds = self.dataset("train", cfg["dataset"]["labels"], "student")
        val_ds = self.dataset("validation", True, None)
        teacher = self._load_model(self.teacher_path, "teacher.file")
        s = cfg["student"]
        d = {k: v for k, v in cfg["distill"].items() if k in ("kd", "ffa_k", "fa_method", "teacher_layers", "student_layers")}
        steps = self._steps(train_ds, cfg["train"])
        hypermodel = tuning.FAQDHyperModel(
            teacher,
            student_fn=lambda: quantize_model(teacher, weight_bits=s["weight_bits"], activation_bits=s["activation_bits"],
                                              per_channel=s["per_channel"]),
            optimizer_fn=lambda: make_optimizer({**cfg["train"], "epochs": cfg["tune"]["epochs"]}, steps),
            label_free=not cfg["dataset"]["labels"], tune_fa=cfg["tune"]["tune_fa"],
            fa=cfg["distill"]["fa"] or "exact", distiller_kwargs=d,
        )
        _say(f"tuning: {trials} {cfg['tune']['tuner']} trials of {cfg['tune']['epochs']} epoch(s), objective val_accuracy")
        best, _ = tuning.search(hypermodel, train_ds, val_ds, tuner=cfg["tune"]["tuner"], max_trials=trials,
                                epochs=cfg["tune"]["epochs"], directory=os.path.join(self.out, "tuning"),
                                project_name="faqd", overwrite=self.overwrite)
        best_config = json.loads(json.dumps(cfg))
        best_config["distill"].update(tuning.best_distill_config(best))
        path = os.path.join(self.out, "best_config.json")
        write_json(path, best_config)
        _say(f"best loss weights {tuning.best_distill_config(best)}; config written to {path}")
