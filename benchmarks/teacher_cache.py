"""What keeping the teacher's logits saves (issue 34 item 4), and whether the training stays the same.

The quickstart pair on real Fashion-MNIST: the pinned teacher docs/budget/teacher.keras (FP ResNet8)
-> its 4-bit twin, label-free KL T = 4 (KD only: the Fashion-MNIST configs' choice), SGD Nesterov,
batch 128, `--images` training images, `--epochs` epochs, no augmentation. Each arm (`cache`:
`Distiller(teacher_cache=n)` on numbered batches, `none`: the teacher every step) runs in its own
process from the same initial weights and data order, in interleaved rounds. Reported: the median
step time of the epochs after the first (the cache's epochs), their ratio within a round, the
first epoch's (which fills the cache), and the largest difference of an epoch's KD loss between
the arms.

    python benchmarks/teacher_cache.py --rounds 2 --csv docs/teacher_cache.csv --md docs/teacher_cache.md
"""

import argparse
import os
import platform
import sys
import time

if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import _harness  # noqa: E402
from benchmarks.budget import TEACHER  # noqa: E402

PREFIX = "[teacher_cache] "
FIELDS = ["round", "arm", "epoch", "ms_per_step", "kd"]


def worker(spec):
    import keras
    import numpy as np

    from faqd_tf import Distiller, data, training
    from faqd_tf.config import resolve_section
    from faqd_tf.quantize import quantize_model

    keras.utils.set_random_seed(0)
    teacher = keras.models.load_model(TEACHER, safe_mode=True)
    student = quantize_model(teacher, weight_bits=4)
    cache = spec["arm"] == "cache"
    train = data.load(
        _harness.FMNIST,
        "train",
        labels=False,
        batch_size=128,
        limit=spec["images"],
        seed=0,
        augment=False,
        index=cache,
    )
    steps = -(-spec["images"] // 128)
    distiller = Distiller(
        student,
        teacher,
        kd="kl",
        temperature=4.0,
        fa=None,
        seed=0,
        teacher_cache=steps * 128 if cache else None,
    )
    train_options = resolve_section("train", {"epochs": spec["epochs"], "lr": 0.01})
    distiller.compile(training.make_optimizer(train_options, steps))

    class Times(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

        def on_epoch_end(self, epoch, logs=None):
            # The first step of an epoch waits for the pipeline: left out.
            ms = 1000 * float(np.median(np.diff(self.times[1:])))
            _harness.emit(PREFIX, dict(epoch=epoch + 1, ms_per_step=round(ms, 1), kd=logs["kd"]))

    distiller.fit(train, epochs=spec["epochs"], verbose=0, callbacks=[Times()])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--images", type=int, default=12800)
    p.add_argument("--csv", default=os.path.join(_harness.DOCS, "teacher_cache.csv"))
    p.add_argument("--md", default=os.path.join(_harness.DOCS, "teacher_cache.md"))
    args = p.parse_args(argv)
    rows = []
    for r in range(args.rounds):
        for arm in ("none", "cache") if r % 2 == 0 else ("cache", "none"):
            spec = dict(arm=arm, epochs=args.epochs, images=args.images)
            proc, found = _harness.run_worker(__file__, spec, PREFIX, env=_harness.child_env())
            if proc.returncode:
                raise SystemExit(f"{arm}: worker failed: {proc.stderr.strip().splitlines()[-1:]}")
            rows += [dict(round=r, arm=arm, **f) for f in found]
            print(f"[teacher_cache] round {r} {arm}: {found}", flush=True)
    _harness.write_rows(args.csv, FIELDS, rows)
    _harness.write_text(args.md, report(rows, args, " ".join(sys.argv[1:])))
    print(open(args.md).read())


def report(rows, args, flags):
    import numpy as np

    def ms(r, arm, later):
        got = [
            float(x["ms_per_step"])
            for x in rows
            if int(x["round"]) == r and x["arm"] == arm and (int(x["epoch"]) > 1) == later
        ]
        return float(np.median(got))

    lines = [
        f"Command: `python benchmarks/teacher_cache.py {flags}`  ",
        f"Machine: {_harness.cpu_model()}, {os.cpu_count()} cores, {platform.machine()}; "
        f"{args.images} training images, {args.epochs} epochs, batch 128, the quickstart pair, KD only.",
        "",
        "| round | no cache, ms/step (epochs 2+) | cache, ms/step (epochs 2+) | cache / none | first epoch: "
        "none / cache ms/step |",
        "|---|---|---|---|---|",
    ]
    ratios = []
    for r in sorted({int(x["round"]) for x in rows}):
        none, cache = ms(r, "none", True), ms(r, "cache", True)
        ratios.append(cache / none)
        lines.append(
            f"| {r} | {none:.1f} | {cache:.1f} | **{cache / none:.2f}** | "
            f"{ms(r, 'none', False):.1f} / {ms(r, 'cache', False):.1f} |"
        )
    kd_diff = max(
        abs(float(a["kd"]) - float(b["kd"])) / abs(float(b["kd"]))
        for a in rows
        for b in rows
        if a["arm"] == "cache"
        and b["arm"] == "none"
        and a["round"] == b["round"]
        and a["epoch"] == b["epoch"]
    )
    lines += [
        "",
        f"Median ratio over rounds: **{float(np.median(ratios)):.2f}**. Largest relative difference of "
        f"an epoch's KD loss between the arms: {kd_diff:.1e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    spec = _harness.worker_spec()
    if spec is not None:
        worker(spec)
    else:
        main()
