"""Quantized layers: forward values, training, saving, distribution, validation."""

import json
import zipfile

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import quantizers
from faqd_tf.callbacks import BinaryRelaxScheduler
from faqd_tf.layers import (
    QuantConv1D,
    QuantConv2D,
    QuantConv2DTranspose,
    QuantConv3D,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantReLU,
    QuantSeparableConv2D,
)
from tests.references import np_qrelu, np_qrelu_grads, np_quantize


def np_conv_valid(x, k):
    """float64 'valid', stride-1 2-D convolution (cross-correlation as Keras does)."""
    kh, kw, _, _ = k.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, k.shape[-1]))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            out[:, i, j, :] = np.tensordot(
                x[:, i : i + kh, j : j + kw, :], k, axes=([1, 2, 3], [0, 1, 2])
            )
    return out


@pytest.mark.parametrize("bits", [None, 1, 2, 4, 8])
@pytest.mark.parametrize("per_channel", [False, True])
def test_quant_conv2d_forward_matches_numpy(rng, bits, per_channel):
    if bits is None and per_channel:
        pytest.skip("per_channel needs bits")
    layer = QuantConv2D(
        5, 3, weight_bits=bits, per_channel=per_channel, bias_initializer="random_normal"
    )
    x = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    y = layer(x).numpy()
    k = layer.kernel.numpy().astype(np.float64)
    qk = k if bits is None else np_quantize(k, bits, per_channel)
    want = np_conv_valid(x.astype(np.float64), qk) + layer.bias.numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_quant_dense_and_relu_forward_match_numpy(rng, bits):
    dense = QuantDense(6, weight_bits=bits, per_channel=True)
    relu = QuantReLU(bits=bits)
    x = rng.normal(size=(4, 9)).astype(np.float32)
    y = relu(dense(x)).numpy()
    pre = x.astype(np.float64) @ np_quantize(dense.kernel.numpy(), bits, True) + dense.bias.numpy()
    np.testing.assert_allclose(
        y, np_qrelu(pre, float(relu.alpha.numpy()), bits), rtol=1e-5, atol=1e-5
    )
    assert float(relu.alpha.numpy()) == pytest.approx(quantizers.DEFAULT_ALPHA[bits])


def test_depthwise_per_channel_scales(rng):
    layer = QuantDepthwiseConv2D(
        3, depth_multiplier=2, weight_bits=1, per_channel=True, use_bias=False
    )
    layer(rng.normal(size=(1, 5, 5, 4)).astype(np.float32))
    q = layer.quantized_kernel().numpy()
    k = layer.kernel.numpy()
    for c in range(4):
        for m in range(2):
            np.testing.assert_allclose(
                np.abs(q[:, :, c, m]), np.mean(np.abs(k[:, :, c, m])), rtol=1e-6
            )


def small_model(weight_bits=2, activation_bits=2, relax=None):
    inputs = keras.Input((8, 8, 3))
    x = QuantConv2D(8, 3, padding="same", weight_bits=weight_bits, relax=relax, name="conv1")(
        inputs
    )
    # Synchronized: otherwise each replica keeps its own moving statistics under MirroredStrategy.
    x = keras.layers.BatchNormalization(synchronized=True, name="bn1")(x)
    x = QuantReLU(bits=activation_bits, name="relu1")(x)
    x = QuantDepthwiseConv2D(3, padding="same", weight_bits=weight_bits, name="dw")(x)
    x = QuantReLU(bits=activation_bits, name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = QuantDense(3, weight_bits=weight_bits, relax=relax, name="logits")(x)
    return keras.Model(inputs, outputs)


def toy_data(rng, n=96):
    x = rng.normal(size=(n, 8, 8, 3)).astype(np.float32)
    # A learnable rule: the class is the channel with the largest mean.
    y = np.argmax(x.mean(axis=(1, 2)), axis=1)
    return x, y


def test_small_quantized_model_trains_saves_and_loads(tmp_path):
    # Pinned: the test asserts a training outcome (at 2 bits this model stalls on some draws).
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model = small_model(weight_bits=4, activation_bits=4)
    model.compile(
        keras.optimizers.Adam(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.85 * losses[0], losses
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    assert isinstance(loaded.get_layer("conv1"), QuantConv2D)
    assert loaded.get_layer("conv1").weight_bits == 4
    assert loaded.get_layer("relu1").precision == 4


def test_alpha_is_learned_and_clipped(rng):
    relu = QuantReLU(bits=2, alpha_initializer=4.99)
    model = keras.Sequential([keras.Input((5,)), relu])
    # Pushing every output up drives alpha up; the constraint keeps it at 5.
    model.compile(keras.optimizers.SGD(1.0), "mse")
    x = np.abs(rng.normal(size=(32, 5))).astype(np.float32) + 0.1
    model.fit(x, x + 100.0, epochs=3, verbose=0)
    assert float(relu.alpha.numpy()) == pytest.approx(quantizers.ALPHA_MAX)


def test_alpha_rate_serializes_and_old_configs_get_the_default(rng, tmp_path):
    inputs = keras.Input((6,))
    x = QuantReLU(
        bits=2, alpha_rate=0.05, alpha_regularizer=keras.regularizers.L2(3e-7), name="fast"
    )(inputs)
    outputs = QuantReLU(bits=4, alpha_rate=None, name="raw")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("fast").alpha.assign(rng.uniform(0.3, 0.9))
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert (
        loaded.get_layer("fast").alpha_rate == 0.05 and loaded.get_layer("raw").alpha_rate is None
    )
    assert loaded.get_layer("fast").alpha.regularizer.get_config() == {"l2": pytest.approx(3e-7)}
    assert loaded.get_layer("raw").alpha.regularizer is None
    x = rng.normal(size=(4, 6)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())

    # A model saved before alpha_rate existed has neither key; it loads with the default.
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    for layer in config["config"]["layers"]:
        if layer["class_name"] == "QuantReLU":
            del layer["config"]["alpha_rate"], layer["config"]["alpha_regularizer"]
    files["config.json"] = json.dumps(config).encode()
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(old, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    loaded = keras.models.load_model(old, safe_mode=True)
    assert [loaded.get_layer(n).alpha_rate for n in ("fast", "raw")] == [
        quantizers.DEFAULT_ALPHA_RATE
    ] * 2
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_each_replica_clamps_its_own_alpha_gradient(rng, mirrored_strategy):
    # One SGD(lr=0.1) step of a lone QuantReLU on a batch of 8 split 4 + 4 over two replicas, with
    # the per-sample loss sum(y * w): replica r differentiates sum over its samples / 8 (its
    # share of the global mean), clamps 0.01 * its eq. (5) sum, and the all-reduce adds the two.
    bits, alpha0 = 2, 0.5
    x = rng.uniform(0.05, 2.0, size=(8, 50)).astype(np.float32)
    # Replica 0 gets a large upstream gradient (its clamp bites), replica 1 a small one.
    w = np.concatenate([rng.uniform(20, 30, (4, 50)), rng.uniform(0.1, 1, (4, 50))]).astype(
        np.float32
    )
    with mirrored_strategy.scope():
        relu = QuantReLU(bits=bits, alpha_initializer=alpha0)
        model = keras.Sequential([keras.Input((50,)), relu])
        model.compile(keras.optimizers.SGD(0.1), loss=lambda w, y: keras.ops.sum(y * w, axis=-1))
    model.fit(x, w, batch_size=8, epochs=1, shuffle=False, verbose=0)
    top = float(np.float32(3.0) * np.float32(alpha0))
    per_replica = [
        np_qrelu_grads(
            x[i : i + 4].astype(np.float64), alpha0, bits, w[i : i + 4] / 8.0, top, alpha_rate=0.01
        )[1]
        for i in (0, 4)
    ]
    assert per_replica[0] == 1.0 and 0.05 < per_replica[1] < 1.0
    # So the step differs from one device's, which clamps the whole batch's sum to 1.
    whole = np_qrelu_grads(x.astype(np.float64), alpha0, bits, w / 8.0, top, alpha_rate=0.01)[1]
    assert whole == 1.0
    assert float(relu.alpha.numpy()) == pytest.approx(alpha0 - 0.1 * sum(per_replica), rel=1e-5)


def test_alpha_stays_float32_under_mixed_bfloat16(rng):
    # The bfloat16 layer reads the float32 alpha, and its gradient is summed and clamped in float32.
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        relu = QuantReLU(bits=2, alpha_initializer=float(rng.uniform(0.2, 0.5)))
        x = tf.cast(rng.uniform(-0.5, 2.0, size=(64, 100)).astype(np.float32), tf.bfloat16)
        dy = tf.cast(rng.normal(0.0, 1e-2, size=(64, 100)).astype(np.float32), tf.bfloat16)
        relu.build(x.shape)
        with tf.GradientTape() as tape:
            y = relu(x)
            loss = tf.reduce_sum(tf.cast(y * dy, tf.float32))
        grad = tape.gradient(loss, relu.alpha.value)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert y.dtype == tf.bfloat16 and relu.alpha.dtype == "float32" and grad.dtype == tf.float32
    alpha = float(relu.alpha.numpy())
    x64, dy64 = (tf.cast(t, tf.float64).numpy() for t in (x, dy))
    top = float(np.float32(3.0) * np.float32(alpha))
    np.testing.assert_allclose(
        grad.numpy(), np_qrelu_grads(x64, alpha, 2, dy64, top, alpha_rate=0.01)[1], rtol=1e-5
    )
    np.testing.assert_allclose(tf.cast(y, tf.float64).numpy(), np_qrelu(x64, alpha, 2), rtol=2**-8)


def test_alpha_rate_under_mixed_float16_warns():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        with pytest.warns(
            UserWarning, match=r"mixed_float16 .* clamp of alpha's gradient acts on the scaled"
        ):
            QuantReLU(bits=2, name="r")
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_training_under_mirrored_strategy_and_save(tmp_path, mirrored_strategy):
    rng = np.random.default_rng(1)  # pinned: the test asserts that training lowers the loss
    keras.utils.set_random_seed(1)
    with mirrored_strategy.scope():
        model = small_model(weight_bits=4, activation_bits=4)
        model.compile(
            keras.optimizers.Adam(0.01),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    x, y = toy_data(rng)
    history = model.fit(x, y, epochs=6, batch_size=16, verbose=0)
    assert mirrored_strategy.num_replicas_in_sync == 2
    assert history.history["loss"][-1] < history.history["loss"][0]
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    # The mirrored predict splits batches across replicas, so sums may round differently.
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6
    )


def test_binary_relax_trains_on_blend_and_infers_on_q(rng):
    model = small_model(weight_bits=1, relax=1.0)
    x, y = toy_data(rng, 32)
    model.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    model.fit(x, y, epochs=3, batch_size=16, verbose=0, callbacks=[BinaryRelaxScheduler(eta=1.5)])
    conv = model.get_layer("conv1")
    assert float(conv.relax_lambda.numpy()) == pytest.approx(1.5**3)
    w = conv.kernel.numpy()
    lam = 1.5**3
    np.testing.assert_allclose(
        conv.quantized_kernel(training=True).numpy(),
        (w + lam * np_quantize(w, 1)) / (1 + lam),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        conv.quantized_kernel(training=False).numpy(), np_quantize(w, 1), rtol=1e-5
    )


def test_full_precision_layers_equal_keras_layers(rng):
    x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
    ours = QuantConv2D(4, 3, weight_bits=None)
    ref = keras.layers.Conv2D(4, 3)
    ours.build(x.shape)
    ref.build(x.shape)
    ref.set_weights(ours.get_weights())
    np.testing.assert_array_equal(ours(x).numpy(), ref(x).numpy())
    assert ours.precision is None


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: QuantConv2D(4, 3, weight_bits=3),
            r"weight_bits=3 is not supported; use one of 1, 2, 4, 8",
        ),
        (lambda: QuantDense(4, weight_bits=16), r"weight_bits=16 is not supported"),
        (lambda: QuantReLU(bits=3), r"bits=3 is not supported; use one of 1, 2, 4, 8"),
        (
            lambda: QuantReLU(bits=2, alpha_initializer=-0.5),
            r"alpha_initializer=-0.5 is out of range",
        ),
        (lambda: QuantReLU(bits=2, alpha_rate=0), r"^alpha_rate=0 is not valid; use a number > 0"),
        (lambda: QuantReLU(bits=2, alpha_rate=-0.01), r"^alpha_rate=-0.01 is not valid"),
        (lambda: QuantReLU(bits=2, alpha_rate="0.01"), r"^alpha_rate='0.01' is not valid"),
        (lambda: QuantConv2D(4, 3, per_channel=True), r"per_channel=True needs a quantized kernel"),
        (lambda: QuantDense(4, relax=1.0), r"relax needs a quantized kernel"),
        (lambda: QuantDense(4, weight_bits=2, relax=-1.0), r"relax=-1.0 is not valid"),
        (
            lambda: QuantDense(4, weight_bits=2, kernel_quantizer="int4"),
            r"either weight_bits or kernel_quantizer",
        ),
        (lambda: BinaryRelaxScheduler(eta=0.9), r"eta=0.9 must be greater than 1"),
    ],
)
def test_bad_arguments_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_kernel_quantizer_by_name_serializes(rng, tmp_path):
    inputs = keras.Input((4,))
    outputs = QuantDense(3, kernel_quantizer="ste_sign", name="d")(inputs)
    model = keras.Model(inputs, outputs)
    assert model.get_layer("d").weight_bits == 1
    model.save(tmp_path / "d.keras")
    loaded = keras.models.load_model(tmp_path / "d.keras", safe_mode=True)
    x = rng.normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())


def test_quantized_kernel_gradient_reaches_float_kernel(rng):
    layer = QuantConv2D(3, 3, weight_bits=2)
    x = tf.constant(rng.normal(size=(1, 5, 5, 2)).astype(np.float32))
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        y = tf.reduce_sum(layer(x, training=True) ** 2)
    g = tape.gradient(y, layer.kernel)
    assert g is not None and np.all(np.isfinite(g.numpy())) and np.any(g.numpy() != 0)


@pytest.mark.parametrize("bits, per_channel", [(1, True), (2, False), (4, True)])
def test_kernel_codes_are_the_weight_codes_of_the_kernel_as_quantized(rng, bits, per_channel):
    conv = QuantConv2D(5, 3, weight_bits=bits, per_channel=per_channel)
    depthwise = QuantDepthwiseConv2D(
        3, depth_multiplier=2, weight_bits=bits, per_channel=per_channel
    )
    x = rng.normal(size=(1, 6, 6, 4)).astype(np.float32)
    conv(x), depthwise(x)
    for layer, kernel in (
        (conv, conv.kernel.numpy()),
        (depthwise, depthwise.kernel.numpy().reshape(3, 3, 1, 8)),
    ):
        np.testing.assert_array_equal(layer.kernel_to_quantize(), kernel)
        codes, scale = layer.kernel_codes()
        want_codes, want_scale = quantizers.weight_codes(kernel, bits, per_channel)
        np.testing.assert_array_equal(codes, want_codes)
        np.testing.assert_array_equal(scale, want_scale)
        q = layer.quantized_kernel().numpy()
        np.testing.assert_array_equal(q, (codes * scale).numpy().reshape(q.shape))
    with pytest.raises(ValueError, match="its kernel is not quantized to integer codes"):
        dense = QuantDense(2)
        dense(x[:, 0, 0, :])
        dense.kernel_codes()


def test_kernel_is_read_in_float32_under_mixed_precision(rng, bfloat16_kernels):
    x = rng.normal(size=(2, 6)).astype(np.float32)
    reference = QuantDense(4, weight_bits=4, per_channel=True, name="fc")
    reference(x)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        layer = QuantDense(4, weight_bits=4, per_channel=True, name="fc")
        layer(x)
        layer.set_weights(reference.get_weights())
        assert (layer.kernel.dtype, layer.compute_dtype) == ("float32", "bfloat16")
        assert layer(x).dtype == "bfloat16" and layer.quantized_kernel().dtype == "bfloat16"
        fp = QuantDense(4)
        fp(x)
        assert fp.quantized_kernel().dtype == "bfloat16"
        codes, scale = layer.kernel_codes()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    want_codes, want_scale = reference.kernel_codes()
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_array_equal(scale, want_scale)


# ---- the other layers convnets are made of: Conv1D/3D, separable, transposed ----------------


def np_conv1d_valid(x, k):
    n, length, _ = x.shape
    size = k.shape[0]
    return np.stack(
        [
            np.tensordot(x[:, i : i + size, :], k, axes=([1, 2], [0, 1]))
            for i in range(length - size + 1)
        ],
        1,
    )


def np_conv2d_transpose_valid(x, k, stride):
    """float64 'valid' transposed convolution; `k` is Keras's (kh, kw, out, in)."""
    n, h, w, _ = x.shape
    kh, kw, out, _ = k.shape
    y = np.zeros((n, (h - 1) * stride + kh, (w - 1) * stride + kw, out))
    for i in range(h):
        for j in range(w):
            y[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :] += np.einsum(
                "nc,aboc->nabo", x[:, i, j, :], k
            )
    return y


def np_depthwise_valid(x, k):
    kh, kw, c, m = k.shape
    n, h, w, _ = x.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, c * m))
    for i in range(h - kh + 1):
        for j in range(w - kw + 1):
            patch = x[:, i : i + kh, j : j + kw, :]
            out[:, i, j, :] = np.einsum("nabc,abcm->ncm", patch, k).reshape(n, c * m)
    return out


def np_quantize_depthwise(k, bits, per_channel):
    kh, kw, c, m = k.shape
    return np_quantize(k.reshape(kh, kw, 1, c * m), bits, per_channel).reshape(k.shape)


@pytest.mark.parametrize("bits, per_channel", [(1, True), (2, False), (4, True), (8, False)])
def test_conv1d_forward_matches_numpy(rng, bits, per_channel):
    layer = QuantConv1D(
        5, 3, weight_bits=bits, per_channel=per_channel, bias_initializer="random_normal"
    )
    causal = QuantConv1D(
        5, 3, weight_bits=bits, per_channel=per_channel, padding="causal", dilation_rate=2
    )
    x = rng.normal(size=(2, 9, 4)).astype(np.float32)
    y, yc = layer(x).numpy(), causal(x).numpy()
    qk = np_quantize(layer.kernel.numpy(), bits, per_channel)
    np.testing.assert_allclose(
        y, np_conv1d_valid(x.astype(np.float64), qk) + layer.bias.numpy(), rtol=1e-4, atol=1e-5
    )
    # Causal, dilation 2: output t sees x[t-4], x[t-2], x[t].
    qc = np_quantize(causal.kernel.numpy(), bits, per_channel)
    padded = np.concatenate([np.zeros((2, 4, 4)), x.astype(np.float64)], 1)
    want = sum(np.einsum("ntc,co->nto", padded[:, 2 * a : 2 * a + 9, :], qc[a]) for a in range(3))
    np.testing.assert_allclose(yc, want + causal.bias.numpy(), rtol=1e-4, atol=1e-5)


def test_conv3d_forward_matches_numpy(rng):
    layer = QuantConv3D(3, 2, weight_bits=2, per_channel=True, use_bias=False)
    x = rng.normal(size=(1, 3, 4, 4, 2)).astype(np.float32)
    y = layer(x).numpy()
    qk = np_quantize(layer.kernel.numpy(), 2, True)
    want = np.zeros((1, 2, 3, 3, 3))
    for d in range(2):
        for i in range(3):
            for j in range(3):
                want[:, d, i, j, :] = np.tensordot(
                    x[:, d : d + 2, i : i + 2, j : j + 2, :].astype(np.float64), qk, axes=4
                )
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits, per_channel", [(1, True), (2, True), (4, False)])
def test_conv2d_transpose_scales_are_per_output_filter(rng, bits, per_channel):
    layer = QuantConv2DTranspose(
        3, 3, strides=2, weight_bits=bits, per_channel=per_channel, bias_initializer="random_normal"
    )
    x = rng.normal(size=(2, 4, 5, 6)).astype(np.float32)
    y = layer(x).numpy()
    k = layer.kernel.numpy().astype(np.float64)  # (kh, kw, out, in)
    # The reference quantizes each output filter k[:, :, o, :] on its own (per channel).
    qk = np.transpose(np_quantize(np.transpose(k, (0, 1, 3, 2)), bits, per_channel), (0, 1, 3, 2))
    np.testing.assert_allclose(layer.quantized_kernel().numpy(), qk, rtol=1e-5, atol=1e-7)
    if per_channel and bits == 1:
        for o in range(3):
            np.testing.assert_allclose(
                np.abs(qk[:, :, o, :]), np.mean(np.abs(k[:, :, o, :])), rtol=1e-12
            )
    want = np_conv2d_transpose_valid(x.astype(np.float64), qk, 2) + layer.bias.numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    codes, scale = layer.kernel_codes()
    assert tuple(codes.shape) == (3, 3, 6, 3) and tuple(scale.shape) == (
        (1, 1, 1, 3) if per_channel else ()
    )


@pytest.mark.parametrize("bits, per_channel", [(1, True), (2, False), (4, True)])
def test_separable_conv2d_quantizes_each_kernel_on_its_own(rng, bits, per_channel):
    layer = QuantSeparableConv2D(
        4,
        3,
        depth_multiplier=2,
        weight_bits=bits,
        per_channel=per_channel,
        bias_initializer="random_normal",
    )
    x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
    y = layer(x).numpy()
    dw = np_quantize_depthwise(layer.depthwise_kernel.numpy(), bits, per_channel)
    pw = np_quantize(layer.pointwise_kernel.numpy(), bits, per_channel)
    want = np_depthwise_valid(x.astype(np.float64), dw) @ pw[0, 0] + layer.bias.numpy()
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        layer.quantized_kernel(kernel="depthwise_kernel").numpy(), dw, rtol=1e-5, atol=1e-7
    )
    _, dw_scale = layer.kernel_codes("depthwise_kernel")
    _, pw_scale = layer.kernel_codes("pointwise_kernel")
    assert tuple(dw_scale.shape) == ((1, 1, 1, 6) if per_channel else ())
    assert tuple(pw_scale.shape) == ((1, 1, 1, 4) if per_channel else ())
    with pytest.raises(
        ValueError, match=r"has 2 quantized kernels; name one: kernel='depthwise_kernel'"
    ):
        layer.kernel_codes()


@pytest.mark.parametrize(
    "make, x_shape",
    [
        (
            lambda: QuantConv1D(4, 3, weight_bits=2, relax=1.5, padding="causal", name="q"),
            (2, 7, 3),
        ),
        (
            lambda: QuantConv3D(2, 2, weight_bits=4, per_channel=True, relax=1.5, name="q"),
            (2, 3, 4, 4, 2),
        ),
        (lambda: QuantSeparableConv2D(4, 3, weight_bits=1, relax=1.5, name="q"), (2, 6, 6, 3)),
        (
            lambda: QuantConv2DTranspose(
                3, 2, strides=2, weight_bits=2, per_channel=True, relax=1.5, name="q"
            ),
            (2, 4, 4, 3),
        ),
        (lambda: QuantDepthwiseConv2D(3, weight_bits=2, relax=1.5, name="q"), (2, 6, 6, 3)),
    ],
)
def test_new_layers_save_and_load_with_their_relax_lambda(rng, tmp_path, make, x_shape):
    inputs = keras.Input(x_shape[1:])
    model = keras.Model(inputs, make()(inputs))
    layer = model.get_layer("q")
    layer.relax_lambda.assign(rng.uniform(2, 9))
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    twin = loaded.get_layer("q")
    assert (
        type(twin) is type(layer)
        and twin.weight_bits == layer.weight_bits
        and twin.per_channel == layer.per_channel
    )
    assert float(twin.relax_lambda.numpy()) == pytest.approx(float(layer.relax_lambda.numpy()))
    x = rng.normal(size=x_shape).astype(np.float32)
    np.testing.assert_array_equal(loaded(x).numpy(), model(x).numpy())
    np.testing.assert_allclose(
        twin(x, training=True).numpy(), layer(x, training=True).numpy(), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_two_sided_ste_passes_the_gradient_just_below_zero(rng, bits, tmp_path):
    alpha = float(rng.uniform(0.3, 1.5))
    x = rng.uniform(-2 * alpha, (2**bits) * alpha, size=(6, 40)).astype(np.float32)
    dy = rng.normal(size=x.shape).astype(np.float32)
    layers = {
        ste: QuantReLU(bits, alpha_initializer=alpha, ste=ste) for ste in ("clipped", "two_sided")
    }
    grads = {}
    for ste, layer in layers.items():
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(layer(xt) * dy)
        grads[ste] = [g.numpy() for g in tape.gradient(loss, [xt, layer.alpha])]
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    for ste, (dx, dalpha) in grads.items():
        want_dx, want_dalpha = np_qrelu_grads(
            x64, np.float32(alpha), bits, dy64, alpha_rate=0.01, two_sided=ste == "two_sided"
        )
        np.testing.assert_allclose(dx, want_dx, rtol=1e-6)
        np.testing.assert_allclose(dalpha, want_dalpha, rtol=1e-5)
    below = (x > -alpha) & (x <= 0)
    assert below.any() and np.any(grads["two_sided"][0][below] != 0)
    assert np.all(grads["clipped"][0][below] == 0)
    # The forward pass is the same, and the choice survives a save.
    np.testing.assert_array_equal(layers["two_sided"](x), layers["clipped"](x))
    model = keras.Sequential([keras.Input((40,)), layers["two_sided"]])
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    assert loaded.layers[-1].ste == "two_sided"


def test_activation_ste_reaches_every_quantized_relu_and_is_checked():
    from faqd_tf.models import resnet_cifar
    from faqd_tf.quantize import quantize_model

    teacher = resnet_cifar(8, input_shape=(8, 8, 1))
    student = quantize_model(teacher, weight_bits=1, activation_bits=1, activation_ste="two_sided")
    relus = [layer for layer in student.layers if isinstance(layer, QuantReLU)]
    assert len(relus) == 7 and all(layer.ste == "two_sided" for layer in relus)
    built = resnet_cifar(8, input_shape=(8, 8, 1), activation_bits=2, activation_ste="two_sided")
    assert {layer.ste for layer in built.layers if isinstance(layer, QuantReLU)} == {"two_sided"}
    with pytest.raises(ValueError, match=r"^activation_ste='both' is not valid; use one of"):
        quantize_model(teacher, activation_bits=1, activation_ste="both")
