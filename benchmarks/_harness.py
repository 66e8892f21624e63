"""What the benchmarks share: where things are, their CSV rows, their child processes, their timings.

The benchmarks are scripts (`python benchmarks/<name>.py ...`), run again and again to extend the
CSVs committed under docs/; so a row is written whole or not at all, a rerun skips what a CSV
already holds, and a table file is never left half-written. Timings share a machine with other
work: a measurement that compares runs takes them in interleaved rounds, and one that needs a
fresh TensorFlow (a clean peak RSS, the library of another commit) runs in a child process.

A script run as `python benchmarks/<name>.py` has benchmarks/ on its path, not this checkout, so
each starts by putting the checkout first (its own `benchmarks` and `faqd_tf`, rather than an
installed copy), then imports this module::

    if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks import _harness  # noqa: E402

Only when run: a module imported by another leaves the path alone, so that a child which puts
another commit's library first (`benchmarks/step_cost.py`'s `fa_ref`) keeps it first. For the same
reason this module imports neither TensorFlow nor `faqd_tf` when it loads.
"""

import concurrent.futures
import csv
import io
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
"""This checkout."""
DOCS = os.path.join(ROOT, "docs")
"""Where the committed results live (CSVs, reports, charts)."""
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Fashion-MNIST's IDX files (the Debian package dataset-fashion-mnist)."""
FMNIST = f"idx:{FMNIST_DIR}"
"""Fashion-MNIST as `faqd_tf.data` names it."""


# ----------------------------------------------------------------------------------- CSV rows


def read_rows(path, missing_ok=True):
    """The rows of the CSV at `path` as dicts (every value a string); `[]` for no file (or no path)
    when `missing_ok`: a first run has nothing to resume."""
    if missing_ok and (not path or not os.path.exists(path)):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_rows(path, fields, rows):
    """Appends `rows` (dicts; a key not in `fields` is dropped, a missing one left empty) to the CSV
    at `path`, with its header when the file is new or empty, flushed and synced: the rows written
    before a kill are whole, and a rerun that reads them skips their work."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def write_rows(path, fields, rows):
    """Writes the CSV at `path` anew: a header and `rows` (as `append_rows` takes them), written
    aside and renamed, so the file is the old table or the new one, never half of one. Nothing when
    `path` is empty (an optional output)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def write_text(path, text):
    """Writes `text` to `path` (a report) aside and renamed (`faqd_tf.atomic.write_atomically`);
    nothing when `path` is empty."""
    if not path:
        return
    from faqd_tf.atomic import write_atomically

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, text)


# --------------------------------------------------------------------------- child processes


def child_env(one_thread=False):
    """The environment of a child run: TensorFlow's C++ logs off unless the caller set their level;
    `one_thread` pins it to one thread (children that share the cores run faster each on one)."""
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if one_thread:
        env.update(TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1", OMP_NUM_THREADS="1")
    return env


def run_script(script, *args, **kwargs):
    """Runs `python script *args` in a fresh process (a fresh TensorFlow: its own graph, memory
    peak and imported library), output captured as text; returns the `CompletedProcess`.
    `kwargs` go to `subprocess.run` (`env`, `cwd`)."""
    return subprocess.run(
        [sys.executable, os.path.abspath(script), *args], capture_output=True, text=True, **kwargs
    )


def run_worker(script, spec, prefix, **kwargs):
    """Runs `script --worker <spec as JSON>` (`run_script`); returns the process and the JSON values
    of the lines its worker printed with `emit(prefix, ...)`, in order (a worker that died gives
    those it printed before)."""
    proc = run_script(script, "--worker", json.dumps(spec), **kwargs)
    found = [
        json.loads(line[len(prefix) :])
        for line in proc.stdout.splitlines()
        if line.startswith(prefix)
    ]
    return proc, found


def worker_spec(argv=None):
    """In a script with a worker mode: the spec `run_worker` started this process with (`--worker
    <JSON>`, `argv` default `sys.argv[1:]`), or None when the script runs as itself."""
    argv = sys.argv[1:] if argv is None else argv
    return json.loads(argv[1]) if argv[:1] == ["--worker"] else None


def emit(prefix, value):
    """In a worker: prints `value` as one JSON line after `prefix`, for `run_worker` to read."""
    print(prefix + json.dumps(value), flush=True)


def quickstart_command(*flags, overrides=None):
    """The library's own pipeline: `python train.py --config configs/quickstart.json *flags`, then
    `--set key=<value as JSON>` for each of `overrides`."""
    command = [
        sys.executable,
        os.path.join(ROOT, "train.py"),
        "--config",
        os.path.join(ROOT, "configs", "quickstart.json"),
        *flags,
    ]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def run_train(out, overrides, workers):
    """Runs (or resumes: the runner's epoch backups) `train.py` on configs/quickstart.json with
    `overrides` (`--set` values) into `out`, its output appended to `out/train.log`, on one thread
    when `workers` > 1 cells share the cores; returns `(results, history rows, seconds, epochs this
    invocation ran)`. Raises RuntimeError when train.py fails."""
    command = quickstart_command("--set", f"output_dir={out}", overrides=overrides)
    os.makedirs(out, exist_ok=True)
    epochs_before = len(
        read_rows(os.path.join(out, "history.csv"))
    )  # a resumed cell ran these already
    start = time.perf_counter()
    with open(os.path.join(out, "train.log"), "a") as log:
        proc = subprocess.run(
            command,
            cwd=ROOT,
            env=child_env(one_thread=workers > 1),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if proc.returncode:
        raise RuntimeError(
            f"{os.path.basename(out)}: train.py exited with {proc.returncode}; see {out}/train.log"
        )
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    history = read_rows(os.path.join(out, "history.csv"))
    return results, history, seconds, max(1, len(history) - epochs_before)


def pool_run(jobs, workers, tag):
    """Runs `jobs` (callables) `workers` at a time in threads (each job's work is a child process);
    yields each result as it finishes, in this thread, and prints the RuntimeError of a job that
    failed (`[tag] ...`) instead: one failed cell does not stop the others."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in concurrent.futures.as_completed([pool.submit(job) for job in jobs]):
            try:
                yield future.result()
            except RuntimeError as e:
                print(f"[{tag}] {e}", flush=True)


# ---------------------------------------------------------------------------- measurements


def status_kb(key):
    """A `/proc/self/status` value in kB: `VmRSS` (resident now), `VmHWM` (its peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak_rss():
    """Sets this process's peak RSS (`VmHWM`) back to its RSS now, so that the next peak is one step's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def interleaved_times(calls, rounds, per_round=1, budget=None):
    """Wall times (seconds) of `calls` (callables), one list per call: `rounds` rounds, round r
    running every call `per_round` times before round r + 1, so that a change of the machine's load
    hits all of them alike; a call stops its round after `budget` seconds (once it ran)."""
    times = [[] for _ in calls]
    for _ in range(rounds):
        for call, got in zip(calls, times):
            start = time.perf_counter()
            for _ in range(per_round):
                t0 = time.perf_counter()
                call()
                got.append(time.perf_counter() - t0)
                if budget is not None and time.perf_counter() - start > budget:
                    break
    return times


def cpu_model():
    """The CPU's model name (lscpu), for the machine line of a report."""
    import platform

    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


# ---------------------------------------------------------------------------------- reports


def mean_interval(differences):
    """(mean, 95% t half-width, n, differences) of paired `differences`; the half-width is nan for
    n < 2, and None is returned for none."""
    import numpy as np
    from scipy import stats as scipy_stats

    d = np.asarray(differences, dtype=float)
    if len(d) == 0:
        return None
    half = (
        scipy_stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
        if len(d) > 1
        else float("nan")
    )
    return float(d.mean()), float(half), len(d), d


def format_interval(stat):
    """A `mean_interval` as `+m.mm ± h.hh` (points), `+m.mm (one seed)`, or `-` for none."""
    if not stat:
        return "-"
    return f"{stat[0]:+.2f} (one seed)" if stat[2] < 2 else f"{stat[0]:+.2f} ± {stat[1]:.2f}"


def mean_std(values):
    """`mean ± std` (the sample std) of `values` to two decimals, the value alone for one, `-` for none."""
    import numpy as np

    if not len(values):
        return "-"
    return (
        f"{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}"
        if len(values) > 1
        else f"{values[0]:.2f}"
    )


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only: the benchmarks run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
