"""Image files: folders (``folder:<path>``) and the Tiny ImageNet layout (``tiny_imagenet:<path>``).

Both walk folders of image files in sorted order, carve validation off each class's last files,
and decode with TensorFlow.
"""

import functools
import os

import numpy as np
import tensorflow as tf

from faqd_tf import inputs
from faqd_tf.data.base import (
    IMAGENET_STATS,
    DatasetInfo,
    Examples,
    Source,
    default_augmentation,
    fit_size,
    validation_count,
)

IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

# File lists are put in one fixed pseudo-random order, so that `limit` takes a class-mixed subset
# and a cache in memory is already mixed, the same on every run whatever `seed` is.
_ORDER_SEED = 230210899
# Folders: the color mode is read from this many images spread over the sorted file list.
_CHANNEL_PROBES = 16
# Without `image_size`, images larger than this on a side would become the network's input size.
MAX_NATIVE_SIDE = 1024


def is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def walk_images(folder, seen=None):
    """All images under `folder`, recursively, sorted by path; hidden files and folders skipped.

    Symbolic links to folders are followed once: a link back to a folder already walked (a loop,
    or a second way to the same images) raises, naming it. `seen` maps the folders walked so far
    (device, inode) to their paths, shared between the walks of one source.
    """
    seen = {} if seen is None else seen
    seen.setdefault(_identity(folder), folder)
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in sorted(dirs) if not d.startswith(".")]
        for d in dirs:
            path = os.path.join(root, d)
            first = seen.setdefault(_identity(path), path)
            if first != path:
                raise ValueError(
                    f"{path} leads back to {first} (a symbolic link loop, or two ways to one folder); "
                    f"remove the link so that each image is read once."
                )
        found.extend(os.path.join(root, f) for f in files if is_image(f))
    return sorted(found)


def _identity(path):
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino


def check_images(paths):
    """Checks every image file's header (see `faqd_tf.inputs.check_image`) before any is decoded."""
    for path in paths:
        _header(path)


def check_native_size(path):
    """Raises if images of the size of `path`, taken as they are, would not suit a network's input."""
    _, width, height = _header(path)
    if max(width, height) > MAX_NATIVE_SIDE:
        raise ValueError(
            f"images such as {path} are {height} x {width} pixels, too large for a network's input as they are; "
            f"pass image_size (dataset.image_size in a config), e.g. [224, 224]."
        )


def _header(path):
    stat = os.stat(path)
    return _checked(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2**18)
def _checked(path, mtime_ns, size):
    del mtime_ns, size  # Cache keys only: a rewritten file is checked again.
    return inputs.check_image(path)


def _no_images_error(label, folder):
    others = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    found = f", only {len(others)} other entries such as {others[0]!r}" if others else ""
    return ValueError(
        f"{label} has no images ({', '.join(IMAGE_EXTENSIONS)}){found}; put images in it or in "
        f"one subfolder per class."
    )


def _index_folder(folder, label):
    """`(class_names, {class index: sorted paths})` of a labeled folder, `(None, {-1: ...})` if flat."""
    entries = sorted(
        (e for e in os.scandir(folder) if not e.name.startswith(".")), key=lambda e: e.name
    )
    flat = [e.path for e in entries if e.is_file() and is_image(e.name)]
    classes, seen = {}, {_identity(folder): folder}
    for entry in entries:
        if entry.is_dir():
            files = walk_images(entry.path, seen)
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
    check_images(flat or [p for files in classes.values() for p in files])
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
    n_vals = {cls: validation_count(len(files), fraction) for cls, files in groups.items()}
    if not any(n_vals.values()) or all(n == len(groups[c]) for c, n in n_vals.items()):
        raise ValueError(
            f"{label} has too few images per class to carve validation_fraction={fraction} off "
            f"each; add images or change the fraction."
        )
    paths, labels = [], []
    for cls, files in groups.items():
        n_val = n_vals[cls]
        chosen = (
            files[len(files) - n_val :] if split == "validation" else files[: len(files) - n_val]
        )
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
        return fit_size(image, size, channels), label

    ds = tf.data.Dataset.from_tensor_slices((tf.constant(paths, tf.string), labels))
    ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    return Examples(ds, len(paths), cacheable=True, shard_by_data=True)


def _probe_images(paths):
    """`(height, width)` of the first image and 1 or 3 channels: 3 if any probed image is color."""
    _, width, height = _header(paths[0])
    picks = np.unique(np.linspace(0, len(paths) - 1, min(_CHANNEL_PROBES, len(paths))).astype(int))
    channels = 1
    for i in picks:
        if _decoded_channels(paths[i]) >= 3:
            channels = 3
            break
    return (height, width), channels


def _decoded_channels(path):
    if path.lower().endswith(".gif"):
        return 3
    return int(
        tf.io.decode_image(tf.io.read_file(path), channels=0, expand_animations=False).shape[-1]
    )


class FolderSource(Source):
    _SPLIT_DIRS = {"train": ("train",), "test": ("test",), "validation": ("val", "validation")}

    def __init__(self, path, label):
        self.path, self.source = path, label
        subdirs = {e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")}
        known = {d for dirs in self._SPLIT_DIRS.values() for d in dirs}
        self.split_dirs = None
        if "train" in subdirs and subdirs <= known:
            if {"val", "validation"} <= subdirs:
                raise ValueError(f"{label} has both val/ and validation/; keep one of them.")
            if any(is_image(f) for f in os.listdir(path)):
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
            paths = sorted(p for files in groups.values() for p in files)
            self._probed = (paths[0], *_probe_images(paths))
        first, native, channels = self._probed
        if size is None:
            check_native_size(first)
        shape = (*(size or native), channels)
        n_train = sum(len(f) for f in groups.values())
        counts = {"train": n_train}
        if self.split_dirs and "validation" in self.split_dirs:
            counts["validation"] = sum(len(f) for f in self._index("validation")[1].values())
        else:
            counts["validation"] = sum(validation_count(len(f), fraction) for f in groups.values())
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
            augmentation=default_augmentation(shape),
            train_classes=None if names is None else len(groups),  # a class is a folder with images
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
        return _file_examples(
            paths, labels, size=shape[:2], channels=shape[-1], limit=request.limit
        )


class TinyImageNetSource(Source):
    def __init__(self, path, label):
        self.path, self.source = path, label
        layout = "point it at the tiny-imagenet-200 folder (wnids.txt, train/, val/)"
        wnids_file = os.path.join(path, "wnids.txt")
        if not os.path.isfile(wnids_file):
            raise FileNotFoundError(f"{label} has no wnids.txt; {layout}.")
        text = inputs.read_text(wnids_file, "the wnid list")
        self.wnids = tuple(line.strip() for line in text.splitlines() if line.strip())
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
            groups, seen = {}, {}
            for i, wnid in enumerate(self.wnids):
                folder = os.path.join(self.path, "train", wnid)
                files = walk_images(folder, seen) if os.path.isdir(folder) else []
                if not files:
                    raise ValueError(
                        f"{self.source}/train/{wnid} (listed in wnids.txt) has no images; restore "
                        f"it or remove the wnid from wnids.txt."
                    )
                groups[i] = files
            check_images([p for files in groups.values() for p in files])
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
            present = (
                {f for f in os.listdir(images) if is_image(f)} if os.path.isdir(images) else set()
            )
            paths, labels = [], []
            text = inputs.read_text(annotations, "the annotations", limit=64 * 2**20)
            for number, line in enumerate(text.splitlines(), 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) < 2 or fields[1] not in index:
                    raise ValueError(
                        f"{annotations} line {number} names no wnid of wnids.txt "
                        f"({inputs.shorten(repr(line.strip()))}); restore the official file."
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
            check_images(paths)
            self._val = (paths, labels)
        return self._val

    def info(self, size, fraction):
        groups = self._train_groups()
        if self._native is None:
            self._native = _probe_images(groups[0][:1])[0]
        if size is None:
            check_native_size(groups[0][0])
        shape = (*(size or self._native), 3)
        counts = {
            "train": sum(len(f) for f in groups.values()),
            "validation": sum(validation_count(len(f), fraction) for f in groups.values()),
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
            train_classes=len(groups),  # every wnid has images (checked)
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
