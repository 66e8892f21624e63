"""The report of `benchmarks/budget.py`: paired differences with 95% intervals, and the test curves.

python benchmarks/budget.py --report-only --md docs/budget.md --png docs/budget.png
"""

import os
import platform

import numpy as np

from benchmarks._harness import format_interval, mean_interval, mean_std, pyplot, write_text
from benchmarks.reproduce_report import paired_difference, verdict

ARMS = ("KD only", "FAQD")


def settings(cells):
    """(init, column, epochs) of every setting that has cells, in a fixed order."""
    keys = {(c["init"], c["column"], c["epochs"]) for c in cells}
    return sorted(keys, key=lambda k: (k[0] != "fine-tune", k[1], int(k[2])))


def flattens(curve, within=0.1):
    """The first epoch from which the mean curve stays within `within` points of its final value."""
    final = curve[-1]
    for i in range(len(curve)):
        if np.all(np.abs(np.asarray(curve[i:]) - final) <= within):
            return i + 1
    return len(curve)


def mean_curves(curves, init, bits, arm):
    """(epochs, mean, std, n) of the per-epoch test accuracy (points) over the seeds with whole curves."""
    by_seed = {}
    for r in curves:
        if (r["init"], int(r["bits"]), r["arm"]) == (init, bits, arm):
            by_seed.setdefault(int(r["seed"]), {})[int(r["epoch"])] = 100 * float(r["val_accuracy"])
    if not by_seed:
        return None
    length = max(len(v) for v in by_seed.values())
    whole = np.array(
        [[v[e] for e in range(1, length + 1)] for v in by_seed.values() if len(v) == length]
    )
    return (
        np.arange(1, length + 1),
        whole.mean(0),
        whole.std(0, ddof=1) if len(whole) > 1 else 0 * whole[0],
        len(whole),
    )


def last3(curves, init, bits, arm, seed):
    """Mean test accuracy (0-1) of the last three epochs of one cell's curve, or None."""
    got = sorted(
        (int(r["epoch"]), float(r["val_accuracy"]))
        for r in curves
        if (r["init"], int(r["bits"]), r["arm"], int(r["seed"])) == (init, bits, arm, seed)
    )
    return float(np.mean([a for _, a in got[-3:]])) if got else None


def recalibrated(fa_rows, init, bits, arm, seed):
    """Test accuracy (0-1) after BN recalibration (`benchmarks/budget_fa.py`'s rows), or None."""
    got = [
        float(r["accuracy_recal"])
        for r in fa_rows
        if (r["init"], int(r["bits"]), r["arm"], int(r["seed"])) == (init, bits, arm, seed)
    ]
    return got[0] if got else None


def _paired(score, seeds):
    """mean_interval of FAQD minus KD only (points) of `score(arm, seed)` over the seeds scored in both arms."""
    d = [
        100 * (score("FAQD", s) - score("KD only", s))
        for s in seeds
        if score("FAQD", s) is not None and score("KD only", s) is not None
    ]
    return mean_interval(d)


def table(cells, curves, fa_rows=()):
    """The headline (accuracy as trained at the last epoch, named before the runs) and beside it the
    mean of the last three epochs and the accuracy after BN recalibration, each paired by seed."""
    lines = [
        "| init | bits | epochs | KD only (mean ± std) | FAQD (mean ± std) | FAQD minus KD only (95% CI), "
        "as trained: the headline | n | verdict | last 3 epochs | after BN recalibration | "
        "KD only flattens at epoch |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for init, column, epochs in settings(cells):
        mine = [c for c in cells if (c["init"], c["column"], c["epochs"]) == (init, column, epochs)]
        acc = {
            arm: np.array([100 * float(c["accuracy"]) for c in mine if c["row"] == arm])
            for arm in ARMS
        }
        stat = paired_difference(
            mine, ("budget", init, "FAQD", column), ("budget", init, "KD only", column)
        )
        curve = mean_curves(curves, init, int(column.split("-")[0]), "KD only")
        flat = f"{flattens(curve[1])} of {len(curve[1])}" if curve else "-"
        if not stat:
            diff = "-"
        elif stat[2] < 2:  # one seed: no interval yet
            diff = f"**{stat[0]:+.2f}** (one seed, no interval)"
        else:
            diff = f"**{stat[0]:+.2f} ± {stat[1]:.2f}**"
        bits, seeds = int(column.split("-")[0]), sorted({int(c["seed"]) for c in mine})
        tail = _paired(lambda arm, seed: last3(curves, init, bits, arm, seed), seeds)
        recal = _paired(lambda arm, seed: recalibrated(fa_rows, init, bits, arm, seed), seeds)
        lines.append(
            f"| {init} | {column} | {epochs} | {mean_std(acc['KD only'])} | {mean_std(acc['FAQD'])} | {diff} | "
            f"{stat[2] if stat else 0} | {verdict(stat) if stat else '-'} | {format_interval(tail)} | "
            f"{format_interval(recal)} | {flat} |"
        )
    return "\n".join(lines)


def plot(cells, curves, path):
    plt = pyplot()
    panels = [(init, int(column.split("-")[0])) for init, column, _ in settings(cells)]
    panels = list(dict.fromkeys(panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (init, bits) in zip(axes[0], panels):
        for arm, color in zip(ARMS, ("tab:blue", "tab:orange")):
            got = mean_curves(curves, init, bits, arm)
            if got is None:
                continue
            epochs, mean, std, n = got
            ax.plot(epochs, mean, color=color, label=f"{arm} (n={n})")
            ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.25)
        ax.set_title(f"{init}, {bits}-bit weights")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy % (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        "Label-free 4/2-bit ResNet8 from the FP ResNet8 teacher,\nFashion-MNIST (60,000 images)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(cells, curves, md, png, command, fa_rows=()):
    cells = [c for c in cells if c["table"] == "budget"]
    text = "\n".join(
        [
            f"Command: `{command}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores. Every cell: `train.py` with "
            "configs/quickstart.json and the pinned teacher docs/budget/teacher.keras; accuracy "
            "on the 10,000 test images after the last epoch. Differences are paired by seed (same "
            "initial weights and data order). The CSV's `seconds` is the time of the invocation "
            "that finished a cell: a resumed cell's earlier epochs are not in it; `sec_per_epoch` "
            "divides it by the epochs that invocation ran (rows finished before commit 'budget: "
            "seconds per epoch run' divided it by all the cell's epochs, too low for a resumed "
            "cell). The headline metric is the accuracy as trained at the last epoch; the mean of "
            "the last three epochs (from the curves) and the accuracy after "
            "`recalibrate_batchnorm` (docs/budget/fa_distance.csv, `benchmarks/budget_fa.py`) are "
            "beside it.",
            "",
            table(cells, curves, fa_rows),
            "",
        ]
    )
    write_text(md, text)
    print(text)
    if png and cells:
        plot(cells, curves, png)
