"""Cost of feature affinity on real feature maps: exact (pairwise, gram, auto; fro2 and l1) against FFA.

Not run in CI. The maps are real: the quickstart's trained FP ResNet8 (Fashion-MNIST,
`benchmarks/real_pairs.py`) and a 4-bit student (`--start finetune`: its twin; `end_to_end`: fresh
weights), rebuilt for larger inputs with the same weights, so that stage k (C = 16, 32, 64 channels)
has an H x W map: a map of H x W x C is the stage-k output for Fashion-MNIST images resized to
`H * 2^(k-1)` pixels. One step is the loss plus its gradient with respect to the student's map,
under `tf.function`. Methods:

- `gram`: exact fro2 from C x C products (the library's); `pairwise`, `pairwise_l1`: exact fro2 / L1
  from the N x N difference (whole when it fits `TILE_ELEMENTS_PER_SAMPLE`, else in row tiles);
- `auto`: the library's choice for fro2;
- `ffa_k1`, `ffa_k5`, `ffa_k15` (fro2) and `ffa_k15_l1`: fast FA.

`--inputs random` times random normal maps instead (a synthetic check, labelled as such).
Reported per method:

- time: median wall time per step. Each map size runs in its own subprocess; after two warm-up
  calls per method (trace + first run) the methods are timed in `--rounds` interleaved rounds
  (round r times every method before round r+1), so a change of machine load hits all alike;
- memory: the peak resident set size (VmHWM) while the method runs alone (warm-up), after resetting
  the peak with /proc/self/clear_refs, and its increase over the resident size just before;
- `flagged`: the share of samples whose gram error estimate asks for the pairwise fallback.

A method whose estimated working memory exceeds `--mem-limit-gb`, or the pairwise forms above
`--pairwise-max-n` pixels (seconds per step), is skipped with the reason. Writes a CSV, a log-log plot
of time per sample against N = H * W (as Fig. 4 of arXiv 2302.10899, with the exact forms added),
and prints a markdown table and the ratios:

    python benchmarks/fa_cost.py --out-csv docs/fa_cost.csv --out-png docs/fa_cost.png --md docs/fa_cost.md
"""

import argparse
import gc
import os
import platform
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST  # noqa: E402

METHODS = ["ffa_k1", "ffa_k5", "ffa_k15", "ffa_k15_l1", "gram", "auto", "pairwise", "pairwise_l1"]
FIELDS = [
    "inputs",
    "start",
    "height",
    "width",
    "channels",
    "batch",
    "n",
    "method",
    "resolved",
    "status",
    "flagged",
    "time_ms_median",
    "time_ms_min",
    "reps",
    "peak_rss_mb",
    "rss_increase_mb",
    "estimate_mb",
    "note",
]


def estimate_bytes(method, batch, n, c):
    """Working memory of one forward+backward step, for the skip decision (an estimate, not a measurement)."""
    if method.startswith("pairwise"):
        # Row tiles of 2^16 entries a sample, a few alive at once, plus the maps.
        return 4 * batch * 2**16 * 4 + 12 * batch * n * c * 4
    if method.startswith("gram"):
        return 12 * batch * n * c * 4
    k = int(method.split("_k")[1].split("_")[0])
    return 4 * batch * n * (k + 2 * c) * 4


# ------------------------------------------------------------------------------------ worker


def loss_of(method, tf, losses):
    if method.startswith("ffa"):
        k = int(method.split("_k")[1].split("_")[0])
        norm = "l1" if method.endswith("_l1") else "fro2"
        return lambda t, s: losses.fast_feature_affinity(t, s, k=k, seed=1, fa_norm=norm)
    if method == "pairwise_l1":
        return lambda t, s: losses.feature_affinity(t, s, method="pairwise", fa_norm="l1")
    return lambda t, s: losses.feature_affinity(t, s, method=method)


def real_maps(h, c, batch, start):
    """Stage maps of H x H x C from the quickstart's trained ResNet8 and a 4-bit student, on real
    Fashion-MNIST images resized so that the stage with C channels is H x H."""
    import keras

    from benchmarks import real_pairs
    from faqd_tf import data, models
    from faqd_tf.features import paired_extractors
    from faqd_tf.quantize import quantize_model

    stage = {16: 1, 32: 2, 64: 3}[c]
    size = h * 2 ** (stage - 1)
    trained = keras.models.load_model(real_pairs.quickstart_teacher(), safe_mode=True)
    teacher = models.get("resnet8", num_classes=10, input_shape=(size, size, 1))
    teacher.set_weights(trained.get_weights())  # the weights do not depend on the input size
    if start == "finetune":
        student = quantize_model(teacher, weight_bits=4)
    else:
        keras.utils.set_random_seed(0)
        student = models.get("resnet8", num_classes=10, input_shape=(size, size, 1), weight_bits=4)
    images = next(
        iter(
            data.load(
                FMNIST,
                "train",
                labels=False,
                batch_size=batch,
                seed=0,
                image_size=(size, size),
                augment=False,
            )
        )
    )
    t_ext, s_ext = paired_extractors(teacher, student, [f"stage{stage}"], [f"stage{stage}"])
    return t_ext(images, training=False)[1].numpy(), s_ext(images, training=True)[1].numpy()


def worker(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    from faqd_tf import losses

    h, c, batch = spec["height"], spec["channels"], spec["batch"]
    n = h * h
    if spec["inputs"] == "real":
        t_map, s_map = real_maps(h, c, batch, spec["start"])
    else:
        rng = np.random.default_rng(0)
        t_map, s_map = (rng.normal(size=(batch, h, h, c)).astype("float32") for _ in range(2))
    teacher, student = tf.constant(t_map), tf.Variable(s_map)
    flagged = float(
        np.mean(
            losses.gram_error_estimate(teacher, student).numpy() > losses.GRAM_RELATIVE_ERROR_LIMIT
        )
    )

    steps, rows = {}, {}
    for method in METHODS:
        row = {
            "inputs": spec["inputs"],
            "start": spec["start"],
            "height": h,
            "width": h,
            "channels": c,
            "batch": batch,
            "n": n,
            "method": method,
            "flagged": round(flagged, 4),
        }
        resolved = (
            losses.resolve_method(teacher.shape, student.shape) if method == "auto" else method
        )
        row["resolved"] = resolved
        estimate = estimate_bytes(resolved, batch, n, c)
        row["estimate_mb"] = round(estimate / 2**20, 1)
        rows[method] = row
        if estimate > spec["mem_limit_gb"] * 2**30:
            row.update(
                status="skipped",
                note=f"estimate {estimate / 2**30:.1f} GiB > limit {spec['mem_limit_gb']} GiB",
            )
            continue
        if resolved.startswith("pairwise") and n > spec["pairwise_max_n"]:
            row.update(
                status="skipped",
                note=f"N = {n} > --pairwise-max-n {spec['pairwise_max_n']} (O(N^2 C) time)",
            )
            continue

        loss_fn = loss_of(method, tf, losses)

        @tf.function
        def step(loss_fn=loss_fn):
            with tf.GradientTape() as tape:
                value = loss_fn(teacher, student)
            return value, tape.gradient(value, student)

        gc.collect()
        rss_before = _harness.status_kb("VmRSS")
        _harness.reset_peak_rss()
        for _ in range(2):
            [x.numpy() for x in step()]
        peak = _harness.status_kb("VmHWM")
        row.update(
            peak_rss_mb=round(peak / 1024, 1), rss_increase_mb=round((peak - rss_before) / 1024, 1)
        )
        steps[method] = step

    timed = _harness.interleaved_times(
        [lambda step=step: [x.numpy() for x in step()] for step in steps.values()],
        spec["rounds"],
        spec["reps"],
        budget=spec["time_budget"],
    )
    times_of = dict(zip(steps, timed))
    for method, row in rows.items():
        if method in times_of:
            times = times_of[method]
            row.update(
                status="ok",
                time_ms_median=round(float(np.median(times)) * 1e3, 3),
                time_ms_min=round(min(times) * 1e3, 3),
                reps=len(times),
            )
        _harness.emit("ROW ", row)


# ------------------------------------------------------------------------------------ driver


def run_all(args):
    rows = []
    for h in args.sizes:
        for c in args.channels:
            batch = args.large_batch if h >= args.large_from else args.batch
            spec = dict(
                inputs=args.inputs,
                start=args.start,
                height=h,
                channels=c,
                batch=batch,
                mem_limit_gb=args.mem_limit_gb,
                rounds=args.rounds,
                reps=args.reps,
                time_budget=args.time_budget,
                pairwise_max_n=args.pairwise_max_n,
            )
            t0 = time.perf_counter()
            proc, got = _harness.run_worker(__file__, spec, "ROW ")
            done = {r["method"] for r in got}
            for method in METHODS:
                if method not in done:  # the worker died (e.g. out of memory) before reporting it
                    got.append(
                        dict(
                            inputs=args.inputs,
                            start=args.start,
                            height=h,
                            width=h,
                            channels=c,
                            batch=batch,
                            n=h * h,
                            method=method,
                            status="failed",
                            note=f"worker exit code {proc.returncode}",
                        )
                    )
            rows.extend(got)
            print(
                f"# {h}x{h}x{c} batch {batch}: {time.perf_counter() - t0:.0f} s",
                file=sys.stderr,
                flush=True,
            )
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
    return rows


def _num(row, key):
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def plot(rows, path):
    plt = _harness.pyplot()
    channels = sorted({int(r["channels"]) for r in rows})
    fig, axes = plt.subplots(1, len(channels), figsize=(5.5 * len(channels), 4.5), squeeze=False)
    for ax, c in zip(axes[0], channels):
        for method in METHODS:
            pts = sorted(
                (int(r["n"]), _num(r, "time_ms_median") / int(r["batch"]))
                for r in rows
                if int(r["channels"]) == c and r["method"] == method and r["status"] == "ok"
            )
            if pts:
                style = "--" if method.startswith("ffa") else "-"
                ax.plot(*zip(*pts), style, marker="o", label=method)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N = H * W")
        ax.set_ylabel("forward + backward time per sample (ms)")
        ax.set_title(f"C = {c}, per sample (real maps; batch 32, 8 at 112x112)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows):
    configs = sorted({(int(r["height"]), int(r["channels"]), int(r["batch"])) for r in rows})
    lines = [
        "| H x W x C | batch | N | " + " | ".join(METHODS) + " | auto uses | flagged |",
        "|---|---|---|" + "---|" * len(METHODS) + "---|---|",
    ]
    for h, c, b in configs:
        cells, resolved = [], ""
        for method in METHODS:
            r = next(
                r
                for r in rows
                if (int(r["height"]), int(r["channels"]), r["method"]) == (h, c, method)
            )
            if method == "auto":
                resolved = r.get("resolved", "")
            if r["status"] == "ok":
                cells.append(
                    f"{_num(r, 'time_ms_median'):.1f} ms / {_num(r, 'rss_increase_mb'):.0f} MB"
                )
            elif r["status"] == "skipped":
                # the note says which limit: memory estimate or --pairwise-max-n
                cells.append(
                    f"skipped ({r.get('note') or 'estimate %.1f GB' % (_num(r, 'estimate_mb') / 1024)})"
                )
            else:
                cells.append(r["status"])
        flagged = next(r for r in rows if (int(r["height"]), int(r["channels"])) == (h, c)).get(
            "flagged", ""
        )
        lines.append(
            f"| {h}x{h}x{c} | {b} | {h * h} | " + " | ".join(cells) + f" | {resolved} | {flagged} |"
        )
    return "\n".join(lines)


def ratios(rows):
    def get(h, c, method):
        for r in rows:
            if (int(r["height"]), int(r["channels"]), r["method"]) == (h, c, method) and r[
                "status"
            ] == "ok":
                return _num(r, "time_ms_median")
        return None

    out = []
    configs = sorted({(int(r["height"]), int(r["channels"])) for r in rows})
    header = (
        "| H x W x C | exact fro2 (auto) / FFA k=15 | cheaper | pairwise / gram | auto picks the cheaper exact form "
        "| pairwise_l1 / FFA k=15 l1 |"
    )
    out += [header, "|---|---|---|---|---|---|"]
    for h, c in configs:

        def ratio(a, b):
            x, y = get(h, c, a), get(h, c, b)
            return f"{x / y:.2f}" if x and y else "-"

        auto, ffa, gram, pairwise = (get(h, c, m) for m in ("auto", "ffa_k15", "gram", "pairwise"))
        cheaper = "-" if not (auto and ffa) else ("exact" if auto < ffa else "FFA k=15")
        resolved = next(
            (
                r.get("resolved")
                for r in rows
                if (int(r["height"]), int(r["channels"]), r["method"]) == (h, c, "auto")
            ),
            "",
        )
        best = None if not (gram and pairwise) else ("gram" if gram <= pairwise else "pairwise")
        picks = (
            "-"
            if best is None
            else ("yes" if resolved == best else f"no ({resolved}; {best} is cheaper)")
        )
        out.append(
            f"| {h}x{h}x{c} | {ratio('auto', 'ffa_k15')} | {cheaper} | {ratio('pairwise', 'gram')} | {picks} | "
            f"{ratio('pairwise_l1', 'ffa_k15_l1')} |"
        )
    for r in rows:
        if r["method"] == "pairwise_l1" and int(r["height"]) == 56 and r["status"] == "ok":
            out.append(
                f"\nExact L1 (row tiles) at 56x56x{r['channels']}, batch {r['batch']}: peak RSS "
                f"{_num(r, 'peak_rss_mb'):.0f} MB (increase {_num(r, 'rss_increase_mb'):.0f} MB)"
            )
    return "\n".join(out)


def main():
    spec = _harness.worker_spec()
    if spec is not None:  # a child of run_all: one map size
        return worker(spec)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--inputs", default="real", choices=["real", "random"], help="random: synthetic maps"
    )
    parser.add_argument(
        "--start",
        default="finetune",
        choices=["finetune", "end_to_end"],
        help="the student (real maps)",
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[7, 14, 28, 56, 112])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--large-batch", type=int, default=8, help="batch from --large-from on")
    parser.add_argument("--large-from", type=int, default=112)
    parser.add_argument(
        "--mem-limit-gb", type=float, default=6.0, help="skip a method whose estimate exceeds this"
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over the methods")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per method and round")
    parser.add_argument(
        "--time-budget", type=float, default=4.0, help="seconds per method and round at most"
    )
    parser.add_argument(
        "--pairwise-max-n", type=int, default=3136, help="skip the pairwise forms above this N"
    )
    parser.add_argument("--out-csv", default=os.path.join(_harness.DOCS, "fa_cost.csv"))
    parser.add_argument("--out-png", default=os.path.join(_harness.DOCS, "fa_cost.png"))
    parser.add_argument("--md", default=None, help="markdown report")
    parser.add_argument(
        "--from-csv", help="re-plot and re-tabulate an existing CSV without measuring"
    )
    args = parser.parse_args()
    if args.from_csv:
        rows = _harness.read_rows(args.from_csv, missing_ok=False)
    else:
        load = os.getloadavg()
        t0 = time.perf_counter()
        rows = run_all(args)
        _harness.write_rows(args.out_csv, FIELDS, rows)
        rows = _harness.read_rows(args.out_csv, missing_ok=False)
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
            f"total {time.perf_counter() - t0:.0f} s"
        )
    plot(rows, args.out_png)
    first = rows[0] if rows else {}
    inputs = (
        "real Fashion-MNIST maps"
        if first.get("inputs", "real") == "real"
        else "random maps (synthetic)"
    )
    text = "\n".join(
        [
            f"Command: `python benchmarks/fa_cost.py {' '.join(sys.argv[1:])}`  ",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores. Maps: {inputs}, student start "
            f"{first.get('start', '-')}. Time (median) / increase of peak RSS over the RSS before the "
            "method ran; `flagged`: share of samples the gram check redoes pairwise.",
            "",
            table(rows),
            "",
            ratios(rows),
            "",
        ]
    )
    print(text)
    _harness.write_text(args.md, text)


if __name__ == "__main__":
    main()
