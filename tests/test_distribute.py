"""faqd_tf.distribute: strategies by name, TF_CONFIG, the chief and its output folder.

Real worker processes run in tests/test_multi_worker.py.
"""

import json

import keras
import numpy as np
import pytest

from faqd_tf import distribute


def test_strategy_choices_and_tf_config_errors(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="needs the TF_CONFIG environment variable"):
        distribute.get_strategy("multi_worker")
    with pytest.raises(ValueError, match="strategy='ring' is not supported"):
        distribute.get_strategy("ring")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ValueError, match="TF_CONFIG is not valid JSON"):
        distribute.tf_config()
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}),
    )
    with pytest.raises(ValueError, match="is not in its cluster"):
        distribute.tf_config()
    default = distribute.get_strategy("default")
    assert distribute.is_chief(default) and distribute.output_dir("out", default) == "out"
    distribute.barrier(default)  # no-op on one process


class _Resolver:
    """What `distribute` reads of a multi-worker strategy's cluster resolver."""

    def __init__(self, cluster, task_type, task_id):
        self.cluster, self.task_type, self.task_id = cluster, task_type, task_id

    def cluster_spec(self):
        import tensorflow as tf

        return tf.train.ClusterSpec(self.cluster)


class _Strategy:
    def __init__(self, cluster, task_type, task_id):
        self.cluster_resolver = _Resolver(cluster, task_type, task_id)


@pytest.mark.parametrize(
    "cluster, task, chief, out",
    [
        ({"worker": ["a:1", "b:1"]}, ("worker", 0), True, "base"),
        ({"worker": ["a:1", "b:1"]}, ("worker", 1), False, "base/workers/worker_1"),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("worker", 0), False, "base/workers/worker_0"),
        ({"chief": ["c:1"], "worker": ["a:1"]}, ("chief", 0), True, "base"),
    ],
)
def test_one_writer_per_cluster_and_a_folder_per_other_worker(cluster, task, chief, out):
    strategy = _Strategy(cluster, *task)
    assert distribute.task(strategy) == task
    assert distribute.is_chief(strategy) is chief
    assert distribute.output_dir("base", strategy) == out


def test_one_process_strategies_are_the_chief(mirrored_strategy):
    for strategy in (mirrored_strategy, distribute.get_strategy("default")):
        assert distribute.task(strategy) == ("chief", 0) and distribute.is_chief(strategy)


def test_runs_one_after_another_share_the_mirrored_strategy(mirrored_strategy, rng):
    """Two fits of different shapes in one process, as two `cli.main` runs with strategy "mirrored"
    make them: with a second MirroredStrategy the second fit's all-reduce fails (tensorflow#62790)."""
    assert distribute.get_strategy("mirrored") is mirrored_strategy
    for width in (8, 16):
        with distribute.get_strategy("mirrored").scope():
            model = keras.Sequential(
                [
                    keras.Input((4,)),
                    keras.layers.Dense(width),
                    keras.layers.BatchNormalization(),
                    keras.layers.Dense(2),
                ]
            )
            model.compile("sgd", "mse")
        history = model.fit(
            rng.random((32, 4), np.float32),
            rng.random((32, 2), np.float32),
            batch_size=8,
            verbose=0,
        )
        assert np.isfinite(history.history["loss"][0])


def test_tf_config_parses(monkeypatch):
    config = {"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}
    monkeypatch.setenv("TF_CONFIG", json.dumps(config))
    assert distribute.tf_config() == config
    monkeypatch.setenv("TF_CONFIG", "  ")
    assert distribute.tf_config() is None
