"""ImageNet-style ResNet18 and ResNet34 (He et al. 2016, torchvision layout), optionally quantized.

Basic blocks with 64/128/256/512 channels in four stages (2-2-2-2 blocks for ResNet18, 3-4-6-3 for
ResNet34); shortcuts that change the shape are 1x1 stride-s projections + BN (option B, as in
torchvision). At 1000 classes the trainable parameter count equals torchvision's (11,689,512 for
ResNet18, 21,797,672 for ResNet34).

- ``small_input=False`` (224x224 ImageNet): 7x7 stride-2 stem + 3x3 stride-2 max-pool, stage outputs
  at 56/28/14/7 pixels for a 224 input.
- ``small_input=True`` (e.g. Tiny ImageNet 64x64, the paper's third data set): 3x3 stride-1 stem and no
  max-pool, stage outputs at 64/32/16/8 pixels for a 64 input.

Quantization, naming and BatchNormalization settings follow :mod:`faqd_tf.models.resnet_cifar`:
every conv (stem included; at 1 bit the stem at 8) is a ``QuantConv2D(weight_bits)``, every ReLU a
``QuantReLU(activation_bits)``, the ``logits`` Dense stays full precision; stride-2 convolutions and
the max-pool use explicit symmetric ``ZeroPadding2D`` (PyTorch geometry); ``stage1``..``stage4`` are the
output ReLUs of the stages, followed by ``avg_pool`` and ``logits``. The max-pool pads with zeros
rather than -inf, which is equivalent because its input is a ReLU output (>= 0).

Example:

>>> model = resnet18(num_classes=200, input_shape=(64, 64, 3), small_input=True)
>>> model.get_layer("stage4").output.shape
(None, 8, 8, 512)
"""

import keras
from keras import layers

from faqd_tf import quantizers
from faqd_tf.models.resnet_cifar import BN_MOMENTUM, _Builder, check_num_classes, residual_branch

IMAGENET_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_WIDTHS = (64, 128, 256, 512)


def _basic_block(b, x, filters, strides, prefix, out_name):
    """Post-activation basic block with a 1x1 projection shortcut when the shape changes."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = b.conv(x, filters, 1, strides, f"{prefix}_sc_conv")
        shortcut = b.bn(shortcut, f"{prefix}_sc_bn")
    return residual_branch(b, x, shortcut, filters, strides, prefix, out_name)


def resnet_imagenet(
    depth: int,
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    small_input: bool = False,
    weight_bits: int | None = None,
    activation_bits: int | None = None,
    per_channel: bool = False,
    weight_decay: float | None = None,
    bn_momentum: float = BN_MOMENTUM,
    name: str | None = None,
    alpha_rate: float = quantizers.DEFAULT_ALPHA_RATE,
    activation_ste: str = "clipped",
) -> keras.Model:
    """Builds ResNet18 (depth=18) or ResNet34 (depth=34); other depths raise ValueError.

    Args:
      depth: 18 or 34.
      num_classes: width of the ``logits`` layer (raw logits, no softmax).
      input_shape: (H, W, C) of the input.
      small_input: True for small images (Tiny ImageNet 64x64): 3x3 stride-1 stem, no max-pool.
      weight_bits, activation_bits, per_channel, weight_decay, bn_momentum, alpha_rate,
      activation_ste: as in
        :func:`faqd_tf.models.resnet_cifar.resnet_cifar`.
      name: model name, default ``f"resnet{depth}"``.
    """
    if isinstance(depth, bool) or depth not in IMAGENET_DEPTHS:
        allowed = ", ".join(str(d) for d in IMAGENET_DEPTHS)
        raise ValueError(
            f"resnet_imagenet: depth={depth!r} is not supported; use one of {allowed}."
        )
    check_num_classes(num_classes)
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
    if small_input:
        x = b.conv(inputs, 64, 3, 1, "stem_conv", first=True)
        x = b.bn(x, "stem_bn")
        x = b.relu(x, "stem_relu")
    else:
        x = b.conv(inputs, 64, 7, 2, "stem_conv", first=True)
        x = b.bn(x, "stem_bn")
        x = b.relu(x, "stem_relu")
        x = layers.ZeroPadding2D(1, name="stem_pool_pad")(x)
        x = layers.MaxPooling2D(pool_size=3, strides=2, name="stem_pool")(x)
    for stage, (blocks, width) in enumerate(zip(IMAGENET_DEPTHS[depth], STAGE_WIDTHS), start=1):
        for block in range(1, blocks + 1):
            strides = 2 if (stage > 1 and block == 1) else 1
            prefix = f"s{stage}b{block}"
            out_name = f"stage{stage}" if block == blocks else f"{prefix}_relu2"
            x = _basic_block(b, x, width, strides, prefix, out_name)
    outputs = b.head(x, num_classes)
    return keras.Model(inputs, outputs, name=name or f"resnet{depth}")


def resnet18(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    small_input: bool = False,
    **kwargs,
) -> keras.Model:
    """ResNet18; see :func:`resnet_imagenet` for the keyword arguments."""
    return resnet_imagenet(
        18, num_classes=num_classes, input_shape=input_shape, small_input=small_input, **kwargs
    )


def resnet34(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    small_input: bool = False,
    **kwargs,
) -> keras.Model:
    """ResNet34; see :func:`resnet_imagenet` for the keyword arguments."""
    return resnet_imagenet(
        34, num_classes=num_classes, input_shape=input_shape, small_input=small_input, **kwargs
    )
