"""quantize_model and feature taps on the project's ResNets, Sequential models and keras.applications."""

import warnings

import keras
import numpy as np
import pytest

from faqd_tf.features import feature_extractor, feature_layers
from faqd_tf.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D, QuantReLU
from faqd_tf.models import resnet_cifar
from faqd_tf.quantize import quantize_model
from tests.test_quantizers import np_quantize


def test_resnet20_twin_keeps_names_weights_and_quantizes(rng):
    fp = resnet_cifar(20, input_shape=(16, 16, 3))
    twin = quantize_model(fp, weight_bits=2, activation_bits=4, per_channel=True)
    assert [layer.name for layer in twin.layers] == [layer.name for layer in fp.layers]
    conv = twin.get_layer("s2b1_conv1")
    assert isinstance(conv, QuantConv2D) and conv.weight_bits == 2 and conv.per_channel
    np.testing.assert_array_equal(conv.kernel.numpy(), fp.get_layer("s2b1_conv1").kernel.numpy())
    np.testing.assert_allclose(
        conv.quantized_kernel().numpy(), np_quantize(conv.kernel.numpy(), 2, per_channel=True), rtol=1e-5
    )
    assert twin.get_layer("logits").weight_bits is None  # the head stays full precision
    assert twin.get_layer("stage2").bits == 4
    assert feature_layers(twin) == ["stage1", "stage2", "stage3"]


def test_twin_of_a_frozen_teacher_is_trainable():
    fp = resnet_cifar(8, input_shape=(16, 16, 3))
    fp.trainable = False
    twin = quantize_model(fp, weight_bits=4)
    assert twin.trainable and len(twin.trainable_weights) == len(resnet_cifar(8, input_shape=(16, 16, 3)).trainable_weights)


def test_bits_none_twin_is_exact_copy(rng):
    fp = resnet_cifar(20, input_shape=(16, 16, 3))
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    twin = quantize_model(fp, weight_bits=None)
    np.testing.assert_array_equal(twin(x, training=False).numpy(), fp(x, training=False).numpy())


def test_sequential_with_fused_relu(rng, tmp_path):
    model = keras.Sequential(
        [
            keras.Input((10, 10, 2)),
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.Activation("relu", name="act"),
            keras.layers.Flatten(),
            keras.layers.Dense(8, activation="relu", name="d1"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    twin = quantize_model(model, weight_bits=4, activation_bits=2)
    assert isinstance(twin.get_layer("c1"), QuantConv2D) and twin.get_layer("c1").activation is keras.activations.linear
    assert isinstance(twin.get_layer("c1_relu"), QuantReLU) and twin.get_layer("c1_relu").bits == 2
    assert isinstance(twin.get_layer("act"), QuantReLU)
    assert twin.get_layer("d1").weight_bits == 4 and twin.get_layer("head").weight_bits is None
    x = rng.normal(size=(3, 10, 10, 2)).astype(np.float32)
    twin.save(tmp_path / "t.keras")
    loaded = keras.models.load_model(tmp_path / "t.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(x).numpy(), twin(x).numpy())


# ResNet50 takes minutes, MobileNetV2 about a minute to trace and save on 2 cores: run them with
# `-m slow` (the CI budget keeps them out).
@pytest.mark.parametrize("arch", [pytest.param("ResNet50", marks=pytest.mark.slow),
                                  pytest.param("MobileNetV2", marks=pytest.mark.slow)])
def test_keras_applications_twin_runs_trains_and_saves(rng, tmp_path, arch):
    build = getattr(keras.applications, arch)
    model = build(weights=None, input_shape=(32, 32, 3), classes=4, classifier_activation=None)
    x = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 4, size=(4,))

    same = quantize_model(model, weight_bits=None)
    np.testing.assert_array_equal(same(x, training=False).numpy(), model(x, training=False).numpy())

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every layer with a kernel has a quantized twin here
        twin = quantize_model(model, weight_bits=4, activation_bits=4)
    kernel_layers = [l for l in twin.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D))]
    assert kernel_layers and all(isinstance(l, (QuantConv2D, QuantDense, QuantDepthwiseConv2D)) for l in kernel_layers)
    assert sum(isinstance(l, QuantConv2D) and l.weight_bits == 4 for l in twin.layers) >= 20
    assert sum(isinstance(l, QuantReLU) and l.bits == 4 for l in twin.layers) >= 10
    twin.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    loss = twin.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert len(feature_extractor(twin).outputs) > 3
    twin.save(tmp_path / "twin.keras")
    loaded = keras.models.load_model(tmp_path / "twin.keras", safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), twin.predict(x, verbose=0), rtol=1e-5, atol=1e-5)


def test_unsupported_layers_are_listed_and_bad_arguments_fail(rng):
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.SeparableConv2D(4, 3, name="sep"), keras.layers.Flatten(), keras.layers.Dense(2)]
    )
    with pytest.warns(UserWarning, match=r"left these layers in full precision .*sep \(SeparableConv2D\)"):
        quantize_model(model, weight_bits=2)
    with pytest.raises(ValueError, match=r"weight_bits=3 is not supported"):
        quantize_model(model, weight_bits=3)
    with pytest.raises(ValueError, match=r"skip names layers the model does not have: \['nope'\]"):
        quantize_model(model, skip=["nope"])


def test_feature_layers_by_resolution_for_models_without_stage_names():
    inputs = keras.Input((16, 16, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", name="a1")(inputs)
    a = keras.layers.ReLU(name="a2")(a)
    b = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="b1")(a)
    b = keras.layers.ReLU(name="b2")(b)
    out = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(b))
    assert feature_layers(keras.Model(inputs, out)) == ["a2", "b2"]
