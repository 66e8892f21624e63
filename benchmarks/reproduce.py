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

Table "full" (Tables VI-VII: fine-tuned full quantization in two steps): step 1 distills an
activation-quantized student with FP weights (label-free FAQD, exact FA) from the pre-trained FP
ResNet8; step 2 quantizes its weights too and distills again, label-free, with the exact FA or
with FFA at k = 1, 5, 15. Columns 4W4A and 1W1A. Step 1 is shared by the rows of a column.

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
from faqd_tf.quantize import quantize_model  # noqa: E402

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
    "FFA k=1": {"fa": "fast", "ffa_k": 1},
    "FFA k=5": {"fa": "fast", "ffa_k": 5},
    "FFA k=15": {"fa": "fast", "ffa_k": 15},
}
FULL_COLUMNS = {"4W4A": (4, 4), "1W1A": (1, 1)}
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

    def optimizer(self, kind, lr, epochs, steps, weight_decay=0.0):
        train = resolve_section("train", {"optimizer": kind, "lr": lr, "epochs": epochs, "weight_decay": weight_decay})
        return make_optimizer(train, steps)

    def steps(self, full=False):
        n = self.args.pretrain_limit or 60000 if full else min(self.args.subset, 60000)
        return -(-n // self.args.batch_size)

    def pretrained(self, name, arch, epochs):
        """The teacher or the pre-trained FP student: trained once with labels on all images, cached."""
        path = os.path.join(self.args.out_dir, f"{name}.keras")
        if os.path.exists(path):
            return keras.models.load_model(path, safe_mode=True)
        say(f"{name}: training a full-precision {arch} with labels for {epochs} epochs on the training images")
        steps = self.steps(full=True)
        model = self.build(arch, 0)
        model.compile(self.optimizer("sgd", 0.1, epochs, steps, 5e-4),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        model.fit(self.train_ds(True, 0, full=True), epochs=epochs, verbose=2)
        save_model(model, path)
        return model

    # --- cells

    def run(self):
        a = self.args
        self.teacher = self.pretrained("teacher", TEACHER, a.teacher_epochs)
        self.fp_student = self.pretrained("fp_student", STUDENT, a.fp_epochs)
        for name, model in (("teacher", self.teacher), ("fp_student", self.fp_student)):
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
            if "full" in a.tables:
                for column, (w, act) in FULL_COLUMNS.items():
                    for row in self.rows(FULL_ROWS):
                        self.record(self.cell("full", "fine-tune", row, column, seed),
                                    lambda r=row, w=w, act=act, s=seed: self.full_cell(r, w, act, s))

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
        fitted.fit(ds, epochs=epochs, verbose=2)
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

    def activation_student(self, act, seed):
        """Step 1 of full quantization, shared by the rows of a column: A-bit activations, FP weights."""
        cell = self.cell("full", "fine-tune", "step 1: activations only", f"{act}A32W", seed)
        path = os.path.join(self.args.out_dir, f"act{act}_seed{seed}.keras")

        def train():
            a = self.args
            student = quantize_model(self.fp_student, weight_bits=None, activation_bits=act)
            recipe = self.recipe({"kd": None, "beta": "beta", "gamma": 0, "fa": "exact"}, "fine-tune")
            opt = self.optimizer("adam", a.finetune_lr, a.finetune_epochs, self.steps())
            seconds = self.fit(student, opt, self.train_ds(False, seed), a.finetune_epochs, recipe, self.teacher, seed)
            save_model(student, path)
            return student, a.finetune_epochs, seconds

        if not os.path.exists(path):
            self.done.discard(self.key(cell))
            self.record(cell, train)
        return keras.models.load_model(path, safe_mode=True)

    def full_cell(self, row, weight_bits, act, seed):
        a = self.args
        step1 = self.activation_student(act, seed)
        keras.utils.set_random_seed(seed)
        student = quantize_model(step1, weight_bits=weight_bits, activation_bits=act, per_channel=a.per_channel)
        recipe = self.recipe({"kd": None, "beta": "beta", "gamma": 0, **FULL_ROWS[row]}, "fine-tune")
        opt = self.optimizer("adam", a.finetune_lr, a.finetune_epochs, self.steps())
        seconds = self.fit(student, opt, self.train_ds(False, seed), a.finetune_epochs, recipe, self.teacher, seed)
        return student, a.finetune_epochs, seconds


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
    for column in FULL_COLUMNS:
        exact = mean("full", "fine-tune", "FAQD, exact FA", column)
        for k in (1, 5, 15):
            diff(f"full {column}: FFA k={k} minus exact FA (k=15 comparable)",
                 mean("full", "fine-tune", f"FFA k={k}", column), exact, "k=1 noisy, k=15 within ~0.5 point")
    return out


def plot(stats, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("weight", "fine-tune", [r for r in WEIGHT_ROWS if r != "FP student"], ["1-bit", "2-bit", "4-bit"]),
              ("weight", "end-to-end", [r for r in WEIGHT_ROWS if r != "FP student"], ["1-bit", "2-bit", "4-bit"]),
              ("full", "fine-tune", list(FULL_ROWS), list(FULL_COLUMNS))]
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
        ax.set_title({"weight": "weights only", "full": "full quantization, two-step"}[table] + f", {init}")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False)
    fig.suptitle("FAQD ablations on Fashion-MNIST: ResNet14 teacher, ResNet8 students (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
        f"TensorFlow {tf_version()}, Keras {keras.__version__}; training settings: " + json.dumps(
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
    if any(k[0] == "full" for k in stats):
        parts += ["## Full quantization, fine-tuned in two steps (label-free)", "",
                  table_md(stats, "full", "fine-tune", ["step 1: activations only"], ["4A32W", "1A32W"]), "",
                  table_md(stats, "full", "fine-tune", list(FULL_ROWS), list(FULL_COLUMNS)), "",
                  "Seconds per epoch of step 2 (the FA/FFA cost, Table VII): " + ", ".join(
                      f"{r} {c}: {np.mean([float(x['sec_per_epoch']) for x in cells if x['row'] == r and x['column'] == c]):.1f}"
                      for r in FULL_ROWS for c in FULL_COLUMNS
                      if any(x["row"] == r and x["column"] == c for x in cells)), ""]
    fa_png = os.path.splitext(png)[0] + "_fa.png"
    fa_parts = fa_md(cells)
    if fa_parts:
        parts += fa_parts + [f"![FA effect]({os.path.basename(fa_png)})", ""]
    parts += ["## Differences behind the paper's claims", "", *claims(stats), "", f"![bar chart]({os.path.basename(png)})", ""]
    os.makedirs(os.path.dirname(os.path.abspath(md)), exist_ok=True)
    with open(md, "w") as f:
        f.write("\n".join(parts))
    if stats:
        plot(stats, png)
    if fa_parts:
        plot_fa(cells, fa_png)
    say(f"report written to {md} and {png}")


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
