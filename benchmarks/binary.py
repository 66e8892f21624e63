"""Binary students (issue 35): what limits 1-bit weights and 1W1A, and a paired budget to resolve it.

Not run in CI (hours of CPU). Every cell is one run of the library's own pipeline, `train.py --config
configs/quickstart.json` (stages distill and evaluate), label-free, on all 60,000 Fashion-MNIST training
images, from the pinned teacher `docs/budget/teacher.keras` (the quickstart's FP ResNet8, 91.08%), scored on
the 10,000 test images after every epoch and at the end. The headline metric, named before the runs: **test
accuracy as trained at the last epoch**; beside it the mean of the last three epochs' test accuracy and the
accuracy after `recalibrate_batchnorm` on 6,400 unlabeled training images (computed after the run, on the
saved student; the run itself keeps its statistics).

Two commands:

- `factors`: one factor at a time against the current 1-bit recipe (the quickstart's fine-tune: KL T = 4,
  SGD Nesterov lr 0.01, cosine, weight decay 1e-4, per-layer scale, every convolution at 1 bit, the
  classifier float), KD only, `--epochs` (2) epochs, paired seeds. Rows go to `docs/binary/factors.csv`.
- `budget`: KD only against FAQD (exact FA, fro2, the default beta), >= 15 epochs a step, paired seeds,
  1-bit weights fine-tune and 1W1A two steps, with the recipe `--recipe` (a factor name, or several joined
  by `+`). Rows go to `docs/binary/cells.csv` with the columns of `docs/budget/cells.csv` (`row` the arm,
  `column` the width) and two more (`accuracy_last3`, `accuracy_recal`); the FP student is a row `FP`.

A seed fixes the student's initial weights and the data order, so paired cells differ only in the factor.
A killed cell resumes from its last finished epoch when the command runs again; a finished cell is never
rerun. `--workers 2` runs two cells at once, each on one thread.

    python benchmarks/binary.py factors --seeds 0 1 --epochs 2
    python benchmarks/binary.py budget --seeds 0 1 2 3 --epochs 15 --recipe stem8
    python benchmarks/binary.py alpha --seed 0 --epochs 15
    python benchmarks/binary.py report --md docs/binary.md --png docs/binary.png

`alpha` (the 1W1A collapse): the KD-only 1W1A cell of `--recipe` from one first step, its second step
in `--variants`: learning the quantized ReLUs' alphas (the authors' rule), keeping the first step's
(`student.freeze_alpha_in_step2`), a lower second-step learning rate, or both, or the two-sided
activation STE (`student.activation_ste`); accuracy, KD loss
and alpha_min/mean/max each epoch of both steps go to `docs/binary/alpha.csv`, rewritten as the
epochs finish, and each saved student's quantized ReLU statistics to `docs/binary/alpha_units.csv`.
"""

import argparse
import os
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness, gradient_shares  # noqa: E402
from benchmarks._harness import FMNIST, ROOT, append_rows, read_rows  # noqa: E402
from benchmarks.budget import CELL_FIELDS as BUDGET_FIELDS  # noqa: E402
from benchmarks.budget import TEACHER, ensure_teacher  # noqa: E402

DOCS = os.path.join(_harness.DOCS, "binary")
STEPS_PER_EPOCH = -(-60000 // 128)
RECAL_IMAGES = 6400

# The current 1-bit recipe (the 2/4-bit budget's fine-tune at 1 bit), as `--set` values.
BASE = {
    "teacher.file": TEACHER,
    "student.init": "teacher",
    "student.weight_bits": 1,
    "distill.fa": None,
    "distill.kd": "kl",
    "distill.temperature": 4.0,
    "train.lr": 0.01,
    "train.weight_decay": 1e-4,
}

# One factor each: the `--set` values it changes. Literature and the authors' code (lzj994/FAQD) name them.
FACTORS = {
    "base": {},
    "per_channel": {"student.per_channel": True},
    "wd0": {"train.weight_decay": 0.0},
    "lr0.003": {"train.lr": 0.003},
    "lr0.03": {"train.lr": 0.03},
    "lr0.1": {"train.lr": 0.1},
    "adam": {"train.optimizer": "adam", "train.lr": 1e-3},
    # BinaryRelax (eq. 2): lambda grows x10 an epoch, so a 2-epoch run ends near hard quantization.
    "relax": {"student.relax": 1.0, "student.relax_eta": 10.0},
    # The first conv sees one input channel: 9 weights a filter, 144 in all, 0.2% of the packed bits.
    "stem8": {"student.layer_bits": {"stem_conv": 8}},
    "stemfp": {"student.layer_bits": {"stem_conv": None}},
    # 1W1A: the quantized ReLU's alpha update (the authors' rate 0.01, clamped) ten times faster.
    "alpha0.1": {"student.alpha_rate": 0.1},
    # 1W1A on the stem8 recipe: the quantized ReLUs' input gradient on (-alpha, 0] too, both steps.
    "stem8_ste2": {"student.layer_bits": {"stem_conv": 8}, "student.activation_ste": "two_sided"},
    # 1W1A: the second step keeps the alphas of the first (the weights alone learn).
    "alpha2frozen": {"student.freeze_alpha_in_step2": True},
}

FACTOR_FIELDS = [
    "factor",
    "width",
    "seed",
    "epochs",
    "accuracy",
    "accuracy_last3",
    "accuracy_recal",
    "seconds",
    "sec_per_epoch",
]
CELL_FIELDS = [*BUDGET_FIELDS, "accuracy_last3", "accuracy_recal"]
CURVE_FIELDS = ["recipe", "row", "column", "seed", "epoch", "val_accuracy", "kd", "fa", "loss"]
WIDTHS = {
    "1-bit": {"student.weight_bits": 1},
    "1W1A": {"student.weight_bits": 1, "student.activation_bits": 1, "student.two_step": True},
}
ARMS = {"KD only": None, "FAQD": "exact"}


def recipe(name):
    """The `--set` values of a recipe: factor names joined by `+` (e.g. ``"stem8+wd0"``)."""
    values = dict(BASE)
    for factor in name.split("+"):
        if factor not in FACTORS:
            raise SystemExit(f"unknown factor {factor!r}; factors are: {', '.join(FACTORS)}")
        values.update(FACTORS[factor])
    return values


def run_train(out, overrides, workers):
    """`_harness.run_train` into `out`, then the recalibrated score of its student; returns
    (results, history rows, seconds, epochs run now, recalibrated accuracy)."""
    results, history, seconds, ran = _harness.run_train(out, overrides, workers)
    # In its own process, on one thread when cells share the cores.
    proc = _harness.run_script(
        __file__, "recal", out, cwd=ROOT, env=_harness.child_env(one_thread=workers > 1)
    )
    if proc.returncode:
        raise RuntimeError(f"{out}: recalibration failed: {proc.stderr.strip().splitlines()[-1:]}")
    recal = float(proc.stdout.strip().splitlines()[-1])
    return results, history, seconds, ran, recal


def last3(history):
    accs = [float(h["val_accuracy"]) for h in history[-3:]]
    return round(sum(accs) / len(accs), 4) if accs else ""


def recalibrated_accuracy(out, name="student.keras", both=False):
    """Test accuracy of `out`'s student (`name`) after re-estimating its BN statistics on
    RECAL_IMAGES unlabeled training images (the first ones of the seed-0 order, the same for every
    cell); with `both`, (accuracy before, accuracy after)."""
    import keras
    import numpy as np

    import faqd_tf
    from faqd_tf import data

    student = keras.models.load_model(os.path.join(out, name), safe_mode=True)

    def accuracy():
        correct = total = 0
        for x, y in data.load(FMNIST, "test", labels=True, batch_size=500, augment=False):
            correct += int(np.sum(np.argmax(student.predict_on_batch(x), 1) == y.numpy()))
            total += int(y.shape[0])
        return correct / total

    before = accuracy() if both else None
    train = data.load(FMNIST, "train", labels=False, batch_size=128, seed=0, augment=False)
    images = np.concatenate([x.numpy() for x in train.take(RECAL_IMAGES // 128)])
    faqd_tf.recalibrate_batchnorm(student, images)
    return (before, accuracy()) if both else accuracy()


def cell_row(table, arm, column, seed, epochs, steps, results, history, seconds, ran, recal):
    """A fine-tune cell's row of `CELL_FIELDS` from what `run_train` returned."""
    return dict(
        table=table,
        init="fine-tune",
        row=arm,
        column=column,
        seed=seed,
        accuracy=round(results["student"]["accuracy"], 4),
        epochs=epochs,
        steps=steps,
        seconds=round(seconds, 1),
        sec_per_epoch=round(seconds / ran, 1),
        accuracy_last3=last3(history),
        accuracy_recal=round(recal, 4),
    )


def record_fp(results, csv_path):
    """Appends the pair's FP row (`row` "FP": the teacher, which is the FP student of a fine-tune) once."""
    if not any(r["row"] == "FP" for r in read_rows(csv_path)):
        append_rows(
            csv_path,
            CELL_FIELDS,
            [
                dict(
                    table="binary",
                    init="fine-tune",
                    row="FP",
                    column="FP",
                    seed="",
                    accuracy=round(results["teacher"]["accuracy"], 4),
                    epochs="",
                    steps="",
                    seconds="",
                    sec_per_epoch="",
                    accuracy_last3="",
                    accuracy_recal="",
                )
            ],
        )


def factors(args):
    ensure_teacher()
    csv_path = os.path.join(DOCS, "factors.csv")
    done = {(r["factor"], r["width"], r["seed"], r["epochs"]) for r in read_rows(csv_path)}
    todo = [
        (f, w, s)
        for f in args.factors
        for s in args.seeds
        for w in args.widths
        if (f, w, str(s), str(args.epochs)) not in done
    ]
    print(f"[binary] {len(todo)} factor cells to run", flush=True)

    def job(factor, width, seed):
        def run():
            out = os.path.join(
                args.out_dir, "factors", f"{factor}_{width}_seed{seed}_{args.epochs}ep"
            )
            values = {**recipe(factor), **WIDTHS[width], "train.epochs": args.epochs, "seed": seed}
            results, history, seconds, ran, recal = run_train(out, values, args.workers)
            row = dict(
                factor=factor,
                width=width,
                seed=seed,
                epochs=args.epochs,
                accuracy=round(results["student"]["accuracy"], 4),
                accuracy_last3=last3(history),
                accuracy_recal=round(recal, 4),
                seconds=round(seconds, 1),
                sec_per_epoch=round(seconds / ran, 1),
            )
            record_fp(results, os.path.join(DOCS, "cells.csv"))
            append_rows(csv_path, FACTOR_FIELDS, [row])
            print(
                f"[binary] {factor} {width} seed {seed}: {100 * row['accuracy']:.2f}% "
                f"(recalibrated {100 * recal:.2f}%)",
                flush=True,
            )

        return run

    list(_harness.pool_run([job(*t) for t in todo], args.workers, "binary"))


def budget(args):
    ensure_teacher()
    csv_path, curves_path = os.path.join(DOCS, "cells.csv"), os.path.join(DOCS, "curves.csv")
    rows = read_rows(csv_path)
    table = f"binary {args.recipe}"
    done = {(r["table"], r["row"], r["column"], r["seed"], r["epochs"]) for r in rows}
    todo = [
        (arm, w, s)
        for w in args.widths
        for s in args.seeds
        for arm in ARMS
        if (table, arm, w, str(s), str(args.epochs)) not in done
    ]
    print(f"[binary] {len(todo)} budget cells to run ({table})", flush=True)

    def job(arm, width, seed):
        def run():
            tag = "kd" if arm == "KD only" else "faqd"
            out = os.path.join(
                args.out_dir, "budget", f"{args.recipe}_{width}_{tag}_seed{seed}_{args.epochs}ep"
            )
            values = {
                **recipe(args.recipe),
                **WIDTHS[width],
                "distill.fa": ARMS[arm],
                "train.epochs": args.epochs,
                "seed": seed,
            }
            results, history, seconds, ran, recal = run_train(out, values, args.workers)
            steps = args.epochs * STEPS_PER_EPOCH * (2 if width == "1W1A" else 1)
            row = cell_row(
                table, arm, width, seed, args.epochs, steps, results, history, seconds, ran, recal
            )
            curve = [
                dict(
                    recipe=args.recipe,
                    row=arm,
                    column=width,
                    seed=seed,
                    epoch=int(h["epoch"]) + 1,
                    val_accuracy=round(float(h["val_accuracy"]), 4),
                    kd=h.get("kd", ""),
                    fa=h.get("fa", ""),
                    loss=h.get("loss", ""),
                )
                for h in history
            ]
            record_fp(results, csv_path)
            append_rows(csv_path, CELL_FIELDS, [row])
            append_rows(curves_path, CURVE_FIELDS, curve)
            shares = gradient_shares.parse(open(os.path.join(out, "train.log")).read())
            append_rows(
                os.path.join(DOCS, "gradient_shares.csv"),
                gradient_shares.FIELDS,
                [
                    dict(
                        init=f"fine-tune {args.recipe} {width}",
                        bits=1,
                        arm=arm,
                        seed=seed,
                        term=t,
                        norm=f"{n:.4g}",
                        share=round(sh, 4),
                    )
                    for t, n, sh in shares
                ],
            )
            print(
                f"[binary] {table} {arm} {width} seed {seed}: {100 * row['accuracy']:.2f}%",
                flush=True,
            )

        return run

    list(_harness.pool_run([job(*t) for t in todo], args.workers, "binary"))


ALPHA_FIELDS = [
    "variant",
    "seed",
    "step",
    "epoch",
    "val_accuracy",
    "kd",
    "loss",
    "alpha_min",
    "alpha_mean",
    "alpha_max",
]
# Second-step variants; "learned" (the authors' rule) runs the shared first step. A value set here
# reaches the second step only: the first is copied from "learned".
ALPHA_VARIANTS = {
    "learned": {},
    "frozen": {"student.freeze_alpha_in_step2": True},
    "lr0.001": {"train.lr": 0.001},
    "frozen+lr0.001": {"student.freeze_alpha_in_step2": True, "train.lr": 0.001},
    # The input gradient on (-alpha, 0] too: a unit just switched off can come back.
    "two_sided": {"student.activation_ste": "two_sided"},
}


def alpha_rows(outs, seed):
    """Both variants' per-epoch rows so far, from their history CSVs (step 1 is shared)."""
    from faqd_tf.names import ACTIVATION_STEP, DISTILL, HISTORIES

    rows = []
    for variant, out in outs.items():
        for step, stage in ((1, ACTIVATION_STEP), (2, DISTILL)):
            if step == 1 and variant != "learned":
                continue
            for h in read_rows(os.path.join(out, HISTORIES[stage])):
                rows.append(
                    dict(
                        variant=variant if step == 2 else "shared",
                        seed=seed,
                        step=step,
                        epoch=int(h["epoch"]) + 1,
                        **{k: h.get(k, "") for k in ALPHA_FIELDS[4:]},
                    )
                )
    return rows


UNIT_FIELDS = ["model", "layer", "alpha", "active", "ste_window", "active_train", "mode_flips"]


def unit_stats(path, images):
    """Per quantized ReLU of the student at `path`, on `images`: its alpha; in inference mode the
    share of its inputs at or above 0 (the unit outputs alpha) and the share inside (0, alpha), the
    only place the straight-through gradient of eq. (5) reaches the layers below; the share at or
    above 0 in training mode (batch statistics, batches of 128, as trained) and the share of
    outputs that differ between the two modes (moving against batch BN statistics)."""
    import keras
    import numpy as np

    from faqd_tf.quantize import quantized_relus

    model = keras.models.load_model(path, safe_mode=True)
    relus = quantized_relus(model)
    taps = keras.Model(model.inputs, [layer.input for layer in relus])
    outs = taps.predict(images, batch_size=128, verbose=0)
    # Training mode moves the BN moving averages: they are put back after.
    state = [(v, v.numpy()) for v in model.non_trainable_variables]
    trains = [
        np.concatenate(parts)
        for parts in zip(
            *(
                [np.asarray(t) for t in taps(images[i : i + 128], training=True)]
                for i in range(0, len(images), 128)
            )
        )
    ]
    for v, value in state:
        v.assign(value)
    rows = []
    for layer, x, xt in zip(relus, outs, trains):
        a = float(np.asarray(layer.alpha))
        rows.append(
            dict(
                layer=layer.name,
                alpha=round(a, 4),
                active=round(float(np.mean(x >= 0)), 4),
                ste_window=round(float(np.mean((x > 0) & (x < a))), 4),
                active_train=round(float(np.mean(xt >= 0)), 4),
                mode_flips=round(float(np.mean((x >= 0) != (xt >= 0))), 4),
            )
        )
    return rows


def alpha(args):
    """Runs "learned" and `args.variants`, each other variant's second step from learned's first
    step once it is saved; a finished variant is not rerun."""
    import shutil
    import threading

    from faqd_tf.names import ACTIVATION_STEP, HISTORIES

    ensure_teacher()
    values = {
        **recipe(args.recipe),
        **WIDTHS["1W1A"],
        "train.epochs": args.epochs,
        "seed": args.seed,
    }
    outs = {
        v: os.path.join(args.out_dir, "alpha", f"{args.recipe}_{v}_seed{args.seed}_{args.epochs}ep")
        for v in ALPHA_VARIANTS
    }
    csv_path = os.path.join(DOCS, "alpha.csv")
    act = "student_act.keras"
    if args.units_only:
        return units(outs)

    def step1_done(out):
        return os.path.exists(os.path.join(out, act)) and not os.path.isdir(
            os.path.join(out, "backup", ACTIVATION_STEP)
        )

    def run(variant):
        out = outs[variant]
        if os.path.exists(os.path.join(out, "results.json")):
            return  # finished
        if variant != "learned" and not step1_done(out):
            while not step1_done(outs["learned"]):
                time.sleep(30)
            os.makedirs(out, exist_ok=True)
            for name in (act, HISTORIES[ACTIVATION_STEP]):
                shutil.copy2(os.path.join(outs["learned"], name), os.path.join(out, name))
        _harness.run_train(out, {**values, **ALPHA_VARIANTS[variant]}, workers=2)

    # "learned" runs for its first step unless that is done; the rows and units of every variant
    # run so far are kept.
    todo = set(args.variants) | (set() if step1_done(outs["learned"]) else {"learned"})
    threads = [threading.Thread(target=run, args=(v,), daemon=True) for v in todo]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        time.sleep(60)
        _harness.write_rows(csv_path, ALPHA_FIELDS, alpha_rows(outs, args.seed))
    _harness.write_rows(csv_path, ALPHA_FIELDS, alpha_rows(outs, args.seed))
    print(f"[binary] alpha: {csv_path}", flush=True)
    units(outs)


def units(outs):
    """`unit_stats` of the first step's student and both second steps' on 2,048 training images."""
    import numpy as np

    from faqd_tf import data

    train = data.load(FMNIST, "train", labels=False, batch_size=128, seed=0, augment=False)
    images = np.concatenate([x.numpy() for x in train.take(16)])
    rows, scores = [], []
    for model, out, name in (
        ("step 1", outs["learned"], "student_act.keras"),
        *((f"step 2 {v}", out, "student.keras") for v, out in outs.items()),
    ):
        if os.path.exists(os.path.join(out, name)):
            rows += [dict(model=model, **r) for r in unit_stats(os.path.join(out, name), images)]
            before, after = recalibrated_accuracy(out, name, both=True)
            scores.append(
                dict(model=model, accuracy=round(before, 4), accuracy_recal=round(after, 4))
            )
            print(
                f"[binary] {model}: {100 * before:.2f}% ({100 * after:.2f}% recalibrated)",
                flush=True,
            )
    _harness.write_rows(os.path.join(DOCS, "alpha_units.csv"), UNIT_FIELDS, rows)
    _harness.write_rows(
        os.path.join(DOCS, "alpha_models.csv"), ["model", "accuracy", "accuracy_recal"], scores
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("factors", "budget"):
        s = sub.add_parser(name)
        s.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
        s.add_argument("--epochs", type=int, default=2 if name == "factors" else 15)
        s.add_argument(
            "--widths",
            nargs="+",
            default=["1-bit"] if name == "factors" else ["1-bit", "1W1A"],
            choices=list(WIDTHS),
        )
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--out-dir", default="/work/runs/binary")
        if name == "factors":
            s.add_argument("--factors", nargs="+", default=list(FACTORS), choices=list(FACTORS))
        else:
            s.add_argument("--recipe", default="base")
    s = sub.add_parser("alpha")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--epochs", type=int, default=15)
    s.add_argument("--recipe", default="stem8")
    s.add_argument("--out-dir", default="/work/runs/binary")
    s.add_argument(
        "--variants", nargs="+", default=["learned", "frozen"], choices=list(ALPHA_VARIANTS)
    )
    s.add_argument(
        "--units-only", action="store_true", help="only the unit statistics of the saved students"
    )
    s = sub.add_parser("recal")
    s.add_argument("out")
    s = sub.add_parser("report")
    s.add_argument("--md", default=os.path.join(ROOT, "docs", "binary.md"))
    s.add_argument("--png", default=os.path.join(ROOT, "docs", "binary.png"))
    args = p.parse_args(argv)
    if args.command == "recal":
        print(recalibrated_accuracy(args.out))
    elif args.command == "factors":
        factors(args)
    elif args.command == "budget":
        budget(args)
    elif args.command == "alpha":
        alpha(args)
    else:
        from benchmarks import binary_report

        binary_report.write(
            args.md, args.png, "python benchmarks/binary.py " + " ".join(sys.argv[1:])
        )


if __name__ == "__main__":
    main()
