"""TFDS image classification datasets (``tfds:<name>``), downloaded and prepared on first use."""

import os
import socket
import threading

import tensorflow as tf

from faqd_tf import inputs
from faqd_tf.data.base import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    FASHION_MNIST_STATS,
    IMAGENET_STATS,
    MNIST_STATS,
    DatasetInfo,
    Examples,
    Source,
    SourceUnavailableError,
    carve,
    default_augmentation,
    fit_size,
    validation_count,
)

# TFDS fetches prepared datasets from its Cloud Storage bucket and most sources from Google
# storage too. Offline, its downloads retry for minutes before they fail; one connection attempt
# tells at once.
_STORAGE = ("storage.googleapis.com", 443)
_PROBE_SECONDS = 5.0


def online():
    """Whether TFDS's storage host answers a TCP connection within a few seconds (True behind a proxy)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy knows; TFDS's requests go through it
    answer = []

    def connect():
        try:
            socket.create_connection(_STORAGE, timeout=_PROBE_SECONDS).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    # A thread, because name resolution takes no timeout.
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(_PROBE_SECONDS + 1)
    return answer == [True]


def known_stats(name):
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


class TfdsSource(Source):
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
        if not isinstance(image, tfds.features.Image) or not isinstance(
            label, tfds.features.ClassLabel
        ):
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
        stats, augmentation = known_stats(self.name)
        stats = stats or ((0.5,) * channels, (0.5,) * channels)
        counts = self._splits()
        if "train" in counts and "validation" not in counts:
            counts["validation"] = validation_count(counts["train"], fraction)
        return DatasetInfo(
            name=self.name,
            num_classes=self.num_classes,
            image_shape=shape,
            num_examples=counts,
            mean=stats[0],
            std=stats[1],
            class_names=self.class_names,
            augmentation=augmentation or default_augmentation(shape),
        )

    def _prepare(self):
        if self._prepared:
            return
        if not self.builder.is_prepared() and not online():
            raise SourceUnavailableError(
                f"{self.source} is not prepared in {self.builder.data_dir} and this machine cannot reach "
                f"{_STORAGE[0]} to download it; connect once to the internet or pass the data_dir that holds it."
            )
        try:
            self.builder.download_and_prepare()
        except ImportError as err:
            # TFDS imports some dataset-specific dependencies only when it generates the data.
            raise SourceUnavailableError(
                f"{self.source} needs the Python module {err.name!r} to download and prepare the "
                f"data; install it (pip install {err.name})."
            ) from err
        except Exception as err:  # Download and generation errors come in many types.
            reason = inputs.first_line(err, 200)
            raise SourceUnavailableError(
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
            n_val = carve(counts["train"], fraction, self.source)
            if split == "validation":
                return f"train[-{n_val}:]", n_val
            return f"train[:-{n_val}]", counts["train"] - n_val
        percent = max(1, int(round(fraction * 100)))
        return (f"train[-{percent}%:]" if split == "validation" else f"train[:-{percent}%]"), None

    def examples(self, split, request):
        import tensorflow_datasets as tfds

        shape = self.info(request.image_size, request.validation_fraction).image_shape
        self._prepare()
        spec, count = self._split_spec(
            split, request.validation_fraction, request.exclude_validation
        )
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
            image = fit_size(example["image"], size, channels)
            return image, tf.cast(example["label"], tf.int32)

        ds = ds.map(select, num_parallel_calls=tf.data.AUTOTUNE)
        # TFDS reads TFRecord shards, which tf.data can split between workers by file (AUTO);
        # not with `limit`, which would then take `limit` examples on every worker.
        return Examples(ds, count, cacheable=True, shard_by_data=request.limit is not None)
