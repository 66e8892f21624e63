"""The paper's networks: parameter counts, stage taps, quantized layers, saving, the registry."""

import keras
import numpy as np
import pytest

from faqd_tf import models
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.models import ChannelPad

# Trainable parameters (PyTorch counts parameters only, not BN running statistics, i.e. Keras'
# trainable weights). Exact references: option-A CIFAR ResNets as counted by the widely used PyTorch
# reimplementation (akamaster/pytorch_resnet_cifar10: 269,722 ... 1,727,962); pre-activation
# bottleneck ResNet164 with projection shortcuts 1.70M; torchvision resnet18/resnet34 at 1000
# classes. Published (rounded) figures: He et al. 2016 Table 6 and 2016b Table 3, torchvision docs.
EXPECTED = {
    # name: (exact trainable count, published rounded count, stage widths, builder kwargs)
    "resnet20": (269_722, 0.27e6, (16, 32, 64), {}),
    "resnet32": (464_154, 0.46e6, (16, 32, 64), {}),
    "resnet44": (658_586, 0.66e6, (16, 32, 64), {}),
    "resnet56": (853_018, 0.85e6, (16, 32, 64), {}),
    "resnet110": (1_727_962, 1.7e6, (16, 32, 64), {}),
    "resnet164": (1_703_258, 1.7e6, (64, 128, 256), {}),
    "resnet18": (11_689_512, 11.7e6, (64, 128, 256, 512), {"num_classes": 1000}),
    "resnet34": (21_797_672, 21.8e6, (64, 128, 256, 512), {"num_classes": 1000}),
}
PUBLISHED_TOLERANCE = 0.02  # relative, against the rounded published figure


def trainable_count(model):
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def layers_of(model, cls):
    return [layer for layer in model.layers if isinstance(layer, cls)]


@pytest.mark.parametrize("name", list(EXPECTED))
def test_param_counts_and_stage_shapes(name):
    exact, published, widths, kwargs = EXPECTED[name]
    model = models.get(name, **kwargs)
    count = trainable_count(model)
    assert count == exact
    assert abs(count - published) / published < PUBLISHED_TOLERANCE
    assert model.name == name
    # Stage taps: 32/16/8 pixels for a 32x32 CIFAR input; 56/28/14/7 for a 224x224 ImageNet input.
    sizes = (32, 16, 8) if len(widths) == 3 else (56, 28, 14, 7)
    for i, (size, width) in enumerate(zip(sizes, widths), start=1):
        assert tuple(model.get_layer(f"stage{i}").output.shape) == (None, size, size, width)
    with pytest.raises(ValueError):
        model.get_layer(f"stage{len(widths) + 1}")
    assert isinstance(model.get_layer("avg_pool"), keras.layers.GlobalAveragePooling2D)
    assert model.get_layer("logits").units == kwargs.get("num_classes", 10)
    assert tuple(model.output.shape) == (None, kwargs.get("num_classes", 10))
    names = [layer.name for layer in model.layers]
    assert len(names) == len(set(names))
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in model.layers)
    # Every ReLU is a QuantReLU, every conv a QuantConv2D, full precision by default.
    assert all(layer.weight_bits is None for layer in layers_of(model, QuantConv2D))
    assert all(layer.bits is None for layer in layers_of(model, QuantReLU))
    assert not any(
        type(layer) is keras.layers.ReLU or type(layer) is keras.layers.Conv2D
        for layer in model.layers
    )


def test_resnet18_small_input_stages_and_cifar_count():
    model = models.resnet18(num_classes=10, input_shape=(64, 64, 3), small_input=True)
    for i, (size, width) in enumerate(zip((64, 32, 16, 8), (64, 128, 256, 512)), start=1):
        assert tuple(model.get_layer(f"stage{i}").output.shape) == (None, size, size, width)
    # The "~11.2M" often quoted for ResNet18 is this 3x3-stem, 10-class variant (11,173,962);
    # the 7x7 stem (+ 7,680) and a 1000-class head (+ 507,870) give torchvision's 11,689,512.
    assert trainable_count(model) == 11_173_962
    assert "stem_pool" not in [layer.name for layer in model.layers]
    assert model.get_layer("stem_conv").kernel_size == (3, 3)
    assert model.get_layer("stem_conv").strides == (1, 1)


@pytest.mark.parametrize(
    "name, kwargs, n_conv",
    [
        ("resnet20", {}, 19),  # stem + 2 per block, option-A shortcuts have no conv
        ("resnet164", {}, 163 + 3),  # stem + 3 per block + 3 projections
        ("resnet18", {"num_classes": 200, "input_shape": (64, 64, 3), "small_input": True}, 17 + 3),
    ],
)
def test_quantized_build_has_quantized_layers(name, kwargs, n_conv):
    model = models.get(name, weight_bits=4, activation_bits=4, **kwargs)
    convs = layers_of(model, QuantConv2D)
    relus = layers_of(model, QuantReLU)
    assert len(convs) == n_conv
    assert convs[0].name == "stem_conv"
    assert all(layer.weight_bits == 4 and not layer.per_channel for layer in convs)
    assert relus and all(layer.bits == 4 for layer in relus)
    assert all(layer.alpha is not None for layer in relus)
    logits = model.get_layer("logits")
    assert isinstance(logits, QuantDense) and logits.weight_bits is None


def test_quantized_forward_is_on_the_activation_grid(rng):
    model = models.resnet20(weight_bits=4, activation_bits=4, per_channel=True)
    assert all(layer.per_channel for layer in layers_of(model, QuantConv2D))
    taps = keras.Model(model.input, [model.get_layer("stage1").output, model.output])
    x = rng.normal(size=(3, 32, 32, 3)).astype("float32")
    stage1, logits = (np.asarray(t) for t in taps(x, training=False))
    alpha = float(np.asarray(model.get_layer("stage1").alpha))
    codes = stage1 / alpha
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    assert codes.min() >= 0 and codes.max() <= 15 + 1e-3
    assert logits.shape == (3, 10) and np.isfinite(logits).all()


@pytest.mark.parametrize(
    "name, kwargs, shape, modes",
    [
        ("resnet20", {}, (32, 32, 3), (False, True)),
        ("resnet164", {"num_classes": 100}, (32, 32, 3), (False,)),  # big: inference only
        (
            "resnet18",
            {"num_classes": 200, "input_shape": (64, 64, 3), "small_input": True},
            (64, 64, 3),
            (False, True),
        ),
        ("resnet18", {"num_classes": 1000, "input_shape": (96, 96, 3)}, (96, 96, 3), (False,)),
    ],
)
def test_fp_forward_finite_logits(rng, name, kwargs, shape, modes):
    model = models.get(name, **kwargs)
    x = rng.normal(size=(2, *shape)).astype("float32")
    for training in modes:
        logits = np.asarray(model(x, training=training))
        assert logits.shape == (2, kwargs.get("num_classes", 10))
        assert np.isfinite(logits).all()


def test_save_load_quantized_resnet20(tmp_path, rng):
    model = models.resnet20(weight_bits=2, activation_bits=2)
    # Non-default state so the round trip is meaningful: alphas, BN statistics.
    for layer in layers_of(model, QuantReLU):
        layer.alpha.assign(float(rng.uniform(0.3, 1.0)))
    for layer in layers_of(model, keras.layers.BatchNormalization):
        c = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rng.normal(0, 0.1, size=c).astype("float32"))
        layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=c).astype("float32"))
    path = tmp_path / "resnet20_w2a2.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(loaded(x, training=False)),
        np.asarray(model(x, training=False)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert [layer.name for layer in loaded.layers] == [layer.name for layer in model.layers]
    assert isinstance(loaded.get_layer("s2b1_sc_pad"), ChannelPad)
    assert loaded.get_layer("s1b1_conv1").weight_bits == 2
    assert loaded.get_layer("stage3").bits == 2


def test_weights_copy_by_name_from_fp_to_quantized_twin(rng):
    fp = models.resnet20(num_classes=10)
    q = models.resnet20(num_classes=10, weight_bits=8, activation_bits=None)
    assert [layer.name for layer in fp.layers] == [layer.name for layer in q.layers]
    for layer in fp.layers:
        if layer.weights:
            q.get_layer(layer.name).set_weights(layer.get_weights())
    x = rng.normal(size=(2, 32, 32, 3)).astype("float32")
    a, b = np.asarray(fp(x, training=False)), np.asarray(q(x, training=False))
    # 8-bit weights: close to, but not exactly, the FP output.
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(a, b, rtol=0.1, atol=0.1 * np.abs(a).max())


def test_option_a_shortcut_and_padding_geometry(rng):
    model = models.resnet20()
    pool = model.get_layer("s2b1_sc_pool")
    assert pool.pool_size == (1, 1) and pool.strides == (2, 2)
    pad = model.get_layer("s2b1_sc_pad")
    assert (pad.before, pad.after) == (8, 8)
    # Stride-2 convs use PyTorch's symmetric padding, so conv output k is centred on input 2k,
    # like the subsample x[:, ::2, ::2].
    assert model.get_layer("s2b1_conv1_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("s2b1_conv1").padding == "valid"
    shortcut = keras.Model(model.input, model.get_layer("s2b1_sc_pad").output)
    stage1 = keras.Model(model.input, model.get_layer("stage1").output)
    x = rng.normal(size=(1, 32, 32, 3)).astype("float32")
    s1 = np.asarray(stage1(x, training=False))
    expected = np.pad(s1[:, ::2, ::2, :], [(0, 0), (0, 0), (0, 0), (8, 8)])
    np.testing.assert_allclose(np.asarray(shortcut(x, training=False)), expected, rtol=1e-6)


def test_channel_pad_layer():
    layer = ChannelPad(1, 2, name="pad")
    x = np.arange(6, dtype="float32").reshape(1, 1, 2, 3)
    y = np.asarray(layer(x))
    assert y.shape == (1, 1, 2, 6)
    np.testing.assert_array_equal(y[..., 1:4], x)
    assert not y[..., :1].any() and not y[..., 4:].any()
    clone = ChannelPad.from_config(layer.get_config())
    assert (clone.before, clone.after, clone.name) == (1, 2, "pad")
    assert layer.compute_output_shape((None, 4, 4, 3)) == (None, 4, 4, 6)
    with pytest.raises(ValueError, match="before"):
        ChannelPad(-1, 0)


def test_bn_momentum_epsilon_and_weight_decay():
    model = models.resnet20(weight_decay=5e-5)
    bns = layers_of(model, keras.layers.BatchNormalization)
    assert bns and all(bn.momentum == 0.9 and bn.epsilon == 1e-5 for bn in bns)
    assert all(
        isinstance(layer.kernel_regularizer, keras.regularizers.L2)
        for layer in layers_of(model, QuantConv2D) + [model.get_layer("logits")]
    )
    assert len(model.losses) == 19 + 1
    model = models.resnet20(bn_momentum=0.99)
    assert all(bn.momentum == 0.99 for bn in layers_of(model, keras.layers.BatchNormalization))
    assert all(layer.kernel_regularizer is None for layer in layers_of(model, QuantConv2D))
    assert model.losses == []


def test_registry():
    assert models.available() == (
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet164",
        "resnet18",
        "resnet34",
    )
    model = models.get("ResNet20", num_classes=100, name="student")
    assert model.name == "student" and tuple(model.output.shape) == (None, 100)
    with pytest.raises(ValueError, match="resnet20.*resnet34") as info:
        models.get("resnet50")
    assert "resnet50" in str(info.value)
    with pytest.raises(ValueError, match="resnet20"):
        models.get(None)


@pytest.mark.parametrize(
    "call, allowed",
    [
        (lambda: models.resnet_cifar(22), "20, 32, 44, 56, 110, 164"),
        (lambda: models.resnet_cifar(True), "20, 32, 44, 56, 110, 164"),
        (lambda: models.resnet_imagenet(50), "18, 34"),
        (lambda: models.resnet20(num_classes=0), "num_classes"),
        (lambda: models.resnet20(bn_momentum=1.0), "bn_momentum"),
        (lambda: models.resnet20(weight_bits=3), "1, 2, 4, 8"),
        (lambda: models.resnet18(activation_bits=5), "1, 2, 4, 8"),
    ],
)
def test_bad_arguments_raise_value_error(call, allowed):
    with pytest.raises(ValueError, match=allowed):
        call()
