"""Does the label-free sensitivity rank layers as their accuracy does? (issue 38, item 2)

For a trained FP network, `faqd_tf.sensitivity` measures, on 512 unlabeled training images, how far
each layer alone quantized to b bits (round to nearest, BN statistics re-estimated) moves the
network's outputs from its own (the KD increase). This script then quantizes the same layer alone
the same way and scores it on the 10,000 labeled test images: the accuracy drop against the float
copy given the same BN re-estimation. Labels are used here only to check the ranking.

The headline, named before the runs: **Spearman's rank correlation between the KD increase and the
accuracy drop, over the layers, at each width of 1 and 2 bits** (where the allocation chooses; at 4
and 8 bits the drops are within the test set's noise). Over every (layer, width) row beside it.

Networks: the quickstart's pinned FP ResNet8 (`docs/budget/teacher.keras`, 28x28x1) and the cifar
pair's FP ResNet20 (Fashion-MNIST at 32x32x3, `benchmarks/real_pairs.py`, trained there if missing).
Rows go to `docs/sensitivity/check.csv`; `--md` writes the table, `--png` the scatter plots.

    python benchmarks/sensitivity_check.py --md docs/sensitivity/check.md --png docs/sensitivity/check.png
"""

import argparse
import os
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness, real_pairs  # noqa: E402
from benchmarks._harness import read_rows, write_rows, write_text  # noqa: E402
from benchmarks.budget import TEACHER  # noqa: E402

CSV = os.path.join(_harness.DOCS, "sensitivity", "check.csv")
FIELDS = [
    "network",
    "layer",
    "bits",
    "kd_increase",
    "fa_increase",
    "accuracy",
    "accuracy_drop",
    "float_accuracy",
    "samples",
    "sensitivity_seconds",
]
NETWORKS = {"resnet8": "quickstart", "resnet20": "cifar"}
SAMPLES = 512
BITS = (1, 2, 4, 8)


def network_path(name):
    return TEACHER if name == "resnet8" else real_pairs.cifar_network("resnet20")


def measure(name):
    """The rows of one network: sensitivity, then each layer and width alone on the test set."""
    import keras
    import numpy as np

    import faqd_tf
    from faqd_tf.batchnorm import recalibrate_batchnorm
    from faqd_tf.quantize import quantize_model

    pair = NETWORKS[name]
    model = keras.models.load_model(network_path(name), safe_mode=True)
    images = np.concatenate(
        list(real_pairs.images(pair, "train", batch_size=128, seed=0).take(SAMPLES // 128))
    )
    test = real_pairs.images(pair, "test", batch_size=500, labels=True)
    result = faqd_tf.sensitivity(model, images, bits=BITS, samples=None)
    print(f"[check] {name}: sensitivity of {len(result.layers)} layers in {result.seconds:.1f} s")

    def accuracy(layer_bits):
        twin = quantize_model(model, weight_bits=None, layer_bits=layer_bits)
        recalibrate_batchnorm(twin, images)
        twin.compile(metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(True))
        return float(twin.evaluate(test, verbose=0)[1])

    # The float copy with the same BN re-estimation: what each quantized layer is charged against.
    base = accuracy({})
    rows = []
    for layer in result.layers:
        for bits in BITS:
            start = time.perf_counter()
            acc = accuracy({layer: bits})
            row = result.row(layer, bits)
            rows.append(
                {
                    "network": name,
                    "layer": layer,
                    "bits": bits,
                    "kd_increase": f"{row.kd_increase:.6g}",
                    "fa_increase": f"{row.fa_increase:.6g}",
                    "accuracy": f"{acc:.4f}",
                    "accuracy_drop": f"{base - acc:.4f}",
                    "float_accuracy": f"{base:.4f}",
                    "samples": result.samples,
                    "sensitivity_seconds": f"{result.seconds:.1f}",
                }
            )
            print(
                f"[check] {name} {layer} {bits}-bit: KD +{row.kd_increase:.4g}, "
                f"accuracy {100 * acc:.2f}% ({100 * (base - acc):+.2f} drop) "
                f"{time.perf_counter() - start:.1f} s",
                flush=True,
            )
    return rows


def spearman(x, y):
    """Spearman's rho (ties at their mean rank)."""
    from scipy import stats

    return float(stats.spearmanr(x, y).statistic)


def correlations(rows):
    """``{(network, bits or "all"): (rho, layers)}`` of the KD increase against the accuracy drop."""
    out = {}
    for name in dict.fromkeys(r["network"] for r in rows):
        mine = [r for r in rows if r["network"] == name]
        for bits in (*BITS, "all"):
            sel = [r for r in mine if bits == "all" or int(r["bits"]) == bits]
            kd = [float(r["kd_increase"]) for r in sel]
            drop = [float(r["accuracy_drop"]) for r in sel]
            out[name, bits] = (spearman(kd, drop), len(sel))
    return out


def report(rows, md=None, png=None):
    stats = correlations(rows)
    lines = [
        "| network | float accuracy (BN re-estimated) | rho at 1 bit | rho at 2 bits | rho at 4 bits "
        "| rho at 8 bits | rho over all rows |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["network"] for r in rows):
        base = next(r["float_accuracy"] for r in rows if r["network"] == name)
        cells = [f"{stats[name, b][0]:+.2f} ({stats[name, b][1]})" for b in (*BITS, "all")]
        lines.append(f"| {name} | {100 * float(base):.2f}% | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if md:
        write_text(md, table + "\n")
    if png:
        plt = _harness.pyplot()
        names = list(dict.fromkeys(r["network"] for r in rows))
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            for bits, marker in zip(BITS, "os^v"):
                sel = [r for r in rows if r["network"] == name and int(r["bits"]) == bits]
                ax.scatter(
                    [max(float(r["kd_increase"]), 1e-6) for r in sel],
                    [100 * float(r["accuracy_drop"]) for r in sel],
                    marker=marker,
                    label=f"{bits}-bit (rho {stats[name, bits][0]:+.2f})",
                )
            ax.set_xscale("log")
            ax.set_xlabel("KD increase, label-free (log; below 1e-6 drawn at 1e-6)")
            ax.set_ylabel("test accuracy drop (points)")
            ax.set_title(f"{name}: one layer quantized alone")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(png, dpi=110)
    return stats


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    parser.add_argument("--csv", default=CSV)
    parser.add_argument("--md")
    parser.add_argument("--png")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    for name in args.networks:
        if any(r["network"] == name for r in rows):
            continue  # measured; delete its rows to measure again
        rows += measure(name)
        write_rows(args.csv, FIELDS, rows)
    report([r for r in rows if r["network"] in args.networks], args.md, args.png)


if __name__ == "__main__":
    main()
