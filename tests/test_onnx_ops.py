"""ONNX export of the layers and tensor operations keras.applications networks are made of.

Each case converts a small random-weight model holding the op and compares onnxruntime's output with
Keras's (float32 tolerance; independent implementations, so never bit equality).
"""

import keras
import numpy as np
import pytest

from faqd_tf.export import check_onnx, pack, run_onnx, to_onnx, unpack
from faqd_tf.layers import QuantConv1D, QuantConv2DTranspose

pytest.importorskip("onnxruntime")

RTOL, ATOL = 1e-4, 1e-5


def net(shape, body):
    inputs = keras.Input(shape)
    return keras.Model(inputs, body(inputs))


def activation_layers(name):
    return lambda x: keras.layers.Activation(name)(keras.layers.Conv2D(4, 3, padding="same")(x))


def fused(name):
    return lambda x: keras.layers.Conv2D(4, 3, padding="same", activation=name)(x)


def squeeze_excite(x):  # EfficientNet's block: GAP -> Reshape -> 1x1 convs -> Multiply
    se = keras.layers.GlobalAveragePooling2D()(x)
    se = keras.layers.Reshape((1, 1, 3))(se)
    se = keras.layers.Conv2D(2, 1, activation="silu")(se)
    se = keras.layers.Conv2D(3, 1, activation="sigmoid")(se)
    return keras.layers.Multiply()([x, se])


def normalization(invert=False):
    def body(x):
        layer = keras.layers.Normalization(
            mean=[0.2, -1.0, 3.0], variance=[0.5, 2.0, 4.0], invert=invert
        )
        return keras.layers.Conv2D(2, 1)(layer(x))

    return body


def tensor_ops(x):
    y = x + 1.5
    y = y * np.array([0.5, -1.0, 2.0], np.float32)
    y = keras.ops.subtract(y, x)
    y = 2.0 - y
    y = keras.ops.divide(y, 3.0)
    return keras.ops.multiply(keras.ops.add(y, x), x)


CASES = {
    # images (N, H, W, C)
    "reshape_to_vector": (
        (5, 5, 3),
        lambda x: keras.layers.Reshape((75,))(keras.layers.Conv2D(3, 1)(x)),
    ),
    "reshape_mobilenet_head": (
        (4, 4, 3),
        lambda x: keras.layers.Reshape((6,))(
            keras.layers.Conv2D(6, 1)(keras.layers.GlobalAveragePooling2D(keepdims=True)(x))
        ),
    ),
    "reshape_image": (
        (4, 6, 3),
        lambda x: keras.layers.Conv2D(2, 1)(keras.layers.Reshape((6, 4, 3))(x)),
    ),
    "rescaling": ((5, 5, 3), lambda x: keras.layers.Rescaling(1 / 255, offset=-0.5)(x)),
    "rescaling_per_channel": (
        (5, 5, 3),
        lambda x: keras.layers.Rescaling([0.5, 2.0, -1.0], offset=[1.0, 0.0, 2.0])(x),
    ),
    "normalization": ((5, 5, 3), normalization()),
    "normalization_invert": ((5, 5, 3), normalization(invert=True)),
    "concatenate": (
        (5, 5, 3),
        lambda x: keras.layers.Concatenate()([x, keras.layers.Conv2D(2, 1)(x)]),
    ),
    "concatenate_width": (
        (5, 5, 3),
        lambda x: keras.layers.Conv2D(2, 1)(keras.layers.Concatenate(axis=2)([x, x])),
    ),
    "squeeze_excite": ((6, 6, 3), squeeze_excite),
    "subtract_maximum_minimum_average": (
        (5, 5, 3),
        lambda x: keras.layers.Average()(
            [
                keras.layers.Subtract()([x, keras.layers.Conv2D(3, 1)(x)]),
                keras.layers.Maximum()([x, -x]),
                keras.layers.Minimum()([x, x * 0.5]),
            ]
        ),
    ),
    "layer_norm": (
        (5, 5, 3),
        lambda x: keras.layers.LayerNormalization()(keras.layers.Conv2D(6, 1)(x)),
    ),
    "layer_norm_plain": (
        (5, 5, 3),
        lambda x: keras.layers.LayerNormalization(center=False, scale=False)(x),
    ),
    "conv2d_transpose_same": (
        (5, 5, 3),
        lambda x: keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same")(x),
    ),
    "conv2d_transpose_valid": (
        (5, 5, 3),
        lambda x: keras.layers.Conv2DTranspose(4, 3, strides=2)(x),
    ),
    "conv2d_transpose_small_kernel": (
        (5, 4, 3),
        lambda x: keras.layers.Conv2DTranspose(2, 1, strides=2, padding="same")(x),
    ),
    "conv2d_transpose_even_kernel": (
        (5, 4, 3),
        lambda x: keras.layers.Conv2DTranspose(2, 4, strides=2, padding="same", activation="relu")(
            x
        ),
    ),
    "separable_conv2d": (
        (7, 7, 3),
        lambda x: keras.layers.SeparableConv2D(
            5, 3, padding="same", depth_multiplier=2, activation="relu"
        )(x),
    ),
    "separable_conv2d_strided": (
        (7, 7, 3),
        lambda x: keras.layers.SeparableConv2D(4, 3, strides=2, padding="same")(x),
    ),
    "cropping2d": (  # NASNet's: a padded map cropped back, one side and both sides
        (6, 7, 3),
        lambda x: keras.layers.Cropping2D(((1, 2), (0, 1)))(
            keras.layers.Cropping2D(((0, 1), (2, 0)))(keras.layers.Conv2D(4, 1)(x))
        ),
    ),
    "global_average_keepdims": (
        (5, 5, 3),
        lambda x: keras.layers.GlobalAveragePooling2D(keepdims=True)(x),
    ),
    "tensor_operations": ((4, 4, 3), tensor_ops),
    # sequences (N, L, C)
    "conv1d": ((9, 3), lambda x: keras.layers.Conv1D(4, 3, padding="same", activation="gelu")(x)),
    "conv1d_causal_dilated": (
        (9, 3),
        lambda x: keras.layers.Conv1D(4, 3, padding="causal", dilation_rate=2)(x),
    ),
    "conv1d_strided_valid": ((9, 3), lambda x: keras.layers.Conv1D(4, 3, strides=2)(x)),
    "conv1d_transpose": (
        (6, 3),
        lambda x: keras.layers.Conv1DTranspose(2, 3, strides=2, padding="same")(x),
    ),
    "separable_conv1d": ((9, 3), lambda x: keras.layers.SeparableConv1D(4, 3, padding="same")(x)),
    "global_average_1d": (
        (9, 3),
        lambda x: keras.layers.GlobalAveragePooling1D()(keras.layers.Conv1D(4, 3)(x)),
    ),
    "global_average_1d_keepdims": (
        (9, 3),
        lambda x: keras.layers.GlobalAveragePooling1D(keepdims=True)(x),
    ),
    "layer_norm_sequence": ((9, 3), lambda x: keras.layers.LayerNormalization()(x)),
    "sequence_flatten_dense": ((9, 3), lambda x: keras.layers.Dense(4)(keras.layers.Flatten()(x))),
}
ACTIVATIONS = [
    "sigmoid",
    "tanh",
    "silu",
    "swish",
    "hard_sigmoid",
    "hard_silu",
    "hard_swish",
    "gelu",
    "relu6",
    "softmax",
]
for _name in ACTIVATIONS:
    CASES[f"activation_{_name}"] = ((5, 5, 3), activation_layers(_name))
    CASES[f"fused_{_name}"] = ((5, 5, 3), fused(_name))


def random_weights(model, rng):
    for v in model.weights:
        if v.dtype == "float32" and "normalization" not in v.path:
            v.assign(rng.normal(0, 0.5, size=v.shape).astype(np.float32))


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_op_matches_keras(rng, tmp_path, case):
    shape, body = CASES[case]
    model = net(shape, body)
    random_weights(model, rng)
    x = (2 * rng.normal(size=(3, *shape))).astype(np.float32)
    path = tmp_path / f"{case}.onnx"
    assert to_onnx(model, path) == path.stat().st_size
    want = keras.ops.convert_to_numpy(model(x, training=False))
    got = run_onnx(path, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize(
    "body,needle",
    [
        (lambda x: keras.layers.LayerNormalization(rms_scaling=True)(x), "rms_scaling=True"),
        (lambda x: keras.layers.LayerNormalization(axis=1)(x), "axis=[1]"),
        (
            lambda x: keras.layers.Conv2DTranspose(2, 3, strides=2, output_padding=1)(x),
            "output_padding=(1, 1)",
        ),
        (lambda x: keras.ops.maximum(x, 0.0), "operation on tensors"),
        (lambda x: keras.layers.UpSampling2D()(x), "(UpSampling2D): no ONNX conversion"),
    ],
)
def test_unsupported_ops_are_refused_before_anything_is_written(tmp_path, body, needle):
    model = net((4, 4, 3), body)
    with pytest.raises(ValueError) as info:
        check_onnx(model)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError):
        to_onnx(model, tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_normalization_count_round_trips_through_packed(rng, tmp_path):
    inputs = keras.Input((4, 4, 3))
    norm = keras.layers.Normalization()
    norm.adapt(rng.normal(size=(11, 4, 4, 3)).astype(np.float32))
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1)(norm(inputs)))
    count = 2**40 + 7  # Keras's adapt leaves count at 0; a value float32 could not hold exactly
    norm.count.assign(count)
    assert str(norm.count.dtype) == "int64"
    pack(model, tmp_path / "m.faqd")
    loaded = unpack(tmp_path / "m.faqd")
    assert int(loaded.get_layer(norm.name).count.numpy()) == count
    x = rng.normal(size=(2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d_transpose"])
def test_quantized_new_layers_store_codes_and_match_keras(rng, tmp_path, kind, bits, per_channel):
    if kind == "conv1d":
        shape, layer = (
            (9, 3),
            QuantConv1D(5, 3, padding="same", weight_bits=bits, per_channel=per_channel),
        )
    else:
        shape, layer = (
            (5, 5, 3),
            QuantConv2DTranspose(
                4, 3, strides=2, padding="same", weight_bits=bits, per_channel=per_channel
            ),
        )
    model = net(shape, layer)
    random_weights(model, rng)
    x = rng.normal(size=(3, *shape)).astype(np.float32)
    to_onnx(model, tmp_path / "q.onnx")
    np.testing.assert_allclose(
        run_onnx(tmp_path / "q.onnx", x), model(x, training=False), rtol=RTOL, atol=ATOL
    )
    import onnx

    stored = {t.data_type for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    assert {2: onnx.TensorProto.INT2, 4: onnx.TensorProto.INT4}[bits] in stored
