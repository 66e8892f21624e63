"""The report of `benchmarks/binary.py`: the factor table, the budget table and the budget's curves.

python benchmarks/binary.py report --md docs/binary.md --png docs/binary.png
"""

import os
import platform

import numpy as np

from benchmarks import _harness
from benchmarks._harness import (
    format_interval,
    mean_interval,
    mean_std,
    pyplot,
    read_rows,
    write_text,
)

DOCS = os.path.join(_harness.DOCS, "binary")
METRICS = (
    ("accuracy", "as trained (headline)"),
    ("accuracy_last3", "last 3 epochs"),
    ("accuracy_recal", "after BN recalibration"),
)


def factor_table(rows):
    """Each factor against `base` of the same width, epochs and seed (paired), per metric."""
    lines = [
        "| width | epochs | factor | accuracy % per seed (as trained) | minus base, as trained (95% CI) | "
        "minus base, last 3 epochs | minus base, after BN recalibration | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["width"], r["epochs"]) for r in rows})
    for width, epochs in keys:
        mine = [r for r in rows if (r["width"], r["epochs"]) == (width, epochs)]
        base = {r["seed"]: r for r in mine if r["factor"] == "base"}
        for factor in dict.fromkeys(r["factor"] for r in mine):
            cells = {r["seed"]: r for r in mine if r["factor"] == factor}
            seeds = sorted(cells, key=int)
            per_seed = " / ".join(f"{100 * float(cells[s]['accuracy']):.2f}" for s in seeds)
            stats = []
            for metric, _ in METRICS:
                paired = [
                    s for s in seeds if s in base and cells[s].get(metric) and base[s].get(metric)
                ]
                d = [100 * (float(cells[s][metric]) - float(base[s][metric])) for s in paired]
                stats.append("-" if factor == "base" else format_interval(mean_interval(d)))
            lines.append(
                f"| {width} | {epochs} | {factor} | {per_seed} | {' | '.join(stats)} | {len(seeds)} |"
            )
    return "\n".join(lines)


def fp_accuracy(cells):
    """The FP student's test accuracy (0-1) from its `FP` row."""
    fp = [float(c["accuracy"]) for c in cells if c["row"] == "FP"]
    return fp[0] if fp else float("nan")


def budget_table(cells):
    """KD only and FAQD per (recipe, width), and FAQD minus KD only paired by seed, per metric."""
    lines = [
        "| recipe | width | epochs a step | FP | KD only (mean ± std) | FAQD (mean ± std) | KD only minus FP | "
        "FAQD minus KD only: as trained (headline) | last 3 epochs | after BN recalibration | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    fp = 100 * fp_accuracy(cells)
    for table, column, epochs in sorted(
        {(c["table"], c["column"], c["epochs"]) for c in cells if c["row"] != "FP"}
    ):
        mine = [
            c for c in cells if (c["table"], c["column"], c["epochs"]) == (table, column, epochs)
        ]
        arm = {a: {c["seed"]: c for c in mine if c["row"] == a} for a in ("KD only", "FAQD")}
        acc = {a: np.array([100 * float(c["accuracy"]) for c in arm[a].values()]) for a in arm}
        seeds = sorted(set(arm["KD only"]) & set(arm["FAQD"]), key=int)
        stats = [
            format_interval(
                mean_interval(
                    [100 * (float(arm["FAQD"][s][m]) - float(arm["KD only"][s][m])) for s in seeds]
                )
            )
            for m, _ in METRICS
        ]
        gap = f"{acc['KD only'].mean() - fp:+.2f}" if len(acc["KD only"]) else "-"
        lines.append(
            f"| {table.removeprefix('binary ')} | {column} | {epochs} | {fp:.2f} | {mean_std(acc['KD only'])} | "
            f"{mean_std(acc['FAQD'])} | {gap} | {' | '.join(stats)} | {len(seeds)} |"
        )
    return "\n".join(lines)


def plot_factors(rows, path):
    """Each factor's paired difference from `base` (points, as trained), one dot a seed, per width."""
    plt = pyplot()
    widths = sorted({r["width"] for r in rows})
    fig, axes = plt.subplots(1, len(widths), figsize=(6 * len(widths), 4), squeeze=False)
    for ax, width in zip(axes[0], widths):
        mine = [r for r in rows if r["width"] == width]
        base = {r["seed"]: float(r["accuracy"]) for r in mine if r["factor"] == "base"}
        factors = [f for f in dict.fromkeys(r["factor"] for r in mine) if f != "base"]
        for i, factor in enumerate(factors):
            d = [
                100 * (float(r["accuracy"]) - base[r["seed"]])
                for r in mine
                if r["factor"] == factor and r["seed"] in base
            ]
            ax.scatter([i] * len(d), d, color="tab:blue")
            ax.plot([i - 0.2, i + 0.2], [np.mean(d)] * 2, color="black")
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(factors)), factors, rotation=30)
        ax.set_ylabel("minus base, points (as trained; one dot a seed)")
        ax.set_title(f"{width}, KD only, 2 epochs")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot(curves, fp, path):
    plt = pyplot()
    panels = sorted({(c["recipe"], c["column"]) for c in curves})
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(max(8, 5 * len(panels)), 4.5), squeeze=False)
    for ax, (recipe, column) in zip(axes[0], panels):
        for arm, color in (("KD only", "tab:blue"), ("FAQD", "tab:orange")):
            for seed in sorted(
                {
                    c["seed"]
                    for c in curves
                    if (c["recipe"], c["column"], c["row"]) == (recipe, column, arm)
                }
            ):
                got = sorted(
                    (int(c["epoch"]), 100 * float(c["val_accuracy"]))
                    for c in curves
                    if (c["recipe"], c["column"], c["row"], c["seed"])
                    == (recipe, column, arm, seed)
                )
                ax.plot(*zip(*got), color=color, alpha=0.7, label=f"{arm}" if seed == "0" else None)
        ax.axhline(100 * fp, color="gray", ls="--", label="FP")
        binary_acts = column == "1W1A"
        if binary_acts:  # its collapses go down to chance
            ax.axhline(10, color="gray", ls=":", label="chance")
        ax.set_ylim(0 if binary_acts else 70, 93)
        ax.set_title(f"{column}, recipe {recipe}")
        ax.set_xlabel("epoch of the second step (1-bit weights too)" if binary_acts else "epoch")
        ax.set_ylabel("test accuracy %, one line a seed")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        "Label-free binary ResNet8 from the FP ResNet8 teacher, Fashion-MNIST (60,000 images)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def alpha_section(rows):
    """The `alpha` diagnostic: each variant's accuracy and alphas at the end of each step."""
    if not rows:
        return ""
    lines = [
        "## 1W1A: what collapses the second step (KD only, seed 0)",
        "",
        "`python benchmarks/binary.py alpha --seed 0 --epochs 15 --variants ...` (recipe stem8): "
        "one first step (1-bit activations, FP weights; `shared`), then the second step (1-bit "
        "weights too) from it in each variant: `learned` the authors' alpha rule, `frozen` the "
        "first step's alphas kept (`student.freeze_alpha_in_step2`), `lr0.001` the alphas learned "
        "at a tenth of the learning rate, `frozen+lr0.001` both. Every epoch in "
        "`docs/binary/alpha.csv`; plot binary_alpha.png; each saved student's quantized ReLUs in "
        "`docs/binary/alpha_units.csv`.",
        "",
        "| variant | step | epochs | best accuracy % (epoch) | last accuracy % | KD loss first / last "
        "| alpha min / mean / max, last epoch |",
        "|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for step in ("1", "2"):
            got = [r for r in rows if (r["variant"], r["step"]) == (variant, step)]
            if not got:
                continue
            got.sort(key=lambda r: int(r["epoch"]))
            best = max(got, key=lambda r: float(r["val_accuracy"]))
            last = got[-1]
            alphas = " / ".join(
                f"{float(last[k]):.3f}" if last.get(k) else "-"
                for k in ("alpha_min", "alpha_mean", "alpha_max")
            )
            lines.append(
                f"| {variant} | {step} | {len(got)} | {100 * float(best['val_accuracy']):.2f} "
                f"({best['epoch']}) | {100 * float(last['val_accuracy']):.2f} | "
                f"{float(got[0]['kd']):.3f} / {float(last['kd']):.3f} | {alphas} |"
            )
    return "\n".join([*lines, "", "![alpha](binary_alpha.png)", ""])


def plot_alpha(rows, path):
    """Accuracy and alpha_min/mean/max against the epoch of both steps, one colour a variant."""
    plt = pyplot()
    fig, (acc, alpha) = plt.subplots(1, 2, figsize=(11, 4.2))
    steps1 = max((int(r["epoch"]) for r in rows if r["step"] == "1"), default=0)
    colors = iter(["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown"])
    for variant in dict.fromkeys(r["variant"] for r in rows):
        color = "black" if variant == "shared" else next(colors)
        got = sorted(
            (int(r["epoch"]) + (steps1 if r["step"] == "2" else 0), r)
            for r in rows
            if r["variant"] == variant
        )
        if not got:
            continue
        xs = [x for x, _ in got]
        acc.plot(xs, [100 * float(r["val_accuracy"]) for _, r in got], color=color, label=variant)
        for key, style in (("alpha_min", ":"), ("alpha_mean", "-"), ("alpha_max", ":")):
            if all(r.get(key) for _, r in got):
                alpha.plot(
                    xs,
                    [float(r[key]) for _, r in got],
                    color=color,
                    ls=style,
                    label={"alpha_min": f"{variant} min, max", "alpha_mean": f"{variant} mean"}.get(
                        key
                    ),
                )
    for ax in (acc, alpha):
        ax.axvline(steps1 + 0.5, color="gray", ls="--", lw=0.8)
        ax.set_xlabel("epoch (step 1, then step 2 after the dashed line)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    acc.set_ylabel("test accuracy %")
    alpha.set_ylabel("alpha of the quantized ReLUs")
    fig.suptitle(
        "1W1A ResNet8, KD only, seed 0: alphas learned or kept in the second step", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(md, png, command):
    factors = read_rows(os.path.join(DOCS, "factors.csv"))
    cells = read_rows(os.path.join(DOCS, "cells.csv"))
    curves = read_rows(os.path.join(DOCS, "curves.csv"))
    alphas = read_rows(os.path.join(DOCS, "alpha.csv"))
    text = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores. Every cell: `train.py` with "
            "configs/quickstart.json, the pinned teacher docs/budget/teacher.keras (FP ResNet8, "
            "the `FP` row), all 60,000 training images, label-free, 1-bit fine-tune from the "
            "teacher's weights. Headline metric (named before the runs): test accuracy as trained "
            "at the last epoch; beside it the mean of the last three epochs and the accuracy "
            "after recalibrating the BN statistics on 6,400 unlabeled training images. "
            "Differences are paired by seed (same initial weights and data order), 95% "
            "t-intervals.",
            "",
            "## Factors (KD only, one factor at a time)",
            "",
            factor_table(factors),
            "",
            "![factors](binary_factors.png)",
            "",
            "## Budget (KD only against FAQD)",
            "",
            budget_table(cells),
            "",
            alpha_section(alphas),
        ]
    )
    write_text(md, text)
    print(text)
    if png and factors:
        plot_factors(factors, png.replace(".png", "_factors.png"))
    if png and curves:
        plot(curves, fp_accuracy(cells), png)
    if png and alphas:
        plot_alpha(alphas, png.replace(".png", "_alpha.png"))
