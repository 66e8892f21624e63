"""The paper's ablations (Tables I-IV, VI, VII) on Fashion-MNIST, with one teacher for every cell.

Not run in CI. One full-precision teacher (ResNet14, trained with labels on the 60,000 training
images) teaches every student, a ResNet8 (28x28x1 inputs, 10 classes). Students learn from the
first ``--subset`` training images (labels are used only by the rows that say so) and are scored on
the 10,000 test images.

Table "weight" (Tables I-IV: weights at 1, 2, 4 bits, activations FP), for two initializations:

- fine-tune: the student starts from a pre-trained FP ResNet8 (trained once, with labels, on the
  60,000 images, like the paper's "pre-trained FP ResNet20"); KD is the temperature-scaled KL;
- end-to-end: the student starts from random weights; KD is MSE on raw logits;

and the rows

- FP student: fine-tune = the pre-trained FP ResNet8 itself; end-to-end = an FP ResNet8 trained from
  scratch with CE on the subset, same budget as the quantized cells;
- QAT: CE on labels only, no teacher;
- QD (KL + CE) and QD (MSE + CE): distillation of logits plus CE, no FA (the paper's baseline [19]);
- KD only, label-free: alpha * KD;
- FAQD fro2, label-free: alpha * KD + beta * FA (eq. 11), FA in the squared Frobenius norm of eq. (6);
- FAQD l1, label-free: the same with the L1 norm of the authors' code;
- FAQD with labels: alpha * KD + beta * FA + gamma * CE (eq. 10), fro2.

beta is the measured default of each norm (`faqd_tf.options.DEFAULT_BETA`) unless `--beta` is given.

Table "sweep" (the FA weight): label-free FAQD of 2-bit students (`--sweep-bits`) for a range of
beta per norm (`--sweep-fro2`, `--sweep-l1`), both initializations; beta 0 is the KD-only row.

Pairs share their seed: a seed sets the student's initial weights, the data order and the FFA
probes, so "FAQD minus KD only" is taken seed by seed (a paired difference), and the report gives
its mean with a 95% t-interval.

Table "full" (Tables VI-VII: full quantization, weights and activations, label-free), columns 4W4A
and 1W1A (``--full-columns``; "FP" adds an unquantized end-to-end student of the same recipe), for
the initializations of ``--inits``:

- fine-tune, in two steps as the authors do: step 1 distills an activation-quantized student with FP
  weights from the pre-trained FP student; step 2 quantizes its weights too and distills again;
- end-to-end (Table VI "pre-trained: No"): a fully quantized student from random weights, one step.

Rows: "FAQD, exact FA" (KD + beta * FA, the main row), "KD only, label-free" (both steps KD only, the
FA-versus-KD pair by seed), and FFA at k = 1, 5, 15 (Table VII; step 1 shared with the exact FA row).
Every QuantReLU learns alpha by the authors' rule (`alpha_rate` 0.01) with their alpha weight decay
(`set_alpha_decay`, `--full-weight-decay`); beta is the FA default. The optimizer (``--full-optimizer``:
SGD Nesterov 0.9, cosine, the paper's, by default; Adam as in the weight table) names the cells'
table, "full sgd" or "full adam", and so does every setting of the cell that differs from its default
(e.g. "full sgd, subset=60000"), so runs with other budgets, data or students (``--full-student``)
land in tables of their own and the report compares them with the defaults, seed by seed.

Every cell is run once per seed (``--seeds``); a seed sets the student's initial weights, the data
order and the FFA probes (the teacher and the pre-trained FP student are trained once, seed 0).
Finished cells are appended to ``<out-dir>/cells.csv``, so an interrupted run continues where it
stopped and a later run with more seeds adds to it. At the end (and with ``--report-only``) the
script writes a markdown table (mean +- sample std over seeds, the number of seeds, epochs and
wall time per cell), the differences the paper's claims are about, and a bar chart.

    python benchmarks/reproduce.py --seeds 0 1 --md docs/reproduce.md --png docs/reproduce.png
"""

import argparse
import csv
import json
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from faqd_tf import data, models  # noqa: E402
from faqd_tf.training import make_optimizer, save_model  # noqa: E402
from faqd_tf.config import resolve_section  # noqa: E402
from faqd_tf.distiller import Distiller  # noqa: E402
from faqd_tf.quantize import quantize_model, set_alpha_decay  # noqa: E402

FMNIST = "idx:/usr/share/datasets/fashion-mnist"
TEACHER, STUDENT = "resnet14", "resnet8"
FIELDS = ["table", "init", "row", "column", "seed", "accuracy", "epochs", "steps", "seconds", "sec_per_epoch"]

# Loss recipes by row, chosen by name as in a config. kd=None takes the initialization's KD
# (KL fine-tune, MSE end-to-end, as the paper prescribes); beta and gamma are filled from the CLI.
WEIGHT_ROWS = {
    "FP student": None,
    "QAT (CE only, no teacher)": {"teacher": False},
    "QD (KL + CE)": {"kd": "kl", "beta": 0, "gamma": "gamma", "fa": None},
    "QD (MSE + CE)": {"kd": "mse", "beta": 0, "gamma": "gamma", "fa": None},
    "KD only, label-free": {"kd": None, "beta": 0, "gamma": 0, "fa": None},
    "FAQD fro2, label-free": {"kd": None, "beta": "beta", "gamma": 0, "fa": "exact", "fa_norm": "fro2"},
    "FAQD l1, label-free": {"kd": None, "beta": "beta", "gamma": 0, "fa": "exact", "fa_norm": "l1"},
    "FAQD with labels": {"kd": None, "beta": "beta", "gamma": "gamma", "fa": "exact", "fa_norm": "fro2"},
}
FAQD_ROWS = {"fro2": "FAQD fro2, label-free", "l1": "FAQD l1, label-free"}
BASELINE_ROW = "KD only, label-free"
FULL_ROWS = {
    "FAQD, exact FA": {"fa": "exact"},
    BASELINE_ROW: {"fa": None, "beta": 0},
    "FFA k=1": {"fa": "fast", "ffa_k": 1},
    "FFA k=5": {"fa": "fast", "ffa_k": 5},
    "FFA k=15": {"fa": "fast", "ffa_k": 15},
}
FULL_COLUMNS = {"FP": (None, None), "4W4A": (4, 4), "1W1A": (1, 1)}
FULL_MAIN = "FAQD, exact FA"
# Settings that change a full-quantization cell, by (optimizer, init); a value other than the default
# names its table, so a cell's table says how it was trained.
FULL_SETTINGS = ("full_student", "subset", "batch_size", "full_weight_decay", "full_clipnorm", "alpha", "beta",
                 "temperature", "per_channel")
FULL_INIT_SETTINGS = {("sgd", "fine-tune"): ("finetune_epochs", "full_ft_lr"),
                      ("sgd", "end-to-end"): ("e2e_epochs", "full_e2e_lr"),
                      ("adam", "fine-tune"): ("finetune_epochs", "finetune_lr"),
                      ("adam", "end-to-end"): ("e2e_epochs", "e2e_lr")}
INIT_KD = {"fine-tune": "kl", "end-to-end": "mse"}


def say(message):
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--tables", nargs="+", default=["weight", "sweep", "full"], choices=["weight", "sweep", "full"])
    p.add_argument("--inits", nargs="+", default=["fine-tune", "end-to-end"], choices=list(INIT_KD))
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4, 8])
    p.add_argument("--rows", nargs="+", default=None, help="only these rows (names as in the tables)")
    p.add_argument("--subset", type=int, default=6400, help="training images the students learn from")
    p.add_argument("--eval-limit", type=int, default=None, help="test images scored (default all 10,000)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument("--pretrain-limit", type=int, default=None,
                   help="training images of the teacher and FP student (default all 60,000)")
    p.add_argument("--fp-epochs", type=int, default=3, help="epochs of the pre-trained FP student")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--e2e-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="Adam, cosine to 0")
    p.add_argument("--e2e-optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--e2e-lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=None, help="FA weight (default: each norm's measured default)")
    p.add_argument("--sweep-bits", type=int, default=2)
    p.add_argument("--sweep-fro2", type=float, nargs="+", default=[0.1, 1, 10, 100, 1000])
    p.add_argument("--sweep-l1", type=float, nargs="+", default=[0.01, 0.1, 1, 100, 1000])
    p.add_argument("--full-optimizer", nargs="+", default=["sgd"], choices=["sgd", "adam"],
                   help="optimizers of the full table (sgd: Nesterov 0.9, cosine; adam: --finetune-lr / --e2e-lr)")
    p.add_argument("--full-ft-lr", type=float, default=0.01, help="SGD learning rate of the full table, fine-tune")
    p.add_argument("--full-e2e-lr", type=float, default=0.03,
                   help="SGD learning rate of the full table, end-to-end (0.1 lets FA drive alphas to their floor)")
    p.add_argument("--full-weight-decay", type=float, default=1e-4,
                   help="weight decay of the full table; the alphas get it times 0.01 (set_alpha_decay)")
    p.add_argument("--full-clipnorm", type=float, default=None,
                   help="clip the global gradient norm in the full table (train.global_clipnorm; the authors clip)")
    p.add_argument("--full-student", default=STUDENT, choices=list(models.available()[:7]),
                   help="student of the full table; another than resnet8 is pre-trained once, seed 1")
    p.add_argument("--full-columns", nargs="+", default=["4W4A", "1W1A"], choices=list(FULL_COLUMNS),
                   help="FP: an unquantized student of the same recipe (end-to-end only)")
    p.add_argument("--csv", default=None, help="cells file (default <out-dir>/cells.csv); commit it as it grows")
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--per-channel", action="store_true", help="per-channel weight scales (paper: layer-wise)")
    p.add_argument("--out-dir", default="saved_models/reproduce")
    p.add_argument("--md", default=None, help="markdown report (default <out-dir>/reproduce.md)")
    p.add_argument("--png", default=None, help="bar chart (default <out-dir>/reproduce.png)")
    p.add_argument("--report-only", action="store_true", help="write the report from cells.csv, train nothing")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args):
        self.args = args
        os.makedirs(args.out_dir, exist_ok=True)
        self.csv_path = cells_path(args)
        self.done = {self.key(r) for r in read_cells(self.csv_path)}
        self.info = data.dataset_info(FMNIST)
        self._test = None
        # Callbacks added to every fit, made per trained model (benchmarks/full_alphas.py logs alphas).
        self.fit_callbacks = lambda model: []

    @staticmethod
    def key(row):
        return (row["table"], row["init"], row["row"], row["column"], int(row["seed"]))

    # --- data and models

    def train_ds(self, labels, seed, full=False):
        return data.load(FMNIST, "train", labels=labels, batch_size=self.args.batch_size, augment=False,
                         limit=self.args.pretrain_limit if full else self.args.subset, seed=seed)

    def test_ds(self):
        if self._test is None:
            self._test = data.load(FMNIST, "test", batch_size=500, limit=self.args.eval_limit)
        return self._test

    def accuracy(self, model):
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])
        return float(model.evaluate(self.test_ds(), verbose=0, return_dict=True)["accuracy"])

    def build(self, arch, seed, **bits):
        keras.utils.set_random_seed(seed)
        return models.get(arch, num_classes=self.info.num_classes, input_shape=self.info.image_shape, **bits)

    def optimizer(self, kind, lr, epochs, steps, weight_decay=0.0, global_clipnorm=None):
        train = resolve_section("train", {"optimizer": kind, "lr": lr, "epochs": epochs, "weight_decay": weight_decay,
                                          "global_clipnorm": global_clipnorm})
        return make_optimizer(train, steps)

    def steps(self, full=False):
        n = self.args.pretrain_limit or 60000 if full else min(self.args.subset, 60000)
        return -(-n // self.args.batch_size)

    def pretrained(self, name, arch, epochs, seed=0):
        """The teacher or the pre-trained FP student: trained once with labels on all images, cached."""
        path = os.path.join(self.args.out_dir, f"{name}.keras")
        if os.path.exists(path):
            return keras.models.load_model(path, safe_mode=True)
        say(f"{name}: training a full-precision {arch} with labels for {epochs} epochs on the training images")
        steps = self.steps(full=True)
        model = self.build(arch, seed)
        model.compile(self.optimizer("sgd", 0.1, epochs, steps, 5e-4),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        model.fit(self.train_ds(True, seed, full=True), epochs=epochs, verbose=2)
        save_model(model, path)
        return model

    # --- cells

    def run(self):
        a = self.args
        self.teacher = self.pretrained("teacher", TEACHER, a.teacher_epochs)
        self.fp_student = self.pretrained("fp_student", STUDENT, a.fp_epochs)
        references = [("teacher", self.teacher), ("fp_student", self.fp_student)]
        if "full" in a.tables and a.full_student != STUDENT:
            references.append((fp_reference(a.full_student), self.pretrained_student(a.full_student)))
        for name, model in references:
            self.record({"table": "reference", "init": "-", "row": name, "column": "FP", "seed": 0},
                        lambda m=model: (m, 0, 0.0))
        for seed in a.seeds:
            for init in a.inits if "weight" in a.tables else []:
                for row in self.rows(WEIGHT_ROWS):
                    if row == "FP student":
                        if init == "end-to-end":
                            self.record(self.cell("weight", init, row, "FP", seed),
                                        lambda s=seed: self.weight_cell("end-to-end", "QAT (CE only, no teacher)", None, s))
                        continue
                    for bits in a.bits:
                        self.record(self.cell("weight", init, row, f"{bits}-bit", seed),
                                    lambda i=init, r=row, b=bits, s=seed: self.weight_cell(i, r, b, s))
            for init in a.inits if "sweep" in a.tables else []:
                for norm, betas in (("fro2", a.sweep_fro2), ("l1", a.sweep_l1)):
                    for beta in betas:
                        self.record(self.cell("sweep", init, sweep_row(norm, beta), f"{a.sweep_bits}-bit", seed),
                                    lambda i=init, n=norm, b=beta, s=seed: self.weight_cell(
                                        i, FAQD_ROWS[n], a.sweep_bits, s, beta=b))
            for optimizer in a.full_optimizer if "full" in a.tables else []:
                for init in a.inits:
                    table = full_table(a, optimizer, init)
                    for column in a.full_columns:
                        if column == "FP" and init == "fine-tune":
                            continue  # the pre-trained FP student is that reference
                        for row in self.rows(FULL_ROWS):
                            if column == "FP" and FULL_ROWS[row].get("fa") == "fast":
                                continue
                            self.record(self.cell(table, init, row, column, seed),
                                        lambda i=init, r=row, c=column, s=seed, o=optimizer: self.full_cell(i, r, c, s, o))

    def rows(self, table):
        return [r for r in table if self.args.rows is None or r in self.args.rows]

    @staticmethod
    def cell(table, init, row, column, seed):
        return {"table": table, "init": init, "row": row, "column": column, "seed": seed}

    def record(self, cell, train):
        if self.key(cell) in self.done:
            return
        say(f"{cell['table']} | {cell['init']} | {cell['row']} | {cell['column']} | seed {cell['seed']}")
        model, epochs, seconds = train()
        steps = epochs * self.steps()
        row = {**cell, "accuracy": round(self.accuracy(model), 5), "epochs": epochs, "steps": steps,
               "seconds": round(seconds, 1), "sec_per_epoch": round(seconds / epochs, 2) if epochs else ""}
        say(f"  -> test accuracy {row['accuracy']:.4f} ({epochs} epochs, {seconds:.0f} s)")
        new = not os.path.exists(self.csv_path)
        with open(self.csv_path, "a", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            if new:
                writer.writeheader()
            writer.writerow(row)
        self.done.add(self.key(cell))

    def fit(self, model, optimizer, ds, epochs, recipe=None, teacher=None, seed=0):
        """Trains `model` (with CE when `recipe` is None, else distilled from `teacher`); returns seconds."""
        if recipe is None:
            model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            fitted = model
        else:
            fitted = Distiller(model, teacher, alpha=self.args.alpha, temperature=self.args.temperature, seed=seed, **recipe)
            fitted.compile(optimizer)
        start = time.perf_counter()
        fitted.fit(ds, epochs=epochs, verbose=2, callbacks=self.fit_callbacks(model))
        return time.perf_counter() - start

    def recipe(self, spec, init, beta=None):
        spec = dict(spec)
        if spec.get("kd", "unset") is None:
            spec["kd"] = INIT_KD[init]
        for term in ("beta", "gamma"):
            if isinstance(spec.get(term), str):
                spec[term] = getattr(self.args, spec[term])
        if beta is not None:
            spec["beta"] = beta
        return spec

    def weight_cell(self, init, row, bits, seed, beta=None):
        a = self.args
        epochs = a.finetune_epochs if init == "fine-tune" else a.e2e_epochs
        keras.utils.set_random_seed(seed)
        if init == "fine-tune":
            student = quantize_model(self.fp_student, weight_bits=bits, per_channel=a.per_channel)
            opt = self.optimizer("adam", a.finetune_lr, epochs, self.steps())
        else:
            student = self.build(STUDENT, seed, weight_bits=bits, per_channel=a.per_channel and bits is not None)
            opt = self.optimizer(a.e2e_optimizer, a.e2e_lr, epochs, self.steps())
        spec = WEIGHT_ROWS[row]
        if spec.get("teacher", True):
            recipe = self.recipe(spec, init, beta)
            ds = self.train_ds(recipe["gamma"] > 0, seed)
            seconds = self.fit(student, opt, ds, epochs, recipe, self.teacher, seed)
        else:
            seconds = self.fit(student, opt, self.train_ds(True, seed), epochs)
        return student, epochs, seconds

    def pretrained_student(self, arch):
        """The pre-trained FP `arch` that two-step full quantization starts from (seed 1 for another
        arch than the student's, so that a ResNet14 student is not the teacher itself)."""
        if arch == STUDENT:
            return self.fp_student
        return self.pretrained(fp_reference(arch), arch, self.args.fp_epochs, seed=1)

    def full_optimizer(self, kind, init, epochs, student):
        """The optimizer of a full-quantization cell; the student's alphas get the authors' decay."""
        a = self.args
        if kind == "sgd":
            lr = a.full_ft_lr if init == "fine-tune" else a.full_e2e_lr
        else:
            lr = a.finetune_lr if init == "fine-tune" else a.e2e_lr
        opt = self.optimizer(kind, lr, epochs, self.steps(), a.full_weight_decay, a.full_clipnorm)
        set_alpha_decay(student, opt, a.full_weight_decay)
        return opt

    def full_recipe(self, row, init):
        return self.recipe({"kd": None, "beta": "beta", "gamma": 0, **FULL_ROWS[row]}, init)

    def activation_student(self, row, act, seed, optimizer):
        """Step 1 of two-step full quantization: A-bit activations, FP weights, from the pre-trained
        FP student; KD only for the KD-only row, else FAQD with exact FA (shared by the FA rows)."""
        a = self.args
        table = full_table(a, optimizer, "fine-tune")
        kd_only = row == BASELINE_ROW
        step_row = STEP1_ROWS[kd_only]
        cell = self.cell(table, "fine-tune", step_row, f"{act}A32W", seed)
        path = os.path.join(a.out_dir, f"step1_{slug(table)}_{'kd' if kd_only else 'faqd'}_a{act}_seed{seed}.keras")

        def train():
            keras.utils.set_random_seed(seed)
            student = quantize_model(self.pretrained_student(a.full_student), weight_bits=None, activation_bits=act)
            recipe = self.full_recipe(BASELINE_ROW if kd_only else FULL_MAIN, "fine-tune")
            opt = self.full_optimizer(optimizer, "fine-tune", a.finetune_epochs, student)
            seconds = self.fit(student, opt, self.train_ds(False, seed), a.finetune_epochs, recipe, self.teacher, seed)
            save_model(student, path)
            return student, a.finetune_epochs, seconds

        if not os.path.exists(path):
            self.done.discard(self.key(cell))
            self.record(cell, train)
        return keras.models.load_model(path, safe_mode=True)

    def full_cell(self, init, row, column, seed, optimizer):
        a = self.args
        weight_bits, act = FULL_COLUMNS[column]
        per_channel = a.per_channel and weight_bits is not None
        if init == "fine-tune":
            step1 = self.activation_student(row, act, seed, optimizer)
            keras.utils.set_random_seed(seed)
            student = quantize_model(step1, weight_bits=weight_bits, activation_bits=act, per_channel=per_channel)
            epochs = a.finetune_epochs
        else:
            student = self.build(a.full_student, seed, weight_bits=weight_bits, activation_bits=act,
                                 per_channel=per_channel)
            epochs = a.e2e_epochs
        recipe = self.full_recipe(row, init)
        opt = self.full_optimizer(optimizer, init, epochs, student)
        seconds = self.fit(student, opt, self.train_ds(False, seed), epochs, recipe, self.teacher, seed)
        return student, epochs, seconds


STEP1_ROWS = {False: "step 1: activations only", True: "step 1: activations only, KD only"}


def full_table(args, optimizer, init):
    """The table name of full-quantization cells: the optimizer, then every setting of the cell off its default."""
    defaults = vars(parse_args([]))
    changed = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
               for k in FULL_SETTINGS + FULL_INIT_SETTINGS[optimizer, init]
               for v in [getattr(args, k)] if v != defaults[k]]
    return ", ".join([f"full {optimizer}", *changed])


def fp_reference(arch):
    """The reference row of the pre-trained FP `arch` student."""
    return "fp_student" if arch == STUDENT else f"fp_{arch}"


def slug(text):
    return "".join(ch if ch.isalnum() else "_" for ch in text)


def cells_path(args):
    return args.csv or os.path.join(args.out_dir, "cells.csv")


def sweep_row(norm, beta):
    return f"{norm} beta={beta:g}"


def read_cells(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------ report


def summarize(cells):
    """{(table, init, row, column): (mean %, std %, n, epochs, mean seconds)} over seeds."""
    groups = {}
    for c in cells:
        groups.setdefault((c["table"], c["init"], c["row"], c["column"]), []).append(c)
    out = {}
    for key, group in groups.items():
        acc = np.array([float(c["accuracy"]) for c in group]) * 100
        secs = np.array([float(c["seconds"]) for c in group])
        out[key] = (acc.mean(), acc.std(ddof=1) if len(acc) > 1 else float("nan"), len(acc),
                    int(group[0]["epochs"]), secs.mean())
    return out


def fmt(stat):
    if stat is None:
        return "-"
    mean, std, n, _, _ = stat
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" (n={n})"


def table_md(stats, table, init, rows, columns, time_column=False):
    lines = ["| Method | " + " | ".join(columns) + " | epochs | s per run |",
             "|---|" + "---|" * (len(columns) + 2)]
    for row in rows:
        found = [stats.get((table, init, row, c)) for c in columns]
        present = [s for s in found if s]
        if not present:
            continue
        epochs = present[0][3]
        secs = np.mean([s[4] for s in present])
        lines.append(f"| {row} | " + " | ".join(fmt(s) for s in found) + f" | {epochs} | {secs:.0f} |")
    return "\n".join(lines)


def claims(stats):
    """The differences the paper's claims rest on, one line each, from the measured means."""
    out = []

    def mean(*key):
        s = stats.get(key)
        return None if s is None else s[0]

    def diff(text, a, b, paper):
        if a is None or b is None:
            return
        out.append(f"- {text}: {a - b:+.2f} points ({a:.2f} vs {b:.2f}); paper: {paper}.")

    for init in INIT_KD:
        for bits in ("1-bit", "2-bit", "4-bit"):
            w = ("weight", init)
            where = f"{init}, {bits}"
            for norm, faqd in FAQD_ROWS.items():
                diff(f"{where}: label-free FAQD ({norm}) minus label-free KD only (FA adds accuracy)",
                     mean(*w, faqd, bits), mean(*w, BASELINE_ROW, bits), "FA helps")
            diff(f"{where}: label-free FAQD minus QAT with labels (beats supervised QAT)",
                 mean(*w, FAQD_ROWS["fro2"], bits), mean(*w, "QAT (CE only, no teacher)", bits), "FAQD higher")
            best_qd = [m for m in (mean(*w, "QD (KL + CE)", bits), mean(*w, "QD (MSE + CE)", bits)) if m is not None]
            if best_qd:
                diff(f"{where}: label-free FAQD minus the better QD (beats supervised QD)",
                     mean(*w, FAQD_ROWS["fro2"], bits), max(best_qd), "FAQD higher")
            diff(f"{where}: QD with MSE minus QD with KL (Table I: MSE better end-to-end)",
                 mean(*w, "QD (MSE + CE)", bits), mean(*w, "QD (KL + CE)", bits),
                 "MSE higher end-to-end, KL better fine-tuning")
            fp = mean("weight", "end-to-end", "FP student", "FP") if init == "end-to-end" else mean(
                "reference", "-", "fp_student", "FP")
            diff(f"{where}: label-free FAQD minus the FP student (nearly matches FP)",
                 mean(*w, FAQD_ROWS["fro2"], bits), fp, "within about 2 points at 1 bit, at or above FP at 4 bits")
    for table in full_tables(stats):
        for column in FULL_COLUMNS:
            exact = mean(table, "fine-tune", FULL_MAIN, column)
            for k in (1, 5, 15):
                diff(f"{table} {column}: FFA k={k} minus exact FA (k=15 comparable)",
                     mean(table, "fine-tune", f"FFA k={k}", column), exact, "k=1 noisy, k=15 within ~0.5 point")
    return out


def plot(stats, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("weight", "fine-tune", [r for r in WEIGHT_ROWS if r != "FP student"], ["1-bit", "2-bit", "4-bit"]),
              ("weight", "end-to-end", [r for r in WEIGHT_ROWS if r != "FP student"], ["1-bit", "2-bit", "4-bit"])]
    panels = [p for p in panels if any((p[0], p[1], r, c) in stats for r in p[2] for c in p[3])]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5.6), squeeze=False)
    for ax, (table, init, rows, columns) in zip(axes[0], panels):
        width = 0.8 / len(rows)
        lows = []
        for i, row in enumerate(rows):
            s = [stats.get((table, init, row, c)) for c in columns]
            means = [x[0] if x else np.nan for x in s]
            errs = [x[1] if x and x[2] > 1 else np.nan for x in s]
            lows += [m for m in means if not np.isnan(m)]
            ax.bar(np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width, means, width,
                   yerr=None if np.all(np.isnan(errs)) else np.nan_to_num(errs), capsize=2, label=row,
                   color=f"C{list(WEIGHT_ROWS).index(row) if row in WEIGHT_ROWS else 7 + i}")
        ref = stats.get(("reference", "-", "teacher", "FP"))
        if ref:
            ax.axhline(ref[0], color="black", linestyle="--", linewidth=1, label=f"teacher {ref[0]:.2f}")
        fp = stats.get(("reference", "-", "fp_student", "FP")) if init == "fine-tune" else stats.get(
            ("weight", "end-to-end", "FP student", "FP"))
        if fp:
            ax.axhline(fp[0], color="gray", linestyle=":", linewidth=1, label=f"FP student {fp[0]:.2f}")
        ax.set_xticks(np.arange(len(columns)), columns)
        ax.set_xlim(-0.5, len(columns) - 0.5)
        ax.set_ylim(max(0, min(lows) - 3) if lows else 0, 100 if not ref else max(ref[0], max(lows, default=0)) + 1.5)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"weights only, {init}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    fig.suptitle("FAQD ablations on Fashion-MNIST: ResNet14 teacher, ResNet8 students (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ report: full quantization


def full_tables(stats):
    """The full-quantization tables present, those at default settings first."""
    names = {k[0] for k in stats if k[0] == "full" or k[0].startswith("full ")}
    return sorted(names, key=lambda t: (t.count(","), t))


def table_setting(table, key):
    """The value of setting `key` in a full table's name ("full sgd, subset=60000"), or None."""
    for part in table.split(", ")[1:]:
        name, _, value = part.partition("=")
        if name == key:
            return value
    return None


def full_fp(stats, table, init):
    """The FP reference of a full table: the pre-trained FP student the two steps start from, or
    (end-to-end) the FP column of the same recipe."""
    if init == "end-to-end":
        return stats.get((table, init, FULL_MAIN, "FP"))
    return stats.get(("reference", "-", fp_reference(table_setting(table, "full_student") or STUDENT), "FP"))


def full_md(cells, stats):
    """The full-quantization section: tables, FA and optimizer differences paired by seed, the 1W1A gap."""
    tables = full_tables(stats)
    if not tables:
        return []

    def present(table, init, rows, columns):
        return [c for c in columns if any((table, init, r, c) in stats for r in rows)]

    def pair(a, b):
        return paired_difference(cells, a, b)

    parts = ["## Full quantization, label-free (weights and activations)", "",
             "Table names carry the optimizer and every setting off its default. Fine-tune: two steps from the "
             "pre-trained FP student (step 1 activations only, step 2 weights too; each row's step 1 uses its own "
             "loss, the FFA rows share the exact FA's). End-to-end: from random weights, one step (Table VI "
             "\"pre-trained: No\"); its FP column is an unquantized student of the same recipe.", ""]
    for table in tables:
        parts += [f"### {table}", ""]
        effects = []
        for init in INIT_KD:
            if not any(k[:2] == (table, init) for k in stats):
                continue
            if init == "fine-tune":
                steps = [("step 1, activations only (FP weights)", list(STEP1_ROWS.values()), ["4A32W", "1A32W"]),
                         ("step 2, weights and activations", list(FULL_ROWS), ["4W4A", "1W1A"])]
            else:
                steps = [("end-to-end, from random weights", list(FULL_ROWS), list(FULL_COLUMNS))]
            for title, rows, columns in steps:
                columns = present(table, init, rows, columns)
                if columns:
                    parts += [f"{title}:", "", table_md(stats, table, init, rows, columns), ""]
                for column in columns:
                    main, base = (rows[0], rows[1]) if rows[0] in STEP1_ROWS.values() else (FULL_MAIN, BASELINE_ROW)
                    stat = pair((table, init, main, column), (table, init, base, column))
                    if stat is not None:
                        effects.append((init, column, stat))
            fp = full_fp(stats, table, init)
            if fp:
                what = "FP column above" if init == "end-to-end" else "pre-trained FP student"
                parts += [f"FP reference ({init}, {what}): {fmt(fp)}.", ""]
        if effects:
            parts += ["FA's effect, FAQD minus KD only, paired by seed (points; ± the 95% t-interval's half-width):", "",
                      "| init | column | FAQD minus KD only | verdict |", "|---|---|---|---|"]
            parts += [f"| {init} | {column} | {fmt_diff(stat)} | {verdict(stat)} |" for init, column, stat in effects]
            parts.append("")
        ffa = [(r, c) for r in FULL_ROWS if r.startswith("FFA") for c in FULL_COLUMNS if (table, "fine-tune", r, c) in stats]
        if ffa:
            secs = {(r, c): np.mean([float(x["sec_per_epoch"]) for x in cells if (x["table"], x["init"], x["row"], x["column"])
                                     == (table, "fine-tune", r, c)]) for r, c in [(FULL_MAIN, c) for c in FULL_COLUMNS] + ffa
                    if (table, "fine-tune", r, c) in stats}
            parts += ["Seconds per epoch of step 2 (the FA/FFA cost, Table VII): "
                      + ", ".join(f"{r} {c}: {v:.1f}" for (r, c), v in secs.items()), ""]
    parts += optimizer_md(cells, stats, tables) + gap_md(cells, stats, tables)
    return parts


def optimizer_md(cells, stats, tables):
    """SGD minus Adam, same settings otherwise, paired by seed."""
    lines = []
    for sgd in [t for t in tables if t.startswith("full sgd")]:
        adam = sgd.replace("full sgd", "full adam", 1)
        for key in sorted(k for k in stats if k[0] == adam):
            stat = paired_difference(cells, (sgd, *key[1:]), key)
            if stat is not None:
                lines.append(f"| {sgd[len('full sgd, '):] or 'default'} | {key[1]} | {key[2]} | {key[3]} | "
                             f"{fmt(stats.get((sgd, *key[1:])))} | {fmt(stats[key])} | {fmt_diff(stat)} |")
    if not lines:
        return []
    return ["### Optimizer: SGD minus Adam, paired by seed", "",
            "| settings | init | row | column | SGD | Adam | SGD minus Adam |", "|---|---|---|---|---|---|---|",
            *lines, ""]


def gap_md(cells, stats, tables):
    """1W1A of the main row against its FP reference, and each setting against the defaults (paired)."""
    lines = []
    for table in tables:
        base = table.split(", ")[0]
        for init in INIT_KD:
            one = stats.get((table, init, FULL_MAIN, "1W1A"))
            if one is None:
                continue
            fp = full_fp(stats, table, init)
            step1 = stats.get((table, init, STEP1_ROWS[False], "1A32W"))
            versus = paired_difference(cells, (table, init, FULL_MAIN, "1W1A"), (base, init, FULL_MAIN, "1W1A")) \
                if table != base else None
            lines.append(f"| {table} | {init} | {fmt(step1)} | {fmt(one)} | {fmt(fp)} | "
                         f"{f'{one[0] - fp[0]:+.2f}' if fp else '-'} | {fmt_diff(versus) if versus else '-'} |")
    if not lines:
        return []
    return ["### 1W1A: how close to FP, and what each setting changes", "",
            f"Row {FULL_MAIN!r}. The last column is the paired difference to the same table at default settings.", "",
            "| table | init | 1A32W (step 1) | 1W1A | FP reference | 1W1A minus FP | minus defaults |",
            "|---|---|---|---|---|---|---|", *lines, ""]


def plot_full(stats, path):
    """Left: full quantization at default settings, FAQD and KD only per column, with the FP
    references; right: 1W1A (and its step 1) at each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tables = full_tables(stats)
    groups = [(t, i, c) for t in tables if "," not in t for i in INIT_KD for c in FULL_COLUMNS
              if any((t, i, r, c) in stats for r in (FULL_MAIN, BASELINE_ROW))]
    gaps = [t for t in tables if (t, "fine-tune", FULL_MAIN, "1W1A") in stats]
    if not groups:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1.6, 1]})

    def bars(ax, labels, series, refs):
        width = 0.8 / len(series)
        for j, (name, values) in enumerate(series):
            means = [v[0] if v else np.nan for v in values]
            errs = [v[1] if v and v[2] > 1 else 0 for v in values]
            drawn = ax.bar(np.arange(len(labels)) + (j - (len(series) - 1) / 2) * width, means, width, yerr=errs,
                           capsize=2, label=name)
            ax.bar_label(drawn, fmt="%.1f", fontsize=6, padding=2)
        for x, ref in enumerate(refs):
            if ref:
                ax.hlines(ref[0], x - 0.45, x + 0.45, color="black", linestyle="--", linewidth=1,
                          label="FP reference" if x == min(i for i, r in enumerate(refs) if r) else None)
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")

    ax = axes[0]
    labels = [f"{t[len('full '):]}\n{i}\n{c}" for t, i, c in groups]
    bars(ax, labels, [(r, [stats.get((t, i, r, c)) for t, i, c in groups]) for r in (FULL_MAIN, BASELINE_ROW)],
         [full_fp(stats, t, i) if c != "FP" else None for t, i, c in groups])
    ax.set_title("Full quantization, label-free, default settings")
    ax = axes[1]
    if gaps:
        labels = [t[len("full "):].replace(", ", "\n") + ("" if "," in t else "\ndefaults") for t in gaps]
        bars(ax, labels, [("step 1: 1A32W", [stats.get((t, "fine-tune", STEP1_ROWS[False], "1A32W")) for t in gaps]),
                          ("step 2: 1W1A", [stats.get((t, "fine-tune", FULL_MAIN, "1W1A")) for t in gaps])],
             [full_fp(stats, t, "fine-tune") for t in gaps])
        ax.set_title(f"Two-step 1W1A ({FULL_MAIN}) by setting")
    else:
        ax.axis("off")
    fig.suptitle(f"Full quantization on Fashion-MNIST: {TEACHER} teacher, {STUDENT} students unless named")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def tf_version():
    import tensorflow as tf

    return tf.__version__


def paired_difference(cells, a, b):
    """Seed-by-seed accuracy differences (points) of cells `a` minus cells `b` (keys without seed).

    Returns (mean, 95% t half-width, n, differences); the half-width is nan for n < 2.
    """
    from scipy import stats as scipy_stats

    def by_seed(key):
        return {int(c["seed"]): float(c["accuracy"]) for c in cells
                if (c["table"], c["init"], c["row"], c["column"]) == key}

    first, second = by_seed(a), by_seed(b)
    seeds = sorted(set(first) & set(second))
    d = np.array([100 * (first[s] - second[s]) for s in seeds])
    if len(d) == 0:
        return None
    half = scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else float("nan")
    return float(d.mean()), float(half), len(d), d


def verdict(stat):
    mean, half, n, _ = stat
    if not np.isfinite(half):
        return "one seed"
    if mean - half > 0:
        return "FA helps"
    if mean + half < 0:
        return "FA hurts"
    return "no difference shown"


def fmt_diff(stat):
    if stat is None:
        return "-"
    mean, half, n, _ = stat
    return f"{mean:+.2f} ± {half:.2f} (n={n})" if np.isfinite(half) else f"{mean:+.2f} (n={n})"


def fa_effects(cells):
    """[(init, column, norm, stat)] of FAQD minus KD only, same seed, for the weight and sweep tables."""
    out = []
    for init in INIT_KD:
        for bits in ("1-bit", "2-bit", "4-bit"):
            for norm, row in FAQD_ROWS.items():
                stat = paired_difference(cells, ("weight", init, row, bits), ("weight", init, BASELINE_ROW, bits))
                if stat is not None:
                    out.append((init, bits, norm, stat))
    return out


def sweep_effects(cells):
    """{(init, norm): [(beta, accuracy stat, paired difference stat)]} of the sweep table."""
    out = {}
    for c in cells:
        if c["table"] != "sweep":
            continue
        norm, beta = c["row"].split(" beta=")
        out.setdefault((c["init"], norm, c["column"]), set()).add(float(beta))
    result = {}
    for (init, norm, column), betas in sorted(out.items()):
        rows = []
        for beta in sorted(betas):
            key = ("sweep", init, sweep_row(norm, beta), column)
            stat = paired_difference(cells, key, ("weight", init, BASELINE_ROW, column))
            rows.append((beta, summarize([c for c in cells if (c["table"], c["init"], c["row"], c["column"]) == key])[key], stat))
        default = ("weight", init, FAQD_ROWS[norm], column)
        default_cells = [c for c in cells if (c["table"], c["init"], c["row"], c["column"]) == default]
        if default_cells:
            from faqd_tf.options import DEFAULT_BETA

            rows.append((DEFAULT_BETA[norm], summarize(default_cells)[default],
                         paired_difference(cells, default, ("weight", init, BASELINE_ROW, column))))
            rows.sort(key=lambda r: r[0])
        result[(init, norm, column)] = rows
    return result


def fa_md(cells):
    effects = fa_effects(cells)
    sweeps = sweep_effects(cells)
    if not effects and not sweeps:
        return []
    from faqd_tf.options import DEFAULT_BETA

    parts = ["## Does FA help? FAQD minus KD only, paired by seed", "",
             f"Label-free, FA at the default weights (beta {DEFAULT_BETA['fro2']:g} for fro2, {DEFAULT_BETA['l1']:g} "
             "for l1); each difference is taken between runs with the same seed (same initial weights, same data "
             "order), in accuracy points; ± is the half-width of the 95% t-interval of the mean difference.", "",
             "| init | bits | FA norm | FAQD minus KD only | verdict |", "|---|---|---|---|---|"]
    for init, bits, norm, stat in effects:
        parts.append(f"| {init} | {bits} | {norm} | {fmt_diff(stat)} | {verdict(stat)} |")
    for (init, norm, column), rows in sweeps.items():
        parts += ["", f"### FA weight sweep: {init}, {column}, {norm}", "",
                  "| beta | accuracy (mean ± std) | minus KD only (paired) | verdict |", "|---|---|---|---|"]
        base = [c for c in cells if (c["table"], c["init"], c["row"], c["column"]) == ("weight", init, BASELINE_ROW, column)]
        if base:
            parts.append(f"| 0 (KD only) | {fmt(summarize(base)[('weight', init, BASELINE_ROW, column)])} | - | - |")
        for beta, stat, diff in rows:
            parts.append(f"| {beta:g}{' (default)' if beta == DEFAULT_BETA[norm] else ''} | {fmt(stat)} | "
                         f"{fmt_diff(diff)} | {verdict(diff) if diff else '-'} |")
    return parts + [""]


def plot_fa(cells, path):
    """Left: paired FAQD - KD-only differences with 95% intervals; right: accuracy against beta."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    effects = fa_effects(cells)
    sweeps = sweep_effects(cells)
    if not effects and not sweeps:
        return False
    fig, axes = plt.subplots(1, 1 + len({k[0] for k in sweeps}), figsize=(6 + 5 * len({k[0] for k in sweeps}), 4.8),
                             squeeze=False)
    ax = axes[0][0]
    labels = [f"{init} {bits}" for init, bits, norm, _ in effects if norm == "fro2"]
    for j, norm in enumerate(FAQD_ROWS):
        pts = [(i, stat) for i, (init, bits, n, stat) in enumerate(e for e in effects if e[2] == norm)]
        xs = np.array([i for i, _ in pts]) + (j - 0.5) * 0.3
        ax.errorbar(xs, [s[0] for _, s in pts], yerr=[s[1] if np.isfinite(s[1]) else 0 for _, s in pts], fmt="o",
                    capsize=3, label=f"FA {norm}")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(labels)), labels, rotation=30)
    ax.set_ylabel("FAQD minus KD only (accuracy points)")
    ax.set_title("Paired by seed, 95% t-intervals")
    ax.grid(alpha=0.3)
    ax.legend()
    for ax, init in zip(axes[0][1:], [i for i in INIT_KD if any(k[0] == i for k in sweeps)]):
        for norm in FAQD_ROWS:
            for (i, n, column), rows in sweeps.items():
                if i != init or n != norm:
                    continue
                betas = [r[0] for r in rows]
                means = [r[1][0] for r in rows]
                stds = [r[1][1] if r[1][2] > 1 else 0 for r in rows]
                ax.errorbar(betas, means, yerr=stds, marker="o", capsize=3, label=f"{norm}, {column}")
        base = [c for c in cells if c["table"] == "weight" and c["init"] == init and c["row"] == BASELINE_ROW
                and any(c["column"] == k[2] for k in sweeps)]
        if base:
            m = 100 * np.mean([float(c["accuracy"]) for c in base])
            ax.axhline(m, color="gray", linestyle="--", label=f"KD only {m:.2f}")
        ax.set_xscale("log")
        ax.set_xlabel("beta (FA weight)")
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_title(f"FA weight sweep, {init}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def report(args):
    cells = read_cells(cells_path(args))
    stats = summarize(cells)
    md = args.md or os.path.join(args.out_dir, "reproduce.md")
    png = args.png or os.path.join(args.out_dir, "reproduce.png")
    ref = {k[2]: v for k, v in stats.items() if k[0] == "reference"}
    seeds = sorted({int(c["seed"]) for c in cells if c["table"] != "reference"})
    parts = [
        "# FAQD ablations on Fashion-MNIST",
        "",
        f"Report: `python benchmarks/reproduce.py {' '.join(sys.argv[1:])}`, from the {len(cells)} runs in "
        f"`{cells_path(args)}` (one row per cell and seed; seeds present: {seeds}; "
        "n = seeds per cell).  ",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"TensorFlow {tf_version()}, Keras {keras.__version__}; "
        # A report-only call did not train: its arguments need not be those the runs used.
        + ("settings of this call (report only; each run's epochs and steps are in the CSV): "
           if args.report_only else "training settings: ") + json.dumps(
            {k: v for k, v in vars(args).items()
             if k not in ("md", "png", "report_only", "out_dir", "seeds", "tables", "inits", "bits", "rows", "csv")}),
        "",
        f"Teacher {TEACHER}: {fmt(ref.get('teacher'))}; pre-trained FP student {STUDENT}: {fmt(ref.get('fp_student'))} "
        "(test accuracy %, 10,000 test images unless eval_limit is set).",
        "",
    ]
    weight_rows = list(WEIGHT_ROWS)
    for init in INIT_KD:
        if any(k[:2] == ("weight", init) for k in stats):
            parts += [f"## Weights quantized, activations FP: {init}", ""]
            fp = "the pre-trained FP student above" if init == "fine-tune" else "the FP student row"
            parts += [f"FP reference: {fp}.", "", table_md(stats, "weight", init, weight_rows, ["FP", "1-bit", "2-bit", "4-bit"]), ""]
    parts += full_md(cells, stats)
    full_png = os.path.splitext(png)[0] + "_full.png"
    os.makedirs(os.path.dirname(os.path.abspath(full_png)), exist_ok=True)
    has_full = plot_full(stats, full_png)
    if has_full:
        parts += [f"![full quantization]({os.path.basename(full_png)})", ""]
    fa_png = os.path.splitext(png)[0] + "_fa.png"
    fa_parts = fa_md(cells)
    if fa_parts:
        parts += fa_parts + [f"![FA effect]({os.path.basename(fa_png)})", ""]
    has_weight = any(k[0] == "weight" for k in stats)
    if has_weight:  # the claims and the bar chart are about the weight tables
        parts += ["## Differences behind the paper's claims", "", *claims(stats), "",
                  f"![bar chart]({os.path.basename(png)})", ""]
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write("\n".join(parts))
    if has_weight:
        plot(stats, png)
    if fa_parts:
        plot_fa(cells, fa_png)
    say(f"report written to {md}" + (f" and {png}" if has_weight else "") + (f", {full_png}" if has_full else ""))


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
        sys.exit("reproduce: Fashion-MNIST is missing; install the Debian package dataset-fashion-mnist "
                 "(bash scripts/install.sh does).")
    if not args.report_only:
        Bench(args).run()
    report(args)


if __name__ == "__main__":
    main()
