"""Deploying the low-bit student as TFLite: file size, interpreter latency, accuracy and agreement.

For ResNet8 on Fashion-MNIST (28x28x1, the quickstart network) and ResNet20 (CIFAR shape: Fashion-MNIST
zero-padded to 32x32 and repeated to 3 channels), at 1/2/4-bit weights (layer-wise scales, activations
full precision, the classifier full precision, as in the quickstart):

1. a full-precision teacher is trained with labels (SGD, cosine) and cached under ``--cache``;
2. each student is ``quantize_model(teacher, weight_bits=b)`` fine-tuned label-free with
   ``faqd_tf.Distiller`` (KL on logits, T = 4, no feature affinity) for ``--distill-steps`` steps,
   also cached;
3. each student is exported with ``faqd_tf.export.to_tflite`` in modes ``float``, ``int8`` (the integer
   codes as int8 kernels, float activations) and ``full`` (int8 activations calibrated on 200 training
   images); the ``int8``/``full`` files are checked to hold the codes;
4. every file runs in the LiteRT interpreter (``ai_edge_litert``, default XNNPACK delegate, 2 threads):
   latency of batch 1 (median of ``--runs`` invokes, the three files interleaved in rounds so that load
   on the shared machine hits them alike), accuracy on the 10,000 test images and top-1 agreement with
   the Keras student.

    python benchmarks/deploy.py --md saved_models/deploy/deploy.md --png docs/deploy.png
"""

import argparse
import gzip
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.export_sizes import cpu_model  # noqa: E402

FASHION = "/usr/share/datasets/fashion-mnist"
MODES = ("float", "int8", "full")


def read_idx(path):
    """An IDX file (gzip'd) as a uint8 array; the header's dims checked against the bytes present."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header announces {dims}, the file holds {body.size} values")
    return body.reshape(dims)


def fashion_mnist(pad_to_rgb32):
    x_train = read_idx(os.path.join(FASHION, "train-images-idx3-ubyte.gz"))
    y_train = read_idx(os.path.join(FASHION, "train-labels-idx1-ubyte.gz")).astype(np.int64)
    x_test = read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))
    y_test = read_idx(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz")).astype(np.int64)

    def prepare(x):
        x = x.astype(np.float32)[..., None] / 255.0
        if pad_to_rgb32:
            x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)
        return x

    return prepare(x_train), y_train, prepare(x_test), y_test


def teacher_model(arch, x, y, epochs, path, seed):
    import keras

    from faqd_tf.models import resnet_cifar

    if os.path.exists(path):
        return keras.models.load_model(path, safe_mode=True)
    keras.utils.set_random_seed(seed)
    model = resnet_cifar(int(arch[len("resnet"):]), input_shape=x.shape[1:], num_classes=10)
    steps = epochs * (len(x) // 128)
    schedule = keras.optimizers.schedules.CosineDecay(0.1, steps)
    model.compile(
        keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True, weight_decay=5e-4),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(x, y, batch_size=128, epochs=epochs, verbose=2)
    print(f"{arch} teacher trained in {time.perf_counter() - start:.0f} s", flush=True)
    model.save(path)
    return model


def student_model(teacher, bits, x, steps, path, seed):
    import keras

    from faqd_tf import Distiller, quantize_model

    if os.path.exists(path):
        return keras.models.load_model(path, safe_mode=True)
    keras.utils.set_random_seed(seed)
    student = quantize_model(teacher, weight_bits=bits)
    distiller = Distiller(student, teacher, alpha=1.0, beta=0.0, gamma=0.0, kd="kl", temperature=4.0, fa=None)
    distiller.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-4, steps)))
    images = x[np.random.default_rng(seed).permutation(len(x))[: steps * 128]]  # labels never used
    start = time.perf_counter()
    distiller.fit(images, batch_size=128, epochs=1, verbose=2)
    print(f"  {bits}-bit student distilled in {time.perf_counter() - start:.0f} s", flush=True)
    student.save(path)
    return student


def interpreter(path, threads):
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter(model_path=path, num_threads=threads)


def predict(path, x, threads, batch=500):
    runner = interpreter(path, threads)
    index = runner.get_input_details()[0]["index"]
    runner.resize_tensor_input(index, (batch, *x.shape[1:]))
    runner.allocate_tensors()
    out = runner.get_output_details()[0]["index"]
    logits = []
    for start in range(0, len(x), batch):
        chunk = x[start : start + batch]
        if len(chunk) < batch:
            runner.resize_tensor_input(index, chunk.shape)
            runner.allocate_tensors()
        runner.set_tensor(index, chunk)
        runner.invoke()
        logits.append(runner.get_tensor(out).copy())
    return np.concatenate(logits)


def latencies(paths, image, threads, runs, rounds):
    """Median batch-1 invoke time (ms) of each file; files interleaved, `runs` invokes each."""
    runners = []
    for path in paths:
        runner = interpreter(path, threads)
        index = runner.get_input_details()[0]["index"]
        runner.resize_tensor_input(index, (1, *image.shape))
        runner.allocate_tensors()
        runner.set_tensor(index, image[None])
        for _ in range(10):  # warm-up
            runner.invoke()
        runners.append(runner)
    times = [[] for _ in paths]
    per_round = -(-runs // rounds)
    for _ in range(rounds):
        for i, runner in enumerate(runners):
            for _ in range(per_round):
                start = time.perf_counter()
                runner.invoke()
                times[i].append(time.perf_counter() - start)
    return [1000 * float(np.median(t)) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["resnet8", "resnet20"])
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument("--runs", type=int, default=300, help="batch-1 invokes per file for the median latency")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="saved_models/deploy")
    parser.add_argument("--md", default="saved_models/deploy/deploy.md")
    parser.add_argument("--png", default=None, help="bar chart of latency and size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    from faqd_tf.export import to_tflite

    os.makedirs(args.cache, exist_ok=True)
    rows = []
    for arch in args.archs:
        pad = arch != "resnet8"
        x_train, y_train, x_test, y_test = fashion_mnist(pad_to_rgb32=pad)
        shape = "x".join(map(str, x_train.shape[1:]))
        teacher = teacher_model(arch, x_train, y_train, args.teacher_epochs,
                                os.path.join(args.cache, f"{arch}_{shape}_teacher.keras"), args.seed)
        teacher_acc = float(np.mean(teacher.predict(x_test, batch_size=500, verbose=0).argmax(1) == y_test))
        print(f"{arch} ({shape}) teacher: {100 * teacher_acc:.2f}%", flush=True)
        for bits in args.bits:
            student = student_model(teacher, bits, x_train, args.distill_steps,
                                    os.path.join(args.cache, f"{arch}_{shape}_w{bits}.keras"), args.seed)
            keras_logits = student.predict(x_test, batch_size=500, verbose=0)
            keras_pred = keras_logits.argmax(1)
            paths, sizes, preds = [], [], []
            for mode in MODES:
                path = os.path.join(args.cache, f"{arch}_{shape}_w{bits}_{mode}.tflite")
                start = time.perf_counter()
                sizes.append(to_tflite(student, path, mode=mode, calibration=x_train[:200]))
                print(f"  w{bits} {mode}: {sizes[-1]:,} B, converted in {time.perf_counter() - start:.1f} s", flush=True)
                paths.append(path)
                preds.append(predict(path, x_test, args.threads).argmax(1))
            times = latencies(paths, x_test[0], args.threads, args.runs, args.rounds)
            row = {
                "arch": arch, "shape": shape, "bits": bits, "teacher": teacher_acc,
                "keras": float(np.mean(keras_pred == y_test)), "params": student.count_params(),
            }
            for mode, size, pred, ms in zip(MODES, sizes, preds, times):
                row[mode] = {"bytes": size, "acc": float(np.mean(pred == y_test)),
                             "agree": float(np.mean(pred == keras_pred)), "ms": ms}
            rows.append(row)
            print("  " + ", ".join(f"{m}: {row[m]['bytes']:,} B, {100 * row[m]['acc']:.2f}%, agree "
                                   f"{100 * row[m]['agree']:.2f}%, {row[m]['ms']:.3f} ms" for m in MODES), flush=True)

    command = "python benchmarks/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = ("| network | weights | Keras student acc. | float .tflite | int8 .tflite | full .tflite | float/int8 size "
              "| acc. float / int8 / full | agreement with Keras: float / int8 / full | latency ms: float / int8 / full "
              "| float/full speed-up |")
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for r in rows:
        f, i, q = r["float"], r["int8"], r["full"]
        lines.append(
            f"| {r['arch']} ({r['shape']}) | {r['bits']}-bit | {100 * r['keras']:.2f}% | {f['bytes'] / 1024:,.1f} kB "
            f"| {i['bytes'] / 1024:,.1f} kB | {q['bytes'] / 1024:,.1f} kB | {f['bytes'] / i['bytes']:.2f}x "
            f"| {100 * f['acc']:.2f} / {100 * i['acc']:.2f} / {100 * q['acc']:.2f} "
            f"| {100 * f['agree']:.2f} / {100 * i['agree']:.2f} / {100 * q['agree']:.2f} "
            f"| {f['ms']:.3f} / {i['ms']:.3f} / {q['ms']:.3f} | {f['ms'] / q['ms']:.2f}x |"
        )
    teachers = sorted({(r["arch"], r["shape"], r["teacher"]) for r in rows})
    text = (
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, LiteRT interpreter (ai_edge_litert), "
        f"{args.threads} threads; {cpu_model()}, {os.cpu_count()} cores.\nCommand: `{command.strip()}`\n"
        + "".join(f"Teacher {a} ({s}): {100 * acc:.2f}%.\n" for a, s, acc in teachers)
        + "\n" + "\n".join(lines) + "\n"
    )
    print()
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(text)
    if args.png:
        plot(rows, args.png)
    return 0


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['arch']}\n{r['bits']}-bit" for r in rows]
    x = np.arange(len(rows))
    width = 0.27
    fig, (ax_ms, ax_kb) = plt.subplots(1, 2, figsize=(12, 4))
    for k, mode in enumerate(MODES):
        ax_ms.bar(x + (k - 1) * width, [r[mode]["ms"] for r in rows], width, label=mode)
        ax_kb.bar(x + (k - 1) * width, [r[mode]["bytes"] / 1024 for r in rows], width, label=mode)
    for ax, title in ((ax_ms, "batch-1 latency (ms, median)"), (ax_kb, "file size (kB)")):
        ax.set_xticks(x, labels)
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
