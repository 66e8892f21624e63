"""Default FA taps (feature_layers): stage outputs in network order, nothing that carries no learned map."""

import keras
import pytest

from faqd_tf.features import feature_extractor, feature_layers
from faqd_tf.models import resnet_cifar

NOT_MAPS = (
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
    keras.layers.Rescaling,
    keras.layers.Normalization,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.InputLayer,
)


def check_taps(model, taps):
    """In network order, one per run of a resolution, each a learned map of more than one pixel,
    none of them the logits or a padding/preprocessing/pooling output."""
    order = [layer.name for layer in model.layers]
    assert taps and [order.index(t) for t in taps] == sorted(order.index(t) for t in taps), taps
    shapes = [tuple(model.get_layer(t).output.shape[1:-1]) for t in taps]
    assert all(a != b for a, b in zip(shapes, shapes[1:])), shapes
    for tap, shape in zip(taps, shapes):
        layer = model.get_layer(tap)
        assert not isinstance(layer, NOT_MAPS) and any(d > 1 for d in shape), (tap, shape)
        assert layer.output is not model.outputs[0]
    return shapes


def test_project_resnets_keep_their_stage_names():
    for depth in (8, 20):
        assert feature_layers(resnet_cifar(depth, input_shape=(16, 16, 3))) == [
            "stage1",
            "stage2",
            "stage3",
        ]


def test_small_sequential_cnn():
    model = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Rescaling(1 / 255, name="scale"),
            keras.layers.ZeroPadding2D(name="pad"),
            keras.layers.Conv2D(8, 3, activation="relu", name="c1"),
            keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="c3"),
            keras.layers.Dropout(0.2),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(10, name="logits"),
        ]
    )
    assert feature_layers(model) == ["c2", "c3"]
    assert check_taps(model, feature_layers(model)) == [(16, 16), (8, 8)]


def test_encoder_decoder_taps_in_network_order_without_the_logits():
    inputs = keras.Input((16, 16, 3))
    e1 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="e1")(inputs)
    e2 = keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu", name="e2")(e1)
    d1 = keras.layers.Conv2DTranspose(8, 2, strides=2, name="d1")(e2)
    d2 = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="d2")(d1)
    model = keras.Model(inputs, keras.layers.Conv2D(4, 1, name="pixel_logits")(d2))
    assert feature_layers(model) == ["e1", "e2", "d2"]  # 16x16, 8x8, then 16x16 again


def test_no_map_no_tap():
    mlp = keras.Sequential(
        [keras.Input((12,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)]
    )
    assert feature_layers(mlp) == []
    assert len(feature_extractor(mlp).outputs) == 1


def test_conv1d_maps_are_taps():
    model = keras.Sequential(
        [
            keras.Input((40, 2)),
            keras.layers.Conv1D(8, 5, activation="relu", name="a"),
            keras.layers.Conv1D(8, 3, strides=2, activation="relu", name="b"),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(4),
        ]
    )
    assert feature_layers(model) == ["a", "b"]
    assert [tuple(o.shape[1:]) for o in feature_extractor(model).outputs] == [
        (4,),
        (36, 8),
        (17, 8),
    ]


@pytest.mark.parametrize(
    "arch, kwargs, first",
    [
        ("MobileNetV2", {"alpha": 0.35}, "block_1_expand_relu"),
        (
            "EfficientNetB0",
            {},
            "block2a_expand_activation",
        ),  # not the squeeze-excite 1x1 maps, not Rescaling
        ("ResNet50", {}, "conv1_relu"),
    ],
)
def test_keras_applications_get_stage_outputs(arch, kwargs, first):
    model = getattr(keras.applications, arch)(
        weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None, **kwargs
    )
    taps = feature_layers(model)
    assert taps[0] == first
    shapes = check_taps(model, taps)
    assert shapes == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    if arch == "ResNet50":
        assert taps == [
            "conv1_relu",
            "conv2_block3_out",
            "conv3_block4_out",
            "conv4_block6_out",
            "conv5_block3_out",
        ]
