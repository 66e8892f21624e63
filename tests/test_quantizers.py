"""Quantizers against an independent float64 NumPy implementation of the paper's formulas."""

import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import quantizers
from faqd_tf.quantizers import quantize_weights, quantized_relu
from tests.references import np_qrelu, np_qrelu_grads, np_quantize

# ---- the op under test, with its gradients ----------------------------------------------------


def qrelu_grads(x, alpha, bits, dy, **kwargs):
    """(y, dL/dx, dL/dalpha) of L = sum(quantized_relu(x) * dy)."""
    xt, at = tf.constant(x), tf.constant(alpha, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch([xt, at])
        y = quantized_relu(xt, at, bits, **kwargs)
        loss = tf.reduce_sum(y * tf.cast(dy, y.dtype))
    gx, ga = tape.gradient(loss, [xt, at])
    return y.numpy(), gx.numpy(), ga.numpy()


# ---- weight quantization --------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_quantizer_matches_numpy(rng, bits, per_channel):
    w = rng.normal(0, 0.1, size=(3, 3, 8, 16)).astype(np.float32)
    got = quantize_weights(w, bits, per_channel=per_channel).numpy()
    want = np_quantize(w, bits, per_channel)
    # Lloyd's iteration is discrete: a weight at a rounding tie (|w|/s = k + 1/2 to float32 precision)
    # may take the other code in float32 and lead its group to a neighbouring fixed point (seen: 1
    # channel in 300 draws at 8 bits, 1.4% more squared error). Such a group must fit w about as well.
    w64 = w.astype(np.float64).reshape(-1, 16)
    g64, r64 = got.astype(np.float64).reshape(-1, 16), want.reshape(-1, 16)
    groups = [np.s_[:, i] for i in range(16)] if per_channel else [np.s_[:, :]]
    diverged = 0
    for g in groups:
        if not np.allclose(g64[g], r64[g], rtol=2e-5, atol=1e-7):
            diverged += 1
            assert np.sum((w64[g] - g64[g]) ** 2) <= 1.05 * np.sum((w64[g] - r64[g]) ** 2)
    assert diverged <= max(1, len(groups) // 8), (
        f"{diverged} of {len(groups)} groups differ from the reference"
    )
    # Levels: at most 2L+1 distinct values per scale group (2 for 1 bit).
    max_values = 2 if bits == 1 else 2 * quantizers.levels(bits) + 1
    groups = got.reshape(-1, 16).T if per_channel else [got.ravel()]
    for g in groups:
        assert len(np.unique(g)) <= max_values


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_least_squares_scale_beats_max_abs(rng, bits, per_channel):
    w = rng.standard_t(df=4, size=(64, 32)).astype(np.float64)
    axes = (0,) if per_channel else (0, 1)
    L = quantizers.levels(bits)
    s_max = np.max(np.abs(w), axis=axes, keepdims=True) / L
    max_abs_err = np.sum((w - np.sign(w) * np.clip(np.round(np.abs(w) / s_max), 0, L) * s_max) ** 2)
    ls_err = np.sum((w - quantize_weights(w.astype(np.float32), bits, per_channel).numpy()) ** 2)
    assert ls_err <= max_abs_err * (1 + 1e-6)


def test_ternary_has_three_levels_and_binary_two(rng):
    w = rng.normal(size=(200,)).astype(np.float32)
    assert len(np.unique(quantize_weights(w, 2).numpy())) == 3
    q1 = quantize_weights(w, 1).numpy()
    np.testing.assert_allclose(np.unique(np.abs(q1)), [np.mean(np.abs(w))], rtol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_weight_ste_is_identity(rng, bits):
    w = tf.constant(rng.normal(size=(5, 7)).astype(np.float32))
    dy = rng.normal(size=(5, 7)).astype(np.float32)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = tf.reduce_sum(quantize_weights(w, bits, per_channel=True) * dy)
    np.testing.assert_array_equal(tape.gradient(y, w).numpy(), dy)


def test_binary_relax_blend_and_ste(rng):
    w = tf.constant(rng.normal(size=(4, 6)).astype(np.float32))
    lam = 3.0
    with tf.GradientTape() as tape:
        tape.watch(w)
        u = quantizers.binary_relax(w, lam, bits=2)
        y = tf.reduce_sum(u)
    want = (w.numpy() + lam * np_quantize(w.numpy(), 2)) / (1 + lam)
    np.testing.assert_allclose(u.numpy(), want, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(tape.gradient(y, w).numpy(), np.ones((4, 6), np.float32))


# ---- quantized ReLU -------------------------------------------------------------------------


def test_quantized_relu_hand_worked_two_bits():
    # Eq. (4) with b = 2, alpha = 0.5: steps at 0, 0.5, 1.0; top level 3*alpha = 1.5.
    x = tf.constant([-0.3, 0.0, 0.2, 0.5, 0.7, 1.0, 1.49, 1.5, 4.0])
    want = [0.0, 0.5, 0.5, 1.0, 1.0, 1.5, 1.5, 1.5, 1.5]
    np.testing.assert_allclose(quantized_relu(x, 0.5, 2).numpy(), want)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("alpha_rate", [None, 0.01, 1.0])
def test_quantized_relu_forward_and_eq5_gradients(rng, bits, alpha_rate):
    alpha = float(np.float32(rng.uniform(0.05, 0.6)))
    # The op compares x with (2^b - 1) * alpha formed in float32; the boundary point is that value.
    top = float(np.float32(2**bits - 1) * np.float32(alpha))
    # Cover x <= 0, the inside, x >= top, and the boundaries x = 0 and x = top exactly.
    x = np.concatenate(
        [
            rng.uniform(-2, 0, 50),
            rng.uniform(0, top, 200),
            rng.uniform(top, top + 3, 50),
            [0.0, top, -0.0],
        ]
    ).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    y, gx, ga = qrelu_grads(x, alpha, bits, dy, alpha_rate=alpha_rate)
    np.testing.assert_allclose(y, np_qrelu(x.astype(np.float64), alpha, bits), rtol=1e-5, atol=1e-6)
    want_dx, want_da = np_qrelu_grads(
        x.astype(np.float64), alpha, bits, dy.astype(np.float64), top, alpha_rate
    )
    np.testing.assert_allclose(gx, want_dx, rtol=0, atol=0)
    # The alpha gradient is a float32 sum of terms of both signs: its rounding scales with their sizes.
    term_sizes = np.sum(np.abs(dy)) * (2**bits - 1) * (1.0 if alpha_rate is None else alpha_rate)
    np.testing.assert_allclose(ga, want_da, rtol=1e-5, atol=1e-6 * term_sizes)
    # The boundary points: x = 0 passes no gradient, x = top passes none to x and 2^b-1 to alpha.
    assert gx[-3] == 0 and gx[-2] == 0


def test_alpha_gradient_hand_worked_raw_scaled_and_clamped():
    # b = 2, alpha = 0.5, so the top level is 3 * alpha = 1.5. Eq. (5) per activation:
    #   x = -0.4, 0.0      -> x <= 0            -> 0
    #   x = 0.3, 0.9, 1.2  -> 0 < x < 1.5       -> 2^(b-1) = 2
    #   x = 1.5, 3.0       -> x >= 1.5          -> 2^b - 1 = 3
    x = np.array([-0.4, 0.0, 0.3, 0.9, 1.2, 1.5, 3.0], np.float32)
    dy = np.array([5.0, 7.0, 1.0, -2.0, 3.0, 4.0, -1.0], np.float32)
    # Raw sum: 0*5 + 0*7 + 2*(1 - 2 + 3) + 3*(4 - 1) = 4 + 9 = 13.
    _, gx, raw = qrelu_grads(x, 0.5, 2, dy, alpha_rate=None)
    assert raw == pytest.approx(13.0)
    np.testing.assert_array_equal(gx, [0.0, 0.0, 1.0, -2.0, 3.0, 0.0, 0.0])
    # The authors' default: 13 * 0.01 = 0.13, inside [-1, 1]: the clamp does not bite.
    assert qrelu_grads(x, 0.5, 2, dy)[2] == pytest.approx(0.13)
    # Ten times the upstream gradient: 130 * 0.01 = 1.3 -> clamped to 1 (and -1.3 -> -1).
    assert qrelu_grads(x, 0.5, 2, 10 * dy)[2] == pytest.approx(1.0)
    assert qrelu_grads(x, 0.5, 2, -10 * dy)[2] == pytest.approx(-1.0)
    # The same data at alpha_rate=0.05: 130 * 0.05 = 6.5 -> 1; 13 * 0.05 = 0.65 is left alone.
    assert qrelu_grads(x, 0.5, 2, 10 * dy, alpha_rate=0.05)[2] == pytest.approx(1.0)
    assert qrelu_grads(x, 0.5, 2, dy, alpha_rate=0.05)[2] == pytest.approx(0.65)
    # alpha_rate=1.0 is the raw gradient while that lies in [-1, 1] (0.05 * 13 = 0.65), clamped beyond.
    assert qrelu_grads(x, 0.5, 2, 0.05 * dy, alpha_rate=1.0)[2] == pytest.approx(0.65)
    assert qrelu_grads(x, 0.5, 2, dy, alpha_rate=1.0)[2] == pytest.approx(1.0)
    # The gradient to x does not depend on alpha_rate.
    np.testing.assert_array_equal(qrelu_grads(x, 0.5, 2, dy)[1], gx)


def test_alpha_gradient_is_summed_in_float32_for_bfloat16_inputs(rng):
    # 20,000 bfloat16 activations: a bfloat16 running sum would lose most of the small terms.
    x = tf.cast(tf.constant(rng.uniform(-0.5, 2.0, size=(20000,)).astype(np.float32)), tf.bfloat16)
    dy = tf.cast(tf.constant(rng.uniform(0.0, 1e-3, size=(20000,)).astype(np.float32)), tf.bfloat16)
    alpha = float(np.float32(rng.uniform(0.2, 0.5)))
    at = tf.constant(alpha, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(at)
        loss = tf.reduce_sum(tf.cast(quantized_relu(x, at, 2, alpha_rate=None) * dy, tf.float32))
    ga = tape.gradient(loss, at)
    assert ga.dtype == tf.float32
    x64, dy64 = (tf.cast(t, tf.float64).numpy() for t in (x, dy))
    top = float(np.float32(3.0) * np.float32(alpha))
    np.testing.assert_allclose(ga.numpy(), np_qrelu_grads(x64, alpha, 2, dy64, top)[1], rtol=1e-5)


def test_quantized_relu_at_most_2b_levels(rng):
    x = rng.normal(0, 2, size=(1000,)).astype(np.float32)
    for bits in (1, 2, 4):
        assert len(np.unique(quantized_relu(x, 0.3, bits).numpy())) <= 2**bits


# ---- validation and registry ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 0, 16, 2.0, True, "4"])
def test_bad_bits_name_the_allowed_values(bits):
    with pytest.raises(ValueError, match=r"bits=.*use one of 1, 2, 4, 8"):
        quantize_weights(np.ones((2, 2), np.float32), bits)


@pytest.mark.parametrize("alpha_rate", [0, 0.0, -0.01, "0.01", True, float("inf"), float("nan")])
def test_bad_alpha_rate_is_one_line_naming_it(alpha_rate):
    with pytest.raises(
        ValueError, match=r"^alpha_rate=.* is not valid; use a number > 0 .* or None"
    ) as error:
        quantized_relu(tf.constant([1.0]), 0.5, 2, alpha_rate=alpha_rate)
    assert "\n" not in str(error.value)


def test_bad_alpha_and_per_channel_without_channels():
    with pytest.raises(ValueError, match=r"alpha=-0.5 .*\[0.001, 5.0\]"):
        quantized_relu(tf.constant([1.0]), -0.5, 2)
    with pytest.raises(
        ValueError, match="per_channel=True needs a kernel with an output-channel axis"
    ):
        quantize_weights(np.arange(1.0, 5.0, dtype=np.float32), 4, per_channel=True)


def test_registry_names_and_configs():
    assert quantizers.get("ste_sign").bits == 1
    assert quantizers.get("ternary").bits == 2
    q = quantizers.get("int4_per_channel")
    assert (q.bits, q.per_channel) == (4, True)
    again = quantizers.get(quantizers.serialize(q))
    assert isinstance(again, quantizers.WeightQuantizer) and again.get_config() == q.get_config()
    with pytest.raises(ValueError, match="Unknown quantizer 'int3'; use one of"):
        quantizers.get("int3")


@pytest.mark.parametrize("bits, per_channel", [(1, False), (2, True), (4, False), (8, True)])
def test_frozen_quantizer_is_identity_and_recovers_the_codes(rng, bits, per_channel):
    w = rng.normal(size=(3, 3, 4, 5)).astype(np.float32)
    codes, scale = quantizers.weight_codes(w, bits, per_channel)
    kernel = (codes * scale).numpy()
    frozen = quantizers.FrozenQuantizer(bits, per_channel, scale.numpy())
    np.testing.assert_array_equal(frozen(kernel), kernel)
    np.testing.assert_array_equal(frozen.relaxed(kernel, 3.0), kernel)
    again, again_scale = frozen.codes(kernel)
    np.testing.assert_array_equal(again, codes)
    np.testing.assert_array_equal(again_scale, scale)
    assert frozen.precision == bits and isinstance(frozen, quantizers.BaseWeightQuantizer)
    restored = quantizers.get(quantizers.serialize(frozen))
    assert (
        type(restored) is quantizers.FrozenQuantizer
        and restored.get_config() == frozen.get_config()
    )
    assert quantizers.get(frozen) is frozen


def test_frozen_quantizer_bad_scales():
    with pytest.raises(ValueError, match="A layer-wise FrozenQuantizer has one scale, got 2"):
        quantizers.FrozenQuantizer(2, False, [0.5, 0.25])
    with pytest.raises(ValueError, match="no scales; its codes are unknown"):
        quantizers.FrozenQuantizer(2).codes(np.ones((2, 2), np.float32))
    with pytest.raises(ValueError, match="Kernel has 2 channels but the quantizer 3 scales"):
        quantizers.FrozenQuantizer(2, True, [1.0, 1.0, 1.0]).codes(np.ones((2, 2), np.float32))


def test_frozen_quantizer_of_two_kernels(rng):
    # A frozen QuantSeparableConv2D: one quantizer, each kernel's scales under its name.
    depthwise = rng.normal(size=(3, 3, 1, 6)).astype(np.float32)
    pointwise = rng.normal(size=(1, 1, 6, 4)).astype(np.float32)
    (dw_codes, dw_scale), (pw_codes, pw_scale) = (
        quantizers.weight_codes(w, 2, True) for w in (depthwise, pointwise)
    )
    frozen = quantizers.FrozenQuantizer(
        2, True, {"depthwise_kernel": dw_scale.numpy(), "pointwise_kernel": pw_scale.numpy()}
    )
    for name, codes, scale in (
        ("depthwise_kernel", dw_codes, dw_scale),
        ("pointwise_kernel", pw_codes, pw_scale),
    ):
        again, again_scale = frozen.for_kernel(name).codes((codes * scale).numpy())
        np.testing.assert_array_equal(again, codes)
        np.testing.assert_array_equal(again_scale, scale)
    restored = quantizers.get(quantizers.serialize(frozen))
    assert restored.get_config() == frozen.get_config()
    assert sorted(restored.scale) == ["depthwise_kernel", "pointwise_kernel"]
    with pytest.raises(ValueError, match="scales of 2 kernels .*take one with for_kernel"):
        frozen.codes(depthwise)
    with pytest.raises(ValueError, match="not of 'kernel'"):
        frozen.for_kernel("kernel")
    with pytest.raises(ValueError, match="A layer-wise FrozenQuantizer has one scale, got 2"):
        quantizers.FrozenQuantizer(
            2, False, {"depthwise_kernel": [0.5], "pointwise_kernel": [1, 2]}
        )
