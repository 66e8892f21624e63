"""The cells of `benchmarks/reproduce.py`: what a cell is (`Cell`, `Recipe`, `Schedule`), the names of
its tables, rows and columns, and the CSV they are recorded in. Shared by the running
(`reproduce.py`) and the reporting (`reproduce_report.py`); loads no TensorFlow.

A cell's CSV key is `(table, init, row, column, seed)`; its CSV row adds `accuracy, epochs, steps,
seconds, sec_per_epoch` (`FIELDS`).
"""

import dataclasses
import os
import time

TEACHER, STUDENT = "resnet14", "resnet8"
FIELDS = [
    "table",
    "init",
    "row",
    "column",
    "seed",
    "accuracy",
    "epochs",
    "steps",
    "seconds",
    "sec_per_epoch",
]
INIT_KD = {"fine-tune": "kl", "end-to-end": "mse"}
"""The KD of each initialization, as the paper prescribes."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The loss of a row.

    Attributes:
        teacher: distilled from the teacher; False trains on labels alone (CE, no KD).
        kd: `"mse"` or `"kl"`; None takes the initialization's (`INIT_KD`).
        fa: `"exact"`, `"fast"` or None (no FA term).
        fa_norm, ffa_k: as for the `Distiller`.
        labels: a CE term (weight `--gamma`) on labeled batches.
    """

    teacher: bool = True
    kd: str | None = None
    fa: str | None = None
    fa_norm: str = "fro2"
    ffa_k: int = 15
    labels: bool = False


WEIGHT_ROWS = {
    "FP student": None,  # fine-tune: the pre-trained FP student; end-to-end: QAT's recipe at full precision
    "QAT (CE only, no teacher)": Recipe(teacher=False, labels=True),
    "QD (KL + CE)": Recipe(kd="kl", labels=True),
    "QD (MSE + CE)": Recipe(kd="mse", labels=True),
    "KD only, label-free": Recipe(),
    "FAQD fro2, label-free": Recipe(fa="exact", fa_norm="fro2"),
    "FAQD l1, label-free": Recipe(fa="exact", fa_norm="l1"),
    "FAQD with labels": Recipe(fa="exact", fa_norm="fro2", labels=True),
}
"""Rows of the weight table (Tables I-IV), by name, with their loss."""
FAQD_ROWS = {"fro2": "FAQD fro2, label-free", "l1": "FAQD l1, label-free"}
BASELINE_ROW = "KD only, label-free"
FULL_ROWS = {
    "FAQD, exact FA": Recipe(fa="exact"),
    BASELINE_ROW: Recipe(),
    "FFA k=1": Recipe(fa="fast", ffa_k=1),
    "FFA k=5": Recipe(fa="fast", ffa_k=5),
    "FFA k=15": Recipe(fa="fast", ffa_k=15),
}
"""Rows of the full-quantization table (Tables VI-VII)."""
FULL_MAIN = "FAQD, exact FA"
FULL_COLUMNS = {"FP": (None, None), "4W4A": (4, 4), "1W1A": (1, 1)}
"""(weight bits, activation bits) of each full-quantization column."""
STEP1_ROWS = {False: "step 1: activations only", True: "step 1: activations only, KD only"}
"""The row of a two-step cell's first step, by whether its row is KD only."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """How a cell trains: the optimizer (`train.optimizer`: SGD Nesterov 0.9 or AdamW, cosine to 0)."""

    optimizer: str
    lr: float
    epochs: int
    weight_decay: float = 0.0
    clipnorm: float | None = None


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a table at one seed, and everything it is trained with.

    Attributes:
        table, init, row, column, seed: the CSV key.
        recipe: the loss.
        schedule: the optimizer and epochs.
        start: the file the student is quantized from (fine-tune); None builds a fresh `arch`.
        arch: the student's architecture when it starts fresh.
        weight_bits, activation_bits: its quantization (None: full precision).
        per_channel: per-channel weight scales.
        beta: the FA weight; None is the norm's measured default.
        step1: a full fine-tune cell's first step (the cell whose student `start` is).
    """

    table: str
    init: str
    row: str
    column: str
    seed: int
    recipe: Recipe
    schedule: Schedule
    start: str | None = None
    arch: str = STUDENT
    weight_bits: int | None = None
    activation_bits: int | None = None
    per_channel: bool = False
    beta: float | None = None
    step1: "Cell | None" = None

    @property
    def key(self) -> tuple:
        return (self.table, self.init, self.row, self.column, self.seed)

    @property
    def name(self) -> str:
        """A folder name of the cell (its key)."""
        return slug(f"{self.table}_{self.init}_{self.row}_{self.column}_seed{self.seed}")


def say(message: str) -> None:
    print(f"[reproduce {time.strftime('%H:%M:%S')}] {message}", flush=True)


def cells_path(args) -> str:
    """The CSV of `reproduce.py`'s arguments: `--csv`, or `<out-dir>/cells.csv`."""
    return args.csv or os.path.join(args.out_dir, "cells.csv")


def key_of(row: dict) -> tuple:
    """The key of a CSV row."""
    return (row["table"], row["init"], row["row"], row["column"], int(row["seed"]))


def sweep_row(norm: str, beta: float) -> str:
    return f"{norm} beta={beta:g}"


def fp_reference(arch: str) -> str:
    """The reference row of the pre-trained FP `arch` student."""
    return "fp_student" if arch == STUDENT else f"fp_{arch}"


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text)
