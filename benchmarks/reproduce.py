"""The paper's ablations (Tables I-IV, VI, VII) on Fashion-MNIST, with one teacher for every cell.

Not run in CI. Every cell runs through the library's own stages (`faqd_tf.runner.Run`: the
teacher stage for the pre-trained networks, the distill and evaluate stages for a cell), in this
process; `reproduce_cells.py` describes a cell (a dataclass), `reproduce_report.py` writes the report.
One full-precision teacher (ResNet14, trained with labels on the 60,000 training
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
A cell's stages write to ``<out-dir>/cells/<cell>``; a killed cell resumes from its last finished
epoch. Finished cells are appended to ``<out-dir>/cells.csv``, so an interrupted run continues where
it stopped and a later run with more seeds adds to it. A cell's ``seconds`` is the wall time of its
distill stage (loading, the gradient-share probe, training and the save); the rows "QAT" and "FP
student" (CE on labels, no teacher) run that stage with alpha 0 and gamma 1. At the end (and with ``--report-only``) the
script writes a markdown table (mean +- sample std over seeds, the number of seeds, epochs and
wall time per cell), the differences the paper's claims are about, and a bar chart.

    python benchmarks/reproduce.py --seeds 0 1 --md docs/reproduce.md --png docs/reproduce.png
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import reproduce_cells as rc  # noqa: E402
from benchmarks._harness import FMNIST, FMNIST_DIR, append_rows, read_rows  # noqa: E402
from benchmarks.reproduce_cells import Cell, Schedule, say  # noqa: E402
from faqd_tf import config as config_module  # noqa: E402
from faqd_tf.models import available  # noqa: E402
from faqd_tf.runner import DISTILL, EVALUATE, Run  # noqa: E402
from faqd_tf.runner import TEACHER as TEACHER_STAGE

# Settings that change a full-quantization cell, by (optimizer, init); a value other than the default
# names its table, so a cell's table says how it was trained.
FULL_SETTINGS = (
    "full_student",
    "subset",
    "batch_size",
    "full_weight_decay",
    "full_clipnorm",
    "alpha",
    "beta",
    "temperature",
    "per_channel",
)
FULL_INIT_SETTINGS = {
    ("sgd", "fine-tune"): ("finetune_epochs", "full_ft_lr"),
    ("sgd", "end-to-end"): ("e2e_epochs", "full_e2e_lr"),
    ("adam", "fine-tune"): ("finetune_epochs", "finetune_lr"),
    ("adam", "end-to-end"): ("e2e_epochs", "e2e_lr"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--tables",
        nargs="+",
        default=["weight", "sweep", "full"],
        choices=["weight", "sweep", "full"],
    )
    p.add_argument(
        "--inits", nargs="+", default=["fine-tune", "end-to-end"], choices=list(rc.INIT_KD)
    )
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 4, 8])
    p.add_argument(
        "--rows", nargs="+", default=None, help="only these rows (names as in the tables)"
    )
    p.add_argument(
        "--subset", type=int, default=6400, help="training images the students learn from"
    )
    p.add_argument(
        "--eval-limit", type=int, default=None, help="test images scored (default all 10,000)"
    )
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--teacher-epochs", type=int, default=3)
    p.add_argument(
        "--pretrain-limit",
        type=int,
        default=None,
        help="training images of the teacher and FP student (default all 60,000)",
    )
    p.add_argument("--fp-epochs", type=int, default=3, help="epochs of the pre-trained FP student")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--e2e-epochs", type=int, default=3)
    p.add_argument("--finetune-lr", type=float, default=3e-4, help="Adam, cosine to 0")
    p.add_argument("--e2e-optimizer", default="adam", choices=["adam", "sgd"])
    p.add_argument("--e2e-lr", type=float, default=3e-3)
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument(
        "--beta", type=float, default=None, help="FA weight (default: each norm's measured default)"
    )
    p.add_argument("--sweep-bits", type=int, default=2)
    p.add_argument("--sweep-fro2", type=float, nargs="+", default=[0.1, 1, 10, 100, 1000])
    p.add_argument("--sweep-l1", type=float, nargs="+", default=[0.01, 0.1, 1, 100, 1000])
    p.add_argument(
        "--full-optimizer",
        nargs="+",
        default=["sgd"],
        choices=["sgd", "adam"],
        help="optimizers of the full table (sgd: Nesterov 0.9, cosine; adam: --finetune-lr / --e2e-lr)",
    )
    p.add_argument(
        "--full-ft-lr",
        type=float,
        default=0.01,
        help="SGD learning rate of the full table, fine-tune",
    )
    p.add_argument(
        "--full-e2e-lr",
        type=float,
        default=0.03,
        help="SGD learning rate of the full table, end-to-end (0.1 lets FA drive alphas to their floor)",
    )
    p.add_argument(
        "--full-weight-decay",
        type=float,
        default=1e-4,
        help="weight decay of the full table; the alphas get it times 0.01 (set_alpha_decay)",
    )
    p.add_argument(
        "--full-clipnorm",
        type=float,
        default=None,
        help="clip the global gradient norm in the full table (train.global_clipnorm; the authors clip)",
    )
    p.add_argument(
        "--full-student",
        default=rc.STUDENT,
        choices=list(available()[:7]),
        help="student of the full table; another than resnet8 is pre-trained once, seed 1",
    )
    p.add_argument(
        "--full-columns",
        nargs="+",
        default=["4W4A", "1W1A"],
        choices=list(rc.FULL_COLUMNS),
        help="FP: an unquantized student of the same recipe (end-to-end only)",
    )
    p.add_argument(
        "--csv",
        default=None,
        help="cells file (default <out-dir>/cells.csv); commit it as it grows",
    )
    p.add_argument("--gamma", type=float, default=0.3)
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument(
        "--per-channel", action="store_true", help="per-channel weight scales (paper: layer-wise)"
    )
    p.add_argument("--out-dir", default="saved_models/reproduce")
    p.add_argument("--md", default=None, help="markdown report (default <out-dir>/reproduce.md)")
    p.add_argument("--png", default=None, help="bar chart (default <out-dir>/reproduce.png)")
    p.add_argument(
        "--report-only", action="store_true", help="write the report from cells.csv, train nothing"
    )
    return p.parse_args(argv)


class Bench:
    """Runs the cells of `args` through the library's stages and appends each finished one to the CSV.

    Args:
        args: `parse_args`'s namespace.
        callbacks: Keras callbacks added to every training stage (e.g. benchmarks/full_alphas.py's).
    """

    def __init__(self, args, callbacks=()):
        self.args = args
        os.makedirs(args.out_dir, exist_ok=True)
        self.csv_path = rc.cells_path(args)
        self.done = {rc.key_of(r) for r in read_rows(self.csv_path)}
        self.callbacks = list(callbacks)
        self._test = None

    # --- the pre-trained networks: the teacher stage

    def path(self, name):
        return os.path.join(self.args.out_dir, f"{name}.keras")

    def pretrained(self, name, arch, epochs, seed=0):
        """The teacher or a pre-trained FP student: trained once with labels on all images (the
        teacher stage), cached in `<out-dir>/<name>.keras`; returns its path."""
        a = self.args
        path = self.path(name)
        if not os.path.exists(path):
            say(
                f"{name}: training a full-precision {arch} with labels for {epochs} epochs on the training images"
            )
            self.run(
                {
                    "dataset": self.dataset(labels=True, limit=a.pretrain_limit),
                    "teacher": {
                        "arch": arch,
                        "file": path,
                        "train": {
                            "optimizer": "sgd",
                            "lr": 0.1,
                            "epochs": epochs,
                            "batch_size": a.batch_size,
                            "weight_decay": 5e-4,
                        },
                    },
                    "train": {"batch_size": a.batch_size},
                    "output_dir": os.path.join(a.out_dir, "pretrain", name),
                    "seed": seed,
                },
                [TEACHER_STAGE],
            )
        return path

    def pretrained_student(self, arch):
        """The pre-trained FP `arch` that two-step full quantization starts from (seed 1 for another
        arch than the student's, so that a ResNet14 student is not the teacher itself)."""
        if arch == rc.STUDENT:
            return self.path("fp_student")
        return self.pretrained(rc.fp_reference(arch), arch, self.args.fp_epochs, seed=1)

    # --- a cell: the distill and evaluate stages

    def dataset(self, labels, limit):
        a = self.args
        # No validation during training: the evaluate stage scores the test split once.
        return {
            "source": FMNIST,
            "labels": labels,
            "augment": False,
            "limit": limit,
            "eval_limit": a.eval_limit,
            "validation_split": None,
        }

    def config(self, cell: Cell, output_dir: str) -> dict:
        """The run config of `cell` (`faqd_tf.config`)."""
        a, r, s = self.args, cell.recipe, cell.schedule
        labels = r.labels or not r.teacher
        return {
            "dataset": self.dataset(labels=labels, limit=a.subset),
            "teacher": {"arch": None, "file": self.path("teacher")},
            "student": {
                "init": "file" if cell.start else "scratch",
                "file": cell.start,
                "arch": cell.arch,
                "weight_bits": cell.weight_bits,
                "activation_bits": cell.activation_bits,
                "per_channel": cell.per_channel,
                "two_step": False,
            },
            "distill": {
                # Labels alone (QAT, the FP student): CE at weight 1, the KD term at weight 0.
                "alpha": a.alpha if r.teacher else 0.0,
                "beta": (cell.beta if cell.beta is not None else a.beta) if r.fa else 0.0,
                "gamma": (a.gamma if r.teacher else 1.0) if labels else 0.0,
                "kd": r.kd or rc.INIT_KD[cell.init],
                "temperature": a.temperature,
                "fa": r.fa,
                "fa_norm": r.fa_norm,
                "ffa_k": r.ffa_k,
            },
            "train": {
                "optimizer": s.optimizer,
                "lr": s.lr,
                "epochs": s.epochs,
                "batch_size": a.batch_size,
                "weight_decay": s.weight_decay,
                "global_clipnorm": s.clipnorm,
            },
            "output_dir": output_dir,
            "seed": cell.seed,
        }

    def run(self, config, names, overwrite=False):
        """Runs the stages `names` of `config` that are missing or were interrupted; returns each
        one's wall time in seconds."""
        run = Run(config_module.resolve(config), overwrite=overwrite, callbacks=self.callbacks)
        planned = [name for name in run.plan("all") if name in names]
        seconds = {}
        try:
            run.preflight(planned)
            for name in planned:
                start = time.perf_counter()
                run.start([name])
                seconds[name] = time.perf_counter() - start
        finally:
            run.lock.release()
        import keras

        keras.backend.clear_session()  # a fresh graph for the next cell
        return seconds

    def output_dir(self, cell):
        return os.path.join(self.args.out_dir, "cells", cell.name)

    def student_file(self, cell):
        return os.path.join(self.output_dir(cell), "student.keras")

    def train(self, cell: Cell, output_dir=None, overwrite=False):
        """Runs `cell` (or resumes it); returns its test accuracy and the seconds of its distill stage."""
        out = output_dir or self.output_dir(cell)
        seconds = self.run(self.config(cell, out), [DISTILL, EVALUATE], overwrite)
        timing = os.path.join(out, "timing.json")
        if DISTILL in seconds:  # kept for a later run that only records it
            with open(timing, "w") as f:
                json.dump({"seconds": seconds[DISTILL]}, f)
        with open(timing) as f:
            distill_seconds = json.load(f)["seconds"]
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["student"]["accuracy"], distill_seconds

    def record(self, cell: Cell, keep=False):
        """Runs `cell` unless its row is in the CSV (or, with `keep`, its student file is missing:
        a later cell starts from it), and appends its row."""
        if cell.step1 is not None:
            self.record(cell.step1, keep=True)  # this cell starts from its student
        recorded = cell.key in self.done
        if recorded and not (keep and not os.path.exists(self.student_file(cell))):
            return
        say(f"{cell.table} | {cell.init} | {cell.row} | {cell.column} | seed {cell.seed}")
        accuracy, seconds = self.train(cell)
        epochs = cell.schedule.epochs
        say(f"  -> test accuracy {accuracy:.4f} ({epochs} epochs, {seconds:.0f} s)")
        if not recorded:
            self.append(
                {
                    "table": cell.table,
                    "init": cell.init,
                    "row": cell.row,
                    "column": cell.column,
                    "seed": cell.seed,
                    "accuracy": round(accuracy, 5),
                    "epochs": epochs,
                    "steps": epochs * self.steps(),
                    "seconds": round(seconds, 1),
                    "sec_per_epoch": round(seconds / epochs, 2),
                }
            )

    def record_reference(self, name, path):
        """The test accuracy of a pre-trained network, as a row of table `reference`."""
        key = ("reference", "-", name, "FP", 0)
        if key in self.done:
            return
        import keras

        from faqd_tf import data, models  # noqa: F401  (registers the custom layers)
        from faqd_tf.training import evaluate_classifier

        if self._test is None:
            self._test = data.load(FMNIST, "test", batch_size=500, limit=self.args.eval_limit)
        accuracy = evaluate_classifier(
            keras.models.load_model(path, safe_mode=True), self._test, verbose=0
        )["accuracy"]
        self.append(dict(zip(rc.FIELDS, (*key, round(float(accuracy), 5), 0, 0, 0.0, ""))))

    def append(self, row):
        append_rows(self.csv_path, rc.FIELDS, [row])
        self.done.add(rc.key_of(row))

    def steps(self):
        return -(-min(self.args.subset, 60000) // self.args.batch_size)

    # --- the tables' cells

    def run_all(self):
        a = self.args
        references = [
            ("teacher", self.pretrained("teacher", rc.TEACHER, a.teacher_epochs)),
            ("fp_student", self.pretrained("fp_student", rc.STUDENT, a.fp_epochs)),
        ]
        if "full" in a.tables and a.full_student != rc.STUDENT:
            references.append(
                (rc.fp_reference(a.full_student), self.pretrained_student(a.full_student))
            )
        for name, path in references:
            self.record_reference(name, path)
        for cell in self.cells():
            self.record(cell)

    def rows(self, table):
        return [r for r in table if self.args.rows is None or r in self.args.rows]

    def cells(self):
        """Every cell of the requested tables, seeds and rows, in the order they run."""
        a = self.args
        for seed in a.seeds:
            for init in a.inits if "weight" in a.tables else []:
                for row in self.rows(rc.WEIGHT_ROWS):
                    if row == "FP student":
                        if init == "end-to-end":  # QAT's recipe at full precision
                            yield self.weight_cell(
                                "weight", init, row, "FP", seed, "QAT (CE only, no teacher)", None
                            )
                        continue
                    for bits in a.bits:
                        yield self.weight_cell("weight", init, row, f"{bits}-bit", seed, row, bits)
            for init in a.inits if "sweep" in a.tables else []:
                for norm, betas in (("fro2", a.sweep_fro2), ("l1", a.sweep_l1)):
                    for beta in betas:
                        yield self.weight_cell(
                            "sweep",
                            init,
                            rc.sweep_row(norm, beta),
                            f"{a.sweep_bits}-bit",
                            seed,
                            rc.FAQD_ROWS[norm],
                            a.sweep_bits,
                            beta=beta,
                        )
            for optimizer in a.full_optimizer if "full" in a.tables else []:
                for init in a.inits:
                    for column in a.full_columns:
                        if column == "FP" and init == "fine-tune":
                            continue  # the pre-trained FP student is that reference
                        for row in self.rows(rc.FULL_ROWS):
                            if column == "FP" and rc.FULL_ROWS[row].fa == "fast":
                                continue
                            yield self.full_cell(init, row, column, seed, optimizer)

    def weight_cell(self, table, init, row, column, seed, recipe_row, bits, beta=None):
        """A cell of the weight or sweep table (activations FP): `recipe_row`'s loss at `bits`."""
        a = self.args
        if init == "fine-tune":
            schedule, start = (
                Schedule("adam", a.finetune_lr, a.finetune_epochs),
                self.path("fp_student"),
            )
        else:
            schedule, start = Schedule(a.e2e_optimizer, a.e2e_lr, a.e2e_epochs), None
        return Cell(
            table,
            init,
            row,
            column,
            seed,
            rc.WEIGHT_ROWS[recipe_row],
            schedule,
            start=start,
            weight_bits=bits,
            per_channel=a.per_channel and bits is not None,
            beta=beta,
        )

    def full_schedule(self, optimizer, init):
        a = self.args
        epochs = a.finetune_epochs if init == "fine-tune" else a.e2e_epochs
        if optimizer == "sgd":
            lr = a.full_ft_lr if init == "fine-tune" else a.full_e2e_lr
        else:
            lr = a.finetune_lr if init == "fine-tune" else a.e2e_lr
        # The stages give the alphas the authors' decay (weight_decay * 0.01, `set_alpha_decay`).
        return Schedule(optimizer, lr, epochs, a.full_weight_decay, a.full_clipnorm)

    def full_cell(self, init, row, column, seed, optimizer):
        """A cell of the full table: fine-tune in two steps (step 1: activations only, from the
        pre-trained FP student; KD only for the KD-only row, else exact FA, which the FFA rows share),
        end-to-end in one from random weights."""
        a = self.args
        table = full_table(a, optimizer, init)
        weight_bits, act = rc.FULL_COLUMNS[column]
        common = dict(
            weight_bits=weight_bits,
            activation_bits=act,
            per_channel=a.per_channel and weight_bits is not None,
        )
        if init == "end-to-end":
            return Cell(
                table,
                init,
                row,
                column,
                seed,
                rc.FULL_ROWS[row],
                self.full_schedule(optimizer, init),
                arch=a.full_student,
                **common,
            )
        kd_only = row == rc.BASELINE_ROW
        step1 = Cell(
            table,
            init,
            rc.STEP1_ROWS[kd_only],
            f"{act}A32W",
            seed,
            rc.FULL_ROWS[rc.BASELINE_ROW if kd_only else rc.FULL_MAIN],
            self.full_schedule(optimizer, init),
            start=self.pretrained_student(a.full_student),
            activation_bits=act,
        )
        return Cell(
            table,
            init,
            row,
            column,
            seed,
            rc.FULL_ROWS[row],
            self.full_schedule(optimizer, init),
            start=self.student_file(step1),
            step1=step1,
            **common,
        )


def full_table(args, optimizer, init):
    """The table name of full-quantization cells: the optimizer, then every setting of the cell off its default."""
    defaults = vars(parse_args([]))
    changed = [
        f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
        for k in FULL_SETTINGS + FULL_INIT_SETTINGS[optimizer, init]
        for v in [getattr(args, k)]
        if v != defaults[k]
    ]
    return ", ".join([f"full {optimizer}", *changed])


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isdir(FMNIST_DIR):
        sys.exit(
            "reproduce: Fashion-MNIST is missing; install the Debian package dataset-fashion-mnist "
            "(bash scripts/install.sh does)."
        )
    if not args.report_only:
        Bench(args).run_all()
    from benchmarks import reproduce_report

    reproduce_report.report(args)


if __name__ == "__main__":
    main()
