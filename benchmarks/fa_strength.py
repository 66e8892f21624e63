"""How strongly FA pulls: gradient norms of each loss term, here and as the authors' code trains.

Not run in CI. A trained full-precision teacher (default: the quickstart's ResNet8 on Fashion-MNIST,
made by `python train.py --config configs/quickstart.json --stage teacher`) and its b-bit twin:

- fine-tune: the student starts as `quantize_model(teacher)` (the teacher's weights, quantized);
- end-to-end: a fresh b-bit ResNet8 (one row per `--seeds`).

On `--batches` batches of `--batch-size` training images (label-free), `Distiller.gradient_norms`
gives the norm of each unweighted term's gradient with respect to the student's trainable
weights, FA summed over the three stage taps:

- `kd_mse`, `kd_kl` (T = `--temperature`);
- `fa_fro2`, `fa_l1` (exact, this library's batch means), `ffa_fro2`, `ffa_l1` (k = 15);
- `authors_fa`: the authors' training loss, `fa_coef` (0.1) times the L1 FA *summed* over the
  batch, i.e. `fa_l1` times 0.1 * batch size;
- `authors_fa_adapter`: the same after the authors' untrained random 1x1 conv + ReLU on the
  student's maps (`additional_conv20` in lzj994/FAQD, PyTorch's default initialization).

The report gives, per start, the mean norms, the FA/KD ratio of the authors' code, and the beta
at which each FA variant here has that ratio (`beta = ratio * |grad KD| / |grad FA|`):

    python benchmarks/fa_strength.py --teacher saved_models/quickstart/teacher.keras \
        --out-csv docs/fa_strength.csv --md docs/fa_strength.md
"""

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if __name__ == "__main__":  # run as a script: this checkout's packages, not an installed copy
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from benchmarks import _harness  # noqa: E402
from benchmarks._harness import FMNIST  # noqa: E402
from faqd_tf import data, losses, models  # noqa: E402
from faqd_tf.distiller import Distiller  # noqa: E402
from faqd_tf.quantize import quantize_model  # noqa: E402

AUTHORS_FA_COEF = 0.1
TERMS = [
    "kd_mse",
    "kd_kl",
    "fa_fro2",
    "fa_l1",
    "ffa_fro2",
    "ffa_l1",
    "authors_fa",
    "authors_fa_adapter",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="saved_models/quickstart/teacher.keras")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=100, help="the authors' batch size")
    p.add_argument("--batches", type=int, default=5)
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0, 1, 2], help="end-to-end initializations"
    )
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--out-csv", default="saved_models/fa_strength.csv")
    p.add_argument("--md", default=None, help="markdown report (default: next to the CSV)")
    return p.parse_args(argv)


def adapter_fa_norm(distiller, x, seed):
    """Gradient norm of the authors' FA: random 1x1 conv + ReLU on the student's maps, L1, batch sum."""
    rng = np.random.default_rng(seed)
    teacher_out = distiller.teacher_features(x, training=False)
    state = [(v, tf.identity(v)) for v in distiller.student.non_trainable_variables]
    with tf.GradientTape() as tape:
        student_out = distiller.student_features(x, training=True)
        total = 0.0
        for t_map, s_map in zip(teacher_out[1:], student_out[1:]):
            c = s_map.shape[-1]
            bound = 1.0 / np.sqrt(
                c
            )  # torch.nn.Conv2d's default (kaiming_uniform with a=sqrt(5)): fan_in = c
            w = tf.constant(rng.uniform(-bound, bound, size=(c, c)).astype("float32"))
            b = tf.constant(rng.uniform(-bound, bound, size=(c,)).astype("float32"))
            adapted = tf.nn.relu(tf.einsum("bhwc,cd->bhwd", s_map, w) + b)
            per_sample = losses.feature_affinity_per_sample(t_map, adapted, fa_norm="l1")
            total += AUTHORS_FA_COEF * tf.reduce_sum(per_sample)
    grads = tape.gradient(total, distiller.student.trainable_variables)
    for variable, value in state:
        variable.assign(value)
    return float(tf.linalg.global_norm(grads))


def measure(student, teacher, batches, args, seed):
    """{term: gradient norm} averaged over the batches."""
    common = dict(alpha=1.0, gamma=0.0, temperature=args.temperature, seed=seed)
    kd_mse = Distiller(student, teacher, kd="mse", fa="exact", fa_norm="fro2", beta=1.0, **common)
    kd_kl = Distiller(student, teacher, kd="kl", fa="exact", fa_norm="l1", beta=1.0, **common)
    ffa_fro2 = Distiller(student, teacher, kd="mse", fa="fast", fa_norm="fro2", beta=1.0, **common)
    ffa_l1 = Distiller(student, teacher, kd="mse", fa="fast", fa_norm="l1", beta=1.0, **common)
    sums = {term: [] for term in TERMS}
    for i, x in enumerate(batches):
        a = kd_mse.gradient_norms(x, weighted=False)
        b = kd_kl.gradient_norms(x, weighted=False)
        sums["kd_mse"].append(a["kd"])
        sums["fa_fro2"].append(a["fa"])
        sums["kd_kl"].append(b["kd"])
        sums["fa_l1"].append(b["fa"])
        sums["ffa_fro2"].append(ffa_fro2.gradient_norms(x, weighted=False)["fa"])
        sums["ffa_l1"].append(ffa_l1.gradient_norms(x, weighted=False)["fa"])
        sums["authors_fa"].append(b["fa"] * AUTHORS_FA_COEF * int(x.shape[0]))
        sums["authors_fa_adapter"].append(adapter_fa_norm(kd_kl, x, seed=1000 * seed + i))
    return {term: float(np.mean(v)) for term, v in sums.items()}


def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.teacher):
        sys.exit(
            f"fa_strength: no teacher at {args.teacher}; make one with "
            "`python train.py --config configs/quickstart.json --stage teacher`."
        )
    teacher = keras.models.load_model(args.teacher, safe_mode=True)
    info = data.dataset_info(FMNIST)
    ds = data.load(
        FMNIST,
        "train",
        labels=False,
        batch_size=args.batch_size,
        shuffle=True,
        seed=0,
        augment=False,
    )
    batches = [x for (x,) in zip(ds.take(args.batches))]
    rows = []
    starts = [("fine-tune", 0)] + [("end-to-end", s) for s in args.seeds]
    for start, seed in starts:
        t0 = time.perf_counter()
        if start == "fine-tune":
            student = quantize_model(teacher, weight_bits=args.bits)
        else:
            keras.utils.set_random_seed(seed)
            student = models.get(
                "resnet8",
                num_classes=info.num_classes,
                input_shape=info.image_shape,
                weight_bits=args.bits,
            )
        norms = measure(student, teacher, batches, args, seed)
        rows.append({"start": start, "seed": seed, **{k: round(v, 6) for k, v in norms.items()}})
        print(
            f"[fa_strength] {start} seed {seed}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in norms.items())
            + f" ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    _harness.write_rows(args.out_csv, ["start", "seed", *TERMS], rows)
    md = args.md or os.path.splitext(args.out_csv)[0] + ".md"
    _harness.write_text(md, report(rows, args))
    print(f"[fa_strength] wrote {args.out_csv} and {md}")


def report(rows, args):
    lines = [
        f"Command: `python benchmarks/fa_strength.py {' '.join(sys.argv[1:])}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"TensorFlow {tf.__version__}, Keras {keras.__version__}. "
        f"Teacher {args.teacher}, {args.bits}-bit ResNet8 student, {args.batches} batches of {args.batch_size} "
        "Fashion-MNIST training images; gradient norms with respect to the student's trainable weights "
        "(FA summed over the 3 stage taps, unweighted unless named authors_*).",
        "",
        "| start | " + " | ".join(TERMS) + " |",
        "|---|" + "---|" * len(TERMS),
    ]
    groups = {}
    for row in rows:
        groups.setdefault(row["start"], []).append(row)
    means = {}
    for start, group in groups.items():
        means[start] = {t: float(np.mean([r[t] for r in group])) for t in TERMS}
        lines.append(
            f"| {start} (n={len(group)}) | "
            + " | ".join(f"{means[start][t]:.4g}" for t in TERMS)
            + " |"
        )
    lines += [
        "",
        "Beta at which each FA variant has the authors' FA/KD-MSE gradient ratio (`authors_fa_adapter` "
        "/ `kd_mse`, and in brackets without the adapter, `authors_fa` / `kd_mse`):",
        "",
        "| start | authors' ratio | fa_fro2 | fa_l1 | ffa_fro2 | ffa_l1 |",
        "|---|---|---|---|---|---|",
    ]
    for start, m in means.items():
        ratio, plain = m["authors_fa_adapter"] / m["kd_mse"], m["authors_fa"] / m["kd_mse"]
        cells = [
            f"{ratio * m['kd_mse'] / m[t]:.3g} ({plain * m['kd_mse'] / m[t]:.3g})"
            for t in ("fa_fro2", "fa_l1", "ffa_fro2", "ffa_l1")
        ]
        lines.append(f"| {start} | {ratio:.3g} ({plain:.3g}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
