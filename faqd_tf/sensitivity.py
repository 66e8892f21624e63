"""Label-free per-layer sensitivity to weight quantization, and bit widths chosen under a size budget.

`sensitivity(teacher, images)` quantizes one layer at a time (round to nearest: the kernel
`quantize_model(teacher, weight_bits=None, layer_bits={layer: b})` computes, every other layer in
float), re-estimates the BatchNormalization statistics on the same unlabeled images
(`recalibrate_batchnorm`), and measures how far the result moves from the teacher's own outputs:
the mean KD loss against the teacher's logits and the FA distance summed over the default taps
(`faqd_tf.features.feature_layers`). Each is reported as an *increase* over the float copy given
the same BN re-estimation, so that re-estimating BN on the images (which moves the logits a little
by itself) is not charged to any layer, and a layer kept in float costs exactly 0. An increase can
be negative (a rounding that happens to land nearer the teacher, or noise on few images); it is
used as measured. No labels and no training: images only.

`allocate_bits(result, budget_bytes)` then picks each layer's width minimizing the summed KD
increase subject to the packed size (`faqd_tf.summary`'s count) fitting the budget, exactly.

>>> model = keras.Sequential([keras.Input((8, 8, 1)),
...     keras.layers.Conv2D(4, 3, use_bias=False, name="c1"), keras.layers.BatchNormalization(),
...     keras.layers.ReLU(), keras.layers.Conv2D(8, 3, name="c2"),
...     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="logits")])
>>> result = sensitivity(model, np.random.default_rng(0).random((16, 8, 8, 1)), bits=(1, 8))
>>> result.layers, [(row.bits, row.packed_bytes) for row in result.rows], result.fixed_bytes
(['c1', 'c2'], [(1, 8.5), (8, 40.0), (1, 72.0), (8, 324.0)], 172.0)
>>> allocate_bits(result, budget_bytes=260)
{'c1': 1, 'c2': 1}
>>> allocate_bits(result, budget_bytes=250)
Traceback (most recent call last):
ValueError: budget_bytes=250 is below the smallest packed size these widths reach, 252.5 bytes ...
"""

import csv
import dataclasses
import io
import os
import time

from faqd_tf.atomic import write_atomically, written_aside

__all__ = ["LayerWidth", "Sensitivity", "allocate_bits", "sensitivity"]

DEFAULT_BITS = (1, 2, 4, 8)
DEFAULT_SAMPLES = 512


@dataclasses.dataclass(frozen=True)
class LayerWidth:
    """One row of a `Sensitivity`: `layer` alone at `bits` (None: float, the teacher's own)."""

    layer: str
    bits: int | None
    kd_increase: float  # mean KD loss against the teacher's logits, minus the float copy's
    fa_increase: float  # FA distance summed over the taps, minus the float copy's (0.0: no taps)
    packed_bits: int  # the layer's row of `faqd_tf.summary` at this width: codes, scales, bias

    @property
    def packed_bytes(self) -> float:
        return self.packed_bits / 8


@dataclasses.dataclass
class Sensitivity:
    """What `sensitivity` measured: `rows` (one `LayerWidth` per layer and width, layers in network
    order, widths as given), and how.

    `fixed_bits` is the packed size of everything but `layers`: the rows of `faqd_tf.summary` of the
    float model outside those layers (BatchNormalization parameters and statistics, the layers left
    float such as the classifier, their biases), all at 32 bits. A student that gives each layer a
    width of `bits` packs to `fixed_bits` plus the chosen rows' `packed_bits` (`packed_bytes`), as
    its summary counts it (without activation quantization: each `QuantReLU` adds a 4-byte alpha).
    """

    rows: list
    layers: list
    bits: tuple
    fixed_bits: int
    baseline_kd: float  # the float copy's mean KD loss after BN re-estimation
    baseline_fa: float
    taps: list
    kd: str
    temperature: float
    samples: int
    seconds: float

    @property
    def fixed_bytes(self) -> float:
        return self.fixed_bits / 8

    def row(self, layer: str, bits: int | None) -> LayerWidth:
        for row in self.rows:
            if row.layer == layer and row.bits == bits:
                return row
        raise KeyError(f"no row for layer {layer!r} at bits={bits!r}")

    def packed_bytes(self, layer_bits: dict) -> float:
        """The packed size of a student with `layer_bits` (one width of `bits` for every layer)."""
        return (
            self.fixed_bits + sum(self.row(n, b).packed_bits for n, b in layer_bits.items())
        ) / 8

    def predicted_kd_increase(self, layer_bits: dict) -> float:
        """The summed KD increases of `layer_bits`: what `allocate_bits` minimizes."""
        return sum(self.row(n, b).kd_increase for n, b in layer_bits.items())

    def to_csv(self, path) -> str:
        """Writes the rows as CSV (`layer,bits,kd_increase,fa_increase,packed_bytes`; bits "float"
        for None), whole or not at all; returns `path`."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["layer", "bits", "kd_increase", "fa_increase", "packed_bytes"])
        for r in self.rows:
            writer.writerow(
                [
                    r.layer,
                    "float" if r.bits is None else r.bits,
                    repr(r.kd_increase),
                    repr(r.fa_increase),
                    r.packed_bytes,
                ]
            )
        write_atomically(path, out.getvalue())
        return os.fspath(path)

    def plot(self, path) -> str:
        """Heat maps layer x width of the KD increase (and of the FA increase where there are taps),
        written whole (format from the extension, default png); returns `path`."""
        import numpy as np
        from matplotlib.figure import Figure  # no pyplot: no global backend state

        path = os.fspath(path)
        panels = [("KD increase", "kd_increase")]
        if self.taps:
            panels.append(("FA increase", "fa_increase"))
        labels = ["float" if b is None else f"{b}-bit" for b in self.bits]
        fig = Figure(
            figsize=(3.2 + 1.2 * len(self.bits) * len(panels), 1.2 + 0.32 * len(self.layers))
        )
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, field) in zip(axes, panels):
            values = np.array(
                [[getattr(self.row(n, b), field) for b in self.bits] for n in self.layers]
            )
            image = ax.imshow(values, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(labels)), labels)
            ax.set_yticks(range(len(self.layers)), self.layers, fontsize=7)
            ax.set_title(title)
            for i in range(values.shape[0]):
                for j in range(values.shape[1]):
                    ax.text(
                        j, i, f"{values[i, j]:.3g}", ha="center", va="center", fontsize=6, color="w"
                    )
            fig.colorbar(image, ax=ax)
        fig.suptitle(
            f"sensitivity on {self.samples} unlabeled images (kd={self.kd}, T={self.temperature:g})"
        )
        fig.tight_layout()
        fmt = os.path.splitext(path)[1][1:] or "png"
        with written_aside(path) as partial:
            fig.savefig(partial, format=fmt, dpi=110)
        return path


def _check_bits_list(bits):
    from faqd_tf import quantizers

    if isinstance(bits, (int, str)) or bits is None or not len(bits):
        raise ValueError(
            f"bits must be a non-empty list of widths (1, 2, 4, 8 or None), got {bits!r}."
        )
    out = tuple(quantizers.check_bits(b, "bits", allow_none=True) for b in bits)
    if len(set(out)) != len(out):
        raise ValueError(f"bits lists a width twice: {list(bits)}.")
    return out


def sensitivity(
    teacher,
    images,
    bits=DEFAULT_BITS,
    kd: str = "kl",
    temperature: float = 4.0,
    samples: int | None = DEFAULT_SAMPLES,
    skip=None,
    per_channel: bool = False,
    batch_size: int = 256,
) -> Sensitivity:
    """Each quantizable layer's KD and FA increase, alone at each width, on unlabeled `images`.

    Args:
        teacher: a built Functional or Sequential float model (its output the logits).
        images: unlabeled inputs, as `recalibrate_batchnorm` takes them (labels, if any, unused).
        bits: the widths to measure (1, 2, 4, 8; None, float, costs 0 and is not run).
        kd, temperature: the KD loss (`faqd_tf.losses.kd_loss_per_sample`).
        samples: the first `samples` images are used (None: all).
        skip: as `quantize_model`'s: the layers left out (default the classifier; ``[]``: none).
        per_channel: one scale per output channel, as `quantize_model`'s.
        batch_size: images per forward pass.

    The layers are those `quantize_model(teacher, skip=skip)` quantizes (`resolve_layer_bits`).
    Cost: one `quantize_model` per width, then per layer and width one BN re-estimation (a forward
    pass over the images, op by op) and one forward pass, on a single float copy whose kernel is
    swapped to the quantized one and back: about ``2 * layers * widths`` forward passes. Measured
    on the quickstart's ResNet8 (28x28x1; 7 layers x 4 widths, 300 random images, 2 CPU cores
    shared with other work): 26.5 s, ~0.8 s a layer and width (BN re-estimation 0.44 s, forward
    0.18 s, FA 0.16 s).
    """
    import numpy as np
    import tensorflow as tf

    from faqd_tf import batchnorm, features, losses, options, quantize
    from faqd_tf.summary import summary as model_summary

    bits = _check_bits_list(bits)
    options.check_kd(kd)
    temperature = options.check_temperature(temperature)
    start = time.perf_counter()
    widths = quantize.resolve_layer_bits(teacher, 8, None, skip, first_layer_bits=8)
    layers = [path for path, b in widths.items() if b is not None]
    if not layers:
        raise ValueError(f"model {teacher.name!r} has no layer that quantize_model quantizes.")
    batches = batchnorm._images(images, teacher, samples)
    inputs = [
        tf.convert_to_tensor(batch[i : i + batch_size])
        for batch in batches
        for i in range(0, len(batch), batch_size)
    ]
    count = sum(int(x.shape[0]) for x in inputs)

    # One float copy, its kernels swapped in turn; its BN statistics are re-estimated each time.
    float_copy = quantize.quantize_model(teacher, weight_bits=None, skip=skip)
    taps = features.feature_layers(teacher)
    teacher_x, copy_x = features.paired_extractors(teacher, float_copy, taps, taps)
    teacher_out = [[tf.identity(t) for t in teacher_x(x, training=False)] for x in inputs]
    forward = tf.function(lambda x: copy_x(x, training=False))

    def distances():
        batchnorm.recalibrate_batchnorm(float_copy, inputs, batch_size=batch_size)
        kd_sum = fa_sum = 0.0
        for x, t in zip(inputs, teacher_out):
            s = forward(x)
            kd_sum += float(tf.reduce_sum(losses.kd_loss_per_sample(t[0], s[0], kd, temperature)))
            for tm, sm in zip(t[1:], s[1:]):
                fa_sum += float(tf.reduce_sum(losses.feature_affinity_per_sample(tm, sm)))
        return kd_sum / count, fa_sum / count

    float_layers = dict(quantize._walk(float_copy))
    float_rows = {
        row.name: row.packed_bits for row in model_summary(float_copy, print_fn=None).rows
    }
    fixed_bits = sum(bits_ for name, bits_ in float_rows.items() if name not in set(layers))
    baseline_kd, baseline_fa = distances()
    measured = {}
    for b in bits:
        if b is None:
            for name in layers:
                measured[name, b] = (0.0, 0.0, float_rows[name])
            continue
        twin = quantize.quantize_model(
            teacher,
            weight_bits=None,
            layer_bits={n: b for n in layers},
            skip=skip,
            per_channel=per_channel,
        )
        packed = {row.name: row.packed_bits for row in model_summary(twin, print_fn=None).rows}
        for name, quantized in quantize._walk(twin):
            if name not in widths or widths[name] is None:
                continue
            target = float_layers[name]
            saved = []
            for kernel in quantized.kernel_names:
                variable = getattr(target, kernel)
                saved.append((variable, np.array(variable.numpy())))
                variable.assign(quantized.quantized_kernel(training=False, kernel=kernel))
            try:
                kd_value, fa_value = distances()
            finally:
                for variable, value in saved:
                    variable.assign(value)
            measured[name, b] = (kd_value - baseline_kd, fa_value - baseline_fa, packed[name])
    rows = [LayerWidth(n, b, *measured[n, b]) for n in layers for b in bits]
    return Sensitivity(
        rows=rows,
        layers=layers,
        bits=bits,
        fixed_bits=int(fixed_bits),
        baseline_kd=baseline_kd,
        baseline_fa=baseline_fa,
        taps=list(taps),
        kd=kd,
        temperature=temperature,
        samples=count,
        seconds=time.perf_counter() - start,
    )


def allocate_bits(result: Sensitivity, budget_bytes: float, bits=None) -> dict:
    """``{layer: bits}`` for every layer of `result`, minimizing the summed KD increase with the
    packed size at or under `budget_bytes`; it feeds `quantize_model(teacher, layer_bits=...)`.

    The size is the student's packed size as `faqd_tf.summary` counts it: `result.fixed_bits`
    (what stays float, 32 bits a parameter) plus each layer's row at its width (`Sensitivity`).
    `bits` restricts the widths to choose from (default all of `result.bits`). Exact: a multiple-
    choice knapsack solved by merging Pareto fronts (size in bits, an integer, against loss) layer
    by layer; among equal losses the smaller size wins. A budget below every layer at its smallest
    width raises ValueError.
    """
    widths = result.bits if bits is None else _check_bits_list(bits)
    missing = [b for b in widths if b not in result.bits]
    if missing:
        raise ValueError(f"bits {missing} were not measured; the result has {list(result.bits)}.")
    if (
        isinstance(budget_bytes, bool)
        or not isinstance(budget_bytes, (int, float))
        or budget_bytes != budget_bytes
    ):
        raise ValueError(f"budget_bytes={budget_bytes!r} must be a number of bytes.")
    budget = budget_bytes * 8 - result.fixed_bits  # bits left for the layers
    options = [[result.row(n, b) for b in widths] for n in result.layers]
    cheapest = [min(r.packed_bits for r in opts) for opts in options]
    smallest = result.fixed_bits + sum(cheapest)
    if smallest > budget_bytes * 8:
        raise ValueError(
            f"budget_bytes={budget_bytes:g} is below the smallest packed size these widths reach, "
            f"{smallest / 8:g} bytes (every layer at its smallest width of {list(widths)}); "
            f"raise the budget to at least {-(-smallest // 8)} bytes, allow narrower widths (bits=), "
            "or quantize layers kept float (sensitivity(..., skip=[]))."
        )
    # front: (size, loss, parent index, row) with sizes increasing and losses strictly decreasing.
    rest = [sum(cheapest[i + 1 :]) for i in range(len(options))]
    fronts, front = [], [(0, 0.0, -1, None)]
    for i, opts in enumerate(options):
        room = budget - rest[i]  # a layer's choice must leave room for the cheapest of the rest
        candidates = sorted(
            (
                (size + r.packed_bits, loss + r.kd_increase, j, r)
                for j, (size, loss, _, _) in enumerate(front)
                for r in opts
                if size + r.packed_bits <= room
            ),
            key=lambda c: (c[0], c[1]),
        )
        front = []
        for c in candidates:
            if not front or c[1] < front[-1][1]:
                front.append(c)
        fronts.append(front)
    best = len(front) - 1  # the lowest loss (the last point of the front)
    choice = {}
    for front in reversed(fronts):
        _, _, best, row = front[best]
        choice[row.layer] = row.bits
    return {n: choice[n] for n in result.layers}
