"""Worker program of tests/test_multi_worker.py: which examples does this worker see per epoch?

    TF_CONFIG=... python tests/multi_worker_shard.py <idx folder> <global batch> <epochs> <out.json>

Feeds `faqd_tf.data.load` (shuffled, as training is) through the multi-worker strategy exactly as
Keras's `fit` does (`strategy.experimental_distribute_dataset`) and writes the ids of the examples
this worker's replica received, epoch by epoch. Image i of the folder has every pixel equal to i.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from faqd_tf import distribute  # noqa: E402

strategy = distribute.get_strategy("multi_worker")  # before any TensorFlow operation

import numpy as np  # noqa: E402

from faqd_tf import data  # noqa: E402

folder, batch, epochs, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
# mean 0, std 1: pixels stay i / 255, so ids read back exactly.
ds = data.load(
    f"idx:{folder}",
    "train",
    labels=True,
    batch_size=batch,
    shuffle=True,
    augment=False,
    seed=7,
    mean=0.0,
    std=1.0,
)
seen = []
for _ in range(epochs):
    ids = []
    for images, _labels in strategy.experimental_distribute_dataset(ds):
        for local in strategy.experimental_local_results(images):
            ids += np.rint(local.numpy()[:, 0, 0, 0] * 255).astype(int).tolist()
    seen.append(ids)
with open(out, "w") as f:
    json.dump(
        {"task": distribute.task(strategy), "chief": distribute.is_chief(strategy), "epochs": seen},
        f,
    )
