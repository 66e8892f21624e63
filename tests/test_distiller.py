"""Distiller: one step equals a hand-written tape, replicas agree, label-free fit works."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import losses
from faqd_tf.distiller import Distiller
from faqd_tf.features import feature_extractor
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.quantize import quantize_model


def tiny_net(weight_bits=None, activation_bits=None, width=8, name=None):
    inputs = keras.Input((12, 12, 3))
    x = QuantConv2D(width, 3, padding="same", weight_bits=weight_bits, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn1")(x)
    x = QuantReLU(activation_bits, name="stage1")(x)
    x = QuantConv2D(2 * width, 3, strides=2, padding="same", weight_bits=weight_bits, name="conv2")(x)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn2")(x)
    x = QuantReLU(activation_bits, name="stage2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, QuantDense(5, name="logits")(x), name=name)


def random_weights(model, rng):
    for v in model.weights:
        if "moving_variance" in v.path or "alpha" in v.path:
            v.assign(rng.uniform(0.5, 1.5, size=v.shape).astype(np.float32))
        else:
            v.assign(rng.normal(0, 0.3, size=v.shape).astype(np.float32))


def weights_of(model):
    return {v.path: v.numpy().copy() for v in model.weights}


@pytest.mark.parametrize("kd, fa", [("mse", "exact"), ("kl", "exact"), ("mse", None)])
def test_one_train_step_equals_hand_written_tape(rng, kd, fa):
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    student = quantize_model(teacher, weight_bits=2, activation_bits=4)
    twin = quantize_model(teacher, weight_bits=2, activation_bits=4)
    twin.set_weights(student.get_weights())
    x = rng.normal(size=(6, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(6,))
    alpha, beta, gamma, lr, T = 0.7, 0.3, 0.2, 0.05, 2.0
    teacher_before = weights_of(teacher)

    distiller = Distiller(student, teacher, alpha=alpha, beta=beta, gamma=gamma, kd=kd, temperature=T, fa=fa)
    distiller.compile(keras.optimizers.SGD(lr))
    distiller.fit(x, y, batch_size=6, epochs=1, verbose=0, shuffle=False)

    # The same composed loss, written out by hand.
    t_feats, s_feats = feature_extractor(teacher), feature_extractor(twin)
    t_logits, *t_maps = t_feats(x, training=False)
    with tf.GradientTape() as tape:
        s_logits, *s_maps = s_feats(x, training=True)
        if kd == "mse":
            kd_value = tf.reduce_mean(tf.square(t_logits - s_logits))
        else:
            p = tf.nn.softmax(t_logits / T)
            kd_value = T**2 * tf.reduce_mean(
                tf.reduce_sum(p * (tf.math.log(p) - tf.nn.log_softmax(s_logits / T)), axis=-1)
            )
        ce = tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(y, s_logits, from_logits=True))
        loss = alpha * kd_value + gamma * ce
        if fa:
            loss += beta * sum(losses.feature_affinity(t, s, method="pairwise") for t, s in zip(t_maps, s_maps))
    grads = tape.gradient(loss, twin.trainable_variables)
    for v, g in zip(twin.trainable_variables, grads):
        v.assign(v.constraint(v - lr * g) if v.constraint else v - lr * g)

    got, want = weights_of(student), weights_of(twin)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    start = quantize_model(teacher, weight_bits=2, activation_bits=4)
    assert any(not np.allclose(got[p], v.numpy()) for p, v in zip(got, start.weights)), "the step changed nothing"
    for path, value in weights_of(teacher).items():
        np.testing.assert_array_equal(value, teacher_before[path], err_msg=f"teacher {path} changed")


def test_one_step_same_on_one_and_two_replicas(rng, mirrored_strategy):
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    start = quantize_model(teacher, weight_bits=4, activation_bits=4)
    x = rng.normal(size=(16, 12, 12, 3)).astype(np.float32)

    def one_step(strategy):
        with strategy.scope():
            t = tiny_net(name="teacher")
            t.set_weights(teacher.get_weights())
            s = quantize_model(t, weight_bits=4, activation_bits=4)
            s.set_weights(start.get_weights())
            d = Distiller(s, t, alpha=1.0, beta=0.5, kd="mse", fa="exact")
            d.compile(keras.optimizers.SGD(0.1, momentum=0.9))
        d.fit(x, batch_size=16, epochs=1, verbose=0, shuffle=False)
        return weights_of(s)

    single = one_step(tf.distribute.get_strategy())
    mirrored = one_step(mirrored_strategy)
    assert mirrored_strategy.num_replicas_in_sync == 2
    for path in single:
        np.testing.assert_allclose(mirrored[path], single[path], rtol=1e-5, atol=1e-5, err_msg=path)
    assert any(not np.array_equal(single[p], v.numpy()) for p, v in zip(single, start.weights))


def test_label_free_fit_with_compiled_metrics_and_batch_forms(rng, tmp_path):
    teacher = tiny_net()
    random_weights(teacher, rng)
    student = quantize_model(teacher, weight_bits=1)
    distiller = Distiller(student, teacher, beta=0.5, fa="fast", ffa_k=3, seed=1)
    distiller.compile(keras.optimizers.Adam(1e-3), metrics=["accuracy"])
    x = rng.normal(size=(16, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(16,))
    images_only = tf.data.Dataset.from_tensor_slices(x).batch(8)
    history = distiller.fit(images_only, epochs=2, verbose=0)
    assert set(history.history) == {"loss", "kd", "fa"}
    single_tuple = tf.data.Dataset.from_tensor_slices((x,)).batch(8)
    distiller.fit(single_tuple, epochs=1, verbose=0)
    labeled = tf.data.Dataset.from_tensor_slices((x, y, np.ones(16, np.float32))).batch(8)
    logs = distiller.evaluate(labeled, return_dict=True, verbose=0)
    assert {"loss", "kd", "fa", "accuracy"} <= set(logs)
    assert 0.0 <= logs["accuracy"] <= 1.0
    teacher_logs = distiller.evaluate_teacher(tf.data.Dataset.from_tensor_slices((x, y)).batch(8), verbose=0)
    want = np.mean(np.argmax(teacher.predict(x, verbose=0), axis=1) == y)
    assert teacher_logs["accuracy"] == pytest.approx(want)
    # The student is a plain Keras model that round-trips through .keras.
    distiller.student.save(tmp_path / "student.keras")
    loaded = keras.models.load_model(tmp_path / "student.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), student.predict(x, verbose=0))


def test_sample_weights_weight_the_loss(rng):
    teacher = tiny_net()
    random_weights(teacher, rng)
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    w = rng.uniform(0.1, 2.0, size=(8,)).astype(np.float32)
    distiller = Distiller(quantize_model(teacher, weight_bits=4), teacher, beta=0.2)
    distiller.compile("sgd")
    logs = distiller.evaluate(x, rng.integers(0, 5, size=(8,)), sample_weight=w, batch_size=8,
                              return_dict=True, verbose=0)
    t_logits, *t_maps = distiller.teacher_features(x, training=False)
    s_logits, *s_maps = distiller.student_features(x, training=False)
    per_sample = losses.kd_loss_per_sample(t_logits, s_logits) + 0.2 * sum(
        losses.feature_affinity_per_sample(t, s) for t, s in zip(t_maps, s_maps)
    )
    assert logs["loss"] == pytest.approx(float(np.sum(per_sample.numpy() * w) / 8), rel=1e-5)


def test_bad_setups_are_clear_errors(rng):
    teacher = tiny_net()
    student = quantize_model(teacher, weight_bits=2)
    x = rng.normal(size=(4, 12, 12, 3)).astype(np.float32)
    distiller = Distiller(student, teacher, gamma=0.3)
    distiller.compile("sgd")
    with pytest.raises(ValueError, match=r"gamma=0.3 weights a cross-entropy term but the batches carry no labels"):
        distiller.fit(x, batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match=r"teacher has 2 feature taps .* and the student 1"):
        Distiller(student, teacher, teacher_layers=["stage1", "stage2"], student_layers=["stage2"])
    with pytest.raises(ValueError, match=r"no layer named 'nope'"):
        Distiller(student, teacher, student_layers=["nope", "stage2"])
    with pytest.raises(ValueError, match=r"kd='l1' is not supported"):
        Distiller(student, teacher, kd="l1")
    with pytest.raises(ValueError, match=r"beta=-1 must be a number >= 0"):
        Distiller(student, teacher, beta=-1)
    other = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Flatten(), keras.layers.Dense(7)])
    with pytest.raises(ValueError, match=r"student has 7 logits and the teacher 5"):
        Distiller(other, teacher, fa=None)
    with pytest.raises(ValueError, match="takes no loss"):
        distiller.compile("sgd", loss="mse")


def test_distiller_config_round_trip(rng):
    teacher = tiny_net()
    distiller = Distiller(quantize_model(teacher, weight_bits=2), teacher, alpha=0.5, beta=0.2, kd="kl",
                          temperature=4.0, fa="fast", ffa_k=5, seed=3)
    again = Distiller.from_config(distiller.get_config())
    for key in ("alpha", "beta", "gamma", "kd", "temperature", "fa", "ffa_k", "seed"):
        assert getattr(again, key) == getattr(distiller, key)
    assert again.feature_pairs == [("stage1", "stage1"), ("stage2", "stage2")]
