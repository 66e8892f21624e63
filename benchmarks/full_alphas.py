"""Why FA can collapse an end-to-end 4W4A student under SGD: the QuantReLU alphas, step by step.

Not run in CI. Trains one end-to-end full-quantization cell of `benchmarks/reproduce.py` (same
teacher, data, optimizer and alpha rule, through the same stages, in `<out-dir>/full_alphas/`) and
prints, every 10 steps of each epoch, the smallest, median and largest alpha with the KD and FA
losses, then the test accuracy:

    python benchmarks/full_alphas.py --out-dir <reproduce's --out-dir, with teacher.keras> \
        --beta 10 --lr 0.1 --seed 0 [--clipnorm 5]

`--beta 0` keeps the same graph with FA unweighted (its loss is still logged).
"""

import argparse
import os
import sys

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import reproduce  # noqa: E402
from benchmarks.reproduce_cells import FULL_MAIN  # noqa: E402
from faqd_tf.layers import QuantReLU  # noqa: E402


class AlphaLog(keras.callbacks.Callback):
    def __init__(self, every=10):
        super().__init__()
        self.every = every

    def on_train_begin(self, logs=None):
        self.relus = [layer for layer in self.model.student.layers if isinstance(layer, QuantReLU)]

    def on_train_batch_end(self, batch, logs=None):
        if batch % self.every == 0:
            a = np.array([float(layer.alpha.numpy()) for layer in self.relus])
            print(
                f"step {batch:3d}: alphas min {a.min():.4f} median {np.median(a):.4f} max {a.max():.4f}"
                f" | kd {logs.get('kd', 0):.3f} fa {logs.get('fa', 0):.4f}",
                flush=True,
            )


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--beta", type=float, required=True)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clipnorm", type=float, default=None)
    a = p.parse_args()
    args = reproduce.parse_args(
        [
            "--tables",
            "full",
            "--out-dir",
            a.out_dir,
            "--full-e2e-lr",
            str(a.lr),
            "--beta",
            str(a.beta),
        ]
        + (["--full-clipnorm", str(a.clipnorm)] if a.clipnorm else [])
    )
    bench = reproduce.Bench(args, callbacks=[AlphaLog()])
    cell = bench.full_cell("end-to-end", FULL_MAIN, "4W4A", a.seed, "sgd")
    accuracy, _ = bench.train(
        cell, output_dir=os.path.join(a.out_dir, "full_alphas", cell.name), overwrite=True
    )
    print(f"test accuracy {accuracy:.4f}")


if __name__ == "__main__":
    main()
