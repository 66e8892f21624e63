"""Dense prediction: KD, FA and CE on per-pixel (segmentation) and per-step logits.

References are float64 NumPy: each position's KL/MSE/CE over the last axis, averaged over the
positions of a sample; gradients against central differences of that reference.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import losses
from faqd_tf.distiller import Distiller
from faqd_tf.losses import (
    ce_loss_per_sample,
    feature_affinity_per_sample,
    kd_loss,
    kd_loss_per_sample,
)
from tests.references import central_differences, np_fa_per_sample

RTOL = 1e-4


def np_log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))


def np_kd(t, s, kd, temperature):
    """Per-sample KD of (batch, positions..., classes) logits, float64."""
    t, s = np.asarray(t, np.float64), np.asarray(s, np.float64)
    if kd == "mse":
        per_position = np.mean((t - s) ** 2, axis=-1)
    else:
        lp, lq = np_log_softmax(t / temperature), np_log_softmax(s / temperature)
        per_position = np.sum(np.exp(lp) * (lp - lq), axis=-1) * temperature**2
    return per_position.reshape(len(t), -1).mean(axis=1)


def np_ce(labels, logits):
    logits = np.asarray(logits, np.float64)
    log_q = np_log_softmax(logits)
    picked = np.take_along_axis(log_q, np.asarray(labels)[..., None].astype(np.int64), axis=-1)[
        ..., 0
    ]
    return -picked.reshape(len(logits), -1).mean(axis=1)


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


SHAPES = {"pixels": (3, 5, 4, 6), "steps": (3, 7, 6)}


@pytest.mark.parametrize("kd,temperature", [("mse", 1.0), ("kl", 1.0), ("kl", 4.0)])
@pytest.mark.parametrize("layout", sorted(SHAPES))
def test_kd_per_position_matches_numpy_and_finite_differences(rng, layout, kd, temperature):
    shape = SHAPES[layout]
    t = (3 * rng.normal(size=shape)).astype(np.float32)
    s = (3 * rng.normal(size=shape)).astype(np.float32)
    per = kd_loss_per_sample(t, s, kd=kd, temperature=temperature)
    assert per.dtype == tf.float32 and per.shape == (shape[0],)
    np.testing.assert_allclose(per, np_kd(t, s, kd, temperature), rtol=1e-5, atol=1e-6)
    s_var = tf.convert_to_tensor(s)
    with tf.GradientTape() as tape:
        tape.watch(s_var)
        loss = kd_loss(t, s_var, kd=kd, temperature=temperature)
    t64 = t.astype(np.float64)
    want = central_differences(
        lambda x: np.mean(np_kd(t64, x, kd, temperature)), s.astype(np.float64)
    )
    assert rel_err(tape.gradient(loss, s_var), want) <= RTOL


@pytest.mark.parametrize("kd", ["mse", "kl"])
def test_one_position_is_the_classification_loss(rng, kd):
    t = rng.normal(size=(4, 10)).astype(np.float32)
    s = rng.normal(size=(4, 10)).astype(np.float32)
    flat = kd_loss_per_sample(t, s, kd=kd, temperature=3.0).numpy()
    np.testing.assert_allclose(flat, np_kd(t, s, kd, 3.0), rtol=1e-5, atol=1e-7)
    one_pixel = kd_loss_per_sample(
        t[:, None, None], s[:, None, None], kd=kd, temperature=3.0
    ).numpy()
    np.testing.assert_allclose(one_pixel, flat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("form", ["sparse", "sparse_trailing_1", "one_hot"])
def test_ce_per_pixel_matches_numpy(rng, form):
    logits = (2 * rng.normal(size=(3, 4, 5, 6))).astype(np.float32)
    labels = rng.integers(0, 6, size=(3, 4, 5))
    given = {
        "sparse": labels.astype(np.uint8),
        "sparse_trailing_1": labels[..., None],
        "one_hot": np.eye(6, dtype=np.float32)[labels],
    }[form]
    got = ce_loss_per_sample(given, logits)
    assert got.shape == (3,)
    np.testing.assert_allclose(got, np_ce(labels, logits), rtol=1e-5, atol=1e-6)
    flat = ce_loss_per_sample(labels[:, 0, 0], logits[:, 0, 0])  # classification: (batch,) labels
    np.testing.assert_allclose(flat, np_ce(labels[:, 0, 0], logits[:, 0, 0]), rtol=1e-5, atol=1e-6)


def test_fa_takes_per_step_maps_as_one_pixel_column(rng):
    t = rng.normal(size=(2, 9, 5)).astype(np.float32)
    s = rng.normal(size=(2, 9, 3)).astype(np.float32)
    got = feature_affinity_per_sample(t, s, method="pairwise")
    np.testing.assert_allclose(got, np_fa_per_sample(t[:, :, None], s[:, :, None]), rtol=RTOL)


BAD = {
    "positions": (
        lambda: kd_loss(np.zeros((2, 4, 4, 3)), np.zeros((2, 8, 8, 3))),
        "teacher (2, 4, 4, 3) and student (2, 8, 8, 3)",
    ),
    "rank": (lambda: kd_loss(np.zeros((2, 4, 3)), np.zeros((2, 4, 4, 3))), "same shape"),
    "labels": (
        lambda: ce_loss_per_sample(np.zeros((2, 4, 3), np.int32), np.zeros((2, 4, 4, 3))),
        "one integer class per position, shape ('batch', 4, 4)",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_mismatched_shapes_are_one_line_errors(case):
    call, needle = BAD[case]
    with pytest.raises(ValueError) as info:
        call()
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


# ---- the Distiller on a segmentation net -----------------------------------------------------


def segmentation_net(classes=4, size=16, name=None):
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(inputs)
    x = keras.layers.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="up")(
        x
    )
    return keras.Model(inputs, keras.layers.Conv2D(classes, 1, name="logits")(x), name=name)


def sequence_net(classes=4, name=None):
    inputs = keras.Input((12, 3))
    x = keras.layers.Conv1D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    return keras.Model(inputs, keras.layers.Conv1D(classes, 1, name="logits")(x), name=name)


def test_segmentation_student_distils_label_free_and_saves(tmp_path):
    keras.utils.set_random_seed(7)  # asserts a training outcome: pinned
    teacher, student = segmentation_net(name="teacher"), segmentation_net(name="student")
    images = np.random.default_rng(7).uniform(size=(8, 16, 16, 3)).astype(np.float32)
    distiller = Distiller(student, teacher, kd="kl", fa="exact", seed=1)
    # FA taps the hidden maps; the 4-D logits are KD's (FA on them is unstable, see _default_taps).
    assert distiller.feature_pairs == [("down", "down"), ("up", "up")]
    distiller.compile(keras.optimizers.SGD(0.005))
    before = distiller.evaluate(images, batch_size=8, verbose=0, return_dict=True)
    history = distiller.fit(
        tf.data.Dataset.from_tensor_slices(images).batch(4), epochs=1, verbose=0
    )
    after = distiller.evaluate(images, batch_size=8, verbose=0, return_dict=True)
    assert sorted(history.history) == ["fa", "kd", "loss"]
    assert all(np.isfinite(v[0]) for v in history.history.values())
    # Measured at this seed: 10.96 -> 9.85 (lr 0.01 and 0.002 also drop it by 7-9%).
    assert after["loss"] < 0.97 * before["loss"], (before, after)

    distiller.save(tmp_path / "distiller.keras")
    loaded = keras.models.load_model(tmp_path / "distiller.keras", safe_mode=True)
    assert loaded.feature_pairs == distiller.feature_pairs and loaded.kd == "kl"
    np.testing.assert_allclose(loaded.student(images), student(images), rtol=1e-5, atol=1e-6)
    assert int(loaded.optimizer.iterations) == 2  # recompiled with the saved optimizer state
    assert np.isfinite(loaded.fit(images, batch_size=4, epochs=1, verbose=0).history["loss"][0])


def test_segmentation_ce_weighs_pixels_and_samples(rng):
    teacher, student = segmentation_net(name="teacher"), segmentation_net(name="student")
    x = rng.uniform(size=(4, 16, 16, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=(4, 16, 16)).astype(np.int32)
    w = np.array([1.0, 0.0, 2.0, 0.5], np.float32)
    distiller = Distiller(student, teacher, gamma=0.3, kd="mse", fa=None)
    distiller.compile("sgd")
    logs = distiller.evaluate(x, y, sample_weight=w, batch_size=4, verbose=0, return_dict=True)
    logits = student(x).numpy()
    assert logs["ce"] == pytest.approx(float(np.sum(w * np_ce(y, logits)) / 4), rel=1e-5)
    assert logs["kd"] == pytest.approx(
        float(np.sum(w * np_kd(teacher(x).numpy(), logits, "mse", 1.0)) / 4), rel=1e-5
    )


def test_per_step_student_distils(rng):
    keras.utils.set_random_seed(3)
    teacher, student = sequence_net(name="teacher"), sequence_net(name="student")
    distiller = Distiller(student, teacher, kd="mse", fa="exact", seed=1)
    assert distiller.feature_pairs == [("conv", "conv")]  # a (batch, L, C) map, FA's L x 1 image
    distiller.compile(keras.optimizers.SGD(0.05))
    history = distiller.fit(
        rng.normal(size=(8, 12, 3)).astype(np.float32), batch_size=4, epochs=1, verbose=0
    )
    assert history.history["fa"][0] > 0 and np.isfinite(history.history["kd"][0])


def test_distiller_refuses_logits_of_other_positions():
    with pytest.raises(ValueError) as info:
        Distiller(
            segmentation_net(size=16),
            keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(4, 3, strides=2)]),
        )
    message = str(info.value)
    assert "(16, 16, 4)" in message and "(7, 7, 4)" in message and "\n" not in message, message


def test_losses_docstrings_run():
    import doctest

    failures, tried = doctest.testmod(losses, verbose=False)
    assert tried > 0 and failures == 0
