"""The core of benchmarks/baselines.py on a tiny model and synthetic images: a TFLite PTQ row, a
round-to-nearest row with BN recalibration, and the CSV/report round trip."""

import os

import keras
import numpy as np
from ai_edge_litert.interpreter import Interpreter

from benchmarks import baselines
from faqd_tf.export import unpack


def tiny(rng):
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn")(x))
    # 1,728 weights: the converter's dynamic range leaves kernels under 1,024 weights in float.
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    model = keras.Model(
        inputs, keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    )
    bn = model.get_layer("bn")
    bn.moving_mean.assign(rng.normal(0, 0.3, 6).astype("float32"))
    bn.moving_variance.assign(rng.uniform(0.5, 2, 6).astype("float32"))
    return model


def test_ptq_and_rtn_rows(tmp_path, rng):
    model = tiny(rng)
    x = rng.normal(0.5, 1.0, (40, 8, 8, 1)).astype("float32")
    want = model(x, training=False).numpy()
    for method in ("tflite_dynamic_int8", "tflite_full_int8"):
        path = str(tmp_path / f"{method}.tflite")
        size = baselines.tflite_ptq(model, path, method, calibration=x[:16])
        got = baselines.tflite_logits(path, x, batch=16)
        assert size == os.path.getsize(path) and got.shape == want.shape
        # 8-bit PTQ of a float model: close to it, not equal (a broken conversion is uncorrelated).
        assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.95
        types = {d["dtype"] for d in Interpreter(model_path=path).get_tensor_details()}
        assert np.int8 in types  # a kernel was quantized

    student, size = baselines.rtn(model, 4, False, str(tmp_path / "w4.faqd"), calibration=x[:16])
    assert student.get_layer("conv").weight_bits == 4 and size == os.path.getsize(
        tmp_path / "w4.faqd"
    )
    u = student.get_layer("conv")(x[:16]).numpy().reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(
        student.get_layer("bn").moving_mean.numpy(), u.mean(0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        unpack(str(tmp_path / "w4.faqd"))(x).numpy(), student(x).numpy(), rtol=1e-5, atol=1e-5
    )


def test_rows_resume_and_report(tmp_path):
    path = str(tmp_path / "rows.csv")
    rec = baselines.Recorder(path)
    base = {"teacher": "resnet8", "teacher_acc": 0.9, "calibration": 10}
    rec.add(
        base,
        method="rtn_bn",
        bits=4,
        granularity="layer",
        runtime="keras",
        accuracy=0.875,
        seconds=1.5,
        file_bytes=2048,
        keras_bytes=4096,
        load1=3.0,
    )
    rec.add(
        base,
        method="rtn_bn_tflite_int4",
        bits=4,
        granularity="layer",
        runtime="litert",
        notes="TODO",
    )
    again = baselines.Recorder(path)
    assert not again.wanted(teacher="resnet8", method="rtn_bn", bits=4, granularity="layer")
    assert again.wanted(teacher="resnet8", method="rtn_bn_tflite_int4", bits=4, granularity="layer")
    assert len(again.rows) == 1  # the unfinished TODO row is measured again, not kept twice
    text = baselines.report(rec.rows, "python benchmarks/baselines.py")
    assert (
        "| RTN + BN recalibration | 4-bit | layer | keras | 87.50% | -2.50 |" in text
        and "TODO" in text
    )
    baselines.plot(rec.rows, str(tmp_path / "chart.png"))
    assert os.path.getsize(tmp_path / "chart.png") > 0
