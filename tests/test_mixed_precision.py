"""Our Distiller under the mixed_bfloat16 policy: finite losses, float32-exact weight codes."""

import keras
import numpy as np
import pytest

from faqd_tf import quantizers
from faqd_tf.distiller import Distiller
from faqd_tf.layers import QuantConv2D, QuantDense
from faqd_tf.quantize import quantize_model


@pytest.fixture
def mixed_bfloat16(bfloat16_kernels):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _teacher():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="stage1")(inputs)
    x = keras.layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="stage2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(5, name="logits")(x)
    # Logits in float32, as the Keras mixed-precision guide recommends.
    outputs = keras.layers.Activation("linear", dtype="float32", name="out")(x)
    return keras.Model(inputs, outputs, name="teacher")


@pytest.mark.parametrize("fa", ["exact", "fast"])
def test_distiller_fit_under_mixed_bfloat16(rng, mixed_bfloat16, fa):
    keras.utils.set_random_seed(int(rng.integers(2**31)))
    teacher = _teacher()
    student = quantize_model(teacher, weight_bits=4, activation_bits=4, per_channel=True, skip=[])
    quantized = [l for l in student.layers if isinstance(l, (QuantConv2D, QuantDense))]
    assert len(quantized) == 3
    for layer in quantized:
        assert layer.compute_dtype == "bfloat16" and layer.kernel.dtype == "float32"

    distiller = Distiller(student, teacher, alpha=1.0, beta=1.0, fa=fa, ffa_k=4, seed=1)
    distiller.compile(keras.optimizers.SGD(0.05, momentum=0.9))
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    history = distiller.fit(x, batch_size=8, epochs=2, verbose=0)
    assert sorted(history.history) == ["fa", "kd", "loss"]
    for name, values in history.history.items():
        assert np.all(np.isfinite(values)), (name, values)
    assert student(x[:2]).dtype == "float32"

    for layer in quantized:
        w32 = np.asarray(layer.kernel.value if hasattr(layer.kernel, "value") else layer.kernel)
        assert w32.dtype == np.float32
        q = layer.kernel_quantizer
        codes, scale = quantizers.weight_codes(w32, q.bits, q.per_channel, q.iterations)
        expected = (codes * scale).numpy()
        # The bfloat16 forward pass uses the float32 codes, rounded once to bfloat16 ...
        used = keras.ops.convert_to_numpy(layer.quantized_kernel(training=False))
        assert str(used.dtype) == "bfloat16"
        np.testing.assert_array_equal(
            used.astype("float32"), expected.astype(used.dtype).astype("float32")
        )
        # ... and the same codes the float32 path computes: the quantized kernel of a float32 twin.
        twin = type(layer).from_config({**layer.get_config(), "dtype": "float32"})
        twin.build(layer.input.shape)
        twin.set_weights(layer.get_weights())
        q32 = keras.ops.convert_to_numpy(twin.quantized_kernel(training=False))
        assert q32.dtype == np.float32
        np.testing.assert_array_equal(q32, expected)
