"""Distillation losses of FAQD: feature affinity (exact and fast) and KD on logits.

Feature affinity (eq. 6 of arXiv 2302.10899): each pixel's channel vector is normalized to unit
length, `F` in R^{N x C} with `N = H * W`, `S = F F^T` holds the N x N pixel cosines, and the loss
of one sample is `||S_T - S_S||_F^2 / N^2`. Teacher and student may differ in channels; a teacher
map with another H, W is first resized (bilinear) to the student's.

Three exact evaluations:

- `"pairwise"` forms the N x N difference: O(N^2 C) time, O(N^2) memory.
- `"gram"` uses `||A A^T - B B^T||^2 = ||A^T A||^2 - 2 ||A^T B||^2 + ||B^T B||^2`:
  O(N C^2) time, O(C^2) memory. The three terms are ~N^2/C while the loss of a nearly converged
  student is orders of magnitude smaller, so they are formed in float64.
- `"auto"` picks the cheaper one for the static shape (gram when the shape is unknown).

Fast feature affinity (eqs. 14-15) is an unbiased estimate with k Gaussian probes, O(k N C).

Example:

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
>>> float(feature_affinity(x, x))
0.0
"""

import numbers

import keras
import numpy as np
import tensorflow as tf

METHODS = ("auto", "pairwise", "gram")
KD_KINDS = ("mse", "kl")
# Guards the squared norm of an all-zero channel vector (dead ReLU pixel); such a pixel maps to the
# zero vector instead of NaN.
NORM_EPSILON = 1e-12
# Cost model of "auto", fitted to forward+backward timings on a 2-core CPU (C in 16..128, N in
# 16..576): a float64 multiply-add of the gram form costs about GRAM_COST_FACTOR float32 ones of
# the pairwise form, and each of the N^2 pairwise entries costs about PAIRWISE_ENTRY_COST more
# (memory-bound squares and sums, forward and backward). Crossover: N ~ 1.5 C.
GRAM_COST_FACTOR = 1.5
PAIRWISE_ENTRY_COST = 64.0


# --------------------------------------------------------------------------------------- checks


def _check_method(method, p):
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; use one of {', '.join(METHODS)}.")
    if p not in (1, 2):
        raise ValueError(f"p={p!r} is not supported; use 1 (L1, authors' code) or 2 (eq. 6).")
    if p == 1 and method == "gram":
        raise ValueError("p=1 needs method='pairwise' (or 'auto'); the gram form is exact for p=2 only.")


def check_seed(seed):
    """`seed` as an int, or None; anything else is a one-line ValueError."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
        raise ValueError(f"seed={seed!r} is not supported; use an int or None.")
    return None if seed is None else int(seed)


def _check_k(k):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r} is not supported; use an integer >= 1 (number of random probes).")
    return int(k)


def _as_float_tensor(x):
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    return x


def _check_maps(teacher_map, student_map):
    teacher_map = _as_float_tensor(teacher_map)
    student_map = _as_float_tensor(student_map)
    for name, x in (("teacher_map", teacher_map), ("student_map", student_map)):
        if x.shape.rank != 4:
            raise ValueError(f"{name} must be 4-D (batch, height, width, channels), got shape {x.shape}.")
    bt, bs = teacher_map.shape[0], student_map.shape[0]
    if bt is not None and bs is not None and bt != bs:
        raise ValueError(
            f"teacher_map and student_map must have the same batch size, got {bt} and {bs}."
        )
    return teacher_map, student_map


def _check_logits(teacher_logits, student_logits):
    teacher_logits = _as_float_tensor(teacher_logits)
    student_logits = _as_float_tensor(student_logits)
    for name, x in (("teacher_logits", teacher_logits), ("student_logits", student_logits)):
        if x.shape.rank != 2:
            raise ValueError(f"{name} must be 2-D (batch, classes), got shape {x.shape}.")
    if not teacher_logits.shape.is_compatible_with(student_logits.shape):
        raise ValueError(
            f"teacher_logits and student_logits must have the same shape, got "
            f"{teacher_logits.shape} and {student_logits.shape}."
        )
    return teacher_logits, student_logits


# ------------------------------------------------------------------------------- preprocessing


def _align(teacher_map, student_map):
    """Both maps in float32 (half-precision inputs too), the teacher resized to the student's H, W."""
    teacher_map = tf.cast(teacher_map, tf.float32)
    student_map = tf.cast(student_map, tf.float32)
    t_hw, s_hw = teacher_map.shape[1:3], student_map.shape[1:3]
    if t_hw.is_fully_defined() and s_hw.is_fully_defined():
        if t_hw != s_hw:
            teacher_map = tf.image.resize(teacher_map, s_hw, method="bilinear")
    else:
        # Unknown at trace time: resizing to the same size is the identity, so always resizing is safe.
        teacher_map = tf.image.resize(teacher_map, tf.shape(student_map)[1:3], method="bilinear")
    return teacher_map, student_map


@tf.custom_gradient
def _unit_rows64(x):
    """Unit rows in float64 of a float32 (batch, N, C) tensor.

    Written out by hand: differentiating `tf.math.l2_normalize` costs about twice as many float64
    passes over the maps, and exact FA is dominated by them at large N.
    """
    x64 = tf.cast(x, tf.float64)
    squared = tf.reduce_sum(tf.square(x64), axis=-1, keepdims=True)
    inv_norm = tf.math.rsqrt(tf.maximum(squared, NORM_EPSILON))
    unit = x64 * inv_norm

    def grad(upstream):
        radial = unit * tf.reduce_sum(unit * upstream, axis=-1, keepdims=True)
        # Below the epsilon the scale is a constant, so nothing is projected out.
        radial = tf.where(squared > NORM_EPSILON, radial, tf.zeros_like(radial))
        return tf.cast(inv_norm * (upstream - radial), x.dtype)

    return unit, grad


def _pixels(x, dtype):
    """(batch, H, W, C) float32 -> (batch, N, C) unit channel vectors in `dtype`."""
    shape = tf.shape(x)
    channels = x.shape[-1] if x.shape[-1] is not None else shape[-1]
    x = tf.reshape(x, [shape[0], shape[1] * shape[2], channels])
    if dtype == tf.float64:
        return _unit_rows64(x)
    return tf.math.l2_normalize(tf.cast(x, dtype), axis=-1, epsilon=NORM_EPSILON)


def _num_pixels(x):
    """N = H * W of the (batch, N, C) tensor, as a float64 tensor."""
    return tf.cast(tf.shape(x)[1], tf.float64)


def _static_num_pixels(shape):
    h, w = shape[1], shape[2]
    return None if h is None or w is None else h * w


def _resolve_method(method, p, n, c_t, c_s):
    if method != "auto":
        return method
    if p == 1:
        return "pairwise"
    if n is None or c_t is None or c_s is None:
        return "gram"  # Never risk an N x N matrix of unknown size.
    pairwise_cost = n * n * (c_t + c_s + PAIRWISE_ENTRY_COST)
    gram_cost = GRAM_COST_FACTOR * n * (c_t * c_t + c_t * c_s + c_s * c_s)
    return "pairwise" if pairwise_cost < gram_cost else "gram"


def resolve_method(teacher_map_shape, student_map_shape, method="auto", p=2):
    """The exact evaluation ("pairwise" or "gram") used for maps of the given shapes.

    Args:
        teacher_map_shape: shape `(batch, H_T, W_T, C_T)` of the teacher's map.
        student_map_shape: shape `(batch, H, W, C_S)` of the student's map.
        method: `"auto"`, `"pairwise"` or `"gram"`.
        p: 2 (eq. 6) or 1 (L1, pairwise only).

    Returns:
        `"pairwise"` or `"gram"`.

    Example:

    >>> resolve_method((32, 8, 8, 64), (32, 8, 8, 64))
    'pairwise'
    >>> resolve_method((32, 32, 32, 16), (32, 32, 32, 16))
    'gram'
    """
    _check_method(method, p)
    t, s = tf.TensorShape(teacher_map_shape), tf.TensorShape(student_map_shape)
    return _resolve_method(method, p, _static_num_pixels(s), t[-1], s[-1])


# ---------------------------------------------------------------------------- feature affinity


def _pairwise_per_sample(a, b, p):
    """Exact FA from the N x N difference, accurate when the student is close to the teacher.

    `a`, `b` are float64 unit pixel vectors. With equal channel counts the difference is formed as
    `A E^T + E B^T` with `E = A - B`: both terms are as small as the difference itself, so float32
    products lose nothing to cancellation.
    """
    if a.shape[-1] is not None and a.shape[-1] == b.shape[-1]:
        e = a - b
        left, right = tf.concat([a, e], axis=-1), tf.concat([e, b], axis=-1)
    else:
        left, right = tf.concat([a, b], axis=-1), tf.concat([a, -b], axis=-1)
    diff = tf.linalg.matmul(
        tf.cast(left, tf.float32), tf.cast(right, tf.float32), transpose_b=True
    )  # S_T - S_S, (batch, N, N)
    total = tf.reduce_sum(tf.abs(diff) if p == 1 else tf.square(diff), axis=[1, 2])
    n = tf.cast(tf.shape(diff)[1], tf.float32)
    return total / (n * n)


@tf.custom_gradient
def _gram_totals(a, b):
    """Per-sample ||A A^T - B B^T||_F^2 from the C x C products (float64), with its gradient.

    float64 keeps the cancellation of the three ~N^2/C terms exact enough; the hand-written
    gradient reuses the forward products (d/dB = 4 (B B^T B - A A^T B) = 4 (B G_bb - A G_ab)).
    """
    g_aa = tf.linalg.matmul(a, a, transpose_a=True)
    g_ab = tf.linalg.matmul(a, b, transpose_a=True)
    g_bb = tf.linalg.matmul(b, b, transpose_a=True)
    total = (
        tf.reduce_sum(tf.square(g_aa), axis=[1, 2])
        - 2.0 * tf.reduce_sum(tf.square(g_ab), axis=[1, 2])
        + tf.reduce_sum(tf.square(g_bb), axis=[1, 2])
    )

    def grad(upstream):
        scale = 4.0 * upstream[:, None, None]
        grad_a = scale * (tf.linalg.matmul(a, g_aa) - tf.linalg.matmul(b, g_ab, transpose_b=True))
        grad_b = scale * (tf.linalg.matmul(b, g_bb) - tf.linalg.matmul(a, g_ab))
        return grad_a, grad_b

    return total, grad


def _gram_per_sample(a, b):
    """Exact FA without the N x N matrix."""
    n = _num_pixels(a)
    # Rounding can leave a tiny negative value for identical affinities; the loss is a squared norm.
    return tf.cast(tf.maximum(_gram_totals(a, b), 0.0) / (n * n), tf.float32)


def feature_affinity_per_sample(teacher_map, student_map, method="auto", p=2):
    """Per-sample feature affinity loss `||S_T - S_S||_F^2 / N^2` (eq. 6).

    Args:
        teacher_map: `(batch, H_T, W_T, C_T)` teacher features; resized (bilinear) to the
            student's H, W when they differ.
        student_map: `(batch, H, W, C_S)` student features.
        method: `"auto"` (cheaper exact form for the shape), `"pairwise"` (N x N) or `"gram"`
            (C x C, float64).
        p: 2 for eq. 6; 1 for the elementwise mean `sum|S_T - S_S| / N^2` of the authors' code
            (pairwise only).

    Returns:
        float32 tensor of shape `(batch,)`.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = rng.normal(size=(4, 8, 8, 32)).astype("float32")
    >>> s = rng.normal(size=(4, 4, 4, 16)).astype("float32")
    >>> feature_affinity_per_sample(t, s).shape
    TensorShape([4])
    """
    _check_method(method, p)
    teacher_map, student_map = _check_maps(teacher_map, student_map)
    teacher_map, student_map = _align(teacher_map, student_map)
    method = _resolve_method(
        method, p, _static_num_pixels(student_map.shape), teacher_map.shape[-1], student_map.shape[-1]
    )
    a, b = _pixels(teacher_map, tf.float64), _pixels(student_map, tf.float64)
    if method == "pairwise":
        return _pairwise_per_sample(a, b, p)
    return _gram_per_sample(a, b)


def feature_affinity(teacher_map, student_map, method="auto", p=2):
    """Feature affinity loss (eq. 6), averaged over the batch.

    See `feature_affinity_per_sample` for the arguments.

    Returns:
        float32 scalar.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = rng.normal(size=(2, 16, 16, 8)).astype("float32")
    >>> s = rng.normal(size=(2, 16, 16, 8)).astype("float32")
    >>> a = float(feature_affinity(t, s, method="pairwise"))
    >>> b = float(feature_affinity(t, s, method="gram"))
    >>> abs(a - b) < 1e-5 * a
    True
    """
    return tf.reduce_mean(feature_affinity_per_sample(teacher_map, student_map, method=method, p=p))


# ----------------------------------------------------------------------- fast feature affinity

_default_generator = None


def _module_generator():
    """A generator private to this module, for `seed=None`: the global TF and NumPy states stay untouched."""
    global _default_generator
    if _default_generator is None:
        with tf.init_scope():
            _default_generator = tf.random.Generator.from_non_deterministic_state()
    return _default_generator


def _stateless_seed(seed):
    """A shape-(2,) int32 stateless seed from None, an int, a (2,) seed tensor or a Generator."""
    if seed is None:
        seed = _module_generator()
    if isinstance(seed, tf.random.Generator):
        seed = seed.make_seeds(1)[:, 0]
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        # The second word is the counter slot; a plain int seed uses counter 0.
        seed = tf.constant([int(seed) % (2**31), 0], tf.int64)
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
        seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
    return seed


def fast_feature_affinity_per_sample(teacher_map, student_map, k=15, seed=None):
    """Per-sample fast feature affinity (eq. 15), an unbiased estimate of `feature_affinity_per_sample`.

    `L = (1/k) sum_l ||(S_T - S_S) z_l||^2 / N^2` with `z_l ~ N(0, I_N)`, computed as
    `A (A^T z) - B (B^T z)` in O(k N C); each sample gets its own probes.

    Args:
        teacher_map: `(batch, H_T, W_T, C_T)`; resized to the student's H, W when they differ.
        student_map: `(batch, H, W, C_S)`.
        k: number of probes, >= 1.
        seed: `None` (fresh probes from a generator private to this module), an int (same seed,
            same value), a shape-`(2,)` integer stateless seed (e.g. `(seed, step)`), or a
            `tf.random.Generator` to draw from. The global random state is never used.

    Returns:
        float32 tensor of shape `(batch,)`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> y = np.random.default_rng(1).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> v1 = fast_feature_affinity_per_sample(x, y, k=4, seed=7)
    >>> v2 = fast_feature_affinity_per_sample(x, y, k=4, seed=7)
    >>> bool(np.all(v1.numpy() == v2.numpy()))
    True
    """
    k = _check_k(k)
    teacher_map, student_map = _check_maps(teacher_map, student_map)
    teacher_map, student_map = _align(teacher_map, student_map)
    a, b = _pixels(teacher_map, tf.float32), _pixels(student_map, tf.float32)
    shape = tf.shape(b)
    z = tf.random.stateless_normal([shape[0], shape[1], k], seed=_stateless_seed(seed))
    at_z = tf.linalg.matmul(a, z, transpose_a=True)
    bt_z = tf.linalg.matmul(b, z, transpose_a=True)
    u = tf.linalg.matmul(a, at_z) - tf.linalg.matmul(b, bt_z)  # (S_T - S_S) z, (batch, N, k)
    n = tf.cast(shape[1], tf.float32)
    return tf.reduce_sum(tf.square(u), axis=[1, 2]) / (k * n * n)


def fast_feature_affinity(teacher_map, student_map, k=15, seed=None):
    """Fast feature affinity (eq. 15), averaged over the batch.

    See `fast_feature_affinity_per_sample` for the arguments.

    Returns:
        float32 scalar.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> float(fast_feature_affinity(x, x, k=3, seed=1))
    0.0
    """
    return tf.reduce_mean(fast_feature_affinity_per_sample(teacher_map, student_map, k=k, seed=seed))


# ------------------------------------------------------------------------------------------- KD


def _check_kd(kind, temperature):
    if kind not in KD_KINDS:
        raise ValueError(f"kind={kind!r} is not supported; use one of {', '.join(KD_KINDS)}.")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is not supported; use a number > 0.")


def kd_loss_per_sample(teacher_logits, student_logits, kind="mse", temperature=1.0):
    """Per-sample knowledge distillation loss on logits.

    Args:
        teacher_logits: `(batch, classes)`.
        student_logits: `(batch, classes)`.
        kind: `"mse"`: mean over classes of `(t - s)^2` on raw logits (temperature unused);
            `"kl"`: `KL(softmax(t/T) || softmax(s/T)) * T^2`.
        temperature: `T > 0`.

    Returns:
        float32 tensor of shape `(batch,)`.

    Example:

    >>> kd_loss_per_sample([[1.0, 2.0]], [[1.0, 4.0]], kind="mse").numpy()
    array([2.], dtype=float32)
    """
    _check_kd(kind, temperature)
    teacher_logits, student_logits = _check_logits(teacher_logits, student_logits)
    t = tf.cast(teacher_logits, tf.float32)
    s = tf.cast(student_logits, tf.float32)
    if kind == "mse":
        return tf.reduce_mean(tf.square(t - s), axis=-1)
    temperature = float(temperature)
    log_p = tf.nn.log_softmax(t / temperature, axis=-1)
    log_q = tf.nn.log_softmax(s / temperature, axis=-1)
    # The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    return tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1) * (temperature * temperature)


def kd_loss(teacher_logits, student_logits, kind="mse", temperature=1.0):
    """Knowledge distillation loss on logits, averaged over the batch.

    See `kd_loss_per_sample` for the arguments.

    Returns:
        float32 scalar.

    Example:

    >>> round(float(kd_loss([[0.0, 0.0]], [[0.0, 0.0]], kind="kl", temperature=4.0)), 6)
    0.0
    """
    return tf.reduce_mean(kd_loss_per_sample(teacher_logits, student_logits, kind, temperature))


# ------------------------------------------------------------------------------ Keras wrappers


def _dtype_config(loss):
    return loss._dtype_policy.name


@keras.saving.register_keras_serializable(package="faqd_tf")
class FeatureAffinity(keras.losses.Loss):
    """Feature affinity loss (eq. 6) as a Keras loss: `y_true` is the teacher's map, `y_pred` the student's.

    Args:
        method: `"auto"`, `"pairwise"` or `"gram"` (see `feature_affinity_per_sample`).
        p: 2 (eq. 6) or 1 (L1 of the authors' code, pairwise).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Example:

    >>> import numpy as np
    >>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 4)).astype("float32")
    >>> float(FeatureAffinity()(x, x))
    0.0
    """

    def __init__(self, method="auto", p=2, name="feature_affinity", reduction="sum_over_batch_size", dtype=None):
        _check_method(method, p)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.method = method
        self.p = p

    def call(self, y_true, y_pred):
        return feature_affinity_per_sample(y_true, y_pred, method=self.method, p=self.p)

    def get_config(self):
        return {**super().get_config(), "method": self.method, "p": self.p, "dtype": _dtype_config(self)}


@keras.saving.register_keras_serializable(package="faqd_tf")
class FastFeatureAffinity(keras.losses.Loss):
    """Fast feature affinity (eq. 15) as a Keras loss: `y_true` is the teacher's map, `y_pred` the student's.

    The loss owns a `tf.random.Generator` (seeded by `seed`, or non-deterministic when `seed` is
    None), so every call draws fresh probes, a given seed replays the same sequence, and the
    global random state is never touched.

    Args:
        k: number of random probes, >= 1.
        seed: int or None.
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

    def __init__(self, k=15, seed=None, name="fast_feature_affinity", reduction="sum_over_batch_size", dtype=None):
        self.k = _check_k(k)
        self.seed = check_seed(seed)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._generator = None

    @property
    def generator(self):
        """The loss's own `tf.random.Generator`, created on first use (outside any tf.function)."""
        if self._generator is None:
            with tf.init_scope():
                if self.seed is None:
                    self._generator = tf.random.Generator.from_non_deterministic_state()
                else:
                    self._generator = tf.random.Generator.from_seed(self.seed)
        return self._generator

    def call(self, y_true, y_pred):
        return fast_feature_affinity_per_sample(y_true, y_pred, k=self.k, seed=self.generator)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "seed": self.seed, "dtype": _dtype_config(self)}


@keras.saving.register_keras_serializable(package="faqd_tf")
class KDLoss(keras.losses.Loss):
    """Knowledge distillation on logits as a Keras loss: `y_true` is the teacher's, `y_pred` the student's.

    Args:
        kind: `"mse"` (raw logits) or `"kl"` (`KL(softmax(t/T) || softmax(s/T)) * T^2`).
        temperature: `T > 0` (KL only).
        name, reduction, dtype: as for `keras.losses.Loss`.

    Example:

    >>> float(KDLoss("mse")([[1.0, 2.0]], [[1.0, 4.0]]))
    2.0
    """

    def __init__(self, kind="mse", temperature=1.0, name="kd_loss", reduction="sum_over_batch_size", dtype=None):
        _check_kd(kind, temperature)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.kind = kind
        self.temperature = float(temperature)

    def call(self, y_true, y_pred):
        return kd_loss_per_sample(y_true, y_pred, kind=self.kind, temperature=self.temperature)

    def get_config(self):
        return {
            **super().get_config(),
            "kind": self.kind,
            "temperature": self.temperature,
            "dtype": _dtype_config(self),
        }
