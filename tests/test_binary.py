"""benchmarks/binary.py and binary_report.py: recipes, the log parser, and the paired tables
against a hand computation."""

import numpy as np
import pytest
from scipy import stats

from benchmarks import binary, binary_report, gradient_shares


def test_recipes_join_factors_and_refuse_unknown_ones():
    values = binary.recipe("stem8+wd0")
    assert values["student.layer_bits"] == {"stem_conv": 8} and values["train.weight_decay"] == 0.0
    assert (
        values["student.weight_bits"] == 1 and values["distill.fa"] is None
    )  # the base underneath
    with pytest.raises(SystemExit, match="unknown factor 'stem9'"):
        binary.recipe("stem9")


def test_gradient_share_line_is_parsed():
    log = "x\n[faqd] gradient norms at the start: kd 2.5 (60.0%), fa 1.67 (40.0%)\nEpoch 1/15\n"
    assert gradient_shares.parse(log) == [("kd", 2.5, 0.6), ("fa", 1.67, 0.4)]
    assert gradient_shares.parse("no line") == []


def _t_interval(d):
    d = np.asarray(d)
    return d.mean(), stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))


def test_factor_and_budget_tables_pair_by_seed(rng):
    acc = rng.uniform(0.85, 0.9, (2, 3))  # base, factor x seeds
    rows = [
        dict(
            factor=f,
            width="1-bit",
            seed=str(s),
            epochs="2",
            accuracy=f"{acc[i, s]:.4f}",
            accuracy_last3=f"{acc[i, s] - 0.01:.4f}",
            accuracy_recal=f"{acc[i, s] + 0.002:.4f}",
        )
        for i, f in enumerate(("base", "stem8"))
        for s in range(3)
    ]
    mean, half = _t_interval(
        [100 * (float(f"{acc[1, s]:.4f}") - float(f"{acc[0, s]:.4f}")) for s in range(3)]
    )
    line = [ln for ln in binary_report.factor_table(rows).splitlines() if "| stem8 |" in ln][0]
    assert f"{mean:+.2f} ± {half:.2f}" in line
    cells = [
        dict(
            table="binary",
            init="fine-tune",
            row="FP",
            column="FP",
            seed="",
            accuracy="0.9100",
            epochs="",
        )
    ]
    for arm, a in (("KD only", acc[0]), ("FAQD", acc[1])):
        cells += [
            dict(
                table="binary stem8",
                init="fine-tune",
                row=arm,
                column="1-bit",
                seed=str(s),
                epochs="15",
                accuracy=f"{a[s]:.4f}",
                accuracy_last3=f"{a[s]:.4f}",
                accuracy_recal=f"{a[s]:.4f}",
            )
            for s in range(3)
        ]
    budget_line = binary_report.budget_table(cells).splitlines()[-1]
    kd = np.array([float(f"{a:.4f}") for a in acc[0]]) * 100
    assert f"| 91.00 | {kd.mean():.2f} ± {kd.std(ddof=1):.2f} |" in budget_line
    assert f"{kd.mean() - 91.0:+.2f}" in budget_line and f"{mean:+.2f} ± {half:.2f}" in budget_line
