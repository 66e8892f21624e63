"""Float64 NumPy references of the paper's formulas, written out independently: the quantizers
(eqs. 1, 4 and 5 of arXiv 2302.10899; quantizer, layer and quantize_model tests) and the feature
affinity loss with its gradient (eq. 6; loss and real-data tests)."""

import numpy as np

from faqd_tf import losses, quantizers


def np_lloyd(abs_w, scale, n_levels, axes, iterations):
    for _ in range(iterations):
        q = np.clip(np.round(abs_w / np.maximum(scale, 1e-12)), 0, n_levels)
        num = np.sum(abs_w * q, axis=axes, keepdims=True)
        den = np.sum(q * q, axis=axes, keepdims=True)
        scale = np.where(den > 0, num / np.maximum(den, 1e-12), scale)
    return scale


def np_quantize(w, bits, per_channel=False, iterations=quantizers.LLOYD_ITERATIONS):
    w = np.asarray(w, np.float64)
    axes = tuple(range(w.ndim - 1)) if per_channel else tuple(range(w.ndim))
    sign = np.where(w >= 0, 1.0, -1.0)
    a = np.abs(w)
    if bits == 1:
        return sign * np.mean(a, axis=axes, keepdims=True)
    L = 2 ** (bits - 1) - 1
    scale = np_lloyd(a, np.max(a, axis=axes, keepdims=True) / L, L, axes, iterations)
    if bits == 2:
        twn = np_lloyd(a, 1.4 * np.mean(a, axis=axes, keepdims=True), L, axes, iterations)

        def err(s):
            return np.sum((a - np.clip(np.round(a / s), 0, L) * s) ** 2, axis=axes, keepdims=True)

        scale = np.where(err(twn) < err(scale), twn, scale)
    return sign * np.clip(np.round(a / scale), 0, L) * scale


def np_qrelu(x, alpha, bits):
    top = 2**bits - 1
    k = np.clip(np.floor(x / alpha) + 1, 0, top)
    return np.where(x < 0, 0.0, k * alpha)


def np_qrelu_grads(x, alpha, bits, dy, top=None, alpha_rate=None, two_sided=False):
    top = (2**bits - 1) * alpha if top is None else top
    inside = (x > 0) & (x < top)
    # two_sided: the input gradient also on (-alpha, 0]; alpha's stays eq. (5)'s.
    dx = np.where(((x > -alpha) & (x < top)) if two_sided else inside, dy, 0.0)
    dsig = np.where(inside, 2 ** (bits - 1), np.where(x >= top, 2**bits - 1, 0.0))
    dalpha = np.sum(dy * dsig)
    # The authors' rule: the summed gradient times rate_factor, clamped to [-1, 1].
    return dx, dalpha if alpha_rate is None else np.clip(alpha_rate * dalpha, -1.0, 1.0)


# ---- feature affinity (eq. 6) ---------------------------------------------------------------


def np_pixels(x):
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    sq = np.sum(x * x, axis=-1, keepdims=True)
    return x, x / np.sqrt(np.maximum(sq, losses.NORM_EPSILON))


def np_affinity_diff(t, s):
    _, a = np_pixels(t)
    _, b = np_pixels(s)
    return a @ a.transpose(0, 2, 1) - b @ b.transpose(0, 2, 1)


def np_fa_per_sample(t, s, fa_norm="fro2"):
    d = np_affinity_diff(t, s)
    n = d.shape[1]
    return (
        np.sum(np.abs(d), axis=(1, 2)) if fa_norm == "l1" else np.sum(d * d, axis=(1, 2))
    ) / n**2


def np_fa_grad(t, s, fa_norm="fro2", wrt="student", weight=None):
    """d mean_b(L_b) / d student_map (or teacher_map), analytic: through S = F F^T and the normalization.

    `weight` overrides dL/dD (as a function of D), e.g. to bound the effect of ambiguous L1 signs.
    """
    d = np_affinity_diff(t, s)
    if wrt == "teacher":  # L is symmetric in the two maps
        d, s = -d, t
    raw, b = np_pixels(s)
    batch, n, _ = b.shape
    if weight is None:
        weight = (lambda x: 2.0 * np.sign(x)) if fa_norm == "l1" else (lambda x: 4.0 * x)
    g = -(weight(d) @ b) / (n**2 * batch)  # d L / d B
    sq = np.sum(raw * raw, axis=-1, keepdims=True)
    # Below the epsilon a pixel's scale is the constant 1 / sqrt(eps) (as in np_pixels): an
    # all-zero pixel (a ReLU map has them) passes g through scaled, with nothing projected out.
    with np.errstate(divide="ignore", invalid="ignore"):
        projected = (g - b * np.sum(b * g, axis=-1, keepdims=True)) / np.sqrt(sq)
    grad = np.where(sq > losses.NORM_EPSILON, projected, g / np.sqrt(losses.NORM_EPSILON))
    return grad.reshape(np.shape(s))


def central_differences(f, x, h=1e-6):
    """The gradient of the scalar `f` at `x` (float64) by central differences, element by element."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad
