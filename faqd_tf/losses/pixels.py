"""Feature maps as the unit pixel rows that exact and fast FA both work on.

Each pixel's channel vector is normalized to unit length (a teacher map of another H, W is first
resized, bilinear, to the student's). With `A`, `B` the unit rows of teacher and student (the
narrower padded with zero channels, which leaves its affinity unchanged), `M = A - B` and
`P = A + B` are formed from the raw difference and sum of the maps, so that
`D = S_T - S_S = (M P^T + P M^T) / 2` is small exactly when `M` is: nothing cancels when the student
is close to the teacher. Everything runs in float32 (bfloat16/float16 maps are cast up).

>>> t, s = tf.ones([2, 4, 4, 3]), tf.ones([2, 4, 4, 5])
>>> [rows.shape.as_list() for rows in rows_of_both(t, s)]
[[2, 16, 5], [2, 16, 5]]
>>> m, p, _, _ = difference_and_sum(*rows_of_both(t, t))
>>> float(tf.reduce_max(tf.abs(m))), round(float(tf.reduce_max(p)), 4)  # M = 0, P = 2 A
(0.0, 1.1547)
"""

import tensorflow as tf

# Guards the squared norm of an all-zero channel vector (dead ReLU pixel); such a pixel maps to the
# zero vector instead of NaN.
NORM_EPSILON = 1e-12


def as_float_tensor(x):
    x = tf.convert_to_tensor(x)
    if not x.dtype.is_floating:
        x = tf.cast(x, tf.float32)
    return x


def check_maps(teacher_map, student_map):
    teacher_map = as_float_tensor(teacher_map)
    student_map = as_float_tensor(student_map)
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


def align(teacher_map, student_map):
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


def unwatched(*tensors):
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


def rows_of_both(teacher_map, student_map):
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
def difference_and_sum(x, y):
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
def through_unit(raw, upstream, squared):
    """The gradient through `A = raw / |raw|` of `upstream` (the gradient for A):
    (upstream - A <A, upstream>) / |raw|. Below the epsilon the scale is a constant, so nothing is
    projected out."""
    inv_norm = tf.math.rsqrt(tf.maximum(squared, NORM_EPSILON))
    coef = tf.where(squared > NORM_EPSILON, _row_dot(raw, upstream) * inv_norm * inv_norm, 0.0)
    return upstream * inv_norm - raw * (coef * inv_norm)


def num_pixels(m):
    return tf.cast(tf.shape(m)[1], tf.float32)


def entry_loss(d, fa_norm):
    return tf.abs(d) if fa_norm == "l1" else tf.square(d)


def entry_grad(d, fa_norm):
    return tf.sign(d) if fa_norm == "l1" else 2.0 * d
