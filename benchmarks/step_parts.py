"""Where the time of one distillation step goes: its parts timed alone, under two CPU kernel sets.

Not run in CI (issue 34 item 1). For a teacher/student pair on one real Fashion-MNIST batch
(28x28x1, the library's `faqd_tf.data` pipeline, batch 128, label-free KL T=4, exact FA on the
default taps at the default beta, SGD Nesterov momentum 0.9), each part is its own `tf.function` on
the same batch:

- `teacher_fwd`: the teacher's forward in inference mode (with its tapped maps, as the FA step runs it);
- `student_fwd`: the student's forward in training mode (its quantizers included);
- `student_fwd_bwd_kd`: the student's forward + backward of KD alone (the teacher's logits given);
- `student_fwd_bwd_fa`: the same of KD + FA (the teacher's logits and maps given);
- `quantizers`: the kernel quantization of every quantized layer alone (`quantized_kernel`);
- `kd_loss`: the KD loss and its gradient with respect to the student's logits;
- `fa_<tap>`: each FA tap's loss and its gradient with respect to the student's map;
- `optimizer`: `optimizer.apply` of one set of gradients to the student's variables;
- `input`: one batch from the library's tf.data pipeline, pulled back to back (its throughput; in
  `fit` it is prefetched and overlaps the step);
- `step_kd`, `step_fa`: the whole `Distiller` train step (`make_train_function`), KD only and with
  exact FA;
- `peak_conv`, `peak_matmul`: the machine's attainable rate, a large conv (128x28x28x64 -> 64, 3x3)
  and a 2048^2 matmul.

After `--warmup` calls each, the parts run in `--rounds` interleaved rounds (round r times every part
before round r + 1, `_harness.interleaved_times`); a part's time is its median. Each part's FLOPs are
counted from the shapes (`conv_flops`, `gram_fa_flops`, ...: 2 per multiply-add of the convolutions,
matmuls and dense layers; elementwise work estimated per element) and divided by its time, as a
fraction of the better of the two attainable rates of the same process. Each (pair, kernel set) runs in
its own process: `default` (the machine's oneDNN kernels) and `avx2` (`ONEDNN_MAX_CPU_ISA=AVX2` set
before TensorFlow loads: the kernels of a CPU without AVX-512/AMX).

Pairs: `quickstart` (the pinned trained ResNet8 of docs/budget/teacher.keras -> its 4-bit twin,
`quantize_model(teacher, weight_bits=4)`) and `resnet56` (`resnet_cifar(56)` -> 4-bit `resnet_cifar(20)`
at 28x28x1, random-initialized weights: for timing only).

    python benchmarks/step_parts.py --out-csv docs/step_cost_parts.csv --md docs/step_cost.md \\
        --png docs/step_cost_parts.png

`--md` writes the report as a section of that file between two markers (the rest of the file is
kept); `--from-csv` reports a CSV without measuring.
"""

import argparse
import os
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import DOCS, FMNIST  # noqa: E402

TEACHER = os.path.join(DOCS, "budget", "teacher.keras")
PAIRS = {
    "quickstart": "trained ResNet8 (docs/budget/teacher.keras, 90.95%) -> 4-bit ResNet8 (its twin)",
    "resnet56": "ResNet56 -> 4-bit ResNet20, random-initialized weights (timing only)",
}
KERNELS = {"default": None, "avx2": "AVX2"}
BATCH = 128
TEMPERATURE = 4.0
PART_LABELS = {
    "teacher_fwd": "teacher forward (inference)",
    "student_fwd": "student forward (training)",
    "student_fwd_bwd_kd": "student forward+backward, KD",
    "student_fwd_bwd_fa": "student forward+backward, KD+FA",
    "quantizers": "quantizers (every kernel)",
    "kd_loss": "KD loss + gradient",
    "optimizer": "optimizer apply (SGD momentum)",
    "input": "input pipeline (one batch)",
    "step_kd": "whole step, KD only",
    "step_fa": "whole step, KD + exact FA",
    "peak_conv": "attainable: conv 128x28x28x64->64 3x3",
    "peak_matmul": "attainable: matmul 2048^2",
}
FIELDS = [
    "pair",
    "kernels",
    "part",
    "label",
    "ms_median",
    "ms_min",
    "ms_q25",
    "ms_q75",
    "n",
    "mflop",
    "gflop_per_s",
    "fraction_attainable",
    "share_step_kd",
    "share_step_fa",
    "method",
    "load_average",
    "isa_env",
]
MARK_BEGIN = "<!-- step_parts: begin (benchmarks/step_parts.py writes this section) -->"
MARK_END = "<!-- step_parts: end -->"

# --------------------------------------------------------------------------- FLOP counting
# Pure functions of shapes (tests/test_step_parts.py checks them against hand counts).

QUANTIZER_OPS_PER_WEIGHT = 8 * 8 + 10
"""Elementwise ops per weight of one b >= 3 kernel quantization: 8 Lloyd iterations of divide, round,
two clips, two multiplies and two sums, plus sign, abs, max and the final rounding (about 10)."""
SGD_OPS_PER_PARAMETER = 7
"""Nesterov momentum: m = mu m - lr g; w += mu m - lr g."""


def conv_flops(batch, h_out, w_out, kh, kw, c_in, c_out, groups=1):
    """FLOPs (2 per multiply-add) of a 2-D convolution's forward pass."""
    return 2 * batch * h_out * w_out * kh * kw * (c_in // groups) * c_out


def dense_flops(batch, n_in, n_out):
    """FLOPs of a dense layer's forward pass (a batch x n_in by n_in x n_out product)."""
    return 2 * batch * n_in * n_out


def matmul_flops(m, k, n):
    """FLOPs of an m x k by k x n product."""
    return 2 * m * k * n


def gram_fa_flops(batch, n, c):
    """FLOPs of the exact FA's gram form, loss and gradient, for a batch of n-pixel, c-channel maps:
    three C x C products forward (M^T M, P^T P, M^T P) and four N x C by C x C backward, plus about
    40 elementwise ops per map entry (forming M and P, the gradient through the normalization)."""
    return batch * (3 * matmul_flops(c, n, c) + 4 * matmul_flops(n, c, c) + 40 * n * c)


def pairwise_fa_flops(batch, n, c):
    """FLOPs of the exact FA's pairwise form (all of D at once): Z = M P^T forward, two N x N by
    N x C products backward, about 7 ops per entry of D and 40 per map entry."""
    return batch * (matmul_flops(n, c, n) + 2 * matmul_flops(n, n, c) + 7 * n * n + 40 * n * c)


MP_OPS_PER_ENTRY = 25
"""Elementwise ops per map entry of forming M and P from the raw rows (`pixels.difference_and_sum`)."""


def fa_forward_flops(method, batch, n, c):
    """FLOPs of one exact FA tap's loss alone (no gradient): forming M and P, then the gram form's
    three C x C products or the pairwise form's Z = M P^T and its ~3 ops per entry of D."""
    if method == "gram":
        return batch * (3 * matmul_flops(c, n, c) + MP_OPS_PER_ENTRY * n * c)
    return batch * (matmul_flops(n, c, n) + 3 * n * n + MP_OPS_PER_ENTRY * n * c)


def kd_flops(batch, classes):
    """FLOPs of the KL KD loss and its gradient: about 20 ops per logit (two softmaxes, a log, the
    products and the gradient)."""
    return 20 * batch * classes


def fa_flops(method, batch, n, c):
    """FLOPs of one exact FA tap by its resolved method (`gram` or `pairwise`)."""
    return (gram_fa_flops if method == "gram" else pairwise_fa_flops)(batch, n, c)


# --------------------------------------------------------------------------------- worker


def _layer_flops(model, batch):
    """[(layer, forward FLOPs)] of the conv and dense layers of `model` (from its output shapes)."""
    import keras

    out = []
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            _, h, w, c_out = layer.output.shape
            kh, kw = layer.kernel_size
            c_in = layer.input.shape[-1]
            out.append((layer, conv_flops(batch, h, w, kh, kw, c_in, c_out, layer.groups)))
        elif isinstance(layer, keras.layers.Dense):
            out.append((layer, dense_flops(batch, layer.input.shape[-1], layer.units)))
    return out


def _models(pair):
    import keras

    from faqd_tf.models import resnet_cifar
    from faqd_tf.quantize import quantize_model

    keras.utils.set_random_seed(0)
    if pair == "quickstart":
        teacher = keras.models.load_model(TEACHER)
        return teacher, [quantize_model(teacher, weight_bits=4) for _ in range(3)]
    teacher = resnet_cifar(56, input_shape=(28, 28, 1))
    fp_student = resnet_cifar(20, input_shape=(28, 28, 1))
    return teacher, [quantize_model(fp_student, weight_bits=4) for _ in range(3)]


def worker(spec):
    import keras
    import numpy as np
    import tensorflow as tf

    from faqd_tf import data, losses
    from faqd_tf.distiller import Distiller
    from faqd_tf.losses import pixels

    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "")
    assert isa == (KERNELS[spec["kernels"]] or ""), (isa, spec)
    teacher, (student_kd, student_fa, student_opt) = _models(spec["pair"])

    def distiller(student, fa):
        d = Distiller(
            student, teacher, kd="kl", temperature=TEMPERATURE, fa=fa, fa_norm="fro2", seed=0
        )
        d.compile(keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True))
        return d

    d_kd, d_fa = distiller(student_kd, None), distiller(student_fa, "exact")
    pipeline = data.load(
        FMNIST,
        "train",
        labels=False,
        batch_size=BATCH,
        seed=0,
        drop_remainder=True,
        augment=False,
    ).repeat()
    batches = iter(pipeline)
    x = next(batches)
    t_out = [tf.identity(t) for t in d_fa.teacher_features(x, training=False)]
    s_out = [tf.identity(s) for s in d_fa.student_features(x, training=True)]
    t_logits, s_logits = t_out[0], s_out[0]
    taps = d_fa.feature_pairs
    methods = [
        losses.resolve_method(t.shape, s.shape, fa_norm="fro2")
        for t, s in zip(t_out[1:], s_out[1:])
    ]
    beta = d_fa.beta

    def kd_mean(t, s):
        return tf.reduce_mean(losses.kd_loss_per_sample(t, s, kd="kl", temperature=TEMPERATURE))

    @tf.function
    def teacher_fwd(x):
        return d_fa.teacher_features(x, training=False)

    @tf.function
    def student_fwd(x):
        return d_fa.student_features(x, training=True)

    @tf.function
    def student_fwd_bwd_kd(x, t_logits):
        with tf.GradientTape() as tape:
            loss = kd_mean(t_logits, d_kd.student(x, training=True))
        return tape.gradient(loss, d_kd.student.trainable_variables)

    @tf.function
    def student_fwd_bwd_fa(x, t_out):
        with tf.GradientTape() as tape:
            values = d_fa.loss_terms(t_out, d_fa.student_features(x, training=True))
            loss = tf.reduce_mean(sum(term.weight * values[term.name] for term in d_fa.terms))
        return tape.gradient(loss, d_fa.student.trainable_variables)

    quantized = [
        layer
        for layer in student_fa._flatten_layers(include_self=False, recursive=True)
        if getattr(layer, "kernel_quantizer", None) is not None
    ]

    @tf.function
    def quantizers():
        return [layer.quantized_kernel(training=True) for layer in quantized]

    @tf.function
    def kd_loss(t, s):
        with tf.GradientTape() as tape:
            tape.watch(s)
            loss = kd_mean(t, s)
        return loss, tape.gradient(loss, s)

    def fa_tap(t, s):
        @tf.function
        def fa(t, s):
            with tf.GradientTape() as tape:
                tape.watch(s)
                loss = beta * tf.reduce_mean(
                    losses.feature_affinity_per_sample(t, s, fa_norm="fro2")
                )
            return loss, tape.gradient(loss, s)

        return lambda: fa(t, s)

    def fa_tap_forward(t, s):
        @tf.function
        def fa(t, s):
            return beta * tf.reduce_mean(losses.feature_affinity_per_sample(t, s, fa_norm="fro2"))

        return lambda: fa(t, s)

    def fa_tap_mp(t, s):
        @tf.function
        def mp(t, s):
            return pixels.difference_and_sum(*pixels.rows_of_both(t, s))

        return lambda: mp(t, s)

    gradients = [tf.identity(g) for g in student_fwd_bwd_kd(x, t_logits)]
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    optimizer.build(student_opt.trainable_variables)

    @tf.function
    def optimizer_apply(gradients):
        optimizer.apply(gradients, student_opt.trainable_variables)

    def whole_step(d):
        d.make_train_function()
        function = d.train_function
        same_batch = iter(tf.data.Dataset.from_tensors(x).repeat())

        def call():
            out = function(same_batch)
            out = out.get_value() if hasattr(out, "get_value") else out
            float(out["loss"])

        return call

    rng = np.random.default_rng(0)
    conv_in = tf.constant(rng.normal(size=(BATCH, 28, 28, 64)).astype("float32"))
    conv_k = tf.constant(rng.normal(size=(3, 3, 64, 64)).astype("float32") * 0.05)
    mat = tf.constant(rng.normal(size=(2048, 2048)).astype("float32") * 0.02)
    peak_conv = tf.function(lambda a, k: tf.nn.conv2d(a, k, 1, "SAME"))
    peak_matmul = tf.function(lambda a: tf.linalg.matmul(a, a))

    calls = {
        "teacher_fwd": lambda: teacher_fwd(x),
        "student_fwd": lambda: student_fwd(x),
        "student_fwd_bwd_kd": lambda: student_fwd_bwd_kd(x, t_logits),
        "student_fwd_bwd_fa": lambda: student_fwd_bwd_fa(x, t_out),
        "quantizers": quantizers,
        "kd_loss": lambda: kd_loss(t_logits, s_logits),
        **{f"fa_{s_name}": fa_tap(t, s) for (_, s_name), t, s in zip(taps, t_out[1:], s_out[1:])},
        **{
            f"fa_{s_name}_fwd": fa_tap_forward(t, s)
            for (_, s_name), t, s in zip(taps, t_out[1:], s_out[1:])
        },
        **{
            f"fa_{s_name}_mp": fa_tap_mp(t, s)
            for (_, s_name), t, s in zip(taps, t_out[1:], s_out[1:])
        },
        "optimizer": lambda: optimizer_apply(gradients),
        "input": lambda: next(batches),
        "step_kd": whole_step(d_kd),
        "step_fa": whole_step(d_fa),
        "peak_conv": lambda: peak_conv(conv_in, conv_k),
        "peak_matmul": lambda: peak_matmul(mat),
    }

    # FLOPs from the shapes.
    teacher_layers, student_layers = _layer_flops(teacher, BATCH), _layer_flops(student_fa, BATCH)
    t_fwd = sum(f for _, f in teacher_layers)
    s_fwd = sum(f for _, f in student_layers)
    # Backward: the input and the weight gradient of every layer (2x forward), but no input gradient
    # of the first layer.
    s_bwd = 2 * s_fwd - student_layers[0][1]
    q_flops = QUANTIZER_OPS_PER_WEIGHT * sum(
        int(np.prod(layer.kernel.shape)) for layer in quantized
    )
    n_params = sum(int(np.prod(v.shape)) for v in student_opt.trainable_variables)
    classes = int(t_logits.shape[-1])
    fa_taps, fa_sub = {}, {}
    for (_, s_name), s, method in zip(taps, s_out[1:], methods):
        _, h, w, c = s.shape
        fa_taps[f"fa_{s_name}"] = (method, fa_flops(method, BATCH, h * w, c))
        fa_sub[f"fa_{s_name}_fwd"] = (method, fa_forward_flops(method, BATCH, h * w, c))
        fa_sub[f"fa_{s_name}_mp"] = ("", MP_OPS_PER_ENTRY * BATCH * h * w * c)
    kd = kd_flops(BATCH, classes)
    opt = SGD_OPS_PER_PARAMETER * n_params
    flops = {
        "teacher_fwd": t_fwd,
        "student_fwd": s_fwd + q_flops,
        "student_fwd_bwd_kd": s_fwd + s_bwd + q_flops + kd,
        "student_fwd_bwd_fa": s_fwd + s_bwd + q_flops + kd + sum(f for _, f in fa_taps.values()),
        "quantizers": q_flops,
        "kd_loss": kd,
        **{name: f for name, (_, f) in fa_taps.items()},
        **{name: f for name, (_, f) in fa_sub.items()},
        "optimizer": opt,
        "input": 0,
        "step_kd": t_fwd + s_fwd + s_bwd + q_flops + kd + opt,
        "step_fa": t_fwd + s_fwd + s_bwd + q_flops + kd + opt + sum(f for _, f in fa_taps.values()),
        "peak_conv": conv_flops(BATCH, 28, 28, 3, 3, 64, 64),
        "peak_matmul": matmul_flops(2048, 2048, 2048),
    }
    names = list(calls)
    for _ in range(spec["warmup"]):
        for name in names:
            calls[name]()
    times = _harness.interleaved_times([calls[n] for n in names], spec["rounds"])
    for name, got in zip(names, times):
        ms = 1e3 * np.asarray(got)
        _harness.emit(
            "PART ",
            dict(
                part=name,
                label=PART_LABELS.get(name) or _tap_label(name),
                ms_median=round(float(np.median(ms)), 3),
                ms_min=round(float(ms.min()), 3),
                ms_q25=round(float(np.percentile(ms, 25)), 3),
                ms_q75=round(float(np.percentile(ms, 75)), 3),
                n=len(ms),
                mflop=round(flops[name] / 1e6, 6),
                method={**fa_taps, **fa_sub}.get(name, ("",))[0],
                isa_env=isa,
            ),
        )


def _tap_label(name):
    if name.endswith("_fwd"):
        return f"FA tap {name[3:-4]} loss alone"
    if name.endswith("_mp"):
        return f"FA tap {name[3:-3]}: forming M, P alone"
    return f"FA tap {name[3:]} loss + gradient"


# ------------------------------------------------------------------------------ the runs


def derived(rows):
    """Adds GFLOP/s, the fraction of the attainable rate, and the shares of the whole steps, per
    (pair, kernels), in place; returns `rows`."""
    groups = {}
    for r in rows:
        groups.setdefault((r["pair"], r["kernels"]), {})[r["part"]] = r
    for parts in groups.values():
        rate = {
            name: float(parts[name]["mflop"]) / float(parts[name]["ms_median"])
            for name in ("peak_conv", "peak_matmul")
            if name in parts
        }
        attainable = max(rate.values()) if rate else None
        for r in parts.values():
            ms, mflop = float(r["ms_median"]), float(r["mflop"])
            gflops = mflop / ms if ms > 0 else 0.0  # MFLOP per ms
            r["gflop_per_s"] = round(gflops, 2)
            r["fraction_attainable"] = round(gflops / attainable, 4) if attainable else ""
            for step in ("step_kd", "step_fa"):
                if step in parts:
                    r[f"share_{step}"] = round(ms / float(parts[step]["ms_median"]), 4)
    return rows


def run(args):
    # A rerun replaces the rows of the (pair, kernels) it measures and keeps the others.
    rows = [
        r
        for r in _harness.read_rows(args.out_csv)
        if not (r["pair"] in args.pairs and r["kernels"] in args.kernels)
    ]
    for pair in args.pairs:
        for kernels in args.kernels:
            env = _harness.child_env()
            env.pop("ONEDNN_MAX_CPU_ISA", None)
            if KERNELS[kernels]:
                env["ONEDNN_MAX_CPU_ISA"] = KERNELS[kernels]
            spec = dict(pair=pair, kernels=kernels, rounds=args.rounds, warmup=args.warmup)
            t0 = time.perf_counter()
            proc, parts = _harness.run_worker(__file__, spec, "PART ", env=env)
            if proc.returncode or not parts:
                print(proc.stderr[-4000:], file=sys.stderr)
                raise SystemExit(f"step_parts: {pair} {kernels} failed (exit {proc.returncode})")
            load = round(os.getloadavg()[0], 2)
            rows += [dict(pair=pair, kernels=kernels, load_average=load, **p) for p in parts]
            derived(rows)
            _harness.write_rows(args.out_csv, FIELDS, rows)
            step = {p["part"]: p["ms_median"] for p in parts}
            print(
                f"[step_parts] {pair} {kernels}: KD step {step.get('step_kd')} ms, FA step "
                f"{step.get('step_fa')} ms ({time.perf_counter() - t0:.0f} s, load {load})",
                flush=True,
            )
    return rows


# ------------------------------------------------------------------------------- reports


def _parts(rows, pair, kernels):
    return {r["part"]: r for r in rows if r["pair"] == pair and r["kernels"] == kernels}


def report(rows, command, machine):
    pairs = [p for p in PAIRS if any(r["pair"] == p for r in rows)]
    kernel_sets = [k for k in KERNELS if any(r["kernels"] == k for r in rows)]
    lines = [
        MARK_BEGIN,
        "",
        "## Where the time goes, per step (issue 34 item 1)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}. **Shared**: a long background training run (and other sessions' work) "
        "used the same cores throughout, so the absolute milliseconds are inflated and drift; read "
        "the ratios within one process (one column), whose parts ran in interleaved rounds.  ",
        "Each part is its own `tf.function` on the same real Fashion-MNIST batch (128 x 28x28x1, "
        "label-free KL T=4, exact FA fro2 on the default taps at the default beta, SGD Nesterov "
        "momentum 0.9); median over the rounds after warm-up. `default`: the machine's oneDNN "
        "kernels; `avx2`: `ONEDNN_MAX_CPU_ISA=AVX2`, each in its own process. Share: of the whole "
        "step with FA (`step_fa`). Attainable: FLOPs counted from the shapes (2 per multiply-add; "
        "elementwise work estimated) per second, over the better of the large conv and the large "
        "matmul in the same process.",
        "",
    ]
    for pair in pairs:
        lines += [f"### {pair}: {PAIRS[pair]}", ""]
        head = "| part | MFLOP |" + "".join(
            f" {k} ms | {k} share of FA step | {k} GFLOP/s | {k} of attainable |"
            for k in kernel_sets
        )
        lines += [head, "|---|---:|" + "---:|---:|---:|---:|" * len(kernel_sets)]
        first = {}
        for k in kernel_sets:  # every part any kernel set measured, in the order measured
            first.update({n: r for n, r in _parts(rows, pair, k).items() if n not in first})
        for name, r in first.items():
            label = r["label"] + (f" ({r['method']})" if r.get("method") else "")
            cells = f"| {label} | {float(r['mflop']):.4g} |"
            for k in kernel_sets:
                p = _parts(rows, pair, k).get(name)
                if p is None:
                    cells += " - | - | - | - |"
                    continue
                frac = p.get("fraction_attainable")
                cells += (
                    f" {float(p['ms_median']):.1f} | {100 * float(p['share_step_fa']):.0f}% | "
                    f"{float(p['gflop_per_s']):.1f} | "
                    f"{'' if frac in ('', None) else f'{100 * float(frac):.0f}%'} |"
                )
            lines.append(cells)
        lines += ["", *_overhead_lines(rows, pair, kernel_sets), ""]
    lines += [MARK_END]
    return "\n".join(lines) + "\n"


def _overhead_lines(rows, pair, kernel_sets):
    """Exact FA's cost over KD only, taken apart."""
    out = [
        "| kernels | FA step / KD step | FA step - KD step, ms | FA taps alone (sum), ms | "
        "student fwd+bwd KD+FA - KD, ms | teacher fwd share of KD step |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in kernel_sets:
        p = {n: float(r["ms_median"]) for n, r in _parts(rows, pair, k).items()}
        taps = sum(v for n, v in p.items() if n.startswith("fa_") and _is_tap(n))
        out.append(
            f"| {k} | **{p['step_fa'] / p['step_kd']:.2f}x** | {p['step_fa'] - p['step_kd']:.1f} | "
            f"{taps:.1f} | {p['student_fwd_bwd_fa'] - p['student_fwd_bwd_kd']:.1f} | "
            f"{100 * p['teacher_fwd'] / p['step_kd']:.0f}% |"
        )
    return out


def _is_tap(name):
    return name.startswith("fa_") and not name.endswith(("_fwd", "_mp"))


def write_section(path, section):
    """Puts `section` in the file at `path` between the markers (replacing an earlier one), or at its end."""
    old = open(path).read() if os.path.exists(path) else ""
    if MARK_BEGIN in old and MARK_END in old:
        head, rest = old.split(MARK_BEGIN, 1)
        tail = rest.split(MARK_END, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = old + ("\n" if old and not old.endswith("\n\n") else "") + section
    _harness.write_text(path, text)


def plot(rows, path):
    if not path:
        return
    import numpy as np

    plt = _harness.pyplot()
    pairs = [p for p in PAIRS if any(r["pair"] == p for r in rows)]
    kernel_sets = [k for k in KERNELS if any(r["kernels"] == k for r in rows)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(7.5 * len(pairs), 6), squeeze=False)
    for ax, pair in zip(axes[0], pairs):
        names = [n for n in _parts(rows, pair, kernel_sets[0]) if not n.startswith("peak_")]
        y = np.arange(len(names))
        height = 0.8 / len(kernel_sets)
        for i, k in enumerate(kernel_sets):
            parts = _parts(rows, pair, k)
            ms = [float(parts[n]["ms_median"]) if n in parts else 0.0 for n in names]
            bars = ax.barh(y + i * height, ms, height, label=k)
            for bar, n in zip(bars, names):
                frac = parts.get(n, {}).get("fraction_attainable")
                if frac not in ("", None) and float(frac) > 0:
                    ax.annotate(
                        f"{100 * float(frac):.0f}%",
                        (bar.get_width(), bar.get_y() + bar.get_height() / 2),
                        xytext=(2, 0),
                        textcoords="offset points",
                        va="center",
                        fontsize=7,
                    )
        labels = [_parts(rows, pair, kernel_sets[0])[n]["label"] for n in names]
        ax.set_yticks(y + height * (len(kernel_sets) - 1) / 2, labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms (median; shared machine)")
        ax.set_title(f"{pair}: parts of one step (labels: fraction of attainable)", fontsize=9)
        ax.legend(title="oneDNN kernels")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)


def main():
    spec = _harness.worker_spec()
    if spec is not None:  # a child of run: one (pair, kernel set)
        return worker(spec)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=["quickstart"], choices=list(PAIRS))
    p.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out-csv", default=None)
    p.add_argument("--md", default=None, help="a markdown file to write the report section into")
    p.add_argument("--png", default=None)
    p.add_argument("--from-csv", default=None, help="report an existing CSV")
    args = p.parse_args()
    if args.from_csv:
        rows = derived(_harness.read_rows(args.from_csv, missing_ok=False))
    else:
        rows = run(args)
    machine = f"{_harness.cpu_model()}, {os.cpu_count()} cores, no GPU"
    text = report(rows, "python benchmarks/step_parts.py " + " ".join(sys.argv[1:]), machine)
    print(text)
    if args.md:
        write_section(args.md, text)
    plot(rows, args.png)


if __name__ == "__main__":
    main()
