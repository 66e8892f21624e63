"""Spread of test_full_integer_agrees_with_the_trained_student's outcome over seeds (issue 33)."""

import os
import sys
import tempfile

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import keras
import numpy as np

from faqd_tf.export import run_tflite, to_tflite
from tests.test_export import synthetic_images, tiny_model

for seed in range(int(sys.argv[1]), int(sys.argv[2])):
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    x, y = synthetic_images(rng, 768)
    x_test, _ = synthetic_images(rng, 400)
    model = tiny_model(4, True, activation_bits=4)
    model.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, batch_size=64, epochs=6, verbose=0)
    path = os.path.join(tempfile.mkdtemp(), "full.tflite")
    to_tflite(model, path, mode="full", calibration=x[:200])
    want = model(x_test, training=False).numpy()
    got = run_tflite(path, x_test)
    agree = np.mean(got.argmax(1) == want.argmax(1))
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    s = np.sort(want, 1)
    margin = s[:, -1] - s[:, -2]
    dis = got.argmax(1) != want.argmax(1)
    top2 = np.sort(want, 1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0] > 0.15 * np.ptp(want)).sum()
    print(
        f"clear {clear} seed {seed} isa={os.environ.get('ONEDNN_MAX_CPU_ISA', 'default')} "
        f"agree {agree:.4f} rel_err {rel:.4f} "
        f"max_abs_err/range {np.max(np.abs(got - want)) / np.ptp(want):.4f} median_margin {np.median(margin):.3f} "
        f"max margin among disagreeing {margin[dis].max() if dis.any() else 0:.3f}",
        flush=True,
    )
