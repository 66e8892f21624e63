"""Fast real-data check on Fashion-MNIST: label-free FAQD works (the CI's real-data run).

A small FP teacher is trained on a subset with labels; 4-bit students are then distilled from it
without labels (KD + FA): one fine-tuned from the teacher's weights, one from random weights.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import data, losses
from faqd_tf.distiller import Distiller
from faqd_tf.features import paired_extractors
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.quantize import quantize_model
from tests.references import np_fa_grad, np_fa_per_sample

FMNIST = "idx:/usr/share/datasets/fashion-mnist"
# Pinned: the test asserts accuracies after training, which vary with the seed (see the notes below).
SEED = 0
pytestmark = pytest.mark.skipif(
    not os.path.isdir("/usr/share/datasets/fashion-mnist"),
    reason="needs the Debian package dataset-fashion-mnist",
)


def small_cnn(weight_bits=None):
    inputs = keras.Input((28, 28, 1))
    x = inputs
    for stage, width in enumerate((16, 32, 64), start=1):
        if stage > 1:
            x = keras.layers.MaxPooling2D(name=f"pool{stage}")(x)
        x = QuantConv2D(
            width, 3, padding="same", use_bias=False, weight_bits=weight_bits, name=f"conv{stage}"
        )(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{stage}")(x)
        x = QuantReLU(name=f"stage{stage}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, QuantDense(10, name="logits")(x))


def accuracy(model, test):
    model.compile(
        metrics=["accuracy"], loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model.evaluate(test, verbose=0, return_dict=True)["accuracy"]


def test_label_free_4bit_student_on_fashion_mnist():
    seed = SEED
    keras.utils.set_random_seed(seed)
    train_labeled = data.load(FMNIST, "train", batch_size=64, limit=6000, seed=seed, augment=False)
    train_images = data.load(
        FMNIST, "train", labels=False, batch_size=64, limit=6000, seed=seed, augment=False
    )
    test = data.load(FMNIST, "test", batch_size=500, limit=2000)

    teacher = small_cnn()
    teacher.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    teacher.fit(train_labeled, epochs=3, verbose=0)
    teacher_acc = accuracy(teacher, test)
    assert teacher_acc > 0.65, teacher_acc  # a sanity bar; the claims are about the students

    results = {}
    for init in ("fine-tune", "end-to-end"):
        if init == "fine-tune":
            # Per-channel scales: the 16-channel first layer loses too much with one scale.
            student = quantize_model(teacher, weight_bits=4, per_channel=True)
            kd = "kl"
        else:
            student = small_cnn(weight_bits=4)
            kd = "mse"
        untrained = accuracy(student, test)
        distiller = Distiller(
            student, teacher, alpha=1.0, beta=0.1, gamma=0.0, kd=kd, temperature=4.0, fa="exact"
        )
        distiller.compile(keras.optimizers.Adam(3e-4 if init == "fine-tune" else 3e-3))
        distiller.fit(train_images, epochs=1 if init == "fine-tune" else 2, verbose=0)
        results[init] = (untrained, accuracy(student, test))

    print(f"teacher {teacher_acc:.4f}; (untrained, distilled) students {results}")
    untrained, tuned = results["fine-tune"]
    # Fine-tuned label-free 4-bit student: within 3 points of its teacher (the quickstart, on the
    # full data, measures the paper's "within 1 point").
    assert tuned > teacher_acc - 0.03, (teacher_acc, results)
    untrained, trained = results["end-to-end"]
    # From random weights, label-free, 2 epochs: far above chance (10%) and the untrained student.
    # Measured 55-67% over runs (seed spread of these short end-to-end runs: see docs/reproduce.md).
    assert trained > 0.4 and trained > untrained + 0.3, (teacher_acc, results)


def test_exact_fa_on_maps_of_a_trained_network_needs_no_fallback():
    """Real feature maps (a teacher trained briefly on Fashion-MNIST, its 2-bit twin in training
    mode as `Distiller.train_step` runs it): the gram form is within the adopted bound of float64
    (gradient 1e-3 relative, loss 1e-2; asserted 1e-4 for both) and its error estimate never asks for the
    pairwise fallback, which on such maps used to fire for a third to two thirds of the samples."""
    keras.utils.set_random_seed(SEED)
    teacher = small_cnn()
    teacher.compile(
        keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    teacher.fit(
        data.load(FMNIST, "train", batch_size=64, limit=2048, seed=SEED, augment=False),
        epochs=1,
        verbose=0,
    )
    student = quantize_model(teacher, weight_bits=2)
    images = next(
        iter(data.load(FMNIST, "train", labels=False, batch_size=16, limit=16, augment=False))
    )
    t_extractor, s_extractor = paired_extractors(teacher, student)
    for t_map, s_map in zip(t_extractor(images)[1:], s_extractor(images, training=True)[1:]):
        t_np, s_np = t_map.numpy(), s_map.numpy()
        assert np.all(
            losses.gram_error_estimate(t_np, s_np).numpy() < losses.GRAM_RELATIVE_ERROR_LIMIT
        )
        s_var = tf.constant(s_np)
        with tf.GradientTape() as tape:
            tape.watch(s_var)
            loss = losses.feature_affinity(t_np, s_var, method="gram")
        grad = tape.gradient(loss, s_var).numpy()
        want = np.mean(np_fa_per_sample(t_np, s_np))
        assert abs(float(loss) - want) <= 1e-4 * want
        want_grad = np_fa_grad(t_np, s_np)
        assert np.linalg.norm(grad - want_grad) <= 1e-4 * np.linalg.norm(want_grad)
