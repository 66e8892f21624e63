"""CIFAR ResNets of He et al. (2016): ResNet20/32/44/56/110 (basic blocks) and ResNet164 (bottleneck).

These are the teacher and student networks of FAQD (arXiv 2302.10899): on CIFAR-10 the paper distills
a full-precision ResNet110 teacher into a 1/2/4-bit ResNet20 student.

Architecture choices (all deliberate, see the notes in each builder):

- Depth 20/32/44/56/110 ("6n+2", n blocks per stage): post-activation basic blocks
  (conv-BN-ReLU-conv-BN, add, ReLU), 16/32/64 channels at 32x32/16x16/8x8. Shortcuts that change the
  shape use **option A** of He et al. (parameter-free: subsample ``x[:, ::2, ::2, :]`` and zero-pad the
  channels), which is what the published parameter counts (ResNet20 0.27M ... ResNet110 1.7M) are for.
  The subsample is a ``MaxPooling2D(pool_size=1, strides=2)`` layer and the zero-padding a small
  registered layer, :class:`ChannelPad`; there is no ``Lambda`` layer, so models load with
  ``safe_mode=True``.
- Depth 164 ("9n+2", n = 18): the **pre-activation** bottleneck ResNet of He et al. (2016b,
  "Identity Mappings in Deep Residual Networks"), 1.7M parameters, widths 16/32/64 expanded x4 to
  64/128/256 channels. Shape-changing shortcuts are 1x1 projections (option B; option A cannot
  express the 16 -> 64 expansion of the first block without wasting 3/4 of the channels), laid out
  as in the authors' code (``resnet-pre-act.lua``): the stem is conv-BN-ReLU, the first block of
  stage 1 has no pre-activation of its own, the first block of stages 2 and 3 shares its BN-ReLU
  pre-activation between the residual branch and the projection, and a final BN-ReLU precedes the
  pooling.

Quantization: every convolution, the stem included, is a ``QuantConv2D(weight_bits=...)`` (in a 1-bit
network the stem at 8 bits, ``faqd_tf.quantizers.FIRST_LAYER_BITS``); every ReLU
is a ``QuantReLU(bits=activation_bits)`` (``None`` = full precision for either). The paper quantizes
all convolutional layers; the classifier ``logits`` (a ``QuantDense``) always stays full precision
(``faqd_tf.quantize.quantize_model`` has a ``skip`` for the same purpose on arbitrary models).

Layer names are deterministic so features can be tapped and weights copied by name between a
full-precision model and its quantized twin:

- ``input``; ``stem_conv``, ``stem_bn``, ``stem_relu``;
- block ``j`` of stage ``i``: ``s{i}b{j}_conv1``, ``s{i}b{j}_bn1``, ``s{i}b{j}_relu1``, ...,
  ``s{i}b{j}_add``; shortcut layers ``s{i}b{j}_sc_*``; stride-2 convolutions are preceded by an
  explicit symmetric ``ZeroPadding2D`` named ``<conv>_pad`` (PyTorch geometry: output pixel ``k`` is
  centred on input pixel ``2k``, aligned with the option-A subsample; Keras ``"same"`` would pad only
  bottom/right and be off by one pixel);
- ``stage1``, ``stage2``, ``stage3``: the output of each stage (the last block's output ReLU for the
  post-activation nets; the last block's residual sum for the pre-activation ResNet164, whose
  stage-3 sum is then followed by ``final_bn``, ``final_relu``);
- ``avg_pool`` (GlobalAveragePooling2D) and ``logits`` (no softmax).

Batch normalization uses ``momentum=0.9`` by default (Keras' 0.99 leaves 0.99^n of the initial
moving statistics after n steps: a run of 282 steps evaluated at 15% while it trained at 87%) and
``epsilon=1e-5`` (PyTorch's default, so weights ported from PyTorch checkpoints give the same
outputs).

Example:

>>> model = resnet_cifar(20, num_classes=10, weight_bits=4, activation_bits=4)
>>> model.get_layer("stage3").output.shape
(None, 8, 8, 64)
"""

import keras
from keras import layers

from faqd_tf import quantizers
from faqd_tf.layers import QuantConv2D, QuantDense, QuantReLU
from faqd_tf.options import is_integer

# depth -> (block kind, blocks per stage)
# 8 and 14 (n = 1, 2 of He et al.'s 6n+2) are for quick runs on small machines.
CIFAR_DEPTHS = {
    8: ("basic", 1),
    14: ("basic", 2),
    20: ("basic", 3),
    32: ("basic", 5),
    44: ("basic", 7),
    56: ("basic", 9),
    110: ("basic", 18),
    164: ("bottleneck", 18),
}
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


@keras.saving.register_keras_serializable(package="faqd_tf")
class ChannelPad(layers.Layer):
    """Zero-pads the channel (last) axis: ``before`` zero channels in front, ``after`` behind.

    Together with ``MaxPooling2D(pool_size=1, strides=2)`` it forms the parameter-free option-A
    shortcut of the CIFAR ResNets (PyTorch: ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``).
    """

    def __init__(self, before, after, **kwargs):
        super().__init__(**kwargs)
        for key, value in (("before", before), ("after", after)):
            if not is_integer(value) or value < 0:
                raise ValueError(f"ChannelPad: {key}={value!r} must be a non-negative int.")
        self.before = int(before)
        self.after = int(after)

    def call(self, inputs):
        rank = len(inputs.shape)
        paddings = [[0, 0]] * (rank - 1) + [[self.before, self.after]]
        return keras.ops.pad(inputs, paddings)

    def compute_output_shape(self, input_shape):
        channels = input_shape[-1]
        if channels is not None:
            channels = channels + self.before + self.after
        return tuple(input_shape[:-1]) + (channels,)

    def get_config(self):
        config = super().get_config()
        config.update(before=self.before, after=self.after)
        return config


class _Builder:
    """Creates the named, optionally quantized layers shared by the CIFAR and ImageNet ResNets."""

    def __init__(
        self,
        weight_bits,
        activation_bits,
        per_channel,
        weight_decay,
        bn_momentum,
        alpha_rate=quantizers.DEFAULT_ALPHA_RATE,
        activation_ste="clipped",
    ):
        if weight_decay is not None and (isinstance(weight_decay, bool) or weight_decay < 0):
            raise ValueError(f"weight_decay={weight_decay!r} must be None or a non-negative float.")
        if isinstance(bn_momentum, bool) or not 0.0 <= float(bn_momentum) < 1.0:
            raise ValueError(f"bn_momentum={bn_momentum!r} must be in [0, 1).")
        self.weight_bits = weight_bits
        self.activation_bits = activation_bits
        self.per_channel = bool(per_channel)
        self.weight_decay = weight_decay
        self.bn_momentum = float(bn_momentum)
        self.alpha_rate = quantizers.check_alpha_rate(alpha_rate)
        self.activation_ste = quantizers.check_activation_ste(activation_ste, "activation_ste")

    def _regularizer(self):
        # Keras L2(c) adds c * sum(w^2); PyTorch-style weight decay wd corresponds to c = wd / 2.
        return keras.regularizers.L2(self.weight_decay) if self.weight_decay else None

    def conv(self, x, filters, kernel_size, strides, name, first=False):
        """Bias-free quantizable convolution; stride-2 k>1 convs get explicit symmetric padding.
        `first`: the stem, at `quantizers.first_layer_width` (8 bits in a 1-bit network)."""
        if strides > 1 and kernel_size > 1:
            x = layers.ZeroPadding2D(kernel_size // 2, name=f"{name}_pad")(x)
            padding = "valid"
        else:
            padding = "same" if kernel_size > 1 else "valid"
        return QuantConv2D(
            filters,
            kernel_size,
            strides=strides,
            padding=padding,
            use_bias=False,
            kernel_initializer="he_normal",
            kernel_regularizer=self._regularizer(),
            name=name,
            weight_bits=quantizers.first_layer_width(self.weight_bits)
            if first
            else self.weight_bits,
            per_channel=self.per_channel,
        )(x)

    def bn(self, x, name):
        # Synchronized so that under MirroredStrategy the replicas share batch statistics and keep
        # identical moving statistics (one step then equals the single-device step).
        return layers.BatchNormalization(
            momentum=self.bn_momentum, epsilon=BN_EPSILON, synchronized=True, name=name
        )(x)

    def relu(self, x, name):
        # The authors decay the alphas at the weight decay times ALPHA_DECAY_FACTOR.
        decay = self.weight_decay * quantizers.ALPHA_DECAY_FACTOR if self.weight_decay else None
        return QuantReLU(
            bits=self.activation_bits,
            alpha_rate=self.alpha_rate,
            ste=self.activation_ste,
            name=name,
            alpha_regularizer=keras.regularizers.L2(decay) if decay else None,
        )(x)

    def head(self, x, num_classes):
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        return QuantDense(
            num_classes,
            kernel_initializer="he_normal",
            kernel_regularizer=self._regularizer(),
            name="logits",
            weight_bits=None,
        )(x)


def check_num_classes(num_classes: int) -> int:
    if not is_integer(num_classes) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} must be a positive int.")
    return int(num_classes)


def _basic_block(b, x, filters, strides, prefix, out_name):
    """Post-activation basic block with an option-A shortcut; output ReLU named `out_name`."""
    in_channels = x.shape[-1]
    shortcut = x
    if strides != 1 or in_channels != filters:
        if strides != 1:
            shortcut = layers.MaxPooling2D(pool_size=1, strides=strides, name=f"{prefix}_sc_pool")(
                shortcut
            )
        if in_channels != filters:
            if filters < in_channels:
                raise ValueError("option-A shortcuts can only add channels.")
            pad = filters - in_channels
            shortcut = ChannelPad(pad // 2, pad - pad // 2, name=f"{prefix}_sc_pad")(shortcut)
    return residual_branch(b, x, shortcut, filters, strides, prefix, out_name)


def residual_branch(b, x, shortcut, filters, strides, prefix, out_name):
    """conv3x3-BN-ReLU-conv3x3-BN added to `shortcut`, then ReLU: the basic block's body."""
    y = b.conv(x, filters, 3, strides, f"{prefix}_conv1")
    y = b.bn(y, f"{prefix}_bn1")
    y = b.relu(y, f"{prefix}_relu1")
    y = b.conv(y, filters, 3, 1, f"{prefix}_conv2")
    y = b.bn(y, f"{prefix}_bn2")
    y = layers.Add(name=f"{prefix}_add")([shortcut, y])
    return b.relu(y, out_name)


def _preact_bottleneck(b, x, width, strides, prefix, preact, out_name):
    """Pre-activation bottleneck (BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1 to 4*width).

    preact: "none" (input already activated: first block after the stem), "both" (the block's BN-ReLU
    feeds the residual branch and the projection shortcut) or "residual" (identity shortcut).
    """
    out_channels = 4 * width
    if preact == "none":
        act = x
    else:
        act = b.bn(x, f"{prefix}_bn0")
        act = b.relu(act, f"{prefix}_relu0")
    if preact == "residual":
        shortcut = x
    else:
        shortcut = b.conv(act, out_channels, 1, strides, f"{prefix}_sc_conv")
    y = b.conv(act, width, 1, 1, f"{prefix}_conv1")
    y = b.bn(y, f"{prefix}_bn1")
    y = b.relu(y, f"{prefix}_relu1")
    y = b.conv(y, width, 3, strides, f"{prefix}_conv2")
    y = b.bn(y, f"{prefix}_bn2")
    y = b.relu(y, f"{prefix}_relu2")
    y = b.conv(y, out_channels, 1, 1, f"{prefix}_conv3")
    return layers.Add(name=out_name or f"{prefix}_add")([shortcut, y])


def resnet_cifar(
    depth: int,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    weight_bits: int | None = None,
    activation_bits: int | None = None,
    per_channel: bool = False,
    weight_decay: float | None = None,
    bn_momentum: float = BN_MOMENTUM,
    name: str | None = None,
    alpha_rate: float = quantizers.DEFAULT_ALPHA_RATE,
    activation_ste: str = "clipped",
) -> keras.Model:
    """Builds a CIFAR ResNet of depth 8, 14, 20, 32, 44, 56, 110 (basic) or 164 (pre-act bottleneck).

    Args:
      depth: one of ``CIFAR_DEPTHS`` (8, 14, 20, 32, 44, 56, 110, 164); anything else raises ValueError.
      num_classes: width of the ``logits`` layer (raw logits, no softmax).
      input_shape: (H, W, C) of the input; 32x32 gives stages of 32, 16 and 8 pixels.
      weight_bits: None (full precision) or 1/2/4/8: bits of every convolution, the stem included
        (at 1 bit the stem at 8: `faqd_tf.quantizers.first_layer_width`).
        The final Dense stays full precision.
      activation_bits: None (plain ReLU) or 1/2/4/8: bits of every ``QuantReLU``.
      per_channel: one weight scale per output channel instead of one per layer.
      weight_decay: None (default; the trainer uses the optimizer's weight decay) or c for an
        ``L2(c)`` kernel regularizer on every conv and the Dense (c = wd / 2 matches PyTorch's wd),
        and ``L2(c * 0.01)`` on every alpha (the authors' alpha decay factor).
      bn_momentum: BatchNormalization momentum, 0.9 by default (moving statistics usable after a
        few hundred steps; Keras' 0.99 is too slow for short runs).
      name: model name, default ``f"resnet{depth}"``.
      alpha_rate: the alpha update of every ``QuantReLU`` (default 0.01; None: raw eq. (5)).
      activation_ste: the input gradient of every ``QuantReLU`` (``"clipped"``: eq. (5)).

    Returns:
      A functional ``keras.Model`` mapping images to logits, with layers ``stage1``..``stage3``.
    """
    if isinstance(depth, bool) or depth not in CIFAR_DEPTHS:
        allowed = ", ".join(str(d) for d in CIFAR_DEPTHS)
        raise ValueError(f"resnet_cifar: depth={depth!r} is not supported; use one of {allowed}.")
    check_num_classes(num_classes)
    kind, n = CIFAR_DEPTHS[depth]
    b = _Builder(
        weight_bits,
        activation_bits,
        per_channel,
        weight_decay,
        bn_momentum,
        alpha_rate,
        activation_ste,
    )

    inputs = keras.Input(shape=tuple(input_shape), name="input")
    x = b.conv(inputs, 16, 3, 1, "stem_conv", first=True)
    x = b.bn(x, "stem_bn")
    x = b.relu(x, "stem_relu")
    for stage, width in enumerate((16, 32, 64), start=1):
        for block in range(1, n + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            prefix = f"s{stage}b{block}"
            out_name = f"stage{stage}" if block == n else None
            if kind == "basic":
                x = _basic_block(b, x, width, strides, prefix, out_name or f"{prefix}_relu2")
            else:
                preact = "residual" if block > 1 else ("none" if stage == 1 else "both")
                x = _preact_bottleneck(b, x, width, strides, prefix, preact, out_name)
    if kind == "bottleneck":
        x = b.bn(x, "final_bn")
        x = b.relu(x, "final_relu")
    outputs = b.head(x, num_classes)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def resnet20(**kwargs) -> keras.Model:
    return resnet_cifar(20, **kwargs)


def resnet32(**kwargs) -> keras.Model:
    return resnet_cifar(32, **kwargs)


def resnet44(**kwargs) -> keras.Model:
    return resnet_cifar(44, **kwargs)


def resnet56(**kwargs) -> keras.Model:
    return resnet_cifar(56, **kwargs)


def resnet110(**kwargs) -> keras.Model:
    return resnet_cifar(110, **kwargs)


def resnet164(**kwargs) -> keras.Model:
    return resnet_cifar(164, **kwargs)
