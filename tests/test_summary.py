"""faqd_tf.summary: bit/parameter/memory counts checked by hand, nested models and wrappers."""

import keras
import numpy as np
import pytest

from faqd_tf.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D, QuantReLU
from faqd_tf.models import resnet_cifar
from faqd_tf.summary import kernel_scale_count, summary


@pytest.mark.parametrize("per_channel", [False, True])
def test_summary_numbers_by_hand(per_channel):
    inputs = keras.Input((8, 8, 3))
    x = QuantConv2D(4, 3, weight_bits=2, per_channel=per_channel, use_bias=False, name="conv")(
        inputs
    )
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = QuantReLU(bits=2, name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = QuantDense(3, name="logits")(x)
    lines = []
    result = summary(keras.Model(inputs, outputs, name="hand"), print_fn=lines.append)
    rows = {row.name: row for row in result.rows}

    scales = 4 if per_channel else 1
    conv = rows["conv"]  # 3*3*3*4 = 108 weights at 2 bits + 32-bit scale(s)
    assert (conv.weight_bits, conv.params, conv.quantized_params, conv.scales) == (
        2,
        108,
        108,
        scales,
    )
    assert (conv.float32_bits, conv.packed_bits) == (108 * 32, 108 * 2 + 32 * scales)
    bn = rows["bn"]  # gamma, beta trainable; moving mean, variance stored but not trainable
    assert (bn.params, bn.trainable_params, bn.non_trainable_params, bn.packed_bits) == (
        16,
        8,
        8,
        16 * 32,
    )
    relu = rows["relu"]
    assert (relu.activation_bits, relu.weight_bits, relu.params, relu.packed_bits) == (2, 32, 1, 32)
    logits = rows["logits"]  # full precision: 4*3 + 3
    assert (logits.weight_bits, logits.params, logits.packed_bits) == (32, 15, 15 * 32)
    assert rows["pool"].params == 0 and rows["pool"].weight_bits is None

    packed = 108 * 2 + 32 * scales + (16 + 1 + 15) * 32
    assert (result.total_params, result.trainable_params, result.non_trainable_params) == (
        140,
        132,
        8,
    )
    assert (result.float32_bits, result.packed_bits, result.quantized_params) == (
        140 * 32,
        packed,
        108,
    )
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
    assert (
        outer_result.total_params == inner_result.total_params + 10 * 2 + 2 == outer.count_params()
    )
    assert outer_result.packed_bits == inner_result.packed_bits + 22 * 32
    # every conv of a 1-bit ResNet8 is quantized: kernels at 1 bit (the stem at 8) + one scale each
    convs = [row for row in inner_result.rows if row.type == "QuantConv2D"]
    assert all(
        row.weight_bits == (8 if row.name.endswith("stem_conv") else 1) and row.scales == 1
        for row in convs
    )
    assert inner_result.quantized_params == sum(row.params for row in convs)


def test_summary_walks_wrappers():
    inputs = keras.Input((5, 4))
    outputs = keras.layers.TimeDistributed(
        QuantDense(3, weight_bits=4, per_channel=True, name="fc"), name="td"
    )(inputs)
    result = summary(keras.Model(inputs, outputs), print_fn=None)
    rows = {row.name: row for row in result.rows}
    assert (rows["td/fc"].weight_bits, rows["td/fc"].quantized_params, rows["td/fc"].scales) == (
        4,
        12,
        3,
    )
    assert result.packed_bits == 12 * 4 + 3 * 32 + 3 * 32


def test_kernel_scale_count_uses_the_quantized_kernel_shape():
    layer = QuantDepthwiseConv2D(3, depth_multiplier=2, weight_bits=2, per_channel=True)
    layer(np.zeros((1, 6, 6, 5), "float32"))
    assert tuple(layer.kernel.shape) == (3, 3, 5, 2)
    assert kernel_scale_count(layer) == 10 == layer.kernel_to_quantize().shape[-1]
    assert kernel_scale_count(QuantDense(4, weight_bits=2)) == 1


def test_separable_kernels_count_both_and_float_kernels_are_listed_with_their_reason():
    from faqd_tf import quantize_model
    from faqd_tf.layers import QuantSeparableConv2D

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.SeparableConv2D(4, 3, depth_multiplier=2, use_bias=False, name="sep")(inputs)
    x = keras.layers.Conv1D(2, 1, name="not_here")(keras.layers.Reshape((36, 4))(x))
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x))
    student = quantize_model(
        keras.Model(inputs, outputs), weight_bits=2, per_channel=True, skip=["not_here", "logits"]
    )
    assert isinstance(student.get_layer("sep"), QuantSeparableConv2D)
    lines = []
    result = summary(student, print_fn=lines.append)
    sep = {row.name: row for row in result.rows}["sep"]
    # depthwise 3*3*3*2 = 54, pointwise 6*4 = 24 weights at 2 bits; scales: 6 depthwise + 4 pointwise
    assert (sep.weight_bits, sep.quantized_params, sep.scales, sep.packed_bits) == (
        2,
        78,
        10,
        78 * 2 + 10 * 32,
    )
    assert result.float_kernels == {"not_here": "skip", "logits": "skip"}
    assert "Full-precision kernels: not_here (skip), logits (skip)" in lines
