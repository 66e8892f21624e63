"""The paper's networks and a registry of them by name.

>>> from faqd_tf import models
>>> models.available()
('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'resnet164',
 'resnet18', 'resnet34')
>>> student = models.get("resnet20", num_classes=10, weight_bits=2)

CIFAR ResNets (``resnet8`` ... ``resnet164``) take the keyword arguments of
:func:`resnet_cifar` except ``depth``; ``resnet18``/``resnet34`` those of :func:`resnet_imagenet`
except ``depth``. Every model has stage-output layers ``stage1``, ``stage2``, ... (the feature-affinity
taps), a ``avg_pool`` layer and a ``logits`` layer (no softmax).
"""

import functools

import keras

from faqd_tf.models.resnet_cifar import (
    CIFAR_DEPTHS,
    ChannelPad,
    resnet20,
    resnet32,
    resnet44,
    resnet56,
    resnet110,
    resnet164,
    resnet_cifar,
)
from faqd_tf.models.resnet_imagenet import IMAGENET_DEPTHS, resnet18, resnet34, resnet_imagenet

_REGISTRY = {f"resnet{d}": functools.partial(resnet_cifar, d) for d in CIFAR_DEPTHS}
_REGISTRY.update({f"resnet{d}": functools.partial(resnet_imagenet, d) for d in IMAGENET_DEPTHS})


def available() -> tuple[str, ...]:
    """Names accepted by :func:`get`, CIFAR ResNets first."""
    return tuple(_REGISTRY)


def get(name: str, /, **kwargs) -> keras.Model:
    """Builds the model registered as `name` (case-insensitive) with the builder's `kwargs`.

    `name` is positional-only, so ``get("resnet20", name="student")`` names the built model.

    Raises:
      ValueError: unknown `name`; the message lists the allowed names.
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise ValueError(f"Unknown model {name!r}; use one of: {', '.join(available())}.")
    return _REGISTRY[key](**kwargs)


__all__ = [
    "CIFAR_DEPTHS",
    "ChannelPad",
    "IMAGENET_DEPTHS",
    "available",
    "get",
    "resnet110",
    "resnet164",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet56",
    "resnet_cifar",
    "resnet_imagenet",
]
