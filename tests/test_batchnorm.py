"""recalibrate_batchnorm against float64 NumPy statistics of each layer's inputs in inference mode."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import batchnorm, quantize_model
from faqd_tf.batchnorm import recalibrate_batchnorm


def np_moments(u, axis=-1):
    """Per-channel mean and biased variance of `u` in float64 over every axis but `axis`."""
    u = np.moveaxis(np.asarray(u, np.float64), axis, -1).reshape(-1, u.shape[axis])
    return u.mean(0), u.var(0)


def scramble(model, rng):
    """Moving statistics far from any true ones, and gammas/betas that are not 1/0, so that a
    layer recalibrated before (or without) the layers upstream of it gets visibly wrong numbers."""
    for layer in model._flatten_layers(recursive=True):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0, 3, c).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.1, 10, c).astype("float32"))
            layer.gamma.assign(rng.uniform(0.5, 2, c).astype("float32"))
            layer.beta.assign(rng.normal(0, 1, c).astype("float32"))


def residual_net(rng):
    """Conv-BN-ReLU twice with a 1x1 conv + BN shortcut (two BN branches in parallel)."""
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    y = keras.layers.Conv2D(5, 3, strides=2, padding="same", name="conv2")(x)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    s = keras.layers.Conv2D(5, 1, strides=2, name="short")(x)
    s = keras.layers.BatchNormalization(name="bn_short")(s)
    x = keras.layers.ReLU()(keras.layers.Add()([y, s]))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv3")(x)
    x = keras.layers.BatchNormalization(name="bn3")(x)
    outputs = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    scramble(model, rng)
    return model


def bn_inputs(model, names, x):
    """Each named layer's input in inference mode, from a separate Functional tap (not the hooks)."""
    taps = keras.Model(model.input, [model.get_layer(n).input for n in names])
    outputs = taps(x, training=False)
    return dict(zip(names, outputs if len(names) > 1 else [outputs]))


def test_statistics_equal_numpy_on_inference_inputs(rng):
    model = residual_net(rng)
    images = rng.normal(0.5, 2.0, (70, 8, 8, 3)).astype("float32")
    frozen = {w.path: w.numpy() for w in model.weights if "moving" not in w.path}

    names = recalibrate_batchnorm(model, images, batch_size=16)

    assert (
        names[0] == "bn1"
        and names[-1] == "bn3"
        and sorted(names) == ["bn1", "bn2", "bn3", "bn_short"]
    )
    for name, u in bn_inputs(model, names, images).items():
        mean, var = np_moments(u.numpy())
        layer = model.get_layer(name)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6 * np.abs(u).max()
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), var, rtol=1e-5, atol=1e-6 * np.abs(u).max() ** 2
        )
    for w in model.weights:  # nothing but the moving statistics moved
        if "moving" not in w.path:
            np.testing.assert_array_equal(w.numpy(), frozen[w.path])
    assert all("call" not in layer.__dict__ for layer in model.layers)  # hooks removed


def test_after_recalibration_normalized_outputs_have_beta_mean(rng):
    # The consequence a user relies on: on the calibration images each BN outputs mean beta and
    # standard deviation |gamma| * sqrt(var / (var + eps)).
    model = residual_net(rng)
    images = rng.uniform(-1, 3, (40, 8, 8, 3)).astype("float32")
    recalibrate_batchnorm(model, images, batch_size=7)
    taps = keras.Model(model.input, model.get_layer("bn2").output)
    out = np.asarray(taps(images, training=False), np.float64).reshape(-1, 5)
    layer = model.get_layer("bn2")
    np.testing.assert_allclose(out.mean(0), layer.beta.numpy(), atol=1e-4)
    var = layer.moving_variance.numpy().astype(np.float64)
    np.testing.assert_allclose(
        out.std(0), np.abs(layer.gamma.numpy()) * np.sqrt(var / (var + layer.epsilon)), rtol=1e-4
    )


class Block(keras.layers.Layer):
    """A custom (non-Model) layer holding a BatchNormalization, as Keras tutorials write blocks."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(units)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.dense(x), training=training))


class Net(keras.Model):
    def __init__(self):
        super().__init__()
        self.block1, self.block2 = Block(6), Block(4)
        self.head = keras.layers.Dense(2)

    def call(self, x, training=None):
        return self.head(self.block2(self.block1(x, training=training), training=training))


def test_subclassed_model_with_batchnorm_inside_custom_layers(rng):
    model = Net()
    model(keras.Input((5,)))
    scramble(model, rng)
    images = rng.normal(1.0, 3.0, (33, 5)).astype("float32")
    names = recalibrate_batchnorm(model, images, batch_size=10)
    assert len(names) == 2
    # Reference: the forward pass written out with the layers' own calls.
    u1 = model.block1.dense(images)
    u2 = model.block2.dense(keras.ops.relu(model.block1.bn(u1, training=False)))
    for bn, u in ((model.block1.bn, u1), (model.block2.bn, u2)):
        mean, var = np_moments(u.numpy())
        np.testing.assert_allclose(bn.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.moving_variance.numpy(), var, rtol=1e-5, atol=1e-5)


def test_channel_axis_labels_ignored_and_samples(rng):
    model = keras.Sequential(
        [keras.Input((4, 6)), keras.layers.BatchNormalization(axis=1, name="bn")]
    )
    images = rng.normal(rng.normal(0, 5, (1, 4, 1)), 2.0, (50, 4, 6)).astype("float32")
    labels = rng.integers(0, 3, 50)
    data = tf.data.Dataset.from_tensor_slices((images, labels)).batch(8)
    recalibrate_batchnorm(model, data, samples=20)
    mean, var = np_moments(images[:20], axis=1)
    np.testing.assert_allclose(
        model.get_layer("bn").moving_mean.numpy(), mean, rtol=1e-6, atol=1e-6
    )
    np.testing.assert_allclose(model.get_layer("bn").moving_variance.numpy(), var, rtol=1e-6)


def test_quantized_twin_gets_its_own_statistics(rng):
    # The use in the baselines: BN of a round-to-nearest 1-bit twin, not of the float teacher.
    teacher = residual_net(rng)
    images = rng.normal(0, 1, (24, 8, 8, 3)).astype("float32")
    student = quantize_model(teacher, weight_bits=1)
    recalibrate_batchnorm(student, images)
    u = bn_inputs(student, ["bn3"], images)["bn3"].numpy()
    np.testing.assert_allclose(
        student.get_layer("bn3").moving_mean.numpy(), np_moments(u)[0], rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(
        student.get_layer("bn3").moving_mean.numpy(), teacher.get_layer("bn3").moving_mean.numpy()
    )


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (np.zeros((4, 7, 8, 3)), {}, "shape"),
        (np.full((4, 8, 8, 3), np.nan), {}, "NaN"),
        (np.zeros((0, 8, 8, 3)), {}, "no image"),
        (np.ones((4, 8, 8, 3)), {"batch_size": 0}, "batch_size"),
        (np.ones((4, 8, 8, 3)), {"samples": -1}, "samples"),
    ],
)
def test_bad_input_is_one_line(rng, images, kwargs, message):
    model = residual_net(rng)
    with pytest.raises(ValueError, match=message) as err:
        recalibrate_batchnorm(model, images, **kwargs)
    assert "\n" not in str(err.value)


def test_model_without_batchnorm_warns_and_is_left_alone(rng):
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)], name="plain")
    before = [w.numpy().copy() for w in plain.weights]
    with pytest.warns(
        UserWarning,
        match=r"^recalibrate_batchnorm: 'plain' has no BatchNormalization layer; nothing to do\.$",
    ):
        assert recalibrate_batchnorm(plain, rng.normal(size=(4, 3))) == []
    for w, b in zip(plain.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


def test_models_it_cannot_recalibrate(rng):
    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(name="shared")
    shared = keras.Model(inputs, bn(keras.layers.Dense(3)(bn(inputs))))
    with pytest.raises(ValueError, match="more than once"):
        recalibrate_batchnorm(shared, rng.normal(size=(4, 3)))
    assert "call" not in bn.__dict__


class Traced(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = keras.layers.BatchNormalization()

    @tf.function
    def call(self, x, training=None):
        return self.bn(x, training=training)


def test_masked_or_traced_calls_are_refused_in_one_line(rng):
    masked = keras.Sequential(
        [keras.Input((5, 3)), keras.layers.Masking(), keras.layers.BatchNormalization()]
    )
    traced = Traced()
    traced(np.ones((1, 3), "float32"))
    for model, x, message in (
        (masked, rng.normal(size=(4, 5, 3)), "mask"),
        (traced, rng.normal(size=(4, 3)), "tf.function"),
    ):
        with pytest.raises(ValueError, match=message) as err:
            recalibrate_batchnorm(model, x)
        assert "\n" not in str(err.value)


# ---- one pass: equal to the per-layer passes, and linear in depth ------------------------------


def nested_net(rng):
    """A residual net whose middle block is a nested Sequential (ConvNeXt's stem is one)."""
    block = keras.Sequential(
        [
            keras.Input((8, 8, 6)),
            keras.layers.Conv2D(6, 3, padding="same", name="inner_conv"),
            keras.layers.BatchNormalization(name="inner_bn"),
            keras.layers.ReLU(),
        ],
        name="block",
    )
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Dropout(0.5)(keras.layers.ReLU()(x))  # inference mode: no dropout
    y = keras.layers.Add()([block(x), x])
    y = keras.layers.BatchNormalization(name="bn2")(keras.layers.Conv2D(4, 1, name="conv2")(y))
    outputs = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(y))
    model = keras.Model(inputs, outputs)
    scramble(model, rng)
    return model


def statistics(model):
    return {
        layer.name: (layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy())
        for layer in batchnorm._batchnorm_layers(model)
    }


@pytest.mark.parametrize("build", [residual_net, nested_net])
def test_one_pass_equals_one_pass_per_layer(rng, build):
    model = build(rng)
    images = rng.normal(0.3, 1.5, (45, 8, 8, 3)).astype("float32")
    start = [w.numpy().copy() for w in model.weights]
    layers = batchnorm._batchnorm_layers(model)
    assert batchnorm._runs_as_graph(model, layers)
    batches = batchnorm._images(images, model, None)
    reference = [
        layer.name for layer in batchnorm._recalibrate_per_layer(model, layers, batches, 16)
    ]
    want = statistics(model)
    for w, value in zip(model.weights, start):
        w.assign(value)
    names = recalibrate_batchnorm(model, images, batch_size=16)
    assert sorted(names) == sorted(reference) and names[0] == reference[0]
    for name, (mean, var) in statistics(model).items():
        # Same float64 sums over the same float32 inputs: equal to float32 rounding of the statistics.
        np.testing.assert_allclose(
            mean, want[name][0], rtol=1e-5, atol=1e-6 * (1 + np.abs(want[name][0]).max())
        )
        np.testing.assert_allclose(
            var, want[name][1], rtol=1e-5, atol=1e-6 * (1 + want[name][1].max())
        )


def test_one_pass_runs_each_layer_once_per_batch(rng):
    # Linear in depth: the first convolution runs once per batch, not once per batch and BN layer.
    model = residual_net(rng)
    conv = model.get_layer("conv1")
    calls = []
    conv.call = lambda *args, _call=conv.call, **kwargs: calls.append(1) or _call(*args, **kwargs)
    try:
        recalibrate_batchnorm(
            model, rng.normal(size=(40, 8, 8, 3)).astype("float32"), batch_size=16
        )
    finally:
        del conv.call
    assert len(calls) == 3  # batches of 16, 16, 8


def test_one_pass_matches_numpy_on_a_chain_of_blocks(rng):
    # A deeper Sequential chain (ten Conv-BN-ReLU blocks) against the per-layer inputs recomputed
    # afterwards in a separate Functional tap.
    layers = [keras.Input((6, 6, 2))]
    for i in range(10):
        layers += [
            keras.layers.Conv2D(3, 3, padding="same", name=f"c{i}"),
            keras.layers.BatchNormalization(name=f"bn{i}"),
            keras.layers.ReLU(),
        ]
    model = keras.Sequential(layers)
    scramble(model, rng)
    images = rng.uniform(-2, 2, (30, 6, 6, 2)).astype("float32")
    names = recalibrate_batchnorm(model, images, batch_size=8)
    assert names == [f"bn{i}" for i in range(10)]
    functional = keras.Model(model.inputs[0], model.outputs[0])
    for name, u in bn_inputs(functional, names, images).items():
        mean, var = np_moments(u.numpy())
        layer = model.get_layer(name)
        np.testing.assert_allclose(
            layer.moving_mean.numpy(), mean, rtol=1e-4, atol=1e-5 * (1 + np.abs(mean).max())
        )
        np.testing.assert_allclose(
            layer.moving_variance.numpy(), var, rtol=1e-4, atol=1e-5 * (1 + var.max())
        )
