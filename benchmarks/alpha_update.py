"""The quantized ReLU's alpha update: raw eq. (5), the authors' rule, frozen alphas (issue 14).

Not run in CI. A trained full-precision teacher (the quickstart's ResNet8 on Fashion-MNIST) is
turned into a student with `quantize_model(teacher, weight_bits=None, activation_bits=b)` and
distilled label-free (KL at T = 4 + 0.1 * exact FA, the Distiller's defaults otherwise) for
`--steps` steps of batch `--batch-size`, under each optimizer and each alpha update:

- raw: the eq. (5) sum over every activation of the batch (`alpha_rate=None`);
- authors: that sum times 0.01, clamped to [-1, 1] (`alpha_rate=0.01`, the new default);
- x1, clamp: rate 1 with the clamp (`--rates 1.0`; see the notes in docs/results.md);
- frozen: alphas kept at their initial values.

No weight decay, constant learning rates. Each run reports the test accuracy on the 10,000
Fashion-MNIST test images and the alphas' min and max after training. Finished runs are appended
to `<out-dir>/runs.csv`, so a killed run continues where it stopped.

    PYTHONPATH=. python3 benchmarks/alpha_update.py --teacher /work/runs/quickstart/teacher.keras \\
        --out-dir /work/wt/alpha_runs/bench --md docs/alpha_update.md --png docs/alpha_update.png
"""

import argparse
import csv
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST, append_rows, read_rows  # noqa: E402
from faqd_tf import data  # noqa: E402
from faqd_tf.distiller import Distiller  # noqa: E402
from faqd_tf.layers import QuantReLU  # noqa: E402
from faqd_tf.quantize import quantize_model  # noqa: E402

OPTIMIZERS = {
    "SGD 0.01 Nesterov 0.9": lambda: keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True),
    "Adam 3e-4": lambda: keras.optimizers.Adam(3e-4),
}
FIELDS = [
    "bits",
    "optimizer",
    "rule",
    "seed",
    "accuracy",
    "alpha_min",
    "alpha_max",
    "steps",
    "seconds",
]
TRACE_EVERY = 10


def say(message):
    print(f"[alpha_update {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--teacher", required=True, help="trained full-precision .keras model (28x28x1 inputs)"
    )
    p.add_argument("--bits", type=int, nargs="+", default=[1, 4], choices=[1, 2, 4, 8])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument(
        "--rates",
        type=float,
        nargs="*",
        default=[],
        help="extra clamped rates to run besides raw, 0.01 and frozen",
    )
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out-dir", default="saved_models/alpha_update")
    p.add_argument("--md", default=None, help="markdown table (default <out-dir>/alpha_update.md)")
    p.add_argument("--png", default=None, help="plot (default <out-dir>/alpha_update.png)")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


def rules(extra_rates):
    """Rule name -> (alpha_rate, frozen)."""
    table = {"raw": (None, False), "authors (x0.01, clamp)": (0.01, False)}
    table.update({f"x{r:g}, clamp": (r, False) for r in extra_rates if r != 0.01})
    table["frozen"] = (None, True)
    return table


class AlphaTrace(keras.callbacks.Callback):
    """The alphas' (min, max) every few steps."""

    def __init__(self, relus):
        super().__init__()
        self.relus, self.points = relus, []

    def _record(self, step):
        values = [float(layer.alpha.numpy()) for layer in self.relus]
        self.points.append((step, min(values), max(values)))

    def on_train_begin(self, logs=None):
        self._record(0)

    def on_train_batch_end(self, batch, logs=None):
        if (batch + 1) % TRACE_EVERY == 0:
            self._record(batch + 1)


def accuracy(model, test):
    logits = model.predict(test.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([y.numpy() for _, y in test])
    return float(np.mean(np.argmax(logits, axis=-1) == labels))


def run_one(args, teacher, test, bits, optimizer, rule, seed):
    alpha_rate, frozen = rules(args.rates)[rule]
    keras.utils.set_random_seed(seed)
    student = quantize_model(teacher, weight_bits=None, activation_bits=bits, alpha_rate=alpha_rate)
    relus = [
        layer
        for layer in student.layers
        if isinstance(layer, QuantReLU) and layer.alpha is not None
    ]
    for layer in relus:
        layer.trainable = not frozen
    train = data.load(
        FMNIST, "train", labels=False, batch_size=args.batch_size, augment=False, seed=seed
    )
    distiller = Distiller(
        student, teacher, alpha=1.0, beta=0.1, kd="kl", temperature=4.0, fa="exact", seed=seed
    )
    distiller.compile(OPTIMIZERS[optimizer]())
    trace = AlphaTrace(relus)
    start = time.perf_counter()
    distiller.fit(
        train.repeat(),
        epochs=1,
        steps_per_epoch=args.steps,
        verbose=0,
        callbacks=[trace],
        shuffle=False,
    )
    seconds = time.perf_counter() - start
    alphas = [float(layer.alpha.numpy()) for layer in relus]
    row = {
        "bits": bits,
        "optimizer": optimizer,
        "rule": rule,
        "seed": seed,
        "accuracy": round(accuracy(student, test), 4),
        "alpha_min": round(min(alphas), 4),
        "alpha_max": round(max(alphas), 4),
        "steps": args.steps,
        "seconds": round(seconds, 1),
    }
    return row, trace.points


def report(args, rows, before, traces):
    md = args.md or os.path.join(args.out_dir, "alpha_update.md")
    png = args.png or os.path.join(args.out_dir, "alpha_update.png")
    seeds = sorted({int(r["seed"]) for r in rows})
    lines = [
        f"Teacher {args.teacher}; {args.steps} steps of batch {args.batch_size}, label-free KL(T=4) + 0.1 FA; "
        f"seeds {', '.join(map(str, seeds))}; machine {platform.machine()}, {os.cpu_count()} cores.",
        "",
        "| activations | optimizer | alpha update | seeds | alphas after (min, max) per seed "
        "| test accuracy per seed | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    groups = {}
    for r in rows:
        groups.setdefault((int(r["bits"]), r["optimizer"], r["rule"]), []).append(r)
    for (bits, optimizer, rule), runs in groups.items():
        runs.sort(key=lambda r: int(r["seed"]))
        ranges = "; ".join(
            f"{float(r['alpha_min']):.2f}, {float(r['alpha_max']):.2f}" for r in runs
        )
        accs = [float(r["accuracy"]) for r in runs]
        lines.append(
            f"| {bits}A32W | {optimizer} | {rule} | {', '.join(r['seed'] for r in runs)} | {ranges} | "
            f"{' / '.join(f'{100 * a:.2f}%' for a in accs)} | {100 * np.mean(accs):.2f}% |"
        )
    lines.append("")
    lines.append(
        "Before training: "
        + ", ".join(f"{b}A32W {100 * a:.2f}%" for b, a in sorted(before.items()))
        + "."
    )
    _harness.write_text(md, "\n".join(lines) + "\n")
    say(f"table written to {md}")
    plot(groups, traces, png)


def plot(groups, traces, png):
    plt = _harness.pyplot()
    bits_list = sorted({k[0] for k in groups})
    fig, axes = plt.subplots(1, len(bits_list) + 1, figsize=(5 * (len(bits_list) + 1), 4.2))
    for ax, bits in zip(axes, bits_list):
        keys = [k for k in groups if k[0] == bits]
        labels = [f"{k[1].split()[0]}\n{k[2].split(' (')[0]}" for k in keys]
        means = [100 * np.mean([float(r["accuracy"]) for r in groups[k]]) for k in keys]
        ax.bar(range(len(keys)), means, color=["C0" if "SGD" in k[1] else "C1" for k in keys])
        for i, k in enumerate(keys):
            ax.plot([i] * len(groups[k]), [100 * float(r["accuracy"]) for r in groups[k]], "k.")
        ax.set_xticks(range(len(keys)), labels, fontsize=8)
        low = min(100 * float(r["accuracy"]) for k in keys for r in groups[k])
        # Near-equal high accuracies (4 bits) would be indistinguishable from a zero baseline.
        ax.set_ylim(
            low - 3 if low > 50 else 0,
            100 * max(float(r["accuracy"]) for k in keys for r in groups[k]) + 1,
        )
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{bits}-bit activations, FP weights")
        ax.grid(axis="y", alpha=0.3)
    ax = axes[-1]
    for (bits, optimizer, rule, seed), points in sorted(traces.items()):
        if (
            bits != bits_list[0]
            or seed != min(k[3] for k in traces)
            or not optimizer.startswith("SGD")
        ):
            continue
        steps, lo, hi = zip(*points)
        (line,) = ax.plot(steps, hi, label=rule)
        ax.plot(steps, lo, color=line.get_color(), linestyle="--")
    ax.set_xlabel("step")
    ax.set_ylabel("alpha (solid: max, dashed: min)")
    ax.set_title(f"alphas during training ({bits_list[0]}-bit, SGD)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    say(f"plot written to {png}")


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "runs.csv")
    trace_path = os.path.join(args.out_dir, "traces.csv")
    teacher = keras.models.load_model(args.teacher, safe_mode=True)
    test = data.load(FMNIST, "test", batch_size=500)
    before = {}
    for bits in args.bits:
        keras.utils.set_random_seed(0)
        before[bits] = accuracy(
            quantize_model(teacher, weight_bits=None, activation_bits=bits), test
        )
    done = {
        (int(r["bits"]), r["optimizer"], r["rule"], int(r["seed"])) for r in read_rows(csv_path)
    }
    if not args.report_only:
        say(f"teacher {100 * accuracy(teacher, test):.2f}%; before training: {before}")
        for seed in args.seeds:
            for bits in args.bits:
                for optimizer in args.optimizers:
                    for rule in rules(args.rates):
                        if (bits, optimizer, rule, seed) in done:
                            continue
                        say(f"{bits}A32W | {optimizer} | {rule} | seed {seed}")
                        row, points = run_one(args, teacher, test, bits, optimizer, rule, seed)
                        say(
                            f"  -> {100 * row['accuracy']:.2f}%, alphas {row['alpha_min']}..{row['alpha_max']}, "
                            f"{row['seconds']} s"
                        )
                        for step, lo, hi in points:
                            append_trace(trace_path, (bits, optimizer, rule, seed, step, lo, hi))
                        append_rows(csv_path, FIELDS, [row])
    traces = {}
    # A run killed after its trace was written is run again: its later points replace the first.
    for bits, optimizer, rule, seed, step, lo, hi in read_traces(trace_path):
        traces.setdefault((bits, optimizer, rule, seed), {})[step] = (step, lo, hi)
    traces = {key: sorted(points.values()) for key, points in traces.items()}
    report(args, read_rows(csv_path), before, traces)


def append_trace(path, values):
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow(values)


def read_traces(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return [
            (int(b), o, r, int(s), int(t), float(lo), float(hi))
            for b, o, r, s, t, lo, hi in csv.reader(f)
        ]


if __name__ == "__main__":
    main()
