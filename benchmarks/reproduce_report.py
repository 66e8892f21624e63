"""The report of `benchmarks/reproduce.py`: markdown tables (mean +- sample std over seeds), the
differences the paper's claims are about, FA's effect paired by seed with 95% t-intervals, and the
bar charts, all from the cells CSV alone (`--report-only` rebuilds docs/reproduce*.md from the
committed CSVs). `paired_difference` and `verdict` serve `benchmarks/budget_report.py` too.

    python benchmarks/reproduce.py --report-only --tables full --csv docs/reproduce/full_cells.csv \
        --md docs/reproduce_full.md --png docs/reproduce.png
"""

import json
import os
import platform
import sys

import numpy as np

from benchmarks._harness import mean_interval, pyplot, read_rows, write_text
from benchmarks.reproduce_cells import (
    BASELINE_ROW,
    FAQD_ROWS,
    FULL_COLUMNS,
    FULL_MAIN,
    FULL_ROWS,
    INIT_KD,
    STEP1_ROWS,
    STUDENT,
    TEACHER,
    WEIGHT_ROWS,
    cells_path,
    fp_reference,
    say,
    sweep_row,
)


def summarize(cells):
    """{(table, init, row, column): (mean %, std %, n, epochs, mean seconds)} over seeds."""
    groups = {}
    for c in cells:
        groups.setdefault((c["table"], c["init"], c["row"], c["column"]), []).append(c)
    out = {}
    for key, group in groups.items():
        acc = np.array([float(c["accuracy"]) for c in group]) * 100
        secs = np.array([float(c["seconds"]) for c in group])
        out[key] = (
            acc.mean(),
            acc.std(ddof=1) if len(acc) > 1 else float("nan"),
            len(acc),
            int(group[0]["epochs"]),
            secs.mean(),
        )
    return out


def fmt(stat):
    if stat is None:
        return "-"
    mean, std, n, _, _ = stat
    return f"{mean:.2f}" + (f" ± {std:.2f}" if n > 1 else "") + f" (n={n})"


def table_md(stats, table, init, rows, columns, time_column=False):
    lines = [
        "| Method | " + " | ".join(columns) + " | epochs | s per run |",
        "|---|" + "---|" * (len(columns) + 2),
    ]
    for row in rows:
        found = [stats.get((table, init, row, c)) for c in columns]
        present = [s for s in found if s]
        if not present:
            continue
        epochs = present[0][3]
        secs = np.mean([s[4] for s in present])
        lines.append(
            f"| {row} | " + " | ".join(fmt(s) for s in found) + f" | {epochs} | {secs:.0f} |"
        )
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
                diff(
                    f"{where}: label-free FAQD ({norm}) minus label-free KD only (FA adds accuracy)",
                    mean(*w, faqd, bits),
                    mean(*w, BASELINE_ROW, bits),
                    "FA helps",
                )
            diff(
                f"{where}: label-free FAQD minus QAT with labels (beats supervised QAT)",
                mean(*w, FAQD_ROWS["fro2"], bits),
                mean(*w, "QAT (CE only, no teacher)", bits),
                "FAQD higher",
            )
            best_qd = [
                m
                for m in (mean(*w, "QD (KL + CE)", bits), mean(*w, "QD (MSE + CE)", bits))
                if m is not None
            ]
            if best_qd:
                diff(
                    f"{where}: label-free FAQD minus the better QD (beats supervised QD)",
                    mean(*w, FAQD_ROWS["fro2"], bits),
                    max(best_qd),
                    "FAQD higher",
                )
            diff(
                f"{where}: QD with MSE minus QD with KL (Table I: MSE better end-to-end)",
                mean(*w, "QD (MSE + CE)", bits),
                mean(*w, "QD (KL + CE)", bits),
                "MSE higher end-to-end, KL better fine-tuning",
            )
            fp = (
                mean("weight", "end-to-end", "FP student", "FP")
                if init == "end-to-end"
                else mean("reference", "-", "fp_student", "FP")
            )
            diff(
                f"{where}: label-free FAQD minus the FP student (nearly matches FP)",
                mean(*w, FAQD_ROWS["fro2"], bits),
                fp,
                "within about 2 points at 1 bit, at or above FP at 4 bits",
            )
    for table in full_tables(stats):
        for column in FULL_COLUMNS:
            exact = mean(table, "fine-tune", FULL_MAIN, column)
            for k in (1, 5, 15):
                diff(
                    f"{table} {column}: FFA k={k} minus exact FA (k=15 comparable)",
                    mean(table, "fine-tune", f"FFA k={k}", column),
                    exact,
                    "k=1 noisy, k=15 within ~0.5 point",
                )
    return out


def plot(stats, path):
    plt = pyplot()
    panels = [
        (
            "weight",
            "fine-tune",
            [r for r in WEIGHT_ROWS if r != "FP student"],
            ["1-bit", "2-bit", "4-bit"],
        ),
        (
            "weight",
            "end-to-end",
            [r for r in WEIGHT_ROWS if r != "FP student"],
            ["1-bit", "2-bit", "4-bit"],
        ),
    ]
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
            ax.bar(
                np.arange(len(columns)) + (i - (len(rows) - 1) / 2) * width,
                means,
                width,
                yerr=None if np.all(np.isnan(errs)) else np.nan_to_num(errs),
                capsize=2,
                label=row,
                color=f"C{list(WEIGHT_ROWS).index(row) if row in WEIGHT_ROWS else 7 + i}",
            )
        ref = stats.get(("reference", "-", "teacher", "FP"))
        if ref:
            ax.axhline(
                ref[0], color="black", linestyle="--", linewidth=1, label=f"teacher {ref[0]:.2f}"
            )
        fp = (
            stats.get(("reference", "-", "fp_student", "FP"))
            if init == "fine-tune"
            else stats.get(("weight", "end-to-end", "FP student", "FP"))
        )
        if fp:
            ax.axhline(
                fp[0], color="gray", linestyle=":", linewidth=1, label=f"FP student {fp[0]:.2f}"
            )
        ax.set_xticks(np.arange(len(columns)), columns)
        ax.set_xlim(-0.5, len(columns) - 0.5)
        ax.set_ylim(
            max(0, min(lows) - 3) if lows else 0,
            100 if not ref else max(ref[0], max(lows, default=0)) + 1.5,
        )
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"weights only, {init}")
        ax.legend(
            fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3, frameon=False
        )
    fig.suptitle(
        "FAQD ablations on Fashion-MNIST: ResNet14 teacher, ResNet8 students (mean ± std over seeds)"
    )
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
    return stats.get(
        ("reference", "-", fp_reference(table_setting(table, "full_student") or STUDENT), "FP")
    )


def full_md(cells, stats):
    """The full-quantization section: tables, FA and optimizer differences paired by seed, the 1W1A gap."""
    tables = full_tables(stats)
    if not tables:
        return []

    def present(table, init, rows, columns):
        return [c for c in columns if any((table, init, r, c) in stats for r in rows)]

    def pair(a, b):
        return paired_difference(cells, a, b)

    parts = [
        "## Full quantization, label-free (weights and activations)",
        "",
        "Table names carry the optimizer and every setting off its default. Fine-tune: two steps from the "
        "pre-trained FP student (step 1 activations only, step 2 weights too; each row's step 1 uses its own "
        "loss, the FFA rows share the exact FA's). End-to-end: from random weights, one step (Table VI "
        '"pre-trained: No"); its FP column is an unquantized student of the same recipe.',
        "",
    ]
    for table in tables:
        parts += [f"### {table}", ""]
        effects = []
        for init in INIT_KD:
            if not any(k[:2] == (table, init) for k in stats):
                continue
            if init == "fine-tune":
                steps = [
                    (
                        "step 1, activations only (FP weights)",
                        list(STEP1_ROWS.values()),
                        ["4A32W", "1A32W"],
                    ),
                    ("step 2, weights and activations", list(FULL_ROWS), ["4W4A", "1W1A"]),
                ]
            else:
                steps = [("end-to-end, from random weights", list(FULL_ROWS), list(FULL_COLUMNS))]
            for title, rows, columns in steps:
                columns = present(table, init, rows, columns)
                if columns:
                    parts += [f"{title}:", "", table_md(stats, table, init, rows, columns), ""]
                for column in columns:
                    main, base = (
                        (rows[0], rows[1])
                        if rows[0] in STEP1_ROWS.values()
                        else (FULL_MAIN, BASELINE_ROW)
                    )
                    stat = pair((table, init, main, column), (table, init, base, column))
                    if stat is not None:
                        effects.append((init, column, stat))
            fp = full_fp(stats, table, init)
            if fp:
                what = "FP column above" if init == "end-to-end" else "pre-trained FP student"
                parts += [f"FP reference ({init}, {what}): {fmt(fp)}.", ""]
        if effects:
            parts += [
                "FA's effect, FAQD minus KD only, paired by seed (points; ± the 95% t-interval's half-width):",
                "",
                "| init | column | FAQD minus KD only | verdict |",
                "|---|---|---|---|",
            ]
            parts += [
                f"| {init} | {column} | {fmt_diff(stat)} | {verdict(stat)} |"
                for init, column, stat in effects
            ]
            parts.append("")
        ffa = [
            (r, c)
            for r in FULL_ROWS
            if r.startswith("FFA")
            for c in FULL_COLUMNS
            if (table, "fine-tune", r, c) in stats
        ]
        if ffa:
            secs = {
                (r, c): np.mean(
                    [
                        float(x["sec_per_epoch"])
                        for x in cells
                        if (x["table"], x["init"], x["row"], x["column"])
                        == (table, "fine-tune", r, c)
                    ]
                )
                for r, c in [(FULL_MAIN, c) for c in FULL_COLUMNS] + ffa
                if (table, "fine-tune", r, c) in stats
            }
            parts += [
                "Seconds per epoch of step 2 (the FA/FFA cost, Table VII): "
                + ", ".join(f"{r} {c}: {v:.1f}" for (r, c), v in secs.items()),
                "",
            ]
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
                lines.append(
                    f"| {sgd[len('full sgd, ') :] or 'default'} | {key[1]} | {key[2]} | {key[3]} | "
                    f"{fmt(stats.get((sgd, *key[1:])))} | {fmt(stats[key])} | {fmt_diff(stat)} |"
                )
    if not lines:
        return []
    return [
        "### Optimizer: SGD minus Adam, paired by seed",
        "",
        "| settings | init | row | column | SGD | Adam | SGD minus Adam |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


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
            versus = (
                paired_difference(
                    cells, (table, init, FULL_MAIN, "1W1A"), (base, init, FULL_MAIN, "1W1A")
                )
                if table != base
                else None
            )
            lines.append(
                f"| {table} | {init} | {fmt(step1)} | {fmt(one)} | {fmt(fp)} | "
                f"{f'{one[0] - fp[0]:+.2f}' if fp else '-'} | {fmt_diff(versus) if versus else '-'} |"
            )
    if not lines:
        return []
    return [
        "### 1W1A: how close to FP, and what each setting changes",
        "",
        f"Row {FULL_MAIN!r}. The last column is the paired difference to the same table at default settings.",
        "",
        "| table | init | 1A32W (step 1) | 1W1A | FP reference | 1W1A minus FP | minus defaults |",
        "|---|---|---|---|---|---|---|",
        *lines,
        "",
    ]


def plot_full(stats, path):
    """Left: full quantization at default settings, FAQD and KD only per column, with the FP
    references; right: 1W1A (and its step 1) at each setting."""
    plt = pyplot()
    tables = full_tables(stats)
    groups = [
        (t, i, c)
        for t in tables
        if "," not in t
        for i in INIT_KD
        for c in FULL_COLUMNS
        if any((t, i, r, c) in stats for r in (FULL_MAIN, BASELINE_ROW))
    ]
    gaps = [t for t in tables if (t, "fine-tune", FULL_MAIN, "1W1A") in stats]
    if not groups:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(15, 5.4), gridspec_kw={"width_ratios": [1.6, 1]})

    def bars(ax, labels, series, refs):
        width = 0.8 / len(series)
        for j, (name, values) in enumerate(series):
            means = [v[0] if v else np.nan for v in values]
            errs = [v[1] if v and v[2] > 1 else 0 for v in values]
            drawn = ax.bar(
                np.arange(len(labels)) + (j - (len(series) - 1) / 2) * width,
                means,
                width,
                yerr=errs,
                capsize=2,
                label=name,
            )
            ax.bar_label(drawn, fmt="%.1f", fontsize=6, padding=2)
        for x, ref in enumerate(refs):
            if ref:
                ax.hlines(
                    ref[0],
                    x - 0.45,
                    x + 0.45,
                    color="black",
                    linestyle="--",
                    linewidth=1,
                    label="FP reference" if x == min(i for i, r in enumerate(refs) if r) else None,
                )
        ax.set_xticks(np.arange(len(labels)), labels, fontsize=8)
        ax.set_ylabel("test accuracy (%), mean ± std over seeds")
        ax.set_ylim(0, 100)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")

    ax = axes[0]
    labels = [f"{t[len('full ') :]}\n{i}\n{c}" for t, i, c in groups]
    bars(
        ax,
        labels,
        [(r, [stats.get((t, i, r, c)) for t, i, c in groups]) for r in (FULL_MAIN, BASELINE_ROW)],
        [full_fp(stats, t, i) if c != "FP" else None for t, i, c in groups],
    )
    ax.set_title("Full quantization, label-free, default settings")
    ax = axes[1]
    if gaps:
        labels = [
            t[len("full ") :].replace(", ", "\n") + ("" if "," in t else "\ndefaults") for t in gaps
        ]
        bars(
            ax,
            labels,
            [
                (
                    "step 1: 1A32W",
                    [stats.get((t, "fine-tune", STEP1_ROWS[False], "1A32W")) for t in gaps],
                ),
                ("step 2: 1W1A", [stats.get((t, "fine-tune", FULL_MAIN, "1W1A")) for t in gaps]),
            ],
            [full_fp(stats, t, "fine-tune") for t in gaps],
        )
        ax.set_title(f"Two-step 1W1A ({FULL_MAIN}) by setting")
    else:
        ax.axis("off")
    fig.suptitle(
        f"Full quantization on Fashion-MNIST: {TEACHER} teacher, {STUDENT} students unless named"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def versions():
    """TensorFlow's and Keras's versions, from the package metadata (nothing imported)."""
    from importlib.metadata import version

    return version("tensorflow"), version("keras")


def paired_difference(cells, a, b):
    """Seed-by-seed accuracy differences (points) of cells `a` minus cells `b` (keys without seed).

    Returns `mean_interval` of them.
    """

    def by_seed(key):
        return {
            int(c["seed"]): float(c["accuracy"])
            for c in cells
            if (c["table"], c["init"], c["row"], c["column"]) == key
        }

    first, second = by_seed(a), by_seed(b)
    seeds = sorted(set(first) & set(second))
    return mean_interval([100 * (first[s] - second[s]) for s in seeds])


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
                stat = paired_difference(
                    cells, ("weight", init, row, bits), ("weight", init, BASELINE_ROW, bits)
                )
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
            rows.append(
                (
                    beta,
                    summarize(
                        [c for c in cells if (c["table"], c["init"], c["row"], c["column"]) == key]
                    )[key],
                    stat,
                )
            )
        default = ("weight", init, FAQD_ROWS[norm], column)
        default_cells = [
            c for c in cells if (c["table"], c["init"], c["row"], c["column"]) == default
        ]
        if default_cells:
            from faqd_tf.options import DEFAULT_BETA

            rows.append(
                (
                    DEFAULT_BETA[norm],
                    summarize(default_cells)[default],
                    paired_difference(cells, default, ("weight", init, BASELINE_ROW, column)),
                )
            )
            rows.sort(key=lambda r: r[0])
        result[(init, norm, column)] = rows
    return result


def fa_md(cells):
    effects = fa_effects(cells)
    sweeps = sweep_effects(cells)
    if not effects and not sweeps:
        return []
    from faqd_tf.options import DEFAULT_BETA

    parts = [
        "## Does FA help? FAQD minus KD only, paired by seed",
        "",
        f"Label-free, FA at the default weights (beta {DEFAULT_BETA['fro2']:g} for fro2, {DEFAULT_BETA['l1']:g} "
        "for l1); each difference is taken between runs with the same seed (same initial weights, same data "
        "order), in accuracy points; ± is the half-width of the 95% t-interval of the mean difference.",
        "",
        "| init | bits | FA norm | FAQD minus KD only | verdict |",
        "|---|---|---|---|---|",
    ]
    for init, bits, norm, stat in effects:
        parts.append(f"| {init} | {bits} | {norm} | {fmt_diff(stat)} | {verdict(stat)} |")
    for (init, norm, column), rows in sweeps.items():
        parts += [
            "",
            f"### FA weight sweep: {init}, {column}, {norm}",
            "",
            "| beta | accuracy (mean ± std) | minus KD only (paired) | verdict |",
            "|---|---|---|---|",
        ]
        base = [
            c
            for c in cells
            if (c["table"], c["init"], c["row"], c["column"])
            == ("weight", init, BASELINE_ROW, column)
        ]
        if base:
            parts.append(
                f"| 0 (KD only) | {fmt(summarize(base)[('weight', init, BASELINE_ROW, column)])} | - | - |"
            )
        for beta, stat, diff in rows:
            parts.append(
                f"| {beta:g}{' (default)' if beta == DEFAULT_BETA[norm] else ''} | {fmt(stat)} | "
                f"{fmt_diff(diff)} | {verdict(diff) if diff else '-'} |"
            )
    return parts + [""]


def plot_fa(cells, path):
    """Left: paired FAQD - KD-only differences with 95% intervals; right: accuracy against beta."""
    plt = pyplot()
    effects = fa_effects(cells)
    sweeps = sweep_effects(cells)
    if not effects and not sweeps:
        return False
    fig, axes = plt.subplots(
        1,
        1 + len({k[0] for k in sweeps}),
        figsize=(6 + 5 * len({k[0] for k in sweeps}), 4.8),
        squeeze=False,
    )
    ax = axes[0][0]
    labels = [f"{init} {bits}" for init, bits, norm, _ in effects if norm == "fro2"]
    for j, norm in enumerate(FAQD_ROWS):
        pts = [
            (i, stat) for i, (init, bits, n, stat) in enumerate(e for e in effects if e[2] == norm)
        ]
        xs = np.array([i for i, _ in pts]) + (j - 0.5) * 0.3
        ax.errorbar(
            xs,
            [s[0] for _, s in pts],
            yerr=[s[1] if np.isfinite(s[1]) else 0 for _, s in pts],
            fmt="o",
            capsize=3,
            label=f"FA {norm}",
        )
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
                ax.errorbar(
                    betas, means, yerr=stds, marker="o", capsize=3, label=f"{norm}, {column}"
                )
        base = [
            c
            for c in cells
            if c["table"] == "weight"
            and c["init"] == init
            and c["row"] == BASELINE_ROW
            and any(c["column"] == k[2] for k in sweeps)
        ]
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
    cells = read_rows(cells_path(args))
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
        "TensorFlow {}, Keras {}; ".format(*versions())
        # A report-only call did not train: its arguments need not be those the runs used.
        + (
            "settings of this call (report only; each run's epochs and steps are in the CSV): "
            if args.report_only
            else "training settings: "
        )
        + json.dumps(
            {
                k: v
                for k, v in vars(args).items()
                if k
                not in (
                    "md",
                    "png",
                    "report_only",
                    "out_dir",
                    "seeds",
                    "tables",
                    "inits",
                    "bits",
                    "rows",
                    "csv",
                )
            }
        ),
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
            parts += [
                f"FP reference: {fp}.",
                "",
                table_md(stats, "weight", init, weight_rows, ["FP", "1-bit", "2-bit", "4-bit"]),
                "",
            ]
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
        parts += [
            "## Differences behind the paper's claims",
            "",
            *claims(stats),
            "",
            f"![bar chart]({os.path.basename(png)})",
            "",
        ]
    write_text(md, "\n".join(parts))
    if has_weight:
        plot(stats, png)
    if fa_parts:
        plot_fa(cells, fa_png)
    say(
        f"report written to {md}"
        + (f" and {png}" if has_weight else "")
        + (f", {full_png}" if has_full else "")
    )
