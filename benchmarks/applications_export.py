"""keras.applications networks through faqd_tf.export: ONNX (float and 4-bit quantized) and .faqd.

Builds MobileNet, MobileNetV2 and EfficientNetB0 with **random initial weights** (weights=None,
classes=10, include_top with classifier_activation=None, a small input), quantizes each with
``quantize_model(weight_bits=4)``, and writes the float model and the student through
``faqd_tf.export.write("onnx", ...)`` and the student through ``write("packed", ...)``. Each file is
run (onnxruntime, or ``unpack`` then Keras) on 4 random images and compared with Keras: the largest
absolute logit difference relative to the largest absolute logit. Prints one markdown row per network
and export; a failed export prints its one-line error instead.

    python benchmarks/applications_export.py --size 32
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from faqd_tf import export  # noqa: E402
from faqd_tf.quantize import quantize_model  # noqa: E402

NETWORKS = ("MobileNet", "MobileNetV2", "EfficientNetB0")


def relative_gap(got, want):
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=32, help="input height and width (>= 32)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    folder = tempfile.mkdtemp()
    print("| network | export | file bytes | max |logit gap| / max |logit| | seconds |")
    print("|---|---|---:|---:|---:|")
    for name in args.networks:
        model = getattr(keras.applications, name)(
            weights=None,
            classes=10,
            input_shape=(args.size, args.size, 3),
            classifier_activation=None,
        )
        # EfficientNet rescales 0-255 images itself; the MobileNets take [-1, 1].
        scale = 255.0 if name.startswith("EfficientNet") else 1.0
        x = (
            scale * rng.uniform(-1 if scale == 1 else 0, 1, size=(4, args.size, args.size, 3))
        ).astype(np.float32)
        student = quantize_model(model, weight_bits=4)
        for label, net, kind in (
            ("onnx fp32", model, "onnx"),
            ("onnx 4-bit", student, "onnx"),
            ("packed 4-bit", student, "packed"),
        ):
            path = os.path.join(folder, f"{name}-{label.replace(' ', '-')}.{kind}")
            start = time.perf_counter()
            try:
                nbytes = export.write(kind, net, path)
                got = (
                    export.run_onnx(path, x)
                    if kind == "onnx"
                    else keras.ops.convert_to_numpy(export.unpack(path)(x))
                )
            except Exception as err:  # reported, not raised: the table shows which pass
                print(
                    f"| {name} | {label} | - | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]} | - |"
                )
                continue
            gap = relative_gap(got, keras.ops.convert_to_numpy(net(x, training=False)))
            print(
                f"| {name} | {label} | {nbytes} | {gap:.1e} | {time.perf_counter() - start:.1f} |"
            )


if __name__ == "__main__":
    main()
