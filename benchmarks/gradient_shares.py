"""Each loss term's share of the gradient at the start of the 2/4-bit budget's FAQD cells (issue 35).

The budget's decision ("FA acts: a quarter to a half of the gradient") rests on the line that
`faqd_tf.callbacks.GradientShares` prints when a distillation starts. The budget's logs are not kept,
so this reruns the start of every FAQD cell of `benchmarks/budget.py` (the same `train.py` overrides,
so the same student, initial weights and first batch) for one step and writes the line's numbers:

    python benchmarks/gradient_shares.py --csv docs/budget/gradient_shares.csv

Columns: `init,bits,arm,seed,term,norm,share` (share of the summed norms, as the line prints it).
"""

import argparse
import os
import re
import subprocess
import sys

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks._harness import ROOT, append_rows, read_rows  # noqa: E402
from benchmarks.budget import Cell, ensure_teacher  # noqa: E402

FIELDS = ["init", "bits", "arm", "seed", "term", "norm", "share"]
LINE = re.compile(r"gradient norms at the start: (.*)")
TERM = re.compile(r"(\w+) ([\d.e+-]+) \(([\d.]+)%\)")


def parse(log_text):
    """`[(term, norm, share 0-1), ...]` of the last 'gradient norms at the start' line in `log_text`."""
    lines = LINE.findall(log_text)
    if not lines:
        return []
    return [
        (name, float(norm), float(share) / 100) for name, norm, share in TERM.findall(lines[-1])
    ]


def start_of(cell, out):
    """Runs the first step of `cell` into `out`; returns its parsed gradient shares."""
    command = _harness.quickstart_command(
        "--stage",
        "distill",
        "--overwrite",
        "--set",
        f"output_dir={out}",
        "--set",
        "train.steps_per_epoch=1",
        "--set",
        "train.epochs=1",
        "--set",
        "dataset.validation_split=null",
        overrides={key: value for key, value in cell.overrides().items() if key != "train.epochs"},
    )
    proc = subprocess.run(
        command, cwd=ROOT, env=_harness.child_env(), capture_output=True, text=True
    )
    if proc.returncode:
        raise SystemExit(
            f"{cell.name}: train.py exited with {proc.returncode}: {proc.stderr[-2000:]}"
        )
    return parse(proc.stdout + proc.stderr)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--csv", default=os.path.join(_harness.DOCS, "budget", "gradient_shares.csv"))
    p.add_argument("--out-dir", default="/work/runs/gradient_shares")
    args = p.parse_args(argv)
    ensure_teacher()
    settings = [("fine-tune", 4, 15), ("fine-tune", 2, 15), ("end-to-end", 2, 30)]
    have = {(r["init"], r["bits"], r["seed"]) for r in read_rows(args.csv)}
    for init, bits, epochs in settings:
        for seed in args.seeds:
            if (init, str(bits), str(seed)) in have:
                continue
            cell = Cell(init, bits, "FAQD", seed, epochs)
            shares = start_of(cell, os.path.join(args.out_dir, cell.name))
            rows = [
                dict(
                    init=init,
                    bits=bits,
                    arm="FAQD",
                    seed=seed,
                    term=t,
                    norm=f"{n:.4g}",
                    share=round(s, 4),
                )
                for t, n, s in shares
            ]
            append_rows(args.csv, FIELDS, rows)
            print(
                f"[shares] {cell.name}: " + ", ".join(f"{t} {100 * s:.1f}%" for t, n, s in shares),
                flush=True,
            )


if __name__ == "__main__":
    main()
