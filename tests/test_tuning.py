"""FAQDHyperModel and search: keras-tuner trials run end to end on label-free training data,
scored by the student's accuracy on labeled validation data; the search space follows the options."""

import json

import keras
import keras_tuner
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import options, quantizers
from faqd_tf.distiller import Distiller
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.quantize import quantize_model
from faqd_tf.tuning import FAQDHyperModel, best_distill_config, search

CLASSES = 5


def tiny_teacher():
    inputs = keras.Input((12, 12, 3))
    x = QuantConv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn1")(x)
    x = QuantReLU(name="stage1")(x)
    x = QuantConv2D(16, 3, strides=2, padding="same", name="conv2")(x)
    x = keras.layers.BatchNormalization(synchronized=True, name="bn2")(x)
    x = QuantReLU(name="stage2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, QuantDense(CLASSES, name="logits")(x), name="teacher")


def hypermodel_of(teacher, **kwargs):
    # Activation-only quantization: the weight quantizers are slow to trace, and this file
    # tests the tuning, not the quantizers.
    kwargs.setdefault("student_layers", ["stage1", "stage2"])
    kwargs.setdefault("teacher_layers", ["stage1", "stage2"])
    return FAQDHyperModel(
        teacher, lambda: quantize_model(teacher, weight_bits=None, activation_bits=4), **kwargs
    )


def data(rng, n=32):
    images = rng.normal(size=(n, 12, 12, 3)).astype(np.float32)
    labels = rng.integers(0, CLASSES, size=(n,))
    return images, labels


def check_completed_with_val_accuracy(tuner, trials):
    done = list(tuner.oracle.trials.values())
    assert len(done) == trials
    for trial in done:
        assert trial.status == "COMPLETED", trial.message
        assert trial.metrics.exists("val_accuracy")
        assert 0.0 <= trial.score <= 1.0
        # Label-free training batches: no training accuracy, only the validation one.
        assert not trial.metrics.exists("accuracy")


def test_random_search_label_free_training_labeled_validation(rng, tmp_path):
    teacher = tiny_teacher()
    images, labels = data(rng)
    val_images, val_labels = data(rng)
    train = tf.data.Dataset.from_tensor_slices(images).batch(16)  # images only
    hypermodel = hypermodel_of(teacher, kd="kl", seed=1)

    best, tuner = search(
        hypermodel,
        train,
        (val_images, val_labels),
        tuner="random",
        max_trials=2,
        epochs=2,
        directory=str(tmp_path),
        project_name="random",
        seed=int(rng.integers(2**31)),
    )

    assert isinstance(tuner, keras_tuner.RandomSearch)
    assert (
        tuner.oracle.objective.name == "val_accuracy" and tuner.oracle.objective.direction == "max"
    )
    check_completed_with_val_accuracy(tuner, trials=2)
    assert best == tuner.get_best_hyperparameters(1)[0].values
    # The best is the trial of highest score, and a trial's score is its best val_accuracy.
    trials = list(tuner.oracle.trials.values())
    for trial in trials:
        assert trial.score == trial.metrics.get_best_value("val_accuracy")
    top = max(trial.score for trial in trials)
    assert best in [trial.hyperparameters.values for trial in trials if trial.score == top]
    assert best["gamma"] == 0.0 and best["kd"] == "kl"

    config = best_distill_config(best)
    assert set(config) == {"alpha", "beta", "gamma", "temperature", "fa", "fa_norm"}
    assert json.loads(json.dumps(config)) == config
    assert 0.1 <= config["alpha"] <= 2.0
    assert config["temperature"] in (1.0, 2.0, 4.0, 8.0)
    assert config["fa"] == ("exact" if best["use_fa"] else None)
    if config["fa"] is not None:  # the default range: [d / 30, 10 d] around fro2's default d
        assert (
            options.DEFAULT_BETA["fro2"] / 30 <= config["beta"] <= options.DEFAULT_BETA["fro2"] * 10
        )
    student = quantize_model(teacher, weight_bits=None, activation_bits=4)
    distiller = Distiller(student, teacher, kd="kl", **config)
    assert (distiller.alpha, distiller.beta, distiller.gamma, distiller.fa) == (
        config["alpha"],
        config["beta"],
        config["gamma"],
        config["fa"],
    )


def test_hyperband_runs_and_restores_the_best_model(rng, tmp_path):
    teacher = tiny_teacher()
    images, _ = data(rng)
    val = data(rng)
    hypermodel = hypermodel_of(teacher, fa="fast", ffa_k=2, seed=2)
    # The tuner is used directly from keras-tuner, as a user would.
    tuner = keras_tuner.Hyperband(
        hypermodel,
        objective=keras_tuner.Objective("val_accuracy", "max"),
        max_epochs=2,
        factor=3,
        directory=str(tmp_path),
        project_name="hyperband",
        seed=int(rng.integers(2**31)),
    )
    tuner.search(images, batch_size=16, validation_data=val, verbose=0)
    trials = list(tuner.oracle.trials.values())
    check_completed_with_val_accuracy(tuner, trials=len(trials))
    assert trials
    best = tuner.get_best_hyperparameters(1)[0].values
    config = best_distill_config(best)
    assert config["fa"] in ("fast", None) and config["temperature"] == 1.0  # kd="mse": T fixed
    model = tuner.get_best_models(1)[0]
    assert isinstance(model, Distiller)
    assert model.predict(val[0], verbose=0).shape == (32, CLASSES)


def test_search_space_follows_the_options(rng):
    teacher = tiny_teacher()
    hp = keras_tuner.HyperParameters()
    hypermodel_of(
        teacher,
        kd="kl",
        alpha_range=(0.2, 3.0),
        beta_range=(0.05, 0.5),
        temperatures=[2, 4],
        label_free=False,
        gamma_range=(0.1, 0.9),
    ).declare_hyperparameters(hp)
    space = {h.name: h for h in hp.space}
    assert set(space) == {
        "kd",
        "fa_kind",
        "fa_norm",
        "alpha",
        "beta",
        "use_fa",
        "gamma",
        "temperature",
    }
    for name, low, high, sampling in [
        ("alpha", 0.2, 3.0, "log"),
        ("beta", 0.05, 0.5, "log"),
        ("gamma", 0.1, 0.9, "linear"),
    ]:
        h = space[name]
        assert isinstance(h, keras_tuner.engine.hyperparameters.Float)
        assert (h.min_value, h.max_value, h.sampling) == (low, high, sampling)
        for seed in rng.integers(2**31, size=20):
            assert low <= h.random_sample(int(seed)) <= high
    assert list(space["temperature"].values) == [2.0, 4.0]
    assert isinstance(space["use_fa"], keras_tuner.engine.hyperparameters.Boolean)

    # kd="mse", no FA switch, a fixed alpha: those are Fixed, not searched.
    hp = keras_tuner.HyperParameters()
    hypermodel_of(teacher, kd="mse", tune_fa=False, alpha_range=1.5).declare_hyperparameters(hp)
    fixed = {
        h.name: h.value for h in hp.space if isinstance(h, keras_tuner.engine.hyperparameters.Fixed)
    }
    assert fixed == {
        "kd": "mse",
        "fa_kind": "exact",
        "fa_norm": "fro2",
        "alpha": 1.5,
        "gamma": 0.0,
        "temperature": 1.0,
    }
    assert {h.name for h in hp.space} == set(fixed) | {"beta"}

    # The fixed Distiller arguments of a config's distill section (as the CLI passes them).
    distill = {
        "kd": "kl",
        "ffa_k": 3,
        "alpha": 9.0,
        "beta": None,
        "fa": None,
    }  # the searched ones are left out
    hypermodel = FAQDHyperModel.from_config(
        teacher,
        distill,
        lambda: quantize_model(teacher, weight_bits=None, activation_bits=4),
        student_layers=["stage1", "stage2"],
        teacher_layers=["stage1", "stage2"],
    )
    assert hypermodel.fa == "exact" and hypermodel.alpha_range == (0.1, 2.0)
    hp = keras_tuner.HyperParameters()
    hypermodel.declare_hyperparameters(hp)
    assert hp.values["kd"] == "kl" and list(
        next(h for h in hp.space if h.name == "temperature").values
    ) == [1.0, 2.0, 4.0, 8.0]
    assert hypermodel.distiller_kwargs(hp.values)["ffa_k"] == 3
    # ... or, deprecated, as one dict.
    with pytest.warns(DeprecationWarning, match="distiller_kwargs is deprecated"):
        assert (
            hypermodel_of(teacher, distiller_kwargs={"ffa_k": 3}).distiller_kwargs(hp.values)[
                "ffa_k"
            ]
            == 3
        )
    with pytest.raises(ValueError, match="tunes"):
        hypermodel_of(teacher, distiller_kwargs={"alpha": 1.0})
    with pytest.raises(ValueError, match="unknown keys"):
        hypermodel_of(teacher, distiller_kwargs={"epochs": 1})

    # A choice of norms: one beta per norm, each around its norm's default, under a condition.
    hp = keras_tuner.HyperParameters()
    both = hypermodel_of(teacher, fa_norm=["fro2", "l1"])
    both.declare_hyperparameters(hp)
    space = {h.name: h for h in hp.space}
    assert list(space["fa_norm"].values) == ["fro2", "l1"]
    for norm in ("fro2", "l1"):
        d = options.DEFAULT_BETA[norm]
        assert (space[f"beta_{norm}"].min_value, space[f"beta_{norm}"].max_value) == pytest.approx(
            (d / 30, 10 * d)
        )
    values = {"fa_norm": "l1", "beta_l1": 3.0, "fa_kind": "exact"}
    assert (
        both.distiller_kwargs(values)["beta"] == 3.0
        and both.distiller_kwargs(values)["fa_norm"] == "l1"
    )
    l1 = hypermodel_of(teacher, fa_norm="l1")
    hp = keras_tuner.HyperParameters()
    assert l1.build(hp).fa_norm == "l1" and hp.values["beta"] == options.DEFAULT_BETA["l1"]
    with pytest.raises(ValueError, match="fa_norm='l2' is not supported"):
        hypermodel_of(teacher, fa_norm=["fro2", "l2"])
    with pytest.raises(ValueError, match="fa_method='gram' evaluates fa_norm='fro2' only"):
        hypermodel_of(teacher, fa_norm="l1", fa_method="gram")

    with pytest.raises(ValueError, match="log scale"):
        hypermodel_of(teacher, alpha_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="low <= high"):
        hypermodel_of(teacher, beta_range=(1.0, 0.1))


def test_label_free_fixes_gamma_at_zero_and_build_compiles():
    teacher = tiny_teacher()
    hypermodel = hypermodel_of(teacher, gamma_range=(0.2, 0.8), label_free=True)
    hp = keras_tuner.HyperParameters()
    distiller = hypermodel.build(hp)
    assert hp.values["gamma"] == 0.0 and distiller.gamma == 0.0
    assert isinstance(distiller, Distiller) and distiller.built and distiller.compiled
    assert isinstance(distiller.optimizer, keras.optimizers.SGD) and distiller.optimizer.nesterov

    labeled = hypermodel_of(teacher, gamma_range=(0.2, 0.8), label_free=False)
    hp = keras_tuner.HyperParameters()
    distiller = labeled.build(hp)
    assert 0.2 <= hp.values["gamma"] <= 0.8 and distiller.gamma == hp.values["gamma"]


def test_trials_give_the_alphas_the_authors_decay():
    """As the CLI's distillation: alphas leave the decoupled decay and get weight_decay * 0.01 as L2."""
    teacher = tiny_teacher()
    decay = 5e-4
    hypermodel = hypermodel_of(
        teacher, optimizer_fn=lambda: keras.optimizers.SGD(0.01, weight_decay=decay)
    )
    distiller = hypermodel.build(keras_tuner.HyperParameters())
    relus = [layer for layer in distiller.student.layers if isinstance(layer, QuantReLU)]
    assert len(relus) == 2
    for layer in relus:
        assert isinstance(layer.alpha_regularizer, keras.regularizers.L2)
        assert layer.alpha_regularizer.l2 == pytest.approx(
            decay * quantizers.ALPHA_DECAY_FACTOR / 2
        )
    # One step of zero gradients: only the decoupled decay moves the variables; not the alphas.
    kernel = distiller.student.get_layer("conv1").kernel
    before = [v.numpy() for v in (kernel, relus[0].alpha)]
    distiller.optimizer.apply_gradients([(tf.zeros_like(v), v) for v in (kernel, relus[0].alpha)])
    np.testing.assert_allclose(kernel.numpy(), before[0] * (1 - 0.01 * decay), rtol=1e-6)
    np.testing.assert_array_equal(relus[0].alpha.numpy(), before[1])
    # Without weight decay nothing changes.
    plain = hypermodel_of(teacher, optimizer_fn=lambda: keras.optimizers.SGD(0.01)).build(
        keras_tuner.HyperParameters()
    )
    assert all(
        layer.alpha_regularizer is None
        for layer in plain.student.layers
        if isinstance(layer, QuantReLU)
    )


def test_best_distill_config_and_search_arguments(rng, tmp_path):
    assert best_distill_config(
        {"alpha": 2, "beta": 0.5, "use_fa": True, "fa_kind": "fast", "tuner/epochs": 3}
    ) == {
        "alpha": 2.0,
        "beta": 0.5,
        "gamma": 0.0,
        "temperature": 1.0,
        "fa": "fast",
        "fa_norm": "fro2",
    }
    assert best_distill_config({"beta": 0.5, "use_fa": False})["fa"] is None
    assert best_distill_config({"fa_kind": "none", "beta": 0.5}) == {
        "alpha": 1.0,
        "beta": 0.0,
        "gamma": 0.0,
        "temperature": 1.0,
        "fa": None,
        "fa_norm": "fro2",
    }
    assert (
        best_distill_config({"fa_kind": "exact", "fa_norm": "l1"})["beta"]
        == options.DEFAULT_BETA["l1"]
    )
    hp = keras_tuner.HyperParameters()
    hp.Fixed("alpha", 0.7)
    assert best_distill_config(hp)["alpha"] == 0.7

    teacher = tiny_teacher()
    hypermodel = hypermodel_of(teacher, fa=None)
    hp = keras_tuner.HyperParameters()
    assert hypermodel.build(hp).fa is None and "use_fa" not in hp.values and "beta" not in hp.values
    images, _ = data(rng, n=4)
    with pytest.raises(ValueError, match="must carry labels"):
        search(hypermodel, images, images, directory=str(tmp_path))
    with pytest.raises(ValueError, match="tuner="):
        search(hypermodel, images, (images, np.zeros(4)), tuner="grid", directory=str(tmp_path))


def test_a_trial_scores_its_student_after_bn_recalibration(rng, tmp_path):
    """With `recalibrate_images`, a trial ends with its student's BatchNormalization statistics those
    of the images (float64 NumPy at the first layer), and its score is the validation accuracy of
    that student, computed by hand."""
    teacher = tiny_teacher()
    images, _ = data(rng)
    val_images, val_labels = data(rng)
    calibration = rng.normal(1.0, 2.0, size=(24, 12, 12, 3)).astype(
        np.float32
    )  # far from the training images
    hypermodel = hypermodel_of(teacher, seed=3, recalibrate_images=calibration)
    trained = []
    fit = hypermodel.fit
    hypermodel.fit = lambda hp, model, *args, **kwargs: (
        trained.append(model),
        fit(hp, model, *args, **kwargs),
    )[1]
    _, tuner = search(
        hypermodel,
        images,
        (val_images, val_labels),
        max_trials=1,
        epochs=1,
        batch_size=16,
        directory=str(tmp_path),
        project_name="recal",
        seed=int(rng.integers(2**31)),
    )
    (trial,) = tuner.oracle.trials.values()
    student = trained[0].student
    bn1 = student.get_layer("bn1")
    u = np.asarray(keras.Model(student.input, bn1.input)(calibration, training=False), np.float64)
    np.testing.assert_allclose(
        bn1.moving_mean.numpy(), u.reshape(-1, u.shape[-1]).mean(0), rtol=1e-4, atol=1e-5
    )
    accuracy = np.mean(np.argmax(student.predict(val_images, verbose=0), axis=1) == val_labels)
    assert trial.score == pytest.approx(accuracy, abs=1e-6)


def test_recalibration_images_that_do_not_fit_the_teacher_are_refused_at_once(rng):
    teacher = tiny_teacher()
    with pytest.raises(ValueError, match=r"images have shape \(8, 8, 3\) .* takes \(12, 12, 3\)"):
        hypermodel_of(teacher, recalibrate_images=rng.normal(size=(4, 8, 8, 3)))
