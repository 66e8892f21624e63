"""Cost of feature affinity in whole distillation steps: teacher ResNet56 -> 4-bit ResNet20.

Not run in CI. Each variant runs in its own process (a fresh TensorFlow, nothing shared):

- `kd`: label-free KD only (MSE on logits);
- `fa_fro2`: KD + exact FA, squared Frobenius norm (eq. 6), on the 3 stage outputs;
- `fa_l1`: KD + exact FA, L1 norm (the authors' code);
- `ffa`: KD + FFA (k = 15, fro2).

A process builds the networks (random weights: the cost does not depend on them), a `Distiller`
compiled with SGD, and fits `--warmup + --steps` steps on random CIFAR-shaped images; a callback
times every step, and the median of the steps after the warm-up is the step time. The variants run
in `--rounds` interleaved rounds (round r runs every variant and batch size before round r+1), and
the ratio to KD-only is taken within a round, then the median over rounds. Peak RSS (VmHWM) and
the resident size at the stages of a process (TensorFlow imported, models built, after the first
step, at the end) show where memory goes.

    python benchmarks/step_cost.py --out-csv docs/step_cost.csv --md docs/step_cost.md
"""

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "kd": dict(fa=None),
    "fa_fro2": dict(fa="exact", fa_norm="fro2"),
    "fa_l1": dict(fa="exact", fa_norm="l1"),
    "ffa": dict(fa="fast", fa_norm="fro2", ffa_k=15),
}
STAGES = ("import", "models", "first_step", "end")
FIELDS = ["round", "variant", "batch", "step_ms_median", "step_ms_min", "steps", "peak_rss_mb", "fa_methods",
          *[f"{kind}_{stage}_mb" for stage in STAGES for kind in ("rss", "anon", "file")]]


def _rss_mb(key="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _memory(stage):
    """Resident size at a stage: all of it, anonymous (heap, tensors), file-backed (mapped libraries)."""
    return {f"rss_{stage}_mb": round(_rss_mb(), 1), f"anon_{stage}_mb": round(_rss_mb("RssAnon"), 1),
            f"file_{stage}_mb": round(_rss_mb("RssFile"), 1)}


def worker(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import keras
    import numpy as np
    import tensorflow as tf

    from faqd_tf import losses, models
    from faqd_tf.distiller import Distiller

    out = _memory("import")
    keras.utils.set_random_seed(0)
    teacher = models.get("resnet56", num_classes=10, input_shape=(32, 32, 3))
    student = models.get("resnet20", num_classes=10, input_shape=(32, 32, 3), weight_bits=4)
    distiller = Distiller(student, teacher, kd="mse", seed=0, **VARIANTS[spec["variant"]])
    distiller.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    out.update(_memory("models"))
    if distiller.fa == "exact":
        shapes = [(t.shape, s.shape) for t, s in zip(distiller.teacher_features.outputs[1:],
                                                     distiller.student_features.outputs[1:])]
        out["fa_methods"] = "/".join(losses.resolve_method(t, s, fa_norm=distiller.fa_norm) for t, s in shapes)
    batch = spec["batch"]
    images = np.random.default_rng(0).uniform(size=(4 * batch, 32, 32, 3)).astype("float32")
    data = tf.data.Dataset.from_tensor_slices(images).batch(batch, drop_remainder=True).repeat()

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, step, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, step, logs=None):
            float(logs["loss"])  # the step's result is ready
            self.times.append(time.perf_counter() - self.start)
            if step == 0:
                out.update(_memory("first_step"))

    timer = Timer()
    distiller.fit(data, steps_per_epoch=spec["warmup"] + spec["steps"], epochs=1, verbose=0, callbacks=[timer])
    timed = timer.times[spec["warmup"]:]
    out.update(step_ms_median=round(1e3 * float(np.median(timed)), 2), step_ms_min=round(1e3 * min(timed), 2),
               steps=len(timed), peak_rss_mb=round(_rss_mb("VmHWM"), 1), **_memory("end"))
    print("RESULT " + json.dumps(out), flush=True)


def run(args):
    rows = []
    for r in range(args.rounds):
        for batch in args.batches:
            for variant in args.variants:
                spec = dict(variant=variant, batch=batch, warmup=args.warmup, steps=args.steps)
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                      capture_output=True, text=True)
                lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                if proc.returncode or not lines:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"step_cost: {variant} at batch {batch} failed (exit {proc.returncode})")
                row = {"round": r, "variant": variant, "batch": batch, **json.loads(lines[-1][7:])}
                rows.append(row)
                print(f"[step_cost] round {r} batch {batch} {variant}: {row['step_ms_median']} ms/step, peak RSS "
                      f"{row['peak_rss_mb']} MB ({time.perf_counter() - t0:.0f} s)", flush=True)
                if args.out_csv:
                    write_csv(rows, args.out_csv)
    return rows


def write_csv(rows, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def report(rows, command):
    import numpy as np

    lines = [f"Command: `{command}`  ",
             f"Machine: {platform.machine()}, {os.cpu_count()} cores; load average at the end "
             f"{os.getloadavg()[0]:.2f}. Teacher ResNet56 (FP) -> 4-bit ResNet20, label-free, KD = MSE, "
             "FA on the 3 stage outputs at the default beta; SGD Nesterov; random 32x32x3 images.", "",
             "| batch | variant | exact FA per tap | ms per step (median over rounds) | / KD only (median of per-round ratios) | peak RSS MB |",
             "|---|---|---|---|---|---|"]
    batches = sorted({int(r["batch"]) for r in rows})
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    for batch in batches:
        for variant in variants:
            mine = [r for r in rows if int(r["batch"]) == batch and r["variant"] == variant]
            ratios = []
            for r in mine:
                base = [b for b in rows if int(b["batch"]) == batch and b["variant"] == "kd" and b["round"] == r["round"]]
                if base:
                    ratios.append(float(r["step_ms_median"]) / float(base[0]["step_ms_median"]))
            lines.append(f"| {batch} | {variant} | {mine[0].get('fa_methods') or '-'} | "
                         f"{np.median([float(r['step_ms_median']) for r in mine]):.0f} | "
                         f"{np.median(ratios):.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)}) | "
                         f"{max(float(r['peak_rss_mb']) for r in mine):.0f} |")
    lines += ["", "Resident size (MB) of each process at its stages, median over rounds: all / anonymous "
              "(heap and tensors) / file-backed (mapped libraries):", "",
              "| batch | variant | TensorFlow imported | models built | after the first step | end | peak |",
              "|---|---|---|---|---|---|---|"]
    for batch in batches:
        for variant in variants:
            mine = [r for r in rows if int(r["batch"]) == batch and r["variant"] == variant]
            cells = ["/".join(f"{np.median([float(r[f'{kind}_{stage}_mb']) for r in mine]):.0f}"
                              for kind in ("rss", "anon", "file")) for stage in STAGES]
            peak = np.median([float(r["peak_rss_mb"]) for r in mine])
            lines.append(f"| {batch} | {variant} | " + " | ".join(cells) + f" | {peak:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out-csv", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--from-csv", default=None, help="report an existing CSV")
    args = p.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.from_csv:
        with open(args.from_csv) as f:
            rows = list(csv.DictReader(f))
    else:
        rows = run(args)
    text = report(rows, "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]))
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
