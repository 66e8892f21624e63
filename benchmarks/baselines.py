"""Label-free baselines a user tries before training anything (issue 24, part 1).

Two trained full-precision teachers on Fashion-MNIST 28x28x1 (inputs normalized as `train.py` feeds
them): the quickstart's ResNet8 (`docs/budget/teacher.keras`, the teacher of the long FAQD/KD runs)
and a ResNet20 trained once by `train.py --config configs/quickstart.json --stage teacher --set
teacher.arch=resnet20` (cached under `--cache`). Each method below starts from the teacher in memory
and ends with a file on disk; it is timed over that span (wall clock, with the 1-minute load
average at its start: the machine is shared) and scored on the 10,000 test images. No method sees
a label; calibration uses the first `--calibration` training images, unlabeled.

- `tflite_float`: the float teacher through the TFLite converter (reference for the TFLite rows).
- `tflite_dynamic_int8`: the converter's dynamic-range quantization (`optimizations=[DEFAULT]`, no
  representative dataset): int8 weights, float activations quantized on the fly where TFLite has a
  hybrid kernel.
- `tflite_full_int8`: full-integer post-training quantization: int8 weights and activations, the
  activation ranges calibrated on the representative dataset of unlabeled training images, float32
  input and output (the converter's default; the model's first and last ops quantize/dequantize).
- `aeq_int4_weight_only`, `aeq_int4_dynamic`: ai-edge-quantizer's int4 recipes
  (`weight_only_wi4_afp32`, `dynamic_wi4_afp32`: channel-wise min-max int4 weights of every
  conv and dense layer, the classifier included) applied to the float `.tflite`.
- `rtn`: `faqd_tf.quantize_model(teacher, weight_bits=b)`, round-to-nearest onto this library's
  grid (least-squares scale), layer-wise or per-channel, the classifier in full precision, no
  training; `rtn_bn`: the same, then `faqd_tf.recalibrate_batchnorm` on the calibration images.
  Evaluated in Keras; the file is the packed `.faqd` (`faqd_tf.export.pack`); `keras_bytes` is the
  twin's `.keras` file (float kernels).
- `fp_bn`: the float teacher after `recalibrate_batchnorm` (what recalibration alone does).
- `rtn_bn_tflite_int4`: the 4-bit `rtn_bn` student through `faqd_tf.export.to_tflite(mode="int4")`
  run in the LiteRT interpreter, when the library has that mode (or `--int4-faqd-tf DIR` names a
  checkout that has it); otherwise a row marked TODO.

Rows are appended to the CSV as they finish; a second run skips the rows already there (resume).

    python benchmarks/baselines.py --csv docs/baselines.csv --md docs/baselines.md --png docs/baselines.png
"""

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST, ROOT, read_rows  # noqa: E402

TEACHER_EPOCHS = 3  # configs/quickstart.json, teacher.train.epochs
FIELDS = (
    "teacher",
    "teacher_acc",
    "method",
    "bits",
    "granularity",
    "runtime",
    "accuracy",
    "seconds",
    "file_bytes",
    "keras_bytes",
    "calibration",
    "load1",
    "notes",
)
AEQ_RECIPES = {
    "aeq_int4_weight_only": "weight_only_wi4_afp32",
    "aeq_int4_dynamic": "dynamic_wi4_afp32",
}
LABELS = {
    "tflite_float": "TFLite float",
    "tflite_dynamic_int8": "TFLite dynamic-range int8 (weights)",
    "tflite_full_int8": "TFLite full-integer int8",
    "aeq_int4_weight_only": "ai-edge-quantizer int4 weight-only",
    "aeq_int4_dynamic": "ai-edge-quantizer int4 dynamic",
    "rtn": "RTN",
    "rtn_bn": "RTN + BN recalibration",
    "rtn_bn_tflite_int4": "RTN + BN recal. -> to_tflite int4",
    "fp": "FP teacher (Keras)",
    "fp_bn": "FP teacher + BN recalibration",
}


def fashion_mnist(calibration):
    """`(x_cal, x_test, y_test)`: the first `calibration` training images (no labels) and the test
    split, normalized as `train.py` feeds them."""
    from faqd_tf import data

    x_cal = np.concatenate(
        list(
            data.load(
                FMNIST,
                "train",
                labels=False,
                batch_size=1000,
                shuffle=False,
                augment=False,
                limit=calibration,
            ).as_numpy_iterator()
        )
    )
    test = list(data.load(FMNIST, "test", labels=True, batch_size=1000).as_numpy_iterator())
    return x_cal, np.concatenate([x for x, _ in test]), np.concatenate([y for _, y in test])


def teacher_path(arch, cache):
    """The teacher file of `arch`; the ResNet20 is trained (about 3 epochs' time) if missing."""
    if arch == "resnet8":
        return os.path.join(ROOT, "docs", "budget", "teacher.keras")
    out = os.path.join(cache, arch)
    path = os.path.join(out, "teacher.keras")
    if not os.path.exists(path):
        print(f"[baselines] training the {arch} teacher with train.py", flush=True)
        subprocess.run(
            _harness.quickstart_command(
                "--stage", "teacher", "--set", f"teacher.arch={arch}", "--set", f"output_dir={out}"
            ),
            check=True,
            cwd=ROOT,
        )
    return path


def keras_logits(model, x):
    return model.predict(x, batch_size=500, verbose=0)


def tflite_logits(path, x, threads=2, batch=1000):
    from faqd_tf.export import run_tflite

    return np.concatenate(
        [run_tflite(path, x[i : i + batch], num_threads=threads) for i in range(0, len(x), batch)]
    )


def tflite_ptq(model, path, method, calibration=None):
    """Converts the float `model` with the TFLite converter (`method`: `tflite_float`,
    `tflite_dynamic_int8` or `tflite_full_int8`); returns the file size."""
    import tensorflow as tf

    kwargs = {}
    if method != "tflite_float":
        kwargs["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if method == "tflite_full_int8":

        def representative():
            for image in calibration:
                yield [image[None].astype(np.float32)]

        kwargs.update(
            representative_dataset=representative,
            target_spec={"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]},
        )
    model.export(path, format="litert", verbose=False, **kwargs)
    return os.path.getsize(path)


def aeq_int4(float_path, path, method):
    """ai-edge-quantizer's int4 recipe `method` applied to the float `.tflite`; returns the file size."""
    from ai_edge_quantizer import quantizer, recipe

    result = quantizer.Quantizer(float_path, getattr(recipe, AEQ_RECIPES[method])()).quantize(
        enable_progress_report=False
    )
    result.export_model(path, overwrite=True)
    return os.path.getsize(path)


def rtn(teacher, bits, per_channel, path, calibration=None):
    """Round-to-nearest `bits`-bit twin of `teacher` (BN recalibrated on `calibration` if given),
    packed to `path`; returns `(student, packed bytes)`."""
    from faqd_tf import quantize_model, recalibrate_batchnorm
    from faqd_tf.export import pack

    student = quantize_model(teacher, weight_bits=bits, per_channel=per_channel)
    if calibration is not None:
        recalibrate_batchnorm(student, calibration)
    return student, pack(student, path)


def int4_export(student_path, path, faqd_tf_dir=None):
    """`to_tflite(student, path, mode="int4")`, in this process when the library has the mode, else
    in a subprocess importing faqd_tf from `faqd_tf_dir`; returns `(bytes, seconds, note)`, or None."""
    from faqd_tf.export import MODES

    if "int4" in MODES:
        import keras

        from faqd_tf.export import to_tflite

        start = time.perf_counter()
        size = to_tflite(keras.models.load_model(student_path, safe_mode=True), path, mode="int4")
        return size, time.perf_counter() - start, "faqd_tf.export.to_tflite(mode='int4')"
    if not faqd_tf_dir:
        return None
    code = (
        "import sys, time, keras\nfrom faqd_tf.export import to_tflite\n"
        "m = keras.models.load_model(sys.argv[1], safe_mode=True)\nt = time.perf_counter()\n"
        "n = to_tflite(m, sys.argv[2], mode='int4')\nprint(n, time.perf_counter() - t)\n"
    )
    # cwd = the checkout, so that its faqd_tf (not this one) is the one imported.
    out = subprocess.run(
        [sys.executable, "-c", code, os.path.abspath(student_path), os.path.abspath(path)],
        cwd=faqd_tf_dir,
        env={**os.environ, "PYTHONPATH": faqd_tf_dir},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    commit = subprocess.run(
        ["git", "-C", faqd_tf_dir, "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip() or os.path.basename(os.path.normpath(faqd_tf_dir))
    return (
        int(out[-2]),
        float(out[-1]),
        f"to_tflite(mode='int4') imported from {faqd_tf_dir} ({commit})",
    )


def row_key(row):
    return tuple(str(row[k]) for k in ("teacher", "method", "bits", "granularity"))


class Recorder:
    """Appends each finished row to the CSV, skips rows the CSV already has."""

    def __init__(self, path, overwrite=False):
        self.path = path
        self.rows = [] if overwrite else read_rows(path)
        self.done = {row_key(r) for r in self.rows if r["accuracy"] != ""}
        self.rows = [r for r in self.rows if row_key(r) in self.done]
        self._write_all()

    def _write_all(self):
        _harness.write_rows(
            self.path, FIELDS, self.rows
        )  # written aside: a kill never leaves half a table

    def wanted(self, **key):
        return (
            row_key({k: key.get(k, "-") for k in ("teacher", "method", "bits", "granularity")})
            not in self.done
        )

    def add(self, base, **row):
        row = {**base, **row}
        row = {k: row.get(k, "") for k in FIELDS}
        row["granularity"] = row["granularity"] or "-"
        self.rows = [r for r in self.rows if row_key(r) != row_key(row)] + [row]
        if row["accuracy"] != "":
            self.done.add(row_key(row))
        self._write_all()
        acc = "TODO" if row["accuracy"] == "" else f"{100 * float(row['accuracy']):.2f}%"
        print(
            f"[baselines] {row['teacher']} {row['method']} {row['bits']} {row['granularity']}: {acc}, "
            f"{row['seconds'] or '-'} s, {row['file_bytes'] or '-'} B",
            flush=True,
        )


def timed(fn):
    load = os.getloadavg()[0]
    start = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - start, 2), round(load, 2)


def run_teacher(arch, teacher, x_cal, x_test, y_test, args, rec):
    import keras

    from faqd_tf import recalibrate_batchnorm

    work = os.path.join(args.cache, arch)
    os.makedirs(work, exist_ok=True)
    accuracy = lambda logits: float(np.mean(np.argmax(logits, 1) == y_test))  # noqa: E731
    fp_acc = accuracy(keras_logits(teacher, x_test))
    base = {"teacher": arch, "teacher_acc": fp_acc, "calibration": len(x_cal)}
    teacher_file = teacher_path(arch, args.cache)
    if rec.wanted(teacher=arch, method="fp", bits=32):
        rec.add(
            base,
            method="fp",
            bits=32,
            runtime="keras",
            accuracy=fp_acc,
            file_bytes=os.path.getsize(teacher_file),
            notes=f"{os.path.relpath(teacher_file, ROOT)}",
        )
    if rec.wanted(teacher=arch, method="fp_bn", bits=32):
        twin = keras.models.clone_model(teacher)
        twin.set_weights(teacher.get_weights())
        _, seconds, load = timed(lambda: recalibrate_batchnorm(twin, x_cal))
        rec.add(
            base,
            method="fp_bn",
            bits=32,
            runtime="keras",
            accuracy=accuracy(keras_logits(twin, x_test)),
            seconds=seconds,
            load1=load,
        )

    float_path = os.path.join(work, "tflite_float.tflite")
    for method, bits in (("tflite_float", 32), ("tflite_dynamic_int8", 8), ("tflite_full_int8", 8)):
        path = os.path.join(work, f"{method}.tflite")
        if rec.wanted(teacher=arch, method=method, bits=bits):
            size, seconds, load = timed(lambda: tflite_ptq(teacher, path, method, x_cal))
            rec.add(
                base,
                method=method,
                bits=bits,
                runtime="litert",
                accuracy=accuracy(tflite_logits(path, x_test, args.threads)),
                seconds=seconds,
                load1=load,
                file_bytes=size,
                calibration=len(x_cal) if method == "tflite_full_int8" else 0,
                notes="float32 input/output" if method == "tflite_full_int8" else "",
            )
    for method in AEQ_RECIPES:
        if rec.wanted(teacher=arch, method=method, bits=4):
            path = os.path.join(work, f"{method}.tflite")
            # Timed from the teacher in memory: the float conversion is part of this path.
            (_, size), seconds, load = timed(
                lambda: (
                    tflite_ptq(teacher, float_path, "tflite_float"),
                    aeq_int4(float_path, path, method),
                )
            )
            rec.add(
                base,
                method=method,
                bits=4,
                runtime="litert",
                accuracy=accuracy(tflite_logits(path, x_test, args.threads)),
                seconds=seconds,
                load1=load,
                file_bytes=size,
                calibration=0,
                notes=f"recipe.{AEQ_RECIPES[method]}(), channel-wise, classifier included",
            )

    for bits in args.bits:
        for granularity in args.granularity:
            per_channel = granularity == "channel"
            for method in ("rtn", "rtn_bn"):
                stem = os.path.join(work, f"{method}_w{bits}_{granularity}")
                if not rec.wanted(teacher=arch, method=method, bits=bits, granularity=granularity):
                    continue
                cal = x_cal if method == "rtn_bn" else None
                (student, size), seconds, load = timed(
                    lambda: rtn(teacher, bits, per_channel, stem + ".faqd", cal)
                )
                student.save(stem + ".keras")
                rec.add(
                    base,
                    method=method,
                    bits=bits,
                    granularity=granularity,
                    runtime="keras",
                    accuracy=accuracy(keras_logits(student, x_test)),
                    seconds=seconds,
                    load1=load,
                    file_bytes=size,
                    keras_bytes=os.path.getsize(stem + ".keras"),
                    calibration=len(x_cal) if cal is not None else 0,
                )
            if bits == 4 and rec.wanted(
                teacher=arch, method="rtn_bn_tflite_int4", bits=4, granularity=granularity
            ):
                stem = os.path.join(work, f"rtn_bn_w4_{granularity}")
                path = stem + "_int4.tflite"
                load = round(os.getloadavg()[0], 2)
                made = (
                    int4_export(stem + ".keras", path, args.int4_faqd_tf)
                    if os.path.exists(stem + ".keras")
                    else None
                )
                if made is None:
                    rec.add(
                        base,
                        method="rtn_bn_tflite_int4",
                        bits=4,
                        granularity=granularity,
                        runtime="litert",
                        notes="TODO: needs faqd_tf.export.to_tflite(mode='int4') (branch export-lowbit); "
                        "rerun this command after the merge",
                    )
                    continue
                size, seconds, note = made
                prior = next(
                    r for r in rec.rows if row_key(r) == (arch, "rtn_bn", "4", granularity)
                )
                rec.add(
                    base,
                    method="rtn_bn_tflite_int4",
                    bits=4,
                    granularity=granularity,
                    runtime="litert",
                    accuracy=accuracy(tflite_logits(path, x_test, args.threads)),
                    file_bytes=size,
                    seconds=round(float(prior["seconds"]) + seconds, 2),
                    load1=load,
                    calibration=len(x_cal),
                    notes=f"{note}; seconds = rtn_bn row + export {seconds:.1f} s",
                )


def report(rows, command, png=None):
    """The markdown text: per teacher, a table of every row (and the chart, if `png`)."""
    import keras
    import tensorflow as tf

    lines = [
        f"Machine: {_harness.cpu_model()}, {os.cpu_count()} cores, no GPU; Python {sys.version.split()[0]}, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}; LiteRT interpreter (ai_edge_litert), 2 threads.",
        f"Command: `{command}`",
        "",
    ]
    for teacher in dict.fromkeys(r["teacher"] for r in rows):
        mine = [r for r in rows if r["teacher"] == teacher]
        fp = float(mine[0]["teacher_acc"])
        lines += [
            f"**{teacher}** (FP {100 * fp:.2f}%)",
            "",
            "| method | weights | scales | runs in | accuracy | vs FP | time to produce (s) | load avg "
            "| file | file size | .keras |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in mine:
            acc = "TODO" if r["accuracy"] == "" else f"{100 * float(r['accuracy']):.2f}%"
            delta = "" if r["accuracy"] == "" else f"{100 * (float(r['accuracy']) - fp):+.2f}"
            kind = (
                {"keras": ".faqd", "litert": ".tflite"}[r["runtime"]]
                if r["method"] not in ("fp", "fp_bn")
                else ".keras"
            )
            size = (
                f"{int(r['file_bytes']) / 1024:,.1f} kB"
                if r["file_bytes"] not in ("", None)
                else "-"
            )
            keras_kb = (
                f"{int(r['keras_bytes']) / 1024:,.1f} kB"
                if r["keras_bytes"] not in ("", None)
                else "-"
            )
            bits = "float32" if str(r["bits"]) == "32" else f"{r['bits']}-bit"
            lines.append(
                f"| {LABELS[r['method']]} | {bits} | {r['granularity']} | {r['runtime']} | {acc} | {delta} "
                f"| {r['seconds'] or '-'} | {r['load1'] or '-'} | {kind if r['method'] != 'fp_bn' else '-'} "
                f"| {size if r['method'] != 'fp_bn' else '-'} | {keras_kb} |"
            )
        lines.append("")
    if png:
        lines.append(f"![label-free baselines]({os.path.basename(png)})")
    return "\n".join(lines) + "\n"


PLOT_METHODS = (
    ("rtn", "layer"),
    ("rtn_bn", "layer"),
    ("rtn", "channel"),
    ("rtn_bn", "channel"),
    ("tflite_dynamic_int8", "-"),
    ("tflite_full_int8", "-"),
    ("aeq_int4_weight_only", "-"),
    ("aeq_int4_dynamic", "-"),
    ("rtn_bn_tflite_int4", "layer"),
    ("rtn_bn_tflite_int4", "channel"),
)


def plot(rows, path):
    plt = _harness.pyplot()
    teachers = list(dict.fromkeys(r["teacher"] for r in rows))
    colors = dict(zip(PLOT_METHODS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(
        1, len(teachers), figsize=(max(10, 7 * len(teachers)), 5), squeeze=False
    )
    for ax, teacher in zip(axes[0], teachers):
        mine = {
            (r["method"], r["granularity"], str(r["bits"])): r
            for r in rows
            if r["teacher"] == teacher and r["accuracy"] != ""
        }
        fp = 100 * float(next(r for r in rows if r["teacher"] == teacher)["teacher_acc"])
        ticks, x = [], 0.0
        for bits in ("8", "4", "2", "1"):
            present = [m for m in PLOT_METHODS if (*m, bits) in mine]
            if not present:
                continue
            for k, m in enumerate(present):
                value = 100 * float(mine[(*m, bits)]["accuracy"])
                label = LABELS[m[0]] + ("" if m[1] == "-" else f" ({m[1]})")
                ax.bar(x + k, value, 0.9, color=colors[m], label=label)
                ax.text(
                    x + k,
                    value + 1,
                    f"{value:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=6,
                    rotation=90,
                )
            ticks.append((x + (len(present) - 1) / 2, f"{bits}-bit"))
            x += len(present) + 1.5
        ax.axhline(fp, color="black", linestyle="--", linewidth=1, label=f"FP teacher {fp:.2f}%")
        ax.set_xticks([t for t, _ in ticks], [name for _, name in ticks])
        ax.set_ylim(0, 105)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{teacher}, Fashion-MNIST, label-free, no training")
    handles = {}
    for ax in axes[0]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.18, 1, 1))
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--teachers", nargs="+", default=["resnet8", "resnet20"], choices=["resnet8", "resnet20"]
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2, 1])
    parser.add_argument(
        "--granularity", nargs="+", default=["layer", "channel"], choices=["layer", "channel"]
    )
    parser.add_argument(
        "--calibration", type=int, default=1000, help="unlabeled training images for calibration"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--cache", default=os.environ.get("FAQD_BENCH_CACHE", "/work/runs/baselines")
    )
    parser.add_argument(
        "--int4-faqd-tf",
        default=None,
        help="a checkout whose faqd_tf has to_tflite(mode='int4'), used if this one has not",
    )
    parser.add_argument("--csv", default="saved_models/baselines/baselines.csv")
    parser.add_argument("--md", default="saved_models/baselines/baselines.md")
    parser.add_argument("--png", default=None)
    parser.add_argument("--overwrite", action="store_true", help="measure every row again")
    args = parser.parse_args(argv)

    import keras

    os.makedirs(args.cache, exist_ok=True)
    rec = Recorder(args.csv, args.overwrite)
    x_cal, x_test, y_test = fashion_mnist(args.calibration)
    for arch in args.teachers:
        teacher = keras.models.load_model(teacher_path(arch, args.cache), safe_mode=True)
        run_teacher(arch, teacher, x_cal, x_test, y_test, args, rec)

    command = "python benchmarks/baselines.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    rows = [r for r in rec.rows if r["teacher"] in args.teachers]
    text = report(rows, command.strip(), args.png)
    print(text)
    _harness.write_text(args.md, text)
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
