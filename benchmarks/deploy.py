"""Deploying the low-bit student: TFLite (float, int8, full integer, int4) and ONNX files compared.

For ResNet8 on Fashion-MNIST (28x28x1, the quickstart network), ResNet20 and MobileNetV2 (width 0.5,
depthwise convolutions; both on Fashion-MNIST zero-padded to 32x32 and repeated to 3 channels), at
the `--bits` weight widths (layer-wise scales, full-precision activations and classifier, as in the
quickstart). Images are normalized as faqd_tf.data normalizes the IDX files ((x/255 - mean) / std).

1. a full-precision teacher is trained with labels (SGD, cosine) and cached under ``--cache``, or
   read from ``--teacher-file ARCH=PATH`` (the quickstart's teacher.keras for resnet8);
2. each student is ``quantize_model(teacher, weight_bits=b)`` fine-tuned label-free with
   ``faqd_tf.Distiller`` (KL on logits, T = 4, no feature affinity) for ``--distill-steps`` steps,
   also cached;
3. each student is exported as ``to_tflite`` modes ``float``, ``int8``, ``full`` (int8 activations
   calibrated on 200 training images) and ``int4``, and as ``to_onnx``; the codes are read back from
   the int4 TFLite and the ONNX files (tests/test_export_lowbit.py's readers) and compared with
   ``kernel_codes()``;
4. every file runs on the 10,000 test images (batches of 500): top-1 agreement with the Keras student,
   largest absolute logit difference (and the largest absolute Keras logit, for scale), accuracy;
   and batch-1 latency at each of the ``--threads`` counts (median of ``--runs`` calls; the five
   files of a row interleaved in ``--rounds`` rounds, so that load on the shared machine hits them
   alike; the load average is recorded with each row). TFLite runs in the LiteRT interpreter
   (``ai_edge_litert``, default XNNPACK delegate), ONNX in onnxruntime (CPU).

Writes one CSV row per file (``--csv``), a markdown table (``--md``) and a chart (``--png``):

    python benchmarks/deploy.py --cache /work/runs/deploy \\
        --teacher-file resnet8=saved_models/quickstart/teacher.keras \\
        --csv docs/deploy.csv --md docs/deploy.md --png docs/deploy.png
"""

import argparse
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST, FMNIST_DIR  # noqa: E402

FORMATS = ("float", "int8", "full", "int4", "onnx")
ARCHS = ("resnet8", "resnet20", "mobilenetv2")
MOBILENET_ALPHA = 0.5


def fashion_mnist(pad_to_rgb32):
    """Train and test images normalized as faqd_tf.data does for IDX files, and labels. The raw
    pixels (`faqd_tf.data.idx.read_idx`, with its header checks), not `faqd_tf.data.load`: the
    32x32 inputs are the 28x28 images zero-padded, where `load` would resize them."""
    from faqd_tf.data import dataset_info
    from faqd_tf.data.idx import read_idx

    info = dataset_info(FMNIST)
    mean, std = np.float32(info.mean[0]), np.float32(info.std[0])

    def prepare(name):
        x = read_idx(os.path.join(FMNIST_DIR, f"{name}-images-idx3-ubyte.gz"))[..., None]
        if pad_to_rgb32:
            x = np.repeat(np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0))), 3, axis=-1)
        return (x.astype(np.float32) / 255.0 - mean) / std

    def labels(name):
        return read_idx(os.path.join(FMNIST_DIR, f"{name}-labels-idx1-ubyte.gz")).astype(np.int64)

    return prepare("train"), labels("train"), prepare("t10k"), labels("t10k")


def build(arch, input_shape):
    import keras

    from faqd_tf.models import resnet_cifar

    if arch == "mobilenetv2":
        model = keras.applications.MobileNetV2(
            input_shape=input_shape,
            alpha=MOBILENET_ALPHA,
            weights=None,
            classes=10,
            classifier_activation=None,
        )
        for layer in model.layers:
            # Keras's MobileNetV2 uses momentum 0.999: after a few hundred steps its moving statistics
            # still hold most of their initial values (see the design notes).
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.9
        return model
    return resnet_cifar(int(arch[len("resnet") :]), input_shape=input_shape, num_classes=10)


def teacher_model(arch, x, y, epochs, path, seed):
    import keras

    import faqd_tf  # noqa: F401  (registers the custom layers)

    if os.path.exists(path):
        return keras.models.load_model(path, safe_mode=True)
    keras.utils.set_random_seed(seed)
    model = build(arch, x.shape[1:])
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
    distiller = Distiller(
        student, teacher, alpha=1.0, beta=0.0, gamma=0.0, kd="kl", temperature=4.0, fa=None
    )
    distiller.compile(keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(3e-4, steps)))
    images = x[np.random.default_rng(seed).permutation(len(x))[: steps * 128]]  # labels never used
    start = time.perf_counter()
    distiller.fit(images, batch_size=128, epochs=1, verbose=2)
    print(f"  {bits}-bit student distilled in {time.perf_counter() - start:.0f} s", flush=True)
    student.save(path)
    return student


def write(student, fmt, path, calibration):
    """Exports `student` as `fmt`; returns the file size."""
    from faqd_tf.export import to_onnx, to_tflite

    if fmt == "onnx":
        return to_onnx(student, path)
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", "to_tflite\\(mode='int4'\\) stored these kernels as int8"
        )  # checked below
        return to_tflite(student, path, mode=fmt, calibration=calibration)


def check_codes(student, fmt, path):
    """'yes' when every quantized kernel read back from the file equals the student's codes (and, in
    int4 TFLite, is INT4 unless depthwise); else raises."""
    from faqd_tf.export.common import quantized_layers
    from faqd_tf.layers import QuantDense, QuantDepthwiseConv2D
    from tests.test_export_lowbit import assert_tflite_codes, onnx_kernels

    layers = [layer for _, layer in quantized_layers(student).values()]
    if fmt == "int4":
        assert_tflite_codes(
            student,
            path,
            {
                layer.name: "INT8" if isinstance(layer, QuantDepthwiseConv2D) else "INT4"
                for layer in layers
            },
        )
        return f"{sum(not isinstance(layer, QuantDepthwiseConv2D) for layer in layers)}/{len(layers)} INT4"
    kernels = onnx_kernels(path)[0]
    for layer in layers:
        codes, scale = (np.asarray(a) for a in layer.kernel_codes())
        codes = codes.T if isinstance(layer, QuantDense) else codes.transpose(3, 2, 0, 1)
        kind, stored, stored_scale, _ = kernels[layer.name]
        if not (
            np.array_equal(stored, codes.astype(np.int64))
            and np.array_equal(stored_scale.reshape(-1), scale.reshape(-1))
        ):
            raise AssertionError(
                f"{path}: {layer.name} does not hold the student's codes and scales"
            )
    return f"{len(layers)}/{len(layers)} {kind}"


class Runner:
    """Batch-1 and batched inference of one exported file (a LiteRT interpreter or an ORT session)."""

    def __init__(self, path, threads):
        self.onnx = path.endswith(".onnx")
        if self.onnx:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
        else:
            from ai_edge_litert.interpreter import Interpreter

            self.interpreter = Interpreter(model_path=path, num_threads=threads)
            self.input = self.interpreter.get_input_details()[0]["index"]
            self.output = self.interpreter.get_output_details()[0]["index"]
            self.shape = None

    def __call__(self, x):
        if self.onnx:
            return self.session.run(None, {self.input: x})[0]
        if self.shape != x.shape:
            self.interpreter.resize_tensor_input(self.input, x.shape)
            self.interpreter.allocate_tensors()
            self.shape = x.shape
        self.interpreter.set_tensor(self.input, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output).copy()


def predict(runner, x, batch=500):
    return np.concatenate([runner(x[i : i + batch]) for i in range(0, len(x), batch)])


def latencies(runners, image, runs, rounds):
    """Median batch-1 call time (ms) of each runner; runners interleaved, `runs` calls each."""
    x = image[None]
    for runner in runners:
        for _ in range(10):  # warm-up (and the batch-1 allocation)
            runner(x)
    times = _harness.interleaved_times(
        [lambda r=r: r(x) for r in runners], rounds, -(-runs // rounds)
    )
    return [1000 * float(np.median(t)) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=ARCHS)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    parser.add_argument(
        "--teacher-file",
        action="append",
        default=[],
        metavar="ARCH=PATH",
        help="use this trained teacher for ARCH instead of training one",
    )
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--distill-steps", type=int, default=300)
    parser.add_argument(
        "--runs", type=int, default=300, help="batch-1 calls per file for the median latency"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[2, 1],
        help="thread counts to time batch 1 at (the first also runs the test set)",
    )
    parser.add_argument("--cache", default="saved_models/deploy")
    parser.add_argument("--csv", default="saved_models/deploy/deploy.csv")
    parser.add_argument("--md", default="saved_models/deploy/deploy.md")
    parser.add_argument("--png", default=None, help="chart of size and latency per format")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    teacher_files = dict(item.split("=", 1) for item in args.teacher_file)

    import keras
    import onnxruntime
    import tensorflow as tf

    os.makedirs(args.cache, exist_ok=True)
    rows = []
    started = time.perf_counter()
    for arch in args.archs:
        x_train, y_train, x_test, y_test = fashion_mnist(pad_to_rgb32=arch != "resnet8")
        shape = "x".join(map(str, x_train.shape[1:]))
        tag = f"{arch}_{shape}"
        teacher_path = teacher_files.get(arch, os.path.join(args.cache, f"{tag}_teacher.keras"))
        teacher = teacher_model(
            arch, x_train, y_train, args.teacher_epochs, teacher_path, args.seed
        )
        teacher_acc = float(
            np.mean(teacher.predict(x_test, batch_size=500, verbose=0).argmax(1) == y_test)
        )
        print(f"{arch} ({shape}) teacher {teacher_path}: {100 * teacher_acc:.2f}%", flush=True)
        for bits in args.bits:
            student = student_model(
                teacher,
                bits,
                x_train,
                args.distill_steps,
                os.path.join(args.cache, f"{tag}_w{bits}.keras"),
                args.seed,
            )
            keras_logits = student.predict(x_test, batch_size=500, verbose=0)
            keras_pred = keras_logits.argmax(1)
            paths, sizes, stats = [], [], []
            for fmt in FORMATS:
                path = os.path.join(
                    args.cache, f"{tag}_w{bits}_{fmt}.{'onnx' if fmt == 'onnx' else 'tflite'}"
                )
                start = time.perf_counter()
                sizes.append(write(student, fmt, path, x_train[:200]))
                seconds = time.perf_counter() - start
                codes = check_codes(student, fmt, path) if fmt in ("int4", "onnx") else ""
                logits = predict(Runner(path, args.threads[0]), x_test)
                paths.append(path)
                stats.append(
                    {
                        "acc": float(np.mean(logits.argmax(1) == y_test)),
                        "agree": float(np.mean(logits.argmax(1) == keras_pred)),
                        "max_logit_diff": float(np.max(np.abs(logits - keras_logits))),
                        "codes": codes,
                    }
                )
                print(
                    f"  w{bits} {fmt}: {sizes[-1]:,} B in {seconds:.1f} s, agree {100 * stats[-1]['agree']:.2f}%, "
                    f"max |dlogit| {stats[-1]['max_logit_diff']:.2e} {codes}",
                    flush=True,
                )
            load_before = os.getloadavg()[0]
            times = {
                t: latencies([Runner(p, t) for p in paths], x_test[0], args.runs, args.rounds)
                for t in args.threads
            }
            load = (load_before + os.getloadavg()[0]) / 2
            for i, (fmt, size, stat) in enumerate(zip(FORMATS, sizes, stats)):
                rows.append(
                    {
                        "arch": arch,
                        "input": shape,
                        "bits": bits,
                        "format": fmt,
                        "bytes": size,
                        "float_over_size": sizes[0] / size,
                        "keras_acc": float(np.mean(keras_pred == y_test)),
                        "acc": stat["acc"],
                        "agree": stat["agree"],
                        "max_logit_diff": stat["max_logit_diff"],
                        "max_abs_logit": float(np.max(np.abs(keras_logits))),
                        **{f"latency_ms_{t}_threads": times[t][i] for t in args.threads},
                        "load_avg": load,
                        "codes_from_file": stat["codes"],
                        "teacher_acc": teacher_acc,
                        "params": student.count_params(),
                    }
                )
            for t in args.threads:
                print(
                    f"  {t} threads: "
                    + ", ".join(f"{fmt} {ms:.3f} ms" for fmt, ms in zip(FORMATS, times[t])),
                    flush=True,
                )
            print(f"  (load {load:.2f})", flush=True)

    command = "python benchmarks/deploy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
    _harness.write_rows(args.csv, list(rows[0]), rows)
    from importlib.metadata import version

    threads = " / ".join(map(str, args.threads))
    header = (
        "| network | weights | format | size | float / size | agreement with Keras "
        "| max abs logit diff (max abs logit) "
        f"| accuracy (Keras) | latency ms, {threads} threads | load avg | codes read from the file |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for r in rows:
        latency = " / ".join(f"{r[f'latency_ms_{t}_threads']:.3f}" for t in args.threads)
        lines.append(
            f"| {r['arch']} ({r['input']}) | {r['bits']}-bit | {r['format']} | {r['bytes'] / 1024:,.1f} kB "
            f"| {r['float_over_size']:.2f}x | {100 * r['agree']:.2f}% "
            f"| {r['max_logit_diff']:.2e} ({r['max_abs_logit']:.1f}) "
            f"| {100 * r['acc']:.2f}% ({100 * r['keras_acc']:.2f}%) | {latency} | {r['load_avg']:.2f} "
            f"| {r['codes_from_file'] or '-'} |"
        )
    teachers = sorted({(r["arch"], r["input"], r["teacher_acc"]) for r in rows})
    text = (
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}, ai-edge-litert {version('ai-edge-litert')}, "
        f"onnxruntime {onnxruntime.__version__}; {_harness.cpu_model()}, {os.cpu_count()} cores; "
        f"{time.perf_counter() - started:.0f} s.\nCommand: `{command.strip()}`\n"
        + "".join(f"Teacher {a} ({s}): {100 * acc:.2f}%.\n" for a, s, acc in teachers)
        + "\n"
        + "\n".join(lines)
        + "\n"
    )
    print()
    print(text)
    _harness.write_text(args.md, text)
    if args.png:
        plot(rows, args.png, args.threads)
    return 0


def plot(rows, path, threads):
    plt = _harness.pyplot()
    cells = list(dict.fromkeys((r["arch"], r["bits"]) for r in rows))
    labels = [f"{arch}\n{bits}-bit" for arch, bits in cells]
    x = np.arange(len(cells))
    width = 0.8 / len(FORMATS)
    fig, (ax_kb, ax_ms) = plt.subplots(1, 2, figsize=(13, 4.2))
    for k, fmt in enumerate(FORMATS):
        by_cell = {(r["arch"], r["bits"]): r for r in rows if r["format"] == fmt}
        offset = (k - (len(FORMATS) - 1) / 2) * width
        label = "onnx" if fmt == "onnx" else f"tflite {fmt}"
        ax_kb.bar(x + offset, [by_cell[c]["bytes"] / 1024 for c in cells], width, label=label)
        ax_ms.bar(
            x + offset,
            [by_cell[c][f"latency_ms_{threads[0]}_threads"] for c in cells],
            width,
            label=label,
        )
    for ax, title in (
        (ax_kb, "file size (kB, log scale)"),
        (
            ax_ms,
            f"batch-1 latency (ms, median, {threads[0]} thread{'s' * (threads[0] > 1)}, log scale)",
        ),
    ):
        ax.set_xticks(x, labels)
        ax.set_title(title)
        ax.legend(fontsize=8)
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
