"""Float64 NumPy references of the paper's quantizers, shared by the quantizer, layer and
quantize_model tests (eqs. 1, 4 and 5 of arXiv 2302.10899, written out independently)."""

import numpy as np

from faqd_tf import quantizers


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
        err = lambda s: np.sum((a - np.clip(np.round(a / s), 0, L) * s) ** 2, axis=axes, keepdims=True)
        scale = np.where(err(twn) < err(scale), twn, scale)
    return sign * np.clip(np.round(a / scale), 0, L) * scale


def np_qrelu(x, alpha, bits):
    top = 2**bits - 1
    k = np.clip(np.floor(x / alpha) + 1, 0, top)
    return np.where(x < 0, 0.0, k * alpha)


def np_qrelu_grads(x, alpha, bits, dy, top=None, alpha_rate=None):
    top = (2**bits - 1) * alpha if top is None else top
    inside = (x > 0) & (x < top)
    dx = np.where(inside, dy, 0.0)
    dsig = np.where(inside, 2 ** (bits - 1), np.where(x >= top, 2**bits - 1, 0.0))
    dalpha = np.sum(dy * dsig)
    # The authors' rule: the summed gradient times rate_factor, clamped to [-1, 1].
    return dx, dalpha if alpha_rate is None else np.clip(alpha_rate * dalpha, -1.0, 1.0)
