"""Knowledge distillation on logits (MSE or temperature KL), and the cross-entropy on labels."""

import keras
import tensorflow as tf

from faqd_tf import options
from faqd_tf.losses.pixels import as_float_tensor


def _check_logits(teacher_logits, student_logits):
    teacher_logits = as_float_tensor(teacher_logits)
    student_logits = as_float_tensor(student_logits)
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
    per_position = tf.reduce_sum(tf.exp(log_p) * (log_p - log_q), axis=-1) * (
        temperature * temperature
    )
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
    logits = tf.cast(as_float_tensor(logits), tf.float32)
    y = tf.convert_to_tensor(labels)
    if logits.shape.rank is None or logits.shape.rank < 2:
        raise ValueError(
            f"logits must be (batch, classes) or (batch, ..., classes), got shape {logits.shape}."
        )
    if y.shape.rank == logits.shape.rank and y.shape[-1] == logits.shape[-1] and y.shape[-1] != 1:
        per_position = keras.losses.categorical_crossentropy(
            tf.cast(y, tf.float32), logits, from_logits=True
        )
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
