"""Cost of feature affinity in whole distillation steps, on real images with trained teachers.

Not run in CI. Pairs (`benchmarks/real_pairs.py`, trained and cached on first use):

- `quickstart`: the quickstart's FP ResNet8 on Fashion-MNIST 28x28 -> 4-bit ResNet8, batch 128, KL T=4;
- `cifar`: FP ResNet56 -> 4-bit ResNet20 on Fashion-MNIST resized to 32x32x3, batch 64, MSE.

Each pair runs from two starts: `finetune` (the FP weights quantized: the quickstart's twin, or the
pre-trained FP ResNet20) and `end_to_end` (fresh weights). Variants, label-free, FA on the stage outputs
at the default beta:

- `kd`: KD only; `fa`: KD + exact FA (fro2, `fa_method="auto"`); `fa_l1`: exact L1;
- `ffa`: KD + FFA (k = 15, fro2);
- `fa_ref`: exact FA of the library at `--ref` (a git commit, checked out into a temporary worktree),
  for a before/after comparison in the same rounds.

Each (pair, start, variant) runs in its own process (a fresh TensorFlow): it builds the Distiller
(SGD Nesterov), fits `--warmup + --steps` steps on real training batches, and a callback times
every step; the median after the warm-up is the step time. Variants run in `--rounds` interleaved
rounds, and the ratio to KD only is taken within a round, then the median over rounds. `--inputs
random` adds rows on random normal images (labelled synthetic in the report). The `fa` process
also counts, on the batches it trained on, how often the gram form's error estimate exceeds the
fallback limit (`faqd_tf.losses.GRAM_RELATIVE_ERROR_LIMIT`, and the 1e-5 of the old library): the
fraction of samples and of batches, per tap.

    python benchmarks/step_cost.py --ref 3675507 --out-csv docs/step_cost.csv --md docs/step_cost.md
"""

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import ROOT  # noqa: E402

PAIRS = {
    "quickstart": dict(batch=128, kd="kl", temperature=4.0),
    "cifar": dict(batch=64, kd="mse", temperature=1.0),
}
VARIANTS = {
    "kd": dict(fa=None),
    "fa": dict(fa="exact", fa_norm="fro2"),
    "fa_l1": dict(fa="exact", fa_norm="l1"),
    "ffa": dict(fa="fast", fa_norm="fro2", ffa_k=15),
    "fa_ref": dict(fa="exact", fa_norm="fro2"),
}
OLD_LIMIT = 1e-5  # the fallback limit before issue 22
FIELDS = [
    "round",
    "pair",
    "start",
    "inputs",
    "variant",
    "batch",
    "step_ms_median",
    "step_ms_min",
    "steps",
    "peak_rss_mb",
    "fa_methods",
    "fallback_samples",
    "fallback_batches",
    "old_limit_samples",
    "old_limit_batches",
    "load_average",
]


def worker(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # The library under test (this checkout, or --ref's) before this checkout, which stays next
    # for benchmarks.real_pairs (--ref's checkout has none).
    sys.path.insert(0, spec["library_root"])
    import keras
    import numpy as np
    import tensorflow as tf

    import faqd_tf
    from benchmarks import real_pairs
    from faqd_tf import losses
    from faqd_tf.distiller import Distiller

    assert os.path.dirname(os.path.dirname(os.path.abspath(faqd_tf.__file__))) == os.path.abspath(
        spec["library_root"]
    )
    pair = PAIRS[spec["pair"]]
    teacher, student = real_pairs.pair(spec["pair"], 4, spec["start"], seed=0)
    distiller = Distiller(
        student,
        teacher,
        kd=pair["kd"],
        temperature=pair["temperature"],
        seed=0,
        **VARIANTS[spec["variant"]],
    )
    distiller.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
    out = {}
    maps = list(zip(distiller.teacher_features.outputs[1:], distiller.student_features.outputs[1:]))
    if distiller.fa == "exact":
        out["fa_methods"] = "/".join(
            losses.resolve_method(t.shape, s.shape, fa_norm=distiller.fa_norm) for t, s in maps
        )
    batch = pair["batch"]
    steps = spec["warmup"] + spec["steps"]
    if spec["inputs"] == "real":
        data = real_pairs.images(spec["pair"], "train", batch_size=batch, seed=0).take(steps)
    else:
        shape = teacher.input_shape[1:]
        images = np.random.default_rng(0).normal(size=(4 * batch, *shape)).astype("float32")
        data = (
            tf.data.Dataset.from_tensor_slices(images)
            .batch(batch, drop_remainder=True)
            .repeat()
            .take(steps)
        )
    data = data.cache()

    class Timer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_begin(self, step, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, step, logs=None):
            float(logs["loss"])  # the step's result is ready
            self.times.append(time.perf_counter() - self.start)

    timer = Timer()
    distiller.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    timed = timer.times[spec["warmup"] :]
    out.update(
        step_ms_median=round(1e3 * float(np.median(timed)), 2),
        step_ms_min=round(1e3 * min(timed), 2),
        steps=len(timed),
        peak_rss_mb=round(_harness.status_kb("VmHWM") / 1024, 1),
    )
    if spec["variant"] == "fa" and distiller.fa_norm == "fro2":
        out.update(fallback_counts(distiller, data, losses))
    _harness.emit("RESULT ", out)


def fallback_counts(distiller, data, losses):
    """Per tap, the share of samples and of batches whose gram error estimate exceeds the limit
    (the batches it trained on, the student in training mode as in `train_step`)."""
    import numpy as np

    limits = {"fallback": losses.GRAM_RELATIVE_ERROR_LIMIT, "old_limit": OLD_LIMIT}
    flagged = {k: [] for k in limits}
    state = [(v, v.numpy()) for v in distiller.student.non_trainable_variables]
    for x in data:
        t_maps = distiller.teacher_features(x, training=False)[1:]
        s_maps = distiller.student_features(x, training=True)[1:]
        estimates = [losses.gram_error_estimate(t, s).numpy() for t, s in zip(t_maps, s_maps)]
        for key, limit in limits.items():
            flagged[key].append(np.stack([e > limit for e in estimates]))  # (taps, batch)
    for variable, value in state:
        variable.assign(value)
    out = {}
    for key, per_batch in flagged.items():
        a = np.stack(per_batch)  # (batches, taps, batch)
        out[f"{key}_samples"] = "/".join(f"{v:.3f}" for v in a.mean(axis=(0, 2)))
        out[f"{key}_batches"] = "/".join(f"{v:.3f}" for v in a.any(axis=2).mean(axis=0))
    return out


def ref_checkout(ref):
    """A detached worktree of `ref` (the library before a change), removed at exit."""
    import atexit

    path = tempfile.mkdtemp(prefix="faqd_ref_")
    subprocess.run(
        ["git", "-C", ROOT, "worktree", "add", "--detach", "-f", path, ref],
        check=True,
        capture_output=True,
    )
    atexit.register(
        lambda: subprocess.run(
            ["git", "-C", ROOT, "worktree", "remove", "--force", path], capture_output=True
        )
    )
    return path


def run(args):
    rows = []
    ref_root = ref_checkout(args.ref) if "fa_ref" in args.variants else None
    cells = [(pair, start, "real") for pair in args.pairs for start in args.starts]
    if "random" in args.inputs:
        cells += [(pair, "finetune", "random") for pair in args.pairs]
    for r in range(args.rounds):
        for pair, start, inputs in cells:
            for variant in args.variants:
                if inputs == "random" and variant not in ("kd", "fa", "ffa"):
                    continue
                spec = dict(
                    pair=pair,
                    start=start,
                    inputs=inputs,
                    variant=variant,
                    warmup=args.warmup,
                    steps=args.steps,
                    library_root=ref_root if variant == "fa_ref" else ROOT,
                )
                t0 = time.perf_counter()
                proc, results = _harness.run_worker(__file__, spec, "RESULT ")
                if proc.returncode or not results:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(
                        f"step_cost: {pair} {start} {variant} failed (exit {proc.returncode})"
                    )
                row = {
                    "round": r,
                    "pair": pair,
                    "start": start,
                    "inputs": inputs,
                    "variant": variant,
                    "batch": PAIRS[pair]["batch"],
                    "load_average": round(os.getloadavg()[0], 2),
                    **results[-1],
                }
                rows.append(row)
                print(
                    f"[step_cost] round {r} {pair} {start} {inputs} {variant}: {row['step_ms_median']} ms/step "
                    f"({time.perf_counter() - t0:.0f} s, load {row['load_average']})",
                    flush=True,
                )
                _harness.write_rows(
                    args.out_csv, FIELDS, rows
                )  # after each process: a kill keeps the rest
    return rows


def ratios(rows, cell, variant, column="step_ms_median"):
    """Per round, the variant's step time (`column`) over KD only's in the same cell and round."""
    out = []
    for r in rows:
        if (r["pair"], r["start"], r["inputs"], r["variant"]) == (*cell, variant):
            base = [
                b
                for b in rows
                if (b["pair"], b["start"], b["inputs"], b["variant"], str(b["round"]))
                == (*cell, "kd", str(r["round"]))
            ]
            if base:
                out.append(float(r[column]) / float(base[0][column]))
    return out


def report(rows, command):
    import numpy as np

    loads = [float(r["load_average"]) for r in rows if r.get("load_average") not in ("", None)]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; 1-minute load average during the runs "
        f"{min(loads):.2f}-{max(loads):.2f} (median {np.median(loads):.2f}). Label-free, 4-bit students, SGD "
        "Nesterov, FA on the stage outputs at the default beta; real Fashion-MNIST training batches unless "
        "marked *random (synthetic)*. Ratios: step time over KD only's in the same round, median over rounds; "
        "the fastest step of a process is the one least disturbed by other work on the machine, so its "
        "ratio is the steadier one where the machine's speed drifts between processes.",
        "",
        "| pair | start | inputs | variant | exact FA per tap | ms per step (median) | / KD only (rounds) | "
        "fastest step / KD only's (rounds) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    cells = sorted(
        {(r["pair"], r["start"], r["inputs"]) for r in rows}, key=lambda c: (c[2] != "real", c)
    )
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    for cell in cells:
        for variant in variants:
            mine = [
                r
                for r in rows
                if (r["pair"], r["start"], r["inputs"], r["variant"]) == (*cell, variant)
            ]
            if not mine:
                continue
            ratio = ratios(rows, cell, variant)
            fastest = ratios(rows, cell, variant, "step_ms_min")
            inputs = "real" if cell[2] == "real" else "*random (synthetic)*"
            lines.append(
                f"| {cell[0]} | {cell[1]} | {inputs} | {variant} | {mine[0].get('fa_methods') or '-'} | "
                f"{np.median([float(r['step_ms_median']) for r in mine]):.0f} | "
                f"**{np.median(ratio):.2f}** ({', '.join(f'{x:.2f}' for x in ratio)}) | "
                f"**{np.median(fastest):.2f}** ({', '.join(f'{x:.2f}' for x in fastest)}) | "
                f"{max(float(r['peak_rss_mb']) for r in mine):.0f} |"
            )
    fa_rows = [r for r in rows if r["variant"] == "fa" and r.get("fallback_samples")]
    if fa_rows:
        lines += [
            "",
            "How often the gram form's error check fires on the batches trained on (per tap, stage 1/2/3; "
            "fraction of samples, and of batches with at least one such sample), at the new limit "
            "and at the old one (1e-5), median over rounds:",
            "",
            "| pair | start | inputs | samples, new limit | batches, new limit "
            "| samples, old limit | batches, old limit |",
            "|---|---|---|---|---|---|---|",
        ]
        for cell in cells:
            mine = [r for r in fa_rows if (r["pair"], r["start"], r["inputs"]) == cell]
            if mine:
                r = mine[len(mine) // 2]
                lines.append(
                    f"| {cell[0]} | {cell[1]} | {cell[2]} | {r['fallback_samples']} | {r['fallback_batches']} | "
                    f"{r['old_limit_samples']} | {r['old_limit_batches']} |"
                )
    return "\n".join(lines) + "\n"


def main():
    spec = _harness.worker_spec()
    if spec is not None:  # a child of run: one (pair, start, inputs, variant)
        return worker(spec)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument(
        "--starts",
        nargs="+",
        default=["finetune", "end_to_end"],
        choices=["finetune", "end_to_end"],
    )
    p.add_argument(
        "--variants", nargs="+", default=["kd", "fa", "ffa", "fa_ref"], choices=list(VARIANTS)
    )
    p.add_argument("--inputs", nargs="+", default=["real", "random"], choices=["real", "random"])
    p.add_argument(
        "--ref", default="3675507", help="git commit of the library for the fa_ref variant"
    )
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out-csv", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--from-csv", default=None, help="report an existing CSV")
    args = p.parse_args()
    if args.from_csv:
        rows = _harness.read_rows(args.from_csv, missing_ok=False)
    else:
        rows = run(args)
    text = report(rows, "python benchmarks/step_cost.py " + " ".join(sys.argv[1:]))
    print(text)
    _harness.write_text(args.md, text)


if __name__ == "__main__":
    main()
