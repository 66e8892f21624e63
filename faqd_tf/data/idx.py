"""MNIST-format IDX files (``idx:<path>``): ``train-images-idx3-ubyte.gz`` and friends."""

import functools
import math
import os

import numpy as np
import tensorflow as tf

from faqd_tf import inputs
from faqd_tf.data.base import (
    DatasetInfo,
    Examples,
    Source,
    carve,
    default_augmentation,
    fit_size,
    validation_count,
)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (gzip-compressed or not) into a NumPy array.

    Validates the magic number (two zero bytes, a type code, the number of dimensions) and that
    the data size matches the header exactly.

    Args:
        path: path of the file, e.g. ``".../train-images-idx3-ubyte.gz"``.

    Returns:
        A read-only NumPy array of the header's shape and type.

    Example (``/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz`` gives ``(10000, 28, 28)``):

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
    >>> with open(path, "wb") as f:  # magic (0, 0, type 0x08 = uint8, 1 dimension), size 3, data
    ...     _ = f.write(bytes([0, 0, 0x08, 1, 0, 0, 0, 3, 7, 1, 4]))
    >>> read_idx(path).tolist()
    [7, 1, 4]
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; check the path of the IDX file.")
    stat = os.stat(path)
    return _read_idx_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
# Class ids above this are not a classification dataset's (ImageNet-21k has 21,841 classes); the
# class names and the logits layer would be built for every id up to the largest.
MAX_CLASSES = 100_000
# Pixel histograms are counted over this many pixels at a time (np.bincount copies to int64).
_STATS_CHUNK = 2**22


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path, mtime_ns, size):
    del mtime_ns, size  # Cache keys only: a rewritten file is read again.
    with inputs.BinaryFile(path) as f:
        magic = f.read_exactly(4, "the magic number")
        if magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES or magic[3] == 0:
            raise ValueError(
                f"{path} is not an IDX file (magic {magic.tobytes().hex()}; expected 00000803 for images or "
                f"00000801 for labels); check that it is the right file, uncorrupted."
            )
        ndim = int(magic[3])
        shape = tuple(int(d) for d in f.read_exactly(4 * ndim, "the header").view(">u4"))
        dtype = np.dtype(_IDX_TYPES[int(magic[2])])
        # Python ints: a corrupt header cannot overflow. Checked against the bytes the file can
        # hold before anything of that size is allocated.
        expected = math.prod(shape) * dtype.itemsize
        raw = f.read_exactly(expected, f"shape {shape}")
        f.expect_end(f"shape {shape} needs {expected:,} bytes of data")
    array = raw.view(dtype).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def _channel_stats(images):
    """Per-channel mean and std of uint8 images in [0, 1], from histograms (no float copy)."""
    channels = images.shape[-1]
    flat = images.reshape(-1, channels)
    hist = np.zeros((channels, 256), np.float64)
    for start in range(0, len(flat), _STATS_CHUNK):
        block = flat[start : start + _STATS_CHUNK]
        for c in range(channels):
            hist[c] += np.bincount(block[:, c], minlength=256)
    levels = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for c in range(channels):
        total = hist[c].sum()
        mean = (hist[c] * levels).sum() / total
        var = (hist[c] * (levels - mean) ** 2).sum() / total
        means.append(round(float(mean), 4))
        stds.append(round(float(np.sqrt(var)), 4))
    return tuple(means), tuple(stds)


class IdxSource(Source):
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
        if labels.size and labels.max() >= MAX_CLASSES:
            at = int(np.argmax(labels))
            raise ValueError(
                f"{labels_file} has label {labels[at]} (at position {at}); class ids must be below "
                f"{MAX_CLASSES:,}; check the file."
            )
        if 0 in images.shape[1:3]:
            raise ValueError(
                f"{images_file} holds images of {images.shape[1]} x {images.shape[2]} pixels; check the file."
            )
        if part == "test" and labels.size:
            classes = self._num_classes()
            if labels.max() >= classes:
                at = int(np.argmax(labels))
                raise ValueError(
                    f"{labels_file} has label {labels[at]} (at position {at}), but the train labels have "
                    f"{classes} classes (0-{classes - 1}); use test files of the same dataset."
                )
        if images.ndim == 3:
            images = images[..., None]
        return images, labels

    def _num_classes(self):
        labels = self._arrays("train")[1]
        return int(labels.max()) + 1 if labels.size else 0

    def info(self, size, fraction):
        images, labels = self._arrays("train")
        if self._stats is None:
            self._stats = _channel_stats(images)
            if 0 in self._stats[1]:
                channel = self._stats[1].index(0)
                where = f" of channel {channel}" if images.shape[-1] > 1 else ""
                raise ValueError(
                    f"{self._files('train')[0]} has every pixel{where} {int(images[0, 0, 0, channel])} (std 0): "
                    f"nothing to learn and nothing to normalize by; check the file."
                )
        shape = (*(size or images.shape[1:3]), images.shape[-1])
        counts = {"train": len(images), "validation": validation_count(len(images), fraction)}
        try:
            # The test count from the header alone would need a second parser; the file is small.
            counts["test"] = len(self._arrays("test")[0])
        except FileNotFoundError:
            pass
        num_classes = self._num_classes()
        return DatasetInfo(
            name=os.path.basename(os.path.normpath(self.path)),
            num_classes=num_classes,
            image_shape=shape,
            num_examples=counts,
            mean=self._stats[0],
            std=self._stats[1],
            class_names=tuple(str(i) for i in range(num_classes)),
            augmentation=default_augmentation(shape),
            train_classes=int(np.count_nonzero(np.bincount(labels))) if labels.size else 0,
        )

    def examples(self, split, request):
        images, labels = self._arrays("test" if split == "test" else "train")
        if split == "validation" or (split == "train" and request.exclude_validation):
            n_val = carve(len(images), request.validation_fraction, self.source)
            part = slice(-n_val, None) if split == "validation" else slice(None, -n_val)
            images, labels = images[part], labels[part]
        images, labels = images[: request.limit], labels[: request.limit].astype(np.int32)
        ds = tf.data.Dataset.from_tensor_slices((images, labels))
        size = None if request.image_size in (None, images.shape[1:3]) else request.image_size
        if size is not None:
            channels = images.shape[-1]
            ds = ds.map(
                lambda x, y: (fit_size(x, size, channels), y), num_parallel_calls=tf.data.AUTOTUNE
            )
        # Already in memory: a cache would only copy it, unless resizing makes it worth keeping.
        return Examples(ds, len(images), cacheable=size is not None, shard_by_data=True)
