"""The command line behind `train.py`: teacher -> (activation step) -> FAQD distillation -> evaluation.

    python train.py --config configs/cifar10.json                    # every stage still missing
    python train.py --config configs/cifar10.json --stage distill    # one stage
    python train.py --config configs/cifar10.json --set train.epochs=5 --overwrite
    python train.py --config configs/cifar10.json --tune --trials 20 # keras-tuner over the loss weights

A run killed at any moment resumes from its last finished epoch when started again with the same
command (`keras.callbacks.BackupAndRestore`). Finished outputs are not replaced without
`--overwrite`. Bad input ends with one line on stderr and exit code 2.
"""

import argparse
import csv
import json
import os
import sys
import zipfile

STAGES = ("teacher", "distill", "evaluate", "all")


class UsageError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(f"{message} (see train.py --help)")


def build_parser():
    parser = _Parser(prog="train.py", description="FAQD: label-free quantization by feature-affinity distillation.")
    parser.add_argument("--config", required=True, help="JSON config file, e.g. configs/quickstart.json")
    parser.add_argument("--stage", choices=STAGES, default="all", help="stage to run (default: all)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--overwrite", action="store_true", help="replace finished outputs")
    parser.add_argument("--tune", action="store_true", help="search alpha, beta, gamma, temperature with keras-tuner")
    parser.add_argument("--trials", type=int, default=None, help="number of tuning trials (default: tune.trials)")
    parser.add_argument("--export", choices=["tflite", "packed"], action="append", default=[],
                        help="also export the student after evaluation (repeatable)")
    return parser


def _say(message):
    print(f"[faqd] {message}", flush=True)


# ---------------------------------------------------------------------------------- the run


def make_optimizer(train, steps_per_epoch):
    """The optimizer of a resolved `train` config section (SGD or AdamW, cosine or constant lr).

    >>> from faqd_tf.config import resolve_section
    >>> opt = make_optimizer(resolve_section("train", {"optimizer": "adam", "lr": 3e-4, "epochs": 2}), 50)
    >>> type(opt).__name__, round(float(opt.learning_rate), 6)
    ('AdamW', 0.0003)
    """
    import keras

    total = max(1, train["epochs"] * steps_per_epoch)
    lr = train["lr"]
    if train["schedule"] == "cosine":
        warmup = train["warmup_epochs"] * steps_per_epoch
        lr = keras.optimizers.schedules.CosineDecay(
            0.0 if warmup else lr, decay_steps=max(1, total - warmup),
            warmup_target=lr if warmup else None, warmup_steps=warmup,
        )
    if train["optimizer"] == "adam":
        # AdamW takes a float (0.0 is plain Adam); SGD takes None for no decay.
        return keras.optimizers.AdamW(lr, weight_decay=float(train["weight_decay"]))
    return keras.optimizers.SGD(
        lr, momentum=float(train["momentum"]), nesterov=train["nesterov"], weight_decay=train["weight_decay"] or None
    )


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

    @staticmethod
    def _save(model, path):
        # Written next to the target and renamed, so that a killed run never leaves half a file.
        partial = path[: -len(".keras")] + ".partial.keras"
        model.save(partial)
        os.replace(partial, path)

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
            self._save(model, self.teacher_path)
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
                alpha_rate=s["alpha_rate"],
            ), full
        base = teacher if s["init"] == "teacher" else self._load_model(s["file"], "student.file")
        return quantize_model(
            base, weight_bits=weight_bits, activation_bits=s["activation_bits"],
            per_channel=s["per_channel"] and weight_bits is not None, relax=s["relax"] if weight_bits else None,
            alpha_rate=s["alpha_rate"],
        ), full

    def _distill(self, teacher, student, stage, train_ds, val_ds, steps):
        import keras

        from faqd_tf.callbacks import BinaryRelaxScheduler, GradientShares
        from faqd_tf.distiller import Distiller
        from faqd_tf.quantize import set_alpha_decay

        d = self.config["distill"]
        # In the scope: the optimizer's slots and the metrics must be the strategy's variables.
        with self.strategy().scope():
            distiller = Distiller(student, teacher, seed=self.config["seed"], **d)
            optimizer = make_optimizer(self.config["train"], steps)
            set_alpha_decay(student, optimizer, self.config["train"]["weight_decay"])
            distiller.compile(optimizer,
                              metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        extra = [BinaryRelaxScheduler(self.config["student"]["relax_eta"])] if self.config["student"]["relax"] else []
        # A user must see when a weighted term is too weak to act (e.g. an FA weight on the wrong scale).
        extra.append(GradientShares(train_ds.take(1), print_fn=_say))
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
        from faqd_tf import options

        beta = options.default_beta(d["fa_norm"]) if d["beta"] is None else d["beta"]
        terms = f"{d['alpha']}*KD({d['kd']})" + (f" + {beta}*FA({d['fa']}, {d['fa_norm']})" if d["fa"] else "") + (
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
                self._save(student, self.act_path)
            with self.strategy().scope():
                student = quantize_model(student, weight_bits=s["weight_bits"], activation_bits=s["activation_bits"],
                                         per_channel=s["per_channel"], relax=s["relax"], alpha_rate=s["alpha_rate"])
            _say(f"stage distill (2/2): {s['weight_bits']}-bit weights and {s['activation_bits']}-bit activations")
        else:
            bits = f"{s['weight_bits']}-bit weights" if s["weight_bits"] else "FP weights"
            if s["activation_bits"]:
                bits += f", {s['activation_bits']}-bit activations"
            _say(f"stage distill: {bits}, init {s['init']}; loss {terms}, {mode}; {self.config['train']['epochs']} "
                 f"epochs of {steps} steps")
        student = self._distill(teacher, student, "distill", train_ds, val_ds, steps)
        self._save(student, self.student_path)
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
        plot = self.plot_curves()
        _print_table(results)
        self._write_json(self.results_path, results)
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

    def _write_json(self, path, value):
        partial = path + ".partial"
        with open(partial, "w") as f:
            json.dump(value, f, indent=2)
        os.replace(partial, path)

    def plot_curves(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs = [(name, os.path.join(self.out, f)) for name, f in
                (("teacher", "teacher_history.csv"), ("activation step", "distill_act_history.csv"),
                 ("student", "history.csv"))]
        runs = [(n, p) for n, p in runs if os.path.exists(p)]
        if not runs:
            return None
        fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
        offset = 0  # stages follow each other on one epoch axis
        for name, path in runs:
            with open(path) as f:
                rows = list(csv.DictReader(f))
            epochs = [offset + int(r["epoch"]) + 1 for r in rows]
            offset = epochs[-1] if epochs else offset
            what = "cross-entropy" if name == "teacher" else "distillation loss"
            ax_loss.plot(epochs, [float(r["loss"]) for r in rows], marker="o", label=f"{name}: {what}")
            if rows and "val_accuracy" in rows[0]:
                ax_acc.plot(epochs, [100 * float(r["val_accuracy"]) for r in rows], marker="o", label=name)
        ax_loss.set(xlabel="epoch (stages in order)", ylabel="training loss", yscale="log", title="training loss")
        ax_acc.set(xlabel="epoch (stages in order)", ylabel="validation accuracy (%)", title="validation accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        path = os.path.join(self.out, "curves.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

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
                                              per_channel=s["per_channel"], alpha_rate=s["alpha_rate"]),
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
        self._write_json(path, best_config)
        _say(f"best loss weights {tuning.best_distill_config(best)}; config written to {path}")


def _kib(bits):
    return f"{bits / 8 / 1024:,.1f} KiB"


def _print_table(results):
    t, s = results["teacher"], results["student"]
    rows = [
        ("model", "test accuracy", "parameters", "size (float32)", "size (packed)"),
        ("teacher", f"{100 * t['accuracy']:.2f}%", f"{t['parameters']:,}", _kib(t["float32_bits"]), _kib(t["packed_bits"])),
        ("student", f"{100 * s['accuracy']:.2f}%", f"{s['parameters']:,}", _kib(s["float32_bits"]), _kib(s["packed_bits"])),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"accuracy gap (teacher - student): {100 * results['accuracy_gap']:.2f} points; "
          f"student is {s['compression']:.1f}x smaller than the float32 teacher")


def run(argv=None):
    args = build_parser().parse_args(argv)
    from faqd_tf import config as config_module

    cfg = config_module.load(args.config, args.set)
    if args.tune and cfg["strategy"] == "multi_worker":
        raise UsageError('--tune runs its trials in one process; set strategy to "default" or "mirrored" for tuning.')
    runner = Run(cfg, overwrite=args.overwrite)
    if args.trials is not None and args.trials < 1:
        raise UsageError(f"--trials={args.trials} must be >= 1.")
    if args.tune:
        runner.preflight(["tune"])
        os.makedirs(runner.out, exist_ok=True)
        runner.tune(args.trials or cfg["tune"]["trials"])
        return 0
    stages = runner.plan(args.stage)
    runner.preflight(stages)

    if not stages:
        raise UsageError(f"every output of this run is in {runner.out} already; pass --overwrite to run it again.")
    import keras

    keras.utils.set_random_seed(cfg["seed"])
    os.makedirs(runner.out, exist_ok=True)
    runner._write_json(os.path.join(runner.out, "config.json"), cfg)
    _say(f"output directory {runner.out}; stages: {', '.join(stages)}")
    for stage in stages:
        if stage == "teacher":
            runner.train_teacher()
        elif stage == "distill":
            runner.distill()
        elif runner.chief:
            runner.evaluate(args.export)
        else:
            _say("stage evaluate: left to the chief (worker 0), which writes results.json")
    return 0


def _peer_errors():
    if "tensorflow" not in sys.modules:  # nothing distributed ran
        return ()
    import tensorflow as tf

    return (tf.errors.UnavailableError, tf.errors.DeadlineExceededError)


def main(argv=None):
    from faqd_tf.callbacks import NonFiniteLossError
    from faqd_tf.config import ConfigError

    try:
        return run(argv)
    except _peer_errors() as e:
        # A worker died or stopped answering; the others' collectives fail with this.
        cause = str(getattr(e, "message", e)).split("aborted by: ")[-1].strip().splitlines()[0][:200]
        print(f"train.py: error: the multi-worker job lost a worker ({cause}); start every worker again with the same "
              "command to resume from the last backup.", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:
        print(f"train.py: error: {e}; lower train.lr (or check the data), then run the same command to resume.",
              file=sys.stderr)
        return 1
    except (UsageError, ConfigError, FileNotFoundError, ValueError) as e:
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"train.py: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("train.py: interrupted; run the same command again to resume from the last finished epoch.", file=sys.stderr)
        return 130
