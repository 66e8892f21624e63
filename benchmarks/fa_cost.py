"""Cost of feature affinity: exact (pairwise, gram, auto) against fast FA (k = 1, 5, 15).

For each map size (batch, H, W, C), teacher and student of the same shape, one step is the loss
plus its gradient w.r.t. the student map, under `tf.function`. Reported per method:

- time: median wall time of a few steps after two warm-up calls (trace + first run);
- memory: the peak resident set size (VmHWM of /proc/self/status) of the worker process while the
  method runs (warm-up and timed steps), after resetting the peak with /proc/self/clear_refs, and
  its increase over the resident size just before (maps already allocated). The increase is what
  the loss costs on top of the model; the peak includes the TensorFlow runtime.

Each map size runs in its own subprocess; a method whose estimated working memory exceeds
`--mem-limit-gb` is not run and is recorded as skipped with its estimate. Writes a CSV, a log-log
plot of time per sample against N = H * W (one line per method, as Fig. 4 of arXiv 2302.10899 with exact FA
added), and prints a markdown table.

Usage (from the repository root):

    nice python benchmarks/fa_cost.py --out-csv docs/fa_cost.csv --out-png docs/fa_cost.png
"""

import argparse
import csv
import gc
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ["ffa_k1", "ffa_k5", "ffa_k15", "gram", "auto", "pairwise"]  # pairwise last: largest
FIELDS = [
    "height", "width", "channels", "batch", "n", "method", "resolved", "status", "time_ms_median",
    "time_ms_min", "reps", "peak_rss_mb", "rss_increase_mb", "estimate_mb", "note",
]


def estimate_bytes(method, batch, n, c):
    """Working memory of one forward+backward step, for the skip decision (an estimate, not a measurement)."""
    if method == "pairwise":
        # About four float32 N x N tensors live at once (difference, square, their gradients):
        # measured 3.9 at 56x56x64, batch 32.
        return 4 * batch * n * n * 4
    if method == "gram":
        # float64 copies of both maps, normalized, and their gradients.
        return 8 * batch * n * c * 8
    k = int(method.split("_k")[1])
    return 4 * batch * n * (k + 2 * c) * 4


# ------------------------------------------------------------------------------------ worker


def _status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def worker(spec):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, ROOT)
    import numpy as np
    import tensorflow as tf

    from faqd_tf import losses

    h, c, batch = spec["height"], spec["channels"], spec["batch"]
    n = h * h
    rng = np.random.default_rng(0)
    teacher = tf.constant(rng.normal(size=(batch, h, h, c)).astype("float32"))
    student = tf.Variable(rng.normal(size=(batch, h, h, c)).astype("float32"))

    for method in METHODS:
        row = {"height": h, "width": h, "channels": c, "batch": batch, "n": n, "method": method}
        resolved = losses.resolve_method(teacher.shape, student.shape) if method == "auto" else method
        row["resolved"] = resolved
        estimate = estimate_bytes(resolved, batch, n, c)
        row["estimate_mb"] = round(estimate / 2**20, 1)
        if estimate > spec["mem_limit_gb"] * 2**30:
            row.update(status="skipped", note=f"estimate {estimate / 2**30:.1f} GiB > limit {spec['mem_limit_gb']} GiB")
            print("ROW " + json.dumps(row), flush=True)
            continue

        if method.startswith("ffa"):
            k = int(method.split("_k")[1])
            loss_fn = lambda t, s, k=k: losses.fast_feature_affinity(t, s, k=k, seed=1)
        else:
            loss_fn = lambda t, s, m=method: losses.feature_affinity(t, s, method=m)

        @tf.function
        def step(loss_fn=loss_fn):
            with tf.GradientTape() as tape:
                value = loss_fn(teacher, student)
            return value, tape.gradient(value, student)

        gc.collect()
        rss_before = _status_kb("VmRSS")
        _reset_peak_rss()
        for _ in range(2):
            [x.numpy() for x in step()]
        times = []
        start = time.perf_counter()
        while len(times) < spec["max_reps"] and (len(times) < 3 or time.perf_counter() - start < spec["time_budget"]):
            t0 = time.perf_counter()
            [x.numpy() for x in step()]
            times.append(time.perf_counter() - t0)
        peak = _status_kb("VmHWM")
        row.update(
            status="ok",
            time_ms_median=round(float(np.median(times)) * 1e3, 3),
            time_ms_min=round(min(times) * 1e3, 3),
            reps=len(times),
            peak_rss_mb=round(peak / 1024, 1),
            rss_increase_mb=round((peak - rss_before) / 1024, 1),
        )
        print("ROW " + json.dumps(row), flush=True)
        del step
        gc.collect()


# ------------------------------------------------------------------------------------ driver


def run_all(args):
    rows = []
    for h in args.sizes:
        for c in args.channels:
            batch = args.large_batch if h >= args.large_from else args.batch
            spec = dict(height=h, channels=c, batch=batch, mem_limit_gb=args.mem_limit_gb,
                        max_reps=args.max_reps, time_budget=args.time_budget)
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                capture_output=True, text=True,
            )
            got = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            done = {r["method"] for r in got}
            for method in METHODS:
                if method not in done:  # the worker died (e.g. out of memory) before reporting it
                    got.append(dict(height=h, width=h, channels=c, batch=batch, n=h * h, method=method,
                                    status="failed", note=f"worker exit code {proc.returncode}"))
            rows.extend(got)
            print(f"# {h}x{h}x{c} batch {batch}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
    return rows


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _num(row, key):
    value = row.get(key, "")
    return float(value) if value not in ("", None) else None


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        ax.set_title(f"C = {c}, per sample (batch 32; 8 at 112x112)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows):
    configs = sorted({(int(r["height"]), int(r["channels"]), int(r["batch"])) for r in rows})
    lines = [
        "| H x W x C | batch | N | " + " | ".join(METHODS) + " | auto uses |",
        "|---|---|---|" + "---|" * len(METHODS) + "---|",
    ]
    for h, c, b in configs:
        cells, resolved = [], ""
        for method in METHODS:
            r = next(r for r in rows if (int(r["height"]), int(r["channels"]), r["method"]) == (h, c, method))
            if method == "auto":
                resolved = r.get("resolved", "")
            if r["status"] == "ok":
                cells.append(f"{_num(r, 'time_ms_median'):.1f} ms / {_num(r, 'rss_increase_mb'):.0f} MB")
            elif r["status"] == "skipped":
                cells.append(f"skipped (est. {_num(r, 'estimate_mb') / 1024:.1f} GB)")
            else:
                cells.append(r["status"])
        lines.append(f"| {h}x{h}x{c} | {b} | {h * h} | " + " | ".join(cells) + f" | {resolved} |")
    return "\n".join(lines)


def ratios(rows):
    def get(h, c, method):
        for r in rows:
            if (int(r["height"]), int(r["channels"]), r["method"]) == (h, c, method) and r["status"] == "ok":
                return r
        return None

    out = []
    for h, c, expected in ((32, 16, 10), (56, 64, 20)):
        auto, pair = get(h, c, "auto"), get(h, c, "pairwise")
        if auto and pair:
            ratio = _num(pair, "time_ms_median") / _num(auto, "time_ms_median")
            out.append(f"- pairwise / auto time at {h}x{h}x{c}: {ratio:.1f}x (issue expects >= {expected}x); "
                       f"memory increase {_num(pair, 'rss_increase_mb'):.0f} MB vs {_num(auto, 'rss_increase_mb'):.0f} MB")
        else:
            out.append(f"- pairwise / auto at {h}x{h}x{c}: not measured")
    for r in sorted(rows, key=lambda r: (int(r["channels"]), int(r["n"]))):
        if r["method"] == "auto" and r["status"] == "ok" and int(r["n"]) >= 256:
            f15 = get(int(r["height"]), int(r["channels"]), "ffa_k15")
            if f15:
                out.append(f"- auto / FFA(k=15) time at {r['height']}x{r['width']}x{r['channels']}: "
                           f"{_num(r, 'time_ms_median') / _num(f15, 'time_ms_median'):.2f}")
    big = get(112, 64, "auto")
    if big:
        out.append(f"- exact FA (auto -> {big['resolved']}) at 112x112x64, batch {big['batch']}: peak RSS "
                   f"{_num(big, 'peak_rss_mb'):.0f} MB (increase {_num(big, 'rss_increase_mb'):.0f} MB; "
                   f"expected < 2 GB)")
    return "\n".join(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 56, 64, 112])
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--large-batch", type=int, default=8, help="batch from --large-from on")
    parser.add_argument("--large-from", type=int, default=112)
    parser.add_argument("--mem-limit-gb", type=float, default=6.0, help="skip a method whose estimate exceeds this")
    parser.add_argument("--max-reps", type=int, default=15)
    parser.add_argument("--time-budget", type=float, default=8.0, help="seconds of timed steps per method (min 3 steps)")
    parser.add_argument("--out-csv", default=os.path.join(ROOT, "docs", "fa_cost.csv"))
    parser.add_argument("--out-png", default=os.path.join(ROOT, "docs", "fa_cost.png"))
    parser.add_argument("--from-csv", help="re-plot and re-tabulate an existing CSV without measuring")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return
    if args.from_csv:
        rows = read_csv(args.from_csv)
    else:
        load = os.getloadavg()
        t0 = time.perf_counter()
        rows = run_all(args)
        write_csv(rows, args.out_csv)
        rows = read_csv(args.out_csv)
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
              f"load average before {load[0]:.2f}, after {os.getloadavg()[0]:.2f}; "
              f"total {time.perf_counter() - t0:.0f} s")
    plot(rows, args.out_png)
    print("time (median) / increase of peak RSS over the RSS before the method ran\n")
    print(table(rows))
    print()
    print(ratios(rows))


if __name__ == "__main__":
    main()
