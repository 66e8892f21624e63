"""How accurate the float32 exact FA is on real feature maps, against a float64 NumPy reference.

Not run in CI. For each teacher/student pair of `benchmarks/real_pairs.py` (the quickstart's ResNet8
on Fashion-MNIST; ResNet56 -> ResNet20 on Fashion-MNIST 32x32x3), each start (fine-tune: the FP
weights quantized; end-to-end: fresh weights), each bit width, and each student state (`start`: as
built; `trained`: after `--train-steps` label-free FAQD steps), the stage maps of `--batches` real
training batches are taken with the student in training mode (as `Distiller.train_step` runs it).
On every map pair and sample:

- `estimate`: the gram form's own estimate of its relative rounding error, `eps sqrt(N) terms / total`
  (`faqd_tf.losses.gram_error_estimate`), which decides whether a sample is redone pairwise;
- `gram_loss`, `gram_grad`: relative error of the float32 gram form *without* that fallback (loss,
  and the gradient with respect to the student's map, `|g - g_ref| / |g_ref|`);
- `lib_loss`, `lib_grad`: the same for `feature_affinity_per_sample(method="auto")` as shipped;
- `flagged`: whether the shipped check redoes the sample pairwise.

The reference is eq. (6) in float64 NumPy (`S = A A^T` formed explicitly) with its analytic gradient.
Writes one CSV row per (pair, start, bits, state, tap) with quantiles over the samples, a markdown
summary and a scatter plot of the actual error against the estimate:

    python benchmarks/fa_accuracy.py --out-csv docs/fa_accuracy.csv --md docs/fa_accuracy.md \
        --png docs/fa_accuracy.png
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks import _harness, real_pairs  # noqa: E402

FIELDS = [
    "pair",
    "start",
    "bits",
    "state",
    "tap",
    "shape",
    "method",
    "samples",
    "flagged_fraction",
    "estimate_median",
    "estimate_max",
    "gram_loss_median",
    "gram_loss_max",
    "gram_grad_median",
    "gram_grad_max",
    "lib_loss_max",
    "lib_grad_max",
    "loss_over_estimate_max",
    "grad_over_estimate_max",
    "loss_median",
]


def reference(t, s, eps):
    """float64 per-sample loss ||A A^T - B B^T||_F^2 / N^2 and its gradient for the student's map."""

    def unit(v):
        sq = np.sum(v * v, axis=-1, keepdims=True)
        return v / np.sqrt(np.maximum(sq, eps)), sq

    a, _ = unit(t)
    b, sq = unit(s)
    d = a @ a.T - b @ b.T
    n = a.shape[0]
    g = -4.0 * (d @ b) / n**2
    norm = np.sqrt(np.maximum(sq, eps))
    grad = np.where(sq > eps, (g - b * np.sum(b * g, axis=-1, keepdims=True)) / norm, g / norm)
    return float(np.sum(d * d)) / n**2, grad


def library(losses, tf, t_map, s_map, raw):
    """Per-sample loss and gradient of the library's exact FA (gram without its fallback if `raw`)."""
    exact = losses.affinity  # the module whose limit the gram form reads
    limit = exact.GRAM_RELATIVE_ERROR_LIMIT
    exact.GRAM_RELATIVE_ERROR_LIMIT = float("inf") if raw else limit
    try:
        s_map = tf.convert_to_tensor(s_map)
        with tf.GradientTape() as tape:
            tape.watch(s_map)
            value = losses.feature_affinity_per_sample(
                t_map, s_map, method="gram" if raw else "auto"
            )
            total = tf.reduce_sum(value)
        return value.numpy(), tape.gradient(total, s_map).numpy()
    finally:
        exact.GRAM_RELATIVE_ERROR_LIMIT = limit


def train(distiller_cls, keras, teacher, student, data, steps, end_to_end):
    distiller = distiller_cls(
        student, teacher, kd="mse" if end_to_end else "kl", temperature=4.0, seed=0
    )
    lr = keras.optimizers.schedules.CosineDecay(0.05 if end_to_end else 0.01, steps)
    distiller.compile(keras.optimizers.SGD(lr, momentum=0.9, nesterov=True))
    distiller.fit(data.repeat(), steps_per_epoch=steps, epochs=1, verbose=0)


def measure(args):
    import keras
    import tensorflow as tf

    from faqd_tf import losses
    from faqd_tf.distiller import Distiller
    from faqd_tf.features import paired_extractors

    rows, scatter = [], []
    for pair_name in args.pairs:
        data = real_pairs.images(pair_name, "train", batch_size=args.batch_size, seed=0)
        batches = list(data.take(args.batches))
        for start in args.starts:
            for bits in args.bits:
                teacher, student = real_pairs.pair(pair_name, bits, start, seed=0)
                for state in args.states:
                    t0 = time.perf_counter()
                    if state == "trained":
                        train(
                            Distiller,
                            keras,
                            teacher,
                            student,
                            real_pairs.images(pair_name, seed=1),
                            args.train_steps,
                            start == "end_to_end",
                        )
                    t_ext, s_ext = paired_extractors(teacher, student)
                    per_tap = {}
                    for x in batches:
                        t_maps = t_ext(x, training=False)[1:]
                        s_maps = s_ext(x, training=True)[1:]
                        for tap, (t_map, s_map) in enumerate(zip(t_maps, s_maps), start=1):
                            est = losses.gram_error_estimate(t_map, s_map).numpy()
                            g_loss, g_grad = library(losses, tf, t_map, s_map, raw=True)
                            l_loss, l_grad = library(losses, tf, t_map, s_map, raw=False)
                            t_np = (
                                tf.image.resize(t_map, s_map.shape[1:3]).numpy()
                                if t_map.shape[1:3] != s_map.shape[1:3]
                                else t_map.numpy()
                            )
                            s_np = s_map.numpy()
                            b, h, w, c = s_np.shape
                            acc = per_tap.setdefault(tap, dict(shape=f"{h}x{w}x{c}", rows=[]))
                            for i in range(b):
                                ref_loss, ref_grad = reference(
                                    t_np[i].reshape(h * w, -1).astype(np.float64),
                                    s_np[i].reshape(h * w, c).astype(np.float64),
                                    losses.NORM_EPSILON,
                                )
                                gnorm = np.linalg.norm(ref_grad)

                                def err(v):
                                    return abs(float(v) - ref_loss) / ref_loss

                                def gerr(g):
                                    return np.linalg.norm(g[i].reshape(h * w, c) - ref_grad) / gnorm

                                acc["rows"].append(
                                    (
                                        est[i],
                                        err(g_loss[i]),
                                        gerr(g_grad),
                                        err(l_loss[i]),
                                        gerr(l_grad),
                                        ref_loss,
                                    )
                                )
                    for tap, acc in per_tap.items():
                        a = np.array(acc["rows"])
                        est, gl, gg, ll, lg, loss = a.T
                        flagged = est > losses.GRAM_RELATIVE_ERROR_LIMIT
                        row = dict(
                            pair=pair_name,
                            start=start,
                            bits=bits,
                            state=state,
                            tap=tap,
                            shape=acc["shape"],
                            method=losses.resolve_method(
                                *[(1, *map(int, acc["shape"].split("x")))] * 2
                            ),
                            samples=len(a),
                            flagged_fraction=round(float(flagged.mean()), 4),
                            estimate_median=f"{np.median(est):.2e}",
                            estimate_max=f"{est.max():.2e}",
                            gram_loss_median=f"{np.median(gl):.2e}",
                            gram_loss_max=f"{gl.max():.2e}",
                            gram_grad_median=f"{np.median(gg):.2e}",
                            gram_grad_max=f"{gg.max():.2e}",
                            lib_loss_max=f"{ll.max():.2e}",
                            lib_grad_max=f"{lg.max():.2e}",
                            loss_over_estimate_max=f"{np.max(gl / est):.2e}",
                            grad_over_estimate_max=f"{np.max(gg / est):.2e}",
                            loss_median=f"{np.median(loss):.3g}",
                        )
                        rows.append(row)
                        scatter.append((f"{pair_name} {start}", est, gl, gg))
                        print(
                            f"[fa_accuracy] {pair_name} {start} {bits}-bit {state} tap{tap} {acc['shape']}: "
                            f"flagged {row['flagged_fraction']:.3f}, estimate max {row['estimate_max']}, "
                            f"gram loss/grad error max {row['gram_loss_max']} / {row['gram_grad_max']}, "
                            f"shipped {row['lib_loss_max']} / {row['lib_grad_max']} "
                            f"({time.perf_counter() - t0:.0f} s)",
                            flush=True,
                        )
                    _harness.write_rows(
                        args.out_csv, FIELDS, rows
                    )  # after each setting: a kill keeps the rest
    return rows, scatter


def synthetic_sweep(seed=1):
    """Where the gram form does lose digits (synthetic, to size the fallback limit): a student whose
    channels are a permutation of the teacher's plus noise, so that S_S is close to S_T while
    M = A - B is not small; half of each map one repeated pixel, as a background would be."""
    import tensorflow as tf

    from faqd_tf import losses

    rng = np.random.default_rng(seed)
    rows = []
    for c in (16, 64):
        for hw in (16, 32):
            for noise in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5):
                t = np.maximum(rng.normal(size=(4, hw, hw, c)), 0)
                t[:, : hw // 2] = t[:, :1, :1]
                s = (t + noise * rng.normal(size=t.shape))[..., rng.permutation(c)]
                t, s = t.astype("float32"), s.astype("float32")
                est = losses.gram_error_estimate(t, s).numpy()
                g_loss, g_grad = library(losses, tf, t, s, raw=True)
                l_loss, l_grad = library(losses, tf, t, s, raw=False)
                errs = []
                for i in range(4):
                    ref_loss, ref_grad = reference(
                        t[i].reshape(hw * hw, c).astype(np.float64),
                        s[i].reshape(hw * hw, c).astype(np.float64),
                        losses.NORM_EPSILON,
                    )
                    gn = np.linalg.norm(ref_grad)
                    errs.append(
                        (
                            abs(g_loss[i] - ref_loss) / ref_loss,
                            np.linalg.norm(g_grad[i].reshape(hw * hw, c) - ref_grad) / gn,
                            abs(l_loss[i] - ref_loss) / ref_loss,
                            np.linalg.norm(l_grad[i].reshape(hw * hw, c) - ref_grad) / gn,
                        )
                    )
                e = np.max(np.array(errs), axis=0)
                rows.append(
                    dict(
                        map=f"{hw}x{hw}x{c}",
                        noise=noise,
                        estimate=float(est.max()),
                        gram_loss=e[0],
                        gram_grad=e[1],
                        flagged=float(np.mean(est > losses.GRAM_RELATIVE_ERROR_LIMIT)),
                        lib_loss=e[2],
                        lib_grad=e[3],
                    )
                )
    return rows


def synthetic_report(rows):
    lines = [
        "*Synthetic* (channel-permuted near-converged students, half the pixels one background vector; "
        "max over 4 samples): where the gram form loses digits and what the fallback gives.",
        "",
        "| map | noise | estimate | gram loss error | gram gradient error | redone pairwise | shipped loss error "
        "| shipped gradient error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['map']} | {r['noise']:g} | {r['estimate']:.1e} | {r['gram_loss']:.1e} | {r['gram_grad']:.1e} "
            f"| {r['flagged']:.2f} | {r['lib_loss']:.1e} | {r['lib_grad']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def plot(scatter, path, limit):
    plt = _harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for label in sorted({s[0] for s in scatter}):
        est = np.concatenate([s[1] for s in scatter if s[0] == label])
        for ax, values in zip(
            axes,
            (
                np.concatenate([s[2] for s in scatter if s[0] == label]),
                np.concatenate([s[3] for s in scatter if s[0] == label]),
            ),
        ):
            ax.scatter(est, np.maximum(values, 1e-10), s=3, alpha=0.4, label=label)
    for ax, what in zip(axes, ("loss", "gradient")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(limit, color="k", ls="--", lw=1, label=f"fallback limit {limit:g}")
        ax.axhline(1e-3, color="r", ls=":", lw=1, label="adopted bound 1e-3")
        ax.set_xlabel("gram form's estimate of its relative error")
        ax.set_ylabel(f"actual relative error of the {what} (float32 gram, no fallback)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(
        "Exact FA (gram form, float32) against float64 on real Fashion-MNIST maps, per sample"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def report(rows, command, limit):
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores. Relative errors against float64 NumPy, per "
        f"sample; quantiles over all samples of the batches. Fallback limit: {limit:g}.",
        "",
        "| pair | start | bits | state | tap | map | auto | flagged | estimate median / max | "
        "gram loss error median / max | gram gradient error median / max | "
        "shipped loss / gradient error max | loss (median) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pair']} | {r['start']} | {r['bits']} | {r['state']} | {r['tap']} | {r['shape']} | "
            f"{r['method']} | {float(r['flagged_fraction']):.3f} | {r['estimate_median']} / {r['estimate_max']} | "
            f"{r['gram_loss_median']} / {r['gram_loss_max']} | {r['gram_grad_median']} / {r['gram_grad_max']} | "
            f"{r['lib_loss_max']} / {r['lib_grad_max']} | {r['loss_median']} |"
        )
    worst = lambda key: max(float(r[key]) for r in rows)  # noqa: E731
    lines += [
        "",
        f"Worst over every row: gram loss error {worst('gram_loss_max'):.2e}, gram gradient error "
        f"{worst('gram_grad_max'):.2e}; actual/estimate at most {worst('loss_over_estimate_max'):.2e} (loss), "
        f"{worst('grad_over_estimate_max'):.2e} (gradient); shipped at most {worst('lib_loss_max'):.2e} / "
        f"{worst('lib_grad_max'):.2e}; samples redone pairwise: "
        f"{sum(float(r['flagged_fraction']) * int(r['samples']) for r in rows):.0f} of "
        f"{sum(int(r['samples']) for r in rows)}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="*", default=list(real_pairs.PAIRS), choices=real_pairs.PAIRS)
    p.add_argument(
        "--synthetic",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also the synthetic sweep of maps where the gram form cancels",
    )
    p.add_argument(
        "--starts", nargs="+", default=list(real_pairs.STARTS), choices=real_pairs.STARTS
    )
    p.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument(
        "--states", nargs="+", default=["start", "trained"], choices=["start", "trained"]
    )
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out-csv", default=None)
    p.add_argument("--md", default=None)
    p.add_argument("--png", default=None)
    args = p.parse_args(argv)
    from faqd_tf import losses

    rows, scatter = measure(args) if args.pairs else ([], [])
    text = (
        report(
            rows,
            "python benchmarks/fa_accuracy.py " + " ".join(sys.argv[1:]),
            losses.GRAM_RELATIVE_ERROR_LIMIT,
        )
        if rows
        else ""
    )
    if args.synthetic:
        text += "\n" + synthetic_report(synthetic_sweep())
    print(text)
    _harness.write_text(args.md, text)
    if args.png and scatter:
        plot(scatter, args.png, losses.GRAM_RELATIVE_ERROR_LIMIT)


if __name__ == "__main__":
    main()
