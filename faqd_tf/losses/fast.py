"""Fast feature affinity (eqs. 14-15 of arXiv 2302.10899): `D = S_T - S_S` probed with k Gaussian
vectors `z`, `D z` computed as `(M (P^T z) + P (M^T z)) / 2` (`faqd_tf.losses.pixels`) in O(k N C).

For `"fro2"` the unbiased `(1/k) sum ||D z||^2 / N^2`; for `"l1"` the authors' `sum |D z|` form,
scaled so that it estimates the mean over rows of the row RMS of `D` (the same scale as the exact
L1; see `fast_feature_affinity_per_sample`). The probes come from `faqd_tf.losses.seeds`.
"""

import math

import tensorflow as tf

from faqd_tf import options
from faqd_tf.losses import pixels
from faqd_tf.losses.seeds import stateless_seed


def gaussian_probes(shape, seed):
    """Standard normal probes of `shape` from a shape-(2,) stateless `seed`, the same numbers with
    and without XLA (`jit_compile=True`).

    `tf.random.stateless_normal` turns the same Philox bits into other floats under XLA, so a
    compiled step would draw other probes for a seed; here the bits (identical everywhere) become
    normals by Box-Muller, with 24 bits per uniform in (0, 1].

    >>> import numpy as np
    >>> z = gaussian_probes([4000], tf.constant([1, 2], tf.int64)).numpy()
    >>> bool(abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1)
    True
    """
    bits = tf.random.stateless_uniform(
        [2, *shape], seed=seed, minval=None, maxval=None, dtype=tf.uint32, alg="philox"
    )
    u = (tf.cast(tf.bitwise.right_shift(bits, tf.constant(8, tf.uint32)), tf.float32) + 1.0) * (
        1.0 / 2**24
    )
    return tf.sqrt(-2.0 * tf.math.log(u[0])) * tf.cos((2.0 * math.pi) * u[1])


def fast_feature_affinity_per_sample(teacher_map, student_map, k=15, seed=None, fa_norm="fro2"):
    """Per-sample fast feature affinity (eq. 15): k Gaussian probes `z_l` of `D = S_T - S_S`.

    - `fa_norm="fro2"`: `(1/k) sum_l ||D z_l||^2 / N^2`, an unbiased estimate of the exact
      `"fro2"` loss (Prop. 4.1).
    - `fa_norm="l1"`: `sqrt(pi/2) sqrt(N) (1/k) sum_l ||D z_l||_1 / N^2`. As `E|D_i z| =
      sqrt(2/pi) ||D_i||_2`, this is an unbiased estimate of the mean over rows of the row RMS of D,
      which bounds the exact `"l1"` loss (mean |D_ij|) from above and equals it when a row's
      differences are of one size (for Gaussian-like rows exact/fast is about 0.8). The authors'
      `fast_fa_loss(order=1)` omits the factor `sqrt(pi/2) sqrt(N)`, which makes their FFA weaker
      than their FA by about that factor (26 at 32 x 32); with it one `beta` serves both.

    `D z` is `(M (P^T z) + P (M^T z)) / 2`, O(k N C). The probes of a call are shared by the samples
    of the batch, as in the authors' code: each sample's estimate stays unbiased, and drawing them
    costs 1/batch of per-sample probes (Gaussian sampling of per-sample probes took longer than the
    whole exact FA on a 2-core CPU: 23 ms per step for one 28 x 28 tap at batch 128, k = 15).

    Args:
        teacher_map: `(batch, H_T, W_T, C_T)`; resized to the student's H, W when they differ.
        student_map: `(batch, H, W, C_S)`.
        k: number of probes, >= 1.
        seed: `None` (fresh probes from a generator private to `faqd_tf.losses.seeds`), an int (same seed,
            same value), a shape-`(2,)` integer stateless seed (e.g. `(seed, step)`), or a
            `tf.random.Generator` to draw from. The global random state is never used.
        fa_norm: `"fro2"` or `"l1"`.

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
    k = options.check_k(k)
    options.check_fa_norm(fa_norm)
    teacher_map, student_map = pixels.check_maps(teacher_map, student_map)
    teacher_map, student_map = pixels.align(teacher_map, student_map)
    x, y = pixels.rows_of_both(teacher_map, student_map)
    shape = tf.shape(x)
    z = gaussian_probes([1, shape[1], k], stateless_seed(seed))  # matmuls broadcast it
    n = pixels.num_pixels(x)
    if fa_norm == "l1":
        return math.sqrt(math.pi / 2) * _probed_totals(x, y, z, fa_norm) / (k * n * tf.sqrt(n))
    return _probed_totals(x, y, z, fa_norm) / (k * n * n)


def _probed_totals(x, y, z, fa_norm):
    """Per-sample `sum f(U)` of the probes `U = D z = (M (P^T z) + P (M^T z)) / 2`, with its gradient.

    From `U = A (A^T z) - B (B^T z)` and `G = dL/dU`, the gradients for the unit rows are
    `dB = -(G (B^T z)^T + z (G^T B))` and `dA = G (A^T z)^T + z (G^T A)`: two N x k x C products a
    side (autodiff of the forward would take eight).
    """

    @tf.custom_gradient
    def totals(x, y):
        x, y, probes = pixels.unwatched(x, y, z)
        m, p, sq_x, sq_y = pixels.difference_and_sum(x, y)
        pz = tf.linalg.matmul(p, probes, transpose_a=True)  # (batch, C, k)
        mz = tf.linalg.matmul(m, probes, transpose_a=True)
        u = 0.5 * (tf.linalg.matmul(m, pz) + tf.linalg.matmul(p, mz))  # D z, (batch, N, k)
        total = tf.reduce_sum(pixels.entry_loss(u, fa_norm), axis=[1, 2])

        def grad(upstream):
            g = pixels.entry_grad(u, fa_norm) * upstream[:, None, None]

            def side(rows, rows_z):  # G (R^T z)^T + z (G^T R) for the unit rows R
                return tf.linalg.matmul(g, rows_z, transpose_b=True) + tf.linalg.matmul(
                    probes, tf.linalg.matmul(g, rows, transpose_a=True)
                )

            grad_a = side(0.5 * (p + m), 0.5 * (pz + mz))
            grad_b = -side(0.5 * (p - m), 0.5 * (pz - mz))
            return pixels.through_unit(x, grad_a, sq_x), pixels.through_unit(y, grad_b, sq_y)

        return total, grad

    return totals(x, y)


def fast_feature_affinity(teacher_map, student_map, k=15, seed=None, fa_norm="fro2"):
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
    return tf.reduce_mean(
        fast_feature_affinity_per_sample(teacher_map, student_map, k=k, seed=seed, fa_norm=fa_norm)
    )
