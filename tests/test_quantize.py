"""quantize_model and feature taps on the project's ResNets, Sequential models and keras.applications."""

import logging
import re
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf.features import feature_extractor, feature_layers
from faqd_tf.layers import (
    QuantConv1D,
    QuantConv2D,
    QuantConv2DTranspose,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantReLU,
    QuantSeparableConv2D,
)
from faqd_tf.models import resnet_cifar
from faqd_tf.quantize import (
    _walk,
    classifier_layer,
    float_kernel_layers,
    quantize_model,
    set_alpha_decay,
)
from tests.references import np_qrelu_grads, np_quantize


def test_resnet20_twin_keeps_names_weights_and_quantizes(rng):
    fp = resnet_cifar(20, input_shape=(16, 16, 3))
    twin = quantize_model(fp, weight_bits=2, activation_bits=4, per_channel=True)
    assert [layer.name for layer in twin.layers] == [layer.name for layer in fp.layers]
    conv = twin.get_layer("s2b1_conv1")
    assert isinstance(conv, QuantConv2D) and conv.weight_bits == 2 and conv.per_channel
    np.testing.assert_array_equal(conv.kernel.numpy(), fp.get_layer("s2b1_conv1").kernel.numpy())
    np.testing.assert_allclose(
        conv.quantized_kernel().numpy(),
        np_quantize(conv.kernel.numpy(), 2, per_channel=True),
        rtol=1e-5,
    )
    assert twin.get_layer("logits").weight_bits is None  # the head stays full precision
    assert twin.get_layer("stage2").bits == 4
    assert feature_layers(twin) == ["stage1", "stage2", "stage3"]


def test_twin_of_a_frozen_teacher_is_trainable():
    fp = resnet_cifar(8, input_shape=(16, 16, 3))
    fp.trainable = False
    twin = quantize_model(fp, weight_bits=4)
    assert twin.trainable and len(twin.trainable_weights) == len(
        resnet_cifar(8, input_shape=(16, 16, 3)).trainable_weights
    )


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
    assert (
        isinstance(twin.get_layer("c1"), QuantConv2D)
        and twin.get_layer("c1").activation is keras.activations.linear
    )
    assert isinstance(twin.get_layer("c1_relu"), QuantReLU) and twin.get_layer("c1_relu").bits == 2
    assert isinstance(twin.get_layer("act"), QuantReLU)
    assert twin.get_layer("d1").weight_bits == 4 and twin.get_layer("head").weight_bits is None
    x = rng.normal(size=(3, 10, 10, 2)).astype(np.float32)
    twin.save(tmp_path / "t.keras")
    loaded = keras.models.load_model(tmp_path / "t.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(x).numpy(), twin(x).numpy())


# ResNet50 takes minutes, MobileNetV2 about a minute to trace and save on 2 cores: run them with
# `-m slow` (the CI budget keeps them out).
@pytest.mark.parametrize(
    "arch",
    [
        pytest.param("ResNet50", marks=pytest.mark.slow),
        pytest.param("MobileNetV2", marks=pytest.mark.slow),
    ],
)
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
    kernel_layers = [
        l
        for l in twin.layers
        if isinstance(l, (keras.layers.Conv2D, keras.layers.Dense, keras.layers.DepthwiseConv2D))
    ]
    assert kernel_layers and all(
        isinstance(l, (QuantConv2D, QuantDense, QuantDepthwiseConv2D)) for l in kernel_layers
    )
    assert sum(isinstance(l, QuantConv2D) and l.weight_bits == 4 for l in twin.layers) >= 20
    assert sum(isinstance(l, QuantReLU) and l.bits == 4 for l in twin.layers) >= 10
    twin.compile(
        keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    loss = twin.train_on_batch(x, y)
    assert np.isfinite(loss)
    assert len(feature_extractor(twin).outputs) > 3
    twin.save(tmp_path / "twin.keras")
    loaded = keras.models.load_model(tmp_path / "twin.keras", safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), twin.predict(x, verbose=0), rtol=1e-5, atol=1e-5
    )


def test_operations_written_on_tensors_pass_through(rng, tmp_path):
    # MobileNetV3 (hard-swish: x * relu6(x + 3) / 6) and ConvNeXt write math on tensors: their graph
    # holds Keras operations that are not layers and have no weights.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inputs)
    x = x * keras.ops.relu6(x + 3.0) / 6.0
    x = keras.ops.mean(x, axis=(1, 2))
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    twin = quantize_model(model, weight_bits=2)
    assert twin.get_layer("conv").weight_bits == 2 and twin.get_layer("head").weight_bits is None
    x = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    conv = twin.get_layer("conv")
    u = conv(x).numpy().astype(np.float64)  # the quantized conv, then the same math in float64
    want = (
        np.mean(u * np.clip(u + 3.0, 0.0, 6.0) / 6.0, axis=(1, 2))
        @ model.get_layer("head").kernel.numpy()
    )
    want += model.get_layer("head").bias.numpy()
    np.testing.assert_allclose(twin(x).numpy(), want, rtol=1e-4, atol=1e-5)
    twin.save(tmp_path / "ops.keras")
    loaded = keras.models.load_model(tmp_path / "ops.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(x).numpy(), twin(x).numpy(), rtol=1e-6, atol=1e-6)


def test_unsupported_layers_are_listed_and_bad_arguments_fail(rng):
    model = keras.Sequential(
        [
            keras.Input((8, 3)),
            keras.layers.SeparableConv1D(4, 3, name="sep"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    with pytest.warns(
        UserWarning, match=r"left these layers in full precision .*sep \(SeparableConv1D\)"
    ):
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


# ---- activation quantization: the ReLUs found, the alpha update and the alphas' weight decay --


def test_no_relu_to_quantize_warns_naming_the_model():
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)],
        name="tanh_net",
    )
    with pytest.warns(
        UserWarning, match=r"found no ReLU to quantize in model 'tanh_net'.*activation_bits=2"
    ):
        quantize_model(model, weight_bits=4, activation_bits=2)
    relu_net = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(4),
            keras.layers.ReLU(name="r"),
            keras.layers.Dense(2),
        ],
        name="relu_net",
    )
    # Every ReLU skipped is no ReLU quantized either.
    with pytest.warns(UserWarning, match=r"found no ReLU to quantize in model 'relu_net'"):
        quantize_model(relu_net, activation_bits=4, skip=["r"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quantize_model(relu_net, activation_bits=4).get_layer("r").bits == 4
        quantize_model(model, weight_bits=4)  # no activation_bits asked: nothing to say


def test_alpha_rate_reaches_every_quantized_relu_and_is_checked():
    model = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(4, 3, activation="relu", name="c1"),
            keras.layers.ReLU(name="r"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    )
    twin = quantize_model(model, activation_bits=1, alpha_rate=0.2)
    relus = [layer for layer in twin.layers if isinstance(layer, QuantReLU)]
    assert [(layer.name, layer.alpha_rate) for layer in relus] == [("c1_relu", 0.2), ("r", 0.2)]
    assert quantize_model(model, activation_bits=1).get_layer("r").alpha_rate == 0.01
    assert (
        quantize_model(model, activation_bits=1, alpha_rate=None).get_layer("r").alpha_rate is None
    )
    for bad in (0, -1.0, "fast"):
        with pytest.raises(ValueError, match=r"^alpha_rate=.* is not valid; use a number > 0"):
            quantize_model(model, activation_bits=1, alpha_rate=bad)


def test_builders_take_alpha_rate_and_decay_alphas_with_weight_decay():
    model = resnet_cifar(
        8, input_shape=(8, 8, 3), activation_bits=2, weight_decay=5e-4, alpha_rate=0.05
    )
    relus = [layer for layer in model.layers if isinstance(layer, QuantReLU)]
    assert len(relus) == 7 and all(layer.alpha_rate == 0.05 for layer in relus)
    # The kernels get L2(c), the alphas L2(c * 0.01), the authors' factor.
    assert model.get_layer("stem_conv").kernel_regularizer.get_config()["l2"] == pytest.approx(5e-4)
    assert all(layer.alpha.regularizer.get_config()["l2"] == pytest.approx(5e-6) for layer in relus)
    # Re-quantizing (the two-step recipe) keeps the alphas' decay and takes the new alpha_rate.
    twin = quantize_model(model, weight_bits=4, activation_bits=2, alpha_rate=None)
    assert twin.get_layer("stem_relu").alpha.regularizer.get_config()["l2"] == pytest.approx(5e-6)
    assert twin.get_layer("stem_relu").alpha_rate is None
    with pytest.raises(ValueError, match=r"^alpha_rate=-0.1 is not valid"):
        resnet_cifar(8, activation_bits=2, alpha_rate=-0.1)


def test_set_alpha_decay_reproduces_the_authors_step(rng):
    # One SGD step (lr, no momentum, weight decay wd) as the authors take it: the kernel decays
    # at wd (Keras' decoupled decay), alpha at wd * 0.01 on top of its clamped eq. (5) gradient.
    lr, wd, batch = 0.5, 0.1, 16
    inputs = keras.Input((6,))
    pre = QuantDense(40, name="dense")(inputs)
    model = keras.Model(inputs, QuantReLU(bits=2, name="relu")(pre))
    relu, dense = model.get_layer("relu"), model.get_layer("dense")
    relu.alpha.assign(rng.uniform(0.3, 0.9))
    x = rng.normal(size=(batch, 6)).astype(np.float32)
    w = rng.normal(size=(batch, 40)).astype(np.float32)
    optimizer = keras.optimizers.SGD(lr, weight_decay=wd)
    assert set_alpha_decay(model, optimizer, wd) == [relu.alpha]

    def loss(w, y):
        return keras.ops.sum(y * w, axis=-1)

    alpha0, kernel0 = float(relu.alpha.numpy()), dense.kernel.numpy().copy()
    z = (x @ kernel0 + dense.bias.numpy()).astype(np.float64)
    clamped = np_qrelu_grads(z, alpha0, 2, w / batch, alpha_rate=0.01)[1]
    with tf.GradientTape() as tape:
        kernel_grad = tape.gradient(keras.ops.mean(loss(w, model(x))), dense.kernel).numpy()
    model.compile(optimizer, loss=loss)
    model.fit(x, w, batch_size=batch, epochs=1, shuffle=False, verbose=0)
    assert float(relu.alpha.numpy()) == pytest.approx(
        alpha0 - lr * (clamped + wd * 0.01 * alpha0), rel=1e-6
    )
    np.testing.assert_allclose(
        dense.kernel.numpy(), kernel0 * (1 - lr * wd) - lr * kernel_grad, rtol=1e-5, atol=1e-6
    )


def test_set_alpha_decay_arguments():
    model = resnet_cifar(8, input_shape=(8, 8, 3))  # full-precision ReLUs: no alpha to decay
    assert set_alpha_decay(model, keras.optimizers.SGD(weight_decay=1e-4), 1e-4) == []
    for kwargs, name in (
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"weight_decay": 1e-4, "factor": "x"}, "factor"),
    ):
        with pytest.raises(ValueError, match=rf"^set_alpha_decay: {name}=.* must be a number >= 0"):
            set_alpha_decay(model, keras.optimizers.SGD(), **kwargs)


def assert_matches_reference(q, w, bits):
    """Q(w) against the float64 reference. At 2 bits the quantizer keeps the better of two Lloyd
    starts; where their errors tie to float32 precision either may win, so the check is the grid
    and the squared error, not the values."""
    want = np_quantize(w, bits)
    if bits != 2:
        np.testing.assert_allclose(q, want, rtol=1e-5, atol=1e-7)
        return
    w = w.astype(np.float64)
    assert len(np.unique(np.abs(q))) <= 2
    assert np.sum((w - q) ** 2) <= np.sum((w - want) ** 2) * (1 + 1e-5)


def test_layer_bits_most_specific_entry_wins_and_quantizes_each_layer_at_its_width(rng):
    fp = resnet_cifar(8, input_shape=(12, 12, 1))
    layer_bits = {"stem_conv": 8, "s.b1_conv.": 2, "s2b1_conv.": 4, "s3b1_conv2": None}
    twin = quantize_model(fp, weight_bits=1, layer_bits=layer_bits)
    widths = {
        layer.name: layer.weight_bits for layer in twin.layers if hasattr(layer, "weight_bits")
    }
    assert widths == {
        "stem_conv": 8,
        "s1b1_conv1": 2,
        "s1b1_conv2": 2,
        "s2b1_conv1": 4,
        "s2b1_conv2": 4,
        "s3b1_conv1": 2,
        "s3b1_conv2": None,
        "logits": None,
    }
    for name, bits in widths.items():
        layer = twin.get_layer(name)
        if bits is None:
            np.testing.assert_array_equal(
                layer.quantized_kernel().numpy(), fp.get_layer(name).kernel.numpy()
            )
        else:
            assert_matches_reference(layer.quantized_kernel().numpy(), layer.kernel.numpy(), bits)
    x = rng.normal(size=(3, 12, 12, 1)).astype("float32")
    assert np.all(np.isfinite(twin(x).numpy()))


def test_layer_bits_overrides_the_default_float_head_and_refuses_what_it_cannot_place():
    fp = resnet_cifar(8, input_shape=(12, 12, 1))
    assert (
        quantize_model(fp, weight_bits=2, layer_bits={"logits": 8}).get_layer("logits").weight_bits
        == 8
    )
    cases = [
        ({"nope": 1}, "'nope' matches no layer with a kernel"),
        ({"stem_conv": 3}, "layer_bits['stem_conv']=3 is not supported"),
        ({"s1.*": 1, "s1b1_conv.": 2}, "matches layer_bits keys 's1.*' and 's1b1_conv.' equally"),
        ({"(": 1}, "neither a layer name nor a regular expression"),
    ]
    for layer_bits, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            quantize_model(fp, weight_bits=1, layer_bits=layer_bits)
    with pytest.raises(ValueError, match="both in skip and in layer_bits"):
        quantize_model(fp, weight_bits=1, skip=["logits"], layer_bits={"logits": 8})


# ---- bring your own convnet: Conv1D, separable, transposed, nested models, any classifier --


def signal_classifier():
    inputs = keras.Input((32, 2))
    x = keras.layers.Conv1D(8, 5, padding="causal", activation="relu", name="c1")(inputs)
    x = keras.layers.MaxPooling1D(2, name="p1")(x)
    x = keras.layers.Conv1D(16, 3, padding="same", activation="relu", name="c2")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(x), name="signal")


def segmentation_net():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down")(inputs)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    x = keras.layers.Conv2DTranspose(8, 2, strides=2, name="up")(x)
    return keras.Model(inputs, keras.layers.Conv2D(5, 1, name="pixel_logits")(x), name="seg")


def nested_stem_net():
    stem = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 4, strides=4, name="stem_conv"),
            keras.layers.LayerNormalization(name="stem_ln"),
        ],
        name="stem",
    )
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.DepthwiseConv2D(3, padding="same", activation="relu", name="dw")(stem(inputs))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x), name="nested")


def conv_head_net():
    # MobileNet's head: pooled features, a 1x1 convolution, then Reshape and Activation.
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="body")(inputs)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True)(x)
    x = keras.layers.Conv2D(4, 1, name="conv_preds")(keras.layers.Dropout(0.1)(x))
    x = keras.layers.Activation("linear")(keras.layers.Reshape((4,))(x))
    return keras.Model(inputs, x, name="conv_head")


@pytest.mark.parametrize(
    "build, quantized, head",
    [
        (signal_classifier, {"c1": QuantConv1D, "c2": QuantConv1D}, "head"),
        (
            segmentation_net,
            {"down": QuantConv2D, "sep": QuantSeparableConv2D, "up": QuantConv2DTranspose},
            "pixel_logits",
        ),
        (nested_stem_net, {"stem/stem_conv": QuantConv2D, "dw": QuantDepthwiseConv2D}, "head"),
        (conv_head_net, {"body": QuantConv2D}, "conv_preds"),
    ],
)
def test_every_kernel_but_the_classifier_is_quantized(
    rng, tmp_path, caplog, build, quantized, head
):
    model = build()
    assert classifier_layer(model) == head
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="faqd_tf.quantize"):
            twin = quantize_model(model, weight_bits=2, activation_bits=4, per_channel=True)
    layers = dict(_walk(twin))
    for path, cls in quantized.items():
        assert type(layers[path]) is cls and layers[path].weight_bits == 2, path
        source = dict(_walk(model))[path]
        for name in layers[path].kernel_names:  # weights copied, nested ones too
            np.testing.assert_array_equal(
                getattr(layers[path], name).numpy(), getattr(source, name).numpy()
            )
    assert layers[head].weight_bits is None
    assert float_kernel_layers(twin) == {head: "classifier head"}
    assert f"kernel layers left in full precision: {head} (classifier head)" in caplog.text
    x = rng.normal(size=(3, *model.inputs[0].shape[1:])).astype(np.float32)
    same = quantize_model(model, weight_bits=None)
    np.testing.assert_allclose(same(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)
    twin.save(tmp_path / "twin.keras")
    loaded = keras.models.load_model(tmp_path / "twin.keras", safe_mode=True)
    np.testing.assert_allclose(loaded(x).numpy(), twin(x).numpy(), rtol=1e-6, atol=1e-6)
    # skip=[] quantizes the classifier too; a layer_bits entry names a nested layer by path or name.
    assert dict(_walk(quantize_model(model, weight_bits=4, skip=[])))[head].weight_bits == 4


def test_float_kernels_are_named_with_their_reason(caplog):
    model = nested_stem_net()
    with caplog.at_level(logging.INFO, logger="faqd_tf.quantize"):
        twin = quantize_model(model, weight_bits=1, layer_bits={"stem_conv": None, "dw": 8})
    assert float_kernel_layers(twin) == {
        "stem/stem_conv": "layer_bits['stem_conv']",
        "head": "classifier head",
    }
    assert dict(_walk(twin))["dw"].weight_bits == 8
    assert "stem/stem_conv (layer_bits['stem_conv']), head (classifier head)" in caplog.text
    assert float_kernel_layers(quantize_model(model, weight_bits=1, skip=["dw"])) == {"dw": "skip"}
    seq = keras.Sequential(
        [
            keras.Input((8, 3)),
            keras.layers.SeparableConv1D(4, 3, name="sep1d"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="d"),
        ]
    )
    with pytest.warns(UserWarning, match=r"quantized no kernel of model .* despite weight_bits=2"):
        twin = quantize_model(seq, weight_bits=2)
    assert float_kernel_layers(twin) == {
        "sep1d": "no quantized counterpart",
        "d": "classifier head",
    }


def test_feature_layers_of_a_conv1d_model_feed_fa():
    model = signal_classifier()
    assert feature_layers(model) == ["c1", "c2"]
    extractor = feature_extractor(quantize_model(model, weight_bits=2))
    assert [tuple(o.shape[1:]) for o in extractor.outputs] == [(4,), (32, 8), (16, 16)]


def test_first_layers_are_the_kernel_layers_that_see_the_input_first():
    from faqd_tf.quantize import first_layers

    inputs = keras.Input((8, 8, 2))
    scaled = keras.layers.Rescaling(0.5, name="scale")(inputs)
    a = keras.layers.Conv2D(3, 3, padding="same", name="branch_a")(scaled)
    b = keras.layers.Conv2D(3, 1, name="branch_b")(inputs)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.Conv2D(3, 3, name="after")(x)
    x = keras.layers.Flatten()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
    assert sorted(first_layers(model)) == ["branch_a", "branch_b"]
    inner = keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.Conv2D(3, 3, name="inner_conv"),
            keras.layers.Conv2D(3, 3, name="inner_conv2"),
        ],
        name="stem",
    )
    outer = keras.Sequential(
        [keras.Input((8, 8, 2)), inner, keras.layers.Flatten(), keras.layers.Dense(2, name="out")]
    )
    assert first_layers(outer) == ["stem/inner_conv"]


def test_a_1bit_model_keeps_its_first_layer_at_8_bits_unless_told(rng):
    from faqd_tf.quantize import resolve_layer_bits

    fp = resnet_cifar(8, input_shape=(12, 12, 1))
    one = quantize_model(fp, weight_bits=1)
    assert (
        one.get_layer("stem_conv").weight_bits == 8 and one.get_layer("s1b1_conv1").weight_bits == 1
    )
    np.testing.assert_allclose(
        one.get_layer("stem_conv").quantized_kernel().numpy(),
        np_quantize(fp.get_layer("stem_conv").kernel.numpy(), 8),
        rtol=1e-5,
        atol=1e-7,
    )
    assert (
        quantize_model(fp, weight_bits=2).get_layer("stem_conv").weight_bits == 2
    )  # only 1 bit measured
    assert (
        resolve_layer_bits(fp, 1, first_layer_bits=1)["stem_conv"] == 1
    )  # the authors' all-binary net
    assert resolve_layer_bits(fp, 1, first_layer_bits=None)["stem_conv"] is None
    assert resolve_layer_bits(fp, 1, {"stem_conv": 2})["stem_conv"] == 2  # layer_bits wins
    assert (
        resnet_cifar(8, input_shape=(12, 12, 1), weight_bits=1).get_layer("stem_conv").weight_bits
        == 8
    )
    with pytest.raises(ValueError, match="first_layer_bits=3 is not supported"):
        quantize_model(fp, weight_bits=1, first_layer_bits=3)
