"""Mixed widths under a size budget against uniform widths at the same packed size (issue 38, item 4).

Not run in CI (hours of CPU). Every cell is one run of the library's own pipeline, `train.py --config
configs/quickstart.json` (stages distill and evaluate), label-free, on all 60,000 Fashion-MNIST training
images, from the pinned teacher `docs/budget/teacher.keras`, with the 2/4-bit budget's fine-tune recipe
(`benchmarks/binary.py`'s BASE: KL T = 4, SGD Nesterov lr 0.01, cosine, weight decay 1e-4, 15 epochs)
and `student.size_budget_kb`: the student's widths are chosen by the distill stage itself (label-free
sensitivity on 512 training images, `allocate_bits`). The arm is KD only (`distill.fa` null) unless
`--arms` says otherwise, so that a cell pairs by seed with the uniform cells already run with the same
recipe: 2 and 4 bits in `docs/budget/cells.csv`, 1 bit (first conv at 8 bits) in `docs/binary/cells.csv`.
A seed fixes the initial weights (here the teacher's) and the data order.

The headline metric, named before the runs: **test accuracy as trained at the last epoch**, and its
paired difference from the uniform 2-bit student at that student's packed size (the goal: >= +0.5
points, mean over >= 3 seeds). `--sizes` takes kB values or the names `1-bit`, `2-bit`, `4-bit` (the
uniform student's packed size, as its summary counts it). Rows go to `docs/mixed/cells.csv` with the
budget's columns (`column` "mixed <kB>") and `packed_kb`, `layer_bits` (the choice, JSON). A killed cell
resumes from its last finished epoch; a finished one is never rerun.

    python benchmarks/mixed.py run --sizes 2-bit --seeds 0 1 2
    python benchmarks/mixed.py report --md docs/mixed.md --png docs/mixed.png
"""

import argparse
import functools
import json
import os
import sys

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness, binary  # noqa: E402
from benchmarks._harness import append_rows, read_rows, write_text  # noqa: E402
from benchmarks.budget import CELL_FIELDS as BUDGET_FIELDS  # noqa: E402
from benchmarks.budget import TEACHER, ensure_teacher  # noqa: E402

DOCS = os.path.join(_harness.DOCS, "mixed")
CSV = os.path.join(DOCS, "cells.csv")
FIELDS = [*BUDGET_FIELDS, "accuracy_last3", "accuracy_recal", "packed_kb", "layer_bits"]
ARMS = binary.ARMS
EPOCHS = 15
UNIFORM = {  # the uniform cells of the same recipe: (csv, table, column)
    "1-bit": (os.path.join(binary.DOCS, "cells.csv"), "binary stem8", "1-bit"),
    "2-bit": (os.path.join(_harness.DOCS, "budget", "cells.csv"), "budget", "2-bit"),
    "4-bit": (os.path.join(_harness.DOCS, "budget", "cells.csv"), "budget", "4-bit"),
}


@functools.cache  # each loads the teacher; the report asks for every width
def uniform_kb(bits):
    """The packed size (kB of 1024 bytes) of the teacher quantized uniformly to `bits` by
    `quantize_model`'s defaults (at 1 bit the first conv at 8), as its summary counts it."""
    import keras

    from faqd_tf.quantize import quantize_model
    from faqd_tf.summary import summary

    teacher = keras.models.load_model(TEACHER, safe_mode=True)
    return summary(quantize_model(teacher, weight_bits=bits), print_fn=None).packed_bytes / 1024


def size_kb(name):
    """`--sizes` value: a uniform width's packed size by name, or a number of kB."""
    if name in UNIFORM:
        return uniform_kb(int(name.split("-")[0]))
    return float(name)


def column(kb):
    return f"mixed {kb:.2f} kB"


def run(args):
    ensure_teacher()
    done = {(r["row"], r["column"], r["seed"]) for r in read_rows(CSV)}
    sizes = [size_kb(s) for s in args.sizes]
    todo = [
        (arm, kb, seed)
        for kb in sizes
        for seed in args.seeds
        for arm in args.arms
        if (arm, column(kb), str(seed)) not in done
    ]
    print(f"[mixed] {len(todo)} cells to run", flush=True)

    def job(arm, kb, seed):
        def cell():
            tag = "kd" if arm == "KD only" else "faqd"
            out = os.path.join(args.out_dir, f"{kb:.2f}kB_{tag}_seed{seed}_{EPOCHS}ep")
            values = {
                **binary.BASE,
                "student.weight_bits": 2,  # replaced layer by layer by the budget's choice
                "student.size_budget_kb": kb,
                "distill.fa": ARMS[arm],
                "train.epochs": EPOCHS,
                "seed": seed,
            }
            results, history, seconds, ran, recal = binary.run_train(out, values, args.workers)
            with open(os.path.join(out, "layer_bits.json")) as f:
                chosen = json.load(f)
            row = binary.cell_row(
                "mixed",
                arm,
                column(kb),
                seed,
                EPOCHS,
                EPOCHS * binary.STEPS_PER_EPOCH,
                results,
                history,
                seconds,
                ran,
                recal,
            )
            row.update(
                packed_kb=round(chosen["packed_kb"], 3),
                layer_bits=json.dumps(chosen["layer_bits"], separators=(",", ":")),
            )
            append_rows(CSV, FIELDS, [row])
            print(
                f"[mixed] {arm} {column(kb)} seed {seed}: {100 * row['accuracy']:.2f}% "
                f"({row['packed_kb']:.2f} kB packed)",
                flush=True,
            )

        return cell

    list(_harness.pool_run([job(*t) for t in todo], args.workers, "mixed"))


def report(args):
    import numpy as np

    mixed = read_rows(CSV)
    points = []  # (label, kB, {seed: accuracy})
    for name, (path, table, col) in UNIFORM.items():
        rows = [
            r
            for r in read_rows(path)
            if r["table"] == table
            and r["column"] == col
            and r["row"] == "KD only"
            and r["epochs"] == str(EPOCHS)
        ]
        if rows:
            points.append(
                (
                    f"uniform {name}",
                    uniform_kb(int(name[0])),
                    {r["seed"]: float(r["accuracy"]) for r in rows},
                )
            )
    for col in dict.fromkeys(r["column"] for r in mixed if r["row"] == "KD only"):
        rows = [r for r in mixed if r["column"] == col and r["row"] == "KD only"]
        kb = float(np.mean([float(r["packed_kb"]) for r in rows]))
        points.append((col, kb, {r["seed"]: float(r["accuracy"]) for r in rows}))
    fp = next(
        (
            float(r["accuracy"])
            for r in read_rows(os.path.join(binary.DOCS, "cells.csv"))
            if r["row"] == "FP"
        ),
        None,
    )
    two = next((p for p in points if p[0] == "uniform 2-bit"), None)
    lines = [
        "| student | packed kB | seeds | accuracy (mean ± std, %) | paired vs uniform 2-bit (points, 95% CI) |",
        "|---|---|---|---|---|",
    ]
    for label, kb, accs in sorted(points, key=lambda p: p[1]):
        vs = "-"
        if two is not None and label != two[0]:
            common = sorted(set(accs) & set(two[2]))
            vs = _harness.format_interval(
                _harness.mean_interval([100 * (accs[s] - two[2][s]) for s in common])
            )
        values = [100 * v for v in accs.values()]
        lines.append(f"| {label} | {kb:.2f} | {len(accs)} | {_harness.mean_std(values)} | {vs} |")
    if fp is not None:
        lines.append(f"| FP teacher | - | - | {100 * fp:.2f} | - |")
    table = "\n".join(lines)
    print(table)
    if args.md:
        write_text(args.md, table + "\n")
    if args.png:
        plt = _harness.pyplot()
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for label, kb, accs in points:
            values = 100 * np.array(list(accs.values()))
            style = "s" if label.startswith("uniform") else "o"
            ax.errorbar(
                kb,
                values.mean(),
                yerr=values.std(ddof=1) if len(values) > 1 else 0,
                fmt=style,
                capsize=3,
                label=f"{label} ({len(values)} seeds)",
            )
        if fp is not None:
            ax.axhline(100 * fp, color="gray", ls="--", lw=1, label="FP teacher")
        ax.set_xlabel("packed size (kB, as the summary counts it)")
        ax.set_ylabel("test accuracy as trained, last epoch (%)")
        ax.set_title("ResNet8 on Fashion-MNIST, KD only, 15 epochs: mixed vs uniform widths")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("run")
    s.add_argument("--sizes", nargs="+", default=["2-bit"])
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--arms", nargs="+", default=["KD only"], choices=list(ARMS))
    s.add_argument("--workers", type=int, default=1)
    s.add_argument("--out-dir", default="/work/runs/mixed")
    s = sub.add_parser("report")
    s.add_argument("--md", default=os.path.join(_harness.DOCS, "mixed.md"))
    s.add_argument("--png", default=os.path.join(_harness.DOCS, "mixed.png"))
    args = p.parse_args(argv)
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
