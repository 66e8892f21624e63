"""Summary table, bit-packed files (pack/unpack), frozen copies and TFLite export."""

import hashlib
import json
import zlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import quantizers
from faqd_tf.export import (
    HEADER_SIZE,
    FrozenQuantizer,
    _pack_codes,
    _unpack_codes,
    freeze,
    pack,
    read_manifest,
    run_tflite,
    to_tflite,
    unpack,
)
from faqd_tf.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D, QuantReLU
from faqd_tf.models import resnet_cifar
from faqd_tf.summary import summary


def randomize(model, rng):
    """Random BN statistics and affine terms, biases and alphas: nothing stays at 0 or 1, and
    quantized-ReLU inputs never sit exactly on a step edge (as in a trained model)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize(layer, rng)
        elif isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, c))
            layer.beta.assign(rng.normal(0.0, 0.3, c))
            layer.moving_mean.assign(rng.normal(0.0, 0.3, c))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, c))
        elif isinstance(layer, QuantReLU) and layer.alpha is not None:
            layer.alpha.assign(layer.alpha * rng.uniform(0.8, 1.25))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0.0, 0.1, layer.bias.shape))
    return model


def tiny_model(bits, per_channel, activation_bits=2, relax=None):
    inputs = keras.Input((8, 8, 3), name="image")
    x = QuantConv2D(6, 3, padding="same", weight_bits=bits, per_channel=per_channel, relax=relax, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = QuantReLU(bits=activation_bits, name="relu1")(x)
    x = QuantDepthwiseConv2D(3, depth_multiplier=2, weight_bits=bits, per_channel=per_channel, name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = QuantReLU(bits=activation_bits, name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = QuantDense(7, weight_bits=bits, per_channel=per_channel, name="fc")(x)
    outputs = keras.layers.Dense(3, name="head")(x)  # a full-precision (skipped) layer
    return keras.Model(inputs, outputs, name="tiny")



# ------------------------------------------------------------------------------------------
# summary


@pytest.mark.parametrize("per_channel", [False, True])
def test_summary_numbers_by_hand(per_channel):
    inputs = keras.Input((8, 8, 3))
    x = QuantConv2D(4, 3, weight_bits=2, per_channel=per_channel, use_bias=False, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = QuantReLU(bits=2, name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = QuantDense(3, name="logits")(x)
    lines = []
    result = summary(keras.Model(inputs, outputs, name="hand"), print_fn=lines.append)
    rows = {row.name: row for row in result.rows}

    scales = 4 if per_channel else 1
    conv = rows["conv"]  # 3*3*3*4 = 108 weights at 2 bits + 32-bit scale(s)
    assert (conv.weight_bits, conv.params, conv.quantized_params, conv.scales) == (2, 108, 108, scales)
    assert (conv.float32_bits, conv.packed_bits) == (108 * 32, 108 * 2 + 32 * scales)
    bn = rows["bn"]  # gamma, beta trainable; moving mean, variance stored but not trainable
    assert (bn.params, bn.trainable_params, bn.non_trainable_params, bn.packed_bits) == (16, 8, 8, 16 * 32)
    relu = rows["relu"]
    assert (relu.activation_bits, relu.weight_bits, relu.params, relu.packed_bits) == (2, 32, 1, 32)
    logits = rows["logits"]  # full precision: 4*3 + 3
    assert (logits.weight_bits, logits.params, logits.packed_bits) == (32, 15, 15 * 32)
    assert rows["pool"].params == 0 and rows["pool"].weight_bits is None

    packed = 108 * 2 + 32 * scales + (16 + 1 + 15) * 32
    assert (result.total_params, result.trainable_params, result.non_trainable_params) == (140, 132, 8)
    assert (result.float32_bits, result.packed_bits, result.quantized_params) == (140 * 32, packed, 108)
    assert result.compression_ratio == pytest.approx(4480 / packed)
    assert any(f"{4480 / packed:.2f}x" in line for line in lines)
    assert any(line.startswith("conv (QuantConv2D)") for line in lines)
    assert str(result).splitlines() == lines


def test_summary_walks_nested_models():
    inner = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=1, activation_bits=2)
    outer = keras.Sequential([keras.Input((16, 16, 3)), inner, keras.layers.Dense(2, name="extra")])
    inner_result = summary(inner, print_fn=None)
    outer_result = summary(outer, print_fn=None)
    assert "resnet8/stem_conv" in [row.name for row in outer_result.rows]
    assert outer_result.total_params == inner_result.total_params + 10 * 2 + 2 == outer.count_params()
    assert outer_result.packed_bits == inner_result.packed_bits + 22 * 32
    # every conv of a 1-bit ResNet8 is quantized: kernels at 1 bit + one scale each
    convs = [row for row in inner_result.rows if row.type == "QuantConv2D"]
    assert all(row.weight_bits == 1 and row.scales == 1 for row in convs)
    assert inner_result.quantized_params == sum(row.params for row in convs)


# ------------------------------------------------------------------------------------------
# pack / unpack


@pytest.mark.parametrize(
    "bits, codes, packed",
    [
        (1, [1, -1, 1], [0b101]),
        (2, [-1, 0, 1, 1, 1], [0 | 1 << 2 | 2 << 4 | 2 << 6, 2]),
        (4, [-7, 7, 0], [0 | 14 << 4, 7]),
        (8, [-127, 0, 127], [0, 127, 254]),
    ],
)
def test_code_layout_offset_binary_lsb_first(bits, codes, packed):
    data = _pack_codes(np.array(codes, np.float32), bits)
    assert list(data) == packed
    np.testing.assert_array_equal(_unpack_codes(data, bits, len(codes)), codes)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_code_packing_round_trip(rng, bits):
    n = int(rng.integers(1, 200))
    top = 1 if bits == 1 else quantizers.levels(bits)
    codes = rng.integers(-top, top + 1, n)
    if bits == 1:
        codes = np.where(codes >= 0, 1, -1)
    data = _pack_codes(codes.astype(np.float32), bits)
    assert len(data) == -(-n * bits // 8)
    np.testing.assert_array_equal(_unpack_codes(data, bits, n), codes)


@pytest.mark.parametrize(
    "bits, per_channel",
    # 8 bits per channel is where re-quantizing codes*scale can move codes (see faqd_tf.export).
    [(1, False), (1, True), (2, False), (2, True), (4, False), (4, True), (8, True)],
)
def test_pack_unpack_round_trip(rng, tmp_path, bits, per_channel):
    model = randomize(tiny_model(bits, per_channel, relax=1.0 if bits == 2 else None), rng)
    x = rng.normal(size=(5, 8, 8, 3)).astype(np.float32)
    path = tmp_path / "tiny.faqd"
    size = pack(model, path)
    assert size == path.stat().st_size
    twin = unpack(path)

    np.testing.assert_allclose(twin(x, training=False), model(x, training=False), rtol=1e-6, atol=1e-6)
    for name in ("conv", "dw", "fc"):
        source, target = model.get_layer(name), twin.get_layer(name)
        np.testing.assert_array_equal(target.kernel.numpy(), source.quantized_kernel(training=False).numpy())
        assert isinstance(target.kernel_quantizer, FrozenQuantizer)
        assert (target.weight_bits, target.per_channel, target.precision) == (bits, per_channel, bits)
        codes, scale = source.kernel_quantizer.codes(source._kernel_to_quantize())
        twin_codes, twin_scale = target.kernel_quantizer.codes(target._kernel_to_quantize())
        np.testing.assert_array_equal(twin_codes, codes)
        np.testing.assert_array_equal(twin_scale, scale)
    for source, target in zip(model.weights, twin.weights):  # everything but kernels: bit-exact
        if not source.path.endswith(("conv/kernel", "dw/kernel", "fc/kernel")):
            np.testing.assert_array_equal(target.numpy(), source.numpy(), err_msg=source.path)
    assert twin.get_layer("relu1").bits == 2

    # The payload is what summary counts (each kernel's codes padded to a whole byte).
    manifest = read_manifest(path)
    payload = size - HEADER_SIZE - len(zlib.compress(json.dumps(manifest, separators=(",", ":")).encode(), 9))
    expected = summary(model, print_fn=None).packed_bits
    assert 0 <= 8 * payload - expected < 8 * 3
    assert [e["encoding"] for e in manifest["weights"]].count("codes") == 3

    # A frozen model packs again to the same payload, and its config round-trips.
    again = tmp_path / "again.faqd"
    pack(twin, again)
    assert path.read_bytes()[-payload:] == again.read_bytes()[-payload:]
    rebuilt = keras.models.model_from_json(twin.to_json())
    assert isinstance(rebuilt.get_layer("conv").kernel_quantizer, FrozenQuantizer)


def test_freeze_matches_and_leaves_model_alone(rng):
    model = randomize(tiny_model(4, True, activation_bits=4), rng)
    kernel = model.get_layer("conv").kernel.numpy()
    frozen = freeze(model)
    x = rng.normal(size=(3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(frozen(x, training=False), model(x, training=False), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(model.get_layer("conv").kernel.numpy(), kernel)
    assert isinstance(model.get_layer("conv").kernel_quantizer, quantizers.WeightQuantizer)


def test_every_flipped_byte_and_truncation_raise(rng, tmp_path):
    model = tiny_model(2, False)
    path = tmp_path / "tiny.faqd"
    pack(model, path)
    good = path.read_bytes()
    bad = tmp_path / "bad.faqd"
    message = r"corrupted|truncated|not a faqd_tf packed model|unsupported"
    # Every header byte, and a random sample of the manifest and payload bytes.
    positions = list(range(HEADER_SIZE)) + list(rng.choice(np.arange(HEADER_SIZE, len(good)), 150, replace=False))
    for i in positions:
        data = bytearray(good)
        data[i] ^= 1 << int(rng.integers(8))
        bad.write_bytes(bytes(data))
        with pytest.raises(ValueError, match=message):
            unpack(bad)
    for n in sorted({0, 4, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 10, len(good) // 2, len(good) - 1}):
        bad.write_bytes(good[:n])
        with pytest.raises(ValueError, match="truncated" if n else "truncated|not a faqd"):
            unpack(bad)
    bad.write_bytes(good + b"\0")
    with pytest.raises(ValueError, match="unexpected bytes"):
        unpack(bad)
    keras_file = tmp_path / "tiny.keras"
    model.save(keras_file)
    with pytest.raises(ValueError, match="not a faqd_tf packed model"):
        unpack(keras_file)
    assert hashlib.sha256(good[HEADER_SIZE:]).digest() == good[28:60]


def test_unregistered_layers_give_a_clear_error(tmp_path):
    @keras.saving.register_keras_serializable(package="test_export_tmp")
    class Scale(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x

    model = keras.Sequential([keras.Input((3,)), QuantDense(2, weight_bits=2), Scale()])
    path = tmp_path / "scale.faqd"
    pack(model, path)
    keras.saving.get_custom_objects().pop("test_export_tmp>Scale")
    with pytest.raises(ValueError, match="custom_objects"):
        unpack(path)
    twin = unpack(path, custom_objects={"test_export_tmp>Scale": Scale})
    x = np.ones((1, 3), np.float32)
    np.testing.assert_allclose(twin(x), model(x), rtol=1e-6)


# ------------------------------------------------------------------------------------------
# TFLite


@pytest.mark.parametrize("activation_bits", [None, 4])
def test_tflite_matches_keras(rng, tmp_path, activation_bits):
    model = randomize(tiny_model(2, True, activation_bits=activation_bits), rng)
    path = tmp_path / "tiny.tflite"
    size = to_tflite(model, path)
    assert size == path.stat().st_size > 0
    x = rng.normal(size=(6, 8, 8, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    np.testing.assert_allclose(run_tflite(path, x), want, rtol=1e-5, atol=1e-5)


def test_tflite_of_resnet_and_unfrozen_graph_convert(rng, tmp_path):
    model = randomize(resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=4, activation_bits=4), rng)
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    frozen_size = to_tflite(model, tmp_path / "frozen.tflite")
    np.testing.assert_allclose(run_tflite(tmp_path / "frozen.tflite", x), want, rtol=1e-5, atol=1e-5)
    # The quantizers' own graph (Lloyd iterations, tf.custom_gradient) converts too.
    small = randomize(tiny_model(4, False, activation_bits=4), rng)
    to_tflite(small, tmp_path / "graph.tflite", frozen=False)
    y = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(run_tflite(tmp_path / "graph.tflite", y), small(y, training=False), rtol=1e-5, atol=1e-5)
    assert frozen_size > 4 * 0.9 * model.count_params()  # float32 weights in the flatbuffer
