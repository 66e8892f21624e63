"""faqd_tf.compat: the private Keras API it wraps still does what it needs, and another Keras is refused."""

import json
import warnings

import keras
import numpy as np
import pytest

from faqd_tf import compat
from tests.helpers import assert_one_line_exit_2


@pytest.mark.parametrize("version", ["3.12.0", "3.13.2", "3.15.1", "3.15.0rc1"])
def test_verified_versions_pass(version, monkeypatch):
    monkeypatch.delenv(compat.ESCAPE_HATCH, raising=False)
    assert compat.check_keras_version(version) == version


@pytest.mark.parametrize("version", ["3.11.3", "3.16.0", "4.0.0", "2.15.0", "nightly"])
def test_other_versions_fail_in_one_line(version, monkeypatch):
    monkeypatch.delenv(compat.ESCAPE_HATCH, raising=False)
    with pytest.raises(compat.KerasVersionError) as info:
        compat.check_keras_version(version)
    message = str(info.value)
    assert (
        "\n" not in message
        and f"this Keras {version}" in message
        and compat.ESCAPE_HATCH in message
    )


def test_escape_hatch_warns_instead(monkeypatch):
    monkeypatch.setenv(compat.ESCAPE_HATCH, "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compat.check_keras_version("3.16.0") == "3.16.0"
    assert len(caught) == 1 and "trying anyway" in str(caught[0].message)


def test_installed_keras_is_verified():
    assert compat.check_keras_version() == keras.__version__


def test_cli_refuses_an_unverified_keras_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(compat.ESCAPE_HATCH, raising=False)
    monkeypatch.setattr(keras, "__version__", "3.99.0")
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {"dataset": {"source": f"idx:{tmp_path / 'data'}"}, "output_dir": str(tmp_path / "out")}
        )
    )
    assert_one_line_exit_2(
        ["--config", str(config)],
        r"verified on Keras 3\.12 to 3\.15, not on this Keras 3\.99\.0",
        capsys,
        tmp_path / "out",
    )


def _model():
    return keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])


def test_compiled_metrics_and_strategy_of_a_model(mirrored_strategy):
    model = _model()
    assert compat.compiled_metrics(model) is None and not compat.created_under_strategy(model)
    model.compile("sgd", "mse", metrics=["mae"])
    compiled = compat.compiled_metrics(model)
    assert compiled is not None and not compiled.built
    with mirrored_strategy.scope():
        assert compat.created_under_strategy(_model())


def test_weights_bytes_are_the_save_weights_file(tmp_path, rng):
    model = _model()
    model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    model.fit(rng.normal(size=(8, 3)), rng.normal(size=(8, 2)), verbose=0)  # optimizer state too
    path = tmp_path / "m.weights.h5"
    path.write_bytes(compat.weights_bytes(model))
    fresh = _model()
    fresh.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    fresh.optimizer.build(fresh.trainable_variables)
    fresh.load_weights(path)
    for a, b in zip(
        model.weights + model.optimizer.variables, fresh.weights + fresh.optimizer.variables
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_backup_and_restore_names_and_hooks(tmp_path):
    backup = compat.BackupAndRestore(str(tmp_path), double_checkpoint=True)
    (weights, meta), (prev_weights, prev_meta) = backup.generations()
    assert (weights, meta) == (
        str(tmp_path / "latest.weights.h5"),
        str(tmp_path / "training_metadata.json"),
    )
    assert (prev_weights, prev_meta) == (weights + ".bkp", meta + ".bkp")
    assert backup.position() == (0, 0)
    with backup.restoring_from("a.weights.h5", "a.json"):
        assert backup.generations()[0] == ("a.weights.h5", "a.json")
    assert backup.generations()[0] == (weights, meta)
    written = []
    backup.write_backup = lambda: written.append(backup.position())
    backup.set_model(_model())
    backup.on_epoch_end(0)  # Keras's own hook calls write_backup
    assert written == [(1, 0)]


@pytest.mark.parametrize("size", ["known", "unknown"])
def test_fit_iterators_before_matches_what_fit_does(size):
    """Epoch e of a `fit` sees the data of a fresh `fit` that starts after `fit_iterators_before(e)`
    iterators were made (what `callbacks.ResumeDataOrder` relies on)."""
    import tensorflow as tf

    seen = []

    class Recording(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(1)

        def call(self, x):
            return self.dense(x)

        def train_step(self, data):
            tf.py_function(lambda x: seen.append(x.numpy()[:, 0].astype(int).tolist()), [data], [])
            return {"steps": tf.constant(1.0)}

    def fit(epochs, skip=0):
        ds = tf.data.Dataset.range(12).map(lambda i: tf.cast(tf.reshape(i, [1]), tf.float32))
        if size == "unknown":
            ds = ds.filter(lambda x: True)
        ds = ds.shuffle(12, seed=3, reshuffle_each_iteration=True).batch(4)
        for _ in range(compat.fit_iterators_before(skip, ds)):
            iter(ds)
        model = Recording()
        model(np.zeros((1, 1), np.float32))
        model.compile("sgd")
        seen.clear()
        model.fit(ds, epochs=epochs, verbose=0)
        return [seen[i : i + 3] for i in range(0, len(seen), 3)]

    whole = fit(3)
    assert len(whole) == 3 and whole[0] != whole[1] != whole[2]
    for epoch in (1, 2):
        assert fit(1, skip=epoch) == [whole[epoch]]
