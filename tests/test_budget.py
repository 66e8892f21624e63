"""benchmarks/budget.py and budget_fa.py: the cell order, and the paired report against a hand computation."""

import argparse
import re

import numpy as np
from scipy import stats

from benchmarks import budget, budget_fa


def test_cells_run_setting_by_setting_with_every_seed_paired():
    args = argparse.Namespace(
        seeds=[0, 1, 2], finetune_bits=[4, 2], e2e_bits=[2], finetune_epochs=15, e2e_epochs=30
    )
    cells = budget.cells(args)
    assert len(cells) == 3 * 3 * 2 and len(set(cells)) == len(cells)
    settings = [(c.init, c.bits, c.epochs) for c in cells]
    # One setting's cells are contiguous, in the order of the bit lists.
    assert [s for i, s in enumerate(settings) if i == 0 or s != settings[i - 1]] == [
        ("fine-tune", 4, 15),
        ("fine-tune", 2, 15),
        ("end-to-end", 2, 30),
    ]
    for i in range(0, len(cells), 2):  # both arms of a seed side by side
        assert {cells[i].arm, cells[i + 1].arm} == {"KD only", "FAQD"} and cells[i].seed == cells[
            i + 1
        ].seed
    assert [
        budget.Cell.from_name(c.name) for c in cells
    ] == cells  # a cell is found again from its folder


def test_fa_report_pairs_by_seed(rng):
    seeds = 4
    kd_fa = rng.uniform(0.005, 0.01, seeds)
    faqd_fa = kd_fa * rng.uniform(0.3, 0.7, seeds)
    agree_kd, agree_faqd = rng.uniform(0.97, 0.99, seeds), rng.uniform(0.97, 0.99, seeds)
    acc = {
        arm: rng.uniform(0.85, 0.91, (2, seeds)) for arm in ("KD only", "FAQD")
    }  # as trained, recalibrated
    rows = []
    for arm, fa, agree in (("KD only", kd_fa, agree_kd), ("FAQD", faqd_fa, agree_faqd)):
        for seed in range(seeds):
            base = dict(
                init="fine-tune",
                bits="4",
                arm=arm,
                seed=str(seed),
                epochs="15",
                kl_t4=str(rng.uniform(1e-3, 3e-3)),
                agreement=str(agree[seed]),
                accuracy=str(acc[arm][0, seed]),
                accuracy_recal=str(acc[arm][1, seed]),
            )
            rows += [
                dict(base, tap="1", fa=str(fa[seed] / 2)),
                dict(base, tap="2", fa=str(fa[seed] / 2)),
                dict(base, tap="sum", fa=str(fa[seed])),
            ]
    text = budget_fa.report(rows, "cmd")
    # Geometric mean ratio of the paired FA sums, and its t interval, by hand.
    log_ratio = np.log(faqd_fa / kd_fa)
    half = stats.t.ppf(0.975, seeds - 1) * log_ratio.std(ddof=1) / np.sqrt(seeds)
    want = [
        100 * (np.exp(x) - 1)
        for x in (log_ratio.mean(), log_ratio.mean() - half, log_ratio.mean() + half)
    ]
    got = re.search(r"FA distance ([+-]\d+)%; 95% CI ([+-]\d+)% to ([+-]\d+)%", text).groups()
    np.testing.assert_allclose([float(g) for g in got], want, atol=0.5 + 1e-9)
    d = 100 * (agree_faqd - agree_kd)
    got = re.search(r"agreement with the teacher ([+-][\d.]+) ± ([\d.]+) points", text).groups()
    d_half = stats.t.ppf(0.975, seeds - 1) * d.std(ddof=1) / np.sqrt(seeds)
    np.testing.assert_allclose([float(g) for g in got], [d.mean(), d_half], atol=0.005 + 1e-9)
    assert f"| {np.mean(kd_fa):.4f} |" in text and f"| {np.mean(faqd_fa):.4f} |" in text
    for which, label in ((0, "as trained"), (1, "after BN recalibration")):
        d = 100 * (acc["FAQD"][which] - acc["KD only"][which])
        d_half = stats.t.ppf(0.975, seeds - 1) * d.std(ddof=1) / np.sqrt(seeds)
        got = re.search(rf"([+-][\d.]+) ± ([\d.]+) points {label}", text).groups()
        np.testing.assert_allclose([float(g) for g in got], [d.mean(), d_half], atol=0.005 + 1e-9)
        kd = 100 * acc["KD only"][which]
        assert f"{kd.mean():.2f} ± {kd.std(ddof=1):.2f}" in text
    for arm in ("KD only", "FAQD"):  # what recalibration adds to each student, by hand
        d = 100 * (acc[arm][1] - acc[arm][0])
        d_half = stats.t.ppf(0.975, seeds - 1) * d.std(ddof=1) / np.sqrt(seeds)
        got = re.search(
            rf"15 epochs, {arm} \({seeds} students\): ([+-][\d.]+) ± ([\d.]+) points; per student (.*)\.",
            text,
        ).groups()
        np.testing.assert_allclose(
            [float(g) for g in got[:2]], [d.mean(), d_half], atol=0.005 + 1e-9
        )
        assert got[2] == ", ".join(f"{v:+.2f}" for v in d)
