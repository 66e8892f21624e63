"""Low-bit deployment (issue 23): int4 TFLite and INT2/INT4/INT8 ONNX files, read back from the file.

The codes are checked by parsing each file here (the TFLite flatbuffer through ai_edge_litert's
schema, the ONNX protobuf through `onnx.load`) and unpacking the INT4/INT2 bytes with this file's own
arithmetic (layouts from LiteRT's UnpackPackedIntToInt8 and the ONNX spec: first element in the low
bits, two's complement), never through the exporter's code.
"""

import json
import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

from faqd_tf import export, quantize_model
from faqd_tf.export import check_onnx, pack, run_onnx, run_tflite, to_onnx, to_tflite
from faqd_tf.layers import QuantConv2D, QuantDense, QuantDepthwiseConv2D, QuantReLU
from faqd_tf.models import ChannelPad, resnet_cifar
from tests import helpers
from tests.test_export import assert_matches_but_step_flips, bn_factor, randomize, tiny_model

FMNIST = "/usr/share/datasets/fashion-mnist"


def unpack_twos_complement(data, bits, count):
    """`count` signed `bits`-bit integers from `data`, the first in the lowest bits of byte 0."""
    values = []
    for byte in bytes(data):
        for k in range(8 // bits):
            v = (byte >> (bits * k)) & (2**bits - 1)
            values.append(v - 2**bits if v >= 2 ** (bits - 1) else v)
    assert all(v == 0 for v in values[count:]), "non-zero padding"
    return np.array(values[:count], np.int64)


# ------------------------------------------------------------------------------------------
# TFLite int4


def tflite_kernels(path):
    """[(op name, type name, codes, scales, quantized dimension)] of every conv/FC kernel in the file."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        model = schema.ModelT.InitFromPackedBuf(bytearray(f.read()), 0)
    ops = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    graph = model.subgraphs[0]
    found = []
    for op in graph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        name = ops[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
            continue
        tensor = graph.tensors[op.inputs[1]]
        data = bytes(np.asarray(model.buffers[tensor.buffer].data, np.uint8))
        count = int(np.prod(tensor.shape))
        kind = types[tensor.type]
        if kind == "INT4":
            assert len(data) == (count + 1) // 2  # two codes per byte
            codes = unpack_twos_complement(data, 4, count)
        elif kind == "INT8":
            assert len(data) == count
            codes = np.frombuffer(data, np.int8).astype(np.int64)
        else:
            codes = None
        q = tensor.quantization
        scales = None if q is None or q.scale is None else np.asarray(q.scale, np.float64)
        found.append(
            (
                name,
                kind,
                None if codes is None else codes.reshape(tensor.shape),
                scales,
                None if q is None else q.quantizedDimension,
            )
        )
    return found


def assert_tflite_codes(model, path, expected_types):
    """Each quantized layer's kernel in the file holds its codes (times the sign of a BN folded into
    it), stored as `expected_types[name]`, with scale ``|bn factor| * scale``."""
    kernels = tflite_kernels(path)
    for name, kind in expected_types.items():
        layer = model.get_layer(name)
        codes, scale = (np.asarray(a) for a in layer.kernel_codes())
        depthwise = isinstance(layer, QuantDepthwiseConv2D)
        codes = np.moveaxis(codes, -2 if depthwise else -1, 0).astype(np.int64)
        axis = 3 if depthwise else 0
        channels = codes.shape[axis]
        scale = np.broadcast_to(scale.reshape(-1), (channels,)).astype(np.float64)
        shape = [1] * codes.ndim
        shape[axis] = -1
        fold = bn_factor(model, name)
        fold = np.ones(channels) if fold is None else fold.astype(np.float64)
        # A channel without a non-zero code stores zeros, under any scale.
        live = np.any(np.moveaxis(codes, axis, 0).reshape(channels, -1) != 0, axis=1)
        matches = [
            k
            for k in kernels
            if k[2] is not None
            and k[2].shape == codes.shape
            and np.array_equal(k[2], codes * np.sign(fold).reshape(shape).astype(np.int64))
            and np.allclose(
                np.broadcast_to(k[3], (channels,))[live],
                (scale * np.abs(fold))[live],
                rtol=1e-5,
                atol=0,
            )
        ]
        assert len(matches) == 1, f"{name}: {len(matches)} kernels hold its codes"
        assert matches[0][1] == kind, (name, matches[0][1])


@pytest.mark.parametrize(
    "bits, per_channel", [(1, False), (2, True), (4, False), (4, True), (8, True)]
)
def test_tflite_int4_stores_the_codes_and_runs(rng, tmp_path, bits, per_channel):
    model = randomize(tiny_model(bits, per_channel, activation_bits=None), rng)
    for name in ("bn1", "bn2"):  # negative factors too: the converter folds BN into the kernels
        gamma = model.get_layer(name).gamma
        gamma.assign(gamma.numpy() * rng.choice([-1.0, 1.0], gamma.shape[0]))
    path = tmp_path / "int4.tflite"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        size = to_tflite(model, path, mode="int4")
    assert size == path.stat().st_size
    fits = bits <= 4
    assert_tflite_codes(
        model,
        path,
        {"conv": "INT4" if fits else "INT8", "fc": "INT4" if fits else "INT8", "dw": "INT8"},
    )
    notes = [str(w.message) for w in caught if "stored these kernels as int8" in str(w.message)]
    assert len(notes) == 1 and "dw (DEPTHWISE_CONV_2D: no int4 kernel in LiteRT)" in notes[0]
    assert ("conv, fc (8-bit codes)" in notes[0]) == (not fits)
    assert [k[1] for k in tflite_kernels(path)].count("FLOAT32") == 1  # the full-precision head
    x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    # Hybrid kernels quantize the float activations to 8 bits on the fly: close, not equal.
    assert np.max(np.abs(run_tflite(path, x) - want)) <= 0.05 * np.max(np.abs(want))


def test_tflite_int4_resnet_is_half_the_int8_file(rng, tmp_path):
    model = randomize(resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=4), rng)
    convs = [layer.name for layer in model.layers if isinstance(layer, QuantConv2D)]
    int8 = to_tflite(model, tmp_path / "int8.tflite", mode="int8")
    int4 = to_tflite(model, tmp_path / "int4.tflite", mode="int4")
    assert_tflite_codes(model, tmp_path / "int4.tflite", {name: "INT4" for name in convs})
    code_bytes = sum(
        layer.kernel.numpy().size for layer in model.layers if isinstance(layer, QuantConv2D)
    )
    assert int8 - int4 >= code_bytes // 2 - 64  # each code went from one byte to half a byte
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    want = model(x, training=False).numpy()
    assert np.max(np.abs(run_tflite(tmp_path / "int4.tflite", x) - want)) <= 0.05 * np.max(
        np.abs(want)
    )
    int8_types = export.kernel_types(tmp_path / "int8.tflite")
    assert export.kernel_types(tmp_path / "int4.tflite") == {
        n: "INT4" if t == "INT8" else t for n, t in int8_types.items()
    }


# ------------------------------------------------------------------------------------------
# ONNX


def onnx_kernels(path):
    """{layer name: (storage type, codes, scale, DequantizeLinear axis)} read from the file."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    bits = {onnx.TensorProto.INT2: 2, onnx.TensorProto.INT4: 4, onnx.TensorProto.INT8: 8}
    found = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        codes_init, scale_init = inits[node.input[0]], inits[node.input[1]]
        b = bits[codes_init.data_type]
        count = int(np.prod(codes_init.dims))
        assert len(codes_init.raw_data) == -(-count * b // 8)  # 8 / b codes per byte
        codes = unpack_twos_complement(codes_init.raw_data, b, count).reshape(
            tuple(codes_init.dims)
        )
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        layer = node.input[0].rsplit("/codes", 1)[0]
        found[layer] = (
            onnx.TensorProto.DataType.Name(codes_init.data_type),
            codes,
            numpy_helper.to_array(scale_init),
            axis,
        )
    return found, model


ONNX_LAYOUT = {"conv": (3, 2, 0, 1), "dw": (3, 2, 0, 1), "fc": (1, 0)}


@pytest.mark.parametrize(
    "bits, per_channel, storage",
    [
        (1, False, "INT2"),
        (1, True, "INT2"),
        (2, False, "INT2"),
        (2, True, "INT2"),
        (4, False, "INT4"),
        (4, True, "INT4"),
        (8, False, "INT8"),
        (8, True, "INT8"),
    ],
)
def test_onnx_stores_the_codes_and_matches_keras(rng, tmp_path, bits, per_channel, storage):
    model = randomize(tiny_model(bits, per_channel, activation_bits=4 if bits > 2 else 2), rng)
    path = tmp_path / "tiny.onnx"
    assert to_onnx(model, path) == path.stat().st_size
    kernels, proto = onnx_kernels(path)
    assert sorted(kernels) == ["conv", "dw", "fc"]
    assert proto.opset_import[0].version == (25 if storage == "INT2" else 21)
    for name, layout in ONNX_LAYOUT.items():
        codes, scale = (np.asarray(a) for a in model.get_layer(name).kernel_codes())
        kind, stored, stored_scale, axis = kernels[name]
        assert kind == storage
        np.testing.assert_array_equal(stored, codes.transpose(layout).astype(np.int64))
        np.testing.assert_array_equal(
            stored_scale, scale.reshape(-1) if per_channel else scale.reshape(())
        )
        # A layer-wise scale is a scalar: a 1-element 1-D one is per axis in the ONNX spec.
        assert stored_scale.shape == (scale.size,) if per_channel else stored_scale.shape == ()
        assert axis == (0 if per_channel else None)
    x = rng.normal(size=(32, 8, 8, 3)).astype(np.float32)
    assert_matches_but_step_flips(run_onnx(path, x), model(x, training=False), model, x)


def test_onnx_weight_type_forces_the_storage(rng, tmp_path):
    model = randomize(tiny_model(2, True, activation_bits=None), rng)
    to_onnx(model, tmp_path / "int8.onnx", weight_type="int8")
    to_onnx(model, tmp_path / "int2.onnx")
    wide, narrow = onnx_kernels(tmp_path / "int8.onnx")[0], onnx_kernels(tmp_path / "int2.onnx")[0]
    assert {k[0] for k in wide.values()} == {"INT8"} and {k[0] for k in narrow.values()} == {"INT2"}
    for name in ONNX_LAYOUT:
        np.testing.assert_array_equal(wide[name][1], narrow[name][1])
    assert (tmp_path / "int8.onnx").stat().st_size > (tmp_path / "int2.onnx").stat().st_size
    four = randomize(tiny_model(4, False, activation_bits=None), rng)
    with pytest.raises(
        ValueError,
        match=r"Layer 'conv' has 4-bit codes in \[-7, 7\], which weight_type='int2' cannot hold",
    ) as info:
        to_onnx(four, tmp_path / "four.onnx", weight_type="int2")
    assert "\n" not in str(info.value) and not (tmp_path / "four.onnx").exists()
    with pytest.raises(ValueError, match="weight_type='int3' is not valid"):
        to_onnx(four, tmp_path / "four.onnx", weight_type="int3")


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_onnx_quantized_relu_is_exact_on_the_grid(rng, tmp_path, bits):
    """No convolution before it: ONNX and Keras see the same floats and must agree bit for bit,
    steps' edges, -0.0 and tiny negatives included."""
    relu = QuantReLU(bits=bits, alpha_initializer=float(rng.uniform(0.05, 2.0)), name="q")
    model = keras.Sequential([keras.Input((64,)), relu])
    alpha = float(relu.alpha.numpy())
    top = 2**bits - 1
    edges = np.float32(alpha) * np.arange(-2, top + 2, dtype=np.float32)
    x = np.concatenate(
        [
            rng.normal(0, alpha * top / 2, 64 * 6).astype(np.float32),
            edges,
            np.nextafter(edges, np.float32(np.inf)),
            np.nextafter(edges, np.float32(-np.inf)),
            # Not subnormals: TensorFlow flushes them to zero (so -1e-45 is "not negative" there), ONNX
            # Runtime does not.
            np.array([0.0, -0.0, -1e-30, 1e-30, -1e-37], np.float32),
        ]
    )
    x = x[(x == 0) | (np.abs(x) >= np.finfo(np.float32).tiny)]
    x = np.concatenate([x, np.zeros((-x.size) % 64, np.float32) + alpha / 3]).reshape(-1, 64)
    to_onnx(model, tmp_path / "relu.onnx")
    got, want = run_onnx(tmp_path / "relu.onnx", x), model(x).numpy()
    np.testing.assert_array_equal(got, want)
    levels = np.float32(alpha) * np.arange(top + 1, dtype=np.float32)
    assert np.isin(got, levels).all()


def small_mobilenet(bits, per_channel):
    """Every supported layer type once: depthwise stride 2 behind a ZeroPadding2D, ReLU6, a residual
    Add, pooling with 'same' padding, a nested Sequential, Dropout, Flatten, a quantized Dense."""
    # quantize_model leaves nested models alone: this one is quantized where it is built.
    inner = keras.Sequential(
        [
            keras.Input((4, 4, 8)),
            QuantConv2D(8, 1, weight_bits=bits, per_channel=per_channel, name="inner_conv"),
            keras.layers.BatchNormalization(name="inner_bn"),
        ],
        name="inner",
    )
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="stem")(inputs)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    y = keras.layers.ZeroPadding2D(((0, 1), (0, 1)), name="dw_pad")(x)
    y = keras.layers.DepthwiseConv2D(3, strides=2, depth_multiplier=1, name="dw")(y)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.Activation("relu6", name="dw_relu")(y)
    x = keras.layers.MaxPooling2D(3, strides=2, padding="same", name="pool")(x)
    x = keras.layers.Add(name="add")([x, y, inner(y)])
    x = keras.layers.Conv2D(12, 1, activation="relu", name="expand")(x)
    x = keras.layers.AveragePooling2D(2, padding="same", name="avg")(x)
    x = ChannelPad(2, 2, name="pad_channels")(x)
    x = keras.layers.Conv2D(8, 3, dilation_rate=2, padding="same", groups=2, name="grouped")(x)
    a = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    b = keras.layers.Flatten(name="flat")(
        keras.layers.GlobalMaxPooling2D(keepdims=True, name="gmp")(x)
    )
    x = keras.layers.Add(name="heads")([a, b])
    x = keras.layers.Dropout(0.5, name="drop")(x)
    x = keras.layers.Dense(16, activation="relu", name="fc")(x)
    x = keras.layers.Flatten(name="flat2")(x)
    outputs = keras.layers.Dense(5, name="logits")(x)
    model = keras.Model(inputs, outputs, name="mini")
    if bits is not None:
        with warnings.catch_warnings():
            warnings.filterwarnings(
                "ignore", "quantize_model left these layers"
            )  # the nested model
            model = quantize_model(
                model, weight_bits=bits, per_channel=per_channel, skip=["logits"]
            )
    return model


@pytest.mark.parametrize("bits, per_channel", [(None, False), (2, True), (4, False)])
def test_onnx_every_supported_layer_matches_keras(rng, tmp_path, bits, per_channel):
    model = randomize(small_mobilenet(bits, per_channel), rng)
    path = tmp_path / "mini.onnx"
    to_onnx(model, path)
    x = rng.normal(size=(8, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(path, x), model(x, training=False), rtol=1e-5, atol=1e-5)
    kernels = onnx_kernels(path)[0]
    quantized = {"stem", "dw", "inner_conv", "expand", "grouped", "fc"} if bits else set()
    assert set(kernels) == quantized
    for name in quantized:
        layer = (
            model.get_layer(name)
            if name != "inner_conv"
            else model.get_layer("inner").get_layer(name)
        )
        codes = np.asarray(layer.kernel_codes()[0])
        layout = (1, 0) if isinstance(layer, QuantDense) else (3, 2, 0, 1)
        np.testing.assert_array_equal(kernels[name][1], codes.transpose(layout).astype(np.int64))


def test_onnx_resnet_size_matches_its_bits(rng, tmp_path):
    sizes = {}
    for bits in (None, 2, 4):
        model = randomize(resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=bits), rng)
        sizes[bits] = to_onnx(model, tmp_path / f"w{bits}.onnx")
        x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
        np.testing.assert_allclose(
            run_onnx(tmp_path / f"w{bits}.onnx", x), model(x, training=False), rtol=1e-5, atol=1e-5
        )
    codes = sum(
        layer.kernel.numpy().size for layer in model.layers if isinstance(layer, QuantConv2D)
    )
    # Each code costs bits / 8 bytes instead of 4; the rest of the file is the same.
    assert abs((sizes[None] - sizes[4]) - codes * (4 - 0.5)) < 0.02 * codes
    assert abs((sizes[4] - sizes[2]) - codes * (0.5 - 0.25)) < 0.02 * codes


# ------------------------------------------------------------------------------------------
# Refused models and hostile paths


def unsupported_model():
    inputs = keras.Input((8, 8, 3))
    x = QuantConv2D(4, 3, weight_bits=2, name="conv")(inputs)
    x = keras.layers.UpSampling2D(name="norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.mark.parametrize(
    "make, message",
    [
        (
            unsupported_model,
            r"to_onnx cannot convert layer 'norm' \(UpSampling2D\): no ONNX conversion",
        ),
        (
            lambda: keras.Sequential(
                [keras.Input((8, 8, 3)), keras.layers.ReLU(negative_slope=0.1, name="leaky")]
            ),
            r"layer 'leaky' \(ReLU\): negative_slope and threshold must be 0",
        ),
        (
            lambda: keras.Sequential(
                [keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3, activation="elu", name="c")]
            ),
            r"layer 'c' \(Conv2D\): activation 'elu'; supported: linear, relu, relu6, softmax, sigmoid",
        ),
        (
            lambda: keras.Sequential([keras.Input((2, 4, 4, 3)), keras.layers.Dense(2, name="d")]),
            r"to_onnx takes float32 inputs of rank 2, 3 or 4; input 0 is float32 of shape \(None, 2, 4, 4, 3\)",
        ),
        (
            lambda: keras.Sequential([keras.Input((4, 3)), keras.layers.Dense(2, name="d")]),
            r"layer 'd' \(Dense\): it takes a rank-3 input",
        ),
        (
            lambda: keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Dense(2, name="d")]),
            r"layer 'd' \(Dense\): it takes a rank-4 input",
        ),
    ],
)
def test_unsupported_models_are_refused_in_one_line(tmp_path, make, message):
    model = make()
    with pytest.raises(ValueError, match=message) as info:
        to_onnx(model, tmp_path / "x.onnx")
    assert "\n" not in str(info.value)
    assert os.listdir(tmp_path) == []


def test_check_names_the_layer_without_converting():
    with pytest.raises(ValueError, match=r"layer 'norm' \(UpSampling2D\)"):
        export.check("onnx", unsupported_model())
    with pytest.raises(ValueError, match=r"layer 'norm'"):
        check_onnx(unsupported_model())
    export.check("tflite-int4", unsupported_model())  # TFLite converts any Keras layer


def quietly(write, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "to_tflite\\(mode='int4'\\) stored these kernels as int8")
        return write(*args, **kwargs)


def _writers():
    return {
        "onnx": lambda model, path: to_onnx(model, path),
        "tflite-int4": lambda model, path: quietly(to_tflite, model, path, mode="int4"),
        "packed": lambda model, path: pack(model, path),
    }


@pytest.mark.parametrize("kind", list(_writers()))
def test_hostile_output_paths_leave_nothing(tmp_path, monkeypatch, kind):
    write = _writers()[kind]
    model = tiny_model(2, False, activation_bits=None)
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "a_file").write_text("x")
    cases = {
        folder / "sub": r"is a folder",  # an existing folder where the file should go
        folder / "missing" / "x.bin": r"folder .*missing does not exist",
        folder / "a_file" / "x.bin": r"folder .*a_file is not a folder",
    }
    (folder / "sub").mkdir()
    before = sorted(p.name for p in folder.rglob("*"))
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message) as info:
            write(model, path)
        assert "\n" not in str(info.value)
        assert sorted(p.name for p in folder.rglob("*")) == before
    if os.geteuid() != 0:  # root writes anywhere
        locked = folder / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            write(model, locked / "x.bin")
        assert os.listdir(locked) == []

    # A write that fails half way (a full disk, say): no partial file, no final file.
    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write(model, folder / "student.bin")
    assert sorted(p.name for p in folder.rglob("*")) == before


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_cli_refuses_an_onnx_export_it_cannot_write_before_training(tmp_path, capsys):
    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.UpSampling2D(name="norm")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    teacher = keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))
    teacher.save(tmp_path / "teacher.keras")
    config = helpers.write_config(
        tmp_path,
        {
            "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 64},
            "teacher": {"arch": None, "file": str(tmp_path / "teacher.keras")},
            "distill": {"fa": None, "kd": "kl"},
            "train": {"epochs": 1, "batch_size": 32},
            "output_dir": str(tmp_path / "out"),
        },
    )
    helpers.assert_one_line_exit_2(
        ["--config", config, "--export", "onnx"],
        r"--export onnx: to_onnx cannot convert layer 'norm' \(UpSampling2D\)",
        capsys,
        tmp_path / "out",
    )


@pytest.mark.skipif(
    not os.path.isdir(FMNIST), reason="needs the Debian package dataset-fashion-mnist"
)
def test_cli_writes_the_low_bit_exports(rng, tmp_path):
    from faqd_tf import cli

    out = tmp_path / "out"
    out.mkdir()
    teacher = randomize(resnet_cifar(8, input_shape=(28, 28, 1)), rng)
    teacher.save(out / "teacher.keras")
    quantize_model(teacher, weight_bits=2).save(out / "student.keras")
    config = helpers.write_config(
        tmp_path,
        {
            "dataset": {"source": f"idx:{FMNIST}", "limit": 64, "eval_limit": 64},
            "output_dir": str(out),
        },
    )
    argv = [
        "--config",
        config,
        "--stage",
        "evaluate",
        "--export",
        "tflite-int4",
        "--export",
        "onnx",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    assert not [
        w for w in caught if "stored these kernels as int8" in str(w.message)
    ]  # no depthwise layer
    results = json.loads((out / "results.json").read_text())
    for kind in ("tflite-int4", "onnx"):
        path = out / export.FILENAMES[kind]
        assert results["exports"][kind] == {"file": str(path), "bytes": path.stat().st_size}
    assert set(export.kernel_types(out / "student-int4.tflite").values()) == {"INT4", "FLOAT32"}
    assert {k[0] for k in onnx_kernels(out / "student.onnx")[0].values()} == {"INT2"}


def test_importing_the_package_loads_no_converter():
    code = (
        "import sys, faqd_tf, faqd_tf.export; "
        "print(sorted(m for m in ('onnx', 'onnxruntime', 'ai_edge_litert', 'ai_edge_quantizer') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("per_channel", [False, True])
def test_packed_transposed_conv_unpacks_to_the_same_kernel(rng, tmp_path, per_channel):
    # The codes of a (kh, kw, out, in) transposed kernel are stored as (kh, kw, in, out): a reshape
    # back instead of the swap scrambled them (logits off by the whole logit scale).
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same")(inputs)
    x = keras.layers.Conv2DTranspose(3, 3, strides=2, padding="same", name="up")(x)
    student = quantize_model(
        keras.Model(inputs, keras.layers.Conv2D(5, 1)(x)), weight_bits=2, per_channel=per_channel
    )
    pack(student, tmp_path / "s.faqd")
    unpacked = export.unpack(tmp_path / "s.faqd")
    np.testing.assert_allclose(
        unpacked.get_layer("up").kernel.numpy(),
        student.get_layer("up").quantized_kernel().numpy(),
        rtol=1e-6,
        atol=1e-7,
    )
    x = rng.normal(size=(3, 8, 8, 2)).astype("float32")
    np.testing.assert_allclose(unpacked(x).numpy(), student(x).numpy(), rtol=1e-4, atol=1e-5)
