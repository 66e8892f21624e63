"""Input pipelines: TFDS datasets, image folders, the Tiny ImageNet layout and MNIST-style IDX files.

A source is one string:

- ``tfds:<name>``: a TFDS image classification dataset with ``image`` and ``label`` features
  (``tfds:cifar10``, ``tfds:cifar100``, ``tfds:fashion_mnist``, ``tfds:mnist``, ...). It is
  downloaded and prepared in ``data_dir`` on first use.
- ``folder:<path>``: image files (.bmp, .gif, .jpeg, .jpg, .png), labeled by subfolder
  (``<path>/<class>/...``) or unlabeled (all images directly in ``<path>``). A folder whose
  subfolders are ``train`` and some of ``test``, ``val``/``validation`` holds one such folder per
  split.
- ``tiny_imagenet:<path>``: the official ``tiny-imagenet-200`` folder (``wnids.txt``,
  ``train/<wnid>/images/*.JPEG``, ``val/images/*.JPEG`` with ``val/val_annotations.txt``).
- ``idx:<path>``: a folder of MNIST-format files ``train-images-idx3-ubyte.gz``,
  ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``
  (uncompressed files are accepted too).

Relative paths are taken relative to ``data_dir`` when it is given.

Splits. ``"train"``, ``"test"`` and ``"validation"`` (alias ``"val"``). The validation split is the
dataset's own when it has a labeled one (TFDS ``validation``, ``<path>/val``); otherwise it is
carved from train, deterministically: the last ``validation_fraction`` of the train split (TFDS,
IDX: whose training sets come in random order), or the last ``validation_fraction`` of each
class's files sorted by name (folders, Tiny ImageNet). ``split="train"`` keeps those examples
unless ``exclude_validation=True``. Tiny ImageNet's own test images are unlabeled, so its labeled
``val/`` folder is the ``test`` split (as in the paper and common practice).

Normalization. Pixels are scaled to [0, 1], then ``(x - mean) / std`` per channel with fixed
constants, so a teacher and its student always see the same inputs:

- CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616)
- CIFAR-100: mean (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)
- MNIST: (0.1307,), (0.3081,); Fashion-MNIST: (0.2860,), (0.3530,)
- Tiny ImageNet and TFDS ImageNet variants: the ImageNet constants (0.485, 0.456, 0.406),
  (0.229, 0.224, 0.225), as in the authors' Tiny ImageNet script.
- IDX: the mean and std of the train images file, rounded to 4 decimals (so MNIST and
  Fashion-MNIST get exactly the constants above); it costs one pass over data already in memory.
- Folders and other TFDS datasets: 0.5 and 0.5 (inputs in [-1, 1]); the statistics of a folder
  would need a decoding pass over every image before the first step.

`load(..., mean=..., std=...)` overrides them, e.g. for a teacher trained with other constants
(the authors' CIFAR-10 scripts used the CIFAR-100 constants).

Augmentation (training split by default), on raw pixels before normalization:

- ``"crop_flip"``: zero-pad by 1/8 of each side (4 px on 32x32), random crop back, random
  horizontal flip. Default for CIFAR-10/100, Fashion-MNIST (clothes are left-right symmetric) and
  other color images smaller than 64 px.
- ``"crop"``: the same without the flip. Default for MNIST and any other grayscale source, IDX
  included (a flipped digit is another glyph); pass ``augment="crop_flip"`` for Fashion-MNIST IDX.
- ``"resized_crop_flip"``: random crop of 8-100% of the area, aspect ratio 3/4-4/3, resized back,
  random horizontal flip (torchvision's RandomResizedCrop, as the authors used on Tiny ImageNet).
  Default for Tiny ImageNet, ImageNet variants and images of 64 px or more.

Example:

```python
info = dataset_info("idx:/usr/share/datasets/fashion-mnist")
train = load("idx:/usr/share/datasets/fashion-mnist", "train", labels=False, batch_size=128)
test = load("idx:/usr/share/datasets/fashion-mnist", "test", batch_size=256)
images, labels = next(iter(test))  # (256, 28, 28, 1) float32, (256,) int32
```

Layout: each kind of source is a `Source` (the protocol, in `faqd_tf.data.base`) in a module of its
own (`tfds`; `files` for folders and Tiny ImageNet; `idx`); `pipeline` builds what follows a source.
Files are checked through `faqd_tf.inputs` before anything is decoded or allocated.
"""

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from faqd_tf import inputs
from faqd_tf.data import pipeline as _pipeline
from faqd_tf.data.base import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    FASHION_MNIST_STATS,
    IMAGENET_STATS,
    MNIST_STATS,
    DatasetInfo,
    Request,
    Source,
    SourceUnavailableError,
)
from faqd_tf.data.files import IMAGE_EXTENSIONS, FolderSource, TinyImageNetSource
from faqd_tf.data.idx import IdxSource, read_idx
from faqd_tf.data.tfds import TfdsSource
from faqd_tf.options import AUGMENTATIONS, is_integer

if TYPE_CHECKING:
    import tensorflow as tf

__all__ = [
    "AUGMENTATIONS",
    "CIFAR10_STATS",
    "CIFAR100_STATS",
    "FASHION_MNIST_STATS",
    "IMAGENET_STATS",
    "IMAGE_EXTENSIONS",
    "MNIST_STATS",
    "DatasetInfo",
    "Source",
    "SourceUnavailableError",
    "dataset_info",
    "load",
    "read_idx",
]

SOURCE_KINDS = ("tfds", "folder", "tiny_imagenet", "idx")


def dataset_info(
    source: str,
    data_dir: str | None = None,
    *,
    image_size: int | tuple[int, int] | None = None,
    validation_fraction: float = 0.1,
) -> DatasetInfo:
    """Describes a source without building its pipeline (and without downloading TFDS data).

    Args:
        source: ``"tfds:<name>"``, ``"folder:<path>"``, ``"tiny_imagenet:<path>"`` or ``"idx:<path>"``.
        data_dir: TFDS data directory; for path sources, the base of relative paths.
        image_size: `(height, width)` or an int, as passed to `load`.
        validation_fraction: the share of train carved off as validation where the source has no
            validation split of its own; only used for `num_examples`.

    Returns:
        A `DatasetInfo`.

    Example:

    ```python
    info = dataset_info("tfds:cifar10")
    info.image_shape, info.num_classes, info.mean  # (32, 32, 3), 10, (0.4914, 0.4822, 0.4465)
    ```
    """
    size = _check_image_size(image_size)
    _check_fraction(validation_fraction)
    return _backend(source, data_dir).info(size, validation_fraction)


def load(
    source: str,
    split: str = "train",
    *,
    labels: bool = True,
    batch_size: int | None = 128,
    shuffle: bool | None = None,
    augment: bool | str | None = None,
    image_size: int | tuple[int, int] | None = None,
    limit: int | None = None,
    seed: int | None = None,
    data_dir: str | None = None,
    drop_remainder: bool = False,
    cache: bool | str | None = None,
    validation_fraction: float = 0.1,
    exclude_validation: bool = False,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    index: bool = False,
) -> "tf.data.Dataset":
    """Builds a `tf.data.Dataset` of normalized float32 images, batched and prefetched.

    It yields `(images, labels)` with int32 class ids, or `images` alone when `labels=False`
    (label-free distillation). It can be passed to `strategy.experimental_distribute_dataset`;
    `batch_size` is then the global batch size.

    Args:
        source: ``"tfds:<name>"``, ``"folder:<path>"``, ``"tiny_imagenet:<path>"`` or ``"idx:<path>"``.
        split: ``"train"``, ``"test"``, ``"validation"`` or ``"val"`` (see the module notes for
            where each comes from).
        labels: yield labels; `False` also accepts unlabeled folders.
        batch_size: global batch size; `None` yields single examples.
        shuffle: shuffle every epoch; default `True` for train, `False` otherwise.
        augment: `None` (the dataset's policy for train, none otherwise), `True` (its policy),
            `False`, or one of `AUGMENTATIONS`.
        image_size: resize images to `(height, width)` (an int for square); default the native size
            (a folder's is that of its first image; others are resized to it).
        limit: take only the first `limit` examples of the split (before shuffling), for quick
            runs; file sources list their files in a fixed class-mixed order for this.
        seed: seed of the shuffle order and the augmentation; `None` follows TF's global seed.
        data_dir: TFDS data directory; for path sources, the base of relative paths.
        drop_remainder: drop the last partial batch.
        cache: keep decoded images (uint8, after resizing) in memory after the first epoch:
            `None` does when they fit in 2 GiB, `True`/`False` force it, a string caches to that
            file prefix instead (one pipeline at a time per prefix).
        validation_fraction: share of train carved off as validation where the source has no
            validation split of its own.
        exclude_validation: leave the carved validation examples out of `split="train"`.
        mean: per-channel means overriding the dataset's normalization constants.
        std: per-channel standard deviations overriding them.
        index: yield each batch's images as ``{"images": images, "index": numbers}``, every
            example numbered (int64, from 0) in the split's fixed order, the same number every
            epoch: what `Distiller(teacher_cache=...)` keeps the teacher's logits by.

    Returns:
        A `tf.data.Dataset`.

    Example:

    ```python
    train = load("tfds:cifar10", "train", labels=False, batch_size=128, seed=1)
    val = load("tfds:cifar10", "validation", batch_size=256)  # last 10% of train
    for images in train.take(1):
        print(images.shape)  # (128, 32, 32, 3)
    ```
    """
    split = _check_split(split)
    size = _check_image_size(image_size)
    _check_fraction(validation_fraction)
    if batch_size is not None and (not is_integer(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid; pass a positive int or None.")
    if limit is not None and (not is_integer(limit) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid; pass a positive int or None.")

    shuffle = split == "train" if shuffle is None else bool(shuffle)
    request = Request(
        image_size=size,
        limit=limit,
        labels=bool(labels),
        # Shuffled file order would make `limit` pick a different subset on every run.
        shuffle_files=shuffle and limit is None,
        seed=seed,
        validation_fraction=validation_fraction,
        exclude_validation=bool(exclude_validation),
    )
    backend = _backend(source, data_dir)
    examples = backend.examples(split, request)
    info = backend.info(size, validation_fraction)
    policy = _augmentation(augment, split, info)
    mean, std = _normalization(mean, std, info)
    return _pipeline.pipeline(
        examples,
        info.image_shape,
        labels=bool(labels),
        batch_size=batch_size,
        shuffle=shuffle,
        policy=policy,
        seed=seed,
        cache=cache,
        drop_remainder=drop_remainder,
        mean=mean,
        std=std,
        index=bool(index),
    )


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_split(split):
    name = {"val": "validation"}.get(split, split) if isinstance(split, str) else split
    if name not in ("train", "validation", "test"):
        raise ValueError(
            f"split={split!r} is unknown; use 'train', 'validation' ('val') or 'test'."
        )
    return name


def _check_image_size(image_size):
    if image_size is None:
        return None
    size = (image_size, image_size) if is_integer(image_size) else tuple(image_size)
    if len(size) != 2 or not all(is_integer(s) and s > 0 for s in size):
        raise ValueError(f"image_size={image_size!r} is invalid; pass (height, width) or an int.")
    return int(size[0]), int(size[1])


def _check_fraction(fraction):
    if not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ValueError(f"validation_fraction={fraction!r} is invalid; pass a number in (0, 1).")


def _augmentation(augment, split, info):
    if augment is None:
        return info.augmentation if split == "train" else None
    if augment is True:
        return info.augmentation
    if augment is False:
        return None
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"augment={inputs.shorten(repr(augment))} is unknown; use None, True, False or one of "
            f"{', '.join(AUGMENTATIONS)}."
        )
    return augment


def _normalization(mean, std, info):
    channels = info.image_shape[-1]
    values = []
    for name, given, default in (("mean", mean, info.mean), ("std", std, info.std)):
        v = default if given is None else tuple(float(x) for x in np.ravel(given))
        if len(v) == 1 and channels > 1:
            v = v * channels
        if len(v) != channels:
            raise ValueError(
                f"{name}={given!r} has {len(v)} values but the images have {channels} channel(s); "
                f"pass one per channel."
            )
        values.append(v)
    if any(s <= 0 for s in values[1]):
        raise ValueError(f"std={std!r} has a value <= 0; standard deviations must be positive.")
    return values


# --------------------------------------------------------------------------------------------
# Sources


def _parse_source(source):
    usage = (
        "write tfds:<name>, folder:<path>, tiny_imagenet:<path> or idx:<path>, e.g. tfds:cifar10"
    )
    shown = inputs.shorten(repr(source), inputs.PATH_CHARS)
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"source {shown} has no kind; {usage}.")
    kind, _, arg = source.partition(":")
    if kind.strip().lower() not in SOURCE_KINDS:
        raise ValueError(
            f"source {shown} has an unknown kind {inputs.shorten(repr(kind))}; {usage}."
        )
    if not arg.strip():
        raise ValueError(f"source {shown} names nothing after the colon; {usage}.")
    return kind.strip().lower(), arg.strip()


def _backend(source, data_dir):
    kind, arg = _parse_source(source)
    if kind == "tfds":
        return TfdsSource(arg, data_dir)
    path = os.path.expanduser(arg)
    if data_dir is not None and not os.path.isabs(path):
        path = os.path.join(os.path.expanduser(os.fspath(data_dir)), path)
    label = f"{kind}:{path}"
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{label} does not exist; check the path (relative paths start at data_dir, or at the "
            f"working directory without one)."
        )
    if not os.path.isdir(path):
        raise ValueError(
            f"{label} is a file, not a folder; point the source at the folder of the data."
        )
    sources = {"folder": FolderSource, "tiny_imagenet": TinyImageNetSource, "idx": IdxSource}
    return sources[kind](path, label)
