"""faqd_tf.training: the optimizer of a config, and a model save a kill cannot leave half-written."""

import io
import os

import keras
import numpy as np
import pytest

from faqd_tf import config, training


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("weight_decay", [0, 0.0, 5e-4])
def test_make_optimizer_every_optimizer_and_weight_decay(kind, weight_decay):
    # JSON integers (0) are valid numbers in the config; Keras wants floats.
    train = config.resolve_section(
        "train",
        {"optimizer": kind, "lr": 0.05, "epochs": 2, "weight_decay": weight_decay, "momentum": 0},
    )
    opt = training.make_optimizer(train, steps_per_epoch=10)
    assert type(opt).__name__ == {"sgd": "SGD", "adam": "AdamW"}[kind]
    # Cosine from lr to 0 over epochs * steps: 0.05 * (1 + cos(pi * t / 20)) / 2.
    schedule = opt._learning_rate
    assert [float(schedule(t)) for t in (0, 10, 20)] == pytest.approx([0.05, 0.025, 0.0], abs=1e-7)
    assert (opt.weight_decay or 0.0) == pytest.approx(weight_decay)


def test_warmup_then_cosine():
    train = config.resolve_section("train", {"lr": 0.1, "epochs": 4, "warmup_epochs": 1})
    schedule = training.make_optimizer(train, steps_per_epoch=5)._learning_rate
    # Linear warmup 0 -> 0.1 over 5 steps, then cosine to 0 over the other 15.
    expected = [0.1 * t / 5 for t in range(5)] + [
        0.05 * (1 + np.cos(np.pi * (t - 5) / 15)) for t in range(5, 21)
    ]
    assert [float(schedule(t)) for t in range(21)] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_global_clipnorm_bounds_the_step(kind, rng):
    """One step from zero state: plain SGD moves by lr * g; clipped, by lr * g * c / |g|."""
    train = config.resolve_section(
        "train",
        {
            "optimizer": kind,
            "lr": 0.1,
            "epochs": 1,
            "schedule": "constant",
            "weight_decay": 0,
            "momentum": 0,
            "nesterov": False,
            "global_clipnorm": 2,
        },
    )
    opt = training.make_optimizer(train, steps_per_epoch=1)
    assert opt.global_clipnorm == 2.0
    assert training.make_optimizer(config.resolve_section("train", {}), 1).global_clipnorm is None
    if kind == "sgd":
        w = keras.Variable(rng.normal(size=(5,)).astype("float32"))
        g = (10 * rng.normal(size=(5,))).astype("float32")  # |g| well above 2
        before = w.numpy().copy()
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), w)])
        np.testing.assert_allclose(
            w.numpy(), before - 0.1 * g * 2 / np.linalg.norm(g.astype(np.float64)), rtol=1e-5
        )


@pytest.mark.parametrize("bad", [0, -1, "20", True, 1e9])
def test_global_clipnorm_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="global_clipnorm"):
        config.resolve_section("train", {"global_clipnorm": bad})


def test_save_model_is_atomic(tmp_path, rng, monkeypatch):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "m.keras")
    training.save_model(model, path)
    x = rng.normal(size=(4, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.models.load_model(path, safe_mode=True).predict(x, verbose=0),
        model.predict(x, verbose=0),
        rtol=1e-6,
    )

    # A save that dies half-way leaves the previous file whole and no model at a new path.
    before = open(path, "rb").read()

    def dies(self, filepath, *args, **kwargs):
        open(filepath, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save", dies)
    for target in (path, str(tmp_path / "new.keras")):
        with pytest.raises(KeyboardInterrupt):
            training.save_model(model, target)
    assert open(path, "rb").read() == before
    assert not os.path.exists(tmp_path / "new.keras")
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_progress_is_a_bar_in_a_terminal_and_a_line_per_epoch_elsewhere(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert training.progress_verbosity(Terminal()) == 1
    assert training.progress_verbosity(io.StringIO()) == 2
    with open(tmp_path / "log.txt", "w") as log:
        assert training.progress_verbosity(log) == 2
