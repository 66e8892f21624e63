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
"""

import dataclasses
import functools
import gzip
import math
import os
import zlib

import numpy as np
import tensorflow as tf

__all__ = ["AUGMENTATIONS", "IMAGE_EXTENSIONS", "DatasetInfo", "dataset_info", "load", "read_idx"]

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")
AUGMENTATIONS = ("crop", "crop_flip", "resized_crop_flip")
SOURCE_KINDS = ("tfds", "folder", "tiny_imagenet", "idx")

CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# File lists are put in one fixed pseudo-random order, so that `limit` takes a class-mixed subset
# and a cache in memory is already mixed, the same on every run whatever `seed` is.
_ORDER_SEED = 230210899
# The shuffle buffer holds this many bytes of images (all of CIFAR, 21k Tiny ImageNet images).
_SHUFFLE_BUFFER_BYTES = 256 * 2**20
_MIN_SHUFFLE_BUFFER = 1024
# cache=None caches decoded images in memory only below this size.
_CACHE_LIMIT_BYTES = 2 * 2**30
# Folders: the color mode is read from this many images spread over the sorted file list.
_CHANNEL_PROBES = 16
_RESIZED_CROP_AREA = (0.08, 1.0)
_RESIZED_CROP_RATIO = (3 / 4, 4 / 3)


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
    """

    name: str
    num_classes: int | None
    image_shape: tuple
    num_examples: dict
    mean: tuple
    std: tuple
    class_names: tuple | None = None
    augmentation: str = "crop_flip"


def dataset_info(source, data_dir=None, *, image_size=None, validation_fraction=0.1):
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
    source,
    split="train",
    *,
    labels=True,
    batch_size=128,
    shuffle=None,
    augment=None,
    image_size=None,
    limit=None,
    seed=None,
    data_dir=None,
    drop_remainder=False,
    cache=None,
    validation_fraction=0.1,
    exclude_validation=False,
    mean=None,
    std=None,
):
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
    if batch_size is not None and (not _is_int(batch_size) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r} is invalid; pass a positive int or None.")
    if limit is not None and (not _is_int(limit) or limit < 1):
        raise ValueError(f"limit={limit!r} is invalid; pass a positive int or None.")

    shuffle = split == "train" if shuffle is None else bool(shuffle)
    request = _Request(
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
    return _pipeline(
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
    )


def read_idx(path):
    """Reads one IDX file (gzip-compressed or not) into a NumPy array.

    Validates the magic number (two zero bytes, a type code, the number of dimensions) and that
    the data size matches the header exactly.

    Args:
        path: path of the file, e.g. ``".../train-images-idx3-ubyte.gz"``.

    Returns:
        A read-only NumPy array of the header's shape and type.

    Example:

    ```python
    images = read_idx("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    images.shape, images.dtype  # (10000, 28, 28), uint8
    ```
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; check the path of the IDX file.")
    stat = os.stat(path)
    return _read_idx_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


# --------------------------------------------------------------------------------------------
# Argument checks


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_split(split):
    name = {"val": "validation"}.get(split, split) if isinstance(split, str) else split
    if name not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r} is unknown; use 'train', 'validation' ('val') or 'test'.")
    return name


def _check_image_size(image_size):
    if image_size is None:
        return None
    size = (image_size, image_size) if _is_int(image_size) else tuple(image_size)
    if len(size) != 2 or not all(_is_int(s) and s > 0 for s in size):
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
            f"augment={augment!r} is unknown; use None, True, False or one of "
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
    usage = "write tfds:<name>, folder:<path>, tiny_imagenet:<path> or idx:<path>, e.g. tfds:cifar10"
    if not isinstance(source, str) or ":" not in source:
        raise ValueError(f"source {source!r} has no kind; {usage}.")
    kind, _, arg = source.partition(":")
    if kind.strip().lower() not in SOURCE_KINDS:
        raise ValueError(f"source {source!r} has an unknown kind {kind!r}; {usage}.")
    if not arg.strip():
        raise ValueError(f"source {source!r} names nothing after the colon; {usage}.")
    return kind.strip().lower(), arg.strip()


def _backend(source, data_dir):
    kind, arg = _parse_source(source)
    if kind == "tfds":
        return _TfdsSource(arg, data_dir)
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
        raise ValueError(f"{label} is a file, not a folder; point the source at the folder of the data.")
    sources = {"folder": _FolderSource, "tiny_imagenet": _TinyImageNetSource, "idx": _IdxSource}
    return sources[kind](path, label)


@dataclasses.dataclass(frozen=True)
class _Request:
    """What `load` asks a source for, besides the split."""

    image_size: tuple | None
    limit: int | None
    labels: bool
    shuffle_files: bool
    seed: int | None
    validation_fraction: float
    exclude_validation: bool


@dataclasses.dataclass
class _Examples:
    """Decoded examples of a split: `(uint8 image (H, W, C), int32 label)`, label -1 if unlabeled."""

    dataset: tf.data.Dataset
    count: int | None
    # False when the examples already sit in memory, so a cache would only duplicate them.
    cacheable: bool = True
    # Where tf.data cannot shard by file (lists, tensors), sharding must be by data.
    shard_by_data: bool = True


def _default_augmentation(shape):
    height, width, channels = shape
    if min(height, width) >= 64:
        return "resized_crop_flip"
    return "crop_flip" if channels == 3 else "crop"


def _validation_count(count, fraction):
    """Size of the validation tail carved off `count` examples, rounding halves up."""
    return int(np.floor(count * fraction + 0.5))


def _carve(count, fraction, label):
    n_val = _validation_count(count, fraction)
    if not 0 < n_val < count:
        raise ValueError(
            f"{label} has {count} training examples, too few to carve validation_fraction={fraction} "
            f"off; add data or change the fraction."
        )
    return n_val


def _fit_size(image, size, channels):
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


# TFDS ---------------------------------------------------------------------------------------


def _known_stats(name):
    base = name.split("/")[0].split(":")[0].lower()
    if base.startswith("cifar100"):
        return CIFAR100_STATS, "crop_flip"
    if base.startswith("cifar10"):
        return CIFAR10_STATS, "crop_flip"
    if base.startswith("fashion_mnist"):
        return FASHION_MNIST_STATS, "crop_flip"
    if base.startswith("mnist"):
        return MNIST_STATS, "crop"
    if "imagenet" in base:
        return IMAGENET_STATS, "resized_crop_flip"
    return None, None


class _TfdsSource:
    def __init__(self, name, data_dir):
        import tensorflow_datasets as tfds

        self.source = f"tfds:{name}"
        self.name = name
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:
            raise ValueError(
                f"{self.source} is not a TFDS dataset; check the name in the TFDS catalog "
                f"(https://www.tensorflow.org/datasets/catalog), e.g. tfds:cifar10."
            ) from None
        features = self.builder.info.features
        image, label = (features[k] if k in features else None for k in ("image", "label"))
        if not isinstance(image, tfds.features.Image) or not isinstance(label, tfds.features.ClassLabel):
            raise ValueError(
                f"{self.source} has no 'image' (Image) and 'label' (ClassLabel) features; use an "
                f"image classification dataset such as tfds:cifar10."
            )
        self.native_shape = tuple(image.shape)
        self.num_classes = int(label.num_classes)
        self.class_names = tuple(label.names)
        self._prepared = False

    def _splits(self):
        return {name: int(s.num_examples) for name, s in self.builder.info.splits.items()}

    def info(self, size, fraction):
        height, width, channels = self.native_shape
        if size is None and (height is None or width is None):
            raise ValueError(
                f"{self.source} has images of varying size; pass image_size=(height, width)."
            )
        shape = (*(size or (height, width)), channels)
        stats, augmentation = _known_stats(self.name)
        stats = stats or ((0.5,) * channels, (0.5,) * channels)
        counts = self._splits()
        if "train" in counts and "validation" not in counts:
            counts["validation"] = _validation_count(counts["train"], fraction)
        return DatasetInfo(
            name=self.name,
            num_classes=self.num_classes,
            image_shape=shape,
            num_examples=counts,
            mean=stats[0],
            std=stats[1],
            class_names=self.class_names,
            augmentation=augmentation or _default_augmentation(shape),
        )

    def _prepare(self):
        if self._prepared:
            return
        try:
            self.builder.download_and_prepare()
        except ImportError as err:
            # TFDS imports some dataset-specific dependencies only when it generates the data.
            raise RuntimeError(
                f"{self.source} needs the Python module {err.name!r} to download and prepare the "
                f"data; install it (pip install {err.name})."
            ) from err
        except Exception as err:  # Download and generation errors come in many types.
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise RuntimeError(
                f"{self.source} is not prepared in {self.builder.data_dir} and could not be "
                f"downloaded ({type(err).__name__}: {reason}); connect once to the internet or "
                f"pass the data_dir that holds it."
            ) from err
        self._prepared = True

    def _split_spec(self, split, fraction, exclude):
        counts = self._splits()
        if split == "validation" and "validation" in counts:
            return "validation", counts["validation"]
        if split == "test":
            if counts and "test" not in counts:
                raise ValueError(
                    f"{self.source} has no test split (it has {', '.join(sorted(counts))}); use "
                    f"split='validation'."
                )
            return "test", counts.get("test")
        if split == "train" and (not exclude or "validation" in counts):
            return "train", counts.get("train")
        # Carve the validation tail off train. Unknown sizes (never after a download) fall back
        # to TFDS percent slicing, which only takes whole percents.
        if "train" in counts:
            n_val = _carve(counts["train"], fraction, self.source)
            if split == "validation":
                return f"train[-{n_val}:]", n_val
            return f"train[:-{n_val}]", counts["train"] - n_val
        percent = max(1, int(round(fraction * 100)))
        return (f"train[-{percent}%:]" if split == "validation" else f"train[:-{percent}%]"), None

    def examples(self, split, request):
        import tensorflow_datasets as tfds

        shape = self.info(request.image_size, request.validation_fraction).image_shape
        self._prepare()
        spec, count = self._split_spec(split, request.validation_fraction, request.exclude_validation)
        # Our own cache follows; TFDS's auto-cache would hold a second copy.
        read_config = tfds.ReadConfig(shuffle_seed=request.seed, try_autocache=False)
        ds = self.builder.as_dataset(
            split=spec, shuffle_files=request.shuffle_files, read_config=read_config
        )
        if request.limit is not None:
            ds = ds.take(request.limit)
            count = request.limit if count is None else min(count, request.limit)
        size = None if request.image_size in (None, self.native_shape[:2]) else request.image_size
        channels = shape[-1]

        def select(example):
            image = _fit_size(example["image"], size, channels)
            return image, tf.cast(example["label"], tf.int32)

        ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
        # TFDS reads TFRecord shards, which tf.data can split between workers by file (AUTO);
        # not with `limit`, which would then take `limit` examples on every worker.
        return _Examples(ds, count, cacheable=True, shard_by_data=request.limit is not None)


# Image files ----------------------------------------------------------------------------------


def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk_images(folder):
    """All images under `folder`, recursively, sorted by path; hidden files and folders skipped."""
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if _is_image(f))
    return sorted(found)


def _no_images_error(label, folder):
    others = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    found = f", only {len(others)} other entries such as {others[0]!r}" if others else ""
    return ValueError(
        f"{label} has no images ({', '.join(IMAGE_EXTENSIONS)}){found}; put images in it or in "
        f"one subfolder per class."
    )


def _index_folder(folder, label):
    """`(class_names, {class index: sorted paths})` of a labeled folder, `(None, {-1: ...})` if flat."""
    entries = sorted((e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name)
    flat = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    classes = {}
    for entry in entries:
        if entry.is_dir():
            files = _walk_images(entry.path)
            if files:  # Empty subfolders (stray checkpoints, ...) are not classes.
                classes[entry.name] = files
    if flat and classes:
        raise ValueError(
            f"{label} has images both directly in it and in subfolders "
            f"({', '.join(list(classes)[:3])}); keep one layout: one subfolder per class, or all "
            f"images directly in it (unlabeled)."
        )
    if not flat and not classes:
        raise _no_images_error(label, folder)
    if flat:
        return None, {-1: sorted(flat)}
    names = tuple(sorted(classes))
    return names, {i: classes[n] for i, n in enumerate(names)}


def _flatten(groups):
    """`{label: paths}` to parallel lists of paths and labels."""
    return [p for f in groups.values() for p in f], [c for c, f in groups.items() for _ in f]


def _tail_split(groups, split, fraction, exclude, label):
    """Picks a split's files from per-class sorted lists; validation = each class's last files."""
    if split == "train" and not exclude:
        return _flatten(groups)
    n_vals = {cls: _validation_count(len(files), fraction) for cls, files in groups.items()}
    if not any(n_vals.values()) or all(n == len(groups[c]) for c, n in n_vals.items()):
        raise ValueError(
            f"{label} has too few images per class to carve validation_fraction={fraction} off "
            f"each; add images or change the fraction."
        )
    paths, labels = [], []
    for cls, files in groups.items():
        n_val = n_vals[cls]
        chosen = files[len(files) - n_val :] if split == "validation" else files[: len(files) - n_val]
        paths.extend(chosen)
        labels.extend([cls] * len(chosen))
    return paths, labels


def _file_examples(paths, labels, *, size, channels, limit):
    order = np.random.default_rng(_ORDER_SEED).permutation(len(paths))
    paths = [paths[i] for i in order][:limit]
    labels = np.asarray([labels[i] for i in order][:limit], np.int32)

    def decode(path, label):
        # channels=3 decodes every format (GIF refuses 1); gray sources convert back exactly.
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        return _fit_size(image, size, channels), label

    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return _Examples(ds, len(paths), cacheable=True, shard_by_data=True)


def _probe_images(paths):
    """`(height, width)` of the first image and 1 or 3 channels: 3 if any probed image is color."""
    first = tf.io.decode_image(tf.io.read_file(paths[0]), channels=3, expand_animations=False)
    picks = np.unique(np.linspace(0, len(paths) - 1, min(_CHANNEL_PROBES, len(paths))).astype(int))
    channels = 1
    for i in picks:
        if _decoded_channels(paths[i]) >= 3:
            channels = 3
            break
    return (int(first.shape[0]), int(first.shape[1])), channels


def _decoded_channels(path):
    if path.lower().endswith(".gif"):
        return 3
    return int(tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False).shape[-1])


class _FolderSource:
    _SPLIT_DIRS = {"train": ("train",), "test": ("test",), "validation": ("val", "validation")}

    def __init__(self, path, label):
        self.path, self.source = path, label
        subdirs = {e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")}
        known = {d for dirs in self._SPLIT_DIRS.values() for d in dirs}
        self.split_dirs = None
        if "train" in subdirs and subdirs <= known:
            if {"val", "validation"} <= subdirs:
                raise ValueError(f"{label} has both val/ and validation/; keep one of them.")
            if any(_is_image(f) for f in os.listdir(path)):
                raise ValueError(
                    f"{label} has images next to its train/ folder; move them into train/, test/ "
                    f"or val/."
                )
            self.split_dirs = {
                split: os.path.join(path, d)
                for split, names in self._SPLIT_DIRS.items()
                for d in names
                if d in subdirs
            }
        self._indexes = {}
        self._probed = None

    def _index(self, split):
        """The folder index of one of train/test/val (split layout) or of the whole folder."""
        key = split if self.split_dirs else "train"
        if key not in self._indexes:
            folder = self.split_dirs[key] if self.split_dirs else self.path
            label = f"folder:{folder}"
            names, groups = _index_folder(folder, label)
            if key != "train":
                train_names, _ = self._index("train")
                if names is not None:
                    if train_names is None or not set(names) <= set(train_names):
                        extra = sorted(set(names) - set(train_names or ()))
                        raise ValueError(
                            f"{label} has classes that train/ lacks ({', '.join(extra[:3])}); give "
                            f"both the same class subfolders."
                        )
                    # Labels follow train's class order.
                    groups = {train_names.index(names[c]): files for c, files in groups.items()}
            self._indexes[key] = (names, groups)
        return self._indexes[key]

    def info(self, size, fraction):
        names, groups = self._index("train")
        if self._probed is None:
            self._probed = _probe_images(sorted(p for files in groups.values() for p in files))
        native, channels = self._probed
        shape = (*(size or native), channels)
        n_train = sum(len(f) for f in groups.values())
        counts = {"train": n_train}
        if self.split_dirs and "validation" in self.split_dirs:
            counts["validation"] = sum(len(f) for f in self._index("validation")[1].values())
        else:
            counts["validation"] = sum(_validation_count(len(f), fraction) for f in groups.values())
        if self.split_dirs and "test" in self.split_dirs:
            counts["test"] = sum(len(f) for f in self._index("test")[1].values())
        return DatasetInfo(
            name=os.path.basename(os.path.normpath(self.path)),
            num_classes=None if names is None else len(names),
            image_shape=shape,
            num_examples=counts,
            mean=(0.5,) * channels,
            std=(0.5,) * channels,
            class_names=names,
            augmentation=_default_augmentation(shape),
        )

    def examples(self, split, request):
        shape = self.info(request.image_size, request.validation_fraction).image_shape
        own = bool(self.split_dirs) and split in self.split_dirs
        if split == "test" and not own:
            raise ValueError(
                f"{self.source} has no test split; lay it out as train/ and test/ subfolders (each "
                f"labeled or flat), or use split='validation' for a held-out part of train."
            )
        names, groups = self._index(split if own else "train")
        if request.labels and names is None:
            where = f"folder:{self.split_dirs[split]}" if own else self.source
            raise ValueError(
                f"{where} has no class subfolders, so no labels; pass labels=False or put its "
                f"images in one subfolder per class."
            )
        if own:
            paths, labels = _flatten(groups)
        else:
            paths, labels = _tail_split(
                groups, split, request.validation_fraction, request.exclude_validation, self.source
            )
        return _file_examples(paths, labels, size=shape[:2], channels=shape[-1], limit=request.limit)


class _TinyImageNetSource:
    def __init__(self, path, label):
        self.path, self.source = path, label
        layout = "point it at the tiny-imagenet-200 folder (wnids.txt, train/, val/)"
        wnids_file = os.path.join(path, "wnids.txt")
        if not os.path.isfile(wnids_file):
            raise FileNotFoundError(f"{label} has no wnids.txt; {layout}.")
        with open(wnids_file) as f:
            self.wnids = tuple(line.strip() for line in f if line.strip())
        if not self.wnids or len(set(self.wnids)) != len(self.wnids):
            raise ValueError(
                f"{label}/wnids.txt is empty or lists a wnid twice; restore the official file."
            )
        if not os.path.isdir(os.path.join(path, "train")):
            raise FileNotFoundError(f"{label} has no train/ folder; {layout}.")
        self._train = None
        self._val = None
        self._native = None

    def _train_groups(self):
        if self._train is None:
            groups = {}
            for i, wnid in enumerate(self.wnids):
                folder = os.path.join(self.path, "train", wnid)
                files = _walk_images(folder) if os.path.isdir(folder) else []
                if not files:
                    raise ValueError(
                        f"{self.source}/train/{wnid} (listed in wnids.txt) has no images; restore "
                        f"it or remove the wnid from wnids.txt."
                    )
                groups[i] = files
            self._train = groups
        return self._train

    def _val_list(self):
        """Official val images with their labels from val_annotations.txt (file, wnid, box)."""
        if self._val is None:
            val = os.path.join(self.path, "val")
            annotations = os.path.join(val, "val_annotations.txt")
            if not os.path.isfile(annotations):
                raise FileNotFoundError(
                    f"{self.source} has no val/val_annotations.txt, which labels the test split "
                    f"(val/images); restore it."
                )
            index = {w: i for i, w in enumerate(self.wnids)}
            images = os.path.join(val, "images")
            present = {f for f in os.listdir(images) if _is_image(f)} if os.path.isdir(images) else set()
            paths, labels = [], []
            with open(annotations) as f:
                for number, line in enumerate(f, 1):
                    fields = line.split()
                    if not fields:
                        continue
                    if len(fields) < 2 or fields[1] not in index:
                        raise ValueError(
                            f"{annotations} line {number} names no wnid of wnids.txt "
                            f"({line.strip()!r}); restore the official file."
                        )
                    if fields[0] not in present:
                        raise FileNotFoundError(
                            f"{images}/{fields[0]} (line {number} of val_annotations.txt) is "
                            f"missing; restore val/images."
                        )
                    paths.append(os.path.join(images, fields[0]))
                    labels.append(index[fields[1]])
            unlabeled = present - {os.path.basename(p) for p in paths}
            if unlabeled:
                raise ValueError(
                    f"{images} has {len(unlabeled)} images without a line in val_annotations.txt "
                    f"(e.g. {sorted(unlabeled)[0]}); restore the official files."
                )
            if not paths:
                raise ValueError(f"{annotations} lists no images; restore the official file.")
            self._val = (paths, labels)
        return self._val

    def info(self, size, fraction):
        groups = self._train_groups()
        if self._native is None:
            self._native = _probe_images(groups[0][:1])[0]
        shape = (*(size or self._native), 3)
        counts = {
            "train": sum(len(f) for f in groups.values()),
            "validation": sum(_validation_count(len(f), fraction) for f in groups.values()),
        }
        if os.path.isfile(os.path.join(self.path, "val", "val_annotations.txt")):
            counts["test"] = len(self._val_list()[0])
        return DatasetInfo(
            name="tiny_imagenet",
            num_classes=len(self.wnids),
            image_shape=shape,
            num_examples=counts,
            mean=IMAGENET_STATS[0],
            std=IMAGENET_STATS[1],
            class_names=self.wnids,
            augmentation="resized_crop_flip",
        )

    def examples(self, split, request):
        shape = self.info(request.image_size, request.validation_fraction).image_shape
        if split == "test":
            paths, labels = self._val_list()
        else:
            paths, labels = _tail_split(
                self._train_groups(),
                split,
                request.validation_fraction,
                request.exclude_validation,
                self.source,
            )
        return _file_examples(paths, labels, size=shape[:2], channels=3, limit=request.limit)


# IDX ------------------------------------------------------------------------------------------

_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path, mtime_ns, size):
    del mtime_ns, size  # Cache keys only: a rewritten file is read again.
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path} is not a readable gzip file ({err}); download it again.") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        magic = raw[:4].hex() if len(raw) >= 4 else f"{len(raw)} bytes"
        raise ValueError(
            f"{path} is not an IDX file (magic {magic}; expected 00000803 for images or 00000801 for "
            f"labels); check that it is the right file, uncorrupted."
        )
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its header; download it again.")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    expected = math.prod(shape) * dtype.itemsize  # Python ints: a corrupt header cannot overflow.
    actual = len(raw) - header
    if actual != expected:
        state = "truncated" if actual < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {state}: shape {shape} needs {expected} bytes of data, it has {actual}; "
            f"download it again."
        )
    array = np.frombuffer(raw, dtype, offset=header).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def _channel_stats(images):
    """Per-channel mean and std of uint8 images in [0, 1], from histograms (no float copy)."""
    means, stds = [], []
    levels = np.arange(256, dtype=np.float64) / 255.0
    flat = images.reshape(-1, images.shape[-1])
    for c in range(flat.shape[1]):
        hist = np.bincount(flat[:, c], minlength=256).astype(np.float64)
        total = hist.sum()
        mean = (hist * levels).sum() / total
        var = (hist * (levels - mean) ** 2).sum() / total
        means.append(round(float(mean), 4))
        stds.append(round(float(np.sqrt(var)), 4))
    return tuple(means), tuple(stds)


class _IdxSource:
    _PARTS = {"train": "train", "test": "t10k"}

    def __init__(self, path, label):
        self.path, self.source = path, label
        self._stats = None
        self._files("train")

    def _files(self, part):
        prefix = self._PARTS[part]
        found = []
        for kind, dims in (("images", 3), ("labels", 1)):
            names = [f"{prefix}-{kind}-idx{dims}-ubyte", f"{prefix}-{kind}.idx{dims}-ubyte"]
            candidates = [os.path.join(self.path, n + ext) for n in names for ext in (".gz", "")]
            hit = next((c for c in candidates if os.path.isfile(c)), None)
            if hit is None:
                raise FileNotFoundError(
                    f"{self.source} has no {prefix}-{kind}-idx{dims}-ubyte.gz; it needs "
                    f"train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
                    f"t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (or uncompressed)."
                )
            found.append(hit)
        return found

    def _arrays(self, part):
        images_file, labels_file = self._files(part)
        images, labels = read_idx(images_file), read_idx(labels_file)
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise ValueError(
                f"{images_file} holds {images.dtype} data of shape {images.shape}, not uint8 images "
                f"(N, H, W); check the file."
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu":
            raise ValueError(
                f"{labels_file} holds {labels.dtype} data of shape {labels.shape}, not integer labels "
                f"(N,); check the file."
            )
        if len(images) != len(labels):
            raise ValueError(
                f"{self.source}: {os.path.basename(images_file)} has {len(images)} images but "
                f"{os.path.basename(labels_file)} has {len(labels)} labels; use matching files."
            )
        if labels.size and labels.min() < 0:
            raise ValueError(f"{labels_file} has negative labels; class ids must be >= 0.")
        if images.ndim == 3:
            images = images[..., None]
        return images, labels

    def info(self, size, fraction):
        images, labels = self._arrays("train")
        if self._stats is None:
            self._stats = _channel_stats(images)
        shape = (*(size or images.shape[1:3]), images.shape[-1])
        counts = {"train": len(images), "validation": _validation_count(len(images), fraction)}
        try:
            # The test count from the header alone would need a second parser; the file is small.
            counts["test"] = len(self._arrays("test")[0])
        except FileNotFoundError:
            pass
        num_classes = int(labels.max()) + 1 if labels.size else 0
        return DatasetInfo(
            name=os.path.basename(os.path.normpath(self.path)),
            num_classes=num_classes,
            image_shape=shape,
            num_examples=counts,
            mean=self._stats[0],
            std=self._stats[1],
            class_names=tuple(str(i) for i in range(num_classes)),
            augmentation=_default_augmentation(shape),
        )

    def examples(self, split, request):
        images, labels = self._arrays("test" if split == "test" else "train")
        if split == "validation" or (split == "train" and request.exclude_validation):
            n_val = _carve(len(images), request.validation_fraction, self.source)
            part = slice(-n_val, None) if split == "validation" else slice(None, -n_val)
            images, labels = images[part], labels[part]
        images, labels = images[: request.limit], labels[: request.limit].astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        size = None if request.image_size in (None, images.shape[1:3]) else request.image_size
        if size is not None:
            channels = images.shape[-1]
            ds = ds.map(
                lambda x, y: (_fit_size(x, size, channels), y), num_parallel_calls=tf.data.AUTOTUNE
            )
        # Already in memory: a cache would only copy it, unless resizing makes it worth keeping.
        return _Examples(ds, len(images), cacheable=size is not None, shard_by_data=True)


# --------------------------------------------------------------------------------------------
# Pipeline



def _augment(images, seed, policy):
    """Random crops and flips of a float32 batch `(B, H, W, C)` in raw pixel units; same shape.

    Vectorized over the batch (one op per batch, not per image): a per-image tf.data map costs
    more than the whole rest of the pipeline on small images.
    """
    _, height, width, _ = images.shape
    batch = tf.shape(images)[0]
    crop_seed, offset_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if policy in ("crop", "crop_flip"):
        pad_h, pad_w = max(1, height // 8), max(1, width // 8)
        # Zero pixels (black) as in torchvision's RandomCrop(padding=...), not the mean.
        padded = tf.pad(images, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])
        dy = tf.random.stateless_uniform([batch], crop_seed, 0, 2 * pad_h + 1, dtype=tf.int32)
        dx = tf.random.stateless_uniform([batch], offset_seed, 0, 2 * pad_w + 1, dtype=tf.int32)
        rows = dy[:, None] + tf.range(height)[None, :]
        cols = dx[:, None] + tf.range(width)[None, :]
        images = tf.gather(tf.gather(padded, rows, axis=1, batch_dims=1), cols, axis=2, batch_dims=1)
    else:
        images = _random_resized_crop(images, crop_seed, offset_seed)
    if policy != "crop":
        flip = tf.random.stateless_uniform([batch], flip_seed) < 0.5
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
    return images


def _random_resized_crop(images, size_seed, offset_seed, attempts=10):
    """torchvision's RandomResizedCrop, batched: the first of `attempts` random boxes that fits."""
    _, height, width, _ = images.shape
    batch = tf.shape(images)[0]
    area_seed, ratio_seed = tf.unstack(tf.random.experimental.stateless_split(size_seed, 2))
    area = tf.random.stateless_uniform([batch, attempts], area_seed, *_RESIZED_CROP_AREA)
    area *= height * width
    log_ratio = tf.random.stateless_uniform(
        [batch, attempts], ratio_seed, np.log(_RESIZED_CROP_RATIO[0]), np.log(_RESIZED_CROP_RATIO[1])
    )
    box_w = tf.round(tf.sqrt(area * tf.exp(log_ratio)))
    box_h = tf.round(tf.sqrt(area / tf.exp(log_ratio)))
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), axis=1, output_type=tf.int32)
    found = tf.reduce_any(fits, axis=1)
    # No box fits in any attempt: the whole image.
    box_w = tf.where(found, tf.gather(box_w, first, batch_dims=1), float(width))
    box_h = tf.where(found, tf.gather(box_h, first, batch_dims=1), float(height))
    u = tf.random.stateless_uniform([batch, 2], offset_seed)
    top = tf.floor(u[:, 0] * (height - box_h + 1))
    left = tf.floor(u[:, 1] * (width - box_w + 1))
    # crop_and_resize samples from y1*(H-1) to y2*(H-1): pixel rows top .. top+h-1.
    boxes = tf.stack(
        [
            top / max(height - 1, 1),
            left / max(width - 1, 1),
            (top + box_h - 1) / max(height - 1, 1),
            (left + box_w - 1) / max(width - 1, 1),
        ],
        axis=1,
    )
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), (height, width), method="bilinear")


def _pipeline(
    examples, shape, *, labels, batch_size, shuffle, policy, seed, cache, drop_remainder, mean, std
):
    ds = examples.dataset
    image_bytes = int(np.prod(shape))
    if cache is None:
        size = None if examples.count is None else examples.count * image_bytes
        cache = examples.cacheable and (size is None or size <= _CACHE_LIMIT_BYTES)
    if cache:
        # Cached before shuffling and augmenting, so every epoch still gets a new order and crops.
        ds = ds.cache(os.fspath(cache) if isinstance(cache, (str, os.PathLike)) else "")
    if shuffle:
        buffer = max(_MIN_SHUFFLE_BUFFER, _SHUFFLE_BUFFER_BYTES // image_bytes)
        if examples.count is not None:
            buffer = min(buffer, max(examples.count, 1))
        ds = ds.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    if batch_size is not None:
        # uint8 batches: augmentation and normalization then run once per batch.
        ds = ds.batch(
            batch_size, drop_remainder=bool(drop_remainder), num_parallel_calls=tf.data.AUTOTUNE
        )

    scale = tf.constant([1.0 / (255.0 * s) for s in std], tf.float32)
    offset = tf.constant([-m / s for m, s in zip(mean, std)], tf.float32)
    unbatched = batch_size is None

    def finish(images, label, aug_seed=None):
        images = tf.cast(images, tf.float32)
        if policy is not None:
            images = _augment(images[None] if unbatched else images, aug_seed, policy)
            images = images[0] if unbatched else images
        images = images * scale + offset
        return (images, label) if labels else images

    if policy is not None:
        # One seed per batch from a seeded stream that changes every epoch: reproducible given
        # `seed`, and independent of how tf.data parallelizes the map.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda example, s: finish(*example, s), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        ds = ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    if examples.shard_by_data:
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        ds = ds.with_options(options)
    return ds
