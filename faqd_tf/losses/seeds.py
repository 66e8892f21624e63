"""The seeding rule of the FFA probes (`probe_seed`), and the stateless seed of one call."""

import zlib

import tensorflow as tf

from faqd_tf import options

_default_generator = None


def _module_generator():
    """A generator private to this module, for `seed=None`: the global TF and NumPy states stay untouched."""
    global _default_generator
    if _default_generator is None:
        with tf.init_scope():
            _default_generator = tf.random.Generator.from_non_deterministic_state()
    return _default_generator


def probe_seed(seed, *counters):
    """The stateless seed of a set of FFA probes: the package's one seeding rule.

    Every owner of seeded probes (the `Distiller`, `FastFeatureAffinity`, Keras's Distiller through
    `faqd_tf.keras_distillation.FeatureAffinityDistillation`) draws the probes of a call from
    `probe_seed(seed, tap, step)`: the int `seed` as the stateless seed `(seed mod 2^31, 0)`, folded
    (`tf.random.experimental.stateless_fold_in`) with `tap`, the tapped layer pair's `tap_key`, then
    with `step`, the training step (the optimizer's iterations) or, for a loss object, its count of
    calls. So a seed replays a run, and every tap and every step gets fresh probes; under a strategy of
    several replicas, each replica also folds in its replica id (`fast_feature_affinity_per_sample`).
    An owner given no seed draws one from the operating system once, when it is made.

    >>> import numpy as np
    >>> bool(np.all(probe_seed(3, 1, 7).numpy() == probe_seed(3, 1, 7).numpy()))
    True
    >>> bool(np.any(probe_seed(3, 1, 7).numpy() != probe_seed(3, 1, 8).numpy()))
    True
    >>> probe_seed(3).numpy().tolist()  # no counters: the plain int seed
    [3, 0]
    """
    seed = options.check_seed(seed)
    if seed is None:
        raise ValueError(
            "probe_seed needs an int seed; an owner given none draws one with options.fresh_seed()."
        )
    stateless = tf.constant([seed % (2**31), 0], tf.int64)
    for counter in counters:
        # Philox by name: the default is Philox on CPU and GPU but ThreeFry under XLA, and a step
        # compiled with jit_compile=True would fold to other seeds.
        stateless = tf.random.experimental.stateless_fold_in(
            stateless, tf.cast(counter, tf.int64), alg="philox"
        )
    return stateless


def tap_key(teacher_layer, student_layer):
    """The `tap` of `probe_seed` for a tapped pair: a checksum of the two layer names (an int < 2^31).

    >>> tap_key("stage1", "stage1") == tap_key("stage1", "stage1") != tap_key("stage2", "stage2")
    True
    """
    return zlib.crc32(f"{teacher_layer}\x00{student_layer}".encode()) % (2**31)


def stateless_seed(seed):
    """A shape-(2,) int64 stateless seed from None, an int, a (2,) seed tensor or a Generator."""
    if seed is None:
        seed = _module_generator()
    if isinstance(seed, tf.random.Generator):
        seed = seed.make_seeds(1)[:, 0]
    elif options.is_integer(seed):
        seed = probe_seed(int(seed))
    else:
        seed = tf.convert_to_tensor(seed)
        if seed.shape != (2,) or not seed.dtype.is_integer:
            raise ValueError(
                f"seed must be None, an int, a shape-(2,) integer tensor or a tf.random.Generator, "
                f"got {seed!r}."
            )
    seed = tf.cast(seed, tf.int64)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        # Replicas see different samples but would otherwise draw identical probes.
        seed = tf.random.experimental.stateless_fold_in(
            seed, context.replica_id_in_sync_group, alg="philox"
        )
    return seed


class ProbeCounter:
    """The probe seeds of a loss object that sees no training step: `probe_seed(seed, tap, calls)`,
    `calls` counting this object's calls (a variable made on first use, outside any `tf.function`).

    >>> import numpy as np
    >>> counter = ProbeCounter(5)
    >>> first, second = counter.next_seed(0).numpy(), counter.next_seed(0).numpy()
    >>> bool(np.all(first == probe_seed(5, 0, 0).numpy())), bool(np.all(second == probe_seed(5, 0, 1).numpy()))
    (True, True)
    """

    def __init__(self, seed=None):
        self.seed = options.fresh_seed() if seed is None else options.check_seed(seed)
        self._calls = None

    def next_seed(self, tap):
        if self._calls is None:
            with tf.init_scope():
                self._calls = tf.Variable(0, dtype=tf.int64, trainable=False, name="probe_calls")
        return probe_seed(self.seed, tap, self._calls.assign_add(1) - 1)
