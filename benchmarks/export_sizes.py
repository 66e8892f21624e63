"""Sizes of a CIFAR ResNet20 student on disk: float32 Keras vs bit-packed (.faqd) vs TFLite.

Builds ResNet20 (32x32x3 input, 10 classes, full-precision activations) at weight_bits 1/2/4/8 (and
the float32 model for reference) with **random initial weights** (sizes do not depend on the
values; a trained student gives the same sizes up to the zlib-compressed manifest, a few hundred
bytes), then writes for each:

- the float32 parameter bytes (4 bytes per stored parameter) and the ``model.save`` ``.keras`` file;
- ``faqd_tf.export.pack``: the ``.faqd`` file and its payload as counted by ``faqd_tf.summary``;
- ``faqd_tf.export.to_tflite``: float32 weights (outputs equal Keras'), and ``mode="int8"`` (the
  quantized kernels stored as their integer codes in int8 tensors, activations float);

and checks the (float-weight) TFLite interpreter against Keras on 8 random images: the largest
absolute logit difference relative to the largest absolute logit. Prints a markdown table and
writes it to ``--output``.

    python benchmarks/export_sizes.py --output saved_models/export_sizes.md
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import _harness  # noqa: E402
from faqd_tf.export import pack, run_tflite, to_tflite  # noqa: E402
from faqd_tf.models import resnet_cifar  # noqa: E402
from faqd_tf.summary import summary  # noqa: E402


def kb(n):
    return f"{n / 1024:,.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--per-channel", action="store_true", help="one scale per output channel")
    parser.add_argument(
        "--output", default="saved_models/export_sizes.md", help="markdown table file"
    )
    parser.add_argument(
        "--workdir", default=None, help="keep the exported files here (default: a temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    keras_seed = int(rng.integers(2**31))
    import keras

    keras.utils.set_random_seed(keras_seed)
    x = rng.normal(size=(8, 32, 32, 3)).astype(np.float32)
    workdir = args.workdir or tempfile.mkdtemp(prefix="export_sizes_")
    os.makedirs(workdir, exist_ok=True)

    header = (
        "| weights | params | float32 (4 B/param) | .keras file | packed payload | .faqd file | float32 / .faqd "
        "| .tflite | .tflite int8 codes | TFLite vs Keras: max abs diff / max abs logit |"
    )
    lines = [header, "|" + "|".join(["---"] * (header.count("|") - 1)) + "|"]
    for bits in [None, *args.bits]:
        name = "fp32" if bits is None else f"w{bits}"
        model = resnet_cifar(
            args.depth, weight_bits=bits, per_channel=args.per_channel and bits is not None
        )
        info = summary(model, print_fn=None)
        keras_path = os.path.join(workdir, f"resnet{args.depth}_{name}.keras")
        model.save(keras_path)
        packed_path = os.path.join(workdir, f"resnet{args.depth}_{name}.faqd")
        packed = pack(model, packed_path)
        start = time.perf_counter()
        tflite_path = os.path.join(workdir, f"resnet{args.depth}_{name}.tflite")
        tflite = to_tflite(model, tflite_path)
        seconds = time.perf_counter() - start
        tflite8 = (
            None
            if bits is None
            else to_tflite(
                model, os.path.join(workdir, f"resnet{args.depth}_{name}_int8.tflite"), mode="int8"
            )
        )
        want = model(x, training=False).numpy()
        diff = float(np.max(np.abs(run_tflite(tflite_path, x) - want)) / np.max(np.abs(want)))
        float_bytes = 4 * info.total_params
        label = (
            "float32"
            if bits is None
            else f"{bits}-bit" + (" per-channel" if args.per_channel else "")
        )
        lines.append(
            f"| {label} | {info.total_params:,} | {kb(float_bytes)} kB | {kb(os.path.getsize(keras_path))} kB "
            f"| {kb(info.packed_bytes)} kB | {kb(packed)} kB | {float_bytes / packed:.2f}x "
            f"| {kb(tflite)} kB | {'-' if tflite8 is None else kb(tflite8) + ' kB'} | {diff:.1e} |"
        )
        print(
            f"{label}: packed {packed:,} B, tflite {tflite:,} B (converted in {seconds:.1f} s)",
            flush=True,
        )

    command = "python benchmarks/export_sizes.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    table = "\n".join(lines)
    text = (
        f"ResNet{args.depth} (CIFAR, 32x32x3, 10 classes, full-precision activations, random init, seed {args.seed}); "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; {_harness.cpu_model()}, {os.cpu_count()} cores.\n"
        f"Command: `{command.strip()}`\n\n{table}\n"
    )
    print()
    print(text)
    if args.output:
        _harness.write_text(args.output, text)
        print(f"written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
