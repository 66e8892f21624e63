"""FAQD against KD only at a budget long enough to resolve FA's effect, paired by seed (issue 24).

Not run in CI: about 7-20 hours of CPU here. Every cell is one run of the library's own pipeline,
`train.py --config configs/quickstart.json` (stages distill and evaluate) with the pinned teacher
`docs/budget/teacher.keras` (the quickstart's FP ResNet8, trained once and committed so that cells
run in different sessions distill from the same network), on all 60,000 Fashion-MNIST training
images, label-free, scored on the 10,000 test images after every epoch (`history.csv`) and at the end:

- `fine-tune`: the teacher's weights quantized to 2 and 4 bits, KL (T = 4), SGD Nesterov lr 0.01,
  cosine, weight decay 1e-4, `--finetune-epochs` (15) epochs (the quickstart's recipe, longer);
- `end-to-end`: a fresh 2-bit ResNet8, MSE on logits, SGD Nesterov lr 0.01, cosine over the run,
  weight decay 1e-4 (the authors' weight-quantization schedule, lzj994/FAQD), `--e2e-epochs` (30).

Arms: `KD only` (`distill.fa = null`) and `FAQD` (exact FA, fro2, the default beta). A seed fixes the
student's initial weights and the data order, so the two arms of a seed differ only in the loss.

A killed cell resumes from its last finished epoch when this command runs again (the runner's
epoch backups); a finished cell is never rerun. Each finished cell appends its row to `--csv`
(`table,init,row,column,seed,accuracy,epochs,steps,seconds,sec_per_epoch`, as the other reproduce
CSVs) and its per-epoch test accuracy to `--curves`. `--workers 2` runs two cells at once, each on
one thread (more steps per second on this 2-core machine than one cell on two threads).

    python benchmarks/budget.py --workers 2 --out-dir /work/runs/budget
    python benchmarks/budget.py --report-only --md docs/budget.md --png docs/budget.png
"""

import argparse
import dataclasses
import os
import sys

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import ROOT, append_rows, read_rows, run_train  # noqa: E402
from benchmarks.reproduce_cells import FIELDS  # noqa: E402

DOCS = os.path.join(_harness.DOCS, "budget")
TEACHER = os.path.join(DOCS, "teacher.keras")
CELL_FIELDS = FIELDS  # the reproduce CSV's columns: budget_report reads both alike
CURVE_FIELDS = ["init", "bits", "arm", "seed", "epoch", "val_accuracy", "kd", "fa", "loss"]
ARMS = {"KD only": None, "FAQD": "exact"}


@dataclasses.dataclass(frozen=True)
class Cell:
    init: str  # "fine-tune" or "end-to-end"
    bits: int
    arm: str  # a key of ARMS
    seed: int
    epochs: int

    @property
    def name(self):
        arm = "kd" if self.arm == "KD only" else "faqd"
        return f"{self.init}_{self.bits}bit_{arm}_seed{self.seed}_{self.epochs}ep"

    @classmethod
    def from_name(cls, name):
        """The cell whose `name` (its output folder's) is `name`."""
        init, bits, arm, seed, epochs = name.rsplit("_", 4)
        return cls(
            init,
            int(bits.removesuffix("bit")),
            "KD only" if arm == "kd" else "FAQD",
            int(seed.removeprefix("seed")),
            int(epochs.removesuffix("ep")),
        )

    def overrides(self):
        """The `--set` values of this cell on top of configs/quickstart.json."""
        fine_tune = self.init == "fine-tune"
        return {
            "teacher.file": TEACHER,
            "student.init": "teacher" if fine_tune else "scratch",
            "student.weight_bits": self.bits,
            "distill.fa": ARMS[self.arm],
            "distill.kd": "kl" if fine_tune else "mse",
            "distill.temperature": 4.0 if fine_tune else 1.0,
            "train.epochs": self.epochs,
            "train.lr": 0.01,
            "train.weight_decay": 1e-4,
            "seed": self.seed,
        }


def cells(args):
    """Every cell, setting by setting (the order of the bit lists), each setting's seeds together:
    a setting's paired rows finish before the next setting starts."""
    settings = [("fine-tune", bits, args.finetune_epochs) for bits in args.finetune_bits]
    settings += [("end-to-end", bits, args.e2e_epochs) for bits in args.e2e_bits]
    return [
        Cell(init, bits, arm, seed, epochs)
        for init, bits, epochs in settings
        for seed in args.seeds
        for arm in ARMS
    ]


def done(cell, rows):
    return any(
        (r["init"], r["row"], r["column"], r["seed"], r["epochs"])
        == (cell.init, cell.arm, f"{cell.bits}-bit", str(cell.seed), str(cell.epochs))
        for r in rows
    )


def run_cell(cell, args):
    """Runs (or resumes) one cell through train.py; returns its cell row and curve rows."""
    results, history, seconds, ran = run_train(
        os.path.join(args.out_dir, cell.name), cell.overrides(), args.workers
    )
    steps = cell.epochs * -(-60000 // 128)
    row = dict(
        table="budget",
        init=cell.init,
        row=cell.arm,
        column=f"{cell.bits}-bit",
        seed=cell.seed,
        accuracy=round(results["student"]["accuracy"], 4),
        epochs=cell.epochs,
        steps=steps,
        seconds=round(seconds, 1),
        sec_per_epoch=round(seconds / ran, 1),
    )
    curve = [
        dict(
            init=cell.init,
            bits=cell.bits,
            arm=cell.arm,
            seed=cell.seed,
            epoch=int(h["epoch"]) + 1,
            val_accuracy=round(float(h["val_accuracy"]), 4),
            kd=h.get("kd", ""),
            fa=h.get("fa", ""),
            loss=h.get("loss", ""),
        )
        for h in history
    ]
    return row, curve


def ensure_teacher():
    """The pinned teacher: the quickstart's FP ResNet8 (trained here once if the file is missing)."""
    if not os.path.exists(TEACHER):
        import shutil

        from benchmarks import real_pairs

        os.makedirs(DOCS, exist_ok=True)
        shutil.copyfile(real_pairs.quickstart_teacher(), TEACHER + ".part")
        os.replace(TEACHER + ".part", TEACHER)
    return TEACHER


def run(args):
    ensure_teacher()
    todo = [c for c in cells(args) if not done(c, read_rows(args.csv))]
    print(
        f"[budget] {len(todo)} cells to run ({len(cells(args)) - len(todo)} finished)", flush=True
    )
    jobs = [lambda c=c: (c, *run_cell(c, args)) for c in todo]
    for cell, row, curve in _harness.pool_run(jobs, args.workers, "budget"):
        append_rows(args.csv, CELL_FIELDS, [row])
        append_rows(args.curves, CURVE_FIELDS, curve)
        print(
            f"[budget] {cell.name}: {100 * row['accuracy']:.2f}% ({row['sec_per_epoch']} s/epoch)",
            flush=True,
        )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--finetune-bits", type=int, nargs="*", default=[4, 2])
    p.add_argument("--e2e-bits", type=int, nargs="*", default=[2])
    p.add_argument("--finetune-epochs", type=int, default=15)
    p.add_argument("--e2e-epochs", type=int, default=30)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default=os.path.join(ROOT, "saved_models", "budget"))
    p.add_argument("--csv", default=os.path.join(DOCS, "cells.csv"))
    p.add_argument("--curves", default=os.path.join(DOCS, "curves.csv"))
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    if not args.report_only:
        run(args)
    if args.md or args.png:
        from benchmarks import budget_report

        budget_report.write(
            read_rows(args.csv),
            read_rows(args.curves),
            args.md,
            args.png,
            "python benchmarks/budget.py " + " ".join(sys.argv[1:]),
            read_rows(os.path.join(DOCS, "fa_distance.csv")),
        )


if __name__ == "__main__":
    main()
