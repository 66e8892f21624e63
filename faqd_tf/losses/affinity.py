"""Exact feature affinity (eq. 6 of arXiv 2302.10899) from `M` and `P` (`faqd_tf.losses.pixels`).

Evaluations (`fa_method`):

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
Each form is a pair (forward, backward) on M and P: the forward returns the per-sample totals and a
`backward(upstream)` that returns the gradients for the unit rows A (teacher) and B (student). Two
separate results, so that the teacher's, which training never asks for, is pruned from the graph.
"""

import numpy as np
import tensorflow as tf

from faqd_tf import options
from faqd_tf.losses import pixels

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


def _check_tile_rows(tile_rows):
    if tile_rows is not None and (not options.is_integer(tile_rows) or tile_rows < 1):
        raise ValueError(
            f"tile_rows={tile_rows!r} is not supported; use None (automatic) or an integer >= 1."
        )
    return tile_rows


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
    options.check_fa_method(method, fa_norm, name="method")  # and fa_norm
    t, s = tf.TensorShape(teacher_map_shape), tf.TensorShape(student_map_shape)
    return _resolve_method(method, fa_norm, _static_num_pixels(s), t[-1], s[-1])


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
    rows = (
        tf.constant(tile_rows)
        if tile_rows
        else tf.maximum(1, TILE_ELEMENTS_PER_SAMPLE // tf.maximum(n, 1))
    )
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
        m_j, p_j = mp[:, i * rows : (i + 1) * rows], pp[:, i * rows : (i + 1) * rows]
        d = tf.linalg.matmul(m_j, p, transpose_b=True) + tf.linalg.matmul(p_j, m, transpose_b=True)
        return 0.5 * d, m_j, p_j  # (batch, rows, N)

    return tile_of_d, loops


def _tiled_forward(m, p, fa_norm, tile_rows=None, active=None):
    """Per-sample `sum f(D_ij)`, one row tile of D at a time. With `active` (a boolean scalar) false
    the loop runs no tile and the result is zero: a fallback that costs nothing when unused."""
    tile_of_d, loops = _tiles(m, p, tile_rows, active)

    def forward(i, acc):
        return i + 1, acc + tf.reduce_sum(pixels.entry_loss(tile_of_d(i)[0], fa_norm), axis=[1, 2])

    return tf.while_loop(
        lambda i, _: i < loops,
        forward,
        (tf.constant(0), tf.zeros_like(m[:, 0, 0])),
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
        g = pixels.entry_grad(d, fa_norm)
        return (
            i + 1,
            dm + tf.linalg.matmul(g, p_j, transpose_a=True),
            dp + tf.linalg.matmul(g, m_j, transpose_a=True),
        )

    _, dm, dp = tf.while_loop(
        lambda i, *_: i < loops,
        backward,
        (tf.constant(0), tf.zeros_like(m), tf.zeros_like(p)),
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
    total = tf.reduce_sum(pixels.entry_loss(d, fa_norm), axis=[1, 2])

    def backward(upstream):
        g = pixels.entry_grad(d, fa_norm) * (2.0 * upstream[:, None, None])
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
    terms = 0.5 * (
        tf.reduce_sum(tf.abs(first), axis=[1, 2]) + tf.reduce_sum(tf.abs(second), axis=[1, 2])
    )
    error = _FLOAT32_EPS * tf.sqrt(pixels.num_pixels(m)) * terms
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
    teacher_map, student_map = pixels.align(*pixels.check_maps(teacher_map, student_map))
    m, p, _, _ = pixels.difference_and_sum(*pixels.rows_of_both(teacher_map, student_map))
    _, total, error = _gram_products(m, p)
    return tf.where(
        total > 0.0, error / tf.maximum(total, 1e-30), tf.where(error > 0.0, np.inf, 0.0)
    )


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
    total = redo.replace(
        tf.maximum(total, 0.0),  # rounding can leave a tiny negative for identical affinities
        lambda m_i, p_i: _tiled_forward(m_i, p_i, "fro2", tile_rows),
        m,
        p,
    )

    def backward(upstream):
        # The upstream factor applied to the C x C factors, not to the N x C results.
        scale = upstream[:, None, None]
        to_b = (tf.linalg.matmul(p, (g_mm - x) * scale), tf.linalg.matmul(m, (x_t - g_pp) * scale))
        to_a = (tf.linalg.matmul(p, (g_mm + x) * scale), tf.linalg.matmul(m, (x_t + g_pp) * scale))
        grad_a, grad_b = to_a[0] + to_a[1], to_b[0] + to_b[1]

        def pairwise(m_i, p_i, sign):
            dm, dp = _tiled_backward(m_i, p_i, "fro2", tile_rows)
            return dp + sign * dm

        return (
            redo.replace(grad_a, lambda m_i, p_i: pairwise(m_i, p_i, 1.0), m, p, upstream),
            redo.replace(grad_b, lambda m_i, p_i: pairwise(m_i, p_i, -1.0), m, p, upstream),
        )

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
                # A gather, not `upstream[i]`: with the slice, XLA took the step's inputs as
                # compile-time constants and recompiled the whole step for every new batch
                # (issue 34: `jit_compile=True` with exact FA seemed to hang).
                new = new * tf.reshape(tf.gather(upstream, [i]), [1] * new.shape.rank)
            return j + 1, tf.tensor_scatter_nd_update(out, [[i]], new)

        return tf.while_loop(
            lambda j, _: j < self.count, body, (tf.constant(0), values), parallel_iterations=1
        )[1]


def _exact_totals(x, y, method, fa_norm, tile_rows):
    """Per-sample `sum f(D_ij)` of the raw pixel rows x (teacher), y (student), with its gradient."""

    @tf.custom_gradient
    def totals(x, y):
        x, y = pixels.unwatched(x, y)
        m, p, sq_x, sq_y = pixels.difference_and_sum(x, y)
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
            return pixels.through_unit(x, grad_a, sq_x), pixels.through_unit(y, grad_b, sq_y)

        return total, grad

    return totals(x, y)


def feature_affinity_per_sample(
    teacher_map, student_map, method="auto", fa_norm="fro2", tile_rows=None
):
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
    teacher_map, student_map = pixels.check_maps(teacher_map, student_map)
    teacher_map, student_map = pixels.align(teacher_map, student_map)
    method = _resolve_method(
        method,
        fa_norm,
        _static_num_pixels(student_map.shape),
        teacher_map.shape[-1],
        student_map.shape[-1],
    )
    x, y = pixels.rows_of_both(teacher_map, student_map)
    n = pixels.num_pixels(x)
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
        feature_affinity_per_sample(
            teacher_map, student_map, method=method, fa_norm=fa_norm, tile_rows=tile_rows
        )
    )
