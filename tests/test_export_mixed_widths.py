"""A student whose layers have different widths (`layer_bits`, `student.size_budget_kb`) is stored
with each layer at its own width in every export: `.faqd` codes, ONNX INT2/INT4/INT8 initializers,
TFLite int4/int8 kernels; each file computes what the Keras student computes (issue 38)."""

import keras
import numpy as np
import pytest

from faqd_tf import quantize_model
from faqd_tf.export import pack, read_manifest, run_onnx, run_tflite, to_onnx, to_tflite, unpack
from faqd_tf.models import resnet_cifar
from faqd_tf.summary import summary
from tests.test_export import assert_matches_but_step_flips, randomize
from tests.test_export_lowbit import assert_tflite_codes, onnx_kernels

# Every width in one network; the regex entries are less specific than the exact names.
LAYER_BITS = {"stem_conv": 8, "s1.*": 1, "s2b1_conv1": 2, "s2.*": 4, "s3.*": 2, "s3b1_conv2": 1}
WIDTHS = {
    "stem_conv": 8,
    "s1b1_conv1": 1,
    "s1b1_conv2": 1,
    "s2b1_conv1": 2,
    "s2b1_conv2": 4,
    "s3b1_conv1": 2,
    "s3b1_conv2": 1,
}


@pytest.fixture(scope="module")
def student():
    rng = np.random.default_rng()  # fresh weights each run: the exports are checked exactly
    teacher = resnet_cifar(8, input_shape=(12, 12, 3))
    model = quantize_model(teacher, weight_bits=4, layer_bits=LAYER_BITS)
    return randomize(model, rng)


def test_the_summary_shows_each_width(student):
    rows = {row.name: row.weight_bits for row in summary(student, print_fn=None).rows}
    assert {name: rows[name] for name in WIDTHS} == WIDTHS and rows["logits"] == 32


def test_packed_stores_each_layer_at_its_width(student, tmp_path):
    path = tmp_path / "mixed.faqd"
    pack(student, path)
    coded = {e["layer"]: e for e in read_manifest(path)["weights"] if e["encoding"] == "codes"}
    assert {name: e["bits"] for name, e in coded.items()} == WIDTHS
    for name, bits in WIDTHS.items():
        n = int(np.prod(coded[name]["code_shape"]))
        assert coded[name]["nbytes"] == -(-n * max(bits, 1) // 8)  # b bits a code, packed
    twin = unpack(path)
    x = np.random.default_rng().normal(size=(6, 12, 12, 3)).astype(np.float32)
    np.testing.assert_allclose(
        twin(x, training=False), student(x, training=False), rtol=1e-5, atol=1e-5
    )


def test_onnx_stores_each_layer_at_its_width(student, tmp_path):
    path = tmp_path / "mixed.onnx"
    to_onnx(student, path)
    kernels, _ = onnx_kernels(path)
    storage = {1: "INT2", 2: "INT2", 4: "INT4", 8: "INT8"}
    assert {name: kernels[name][0] for name in WIDTHS} == {
        name: storage[b] for name, b in WIDTHS.items()
    }
    for name in WIDTHS:
        codes, _ = (np.asarray(a) for a in student.get_layer(name).kernel_codes())
        np.testing.assert_array_equal(kernels[name][1], codes.transpose(3, 2, 0, 1))
    x = np.random.default_rng().normal(size=(8, 12, 12, 3)).astype(np.float32)
    assert_matches_but_step_flips(run_onnx(path, x), student(x, training=False), student, x)


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_tflite_stores_each_layer_at_its_width(student, tmp_path, mode):
    path = tmp_path / f"mixed_{mode}.tflite"
    if mode == "int4":  # LiteRT's int4 kernels hold 4-bit codes: the 8-bit layer stays int8
        with pytest.warns(UserWarning, match=r"as int8: stem_conv \(8-bit codes\)"):
            to_tflite(student, path, mode=mode)
    else:
        to_tflite(student, path, mode=mode)
    expected = {
        name: "INT4" if mode == "int4" and bits <= 4 else "INT8" for name, bits in WIDTHS.items()
    }
    assert_tflite_codes(student, path, expected)
    x = np.random.default_rng().normal(size=(8, 12, 12, 3)).astype(np.float32)
    want = keras.ops.convert_to_numpy(student(x, training=False))
    # Hybrid kernels quantize the float activations to 8 bits on the fly: close, not equal.
    assert np.max(np.abs(run_tflite(path, x) - want)) <= 0.05 * np.max(np.abs(want))
