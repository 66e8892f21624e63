"""Distribution strategies for `fit`: one device, `MirroredStrategy` and multi-worker training.

Multi-worker training uses TensorFlow's own engine, `tf.distribute.MultiWorkerMirroredStrategy`,
configured by the ``TF_CONFIG`` environment variable of each worker process (the cluster's
``host:port`` list and this process's task). Every worker runs the same program on the same data
pipeline; `fit` shards each global batch across the workers and all-reduces the gradients, so all
workers hold the same weights after every step.

Keras 3's `fit` does not run under `tf.distribute.MultiWorkerMirroredStrategy` as TensorFlow ships it
(keras-team/keras#20585): it calls ``strategy.reduce`` on a tuple of per-replica batches and with
``axis=0`` on per-replica scalars, which the multi-worker strategy rejects. `MultiWorkerMirroredStrategy`
below reduces each element of a structure on its own, and scalars without an axis; everything else
is TensorFlow's.

The strategy must exist before TensorFlow runs its first operation (collective ops are configured
at start-up), so create it first:

```python
import os, json
os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["host1:2222", "host2:2222"]},
                                      "task": {"type": "worker", "index": 0}})
strategy = get_strategy("multi_worker")
with strategy.scope():
    ...  # build and compile the models, then fit as usual
```
"""

import functools
import json
import os

import tensorflow as tf

from faqd_tf.names import STRATEGIES


class MultiWorkerMirroredStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`tf.distribute.MultiWorkerMirroredStrategy` whose `reduce` takes what Keras 3's `fit` passes."""

    def reduce(self, reduce_op, value, axis):
        def one(v):
            if v is None:  # a log entry with no value yet (a metric never updated, e.g. label-free)
                return None
            local = (
                self.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues)
                else v
            )
            # A per-replica scalar (a metric) has no axis 0; its mean over replicas is the reduction.
            scalar = getattr(getattr(local, "shape", None), "rank", None) == 0
            return super(MultiWorkerMirroredStrategy, self).reduce(
                reduce_op, v, None if scalar else axis
            )

        return tf.nest.map_structure(one, value)


def tf_config() -> dict | None:
    """The parsed ``TF_CONFIG`` environment variable, or None when it is not set.

    Raises ValueError (one line) when it is not a JSON object with ``cluster`` and ``task``.
    """
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}); see the README's multi-worker section."
        ) from None
    if (
        not isinstance(config, dict)
        or not isinstance(config.get("cluster"), dict)
        or not isinstance(config.get("task"), dict)
    ):
        raise ValueError(
            'TF_CONFIG needs "cluster" (job name -> list of host:port) and "task" ({"type": ..., "index": ...}).'
        )
    task = config["task"]
    jobs = config["cluster"]
    if (
        task.get("type") not in jobs
        or not isinstance(task.get("index"), int)
        or not 0 <= task["index"] < len(jobs[task["type"]])
    ):
        raise ValueError(
            f"TF_CONFIG task {json.dumps(task)} is not in its cluster {json.dumps(jobs)}."
        )
    return config


@functools.cache
def _mirrored() -> tf.distribute.MirroredStrategy:
    # One per process: a second MirroredStrategy reuses the first one's collective instance keys, and
    # its first all-reduce of a differently shaped tensor then fails with "Shape mismatch in the
    # collective instance 100" (tensorflow/tensorflow#62790): two runs in one Python process (a
    # notebook, cli.main called twice) would break.
    return tf.distribute.MirroredStrategy()


def get_strategy(kind: str = "default") -> tf.distribute.Strategy:
    """`"default"` (one device), `"mirrored"` (all local GPUs; one strategy per process, shared by
    every call) or `"multi_worker"` (TF_CONFIG)."""
    if kind == "mirrored":
        return _mirrored()
    if kind == "multi_worker":
        if tf_config() is None:
            raise ValueError(
                'strategy "multi_worker" needs the TF_CONFIG environment variable (cluster and task of this worker); '
                "see the README's multi-worker section."
            )
        return MultiWorkerMirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"strategy={kind!r} is not supported; use one of {', '.join(STRATEGIES)}.")


def task(strategy: tf.distribute.Strategy) -> tuple[str, int]:
    """(type, index) of this process in its cluster; ("chief", 0) outside multi-worker training."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "chief", 0
    return resolver.task_type, int(resolver.task_id or 0)


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """True for the one process that writes a run's outputs: the chief, or worker 0 without one."""
    task_type, index = task(strategy)
    if task_type == "chief":
        return True
    resolver = getattr(strategy, "cluster_resolver", None)
    has_chief = resolver is not None and "chief" in resolver.cluster_spec().as_dict()
    return task_type == "worker" and index == 0 and not has_chief


def output_dir(base: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes: `base` for the chief, ``base/workers/<type>_<index>`` otherwise.

    Every worker saves its models, history and backups (its own BackupAndRestore state) in a folder
    of its own, so no two processes write one file.
    """
    if is_chief(strategy):
        return base
    task_type, index = task(strategy)
    return os.path.join(base, "workers", f"{task_type}_{index}")


def barrier(strategy: tf.distribute.Strategy) -> None:
    """Returns when every worker has reached it (an all-reduce); a no-op on one process."""
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return
    value = strategy.run(lambda: tf.constant(1.0))
    total = strategy.reduce("SUM", value, axis=None)
    if int(total) != strategy.num_replicas_in_sync:
        raise RuntimeError(
            f"barrier: {int(total)} of {strategy.num_replicas_in_sync} replicas answered."
        )
