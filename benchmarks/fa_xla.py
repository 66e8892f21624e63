"""Exact FA (fro2, loss + student gradient) at the quickstart's three tap shapes, batch 128: as the
library runs it (a graph whose elementwise parts are XLA-fused) against the whole term compiled with
XLA. Inputs are random post-ReLU maps (synthetic): a probe of what XLA could take off the FA term,
not a cost figure for training (benchmarks/step_cost.py and fa_cost.py time real maps).

    python benchmarks/fa_xla.py
"""

import os
import sys

import numpy as np
import tensorflow as tf

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from faqd_tf import losses  # noqa: E402

SHAPES = [(128, 28, 16), (128, 14, 32), (128, 7, 64)]  # (batch, H = W, C) of the quickstart's taps


def loss_and_grad(jit_compile):
    @tf.function(jit_compile=jit_compile)
    def step(teacher, student):
        with tf.GradientTape() as tape:
            s = tf.identity(student)
            tape.watch(s)
            loss = tf.reduce_mean(losses.feature_affinity_per_sample(tf.identity(teacher), s))
        return loss, tape.gradient(loss, s)

    return step


def main(rounds=7):
    rng = np.random.default_rng(0)
    for batch, size, channels in SHAPES:
        maps = [
            tf.Variable(
                np.maximum(rng.normal(size=(batch, size, size, channels)), 0).astype("float32")
            )
            for _ in range(2)
        ]
        steps = {"graph": loss_and_grad(False), "xla": loss_and_grad(True)}
        grads = {name: step(*maps)[1].numpy() for name, step in steps.items()}
        diff = np.linalg.norm(grads["graph"] - grads["xla"]) / np.linalg.norm(grads["graph"])
        times = _harness.interleaved_times(
            [lambda step=step: step(*maps)[1].numpy() for step in steps.values()], rounds
        )
        medians = {name: 1000 * float(np.median(t)) for name, t in zip(steps, times)}
        print(
            f"{size}x{size}x{channels} batch {batch}: graph {medians['graph']:.2f} ms, xla {medians['xla']:.2f} ms "
            f"(gradients agree to {diff:.1e} relative)",
            flush=True,
        )


if __name__ == "__main__":
    main()
