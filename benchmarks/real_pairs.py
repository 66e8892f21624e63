"""Teacher/student pairs on real images, for the benchmarks that time or check feature affinity.

Feature maps of real images behave unlike random ones (post-ReLU sparsity, large areas of identical
pixels on Fashion-MNIST's black background), so cost and accuracy are measured on real batches with
trained teachers. Two pairs, each trained once and cached under `cache` (default `/work/runs/real_pairs`,
or `$FAQD_BENCH_CACHE`):

- `quickstart`: the quickstart's FP ResNet8 on Fashion-MNIST 28x28x1 (`configs/quickstart.json`,
  stage teacher; the file `saved_models/quickstart/teacher.keras` is used when it exists) and its
  4-bit twin;
- `cifar`: FP ResNet56 -> ResNet20 on Fashion-MNIST resized to 32x32 with the channel repeated
  three times (the CIFAR networks' input), both trained briefly with labels (SGD, cosine).

A student starts either from the FP network's weights (`"finetune"`: `quantize_model` of the
teacher for the quickstart pair, of the pre-trained FP ResNet20 for the cifar pair) or from fresh
weights (`"end_to_end"`: a new b-bit network drawn with `seed`).
"""

import os
import subprocess
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._harness import FMNIST, ROOT, quickstart_command  # noqa: E402
from faqd_tf.training import save_model  # noqa: E402

PAIRS = ("quickstart", "cifar")
STARTS = ("finetune", "end_to_end")
# Brief label training of the cifar pair's FP networks (epochs of the 60,000 images).
CIFAR_EPOCHS = {"resnet56": 2, "resnet20": 2}


def cache_dir(cache=None):
    path = cache or os.environ.get("FAQD_BENCH_CACHE", "/work/runs/real_pairs")
    os.makedirs(path, exist_ok=True)
    return path


def images(pair, split="train", batch_size=128, seed=0, labels=False):
    """A `tf.data.Dataset` of real Fashion-MNIST batches as the pair's networks take them."""
    import tensorflow as tf

    from faqd_tf import data

    size = None if pair == "quickstart" else (32, 32)
    ds = data.load(
        FMNIST,
        split,
        labels=labels,
        batch_size=batch_size,
        seed=seed,
        image_size=size,
        drop_remainder=split == "train",
        augment=False,
    )
    if pair == "cifar":
        rgb = lambda x: tf.repeat(x, 3, axis=-1)  # noqa: E731
        ds = ds.map((lambda x, y: (rgb(x), y)) if labels else rgb)
    return ds


def _train_fp(arch, path, epochs, seed):
    import keras

    from faqd_tf import models

    keras.utils.set_random_seed(seed)
    model = models.get(arch, num_classes=10, input_shape=(32, 32, 3))
    train = images("cifar", "train", labels=True, seed=seed)
    steps = epochs * int(train.cardinality())
    model.compile(
        keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.1, steps),
            momentum=0.9,
            nesterov=True,
            weight_decay=5e-4,
        ),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    print(
        f"[real_pairs] training FP {arch} on Fashion-MNIST 32x32x3 for {epochs} epochs", flush=True
    )
    model.fit(train, epochs=epochs, verbose=2)
    accuracy = model.evaluate(images("cifar", "test", labels=True), verbose=0)[1]
    print(
        f"[real_pairs] {arch}: {100 * accuracy:.2f}% test accuracy, {time.perf_counter() - start:.0f} s",
        flush=True,
    )
    save_model(model, path)
    return path


def quickstart_teacher(cache=None):
    """Path of the quickstart's trained FP ResNet8, trained (about 3 minutes) if missing."""
    existing = os.path.join(ROOT, "saved_models", "quickstart", "teacher.keras")
    if os.path.exists(existing):
        return existing
    out = os.path.join(cache_dir(cache), "quickstart")
    path = os.path.join(out, "teacher.keras")
    if not os.path.exists(path):
        print("[real_pairs] training the quickstart teacher (train.py --stage teacher)", flush=True)
        subprocess.run(
            quickstart_command("--stage", "teacher", "--set", f"output_dir={out}"),
            check=True,
            cwd=ROOT,
        )
    return path


def cifar_network(arch, cache=None):
    """Path of the cifar pair's trained FP `arch` ("resnet56" or "resnet20"), trained if missing."""
    path = os.path.join(cache_dir(cache), f"{arch}_fmnist32.keras")
    if not os.path.exists(path):
        _train_fp(arch, path, CIFAR_EPOCHS[arch], seed=("resnet56", "resnet20").index(arch))
    return path


def cifar_networks(cache=None):
    """Paths of the cifar pair's trained FP ResNet56 (teacher) and FP ResNet20 (fine-tune start)."""
    return {arch: cifar_network(arch, cache) for arch in ("resnet56", "resnet20")}


def pair(name, bits, start, seed=0, cache=None):
    """`(teacher, student)` Keras models: the pair's FP teacher and a `bits`-bit student."""
    import keras

    from faqd_tf import models
    from faqd_tf.quantize import quantize_model

    if name not in PAIRS or start not in STARTS:
        raise ValueError(f"pair {name!r} / start {start!r}: use one of {PAIRS} and {STARTS}")
    if name == "quickstart":
        teacher = keras.models.load_model(quickstart_teacher(cache), safe_mode=True)
        arch, shape, fp_student = "resnet8", (28, 28, 1), teacher
    else:
        paths = cifar_networks(cache)
        teacher = keras.models.load_model(paths["resnet56"], safe_mode=True)
        arch, shape = "resnet20", (32, 32, 3)
        fp_student = (
            keras.models.load_model(paths["resnet20"], safe_mode=True)
            if start == "finetune"
            else None
        )
    if start == "finetune":
        return teacher, quantize_model(fp_student, weight_bits=bits)
    keras.utils.set_random_seed(seed)
    return teacher, models.get(arch, num_classes=10, input_shape=shape, weight_bits=bits)


if __name__ == "__main__":
    # Trains and caches every network the benchmarks use.
    print(quickstart_teacher(), cifar_networks())
