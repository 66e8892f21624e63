"""Does FA training change what FA measures? The budget's finished students (issue 24), KD only and
FAQD of each seed, against the pinned teacher on the 10,000 Fashion-MNIST test images:

- FA distance per tap (eq. 6, fro2, exact: what the FAQD arm minimized, at the distiller's default
  taps), the students in inference mode;
- KL divergence of the student's logits from the teacher's at T = 4 (the KD term, without the T^2
  factor), and top-1 agreement with the teacher;
- test accuracy as trained, and after `faqd_tf.recalibrate_batchnorm` on unlabeled training images
  (`--calibration`): at 2 bits the last-epoch accuracy swings by points from epoch to epoch, and BN
  moving statistics that lag the flipping codes are one cause this separates from the loss's effect.

If FAQD's students sit no closer to the teacher in FA than KD only's, the FA term did not act; if they
sit much closer and their accuracy is the same, it acted and matching affinities did not buy accuracy.

    python benchmarks/budget_fa.py --runs /work/runs/budget --csv docs/budget/fa_distance.csv \
        --md docs/budget_fa.md
"""

import argparse
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import ROOT, mean_interval, mean_std  # noqa: E402
from benchmarks.budget import TEACHER, Cell  # noqa: E402

FIELDS = [
    "init",
    "bits",
    "arm",
    "seed",
    "epochs",
    "tap",
    "fa",
    "kl_t4",
    "agreement",
    "accuracy",
    "accuracy_recal",
]
T = 4.0


def finished_cells(runs):
    """(Cell, folder) of every budget cell whose student was saved, by parsing the folder names."""
    out = []
    for name in sorted(os.listdir(runs)):
        folder = os.path.join(runs, name)
        if not os.path.isfile(os.path.join(folder, "results.json")):
            continue
        out.append((Cell.from_name(name), folder))
    return out


def measure(cell_folders, limit, calibration):
    import keras
    import tensorflow as tf

    import faqd_tf.models  # noqa: F401  (registers the package's layers for loading)
    import faqd_tf.quantize  # noqa: F401
    from benchmarks.baselines import fashion_mnist
    from faqd_tf import losses, recalibrate_batchnorm
    from faqd_tf.features import paired_extractors

    teacher = keras.models.load_model(TEACHER, safe_mode=True)
    x_cal, x_test, y_test = fashion_mnist(calibration)
    x_test, y_test = x_test[:limit], y_test[:limit]
    test = tf.data.Dataset.from_tensor_slices((x_test, y_test)).batch(500)
    rows = []
    for cell, folder in cell_folders:
        student = keras.models.load_model(os.path.join(folder, "student.keras"), safe_mode=True)
        t_ex, s_ex = paired_extractors(teacher, student)
        fa_sums, kl_sum, agree, correct, n = None, 0.0, 0, 0, 0
        for images, labels in test:
            t_out, s_out = t_ex(images, training=False), s_ex(images, training=False)
            batch = int(images.shape[0])
            fa = [
                float(losses.feature_affinity(t, s, method="auto")) * batch
                for t, s in zip(t_out[1:], s_out[1:])
            ]
            fa_sums = fa if fa_sums is None else [a + b for a, b in zip(fa_sums, fa)]
            t_log = tf.nn.log_softmax(t_out[0] / T)
            s_log = tf.nn.log_softmax(s_out[0] / T)
            kl_sum += float(tf.reduce_sum(tf.exp(t_log) * (t_log - s_log)))
            predicted = tf.argmax(s_out[0], 1)
            agree += int(tf.reduce_sum(tf.cast(tf.argmax(t_out[0], 1) == predicted, tf.int32)))
            correct += int(
                tf.reduce_sum(tf.cast(predicted == tf.cast(labels, predicted.dtype), tf.int32))
            )
            n += batch
        recalibrate_batchnorm(student, x_cal)
        recalibrated = np.mean(
            np.argmax(student.predict(x_test, batch_size=500, verbose=0), 1) == y_test
        )
        base = dict(
            init=cell.init,
            bits=cell.bits,
            arm=cell.arm,
            seed=cell.seed,
            epochs=cell.epochs,
            kl_t4=round(kl_sum / n, 6),
            agreement=round(agree / n, 5),
            accuracy=round(correct / n, 4),
            accuracy_recal=round(float(recalibrated), 4),
        )
        for tap, value in enumerate(fa_sums, 1):
            rows.append(dict(base, tap=tap, fa=round(value / n, 8)))
        rows.append(dict(base, tap="sum", fa=round(sum(fa_sums) / n, 8)))
        print(
            f"[budget_fa] {os.path.basename(folder)}: FA sum {sum(fa_sums) / n:.5f}, KL {kl_sum / n:.5f}, "
            f"agreement {100 * agree / n:.2f}%, accuracy {100 * base['accuracy']:.2f}% -> "
            f"{100 * base['accuracy_recal']:.2f}% after BN recalibration",
            flush=True,
        )
    return rows


def report(rows, command):
    """Markdown: per setting and arm, the means over seeds; the paired FAQD / KD only ratio of FA."""
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Students of `benchmarks/budget.py` "
        "(docs/budget.md) against the pinned teacher, 10,000 test images, inference mode. FA: eq. 6, "
        "fro2, exact, the distiller's default taps (stage outputs); KL at T = 4 without the T^2 factor.",
        "",
        "| init | bits | epochs | arm | n | FA per tap (1 / 2 / 3) | FA sum | KL(T=4) | top-1 agreement | "
        "accuracy as trained | after BN recalibration |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    settings = sorted(
        {(r["init"], int(r["bits"]), int(r["epochs"])) for r in rows},
        key=lambda k: (k[0] != "fine-tune", k[1]),
    )
    ratios, recalibration = [], []
    for init, bits, epochs in settings:
        for arm in ("KD only", "FAQD"):
            sel = [
                r
                for r in rows
                if (r["init"], int(r["bits"]), int(r["epochs"]), r["arm"])
                == (init, bits, epochs, arm)
            ]
            if not sel:
                continue
            seeds = sorted({int(r["seed"]) for r in sel})
            taps = sorted({r["tap"] for r in sel if r["tap"] != "sum"}, key=int)
            per_tap = " / ".join(
                f"{np.mean([float(r['fa']) for r in sel if r['tap'] == t]):.4f}" for t in taps
            )
            total = np.mean([float(r["fa"]) for r in sel if r["tap"] == "sum"])
            kl = np.mean([float(r["kl_t4"]) for r in sel if r["tap"] == "sum"])
            agree = np.mean([float(r["agreement"]) for r in sel if r["tap"] == "sum"])
            acc = [100 * float(r["accuracy"]) for r in sel if r["tap"] == "sum"]
            recal = [100 * float(r["accuracy_recal"]) for r in sel if r["tap"] == "sum"]
            lines.append(
                f"| {init} | {bits}-bit | {epochs} | {arm} | {len(seeds)} | {per_tap} | {total:.4f} | "
                f"{kl:.4f} | {100 * agree:.2f}% | {mean_std(acc)} | {mean_std(recal)} |"
            )
            # What `student.recalibrate_bn` would add: the same student before and after.
            recalibration.append(
                ((init, bits, epochs, arm), mean_interval([b - a for a, b in zip(acc, recal)]))
            )
        key = (init, bits, epochs)
        by_arm = {
            arm: {
                int(r["seed"]): r
                for r in rows
                if (r["init"], int(r["bits"]), int(r["epochs"])) == key
                and r["tap"] == "sum"
                and r["arm"] == arm
            }
            for arm in ("KD only", "FAQD")
        }
        seeds = sorted(set(by_arm["KD only"]) & set(by_arm["FAQD"]))

        def paired(value):
            """FAQD minus KD only of `value(row)`, seed by seed."""
            return mean_interval(
                [value(by_arm["FAQD"][s]) - value(by_arm["KD only"][s]) for s in seeds]
            )

        # FA and KL as log ratios (FAQD's distance relative to KD only's), the rest in points.
        stats = (
            paired(lambda r: np.log(float(r["fa"]))),
            paired(lambda r: np.log(float(r["kl_t4"]))),
            paired(lambda r: 100 * float(r["agreement"])),
            paired(lambda r: 100 * float(r["accuracy"])),
            paired(lambda r: 100 * float(r["accuracy_recal"])),
        )
        if stats[0] is not None:
            ratios.append((key, stats))
    lines.append("")

    def change(stat):
        mean, half, n, _ = stat
        band = (
            f"; 95% CI {100 * (np.exp(mean - half) - 1):+.0f}% to {100 * (np.exp(mean + half) - 1):+.0f}%"
            if np.isfinite(half)
            else ""
        )
        return f"{100 * (np.exp(mean) - 1):+.0f}%{band}"

    def points(stat):
        return f"{stat[0]:+.2f}" + (f" ± {stat[1]:.2f}" if np.isfinite(stat[1]) else "") + " points"

    for (init, bits, epochs), (fa, kl, agree, acc, recal) in ratios:
        lines.append(
            f"- {init}, {bits}-bit, {epochs} epochs, FAQD against KD only paired over "
            f"{fa[2]} seed{'s' * (fa[2] != 1)}: "
            f"FA distance {change(fa)}; KL from the teacher's logits {change(kl)}; top-1 agreement with "
            f"the teacher {points(agree)}; accuracy {points(acc)} as trained, {points(recal)} after BN "
            "recalibration."
        )
    lines += [
        "",
        "What BN recalibration adds (`recalibrate_batchnorm` on the first `--calibration` training "
        "images, 5,000 by default; `student.recalibrate_bn` in a config does the same at the end of "
        "the distill stage): accuracy after it minus as trained, the same student:",
        "",
    ]
    for (init, bits, epochs, arm), stat in recalibration:
        lines.append(
            f"- {init}, {bits}-bit, {epochs} epochs, {arm} ({stat[2]} student{'s' * (stat[2] != 1)}): {points(stat)}; "
            f"per student {', '.join(f'{v:+.2f}' for v in stat[3])}."
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", default="/work/runs/budget", help="budget.py's --out-dir")
    p.add_argument("--csv", default=os.path.join(_harness.DOCS, "budget", "fa_distance.csv"))
    p.add_argument("--md", default=os.path.join(_harness.DOCS, "budget_fa.md"))
    p.add_argument("--limit", type=int, default=10_000, help="test images")
    p.add_argument(
        "--calibration",
        type=int,
        default=5000,
        help="unlabeled training images for the BN recalibration",
    )
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="measure every cell again")
    args = p.parse_args(argv)
    if not args.report_only:
        cells = finished_cells(args.runs)
        if not cells:
            p.error(f"no finished budget cells in {args.runs}; run benchmarks/budget.py first")
        # Cells measured before are kept (a student does not change once its cell is finished).
        kept = (
            []
            if args.overwrite
            else [r for r in _harness.read_rows(args.csv) if r.get("accuracy_recal")]
        )
        have = {
            (r["init"], int(r["bits"]), r["arm"], int(r["seed"]), int(r["epochs"])) for r in kept
        }
        todo = [(c, f) for c, f in cells if (c.init, c.bits, c.arm, c.seed, c.epochs) not in have]
        rows = kept + (measure(todo, args.limit, args.calibration) if todo else [])
        _harness.write_rows(args.csv, FIELDS, rows)
    rows = _harness.read_rows(args.csv, missing_ok=False)
    command = (
        f"python benchmarks/budget_fa.py --runs {args.runs} --csv {os.path.relpath(args.csv, ROOT)} "
        f"--md {os.path.relpath(args.md, ROOT)}"
    )  # the measuring command, also after --report-only
    text = report(rows, command)
    _harness.write_text(args.md, text)
    print(text)


if __name__ == "__main__":
    main()
