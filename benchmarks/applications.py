"""Bring your own convnet (issue 37): every `keras.applications` network through the library's steps.

Not run in CI. Each network (weights=None, classes=10, classifier_activation=None, at its minimum
input: 32x32x3, 75 for InceptionV3 / InceptionResNetV2, 71 for Xception) and three small models of
our own (a Sequential CNN, a Conv1D signal classifier on (L, C) input, a segmentation net with
Conv2DTranspose and per-pixel logits) runs in its own subprocess with a timeout through:

- `build`: the FP teacher (random weights);
- `quantize`: `quantize_model(teacher, weight_bits=4)`; detail: layers quantized / kept float;
- `taps`: `faqd_tf.features.feature_layers(teacher)`;
- `distill`: `Distiller(student, teacher, kd="kl", fa="exact")` compiled (SGD) and fit for
  `--fit-steps` label-free steps on real Fashion-MNIST images (resized, channel repeated x3);
- `save_load`: `student.save` + `keras.models.load_model(safe_mode=True)` in the same process,
  outputs compared on the batch;
- `recalibrate_bn`: `recalibrate_batchnorm(student, batch)`;
- `export:<kind>` for each kind of `faqd_tf.export.KINDS`: `check(kind, student)` first (its
  ValueError is recorded as `refused`), then `write`, then the file runs in its runtime (packed:
  `unpack` and Keras; TFLite: the LiteRT interpreter; ONNX: onnxruntime) and its top-1 agreement
  with the Keras student on the batch is recorded (per pixel for the segmentation net).

The weights are random: agreement figures check the export's arithmetic only and say nothing
about accuracy (they are labelled "synthetic").

Statuses: ok, refused (the library's one-line refusal), error (anything else, one line), timeout
(the subprocess was killed in that step), skipped (an earlier step it needs failed).
Resumable: rows are appended to the CSV as each step finishes; a network with its `done` row is
not rerun; the partial rows of a network killed with the parent are dropped and the network
reruns. The markdown table is rewritten from the CSV after every network.

    python benchmarks/applications.py --csv docs/applications.csv --md docs/applications.md
    python benchmarks/applications.py --only MobileNetV2 --csv /tmp/a.csv --md /tmp/a.md
"""

import argparse
import datetime
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST, ROOT, append_rows, read_rows  # noqa: E402

# The smallest input each application accepts with include_top (its stem's valid convolutions and
# pooling need it); every other one builds at 32x32.
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
OWN = ("own_sequential_cnn", "own_conv1d", "own_segmentation")
# Cheapest first (parameter count at the minimum input, measured here), so that a limited run
# covers as many networks as possible; our own three come first.
APPLICATIONS = (
    "MobileNetV3Small",
    "MobileNetV2",
    "MobileNet",
    "EfficientNetB0",
    "MobileNetV3Large",
    "NASNetMobile",
    "EfficientNetV2B0",
    "EfficientNetB1",
    "EfficientNetV2B1",
    "DenseNet121",
    "EfficientNetB2",
    "EfficientNetV2B2",
    "EfficientNetB3",
    "DenseNet169",
    "EfficientNetV2B3",
    "EfficientNetB4",
    "DenseNet201",
    "EfficientNetV2S",
    "InceptionV3",
    "Xception",
    "ResNet50V2",
    "ResNet50",
    "ConvNeXtTiny",
    "EfficientNetB5",
    "EfficientNetB6",
    "ResNet101V2",
    "ResNet101",
    "ConvNeXtSmall",
    "InceptionResNetV2",
    "EfficientNetV2M",
    "ResNet152V2",
    "ResNet152",
    "EfficientNetB7",
    "NASNetLarge",
    "ConvNeXtBase",
    "EfficientNetV2L",
    "VGG16",
    "VGG19",
    "ConvNeXtLarge",
    "ConvNeXtXLarge",
)
NETWORKS = OWN + APPLICATIONS
FIELDS = ("network", "input_shape", "step", "status", "detail", "seconds")


class Refused(Exception):
    """`faqd_tf.export.check` refused the model (its message, one line)."""


def one_line(error):
    """`Type: first line` of an exception (the library's errors are one line; a longer one is marked)."""
    if isinstance(error, Refused):
        return str(error)
    lines = str(error).strip().splitlines() or [""]
    more = f" [+{len(lines) - 1} more lines]" if len(lines) > 1 else ""
    return f"{type(error).__name__}: {lines[0][:300]}{more}"


def input_shape(name, size=None):
    """The teacher's input shape (without batch) for network `name`; `size` overrides the image side."""
    if name == "own_conv1d":
        return (28, 28)  # Fashion-MNIST rows as a sequence: L = 28 steps of C = 28 values
    side = size or MIN_SIZE.get(name, 32)
    return (side, side, 3)


def build(name, size=None, seed=0):
    """The FP teacher `name` with random weights drawn from `seed`."""
    import keras

    keras.utils.set_random_seed(seed)
    shape = input_shape(name, size)
    layers = keras.layers
    if name == "own_sequential_cnn":
        return keras.Sequential(
            [
                keras.Input(shape),
                layers.Conv2D(16, 3, padding="same", activation="relu"),
                layers.BatchNormalization(),
                layers.MaxPooling2D(),
                layers.Conv2D(32, 3, padding="same", use_bias=False),
                layers.BatchNormalization(),
                layers.ReLU(),
                layers.GlobalAveragePooling2D(),
                layers.Dense(10),
            ],
            name=name,
        )
    if name == "own_conv1d":
        inputs = keras.Input(shape)
        x = layers.Conv1D(32, 5, padding="same", use_bias=False)(inputs)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.MaxPooling1D()(x)
        x = layers.Conv1D(64, 3, padding="same", activation="relu")(x)
        x = layers.GlobalAveragePooling1D()(x)
        return keras.Model(inputs, layers.Dense(10)(x), name=name)
    if name == "own_segmentation":
        # Encoder-decoder with per-pixel logits: 10 "classes" per pixel at the input resolution.
        inputs = keras.Input(shape)
        x = layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
        x = layers.Conv2DTranspose(16, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization()(x)
        x = layers.ReLU()(x)
        x = layers.Conv2DTranspose(16, 3, strides=2, padding="same", activation="relu")(x)
        return keras.Model(inputs, layers.Conv2D(10, 1, name="pixel_logits")(x), name=name)
    return getattr(keras.applications, name)(
        weights=None, classes=10, classifier_activation=None, input_shape=shape
    )


def images(name, count=8, size=None):
    """The first `count` Fashion-MNIST training images as network `name` takes them (NumPy)."""
    import numpy as np

    from faqd_tf import data

    shape = input_shape(name, size)
    side = None if len(shape) == 2 else shape[:2]
    ds = data.load(
        FMNIST,
        "train",
        labels=False,
        batch_size=count,
        shuffle=False,
        augment=False,
        image_size=side,
        limit=count,
    )
    x = np.asarray(next(iter(ds)), np.float32)
    if len(shape) == 2:
        return x[..., 0]  # (N, 28, 28): rows as time steps
    return np.repeat(x, 3, axis=-1) if x.shape[-1] == 1 else x


def top1(y):
    import numpy as np

    return np.argmax(np.asarray(y), axis=-1)


def run_steps(
    name, workdir, count=8, fit_steps=2, size=None, kinds=None, seed=0, emit=print, progress=None
):
    """Runs network `name` through every step; calls `emit(row)` with a dict per finished step.

    `progress(step)` is called as each step starts (the benchmark's parent reads it to name the
    step a timeout killed). Returns the list of rows.
    """
    import warnings

    import keras
    import numpy as np

    import faqd_tf
    from faqd_tf import export, features, quantize

    rows = []
    shape = "x".join(str(d) for d in input_shape(name, size))

    def record(step, status, detail, start):
        row = {
            "network": name,
            "input_shape": shape,
            "step": step,
            "status": status,
            "detail": detail,
            "seconds": f"{time.perf_counter() - start:.2f}",
        }
        rows.append(row)
        emit(row)

    def attempt(step, fn, needs=True, refusal=()):
        """Runs `fn()` -> detail; records ok / refused (one of `refusal`) / error / skipped."""
        if progress:
            progress(step)
        start = time.perf_counter()
        if not needs:
            record(step, "skipped", "an earlier step failed", start)
            return False
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                detail = fn()
        except refusal as error:
            record(step, "refused", one_line(error), start)
            return False
        except Exception as error:  # noqa: BLE001 - the benchmark records every failure, one line
            record(step, "error", one_line(error), start)
            return False
        record(step, "ok", detail, start)
        return True

    state = {}
    x = images(name, count, size)

    def do_build():
        state["teacher"] = build(name, size, seed)
        return f"{state['teacher'].count_params()} params, {len(state['teacher'].layers)} layers"

    def do_quantize():
        student = faqd_tf.quantize_model(state["teacher"], weight_bits=4)
        kernels = [layer for _, layer in quantize._walk(student) if quantize._has_kernel(layer)]
        floats = quantize.float_kernel_layers(student)
        state["student"] = student
        kept = "; ".join(f"{path}: {why}" for path, why in list(floats.items())[:3])
        more = f" +{len(floats) - 3}" if len(floats) > 3 else ""
        return f"{len(kernels) - len(floats)} quantized, {len(floats)} float ({kept}{more})"

    def do_taps():
        taps = features.feature_layers(state["teacher"])
        state["taps"] = taps
        return f"{len(taps)} taps: {' '.join(taps)}"

    def do_distill():
        import tensorflow as tf

        distiller = faqd_tf.Distiller(
            state["student"], state["teacher"], kd="kl", fa="exact", seed=seed
        )
        # A small step: the networks are random, a large one can overflow the deep ones' logits.
        distiller.compile(keras.optimizers.SGD(1e-3, momentum=0.9))
        ds = tf.data.Dataset.from_tensor_slices(x).batch(max(1, count // 2)).repeat()
        history = distiller.fit(ds, epochs=1, steps_per_epoch=fit_steps, verbose=0)
        logs = {k: float(v[-1]) for k, v in history.history.items()}
        if not all(np.isfinite(v) for v in logs.values()):
            raise FloatingPointError(f"loss not finite after {fit_steps} steps: {logs}")
        return f"{fit_steps} steps, {len(distiller.feature_pairs)} FA pairs, " + ", ".join(
            f"{k} {v:.4g}" for k, v in sorted(logs.items())
        )

    def do_save_load():
        path = os.path.join(workdir, f"{name}.keras")
        state["student"].save(path)
        loaded = keras.models.load_model(path, safe_mode=True)
        a = np.asarray(state["student"](x, training=False))
        b = np.asarray(loaded(x, training=False))
        diff = float(np.max(np.abs(a - b)))
        scale = float(np.max(np.abs(a))) or 1.0
        # Same process, same weights and kernels: only float reassociation may differ.
        if not diff <= 1e-4 * scale + 1e-6:
            raise AssertionError(
                f"loaded model differs: max |diff| {diff:.3g} at output scale {scale:.3g}"
            )
        return f"max |diff| {diff:.2g} (scale {scale:.2g}), {os.path.getsize(path) / 1e6:.1f} MB"

    def do_recalibrate():
        names = faqd_tf.recalibrate_batchnorm(state["student"], x)
        return f"{len(names)} BatchNormalization layers"

    ok = attempt("build", do_build)
    quantized = attempt("quantize", do_quantize, ok)
    attempt("taps", do_taps, ok)
    attempt("distill", do_distill, quantized)
    attempt("save_load", do_save_load, quantized)
    attempt("recalibrate_bn", do_recalibrate, quantized)
    reference = reference_logits = None
    for kind in kinds or export.KINDS:

        def do_export(kind=kind):
            nonlocal reference, reference_logits
            student = state["student"]
            try:
                export.check(kind, student)  # the library's refusal, before any converter runs
            except ValueError as error:
                raise Refused(f"check: {one_line(error)}") from None
            path = os.path.join(workdir, f"{name}-{export.FILENAMES[kind]}")
            calibration = x if export.needs_calibration(kind) else None
            nbytes = export.write(kind, student, path, calibration=calibration)
            if reference is None:
                reference_logits = np.asarray(student(x, training=False))
                reference = top1(reference_logits)
            if kind == "packed":
                y = export.unpack(path)(x, training=False)
            elif kind == "onnx":
                y = export.run_onnx(path, x)
            else:
                y = export.run_tflite(path, x)
            agree = float(np.mean(top1(y) == reference))
            # Random weights give near-tied logits, where top-1 flips on rounding: the relative
            # logit error tells an export's arithmetic error from a tie.
            error = float(np.max(np.abs(np.asarray(y) - reference_logits)))
            scale = float(np.max(np.abs(reference_logits))) or 1.0
            return (
                f"top-1 agreement {100 * agree:.1f}% (synthetic), max |logit diff|/scale {error / scale:.2g}, "
                f"{nbytes / 1e6:.2f} MB"
            )

        attempt(f"export:{kind}", do_export, quantized, refusal=(Refused,))
    return rows


# ---- the benchmark's parent: one subprocess per network, resumable CSV, markdown table ----------


def append_row(path, row):
    append_rows(path, FIELDS, [row])  # fsynced: a kill loses nothing


# The packed file and the float TFLite file hold the student's own codes with float arithmetic:
# their logits must match the Keras student's to rounding whatever the weights. One that runs but
# differs by more than 1% of the largest logit is shown as a mismatch (an export bug).
EXACT_EXPORTS = ("export:packed", "export:tflite")


def cell_status(row):
    found = re.search(r"max \|logit diff\|/scale ([^,]+),", row["detail"])
    if (
        row["status"] == "ok"
        and row["step"] in EXACT_EXPORTS
        and found
        and float(found.group(1)) >= 1e-2
    ):
        return "mismatch"
    return row["status"]


SHORT = {
    "ok": "ok",
    "mismatch": "**mismatch**",
    "refused": "refused",
    "error": "**error**",
    "timeout": "**timeout**",
    "skipped": "-",
}


def write_markdown(csv_path, md_path, command):
    rows = [r for r in read_rows(csv_path) if r["step"] != "done"]
    steps = []
    for r in rows:
        if r["step"] not in steps:
            steps.append(r["step"])
    order = [n for n in NETWORKS if any(r["network"] == n for r in rows)]
    cells = {(r["network"], r["step"]): r for r in rows}
    lines = [
        "# Every keras.applications network through quantize, distill, save, recalibrate and export (issue 37)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_harness.cpu_model()}, {os.cpu_count()} cores, shared with other benchmarks (times are loaded).  ",
        f"Written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"from `{os.path.relpath(csv_path, ROOT)}`.",
        "",
        "Random weights (weights=None): the export agreement figures are **synthetic** (top-1 of the",
        "exported file against the Keras student on 8 Fashion-MNIST images) and say nothing about",
        "accuracy; see docs/trained_applications.csv for trained networks. Each cell: the step's status",
        "(`refused`: the library's one-line refusal; `-`: skipped, an earlier step failed; `mismatch`: the",
        "packed or float TFLite file runs but its logits differ from the Keras student's by over 1% of",
        "the largest, an export bug), then seconds.",
        "",
        "| network | input | " + " | ".join(s.replace("export:", "") for s in steps) + " |",
        "|---|---|" + "---|" * len(steps),
    ]
    for n in order:
        shape = next(r["input_shape"] for r in rows if r["network"] == n)
        row = []
        for s in steps:
            r = cells.get((n, s))
            row.append(
                ""
                if r is None
                else f"{SHORT.get(cell_status(r), cell_status(r))} {float(r['seconds'] or 0):.0f}s"
            )
        lines.append(f"| {n} | {shape} | " + " | ".join(row) + " |")
    lines += ["", "## Details (quantized/float layers, taps, refusal and error lines)", ""]
    for n in order:
        lines.append(f"- **{n}**")
        for s in steps:
            r = cells.get((n, s))
            if r is not None and r["status"] != "skipped":
                lines.append(f"  - {s}: {cell_status(r)}: {r['detail'].replace('|', '/')}")
    _harness.write_text(md_path, "\n".join(lines) + "\n")


def run_child(args):
    """The subprocess: one network, rows appended to the CSV as they finish."""
    progress_path = args.csv + ".progress"

    def progress(step):
        with open(progress_path, "w") as f:
            f.write(step)

    with tempfile.TemporaryDirectory(prefix=f"faqd_app_{args.child}_") as workdir:
        run_steps(
            args.child,
            workdir,
            count=args.images,
            fit_steps=args.fit_steps,
            size=args.size,
            seed=args.seed,
            emit=lambda row: append_row(args.csv, row),
            progress=progress,
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", default=os.path.join(_harness.DOCS, "applications.csv"))
    parser.add_argument("--md", default=os.path.join(_harness.DOCS, "applications.md"))
    parser.add_argument("--only", nargs="*", help="network names (default: all, cheapest first)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds per network")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--fit-steps", type=int, default=2)
    parser.add_argument(
        "--size", type=int, default=None, help="image side (default: each network's minimum)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rerun", action="store_true", help="rerun networks already finished")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return run_child(args)
    command = "python " + " ".join(
        shlex.quote(a) for a in [os.path.relpath(__file__, ROOT)] + list(argv or sys.argv[1:])
    )
    networks = args.only or list(NETWORKS)
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        parser.error(f"unknown networks {unknown}; choose from {', '.join(NETWORKS)}")
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    for name in networks:
        rows = read_rows(args.csv)
        done = any(r["network"] == name and r["step"] == "done" for r in rows)
        if done and not args.rerun:
            print(f"[applications] {name}: finished earlier, kept", flush=True)
            continue
        # A network cut short (or rerun) starts again from its build: drop its earlier rows.
        _harness.write_rows(args.csv, FIELDS, [r for r in rows if r["network"] != name])
        progress_path = args.csv + ".progress"
        if os.path.exists(progress_path):
            os.remove(progress_path)
        child = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            name,
            "--csv",
            args.csv,
            "--images",
            str(args.images),
            "--fit-steps",
            str(args.fit_steps),
            "--seed",
            str(args.seed),
        ]
        if args.size:
            child += ["--size", str(args.size)]
        start = time.perf_counter()
        proc = subprocess.Popen(
            child,
            env=_harness.child_env(),
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            _, err = proc.communicate(timeout=args.timeout)
            status = f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the converter's threads go too
            _, err = proc.communicate()
            step = open(progress_path).read() if os.path.exists(progress_path) else "build"
            append_row(
                args.csv,
                {
                    "network": name,
                    "input_shape": "x".join(map(str, input_shape(name, args.size))),
                    "step": step,
                    "status": "timeout",
                    "detail": f"killed after {args.timeout:.0f} s (whole network)",
                    "seconds": f"{time.perf_counter() - start:.2f}",
                },
            )
            status = "timeout"
        if proc.returncode not in (0, None) and status != "timeout":
            last = [l for l in (err or "").strip().splitlines() if l.strip()][-1:] or ["no output"]
            finished = {r["step"] for r in read_rows(args.csv) if r["network"] == name}
            step = open(progress_path).read() if os.path.exists(progress_path) else "build"
            if step not in finished:
                append_row(
                    args.csv,
                    {
                        "network": name,
                        "input_shape": "",
                        "step": step,
                        "status": "error",
                        "detail": f"process died ({status}): {last[0][:300]}",
                        "seconds": f"{time.perf_counter() - start:.2f}",
                    },
                )
        append_row(
            args.csv,
            {
                "network": name,
                "step": "done",
                "status": status,
                "seconds": f"{time.perf_counter() - start:.2f}",
            },
        )
        summary = {r["step"]: r["status"] for r in read_rows(args.csv) if r["network"] == name}
        print(f"[applications] {name}: {time.perf_counter() - start:.0f} s {summary}", flush=True)
        write_markdown(args.csv, args.md, command)
    if os.path.exists(args.csv + ".progress"):
        os.remove(args.csv + ".progress")
    write_markdown(args.csv, args.md, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
