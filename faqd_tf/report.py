"""What a run reports: the teacher/student table, `results.json` and the training curves."""

import csv
import json
import os

from faqd_tf.atomic import write_atomically
from faqd_tf.names import ACTIVATION_STEP, DISTILL, HISTORIES, TEACHER

# The curve of each training stage's history, in the order the stages run.
CURVES = ((TEACHER, TEACHER), ("activation step", ACTIVATION_STEP), ("student", DISTILL))


def write_json(path: str, value: object) -> None:
    """Writes `value` as JSON to `path`, whole or not at all (`faqd_tf.atomic.write_atomically`)."""
    write_atomically(path, json.dumps(value, indent=2))


def _kib(bits):
    return f"{bits / 8 / 1024:,.1f} KiB"


def print_table(results: dict) -> None:
    """Prints the teacher/student accuracy and size table of an evaluation's `results`.

    >>> model = {"parameters": 1000, "float32_bits": 32000}
    >>> print_table({"teacher": {**model, "accuracy": 0.9, "packed_bits": 32000},
    ...              "student": {**model, "accuracy": 0.88, "packed_bits": 4000, "compression": 8.0},
    ...              "accuracy_gap": 0.02})
    model    test accuracy  parameters  size (float32)  size (packed)
    -------  -------------  ----------  --------------  -------------
    teacher  90.00%         1,000       3.9 KiB         3.9 KiB
    student  88.00%         1,000       3.9 KiB         0.5 KiB
    accuracy gap (teacher - student): 2.00 points; student is 8.0x smaller than the float32 teacher
    """
    t, s = results["teacher"], results["student"]
    rows = [
        ("model", "test accuracy", "parameters", "size (float32)", "size (packed)"),
        (
            "teacher",
            f"{100 * t['accuracy']:.2f}%",
            f"{t['parameters']:,}",
            _kib(t["float32_bits"]),
            _kib(t["packed_bits"]),
        ),
        (
            "student",
            f"{100 * s['accuracy']:.2f}%",
            f"{s['parameters']:,}",
            _kib(s["float32_bits"]),
            _kib(s["packed_bits"]),
        ),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(
        f"accuracy gap (teacher - student): {100 * results['accuracy_gap']:.2f} points; "
        f"student is {s['compression']:.1f}x smaller than the float32 teacher"
    )


def plot_curves(out: str) -> str | None:
    """Plots the loss and validation accuracy of the stages' histories in `out` to `out/curves.png`.

    Returns the path of the plot, or None when no stage has a history yet.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, os.path.join(out, HISTORIES[stage])) for label, stage in CURVES]
    runs = [(n, p) for n, p in runs if os.path.exists(p)]
    if not runs:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    offset = 0  # stages follow each other on one epoch axis
    for name, path in runs:
        with open(path) as f:
            rows = list(csv.DictReader(f))
        epochs = [offset + int(r["epoch"]) + 1 for r in rows]
        offset = epochs[-1] if epochs else offset
        what = "cross-entropy" if name == TEACHER else "distillation loss"
        ax_loss.plot(epochs, [float(r["loss"]) for r in rows], marker="o", label=f"{name}: {what}")
        # Without validation data Keras's CSVLogger still writes the column, as "NA".
        scored = [
            (e, r["val_accuracy"])
            for e, r in zip(epochs, rows)
            if r.get("val_accuracy", "NA") != "NA"
        ]
        if scored:
            ax_acc.plot(
                [e for e, _ in scored], [100 * float(v) for _, v in scored], marker="o", label=name
            )
    ax_loss.set(
        xlabel="epoch (stages in order)",
        ylabel="training loss",
        yscale="log",
        title="training loss",
    )
    ax_acc.set(
        xlabel="epoch (stages in order)",
        ylabel="validation accuracy (%)",
        title="validation accuracy",
    )
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = os.path.join(out, "curves.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
