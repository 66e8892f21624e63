"""What every data source shares: the source protocol, what it describes and yields, split arithmetic."""

import dataclasses

import numpy as np
import tensorflow as tf

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What a source yields, as `load` produces it.

    Attributes:
        name: dataset name (``"cifar10"``, ``"tiny_imagenet"``, a folder's base name, ...).
        num_classes: number of classes, or `None` for an unlabeled folder.
        image_shape: `(height, width, channels)` of the images `load` yields (after `image_size`).
        num_examples: examples per split, for the splits known without reading the data
            (``"train"`` counts the whole train split, including a carved validation tail).
        mean: per-channel mean subtracted after scaling pixels to [0, 1].
        std: per-channel standard deviation divided by after that.
        class_names: class names in label order (TFDS names, subfolder names, wnids), or `None`.
        augmentation: the policy `load` applies to the train split by default (see `AUGMENTATIONS`).
        train_classes: how many classes the train split's labels hold, where headers and file lists
            tell (IDX labels, class folders); `None` where only a pass over the data would (TFDS).
    """

    name: str
    num_classes: int | None
    image_shape: tuple
    num_examples: dict
    mean: tuple
    std: tuple
    class_names: tuple | None = None
    augmentation: str = "crop_flip"
    train_classes: int | None = None


@dataclasses.dataclass(frozen=True)
class Request:
    """What `load` asks a source for, besides the split."""

    image_size: tuple | None
    limit: int | None
    labels: bool
    shuffle_files: bool
    seed: int | None
    validation_fraction: float
    exclude_validation: bool


@dataclasses.dataclass
class Examples:
    """Decoded examples of a split: `(uint8 image (H, W, C), int32 label)`, label -1 if unlabeled."""

    dataset: tf.data.Dataset
    count: int | None
    # False when the examples already sit in memory, so a cache would only duplicate them.
    cacheable: bool = True
    # Where tf.data cannot shard by file (lists, tensors), sharding must be by data.
    shard_by_data: bool = True


def default_augmentation(shape):
    height, width, channels = shape
    if min(height, width) >= 64:
        return "resized_crop_flip"
    return "crop_flip" if channels == 3 else "crop"


def validation_count(count, fraction):
    """Size of the validation tail carved off `count` examples, rounding halves up.

    >>> validation_count(60000, 0.1), validation_count(25, 0.1), validation_count(35, 0.1)
    (6000, 3, 4)
    """
    return int(np.floor(count * fraction + 0.5))


def carve(count, fraction, label):
    n_val = validation_count(count, fraction)
    if not 0 < n_val < count:
        raise ValueError(
            f"{label} has {count} training examples, too few to carve validation_fraction={fraction} "
            f"off; add data or change the fraction."
        )
    return n_val


def fit_size(image, size, channels):
    """Resizes a uint8 image to `size` unless it already has it (stretching, like Keras)."""
    if size is None:
        return image
    shape = tf.shape(image)

    def resized():
        out = tf.image.resize(image, size, method="bilinear", antialias=True)
        return tf.cast(tf.clip_by_value(tf.round(out), 0, 255), tf.uint8)

    same = tf.logical_and(tf.equal(shape[0], size[0]), tf.equal(shape[1], size[1]))
    image = tf.cond(same, lambda: image, resized)
    image.set_shape((size[0], size[1], channels))
    return image


class SourceUnavailableError(RuntimeError):
    """A source that exists but cannot be read here (offline, a missing module); one line."""


class Source:
    """The protocol of a data source: what `load` and `dataset_info` ask of it.

    A source is built from what follows the kind in its string (``tfds:<name>``, ``idx:<path>``,
    ...) and checks its layout there, before anything is read. Subclasses implement:

    - `info(image_size, validation_fraction)`: the `DatasetInfo` of what `load` will yield, from
      headers and file lists (no pass over the data);
    - `examples(split, request)`: the `Examples` of one split ("train", "validation" or "test"),
      raising a one-line `ValueError`/`FileNotFoundError` when the source cannot provide it.
    """

    source = "?"  # the source string, for messages

    def info(self, image_size, validation_fraction):
        raise NotImplementedError

    def examples(self, split, request):
        raise NotImplementedError
