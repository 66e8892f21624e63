"""ONNX export of a quantized student (`to_onnx`), a runner for the result (`run_onnx`), and the
check of which layers it converts (`check_onnx`).

Every quantized kernel is an integer initializer holding the student's codes (``kernel_codes()``)
followed by a ``DequantizeLinear`` with the student's scale (one, or one per output channel; zero
point 0), which feeds a float ``Conv``/``Gemm``: the file stores the codes at (nearly) their bit
width, any ONNX runtime dequantizes them to the float kernel ``codes * scale`` the student computes
with, and activations stay float. The storage type follows the student's bits: INT2 for 1- and
2-bit codes (ONNX opset 25), INT4 for 4-bit (opset 21), INT8 for 8-bit; `weight_type` forces a wider
(or, where the codes fit, narrower) one. INT4 and INT2 tensors are packed two and four per byte,
the first element in the low bits, two's complement (the ONNX spec's layout). Kernels of
full-precision layers are float32 initializers.

A quantized ReLU (``QuantReLU`` with `bits`) is written as its own definition,
``alpha * clip(floor(x / alpha) + 1, 0, 2^b - 1)`` and 0 where ``x < 0`` (``Div``, ``Floor``,
``Clip``, ``Mul``, ``Where``), the float32 operations the Keras layer performs, so its outputs lie
exactly on the grid ``k * alpha``. BatchNormalization is a per-channel ``Mul`` and ``Add`` (the
inference form ``x * m + (beta - mean * m)``, ``m = gamma / sqrt(var + eps)``), not folded into the
kernels, so the stored codes and scales stay the student's own.

The graph takes and returns tensors in Keras's layout (images NHWC, sequences NLC); inside, 3-D and
4-D tensors are channels-first (ONNX's ``Conv`` layout), with one ``Transpose`` after each input and
before a ``Flatten``, a ``Reshape`` (Keras reshapes channels-last) or a 3-/4-D output. Supported
layers: `Conv1D`, `Conv2D` (groups too), `DepthwiseConv1D`/`2D`, `SeparableConv1D`/`2D`,
`Conv1DTranspose`/`Conv2DTranspose`, `Dense` (on 2-D inputs) and the faqd_tf quantized versions,
`BatchNormalization`, `LayerNormalization` (last axis), `Normalization`, `Rescaling`, `ReLU` (with
`max_value`), `QuantReLU`, `Activation` and fused activations (``linear``, ``relu``, ``relu6``,
``softmax``, ``sigmoid``, ``tanh``, ``silu``/``swish``, ``hard_sigmoid``, ``hard_silu``/``hard_swish``,
``gelu``), `Add`, `Subtract`, `Multiply`, `Average`, `Maximum`, `Minimum`, `Concatenate`, `Reshape`,
max/average pooling and global pooling (1-D and 2-D, ``keepdims`` too), `ZeroPadding2D`, `Cropping2D`,
`ChannelPad`, `Flatten`, `Dropout`, nested Functional or Sequential models, channels-last data; and
the Keras operations written on tensors in a functional graph (``x + c``, ``c - x``, ``x * y``,
``x / c``, ``-x``: ``keras.ops`` add, subtract, multiply, divide, negative). Anything else is refused,
before anything is written, by a ValueError naming the layer.

Why the graph is written here with ``onnx.helper``: Keras's ``model.export(format="onnx")`` goes
through tf2onnx, reported broken with Keras 3 (onnx/tensorflow-onnx#2329, open) and with NumPy 2
(#2373; this project runs NumPy 2), and not tried here; it would in any case convert the float
kernels (it has no notion of the student's integer codes), so the codes would have to be re-found in
its output as they are in the TFLite converter's. The students use a small set of layer
types, each a few ONNX nodes, so writing the graph directly is short and keeps the codes exact by
construction. ``onnx`` and ``onnxruntime`` are imported only by `to_onnx`/`run_onnx`.

Example:

>>> from faqd_tf.models import resnet_cifar
>>> import os, tempfile
>>> model = resnet_cifar(8, input_shape=(16, 16, 3), weight_bits=4)
>>> path = os.path.join(tempfile.mkdtemp(), "student.onnx")
>>> nbytes = to_onnx(model, path)
>>> x = np.random.rand(2, 16, 16, 3).astype("float32")
>>> bool(np.allclose(run_onnx(path, x), model(x), atol=1e-4))
True
"""

import importlib.util

import keras
import numpy as np

# Classes of the operations that `x + c` and keras.ops.add & co. put in a functional graph; Keras
# exports no public name for them.
from keras.src.ops import numpy as keras_numpy

from faqd_tf._version import __version__
from faqd_tf.atomic import write_atomically
from faqd_tf.export.common import check_output_path, layer_codes, pack_bits
from faqd_tf.layers import (
    QuantConv1D,
    QuantConv2D,
    QuantConv2DTranspose,
    QuantDense,
    QuantDepthwiseConv2D,
    QuantReLU,
    QuantSeparableConv2D,
)
from faqd_tf.models.resnet_cifar import ChannelPad
from faqd_tf.summary import quantized_kernel_bits

__all__ = ["WEIGHT_TYPES", "check_onnx", "run_onnx", "to_onnx"]

WEIGHT_TYPES = ("int2", "int4", "int8")
_DEFAULT_TYPE = {1: "int2", 2: "int2", 4: "int4", 8: "int8"}
_BITS = {"int2": 2, "int4": 4, "int8": 8}
# INT4 initializers need opset 21, INT2 opset 25.
_OPSET = {"int2": 25, "int4": 21, "int8": 21}
_ACTIVATIONS = (
    "linear",
    "relu",
    "relu6",
    "softmax",
    "sigmoid",
    "tanh",
    "silu",
    "hard_sigmoid",
    "hard_silu",
    "gelu",
)


def _to_inside(rank):
    """The Transpose perm from Keras's layout to the graph's: channels move to axis 1 from rank 3 on."""
    return (0, rank - 1, *range(1, rank - 1)) if rank >= 3 else tuple(range(rank))


def _to_keras(rank):
    return tuple(int(i) for i in np.argsort(_to_inside(rank)))


def _inside_axis(axis, rank):
    """The graph's axis of Keras's `axis` for a rank-`rank` tensor."""
    return _to_inside(rank).index(axis % rank)


class _Tensor:
    """A tensor of the graph being built: its name and rank (4-D tensors are NCHW inside)."""

    def __init__(self, name, rank):
        self.name, self.rank = name, rank


class _Graph:
    """Nodes and initializers as plain tuples; `to_proto` turns them into an ONNX model."""

    def __init__(self, weight_type):
        self.weight_type = weight_type
        self.nodes, self.initializers, self.storage = [], [], {}
        self._names = set()

    def name(self, hint):
        name, i = hint, 1
        while name in self._names:
            i += 1
            name = f"{hint}_{i}"
        self._names.add(name)
        return name

    def const(self, hint, array):
        name = self.name(hint)
        # np.ascontiguousarray makes a scalar 1-D: a layer-wise scale (or a Clip bound) must stay a
        # scalar; a 1-element 1-D DequantizeLinear scale is per axis in the ONNX spec (axis 1).
        array = np.asarray(array)
        self.initializers.append((name, np.ascontiguousarray(array) if array.ndim else array, None))
        return name

    def op(self, op_type, inputs, hint, rank, **attrs):
        output = self.name(hint)
        self.nodes.append((op_type, [getattr(x, "name", x) for x in inputs], output, attrs))
        return _Tensor(output, rank)

    def codes(self, hint, codes, storage):
        """An integer initializer of `codes` stored as `storage` (``"int2"``, ``"int4"``, ``"int8"``)."""
        bits = _BITS[storage]
        # Two's complement in `bits` bits, packed LSB first.
        data = pack_bits(codes.astype(np.int8).astype(np.uint8) & np.uint8(2**bits - 1), bits)
        name = self.name(hint)
        self.initializers.append((name, codes.shape, (storage, data)))
        return name

    def kernel(self, layer, codes_layout, float_kernel, axis, name="kernel"):
        """The float kernel `name` of `layer` as the ONNX op wants it: ``DequantizeLinear(codes,
        scale)`` for a quantized layer, a float32 initializer otherwise. `codes_layout` maps the codes
        (shape of ``kernel_to_quantize()``) to the op's layout, `float_kernel` does the same for a
        float kernel; `axis` is the output-channel axis there."""
        bits = quantized_kernel_bits(layer)
        hint = layer.name if name == "kernel" else f"{layer.name}/{name}"
        if bits is None:
            return self.const(
                f"{layer.name}/{name}",
                float_kernel(
                    np.asarray(keras.ops.convert_to_numpy(getattr(layer, name)), np.float32)
                ),
            )
        codes, scale = layer_codes(layer, None if name == "kernel" else name)
        codes = codes_layout(np.rint(codes).astype(np.int8))
        storage = self.weight_type or _DEFAULT_TYPE[bits]
        low, high = -(2 ** (_BITS[storage] - 1)), 2 ** (_BITS[storage] - 1) - 1
        if codes.size and (codes.min() < low or codes.max() > high):
            raise ValueError(
                f"Layer {layer.name!r} has {bits}-bit codes in [{int(codes.min())}, {int(codes.max())}], which "
                f"weight_type={storage!r} cannot hold ([{low}, {high}]); use a wider weight_type or None."
            )
        self.storage[layer.name] = storage
        scale = scale.reshape(-1).astype(np.float32)
        per_channel = scale.size > 1
        inputs = [
            self.codes(f"{hint}/codes", codes, storage),
            self.const(f"{hint}/scale", scale if per_channel else scale.reshape(())),
        ]
        attrs = {"axis": axis} if per_channel else {}
        return self.op("DequantizeLinear", inputs, f"{layer.name}/{name}", codes.ndim, **attrs).name

    def to_proto(self, inputs, outputs, name):
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        types = {"int2": TensorProto.INT2, "int4": TensorProto.INT4, "int8": TensorProto.INT8}
        initializers = []
        for init_name, value, packed in self.initializers:
            if packed is None:
                initializers.append(numpy_helper.from_array(value, init_name))
                continue
            tensor = TensorProto(name=init_name, data_type=types[packed[0]], dims=list(value))
            tensor.raw_data = packed[1]
            initializers.append(tensor)
        nodes = [
            helper.make_node(op_type, node_inputs, [output], name=output, **attrs)
            for op_type, node_inputs, output, attrs in self.nodes
        ]
        graph = helper.make_graph(nodes, name, inputs, outputs, initializers)
        opset = max([21] + [_OPSET[s] for s in self.storage.values()])
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name="faqd_tf",
            producer_version=__version__,
        )
        onnx.checker.check_model(model, full_check=True)
        return model


# --------------------------------------------------------------------------------------------
# Layers


def _require(module):
    if importlib.util.find_spec(module) is None:
        raise ValueError(
            f"ONNX export needs the {module!r} package: pip install onnx onnxruntime (or faqd-tf[onnx])."
        )


def _fail(layer, problem):
    return ValueError(
        f"to_onnx cannot convert layer {layer.name!r} ({type(layer).__name__}): {problem}."
    )


def _activation_name(fn):
    name = getattr(fn, "__name__", None)
    return name if name in _ACTIVATIONS else None


def _activation(g, x, name, hint):
    if name == "relu":
        return g.op("Relu", [x], hint, x.rank)
    if name == "relu6":
        return g.op(
            "Clip",
            [x, g.const(f"{hint}/min", np.float32(0)), g.const(f"{hint}/max", np.float32(6))],
            hint,
            x.rank,
        )
    if name == "softmax":  # over Keras's last axis, the channels
        return g.op("Softmax", [x], hint, x.rank, axis=1 if x.rank >= 3 else -1)
    if name in ("sigmoid", "tanh"):
        return g.op(name.capitalize(), [x], hint, x.rank)
    if name == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], f"{hint}/sigmoid", x.rank)], hint, x.rank)
    # Keras's hard_sigmoid is relu6(x + 3) / 6, ONNX's max(0, min(1, alpha x + beta)): the same function.
    if name == "hard_sigmoid":
        return g.op("HardSigmoid", [x], hint, x.rank, alpha=1.0 / 6.0, beta=0.5)
    if name == "hard_silu":
        return g.op("HardSwish", [x], hint, x.rank)
    if name == "gelu":  # keras.activations.gelu's default is the exact (erf) form
        return g.op("Gelu", [x], hint, x.rank, approximate="none")
    return x


def _keras_constant(g, hint, value, rank):
    """A float32 constant that broadcasts as `value` does against a rank-`rank` Keras tensor, in
    the graph's layout (Keras aligns shapes on the right, i.e. on the channels)."""
    value = np.asarray(value, np.float32)
    if value.ndim == 0 or rank < 3:
        return g.const(hint, value)
    value = value.reshape((1,) * (rank - value.ndim) + value.shape)
    return g.const(hint, value.transpose(_to_inside(rank)))


def _spatial(layer, x, dims=2):
    if x.rank != dims + 2:
        want = "4-D images (N, H, W, C)" if dims == 2 else "3-D sequences (N, L, C)"
        raise _fail(layer, f"it takes a rank-{x.rank} input; it needs {want}")


def _padding(layer, window):
    """ONNX padding attributes of Keras's "valid"/"same"/"causal" for a `window` (kernel or pool size)."""
    dilation = tuple(getattr(layer, "dilation_rate", None) or (1,) * len(window))
    if layer.padding == "valid":
        return {"pads": [0] * (2 * len(window))}
    total = [(k - 1) * d for k, d in zip(window, dilation)]
    if layer.padding == "causal":  # all of it before the first step
        return {"pads": total + [0] * len(window)}
    if any(s != 1 for s in layer.strides):
        # TensorFlow's "same": the odd pixel of padding at the end. (Keras has no strided dilation.)
        return {"auto_pad": "SAME_UPPER"}
    # Stride 1: (k - 1) * d pixels whatever the input size; explicit, as onnxruntime runs no
    # dilated convolution under auto_pad.
    return {"pads": [t // 2 for t in total] + [t - t // 2 for t in total]}


def _kernel_perm(dims):
    """Keras's kernel (k..., a, b) to ONNX's (b, a, k...)."""
    return (dims + 1, dims, *range(dims))


def _bias(g, layer):
    return (
        [
            g.const(
                f"{layer.name}/bias", np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32)
            )
        ]
        if layer.use_bias
        else []
    )


def _conv(g, layer, x):
    dims = len(layer.kernel_size)
    _spatial(layer, x, dims)
    perm = _kernel_perm(dims)
    depthwise = isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))
    if depthwise:
        # (k..., C, m) is quantized as (k..., 1, C*m); ONNX wants (C*m, 1, k...), group C.
        group = int(layer.kernel.shape[-2])
        codes_layout = lambda c: c.transpose(perm)  # noqa: E731
        float_kernel = lambda k: k.reshape(*k.shape[:dims], 1, -1).transpose(perm)  # noqa: E731
    else:
        group = int(getattr(layer, "groups", 1))
        codes_layout = float_kernel = lambda k: k.transpose(perm)  # noqa: E731
    inputs = [x, g.kernel(layer, codes_layout, float_kernel, axis=0), *_bias(g, layer)]
    y = g.op(
        "Conv",
        inputs,
        layer.name,
        x.rank,
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.strides),
        dilations=list(layer.dilation_rate),
        group=group,
        **_padding(layer, layer.kernel_size),
    )
    return _activation(g, y, _activation_name(layer.activation), f"{layer.name}/activation")


def _separable_conv(g, layer, x):
    dims = len(layer.kernel_size)
    _spatial(layer, x, dims)
    perm = _kernel_perm(dims)
    channels = int(layer.depthwise_kernel.shape[-2])
    # Two Convs: the depthwise kernel (k..., C, m) as a group-C Conv of (C*m, 1, k...) (its codes
    # are quantized as (k..., 1, C*m)), then the pointwise (1..., C*m, F) as a 1x1 Conv.
    depthwise = g.kernel(
        layer,
        lambda c: c.transpose(perm),
        lambda k: k.reshape(*k.shape[:dims], 1, -1).transpose(perm),
        axis=0,
        name="depthwise_kernel",
    )
    y = g.op(
        "Conv",
        [x, depthwise],
        f"{layer.name}/depthwise",
        x.rank,
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.strides),
        dilations=list(layer.dilation_rate),
        group=channels,
        **_padding(layer, layer.kernel_size),
    )
    pointwise = g.kernel(
        layer,
        lambda c: c.transpose(perm),
        lambda k: k.transpose(perm),
        axis=0,
        name="pointwise_kernel",
    )
    y = g.op("Conv", [y, pointwise, *_bias(g, layer)], layer.name, x.rank, kernel_shape=[1] * dims)
    return _activation(g, y, _activation_name(layer.activation), f"{layer.name}/activation")


def _conv_transpose(g, layer, x):
    dims = len(layer.kernel_size)
    _spatial(layer, x, dims)
    # Keras's (k..., out, in) is ONNX's (in, out, k...) too: the same axis swap as a Conv's.
    # QuantConv2DTranspose quantizes it as (k..., in, out): its codes need the other swap.
    kernel = g.kernel(
        layer,
        lambda c: c.transpose(dims, dims + 1, *range(dims)),
        lambda k: k.transpose(_kernel_perm(dims)),
        axis=1,
    )
    begin, end, extra = [], [], []
    for k, s, d in zip(layer.kernel_size, layer.strides, layer.dilation_rate):
        span = (k - 1) * d + 1
        # Keras's output length: in * s ("same") or in * s + max(span - s, 0) ("valid"). ONNX gives
        # s (in - 1) + span + output_padding - pads, with TensorFlow's "same" pads (the odd one at the end).
        total = max(span - s, 0) if layer.padding == "same" else 0
        begin.append(total // 2)
        end.append(total - total // 2)
        extra.append(max(s - span, 0))
    y = g.op(
        "ConvTranspose",
        [x, kernel, *_bias(g, layer)],
        layer.name,
        x.rank,
        kernel_shape=list(layer.kernel_size),
        strides=list(layer.strides),
        dilations=list(layer.dilation_rate),
        pads=begin + end,
        output_padding=extra,
    )
    return _activation(g, y, _activation_name(layer.activation), f"{layer.name}/activation")


def _dense(g, layer, x):
    if x.rank != 2:
        raise _fail(
            layer,
            f"it takes a rank-{x.rank} input; to_onnx converts Dense on (batch, features) inputs only",
        )
    # Gemm with the kernel stored (out, in): onnxruntime 1.32 rewrites DequantizeLinear -> MatMul
    # with per-channel scales into its MatMulNBits kernel, which quantizes the activations to 8 bits
    # and at 2 bits computes wrong outputs (measured); DequantizeLinear -> Gemm it leaves alone.
    inputs = [x, g.kernel(layer, lambda c: c.T, lambda k: k.T, axis=0)]
    if layer.use_bias:
        inputs.append(
            g.const(
                f"{layer.name}/bias", np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32)
            )
        )
    y = g.op("Gemm", inputs, layer.name, 2, transB=1)
    return _activation(g, y, _activation_name(layer.activation), f"{layer.name}/activation")


def _channel_shape(x, values):
    """Per-channel `values` shaped to broadcast over `x` (channels on axis 1)."""
    return values.reshape((-1,) + (1,) * (x.rank - 2)).astype(np.float32)


def _batch_norm(g, layer, x):
    if layer.axis not in (-1, x.rank - 1):
        raise _fail(layer, f"axis={layer.axis}; only the channel (last) axis is supported")

    def get(variable, default):
        return (
            default
            if variable is None
            else np.asarray(keras.ops.convert_to_numpy(variable), np.float32)
        )

    mean, var = get(layer.moving_mean, None), get(layer.moving_variance, None)
    gamma, beta = get(layer.gamma, np.ones_like(mean)), get(layer.beta, np.zeros_like(mean))
    # What tf.nn.batch_normalization computes: x * m + (beta - mean * m), in float32.
    m = (np.float32(1) / np.sqrt(var + np.float32(layer.epsilon))) * gamma
    y = g.op(
        "Mul",
        [x, g.const(f"{layer.name}/multiplier", _channel_shape(x, m))],
        f"{layer.name}/mul",
        x.rank,
    )
    return g.op(
        "Add",
        [y, g.const(f"{layer.name}/shift", _channel_shape(x, beta - mean * m))],
        layer.name,
        x.rank,
    )


def _relu(g, layer, x):
    if layer.max_value is None:
        return g.op("Relu", [x], layer.name, x.rank)
    bounds = [
        g.const(f"{layer.name}/min", np.float32(0)),
        g.const(f"{layer.name}/max", np.float32(layer.max_value)),
    ]
    return g.op("Clip", [x, *bounds], layer.name, x.rank)


def _quant_relu(g, layer, x):
    if layer.bits is None:
        return g.op("Relu", [x], layer.name, x.rank)
    alpha = g.const(f"{layer.name}/alpha", np.float32(keras.ops.convert_to_numpy(layer.alpha)))
    n = layer.name
    # k = clip(floor(x / alpha) + 1, 0, 2^b - 1); y = k * alpha, and 0 where x < 0 (faqd_tf.quantizers).
    k = g.op("Floor", [g.op("Div", [x, alpha], f"{n}/div", x.rank)], f"{n}/floor", x.rank)
    zero = g.const(f"{n}/zero", np.float32(0))
    k = g.op("Add", [k, g.const(f"{n}/one", np.float32(1))], f"{n}/step", x.rank)
    k = g.op(
        "Clip", [k, zero, g.const(f"{n}/top", np.float32(2**layer.bits - 1))], f"{n}/level", x.rank
    )
    y = g.op("Mul", [k, alpha], f"{n}/grid", x.rank)
    negative = g.op("Less", [x, zero], f"{n}/negative", x.rank)
    return g.op("Where", [negative, zero, y], n, x.rank)


def _activation_layer(g, layer, x):
    return _activation(g, x, _activation_name(layer.activation), layer.name)


def _add(g, layer, *args):
    xs = list(args[0]) if len(args) == 1 else list(args)
    y = xs[0]
    for i, x in enumerate(xs[1:], start=1):  # left to right, as Keras sums
        y = g.op("Add", [y, x], layer.name if i == len(xs) - 1 else f"{layer.name}/{i}", x.rank)
    return y


def _pool(g, layer, x):
    _spatial(layer, x, len(layer.pool_size))
    attrs = dict(
        kernel_shape=list(layer.pool_size),
        strides=list(layer.strides),
        **_padding(layer, layer.pool_size),
    )
    if isinstance(layer, (keras.layers.AveragePooling1D, keras.layers.AveragePooling2D)):
        return g.op("AveragePool", [x], layer.name, x.rank, count_include_pad=0, **attrs)
    return g.op("MaxPool", [x], layer.name, x.rank, **attrs)


_AVERAGE_POOLS = (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalAveragePooling2D)


def _global_pool(g, layer, x):
    _spatial(
        layer,
        x,
        1
        if isinstance(layer, (keras.layers.GlobalAveragePooling1D, keras.layers.GlobalMaxPooling1D))
        else 2,
    )
    op = "GlobalAveragePool" if isinstance(layer, _AVERAGE_POOLS) else "GlobalMaxPool"
    if layer.keepdims:
        return g.op(op, [x], layer.name, x.rank)
    return g.op("Flatten", [g.op(op, [x], f"{layer.name}/pool", x.rank)], layer.name, 2, axis=1)


def _in_keras_layout(g, x, hint):
    return g.op("Transpose", [x], hint, x.rank, perm=list(_to_keras(x.rank))) if x.rank >= 3 else x


def _in_graph_layout(g, x, hint):
    return g.op("Transpose", [x], hint, x.rank, perm=list(_to_inside(x.rank))) if x.rank >= 3 else x


def _reshape(g, layer, x):
    # Keras reshapes in its own (channels-last) order: there and back, around the Reshape.
    shape = [int(d) for d in layer.target_shape]
    y = g.op(
        "Reshape",
        [
            _in_keras_layout(g, x, f"{layer.name}/keras_layout"),
            g.const(f"{layer.name}/shape", np.array([0, *shape], np.int64)),
        ],
        f"{layer.name}/reshape",
        len(shape) + 1,
    )
    return _in_graph_layout(g, y, layer.name)


def _rescaling(g, layer, x):
    y = g.op(
        "Mul",
        [x, _keras_constant(g, f"{layer.name}/scale", layer.scale, x.rank)],
        f"{layer.name}/mul",
        x.rank,
    )
    return g.op(
        "Add",
        [y, _keras_constant(g, f"{layer.name}/offset", layer.offset, x.rank)],
        layer.name,
        x.rank,
    )


def _normalization(g, layer, x):
    mean = np.asarray(keras.ops.convert_to_numpy(layer.mean), np.float32)
    # What the layer divides by: max(sqrt(variance), epsilon).
    root = np.maximum(
        np.sqrt(np.asarray(keras.ops.convert_to_numpy(layer.variance), np.float32)),
        np.float32(keras.config.epsilon()),
    )
    mean, root = (
        _keras_constant(g, f"{layer.name}/{n}", v, x.rank)
        for n, v in (("mean", mean), ("root", root))
    )
    if layer.invert:
        return g.op(
            "Add", [g.op("Mul", [x, root], f"{layer.name}/mul", x.rank), mean], layer.name, x.rank
        )
    return g.op(
        "Div", [g.op("Sub", [x, mean], f"{layer.name}/sub", x.rank), root], layer.name, x.rank
    )


def _layer_norm(g, layer, x):
    n = layer.name
    axes = g.const(
        f"{n}/axes", np.array([1], np.int64)
    )  # Keras's last axis: the channels, axis 1 here
    mean = g.op("ReduceMean", [x, axes], f"{n}/mean", x.rank, keepdims=1)
    d = g.op("Sub", [x, mean], f"{n}/centered", x.rank)
    var = g.op(
        "ReduceMean",
        [g.op("Mul", [d, d], f"{n}/square", x.rank), axes],
        f"{n}/variance",
        x.rank,
        keepdims=1,
    )
    eps = g.const(f"{n}/epsilon", np.float32(layer.epsilon))
    y = g.op(
        "Div",
        [d, g.op("Sqrt", [g.op("Add", [var, eps], f"{n}/var_eps", x.rank)], f"{n}/std", x.rank)],
        f"{n}/normalized",
        x.rank,
    )
    if layer.gamma is not None:
        gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float32)
        y = g.op("Mul", [y, g.const(f"{n}/gamma", _channel_shape(y, gamma))], f"{n}/scaled", x.rank)
    if layer.beta is not None:
        beta = np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float32)
        y = g.op("Add", [y, g.const(f"{n}/beta", _channel_shape(y, beta))], f"{n}/shifted", x.rank)
    return g.op("Identity", [y], n, x.rank)


def _inputs(args):
    return list(args[0]) if len(args) == 1 else list(args)


def _concatenate(g, layer, *args):
    xs = _inputs(args)
    return g.op("Concat", xs, layer.name, xs[0].rank, axis=_inside_axis(layer.axis, xs[0].rank))


def _merge(op_type):
    """Keras's Multiply/Maximum/Minimum (and Subtract, of two) as ONNX's elementwise op, left to right."""

    def convert(g, layer, *args):
        xs = _inputs(args)
        y = xs[0]
        for i, x in enumerate(xs[1:], start=1):
            y = g.op(
                op_type,
                [y, x],
                layer.name if i == len(xs) - 1 else f"{layer.name}/{i}",
                max(x.rank, y.rank),
            )
        return y

    return convert


def _average(g, layer, *args):
    xs = _inputs(args)
    y = xs[0]
    for i, x in enumerate(xs[1:], start=1):
        y = g.op("Add", [y, x], f"{layer.name}/sum_{i}", max(x.rank, y.rank))
    return g.op("Div", [y, g.const(f"{layer.name}/count", np.float32(len(xs)))], layer.name, y.rank)


def _arithmetic(op_type):
    """A Keras operation written on tensors (`x + c`, `keras.ops.multiply(x, y)`): its operands are
    graph tensors or constants (Python numbers, arrays), the constants put in the graph's layout."""

    def convert(g, operation, *args):
        ranks = [a.rank for a in args if isinstance(a, _Tensor)]
        if len(args) != 2 or not ranks or len(set(ranks)) != 1:
            raise _fail(
                operation,
                f"it combines {len(args)} operands of ranks {ranks}; to_onnx converts two operands, "
                "tensors of one rank or a tensor and a constant",
            )
        rank = ranks[0]
        inputs = [
            a
            if isinstance(a, _Tensor)
            else _keras_constant(g, f"{operation.name}/constant", a, rank)
            for a in args
        ]
        return g.op(op_type, inputs, operation.name, rank)

    return convert


def _pad(g, layer, x, before, after):
    pads = g.const(f"{layer.name}/pads", np.array([*before, *after], np.int64))
    return g.op("Pad", [x, pads], layer.name, x.rank)


def _zero_padding(g, layer, x):
    _spatial(layer, x)
    (top, bottom), (left, right) = layer.padding
    return _pad(g, layer, x, [0, 0, top, left], [0, 0, bottom, right])


def _cropping(g, layer, x):
    # NASNet crops a padded map back: a Slice of the spatial axes (2, 3 inside), ends counted from
    # the end so that no static size is needed.
    _spatial(layer, x)
    (top, bottom), (left, right) = layer.cropping
    end = np.iinfo(np.int64).max
    starts = g.const(f"{layer.name}/starts", np.array([top, left], np.int64))
    ends = g.const(
        f"{layer.name}/ends",
        np.array([-bottom if bottom else end, -right if right else end], np.int64),
    )
    axes = g.const(f"{layer.name}/axes", np.array([2, 3], np.int64))
    return g.op("Slice", [x, starts, ends, axes], layer.name, x.rank)


def _channel_pad(g, layer, x):
    _spatial(layer, x)
    return _pad(g, layer, x, [0, layer.before, 0, 0], [0, layer.after, 0, 0])


def _flatten(g, layer, x):
    x = _in_keras_layout(g, x, f"{layer.name}/keras_layout")  # Keras flattens channels-last
    if x.rank == 2:
        return x
    return g.op("Flatten", [x], layer.name, 2, axis=1)


def _identity(g, layer, x):
    return x


# Exact classes: a subclass may compute something else in `call`.
_CONVERTERS = {
    keras.layers.Conv1D: _conv,
    QuantConv1D: _conv,
    keras.layers.Conv2D: _conv,
    QuantConv2D: _conv,
    keras.layers.DepthwiseConv1D: _conv,
    keras.layers.DepthwiseConv2D: _conv,
    QuantDepthwiseConv2D: _conv,
    keras.layers.SeparableConv1D: _separable_conv,
    keras.layers.SeparableConv2D: _separable_conv,
    QuantSeparableConv2D: _separable_conv,
    keras.layers.Conv1DTranspose: _conv_transpose,
    keras.layers.Conv2DTranspose: _conv_transpose,
    QuantConv2DTranspose: _conv_transpose,
    keras.layers.Reshape: _reshape,
    keras.layers.Rescaling: _rescaling,
    keras.layers.Normalization: _normalization,
    keras.layers.LayerNormalization: _layer_norm,
    keras.layers.Concatenate: _concatenate,
    keras.layers.Multiply: _merge("Mul"),
    keras.layers.Subtract: _merge("Sub"),
    keras.layers.Maximum: _merge("Max"),
    keras.layers.Minimum: _merge("Min"),
    keras.layers.Average: _average,
    keras.layers.MaxPooling1D: _pool,
    keras.layers.AveragePooling1D: _pool,
    keras.layers.GlobalAveragePooling1D: _global_pool,
    keras.layers.GlobalMaxPooling1D: _global_pool,
    keras.layers.Dense: _dense,
    QuantDense: _dense,
    keras.layers.BatchNormalization: _batch_norm,
    keras.layers.ReLU: _relu,
    QuantReLU: _quant_relu,
    keras.layers.Activation: _activation_layer,
    keras.layers.Add: _add,
    keras.layers.MaxPooling2D: _pool,
    keras.layers.AveragePooling2D: _pool,
    keras.layers.GlobalAveragePooling2D: _global_pool,
    keras.layers.GlobalMaxPooling2D: _global_pool,
    keras.layers.ZeroPadding2D: _zero_padding,
    keras.layers.Cropping2D: _cropping,
    ChannelPad: _channel_pad,
    keras.layers.Flatten: _flatten,
    keras.layers.Dropout: _identity,
}
# Keras operations on tensors in a functional graph (not Layers): `x + c` is an `ops.numpy.Add`.
_OPERATIONS = {
    keras_numpy.Add: _arithmetic("Add"),
    keras_numpy.Subtract: _arithmetic("Sub"),
    keras_numpy.Multiply: _arithmetic("Mul"),
    keras_numpy.Divide: _arithmetic("Div"),
    keras_numpy.TrueDivide: _arithmetic("Div"),
    keras_numpy.Negative: lambda g, operation, x: g.op("Neg", [x], operation.name, x.rank),
}


def _problem(layer):
    """Why `layer` (or a Keras operation on tensors) cannot be converted (one phrase), or None."""
    if not isinstance(layer, keras.layers.Layer):
        if type(layer) in _OPERATIONS:
            return None
        return (
            "no ONNX conversion for this operation on tensors (supported: "
            + ", ".join(sorted({f"keras.ops.{t.__name__.lower()}" for t in _OPERATIONS}))
            + ")"
        )
    if type(layer) not in _CONVERTERS:
        return (
            "no ONNX conversion for this layer type (supported: "
            + ", ".join(sorted({t.__name__ for t in _CONVERTERS}))
            + ")"
        )
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return f"data_format={layer.data_format!r}; only channels_last is supported"
    fn = getattr(layer, "activation", None)
    if fn is not None and _activation_name(fn) is None:
        return f"activation {getattr(fn, '__name__', fn)!r}; supported: {', '.join(_ACTIVATIONS)}"
    causal_ok = (
        isinstance(layer, keras.layers.Conv1D) and type(layer) is not keras.layers.SeparableConv1D
    )
    if getattr(layer, "padding", "valid") not in ("valid", "same") + (
        ("causal",) if causal_ok else ()
    ) and not isinstance(layer, keras.layers.ZeroPadding2D):
        return f"padding={layer.padding!r}"
    if getattr(layer, "output_padding", None) is not None:
        return f"output_padding={layer.output_padding!r}; only None (Keras's own output size) is supported"
    if isinstance(layer, keras.layers.LayerNormalization):
        if getattr(layer, "rms_scaling", False):
            return "rms_scaling=True"
        if [a % len(layer.input.shape) for a in np.atleast_1d(layer.axis)] != [
            len(layer.input.shape) - 1
        ]:
            return f"axis={layer.axis}; only the last (channel) axis is supported"
    if isinstance(layer, keras.layers.Normalization):
        rank = len(layer.input.shape)
        if [a % rank for a in layer.axis] != [rank - 1]:
            return f"axis={layer.axis}; only the last (channel) axis is supported"
    if isinstance(layer, keras.layers.Concatenate) and layer.axis % len(layer.output.shape) == 0:
        return "axis=0 (the batch)"
    if isinstance(layer, keras.layers.ReLU) and (layer.negative_slope or layer.threshold):
        return "negative_slope and threshold must be 0"
    if quantized_kernel_bits(layer) is not None and not callable(
        getattr(layer, "kernel_codes", None)
    ):
        return "its quantized kernel has no kernel_codes()"
    return None


def _layers(model):
    """Every layer and operation of `model` that the graph runs, nested models walked (not the
    models themselves)."""
    for layer in getattr(model, "operations", model.layers):
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        elif not isinstance(layer, keras.layers.InputLayer):
            yield layer


def check_onnx(model: keras.Model) -> None:
    """Raises a one-line ValueError naming the first layer of `model` that `to_onnx` cannot convert
    (or the missing ``onnx`` package).

    Runs no conversion and imports nothing: the CLI checks an ``--export onnx`` request with it
    before training.
    """
    _require("onnx")
    if not isinstance(model, keras.Model) or not model.inputs:
        raise ValueError(
            f"to_onnx needs a built Functional or Sequential Keras model, got {model!r}."
        )
    for layer in _layers(model):
        problem = _problem(layer)
        if problem:
            raise _fail(layer, problem)


def _functional(model):
    from faqd_tf.quantize import _as_functional

    return _as_functional(model)


def _run(g, model, inputs):
    """Adds `model`'s layers to `g`, fed by the `_Tensor`s `inputs`; returns its output `_Tensor`s."""

    def convert(operation):
        if isinstance(operation, keras.Model):
            return lambda *args, **kwargs: _run(g, operation, args)
        table = _CONVERTERS if isinstance(operation, keras.layers.Layer) else _OPERATIONS
        return lambda *args, **kwargs: table[type(operation)](g, operation, *args)

    outputs = _functional(model)._run_through_graph(inputs, operation_fn=convert)
    return keras.tree.flatten(outputs)


def _dims(x, name):
    """ONNX dims of the Keras tensor `x`: a symbolic batch, and named symbols for unknown sizes."""
    return ["batch"] + [
        d if d is not None else f"{name}_dim{j}" for j, d in enumerate(x.shape[1:], start=1)
    ]


def to_onnx(model: keras.Model, path, weight_type: str | None = None) -> int:
    """Writes `model` (inference mode) as an ONNX file at `path`; returns its size in bytes.

    Args:
        model: a built Functional or Sequential model of the supported layers (module docstring);
            quantized layers are stored as their integer codes, the others in float32.
        path: output file; written through a temporary file in the same folder (no partial file
            on failure).
        weight_type: None (default): INT2 for 1- and 2-bit codes, INT4 for 4-bit, INT8 for
            8-bit; or ``"int2"``, ``"int4"``, ``"int8"`` for every quantized layer (ValueError if a
            layer's codes do not fit).
    """
    if weight_type is not None and weight_type not in WEIGHT_TYPES:
        raise ValueError(
            f"weight_type={weight_type!r} is not valid; use None or one of {', '.join(WEIGHT_TYPES)}."
        )
    check_onnx(model)
    check_output_path(path)
    from onnx import TensorProto, helper  # check_onnx made sure it is there

    g = _Graph(weight_type)
    graph_inputs, feeds = [], []
    for i, x in enumerate(model.inputs):
        if len(x.shape) not in (2, 3, 4) or str(x.dtype) != "float32":
            raise ValueError(
                f"to_onnx takes float32 inputs of rank 2, 3 or 4; input {i} is {x.dtype} of shape {x.shape}."
            )
        name = g.name(getattr(x, "name", None) or f"input_{i}")
        graph_inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, _dims(x, name)))
        feeds.append(_in_graph_layout(g, _Tensor(name, len(x.shape)), f"{name}/channels_first"))
    outputs = _run(g, model, feeds)
    graph_outputs = []
    for i, (y, keras_output) in enumerate(zip(outputs, model.outputs)):
        name = g.name("output" if len(outputs) == 1 else f"output_{i}")
        perm = {"perm": list(_to_keras(y.rank))} if y.rank >= 3 else {}
        g.nodes.append(("Transpose" if y.rank >= 3 else "Identity", [y.name], name, perm))
        graph_outputs.append(
            helper.make_tensor_value_info(name, TensorProto.FLOAT, _dims(keras_output, name))
        )
    proto = g.to_proto(graph_inputs, graph_outputs, model.name)
    return write_atomically(path, [proto.SerializeToString()])


def run_onnx(path, x, num_threads=None):
    """Runs an `.onnx` file on the batch `x` with onnxruntime (CPU); returns its first output."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    if num_threads:
        options.intra_op_num_threads = int(num_threads)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.asarray(x, np.float32)})[0]
