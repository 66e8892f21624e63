"""The losses as Keras loss objects: `y_true` is the teacher's, `y_pred` the student's.

Saved models name them by their registered names (`faqd_tf>FeatureAffinity`,
`faqd_tf>FastFeatureAffinity`, `faqd_tf>KDLoss`), which therefore never change.
"""

import keras

from faqd_tf import options
from faqd_tf.losses.affinity import feature_affinity_per_sample
from faqd_tf.losses.fast import fast_feature_affinity_per_sample
from faqd_tf.losses.kd import kd_loss_per_sample
from faqd_tf.losses.seeds import ProbeCounter


@keras.saving.register_keras_serializable(package="faqd_tf")
class FeatureAffinity(keras.losses.Loss):
    """Feature affinity loss as a Keras loss: `y_true` is the teacher's map, `y_pred` the student's.

    Args:
        method: `"auto"`, `"pairwise"` or `"gram"` (see `feature_affinity_per_sample`).
        fa_norm: `"fro2"` (eq. 6) or `"l1"` (the authors' code).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> float(FeatureAffinity(fa_norm="l1")(x, x))
    0.0
    """

    def __init__(
        self,
        method="auto",
        fa_norm="fro2",
        name="feature_affinity",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        options.check_fa_method(method, fa_norm, name="method")  # and fa_norm
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.method = method
        self.fa_norm = fa_norm

    def call(self, y_true, y_pred):
        return feature_affinity_per_sample(y_true, y_pred, method=self.method, fa_norm=self.fa_norm)

    def get_config(self):
        return {
            **super().get_config(),
            "method": self.method,
            "fa_norm": self.fa_norm,
            "dtype": self.dtype,
        }


@keras.saving.register_keras_serializable(package="faqd_tf")
class FastFeatureAffinity(keras.losses.Loss):
    """Fast feature affinity (eq. 15) as a Keras loss: `y_true` is the teacher's map, `y_pred` the student's.

    Every call draws fresh probes, from `probe_seed(seed, 0, calls)` with `calls` the loss's own
    count of calls, so a given seed replays the same sequence and the global random state is never
    touched; `seed=None` draws a seed once, when the loss is made.

    Args:
        k: number of random probes, >= 1.
        seed: int or None.
        fa_norm: `"fro2"` or `"l1"` (see `fast_feature_affinity_per_sample`).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> y = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> a = float(FastFeatureAffinity(k=5, seed=3)(x, y))
    >>> b = float(FastFeatureAffinity(k=5, seed=3)(x, y))
    >>> a == b
    True
    """

    def __init__(
        self,
        k=15,
        seed=None,
        fa_norm="fro2",
        name="fast_feature_affinity",
        reduction="sum_over_batch_size",
        dtype=None,
    ):
        self.k = options.check_k(k)
        self.seed = options.check_seed(seed)
        self.fa_norm = options.check_fa_norm(fa_norm)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._probes = ProbeCounter(self.seed)

    def call(self, y_true, y_pred):
        return fast_feature_affinity_per_sample(
            y_true, y_pred, k=self.k, seed=self._probes.next_seed(0), fa_norm=self.fa_norm
        )

    def get_config(self):
        return {
            **super().get_config(),
            "k": self.k,
            "seed": self.seed,
            "fa_norm": self.fa_norm,
            "dtype": self.dtype,
        }


@keras.saving.register_keras_serializable(package="faqd_tf")
class KDLoss(keras.losses.Loss):
    """Knowledge distillation on logits as a Keras loss: `y_true` is the teacher's, `y_pred` the student's.

    Args:
        kd: `"mse"` (raw logits) or `"kl"` (`KL(softmax(t/T) || softmax(s/T)) * T^2`).
        temperature: `T > 0` (KL only).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Example:

    >>> float(KDLoss("mse")([[1.0, 2.0]], [[1.0, 4.0]]))
    2.0
    """

    def __init__(
        self, kd="mse", temperature=1.0, name="kd_loss", reduction="sum_over_batch_size", dtype=None
    ):
        options.check_kd(kd)
        self.temperature = options.check_temperature(temperature)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.kd = kd

    def call(self, y_true, y_pred):
        return kd_loss_per_sample(y_true, y_pred, kd=self.kd, temperature=self.temperature)

    def get_config(self):
        return {
            **super().get_config(),
            "kd": self.kd,
            "temperature": self.temperature,
            "dtype": self.dtype,
        }
