"""Distiller: one step equals a hand-written tape, replicas agree, label-free fit works."""

import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import losses, options
from faqd_tf.callbacks import GradientShares
from faqd_tf.distiller import Distiller
from faqd_tf.features import feature_extractor
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.quantize import quantize_model


def tiny_net(weight_bits=None, activation_bits=None, width=8, name=None):
    inputs = keras.Input((12, 12, 3))
    x = QuantConv2D(width, 3, padding="same", weight_bits=weight_bits, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn1")(x)
    x = QuantReLU(activation_bits, name="stage1")(x)
    x = QuantConv2D(2 * width, 3, strides=2, padding="same", weight_bits=weight_bits, name="conv2")(
        x
    )
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


def teacher_student_twin(rng):
    """A random teacher, its 2-bit student (4-bit activations) and the student's twin (same weights)
    for a hand-written tape, and a batch of 6 images."""
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    student = quantize_model(teacher, weight_bits=2, activation_bits=4)
    twin = quantize_model(teacher, weight_bits=2, activation_bits=4)
    twin.set_weights(student.get_weights())
    return teacher, student, twin, rng.normal(size=(6, 12, 12, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "kd, fa, fa_norm", [("mse", "exact", "fro2"), ("kl", "exact", "l1"), ("mse", None, "fro2")]
)
def test_one_train_step_equals_hand_written_tape(rng, kd, fa, fa_norm):
    teacher, student, twin, x = teacher_student_twin(rng)
    y = rng.integers(0, 5, size=(6,))
    alpha, beta, gamma, lr, T = 0.7, 0.3, 0.2, 0.05, 2.0
    teacher_before = weights_of(teacher)

    distiller = Distiller(
        student,
        teacher,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        kd=kd,
        temperature=T,
        fa=fa,
        fa_norm=fa_norm,
    )
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
        ce = tf.reduce_mean(
            tf.keras.losses.sparse_categorical_crossentropy(y, s_logits, from_logits=True)
        )
        loss = alpha * kd_value + gamma * ce
        if fa:
            loss += beta * sum(
                losses.feature_affinity(t, s, method="pairwise", fa_norm=fa_norm)
                for t, s in zip(t_maps, s_maps)
            )
    grads = tape.gradient(loss, twin.trainable_variables)
    for v, g in zip(twin.trainable_variables, grads):
        v.assign(v.constraint(v - lr * g) if v.constraint else v - lr * g)

    got, want = weights_of(student), weights_of(twin)
    assert got.keys() == want.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    start = quantize_model(teacher, weight_bits=2, activation_bits=4)
    assert any(not np.allclose(got[p], v.numpy()) for p, v in zip(got, start.weights)), (
        "the step changed nothing"
    )
    for path, value in weights_of(teacher).items():
        np.testing.assert_array_equal(
            value, teacher_before[path], err_msg=f"teacher {path} changed"
        )


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
    teacher_logs = distiller.evaluate_teacher(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(8), verbose=0
    )
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
    logs = distiller.evaluate(
        x, rng.integers(0, 5, size=(8,)), sample_weight=w, batch_size=8, return_dict=True, verbose=0
    )
    t_logits, *t_maps = distiller.teacher_features(x, training=False)
    s_logits, *s_maps = distiller.student_features(x, training=False)
    per_sample = losses.kd_loss_per_sample(t_logits, s_logits) + 0.2 * sum(
        losses.feature_affinity_per_sample(t, s) for t, s in zip(t_maps, s_maps)
    )
    assert logs["loss"] == pytest.approx(float(np.sum(per_sample.numpy() * w) / 8), rel=1e-5)


def test_label_free_fit_without_gamma_refuses_labels_it_needs(rng):
    teacher = tiny_net()
    distiller = Distiller(quantize_model(teacher, weight_bits=2), teacher, gamma=0.3)
    distiller.compile("sgd")
    x = rng.normal(size=(4, 12, 12, 3)).astype(np.float32)
    with pytest.raises(
        ValueError, match=r"gamma=0.3 weights a cross-entropy term but the batches carry no labels"
    ):
        distiller.fit(x, batch_size=4, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="takes no loss"):
        distiller.compile("sgd", loss="mse")


BAD_SETUPS = {
    "taps": (
        dict(teacher_layers=["stage1", "stage2"], student_layers=["stage2"]),
        r"teacher has 2 feature taps .* and the student 1",
    ),
    "layer": (dict(student_layers=["nope", "stage2"]), r"no layer named 'nope'"),
    "kd": (dict(kd="l1"), r"kd='l1' is not supported"),
    "beta": (dict(beta=-1), r"beta=-1 is not supported; use a finite number >= 0"),
    "alpha_nan": (dict(alpha=float("nan")), r"alpha=nan is not supported"),
    "temperature_bool": (dict(temperature=True), r"temperature=True is not supported"),
    "fa_norm": (dict(fa_norm="l2"), r"fa_norm='l2' is not supported; use one of 'fro2', 'l1'"),
    "fa_method": (dict(fa_method="exact"), r"fa_method='exact' is not supported"),
    "gram_l1": (
        dict(fa_norm="l1", fa_method="gram"),
        r"fa_method='gram' evaluates fa_norm='fro2' only",
    ),
    "ffa_k": (dict(ffa_k=0), r"ffa_k=0 is not supported"),
    "seed": (dict(seed="x"), r"seed='x' is not supported"),
}


@pytest.mark.parametrize("case", sorted(BAD_SETUPS))
def test_bad_setups_are_one_line_errors(case):
    teacher = tiny_net()
    student = quantize_model(teacher, weight_bits=2)
    kwargs, message = BAD_SETUPS[case]
    with pytest.raises(ValueError, match=message) as info:
        Distiller(student, teacher, **kwargs)
    assert "\n" not in str(info.value)


def test_logit_mismatch_is_a_clear_error():
    teacher = tiny_net()
    other = keras.Sequential(
        [keras.Input((12, 12, 3)), keras.layers.Flatten(), keras.layers.Dense(7)]
    )
    with pytest.raises(ValueError, match=r"student has 7 logits and the teacher 5"):
        Distiller(other, teacher, fa=None)


@pytest.mark.parametrize("fa_norm", ["fro2", "l1"])
def test_beta_defaults_to_the_measured_value_of_the_norm(fa_norm):
    teacher = tiny_net()
    distiller = Distiller(quantize_model(teacher, weight_bits=2), teacher, fa_norm=fa_norm)
    assert distiller.beta == options.DEFAULT_BETA[fa_norm] > 0
    assert Distiller.from_config(distiller.get_config()).beta == distiller.beta


@pytest.mark.parametrize("fa, fa_norm", [("exact", "fro2"), ("exact", "l1"), (None, "fro2")])
def test_gradient_norms_match_a_hand_built_tape_and_change_nothing(rng, fa, fa_norm):
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    student = quantize_model(teacher, weight_bits=4, activation_bits=4)
    random_weights(student, rng)  # not a copy of the teacher: every term has a gradient
    x = rng.normal(size=(6, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(6,))
    alpha, beta, gamma, T = 0.7, 3.0, 0.4, 2.0
    distiller = Distiller(
        student,
        teacher,
        alpha=alpha,
        beta=beta,
        gamma=gamma,
        kd="kl",
        temperature=T,
        fa=fa,
        fa_norm=fa_norm,
    )
    before = weights_of(student)
    norms = distiller.gradient_norms((x, y))
    raw = distiller.gradient_norms((x, y), weighted=False)
    for path, value in weights_of(
        student
    ).items():  # batch-norm statistics restored, weights untouched
        np.testing.assert_array_equal(value, before[path], err_msg=path)

    t_logits, *t_maps = feature_extractor(teacher)(x, training=False)
    with tf.GradientTape(persistent=True) as tape:
        s_logits, *s_maps = feature_extractor(student)(x, training=True)
        p = tf.nn.softmax(t_logits / T)
        terms = {
            "kd": alpha
            * T**2
            * tf.reduce_mean(
                tf.reduce_sum(p * (tf.math.log(p) - tf.nn.log_softmax(s_logits / T)), axis=-1)
            ),
            "ce": gamma
            * tf.reduce_mean(
                tf.keras.losses.sparse_categorical_crossentropy(y, s_logits, from_logits=True)
            ),
        }
        if fa:
            terms["fa"] = beta * sum(
                losses.feature_affinity(t, s, method="pairwise", fa_norm=fa_norm)
                for t, s in zip(t_maps, s_maps)
            )
    want = {
        name: np.sqrt(
            sum(
                float(tf.reduce_sum(g * g))
                for g in tape.gradient(v, student.trainable_variables)
                if g is not None
            )
        )
        for name, v in terms.items()
    }
    assert sorted(norms) == sorted(want)
    # L1 takes sign(S_T - S_S): an entry within rounding of 0 may flip between two float32 runs
    # (the CPU's matmuls do not promise bitwise-equal sums), and each flip moves a small gradient
    # by ~0.3% here.
    rel = 2e-2 if fa_norm == "l1" else 1e-4
    for name in want:
        assert norms[name] == pytest.approx(want[name], rel=rel if name == "fa" else 1e-4), name
        assert norms[name] == pytest.approx(
            {"kd": alpha, "fa": beta, "ce": gamma}[name] * raw[name], rel=1e-6
        )
        assert norms[name] > 0


def test_gradient_shares_callback_warns_about_an_inert_term():
    rng = np.random.default_rng(0)  # pinned: the last assertion is about this draw's gradient sizes
    teacher = tiny_net()
    random_weights(teacher, rng)
    student = quantize_model(teacher, weight_bits=4)
    random_weights(student, rng)
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    lines = []
    for beta in (1e-9, None):
        distiller = Distiller(student, teacher, beta=beta)
        distiller.compile(keras.optimizers.SGD(0.0))
        callback = GradientShares(x[:4], print_fn=lines.append)
        distiller.fit(x, batch_size=4, epochs=1, verbose=0, callbacks=[callback])
        assert set(callback.norms) == {"kd", "fa"}
    assert lines[0].startswith("gradient norms at the start: kd ")
    assert lines[1].startswith(
        "warning: the weighted fa term (weight 1e-09) has 0.0% of the gradient norm of kd"
    )
    assert len(lines) == 3 and "warning" not in lines[2]  # the default beta gives FA real weight


def test_distiller_config_round_trip(rng):
    teacher = tiny_net()
    distiller = Distiller(
        quantize_model(teacher, weight_bits=2),
        teacher,
        alpha=0.5,
        beta=0.2,
        kd="kl",
        temperature=4.0,
        fa="fast",
        ffa_k=5,
        seed=3,
    )
    again = Distiller.from_config(distiller.get_config())
    for key in ("alpha", "beta", "gamma", "kd", "temperature", "fa", "ffa_k", "seed"):
        assert getattr(again, key) == getattr(distiller, key)
    assert again.feature_pairs == [("stage1", "stage1"), ("stage2", "stage2")]


def _per_sample_loss(t_logits, s_logits, t_maps, s_maps, y, alpha, beta, gamma, T, fa_terms):
    """alpha * KL + beta * FA + gamma * CE of each sample, written out (FA by `fa_terms`)."""
    p = tf.nn.softmax(t_logits / T)
    kd = T**2 * tf.reduce_sum(p * (tf.math.log(p) - tf.nn.log_softmax(s_logits / T)), axis=-1)
    ce = tf.keras.losses.sparse_categorical_crossentropy(y, s_logits, from_logits=True)
    return (
        alpha * kd
        + beta * sum(fa_terms(t, s, tap) for tap, (t, s) in enumerate(zip(t_maps, s_maps)))
        + gamma * ce
    )


def _sgd_step(model, loss_fn, lr):
    with tf.GradientTape() as tape:
        loss = loss_fn()
    for v, g in zip(model.trainable_variables, tape.gradient(loss, model.trainable_variables)):
        v.assign(v.constraint(v - lr * g) if v.constraint else v - lr * g)


@pytest.mark.parametrize("replicas", [1, 2])
def test_sample_weights_against_a_hand_written_tape(rng, replicas, mirrored_strategy):
    """fit with sample weights takes one step of sum_i w_i loss_i / batch: a sample of weight 0 adds
    nothing (it still counts in the batch statistics of BatchNormalization), on one or two replicas."""
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    start = quantize_model(teacher, weight_bits=2, activation_bits=4)
    x = rng.normal(size=(8, 12, 12, 3)).astype(np.float32)
    y = rng.integers(0, 5, size=(8,))
    w = rng.uniform(0.5, 2.0, size=(8,)).astype(np.float32)
    w[rng.choice(8, size=3, replace=False)] = 0.0
    alpha, beta, gamma, lr, T = 0.7, 0.3, 0.2, 0.05, 2.0

    strategy = mirrored_strategy if replicas == 2 else tf.distribute.get_strategy()
    with strategy.scope():
        t = tiny_net(name="teacher")
        t.set_weights(teacher.get_weights())
        student = quantize_model(t, weight_bits=2, activation_bits=4)
        student.set_weights(start.get_weights())
        distiller = Distiller(
            student, t, alpha=alpha, beta=beta, gamma=gamma, kd="kl", temperature=T
        )
        distiller.compile(keras.optimizers.SGD(lr))
    assert strategy.num_replicas_in_sync == replicas
    distiller.fit(x, y, sample_weight=w, batch_size=8, epochs=1, verbose=0, shuffle=False)

    twin = quantize_model(teacher, weight_bits=2, activation_bits=4)
    twin.set_weights(start.get_weights())
    t_logits, *t_maps = feature_extractor(teacher)(x, training=False)
    kept = np.flatnonzero(w)

    def loss():
        s_logits, *s_maps = feature_extractor(twin)(
            x, training=True
        )  # the whole batch, as fit sees it
        per_sample = _per_sample_loss(
            t_logits,
            s_logits,
            t_maps,
            s_maps,
            y,
            alpha,
            beta,
            gamma,
            T,
            lambda t, s, _: losses.feature_affinity_per_sample(t, s, method="pairwise"),
        )
        return tf.reduce_sum(tf.gather(per_sample, kept) * w[kept]) / 8  # only the weighted samples

    _sgd_step(twin, loss, lr)
    got, want = weights_of(student), weights_of(twin)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-5, err_msg=path)
    assert any(not np.allclose(got[p], v.numpy()) for p, v in zip(got, start.weights)), (
        "the step changed nothing"
    )


@pytest.mark.parametrize("fa_norm", ["fro2", "l1"])
def test_fast_fa_step_equals_a_tape_with_the_same_probes(rng, fa_norm):
    """One step with FFA: the probes of each tap at step 0 come from the seeding rule, built here
    from TensorFlow's stateless ops: fold_in(fold_in((seed, 0), crc32 of the layer pair), step)."""
    teacher, student, twin, x = teacher_student_twin(rng)
    alpha, beta, lr, k, seed = 0.7, 3.0, 0.05, 4, int(rng.integers(2**31))
    distiller = Distiller(
        student,
        teacher,
        alpha=alpha,
        beta=beta,
        kd="kl",
        temperature=2.0,
        fa="fast",
        fa_norm=fa_norm,
        ffa_k=k,
        seed=seed,
    )
    distiller.compile(keras.optimizers.SGD(lr))
    distiller.fit(x, batch_size=6, epochs=1, verbose=0, shuffle=False)

    def probe_seed(tap):
        teacher_layer, student_layer = distiller.feature_pairs[tap]
        pair = zlib.crc32(f"{teacher_layer}\x00{student_layer}".encode()) % 2**31
        fold = tf.random.experimental.stateless_fold_in
        return fold(
            fold(tf.constant([seed, 0], tf.int64), tf.constant(pair, tf.int64)),
            tf.constant(0, tf.int64),
        )

    t_logits, *t_maps = feature_extractor(teacher)(x, training=False)

    def loss():
        s_logits, *s_maps = feature_extractor(twin)(x, training=True)

        def ffa(t, s, tap):
            return losses.fast_feature_affinity_per_sample(
                t, s, k=k, seed=probe_seed(tap), fa_norm=fa_norm
            )

        return tf.reduce_mean(
            _per_sample_loss(
                t_logits, s_logits, t_maps, s_maps, np.zeros(6), alpha, beta, 0.0, 2.0, ffa
            )
        )

    _sgd_step(twin, loss, lr)
    got, want = weights_of(student), weights_of(twin)
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # Other probes move the weights elsewhere: the comparison can tell the probes apart.
    twin.set_weights(quantize_model(teacher, weight_bits=2, activation_bits=4).get_weights())
    seed += 1
    _sgd_step(twin, loss, lr)
    assert any(
        not np.allclose(got[p], v, rtol=1e-5, atol=1e-6) for p, v in weights_of(twin).items()
    )


def test_replicas_get_distinct_halves_of_each_batch(mirrored_strategy):
    """Under two replicas each step's batch is split: each replica trains on half of it, no sample
    twice, and every sample of the epoch once."""
    seen = []

    class Recording(Distiller):
        def train_step(self, data):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            tf.py_function(
                lambda r, x: seen.append(
                    (int(r), np.rint(x.numpy()[:, 0, 0, 0]).astype(int).tolist())
                ),
                [replica, data],
                [],
            )
            return super().train_step(data)

    ids = np.arange(24, dtype=np.float32)
    x = np.broadcast_to(ids[:, None, None, None], (24, 12, 12, 3)).copy()
    with mirrored_strategy.scope():
        teacher = tiny_net(name="teacher")
        distiller = Recording(quantize_model(teacher, weight_bits=4), teacher, fa=None)
        distiller.compile(keras.optimizers.SGD(0.0))
    distiller.fit(
        tf.data.Dataset.from_tensor_slices(x).shuffle(24, seed=1).batch(8), epochs=1, verbose=0
    )
    assert sorted(r for r, _ in seen) == [0, 0, 0, 1, 1, 1]  # three steps, two replicas
    assert all(len(batch) == 4 for _, batch in seen)  # half of each batch of 8
    assert sorted(i for _, batch in seen for i in batch) == list(range(24))


def test_fa_with_no_feature_maps_is_refused_at_construction():
    import faqd_tf

    teacher = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)],
        name="mlp",
    )
    student = faqd_tf.quantize_model(teacher, weight_bits=4)
    with pytest.raises(ValueError, match="fa='exact' found no feature maps to match in 'mlp'"):
        faqd_tf.Distiller(student, teacher, kd="kl", fa="exact")
    assert faqd_tf.Distiller(student, teacher, kd="kl", fa=None).feature_pairs == []


def test_teacher_cache_reuses_the_first_epochs_logits(rng):
    teacher = tiny_net(name="teacher")
    random_weights(teacher, rng)
    start = quantize_model(teacher, weight_bits=2).get_weights()
    x = rng.normal(size=(24, 12, 12, 3)).astype(np.float32)

    def numbered():  # anew each run: a dataset's reshuffles go on from one fit to the next
        return (
            tf.data.Dataset.from_tensor_slices({"images": x, "index": np.arange(24)})
            .shuffle(24, seed=5, reshuffle_each_iteration=True)
            .batch(8)
        )

    kernel = teacher.get_layer("logits").kernel
    original = kernel.numpy()

    class ChangeTeacher(keras.callbacks.Callback):
        # After the first epoch a kept logit no longer equals the teacher's.
        def on_epoch_end(self, epoch, logs=None):
            kernel.assign(3.0 * original)

    def history(cache, change):
        kernel.assign(original)
        student = quantize_model(teacher, weight_bits=2)
        student.set_weights(start)
        distiller = Distiller(student, teacher, kd="mse", fa=None, seed=0, teacher_cache=cache)
        distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9))
        callbacks = [ChangeTeacher()] if change else []
        return distiller.fit(numbered(), epochs=3, verbose=0, callbacks=callbacks).history["kd"]

    unchanged = history(None, change=False)
    np.testing.assert_allclose(history(24, change=False), unchanged, rtol=1e-4)
    np.testing.assert_allclose(history(24, change=True), unchanged, rtol=1e-4)
    assert abs(history(None, change=True)[1] - unchanged[1]) > 1e-3  # without the cache it shows


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(fa="exact", teacher_cache=10), r"needs its feature maps every step"),
        (dict(fa=None, teacher_cache=0), r"teacher_cache=0 is not valid"),
        (dict(fa=None, teacher_cache=True), r"teacher_cache=True is not valid"),
    ],
)
def test_teacher_cache_refusals(kwargs, words):
    teacher = tiny_net(name="teacher")
    with pytest.raises(ValueError, match=words):
        Distiller(quantize_model(teacher, weight_bits=2), teacher, **kwargs)


def test_teacher_cache_survives_get_config():
    teacher = tiny_net(name="teacher")
    distiller = Distiller(quantize_model(teacher, weight_bits=2), teacher, fa=None, teacher_cache=7)
    assert Distiller.from_config(distiller.get_config()).teacher_cache == 7
