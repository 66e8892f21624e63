"""faqd_tf.sensitivity: per-layer sensitivity against hand-built students, and the allocation
against brute force over every assignment."""

import csv
import itertools
import os

import keras
import numpy as np
import pytest

import faqd_tf
from faqd_tf.batchnorm import recalibrate_batchnorm
from faqd_tf.features import feature_extractor
from faqd_tf.losses import feature_affinity_per_sample, kd_loss_per_sample
from faqd_tf.quantize import quantize_model
from faqd_tf.sensitivity import LayerWidth, Sensitivity, allocate_bits, sensitivity
from faqd_tf.summary import summary


def _teacher(rng):
    """A small residual net with random weights and BN statistics (taps at 8x8 and 4x4)."""
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="stem_relu")(x)
    y = keras.layers.Conv2D(4, 3, padding="same", name="branch")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    x = keras.layers.ReLU(name="block")(keras.layers.Add()([x, y]))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same", name="down")(x)
    x = keras.layers.ReLU(name="down_relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, outputs)
    for w in model.weights:
        value = rng.normal(size=w.shape).astype("float32")
        if "variance" in w.path:
            value = np.abs(value) + 0.5
        w.assign(value if "kernel" not in w.path else value * 0.4)
    return model


def _images(rng, n=48):
    return rng.normal(size=(n, 8, 8, 2)).astype("float32")


def _reference(teacher, images, layer_bits, taps):
    """Mean KD (kl, T=4) and summed FA of the student quantize_model builds, BN re-estimated."""
    student = quantize_model(teacher, weight_bits=None, layer_bits=layer_bits)
    recalibrate_batchnorm(student, images)
    t = feature_extractor(teacher, taps)(images, training=False)
    s = feature_extractor(student, taps)(images, training=False)
    kd = float(np.mean(kd_loss_per_sample(t[0], s[0], "kl", 4.0)))
    fa = sum(float(np.mean(feature_affinity_per_sample(a, b))) for a, b in zip(t[1:], s[1:]))
    return kd, fa, student


def test_sensitivity_equals_hand_built_students(rng):
    teacher, images = _teacher(rng), _images(rng)
    widths = (1, int(rng.choice([2, 4, 8])))
    result = sensitivity(teacher, images, bits=widths)
    assert result.layers == ["stem", "branch", "down"]  # the classifier stays float
    assert result.taps and result.samples == len(images)
    base_kd, base_fa, _ = _reference(teacher, images, {}, result.taps)
    assert result.baseline_kd == pytest.approx(base_kd, rel=1e-4, abs=1e-6)
    assert result.baseline_fa == pytest.approx(base_fa, rel=1e-4, abs=1e-6)
    for layer in result.layers:
        bits = widths[int(rng.integers(len(widths)))]
        kd, fa, student = _reference(teacher, images, {layer: bits}, result.taps)
        row = result.row(layer, bits)
        assert row.kd_increase == pytest.approx(kd - base_kd, rel=1e-3, abs=1e-5), (layer, bits)
        assert row.fa_increase == pytest.approx(fa - base_fa, rel=1e-3, abs=1e-5), (layer, bits)
        packed = {r.name: r.packed_bits for r in summary(student, print_fn=None).rows}
        assert row.packed_bits == packed[layer]
    # 1-bit weights move a random net's logits: the measure is not trivially zero (its sign is
    # not fixed: against the BN-re-estimated float copy a quantized layer may land nearer the teacher).
    assert max(abs(r.kd_increase) for r in result.rows if r.bits == 1) > 1e-4


def test_sizes_add_up_to_the_students_summary(rng):
    teacher, images = _teacher(rng), _images(rng, 16)
    result = sensitivity(teacher, images, bits=(1, 2, 4, 8, None))
    for _ in range(3):
        choice = {n: [1, 2, 4, 8, None][int(rng.integers(5))] for n in result.layers}
        student = quantize_model(teacher, weight_bits=4, layer_bits=choice)
        assert summary(student, print_fn=None).packed_bytes == result.packed_bytes(choice)
    for n in result.layers:
        assert result.row(n, None).kd_increase == result.row(n, None).fa_increase == 0.0
    # Unbounded budget: each layer at its least sensitive width (float costs 0).
    ample = allocate_bits(result, budget_bytes=1e9)
    for n in result.layers:
        assert result.row(n, ample[n]).kd_increase == min(
            result.row(n, b).kd_increase for b in result.bits
        )
    # The allocation feeds quantize_model as it is and the student fits the budget.
    budget = (result.packed_bytes(dict.fromkeys(result.layers, 1)) + result.packed_bytes(ample)) / 2
    chosen = allocate_bits(result, budget)
    student = quantize_model(teacher, layer_bits=chosen)
    assert summary(student, print_fn=None).packed_bytes == result.packed_bytes(chosen) <= budget
    assert allocate_bits(result, budget, bits=(1,)) == dict.fromkeys(result.layers, 1)


def _random_problem(rng, layers=None, widths=None):
    widths = widths or (1, 2, 4, 8)
    layers = [f"l{i}" for i in range(layers or int(rng.integers(2, 6)))]
    rows = []
    for n in layers:
        # Codes, one 32-bit scale and a bias of random length: the size grows with the width.
        params, extra = int(rng.integers(1, 400)), 32 * int(rng.integers(1, 4))
        for b in widths:
            size = (b or 32) * params + extra
            # Costs fall with the width, roughly, but not always (a noisy measure).
            rows.append(LayerWidth(n, b, float(rng.exponential(1.0 / (b or 64))), 0.0, size))
    return Sensitivity(
        rows=rows,
        layers=layers,
        bits=tuple(widths),
        fixed_bits=int(rng.integers(0, 2000)),
        baseline_kd=0.0,
        baseline_fa=0.0,
        taps=[],
        kd="kl",
        temperature=4.0,
        samples=0,
        seconds=0.0,
    )


def _brute_force(result, budget_bytes):
    best = None
    for combo in itertools.product(result.bits, repeat=len(result.layers)):
        choice = dict(zip(result.layers, combo))
        if result.packed_bytes(choice) <= budget_bytes:
            loss = result.predicted_kd_increase(choice)
            best = loss if best is None else min(best, loss)
    return best


def test_allocation_equals_brute_force(rng):
    for _ in range(30):
        widths = tuple(rng.choice([1, 2, 4, 8, None], size=int(rng.integers(1, 5)), replace=False))
        result = _random_problem(rng, widths=widths)
        sizes = sorted(
            result.packed_bytes(dict(zip(result.layers, c)))
            for c in itertools.product(result.bits, repeat=len(result.layers))
        )
        for budget in (sizes[0], sizes[-1], float(rng.uniform(sizes[0], sizes[-1]))):
            choice = allocate_bits(result, budget)
            assert set(choice) == set(result.layers)
            assert result.packed_bytes(choice) <= budget
            assert result.predicted_kd_increase(choice) == pytest.approx(
                _brute_force(result, budget), rel=1e-12, abs=1e-12
            )


def test_larger_budget_never_predicts_more_loss(rng):
    result = _random_problem(rng, layers=8)
    smallest = result.packed_bytes(dict.fromkeys(result.layers, 1))
    largest = result.packed_bytes(dict.fromkeys(result.layers, 8))
    losses = []
    for budget in np.linspace(smallest, largest, 40):
        choice = allocate_bits(result, float(budget))
        assert result.packed_bytes(choice) <= budget
        losses.append(result.predicted_kd_increase(choice))
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))
    assert losses[-1] < losses[0]  # the sweep spans choices


def test_infeasible_budget_names_the_smallest_size(rng):
    result = _random_problem(rng)
    smallest = result.packed_bytes(dict.fromkeys(result.layers, 1))
    assert allocate_bits(result, smallest) == dict.fromkeys(result.layers, 1)
    with pytest.raises(
        ValueError, match=f"smallest packed size these widths reach, {smallest:g} bytes"
    ) as err:
        allocate_bits(result, smallest - 0.125)
    assert "\n" not in str(err.value) and "raise the budget" in str(err.value)
    with pytest.raises(ValueError, match="were not measured"):
        allocate_bits(_random_problem(rng, widths=(2, 4)), 1e9, bits=(1,))


def test_csv_and_plot_are_written_whole(rng, tmp_path):
    result = _random_problem(rng, widths=(1, 2, None))
    path = result.to_csv(tmp_path / "sensitivity.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [(r["layer"], r["bits"]) for r in rows] == [
        (r.layer, "float" if r.bits is None else str(r.bits)) for r in result.rows
    ]
    assert [float(r["kd_increase"]) for r in rows] == [r.kd_increase for r in result.rows]
    assert [float(r["packed_bytes"]) for r in rows] == [r.packed_bytes for r in result.rows]
    plot = result.plot(tmp_path / "sensitivity.png")
    with open(plot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["sensitivity.csv", "sensitivity.png"]


def test_exported_from_the_package():
    assert faqd_tf.sensitivity is sensitivity and faqd_tf.allocate_bits is allocate_bits


FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_size_budget_through_the_cli(tmp_path):
    """`student.size_budget_kb`: the distilled student has the widths written to layer_bits.json,
    packs to at most the budget, and a rerun trains with the saved choice."""
    import json

    from faqd_tf import cli, models
    from tests import helpers

    teacher = tmp_path / "teacher.keras"
    keras.utils.set_random_seed(0)  # the allocation's outcome is asserted
    models.get("resnet8", input_shape=(28, 28, 1), num_classes=10).save(teacher)
    budget_kb = 22.5
    cfg = helpers.write_config(
        tmp_path,
        {
            "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 32},
            "teacher": {"file": str(teacher)},
            "student": {"weight_bits": 2, "size_budget_kb": budget_kb, "sensitivity_samples": 32},
            "train": {"epochs": 1, "batch_size": 32},
            "output_dir": str(tmp_path / "out"),
        },
    )
    out = tmp_path / "out"
    assert cli.main(["--config", cfg, "--stage", "distill"]) == 0
    saved = json.loads((out / "layer_bits.json").read_text())
    chosen = saved["layer_bits"]
    assert set(chosen) == {"stem_conv", *(f"s{i}b1_conv{j}" for i in (1, 2, 3) for j in (1, 2))}
    assert len(set(chosen.values())) > 1  # the budget sits between the uniform sizes
    student = keras.models.load_model(out / "student.keras")
    widths = {row.name: row.weight_bits for row in summary(student, print_fn=None).rows}
    assert {name: widths[name] for name in chosen} == chosen and widths["logits"] == 32
    packed = summary(student, print_fn=None).packed_bytes
    assert packed <= budget_kb * 1024 and packed / 1024 == pytest.approx(saved["packed_kb"])
    with open(out / "sensitivity.csv") as f:
        assert len(list(csv.DictReader(f))) == len(chosen) * 4
    assert (out / "sensitivity.png").stat().st_size > 0

    # The saved choice is what a rerun trains with (here an edited one: all at 8 bits but one).
    edited = {name: 8 for name in chosen} | {"s3b1_conv2": 1}
    (out / "layer_bits.json").write_text(json.dumps({**saved, "layer_bits": edited}))
    os.remove(out / "student.keras")
    assert cli.main(["--config", cfg, "--stage", "distill"]) == 0
    student = keras.models.load_model(out / "student.keras")
    widths = {row.name: row.weight_bits for row in summary(student, print_fn=None).rows}
    assert {name: widths[name] for name in chosen} == edited

    # A file that does not fit this budget and network is measured again, not trusted.
    (out / "layer_bits.json").write_text(json.dumps({**saved, "layer_bits": {"stem_conv": 3}}))
    os.remove(out / "student.keras")
    assert cli.main(["--config", cfg, "--stage", "distill"]) == 0
    assert json.loads((out / "layer_bits.json").read_text())["layer_bits"] == chosen
