"""Trained evidence for issue 37 item 6: bring-your-own networks trained on real data, then FAQD.

Not run in CI. For MobileNetV2 and EfficientNetB0 (`keras.applications`, weights=None, 32x32x3:
Fashion-MNIST resized, the channel repeated three times) and a Conv1D classifier (Fashion-MNIST
rows as sequences: (28, 28) input, L = 28 steps of C = 28 values):

1. `teacher`: train the FP network briefly WITH labels (Adam, `--train-images` images for
   `--epochs` epochs; short on purpose, this machine is shared), then re-estimate its
   BatchNormalization statistics on 2,000 training images (`recalibrate_batchnorm`: after a few
   hundred steps the moving averages still carry their 0/1 start, see design.md);
2. `student`: `quantize_model(teacher, weight_bits=4)` distilled label-free by
   `faqd_tf.Distiller(kd="kl", fa=None)` (KD only: from a trained teacher FA does not pay at 4 bits,
   README "Which to use") for `--distill-steps` steps (SGD, cosine from 0.01), then the same
   BatchNormalization recalibration;
3. test accuracy on the 10,000 Fashion-MNIST test images of the Keras FP teacher, the Keras 4-bit
   student and every export of `faqd_tf.export.KINDS` run in its runtime (packed: `unpack` + Keras;
   TFLite: LiteRT; ONNX: onnxruntime), or the export's one-line refusal.

Resumable: the trained teacher and student are cached as `.keras` files (written aside, then
renamed) under `--cache`; each result is a CSV row appended as it finishes and not recomputed.
A kill loses at most the stage in progress.

    python benchmarks/trained_applications.py --csv docs/trained_applications.csv
"""

import argparse
import os
import shlex
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST, ROOT  # noqa: E402
from faqd_tf.training import save_model  # noqa: E402

NETWORKS = ("conv1d", "MobileNetV2", "EfficientNetB0")
FIELDS = ("network", "model", "status", "accuracy", "detail", "seconds", "command", "machine")


def input_shape(name):
    return (28, 28) if name == "conv1d" else (32, 32, 3)


def build(name, seed):
    import keras

    keras.utils.set_random_seed(seed)
    if name == "conv1d":
        layers = keras.layers
        inputs = keras.Input((28, 28))
        x = inputs
        for filters, pool in ((64, True), (128, True), (128, False)):
            x = layers.Conv1D(filters, 3, padding="same", use_bias=False)(x)
            x = layers.BatchNormalization()(x)
            x = layers.ReLU()(x)
            if pool:
                x = layers.MaxPooling1D()(x)
        x = layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, layers.Dense(10, name="logits")(x), name="conv1d")
    return getattr(keras.applications, name)(
        weights=None, classes=10, classifier_activation=None, input_shape=input_shape(name)
    )


def dataset(name, split, labels, batch_size, limit=None, seed=0, shuffle=None):
    """Fashion-MNIST as network `name` takes it: 32x32x3 for the 2-D nets, (28, 28) rows for Conv1D."""
    import tensorflow as tf

    from faqd_tf import data

    two_d = name != "conv1d"
    ds = data.load(
        FMNIST,
        split,
        labels=labels,
        batch_size=batch_size,
        seed=seed,
        limit=limit,
        image_size=(32, 32) if two_d else None,
        augment=False,
        shuffle=shuffle,
        drop_remainder=split == "train" and shuffle is not False,
    )

    def shape(x):  # the 2-D nets take three channels; the Conv1D net takes (L, C) rows
        return tf.repeat(x, 3, axis=-1) if two_d else x[..., 0]

    def pair(x, y):
        return shape(x), y

    return ds.map(pair if labels else shape)


def arrays(name, split, limit=None):
    import numpy as np

    xs, ys = [], []
    for x, y in dataset(name, split, True, 1000, limit=limit, shuffle=False):
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


class Results:
    """The CSV's rows: each result appended whole as it finishes; one there is not recomputed."""

    def __init__(self, path, command):
        self.path, self.command, self.machine = (
            path,
            command,
            f"{_harness.cpu_model()}, {os.cpu_count()} cores (shared)",
        )

    def has(self, network, model):
        return any(
            r["network"] == network and r["model"] == model for r in _harness.read_rows(self.path)
        )

    def add(self, network, model, status, accuracy, detail, seconds):
        _harness.append_rows(
            self.path,
            FIELDS,
            [
                {
                    "network": network,
                    "model": model,
                    "status": status,
                    "accuracy": "" if accuracy is None else f"{100 * accuracy:.2f}",
                    "detail": detail,
                    "seconds": f"{seconds:.1f}",
                    "command": self.command,
                    "machine": self.machine,
                }
            ],
        )
        print(
            f"[trained] {network} {model}: {status} {'' if accuracy is None else f'{100 * accuracy:.2f}%'} "
            f"{detail} ({seconds:.0f} s)",
            flush=True,
        )


def train_teacher(name, args, results):
    import keras

    import faqd_tf

    path = os.path.join(args.cache, f"{name}_teacher.keras")
    if os.path.exists(path):
        return keras.models.load_model(path, safe_mode=True)
    model = build(name, args.seed)
    train = dataset(name, "train", True, args.batch_size, limit=args.train_images, seed=args.seed)
    steps = args.epochs * int(train.cardinality())
    model.compile(
        keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(1e-3, steps)),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    history = model.fit(train, epochs=args.epochs, verbose=2)
    seconds = time.perf_counter() - start
    bn = dataset(name, "train", False, 250, limit=2000, shuffle=False)
    faqd_tf.recalibrate_batchnorm(model, bn)
    save_model(model, path)
    results.add(
        name,
        "train_teacher",
        "ok",
        history.history["accuracy"][-1],
        f"{args.epochs} epoch(s) of {args.train_images} images, {steps} steps, "
        f"{seconds / steps:.2f} s/step (first epoch includes tracing); accuracy = last-epoch training",
        seconds,
    )
    return model


def distill_student(name, teacher, args, results):
    import keras

    import faqd_tf

    path = os.path.join(args.cache, f"{name}_student4.keras")
    if os.path.exists(path):
        return keras.models.load_model(path, safe_mode=True)
    student = faqd_tf.quantize_model(teacher, weight_bits=4)
    distiller = faqd_tf.Distiller(student, teacher, kd="kl", fa=None, seed=args.seed)
    distiller.compile(
        keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.01, args.distill_steps),
            momentum=0.9,
            nesterov=True,
        )
    )
    train = dataset(name, "train", False, args.batch_size, seed=args.seed + 1).repeat()
    start = time.perf_counter()
    history = distiller.fit(train, epochs=1, steps_per_epoch=args.distill_steps, verbose=2)
    seconds = time.perf_counter() - start
    faqd_tf.recalibrate_batchnorm(
        student, dataset(name, "train", False, 250, limit=2000, shuffle=False)
    )
    save_model(student, path)
    results.add(
        name,
        "distill_student",
        "ok",
        None,
        f"label-free KD (kl) {args.distill_steps} steps of {args.batch_size}, final kd "
        f"{history.history['kd'][-1]:.4g}, {seconds / args.distill_steps:.2f} s/step",
        seconds,
    )
    return student


def keras_accuracy(model, x, y):
    import numpy as np

    logits = model.predict(x, batch_size=500, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def run_network(name, args, results, x_test, y_test):
    import numpy as np

    from faqd_tf import export

    teacher = train_teacher(name, args, results)
    if not results.has(name, "fp_keras"):
        start = time.perf_counter()
        results.add(
            name,
            "fp_keras",
            "ok",
            keras_accuracy(teacher, x_test, y_test),
            f"{len(y_test)} test images",
            time.perf_counter() - start,
        )
    student = distill_student(name, teacher, args, results)
    if not results.has(name, "student4_keras"):
        start = time.perf_counter()
        results.add(
            name,
            "student4_keras",
            "ok",
            keras_accuracy(student, x_test, y_test),
            f"{len(y_test)} test images",
            time.perf_counter() - start,
        )
    calibration = np.concatenate(
        [np.asarray(b) for b in dataset(name, "train", False, 100, limit=200, shuffle=False)]
    )
    folder = os.path.join(args.cache, f"{name}_exports")
    os.makedirs(folder, exist_ok=True)
    for kind in export.KINDS:
        if results.has(name, f"export:{kind}"):
            continue
        start = time.perf_counter()
        try:
            export.check(kind, student)
        except ValueError as error:
            results.add(
                name,
                f"export:{kind}",
                "refused",
                None,
                f"check: {str(error).splitlines()[0][:300]}",
                time.perf_counter() - start,
            )
            continue
        path = os.path.join(folder, export.FILENAMES[kind])
        try:
            nbytes = export.write(
                kind,
                student,
                path,
                calibration=calibration if export.needs_calibration(kind) else None,
            )
            if kind == "packed":
                model = export.unpack(path)
                predict = lambda x: model.predict(x, batch_size=500, verbose=0)  # noqa: E731
            else:
                run = export.run_onnx if kind == "onnx" else export.run_tflite
                predict = lambda x: run(path, x)  # noqa: E731
            # In chunks: the runtimes allocate every activation of the whole batch at once.
            preds = np.concatenate(
                [np.argmax(predict(x_test[i : i + 1000]), -1) for i in range(0, len(x_test), 1000)]
            )
        except Exception as error:  # noqa: BLE001 - recorded, one line, the other kinds still run
            results.add(
                name,
                f"export:{kind}",
                "error",
                None,
                f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300]}",
                time.perf_counter() - start,
            )
            continue
        results.add(
            name,
            f"export:{kind}",
            "ok",
            float(np.mean(preds == y_test)),
            f"{nbytes / 1e6:.2f} MB, {len(y_test)} test images in its runtime",
            time.perf_counter() - start,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", default=os.path.join(_harness.DOCS, "trained_applications.csv"))
    parser.add_argument(
        "--cache", default=os.environ.get("FAQD_BENCH_CACHE", "/work/runs/trained_applications")
    )
    parser.add_argument("--only", nargs="*", choices=NETWORKS)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--test-limit", type=int, default=None, help="test images (default all 10,000)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:])
    )
    results = Results(args.csv, command)
    for name in args.only or NETWORKS:
        x_test, y_test = arrays(name, "test", args.test_limit)
        run_network(name, args, results, x_test, y_test)
    return 0


if __name__ == "__main__":
    sys.exit(main())
