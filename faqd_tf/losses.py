"""Distillation losses of FAQD: feature affinity (exact and fast) and KD on logits.

Feature affinity (eq. 6 of arXiv 2302.10899): each pixel's channel vector is normalized to unit
length, `F` in R^{N x C} with `N = H * W`, and `S = F F^T` holds the N x N pixel cosines. Two norms
of `D = S_T - S_S` per sample (`fa_norm`):

- `"fro2"`: `||D||_F^2 / N^2`, eq. (6) of the paper;
- `"l1"`: `sum |D_ij| / N^2`, the mean absolute difference, as the authors' code trains
  (lzj994/FAQD `fa_loss(order=1)`).

Both are averaged over the batch. The authors' code sums over the batch instead, which ties the
strength to the batch size: their `fa_coef` c at batch size B is `beta = c * B` here
(`faqd_tf.options.DEFAULT_BETA` holds the measured defaults). Teacher and student may differ in
channels; a teacher map with another H, W is first resized (bilinear) to the student's.

Everything runs in float32 (bfloat16/float16 maps are cast up), with no cancellation when the
student is close to the teacher: with `A`, `B` the unit pixel rows (the narrower one padded with
zero channels, which leaves its affinity unchanged), `M = A - B` and `P = A + B` are formed from
the raw difference and sum of the maps, and `D = (M P^T + P M^T) / 2` is small exactly when `M` is.
Exact evaluations (`fa_method`):

- `"pairwise"`: `D` itself, O(N^2 C) time; both norms. Held whole when it fits
  `TILE_ELEMENTS_PER_SAMPLE` entries a sample (one N x N x C product each way), else in row tiles
  recomputed in the backward pass (bounded memory).
- `"gram"` (`"fro2"` only): `||D||_F^2 = 1/2 <M^T M, P^T P> + 1/2 tr((M^T P)^2)` from C x C products,
  O(N C^2) time. Every term scales with `|M|^2`. If the channels of the student are a rotation of
  the teacher's (S_S close to S_T while M is not small) the terms cancel: a sample whose estimated
  rounding error (`gram_error_estimate`) exceeds `GRAM_RELATIVE_ERROR_LIMIT` is evaluated pairwise
  instead, alone. On real feature maps that never happens (benchmarks/fa_accuracy.py).
- `"auto"`: the cheaper one for the static shape.

The gradients are written out (`tf.custom_gradient`), for the student's map only unless the
teacher's is asked for too: two N x C x C products (gram), one N x N x C product (whole pairwise).

Fast feature affinity (eqs. 14-15) probes `D` with k Gaussian vectors `z`, `D z` computed as
`(M (P^T z) + P (M^T z)) / 2` in O(k N C): for `"fro2"` the unbiased `(1/k) sum ||D z||^2 / N^2`;
for `"l1"` the authors' `sum |D z|` form, scaled so that it estimates the mean over rows of the
row RMS of `D` (the same scale as the exact L1; see `fast_feature_affinity_per_sample`).

Example:

>>> import numpy as np
>>> x = np.random.default_rng(0).normal(size=(2, 8, 8, 16)).astype("float32")
>>> float(feature_affinity(x, x)), float(feature_affinity(x, x, fa_norm="l1"))
(0.0, 0.0)
"""

import math
import zlib

import keras
import numpy as np
import tensorflow as tf

from faqd_tf import options

# Guards the squared norm of an all-zero channel vector (dead ReLU pixel); such a pixel maps to the
# zero vector instead of NaN.
NORM_EPSILON = 1e-12
# Entries of S_T - S_S per sample held at once by the pairwise evaluation (one row tile, forward
# or backward): 2^16 float32 = 256 KiB a sample, 16 MiB at batch 64 (a 56x56 map: 157 tiles of 20
# rows), whatever N is.
TILE_ELEMENTS_PER_SAMPLE = 2**16
# A sample whose gram evaluation has an estimated relative rounding error above this is redone
# pairwise. The bound adopted from what training needs: the gradient within 1e-3 of float64 (SGD
# uses nothing else), the loss, which is only logged, within 1e-2. Measured (benchmarks/fa_accuracy.py):
# the loss's actual error is at most 0.41x the estimate, the gradient's at most 2e-5 on real maps and
# 1e-3 only where the estimate passes 10 (channel-permuted near-converged maps); real maps estimate
# 1e-5 to 2e-3, so no real sample has needed the fallback.
GRAM_RELATIVE_ERROR_LIMIT = 1e-2
_FLOAT32_EPS = 2.0**-24
# Cost model of "auto", fitted to forward+backward timings on a 2-core CPU (benchmarks/fa_cost.py):
# per sample, pairwise costs N^2 (4 C + PAIRWISE_ENTRY_COST) and gram GRAM_PRODUCTS N C^2 + GRAM_ROW_COST N C
# (multiply-add units; C is the padded channel count).
PAIRWISE_ENTRY_COST = 24.0
GRAM_PRODUCTS = 5.0
GRAM_ROW_COST = 60.0


# --------------------------------------------------------------------------------------- checks


def _as_float_tensor(x):
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    return x


def _check_maps(teacher_map, student_map):
    teacher_map = _as_float_tensor(teacher_map)
    student_map = _as_float_tensor(student_map)
    checked = []
    for name, x in (("teacher_map", teacher_map), ("student_map", student_map)):
        if x.shape.rank not in (3, 4):
            raise ValueError(
                f"{name} must be 4-D (batch, height, width, channels) or 3-D (batch, length, channels), "
                f"got shape {x.shape}."
            )
        # A sequence's positions are its pixels: (batch, L, C) is an L x 1 image.
        checked.append(x[:, :, None, :] if x.shape.rank == 3 else x)
    if teacher_map.shape.rank != student_map.shape.rank:
        raise ValueError(
            f"student_map has shape {student_map.shape} and teacher_map {teacher_map.shape}; give both as 4-D "
            "(batch, height, width, channels) maps or both as 3-D (batch, length, channels)."
        )
    teacher_map, student_map = checked
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
        if x.shape.rank is None or x.shape.rank < 2:
            raise ValueError(
                f"{name} must be (batch, classes) or per position (batch, ..., classes), got shape {x.shape}."
            )
    if not teacher_logits.shape.is_compatible_with(student_logits.shape):
        raise ValueError(
            f"teacher_logits and student_logits must have the same shape, got teacher "
            f"{teacher_logits.shape} and student {student_logits.shape}; give the student the teacher's "
            f"output shape (same classes, and for dense prediction the same positions)."
        )
    return teacher_logits, student_logits


def _mean_over_positions(values):
    """(batch, positions...) -> (batch,): a dense prediction's per-position losses averaged per
    sample, so a segmentation sample weighs as much as a classified one. (batch,) passes unchanged."""
    if values.shape.rank == 1:
        return values
    return tf.reduce_mean(values, axis=list(range(1, values.shape.rank)))


def _check_tile_rows(tile_rows):
    if tile_rows is not None and (isinstance(tile_rows, bool) or not isinstance(tile_rows, int) or tile_rows < 1):
        raise ValueError(f"tile_rows={tile_rows!r} is not supported; use None (automatic) or an integer >= 1.")
    return tile_rows


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


def _unwatched(*tensors):
    """The tensors, invisible to an enclosing eager `GradientTape`.

    Inside a `tf.custom_gradient` the gradient is written out; without this an eager tape would
    still record every op of the forward pass (and keep every row tile of the pairwise form alive).
    """
    return [tf.stop_gradient(t) for t in tensors]


def _pixel_rows(x, channels):
    """(batch, H, W, C) -> (batch, N, channels), zero channels appended where C < channels."""
    shape = tf.shape(x)
    c = x.shape[-1] if x.shape[-1] is not None else shape[-1]
    x = tf.reshape(x, [shape[0], shape[1] * shape[2], c])
    if x.shape[-1] is not None and x.shape[-1] == channels:
        return x
    return tf.pad(x, [[0, 0], [0, 0], [0, channels - tf.shape(x)[-1]]])


def _rows_of_both(teacher_map, student_map):
    """Both maps as (batch, N, C) pixel rows with one channel count (the narrower padded with zeros)."""
    c_t, c_s = teacher_map.shape[-1], student_map.shape[-1]
    if c_t is not None and c_s is not None:
        channels = max(c_t, c_s)
    else:
        channels = tf.maximum(tf.shape(teacher_map)[-1], tf.shape(student_map)[-1])
    return _pixel_rows(teacher_map, channels), _pixel_rows(student_map, channels)


def _row_dot(a, b):
    """Per-pixel inner product of (batch, N, C) tensors, as (batch, N, 1) (4x faster than einsum on CPU)."""
    return tf.reduce_sum(a * b, axis=-1, keepdims=True)


# The passes over the maps before and after the products are many small elementwise ops; XLA fuses
# them into a few loops (measured 1.7x faster on a 2-core CPU). The matmuls stay outside XLA, where
# TensorFlow's own kernels are faster on CPUs.
_fused = tf.function(jit_compile=True, reduce_retracing=True)


@_fused
def _difference_and_sum_forward(x, y):
    """`M = A - B` and `P = A + B` of the unit pixel rows `A` of x (teacher), `B` of y (student),
    accurately, with the squared row norms `|x|^2`, `|y|^2`.

    Formed from `d = x - y` of the raw rows rather than from A and B: with `r = 1 / |x|`,
    `A - B = d r_x + y (r_x - r_y)`, where `r_x - r_y = (|y|^2 - |x|^2) r_x r_y / (|x| + |y|)` and
    `|y|^2 - |x|^2 = -<d, x + y>`. Nothing cancels, so M keeps its relative precision however close
    the student is.
    """
    sq_x, sq_y = _row_dot(x, x), _row_dot(y, y)
    # Below the epsilon a pixel's scale is a constant (1e6): an all-zero pixel stays zero.
    nx, ny = tf.maximum(sq_x, NORM_EPSILON), tf.maximum(sq_y, NORM_EPSILON)
    norm_x, norm_y = tf.sqrt(nx), tf.sqrt(ny)
    d = x - y
    # |y|^2 - |x|^2 = -<d, x + y> = -(2 <d, y> + |d|^2): small when d is, and as precise.
    exact_gap = -(2.0 * _row_dot(d, y) + _row_dot(d, d))
    gap = tf.where(tf.logical_and(sq_x > NORM_EPSILON, sq_y > NORM_EPSILON), exact_gap, ny - nx)
    dr = gap / (norm_x * norm_y * (norm_x + norm_y))  # r_x - r_y
    # Scaled by the longer vector's 1/|.|, the terms are at most 2 in size, so nothing cancels even
    # when one pixel is (nearly) zero: M = d r_x + y (r_x - r_y) if |x| >= |y|, else d r_y + x (r_x - r_y).
    # (Per-pixel factors select the shorter vector: a broadcast tf.where costs twice a multiply.)
    x_shorter = tf.cast(nx < ny, x.dtype)
    m = d * (1.0 / tf.maximum(norm_x, norm_y)) + y * ((1.0 - x_shorter) * dr) + x * (x_shorter * dr)
    # P = 2A - M: exact up to rounding of P itself, which only loses digits for antipodal pixels
    # (B = -A), whose affinities the teacher and student already share.
    p = x * (2.0 / norm_x) - m
    return m, p, sq_x, sq_y


@_fused
def _through_unit(raw, upstream, squared):
    """The gradient through `A = raw / |raw|` of `upstream` (the gradient for A):
    (upstream - A <A, upstream>) / |raw|. Below the epsilon the scale is a constant, so nothing is
    projected out."""
    inv_norm = tf.math.rsqrt(tf.maximum(squared, NORM_EPSILON))
    coef = tf.where(squared > NORM_EPSILON, _row_dot(raw, upstream) * inv_norm * inv_norm, 0.0)
    return upstream * inv_norm - raw * (coef * inv_norm)


def _num_pixels(m):
    return tf.cast(tf.shape(m)[1], tf.float32)


def _static_num_pixels(shape):
    h, w = shape[1], shape[2]
    return None if h is None or w is None else h * w


def _whole(n, tile_rows):
    """Whether the pairwise form holds all of D at once (no row tiles) for N pixels."""
    if not isinstance(n, int):
        return False
    rows = tile_rows or TILE_ELEMENTS_PER_SAMPLE // max(n, 1)
    return rows >= n


def _resolve_method(method, fa_norm, n, c_t, c_s):
    if method != "auto":
        return method
    if fa_norm != "fro2":
        return "pairwise"
    if n is None or c_t is None or c_s is None:
        return "gram"  # Never risk the N^2 cost for a shape of unknown size.
    c = max(c_t, c_s)
    # Per sample, in multiply-adds: the pairwise form holding D whole makes two N x N x C products
    # (D, and D B for the gradient), in row tiles four more (D recomputed, and the teacher's side);
    # the gram form five N x C x C products. Both make a few passes over the N x C rows.
    pairwise_cost = n * n * ((2 if _whole(n, None) else 6) * c + PAIRWISE_ENTRY_COST)
    gram_cost = GRAM_PRODUCTS * n * c * c + GRAM_ROW_COST * n * c
    return "pairwise" if pairwise_cost < gram_cost else "gram"


def resolve_method(teacher_map_shape, student_map_shape, method="auto", fa_norm="fro2"):
    """The exact evaluation (`"pairwise"` or `"gram"`) used for maps of the given shapes.

    Args:
        teacher_map_shape: shape `(batch, H_T, W_T, C_T)` of the teacher's map.
        student_map_shape: shape `(batch, H, W, C_S)` of the student's map.
        method: `"auto"`, `"pairwise"` or `"gram"`.
        fa_norm: `"fro2"` or `"l1"` (pairwise only).

    Returns:
        `"pairwise"` or `"gram"`.

    Example:

    >>> resolve_method((32, 8, 8, 64), (32, 8, 8, 64))
    'pairwise'
    >>> resolve_method((32, 32, 32, 16), (32, 32, 32, 16))
    'gram'
    """
    options.check_fa_norm(fa_norm)
    options.check_fa_method(method, fa_norm, name="method")
    t, s = tf.TensorShape(teacher_map_shape), tf.TensorShape(student_map_shape)
    return _resolve_method(method, fa_norm, _static_num_pixels(s), t[-1], s[-1])


# ---------------------------------------------------------------------------- feature affinity
#
# Each exact form is a pair (forward, backward) on M and P: the forward returns the per-sample
# totals and a `backward(upstream)` that returns the gradients for the unit rows A (teacher) and B
# (student). Two separate results, so that the teacher's, which training never asks for, is pruned
# from the graph.


def _entry_loss(d, fa_norm):
    return tf.abs(d) if fa_norm == "l1" else tf.square(d)


def _entry_grad(d, fa_norm):
    return tf.sign(d) if fa_norm == "l1" else 2.0 * d


def _tile_layout(n, tile_rows):
    """(rows per tile, number of tiles, padded N): Python ints when N is static, which XLA needs.

    Where N is static the tile is the largest divisor of N within the budget (no padding), unless
    that is under half the budget (N prime, say): then the rows are padded to whole tiles.
    """
    if isinstance(n, int):
        budget = max(1, min(tile_rows or TILE_ELEMENTS_PER_SAMPLE // max(n, 1), n))
        rows = max(r for r in range(1, budget + 1) if n % r == 0)
        if 2 * rows < budget:
            rows = budget
        tiles = -(-n // rows)
        return rows, tiles, tiles * rows
    rows = tf.constant(tile_rows) if tile_rows else tf.maximum(1, TILE_ELEMENTS_PER_SAMPLE // tf.maximum(n, 1))
    rows = tf.maximum(1, tf.minimum(rows, n))
    tiles = (n + rows - 1) // rows
    return rows, tiles, tiles * rows


def _tiles(m, p, tile_rows, active):
    """The row tiles of `D = (M P^T + P M^T) / 2`: (tile function, loop count, M, P as tiled)."""
    n = m.shape[1] if m.shape[1] is not None else tf.shape(m)[1]
    rows, num_tiles, padded = _tile_layout(n, tile_rows)
    loops = num_tiles if active is None else tf.where(active, num_tiles, 0)
    if isinstance(padded, int) and padded == n:
        mp, pp = m, p
    else:
        mp, pp = (tf.pad(x, [[0, 0], [0, padded - n], [0, 0]]) for x in (m, p))

    def tile_of_d(i):
        m_j, p_j = mp[:, i * rows:(i + 1) * rows], pp[:, i * rows:(i + 1) * rows]
        d = tf.linalg.matmul(m_j, p, transpose_b=True) + tf.linalg.matmul(p_j, m, transpose_b=True)
        return 0.5 * d, m_j, p_j  # (batch, rows, N)

    return tile_of_d, loops


def _tiled_forward(m, p, fa_norm, tile_rows=None, active=None):
    """Per-sample `sum f(D_ij)`, one row tile of D at a time. With `active` (a boolean scalar) false
    the loop runs no tile and the result is zero: a fallback that costs nothing when unused."""
    tile_of_d, loops = _tiles(m, p, tile_rows, active)

    def forward(i, acc):
        return i + 1, acc + tf.reduce_sum(_entry_loss(tile_of_d(i)[0], fa_norm), axis=[1, 2])

    return tf.while_loop(
        lambda i, _: i < loops, forward, (tf.constant(0), tf.zeros_like(m[:, 0, 0])),
        parallel_iterations=1,  # one tile alive at a time: that is the memory bound
    )[1]


def _tiled_backward(m, p, fa_norm, tile_rows=None, active=None):
    """The gradients of `_tiled_forward`'s totals for M and P (upstream 1).

    A tile of rows J is `D_J = (M_J P^T + P_J M^T) / 2`. With `G = f'(D)`, symmetric like D, the
    gradient is `dM = G P = sum_J G_J^T P_J` and `dP = G M = sum_J G_J^T M_J`: each tile is
    recomputed and accumulated, so no N x N tensor is ever kept, and nothing is scattered or padded
    where N is static (XLA needs static shapes).
    """
    tile_of_d, loops = _tiles(m, p, tile_rows, active)

    def backward(i, dm, dp):
        d, m_j, p_j = tile_of_d(i)
        g = _entry_grad(d, fa_norm)
        return (i + 1, dm + tf.linalg.matmul(g, p_j, transpose_a=True),
                dp + tf.linalg.matmul(g, m_j, transpose_a=True))

    _, dm, dp = tf.while_loop(
        lambda i, *_: i < loops, backward, (tf.constant(0), tf.zeros_like(m), tf.zeros_like(p)),
        parallel_iterations=1,
    )
    return dm, dp


def _tiled(m, p, fa_norm, tile_rows):
    total = _tiled_forward(m, p, fa_norm, tile_rows)

    def backward(upstream):
        dm, dp = _tiled_backward(m, p, fa_norm, tile_rows)
        scale = upstream[:, None, None]
        # A = (P + M) / 2 and B = (P - M) / 2 of the forward, so dA = dP + dM and dB = dP - dM.
        return (dp + dm) * scale, (dp - dm) * scale

    return total, backward


def _whole_pairwise(m, p, fa_norm):
    """The pairwise form with all of D at once (small N): one N x N x C product each way.

    `D = (Z + Z^T) / 2` with `Z = M P^T` is exactly symmetric, and so is `G = f'(D)`; from
    `D = A A^T - B B^T` the gradients are `dA = 2 G A` and `dB = -2 G B`.
    """
    z = tf.linalg.matmul(m, p, transpose_b=True)
    d = 0.5 * (z + tf.linalg.matrix_transpose(z))
    total = tf.reduce_sum(_entry_loss(d, fa_norm), axis=[1, 2])

    def backward(upstream):
        g = _entry_grad(d, fa_norm) * (2.0 * upstream[:, None, None])
        return tf.linalg.matmul(g, 0.5 * (p + m)), -tf.linalg.matmul(g, 0.5 * (p - m))

    return total, backward


def _gram_products(m, p):
    """The C x C products of the gram form, the per-sample total, and its estimated relative error.

    `||D||_F^2 = 1/2 <M^T M, P^T P> + 1/2 tr((M^T P)^2)`. The terms that cancel in the total carry a
    relative rounding error of about eps * sqrt(N) each (the C x C products sum N float32 terms),
    so `eps sqrt(N) sum|terms| / total` estimates the total's relative error.
    """
    g_mm = tf.linalg.matmul(m, m, transpose_a=True)
    g_pp = tf.linalg.matmul(p, p, transpose_a=True)
    x = tf.linalg.matmul(m, p, transpose_a=True)  # M^T P
    x_t = tf.linalg.matrix_transpose(x)
    first, second = g_mm * g_pp, x * x_t
    total = 0.5 * (tf.reduce_sum(first, axis=[1, 2]) + tf.reduce_sum(second, axis=[1, 2]))
    terms = 0.5 * (tf.reduce_sum(tf.abs(first), axis=[1, 2]) + tf.reduce_sum(tf.abs(second), axis=[1, 2]))
    error = _FLOAT32_EPS * tf.sqrt(_num_pixels(m)) * terms
    return (g_mm, g_pp, x, x_t), total, error


def gram_error_estimate(teacher_map, student_map):
    """Per-sample estimate of the gram form's relative rounding error (float32, before any fallback).

    A sample whose estimate exceeds `GRAM_RELATIVE_ERROR_LIMIT` is evaluated pairwise instead. On
    real feature maps (benchmarks/fa_accuracy.py) the actual error of the loss is 0.01-0.3 times the
    estimate and the gradient's smaller still; `inf` marks a total that rounding left at or below 0.

    Example:

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> t = np.maximum(rng.normal(size=(2, 8, 8, 16)), 0).astype("float32")
    >>> s = np.maximum(rng.normal(size=(2, 8, 8, 16)), 0).astype("float32")
    >>> bool(np.all(gram_error_estimate(t, s).numpy() < GRAM_RELATIVE_ERROR_LIMIT))
    True
    """
    teacher_map, student_map = _align(*_check_maps(teacher_map, student_map))
    m, p, _, _ = _difference_and_sum_forward(*_rows_of_both(teacher_map, student_map))
    _, total, error = _gram_products(m, p)
    return tf.where(total > 0.0, error / tf.maximum(total, 1e-30), tf.where(error > 0.0, np.inf, 0.0))


def _gram(m, p, tile_rows):
    """The gram form (`_gram_products`), O(N C^2).

    The gradients are `dM = M P^T P + P M^T P` and `dP = P M^T M + M P^T M`, so for the unit rows
    `dB = dP - dM = P (M^T M - M^T P) + M (P^T M - P^T P)` and `dA = dP + dM`: two N x C x C
    products each. A sample whose estimated rounding error exceeds `GRAM_RELATIVE_ERROR_LIMIT` is
    evaluated pairwise (in row tiles) instead, alone: the other samples keep the gram result.
    """
    (g_mm, g_pp, x, x_t), total, error = _gram_products(m, p)
    cancelled = error > GRAM_RELATIVE_ERROR_LIMIT * total
    redo = _SampleSubset(cancelled)
    total = redo.replace(tf.maximum(total, 0.0),  # rounding can leave a tiny negative for identical affinities
                         lambda m_i, p_i: _tiled_forward(m_i, p_i, "fro2", tile_rows), m, p)

    def backward(upstream):
        # The upstream factor applied to the C x C factors, not to the N x C results.
        scale = upstream[:, None, None]
        to_b = (tf.linalg.matmul(p, (g_mm - x) * scale), tf.linalg.matmul(m, (x_t - g_pp) * scale))
        to_a = (tf.linalg.matmul(p, (g_mm + x) * scale), tf.linalg.matmul(m, (x_t + g_pp) * scale))
        grad_a, grad_b = to_a[0] + to_a[1], to_b[0] + to_b[1]

        def pairwise(m_i, p_i, sign):
            dm, dp = _tiled_backward(m_i, p_i, "fro2", tile_rows)
            return dp + sign * dm

        return (redo.replace(grad_a, lambda m_i, p_i: pairwise(m_i, p_i, 1.0), m, p, upstream),
                redo.replace(grad_b, lambda m_i, p_i: pairwise(m_i, p_i, -1.0), m, p, upstream))

    return total, backward


class _SampleSubset:
    """The samples of a batch flagged by a boolean (batch,) mask, redone one at a time.

    A loop over the flagged samples only (none: no iteration), with static shapes throughout (the
    flagged indices come first in a stable sort), so it compiles under XLA and costs nothing when
    no sample is flagged.
    """

    def __init__(self, flagged):
        self.count = tf.reduce_sum(tf.cast(flagged, tf.int32))
        self.order = tf.argsort(tf.cast(flagged, tf.int32), direction="DESCENDING", stable=True)

    def replace(self, values, fn, m, p, upstream=None):
        """`values` with the flagged samples' entries replaced by `fn(m[i:i+1], p[i:i+1])` (times
        `upstream[i]` when given)."""

        def body(j, out):
            i = self.order[j]
            new = fn(tf.gather(m, [i]), tf.gather(p, [i]))  # a static shape, which XLA needs
            if upstream is not None:
                new = new * upstream[i]
            return j + 1, tf.tensor_scatter_nd_update(out, [[i]], new)

        return tf.while_loop(lambda j, _: j < self.count, body, (tf.constant(0), values), parallel_iterations=1)[1]


def _exact_totals(x, y, method, fa_norm, tile_rows):
    """Per-sample `sum f(D_ij)` of the raw pixel rows x (teacher), y (student), with its gradient."""

    @tf.custom_gradient
    def totals(x, y):
        x, y = _unwatched(x, y)
        m, p, sq_x, sq_y = _difference_and_sum_forward(x, y)
        n = m.shape[1]
        if method == "gram":
            total, backward = _gram(m, p, tile_rows)
        elif _whole(n, tile_rows):
            total, backward = _whole_pairwise(m, p, fa_norm)
        else:
            total, backward = _tiled(m, p, fa_norm, tile_rows)

        def grad(upstream):
            grad_a, grad_b = backward(upstream)
            # Two calls, so that the teacher's, which nothing asks for in training, is pruned.
            return _through_unit(x, grad_a, sq_x), _through_unit(y, grad_b, sq_y)

        return total, grad

    return totals(x, y)


def feature_affinity_per_sample(teacher_map, student_map, method="auto", fa_norm="fro2", tile_rows=None):
    """Per-sample feature affinity loss: `||S_T - S_S||_F^2 / N^2` (eq. 6) or `sum|S_T - S_S| / N^2`.

    Args:
        teacher_map: `(batch, H_T, W_T, C_T)` teacher features; resized (bilinear) to the
            student's H, W when they differ.
        student_map: `(batch, H, W, C_S)` student features.
        method: `"auto"` (cheaper exact form for the shape), `"pairwise"` (N x N, in row tiles
            when N is large) or `"gram"` (C x C products; `fa_norm="fro2"` only).
        fa_norm: `"fro2"` (eq. 6) or `"l1"` (the authors' code).
        tile_rows: rows of S_T - S_S per tile of the pairwise form; None sizes tiles to
            `TILE_ELEMENTS_PER_SAMPLE` entries a sample. The result does not depend on it.

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
    options.check_fa_method(method, fa_norm, name="method")  # and fa_norm
    _check_tile_rows(tile_rows)
    teacher_map, student_map = _check_maps(teacher_map, student_map)
    teacher_map, student_map = _align(teacher_map, student_map)
    method = _resolve_method(
        method, fa_norm, _static_num_pixels(student_map.shape), teacher_map.shape[-1], student_map.shape[-1]
    )
    x, y = _rows_of_both(teacher_map, student_map)
    n = _num_pixels(x)
    return _exact_totals(x, y, method, fa_norm, tile_rows) / (n * n)


def feature_affinity(teacher_map, student_map, method="auto", fa_norm="fro2", tile_rows=None):
    """Feature affinity loss, averaged over the batch.

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
    return tf.reduce_mean(
        feature_affinity_per_sample(teacher_map, student_map, method=method, fa_norm=fa_norm, tile_rows=tile_rows)
    )


# ----------------------------------------------------------------------- fast feature affinity

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

    >>> bool(np.all(probe_seed(3, 1, 7).numpy() == probe_seed(3, 1, 7).numpy()))
    True
    >>> bool(np.any(probe_seed(3, 1, 7).numpy() != probe_seed(3, 1, 8).numpy()))
    True
    >>> probe_seed(3).numpy().tolist()  # no counters: the plain int seed
    [3, 0]
    """
    seed = options.check_seed(seed)
    if seed is None:
        raise ValueError("probe_seed needs an int seed; an owner given none draws one with options.fresh_seed().")
    stateless = tf.constant([seed % (2**31), 0], tf.int64)
    for counter in counters:
        stateless = tf.random.experimental.stateless_fold_in(stateless, tf.cast(counter, tf.int64))
    return stateless


def tap_key(teacher_layer, student_layer):
    """The `tap` of `probe_seed` for a tapped pair: a checksum of the two layer names (an int < 2^31).

    >>> tap_key("stage1", "stage1") == tap_key("stage1", "stage1") != tap_key("stage2", "stage2")
    True
    """
    return zlib.crc32(f"{teacher_layer}\x00{student_layer}".encode()) % (2**31)


def _stateless_seed(seed):
    """A shape-(2,) int64 stateless seed from None, an int, a (2,) seed tensor or a Generator."""
    if seed is None:
        seed = _module_generator()
    if isinstance(seed, tf.random.Generator):
        seed = seed.make_seeds(1)[:, 0]
    elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
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
        seed = tf.random.experimental.stateless_fold_in(seed, context.replica_id_in_sync_group)
    return seed


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
        seed: `None` (fresh probes from a generator private to this module), an int (same seed,
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
    teacher_map, student_map = _check_maps(teacher_map, student_map)
    teacher_map, student_map = _align(teacher_map, student_map)
    x, y = _rows_of_both(teacher_map, student_map)
    shape = tf.shape(x)
    z = tf.random.stateless_normal([1, shape[1], k], seed=_stateless_seed(seed))  # matmuls broadcast it
    n = _num_pixels(x)
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
        x, y, probes = _unwatched(x, y, z)
        m, p, sq_x, sq_y = _difference_and_sum_forward(x, y)
        pz = tf.linalg.matmul(p, probes, transpose_a=True)  # (batch, C, k)
        mz = tf.linalg.matmul(m, probes, transpose_a=True)
        u = 0.5 * (tf.linalg.matmul(m, pz) + tf.linalg.matmul(p, mz))  # D z, (batch, N, k)
        total = tf.reduce_sum(_entry_loss(u, fa_norm), axis=[1, 2])

        def grad(upstream):
            g = _entry_grad(u, fa_norm) * upstream[:, None, None]

            def side(rows, rows_z):  # G (R^T z)^T + z (G^T R) for the unit rows R
                return (tf.linalg.matmul(g, rows_z, transpose_b=True)
                        + tf.linalg.matmul(probes, tf.linalg.matmul(g, rows, transpose_a=True)))

            grad_a = side(0.5 * (p + m), 0.5 * (pz + mz))
            grad_b = -side(0.5 * (p - m), 0.5 * (pz - mz))
            return _through_unit(x, grad_a, sq_x), _through_unit(y, grad_b, sq_y)

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
    return tf.reduce_mean(fast_feature_affinity_per_sample(teacher_map, student_map, k=k, seed=seed, fa_norm=fa_norm))


# ------------------------------------------------------------------------------------------- KD


def kd_loss_per_sample(teacher_logits, student_logits, kd="mse", temperature=1.0):
    """Per-sample knowledge distillation loss on logits.

    Dense prediction (a segmentation net's `(batch, H, W, classes)`, a per-step `(batch, L, classes)`)
    takes the loss of each position over the last axis and averages it over the positions.

    Args:
        teacher_logits: `(batch, classes)`, or `(batch, positions..., classes)`.
        student_logits: the same shape as the teacher's.
        kd: `"mse"`: mean over classes of `(t - s)^2` on raw logits (temperature unused);
            `"kl"`: `KL(softmax(t/T) || softmax(s/T)) * T^2`.
        temperature: `T > 0`.

    Returns:
        float32 tensor of shape `(batch,)`.

    Example:

    >>> kd_loss_per_sample([[1.0, 2.0]], [[1.0, 4.0]], kd="mse").numpy()
    array([2.], dtype=float32)
    >>> kd_loss_per_sample([[[1.0, 2.0], [0.0, 0.0]]], [[[1.0, 4.0], [0.0, 0.0]]], kd="mse").numpy()  # 2 positions
    array([1.], dtype=float32)
    """
    options.check_kd(kd)
    temperature = options.check_temperature(temperature)
    teacher_logits, student_logits = _check_logits(teacher_logits, student_logits)
    t = tf.cast(teacher_logits, tf.float32)
    s = tf.cast(student_logits, tf.float32)
    if kd == "mse":
        return _mean_over_positions(tf.reduce_mean(tf.square(t - s), axis=-1))
    log_p = tf.nn.log_softmax(t / temperature, axis=-1)
    log_q = tf.nn.log_softmax(s / temperature, axis=-1)
    # The T^2 factor keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    per_position = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1) * (temperature * temperature)
    return _mean_over_positions(per_position)


def ce_loss_per_sample(labels, logits):
    """Per-sample cross-entropy of `logits` on `labels`, averaged over the positions of a dense prediction.

    Args:
        labels: integer classes of shape `(batch,)`/`(batch, 1)` for `(batch, classes)` logits, or
            `(batch, positions...)` (or with a trailing 1) for `(batch, positions..., classes)` logits;
            or one-hot/soft labels of the logits' shape.
        logits: `(batch, classes)` or `(batch, positions..., classes)`.

    Returns:
        float32 tensor of shape `(batch,)`.

    Example:

    >>> round(float(ce_loss_per_sample([[1, 0]], [[[0.0, 0.0], [0.0, 0.0]]])[0]), 4)  # ln 2 at each of 2 pixels
    0.6931
    """
    logits = tf.cast(_as_float_tensor(logits), tf.float32)
    y = tf.convert_to_tensor(labels)
    if logits.shape.rank is None or logits.shape.rank < 2:
        raise ValueError(f"logits must be (batch, classes) or (batch, ..., classes), got shape {logits.shape}.")
    if y.shape.rank == logits.shape.rank and y.shape[-1] == logits.shape[-1] and y.shape[-1] != 1:
        per_position = keras.losses.categorical_crossentropy(tf.cast(y, tf.float32), logits, from_logits=True)
        return _mean_over_positions(per_position)
    positions = logits.shape[1:-1]
    if y.shape.rank == logits.shape.rank and y.shape[-1] == 1:
        y = y[..., 0]
    if y.shape.rank != logits.shape.rank - 1 or not y.shape[1:].is_compatible_with(positions):
        raise ValueError(
            f"labels of shape {y.shape} do not fit logits of shape {logits.shape}; give one integer class per "
            f"position, shape {('batch', *positions)}, or one-hot labels of the logits' shape."
        )
    per_position = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
    return _mean_over_positions(tf.reshape(per_position, tf.shape(logits)[:-1]))


def kd_loss(teacher_logits, student_logits, kd="mse", temperature=1.0):
    """Knowledge distillation loss on logits, averaged over the batch.

    See `kd_loss_per_sample` for the arguments.

    Returns:
        float32 scalar.

    Example:

    >>> round(float(kd_loss([[0.0, 0.0]], [[0.0, 0.0]], kd="kl", temperature=4.0)), 6)
    0.0
    """
    return tf.reduce_mean(kd_loss_per_sample(teacher_logits, student_logits, kd, temperature))


# ------------------------------------------------------------------------------ Keras wrappers


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

    def __init__(self, method="auto", fa_norm="fro2", name="feature_affinity", reduction="sum_over_batch_size",
                 dtype=None):
        options.check_fa_norm(fa_norm)
        options.check_fa_method(method, fa_norm, name="method")
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.method = method
        self.fa_norm = fa_norm

    def call(self, y_true, y_pred):
        return feature_affinity_per_sample(y_true, y_pred, method=self.method, fa_norm=self.fa_norm)

    def get_config(self):
        return {**super().get_config(), "method": self.method, "fa_norm": self.fa_norm, "dtype": self.dtype}


class ProbeCounter:
    """The probe seeds of a loss object that sees no training step: `probe_seed(seed, tap, calls)`,
    `calls` counting this object's calls (a variable made on first use, outside any `tf.function`).

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

    def __init__(self, k=15, seed=None, fa_norm="fro2", name="fast_feature_affinity",
                 reduction="sum_over_batch_size", dtype=None):
        self.k = options.check_k(k)
        self.seed = options.check_seed(seed)
        self.fa_norm = options.check_fa_norm(fa_norm)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._probes = ProbeCounter(self.seed)

    def call(self, y_true, y_pred):
        return fast_feature_affinity_per_sample(y_true, y_pred, k=self.k, seed=self._probes.next_seed(0),
                                                fa_norm=self.fa_norm)

    def get_config(self):
        return {**super().get_config(), "k": self.k, "seed": self.seed, "fa_norm": self.fa_norm, "dtype": self.dtype}


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

    def __init__(self, kd="mse", temperature=1.0, name="kd_loss", reduction="sum_over_batch_size", dtype=None):
        options.check_kd(kd)
        self.temperature = options.check_temperature(temperature)
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.kd = kd

    def call(self, y_true, y_pred):
        return kd_loss_per_sample(y_true, y_pred, kd=self.kd, temperature=self.temperature)

    def get_config(self):
        return {**super().get_config(), "kd": self.kd, "temperature": self.temperature, "dtype": self.dtype}
