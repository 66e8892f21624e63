"""Tests of faqd_tf.data: TFDS (mocked), image folders, Tiny ImageNet layout, IDX files."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from faqd_tf import data
from tests.helpers import decoded, idx_bytes, make_idx, make_tiny, pixels, save_image, write_idx

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ------------------------------------------------------------------------------------------------
# Helpers


def _collect(ds):
    """All of a dataset, concatenated over batches: images, and labels when present."""
    images, labels = [], []
    for element in ds:
        if isinstance(element, tuple):
            images.append(element[0].numpy())
            labels.append(element[1].numpy())
        else:
            images.append(element.numpy())
    return np.concatenate(images), (np.concatenate(labels) if labels else None)


def _normalize(raw, mean, std):
    """Independent reference: pixels / 255, minus the mean, over the std, per channel."""
    raw = raw.astype(np.float64)
    if raw.ndim == 3:
        raw = raw[..., None]
    return ((raw / 255.0 - np.asarray(mean)) / np.asarray(std)).astype(np.float32)


def _denormalize(images, info):
    pixels = (images * np.asarray(info.std) + np.asarray(info.mean)) * 255.0
    return np.rint(pixels).astype(np.uint8)


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------------
# IDX


def test_read_idx_roundtrip(tmp_path, rng):
    images = pixels(rng, (7, 4, 3))
    counts = rng.integers(-1000, 1000, size=(5,)).astype(np.int32)
    write_idx(tmp_path / "a-idx3-ubyte.gz", images)
    write_idx(tmp_path / "b-idx1-ubyte", counts, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a-idx3-ubyte.gz"), images)
    back = data.read_idx(tmp_path / "b-idx1-ubyte")
    np.testing.assert_array_equal(back, counts)
    assert back.dtype == np.int32


def test_idx_info_and_exact_read(tmp_path, rng):
    arrays = make_idx(tmp_path / "digits", rng)
    source = f"idx:{tmp_path / 'digits'}"
    info = data.dataset_info(source)
    train_raw = arrays["train"][0]
    assert info.name == "digits"
    assert info.image_shape == (6, 5, 1)
    assert info.num_classes == 4
    assert info.num_examples == {"train": 40, "validation": 4, "test": 12}
    assert info.augmentation == "crop"
    np.testing.assert_allclose(info.mean, [np.round(train_raw.mean() / 255.0, 4)], atol=1e-9)
    np.testing.assert_allclose(info.std, [np.round((train_raw / 255.0).std(), 4)], atol=1e-9)

    for split, prefix in (("test", "t10k"), ("train", "train")):
        images, labels = _collect(
            data.load(source, split, batch_size=16, shuffle=False, augment=False)
        )
        raw_images, raw_labels = arrays[prefix]
        assert images.dtype == np.float32 and labels.dtype == np.int32
        np.testing.assert_allclose(images, _normalize(raw_images, info.mean, info.std), atol=1e-5)
        np.testing.assert_array_equal(labels, raw_labels)


def test_idx_validation_tail(tmp_path, rng):
    arrays = make_idx(tmp_path / "d", rng, n_train=40)
    source, raw = f"idx:{tmp_path / 'd'}", arrays["train"][0]
    info = data.dataset_info(source)

    def images(split, **kwargs):
        ds = data.load(source, split, labels=False, shuffle=False, augment=False, **kwargs)
        return _collect(ds)[0]

    expected = _normalize(raw, info.mean, info.std)
    np.testing.assert_allclose(images("val", validation_fraction=0.25), expected[30:], atol=1e-5)
    np.testing.assert_allclose(images("train", validation_fraction=0.25), expected, atol=1e-5)
    held_out = images("train", validation_fraction=0.25, exclude_validation=True)
    np.testing.assert_allclose(held_out, expected[:30], atol=1e-5)
    assert len(images("train", limit=7)) == 7
    # Relative paths start at data_dir.
    relative = data.load("idx:d", "val", data_dir=tmp_path, labels=False, shuffle=False)
    np.testing.assert_allclose(_collect(relative)[0], expected[36:], atol=1e-5)


def _corrupt(kind, folder, rng):
    arrays = make_idx(folder, rng)
    images_file = folder / "train-images-idx3-ubyte.gz"
    raw = idx_bytes(arrays["train"][0])
    if kind == "magic":
        with gzip.open(images_file, "wb") as f:
            f.write(b"\x12\x34\x08\x03" + raw[4:])
    elif kind == "truncated":
        with gzip.open(images_file, "wb") as f:
            f.write(raw[:-10])
    elif kind == "extra":
        with gzip.open(images_file, "wb") as f:
            f.write(raw + b"\x01\x02")
    elif kind == "gzip":
        blob = images_file.read_bytes()
        images_file.write_bytes(blob[: len(blob) // 2])
    elif kind == "count":
        write_idx(folder / "train-labels-idx1-ubyte.gz", arrays["train"][1][:-1])
    elif kind == "missing":
        os.remove(folder / "train-labels-idx1-ubyte.gz")
    return images_file


@pytest.mark.parametrize(
    "kind, error, words",
    [
        ("magic", ValueError, "not an IDX file"),
        ("truncated", ValueError, "truncated"),
        ("extra", ValueError, "longer than its header"),
        ("gzip", ValueError, "gzip"),
        ("count", ValueError, "40 images but"),
        ("missing", FileNotFoundError, "train-labels-idx1-ubyte.gz"),
    ],
)
def test_idx_malformed(tmp_path, rng, kind, error, words):
    _corrupt(kind, tmp_path / kind, rng)
    with pytest.raises(error) as excinfo:
        data.load(f"idx:{tmp_path / kind}", "train")
    assert words in _one_line(excinfo)


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR), reason="needs Debian's dataset-fashion-mnist"
)
def test_real_fashion_mnist():
    source = f"idx:{FASHION_MNIST_DIR}"
    info = data.dataset_info(source)
    assert info.image_shape == (28, 28, 1)
    assert info.num_classes == 10
    assert info.num_examples == {"train": 60000, "validation": 6000, "test": 10000}
    # The train-file statistics, rounded, are the published Fashion-MNIST constants.
    assert (info.mean, info.std) == data.FASHION_MNIST_STATS
    images, labels = _collect(data.load(source, "test", batch_size=100, limit=300))
    assert images.shape == (300, 28, 28, 1) and images.dtype == np.float32
    assert labels.min() >= 0 and labels.max() <= 9 and len(np.unique(labels)) > 5
    raw = data.read_idx(os.path.join(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz"))[:300]
    np.testing.assert_allclose(images, _normalize(raw, info.mean, info.std), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Augmentation, seeds, distribution


@pytest.mark.parametrize("policy", data.AUGMENTATIONS)
def test_augmentation_keeps_shape_and_range(tmp_path, rng, policy):
    make_idx(tmp_path / "d", rng, n_train=32, hw=(16, 12))
    source = f"idx:{tmp_path / 'd'}"
    info = data.dataset_info(source)
    plain = _collect(data.load(source, "train", labels=False, shuffle=False, augment=False))[0]
    aug = _collect(data.load(source, "train", labels=False, shuffle=False, augment=policy, seed=3))[
        0
    ]
    assert aug.shape == plain.shape == (32, 16, 12, 1)
    low, high = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
    assert aug.min() >= low - 1e-4 and aug.max() <= high + 1e-4
    assert not np.allclose(aug, plain)
    again = _collect(
        data.load(source, "train", labels=False, shuffle=False, augment=policy, seed=3)
    )[0]
    np.testing.assert_array_equal(aug, again)


def test_pad_crop_shifts_whole_images(tmp_path, rng):
    # Each augmented image is its original shifted by at most 1/8 of a side, zero-filled.
    arrays = make_idx(tmp_path / "d", rng, n_train=16, hw=(16, 16))
    source = f"idx:{tmp_path / 'd'}"
    info = data.dataset_info(source)
    aug = _collect(data.load(source, "train", labels=False, shuffle=False, augment="crop", seed=5))[
        0
    ]
    pixels = _denormalize(aug, info)[..., 0]
    for original, shifted in zip(arrays["train"][0], pixels):
        padded = np.pad(original, 2)
        windows = [padded[dy : dy + 16, dx : dx + 16] for dy in range(5) for dx in range(5)]
        assert any(np.array_equal(window, shifted) for window in windows)


def test_shuffle_is_seeded_and_changes_every_epoch(tmp_path, rng):
    make_idx(tmp_path / "d", rng, n_train=40)
    source = f"idx:{tmp_path / 'd'}"

    def shuffled():
        return data.load(source, "train", labels=False, augment=False, seed=11, batch_size=None)

    first = shuffled()
    epoch1, epoch2 = _collect(first)[0], _collect(first)[0]
    np.testing.assert_array_equal(epoch1, _collect(shuffled())[0])
    assert not np.array_equal(epoch1, epoch2)
    # A permutation of the same examples.
    rows1, rows2 = epoch1.reshape(40, -1), epoch2.reshape(40, -1)
    np.testing.assert_array_equal(rows1[np.lexsort(rows1.T)], rows2[np.lexsort(rows2.T)])


def test_numbered_examples_keep_their_number_every_epoch(tmp_path, rng):
    arrays = make_idx(tmp_path / "d", rng, n_train=40)
    info = data.dataset_info(f"idx:{tmp_path / 'd'}")
    ds = data.load(
        f"idx:{tmp_path / 'd'}",
        "train",
        labels=True,
        augment=False,
        seed=3,
        batch_size=16,
        index=True,
    )
    orders = []
    for _ in range(2):
        seen = []
        for x, y in ds:
            assert sorted(x) == ["images", "index"] and x["index"].dtype == tf.int64
            for i, image, label in zip(x["index"].numpy(), x["images"].numpy(), y.numpy()):
                # Number i is the i-th example of the file, whatever the shuffle.
                np.testing.assert_array_equal(
                    _denormalize(image, info)[..., 0], arrays["train"][0][i]
                )
                assert label == arrays["train"][1][i]
                seen.append(int(i))
        assert sorted(seen) == list(range(40))
        orders.append(seen)
    assert orders[0] != orders[1]  # still shuffled every epoch


def test_distribute_dataset(tmp_path, rng, mirrored_strategy):
    make_idx(tmp_path / "d", rng, n_train=40)
    ds = data.load(f"idx:{tmp_path / 'd'}", "train", batch_size=8, seed=1)
    dist = mirrored_strategy.experimental_distribute_dataset(ds)
    images, labels = next(iter(dist))
    per_replica = mirrored_strategy.experimental_local_results(images)
    assert len(per_replica) == 2
    assert sum(int(x.shape[0]) for x in per_replica) == 8
    assert per_replica[0].shape[1:] == (6, 5, 1)


# ------------------------------------------------------------------------------------------------
# TFDS (mocked: no network here)


def _fake_tfds(rng, n, shape, classes):
    """A TFDS `_as_dataset` replacement serving fresh random examples, honoring split slicing."""
    import tensorflow_datasets as tfds

    raw = {
        split: (pixels(rng, (n, *shape)), rng.integers(0, classes, n).astype(np.int64))
        for split in ("train", "test")
    }

    def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False):
        instruction = tfds.core.ReadInstruction.from_spec(split)
        infos = {
            s: tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
            for s in raw
        }
        (absolute,) = instruction.to_absolute(infos)
        images, labels = raw[absolute.splitname]
        part = slice(absolute.from_, absolute.to)
        return tf.data.Dataset.from_tensor_slices(
            {"id": np.array([b"x"] * n)[part], "image": images[part], "label": labels[part]}
        )

    return raw, as_dataset


@pytest.fixture
def tfds_online(monkeypatch):
    """Mocked TFDS data needs no network: the check for it answers yes."""
    from faqd_tf.data import tfds

    monkeypatch.setattr(tfds, "online", lambda: True)


@pytest.mark.usefixtures("tfds_online")
@pytest.mark.parametrize(
    "name, shape, stats",
    [
        ("cifar10", (32, 32, 3), data.CIFAR10_STATS),
        ("fashion_mnist", (28, 28, 1), data.FASHION_MNIST_STATS),
    ],
)
def test_tfds(rng, name, shape, stats):
    import tensorflow_datasets as tfds

    n = 30
    raw, as_dataset = _fake_tfds(rng, n, shape, classes=10)
    source = f"tfds:{name}"
    with tfds.testing.mock_data(num_examples=n, as_dataset_fn=as_dataset):
        info = data.dataset_info(source)
        assert info.image_shape == shape and info.num_classes == 10
        assert (info.mean, info.std) == stats
        assert info.augmentation == "crop_flip"
        assert len(info.class_names) == 10

        ds = data.load(source, "test", batch_size=8)
        assert ds.element_spec[0].shape.as_list() == [None, *shape]
        assert ds.element_spec[0].dtype == tf.float32 and ds.element_spec[1].dtype == tf.int32
        images, labels = _collect(ds)
        np.testing.assert_allclose(images, _normalize(raw["test"][0], *stats), atol=1e-5)
        np.testing.assert_array_equal(labels, raw["test"][1])

        unlabeled = data.load(source, "train", labels=False, limit=10, batch_size=4, seed=0)
        assert isinstance(unlabeled.element_spec, tf.TensorSpec)
        images = _collect(unlabeled)[0]
        assert images.shape == (10, *shape)  # limit, shuffled, augmented (crop + flip by default)
        low = (0 - np.asarray(stats[0])) / np.asarray(stats[1])
        assert np.all(images >= low - 1e-4)

        # No validation split of its own: the last 10% of train, left out of train on request.
        val = _collect(data.load(source, "validation", batch_size=8))[0]
        np.testing.assert_allclose(val, _normalize(raw["train"][0][-3:], *stats), atol=1e-5)
        rest = data.load(source, "train", shuffle=False, augment=False, exclude_validation=True)
        expected = _normalize(raw["train"][0][:-3], *stats)
        np.testing.assert_allclose(_collect(rest)[0], expected, atol=1e-5)

        resized = data.load(source, "test", image_size=(20, 24), batch_size=8)
        assert resized.element_spec[0].shape.as_list() == [None, 20, 24, shape[-1]]


def test_tfds_errors():
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(ValueError) as excinfo:
            data.dataset_info("tfds:no_such_dataset_xyz")
        assert "not a TFDS dataset" in _one_line(excinfo)
        with pytest.raises(ValueError) as excinfo:
            data.dataset_info("tfds:imdb_reviews")
        assert "no 'image'" in _one_line(excinfo)


# ------------------------------------------------------------------------------------------------
# Image folders


def test_labeled_folder(tmp_path, rng):
    root = tmp_path / "pets"
    expected = {}
    for index, (cls, count) in enumerate([("cat", 4), ("dog", 5), ("emu", 6)]):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            path = root / cls / f"{i:02d}.png"
            save_image(path, pixels(rng, (12, 10, 3)))
            expected[decoded(path).tobytes()] = index
    for name in ("extra.jpg", "extra.gif"):  # lossy or palette formats: compared as TF decodes them
        save_image(root / "emu" / name, pixels(rng, (12, 10, 3)))
        expected[decoded(root / "emu" / name).tobytes()] = 2
    (root / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()  # A subfolder without images is not a class.

    source = f"folder:{root}"
    info = data.dataset_info(source)
    assert info.class_names == ("cat", "dog", "emu") and info.num_classes == 3
    assert info.image_shape == (12, 10, 3)
    # Validation takes round(0.1 * n) files of each class, halves up: 0 of 4, 1 of 5, 1 of 7.
    assert info.num_examples == {"train": 17, "validation": 2}
    assert (info.mean, info.std) == ((0.5,) * 3, (0.5,) * 3)

    images, labels = _collect(
        data.load(source, "train", batch_size=5, shuffle=False, augment=False)
    )
    assert images.shape == (17, 12, 10, 3) and labels.dtype == np.int32
    np.testing.assert_allclose(images.min(), -1, atol=0.01)  # (x / 255 - 0.5) / 0.5 spans [-1, 1]
    for image, label in zip(_denormalize(images, info), labels):
        assert expected[image.tobytes()] == label
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 5 + [2] * 8

    # `limit` takes a fixed, class-mixed subset (not the first class only).
    _, limited = _collect(data.load(source, "train", limit=8, shuffle=False))
    assert len(limited) == 8 and len(set(limited.tolist())) > 1

    only_images = data.load(source, "train", labels=False, batch_size=4)
    assert isinstance(only_images.element_spec, tf.TensorSpec)
    assert sum(int(x.shape[0]) for x in only_images) == 17

    # Validation: the last round(0.25 * n) files of each class, by name.
    val_images, val_labels = _collect(data.load(source, "val", validation_fraction=0.25))
    assert sorted(val_labels.tolist()) == [0, 1, 2, 2]  # 1 of 4, 1 of 5, 2 of 8
    tails = {decoded(root / "cat" / "03.png").tobytes(), decoded(root / "dog" / "04.png").tobytes()}
    assert tails <= {x.tobytes() for x in _denormalize(val_images, info)}
    _, rest = _collect(
        data.load(source, "train", validation_fraction=0.25, exclude_validation=True)
    )
    assert len(rest) == 13


def test_unlabeled_flat_folder_grayscale(tmp_path, rng):
    root = tmp_path / "unlabeled"
    root.mkdir()
    raw = {}
    for i in range(7):
        image = pixels(rng, (9, 11, 1))
        save_image(root / f"img{i}.png", image)
        raw[image.tobytes()] = image
    info = data.dataset_info(f"folder:{root}")
    assert info.num_classes is None and info.class_names is None
    assert info.image_shape == (9, 11, 1) and info.augmentation == "crop"

    images = _collect(data.load(f"folder:{root}", labels=False, shuffle=False, augment=False))[0]
    assert images.shape == (7, 9, 11, 1)
    for image in _denormalize(images, info):
        assert image.tobytes() in raw  # gray PNGs come back exact
    expected = _normalize(np.stack(list(raw.values())), (0.5,), (0.5,))
    np.testing.assert_allclose(np.sort(images.ravel()), np.sort(expected.ravel()), atol=1e-5)

    with pytest.raises(ValueError) as excinfo:
        data.load(f"folder:{root}", labels=True)
    assert "labels=False" in _one_line(excinfo)
    with pytest.raises(ValueError) as excinfo:
        data.load(f"folder:{root}", "test", labels=False)
    assert "no test split" in _one_line(excinfo)


def test_folder_resizing(tmp_path, rng):
    root = tmp_path / "sizes"
    root.mkdir()
    save_image(root / "a.png", pixels(rng, (8, 6, 3)))
    save_image(root / "b.png", pixels(rng, (20, 30, 3)))
    save_image(root / "c.bmp", pixels(rng, (5, 5, 3)))
    cached = data.load(f"folder:{root}", labels=False, augment=False, cache=str(tmp_path / "cache"))
    images = _collect(cached)[0]
    assert images.shape == (3, 8, 6, 3)  # the first image's size
    np.testing.assert_array_equal(np.sort(_collect(cached)[0].ravel()), np.sort(images.ravel()))
    assert any(name.startswith("cache") for name in os.listdir(tmp_path))
    resized = data.load(f"folder:{root}", labels=False, image_size=16, augment="resized_crop_flip")
    assert _collect(resized)[0].shape == (3, 16, 16, 3)


def test_folder_split_layout(tmp_path, rng):
    root = tmp_path / "split"
    for split, classes in (("train", ("a", "b", "c")), ("test", ("b", "c"))):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                save_image(root / split / cls / f"{i}.png", pixels(rng, (6, 6, 3)))
    info = data.dataset_info(f"folder:{root}")
    assert info.class_names == ("a", "b", "c")
    assert info.num_examples["test"] == 6
    _, labels = _collect(data.load(f"folder:{root}", "test"))
    assert sorted(labels.tolist()) == [1, 1, 1, 2, 2, 2]  # train's class order


@pytest.mark.parametrize(
    "layout, error, words",
    [
        ("empty", ValueError, "has no images"),
        ("text_only", ValueError, "other entries such as 'readme.txt'"),
        ("missing", FileNotFoundError, "does not exist"),
        ("mixed", ValueError, "both directly in it and in subfolders"),
    ],
)
def test_folder_errors(tmp_path, rng, layout, error, words):
    root = tmp_path / "x"
    if layout != "missing":
        root.mkdir()
    if layout == "text_only":
        (root / "readme.txt").write_text("hello")
    if layout == "mixed":
        save_image(root / "top.png", pixels(rng, (4, 4, 3)))
        (root / "cls").mkdir()
        save_image(root / "cls" / "in.png", pixels(rng, (4, 4, 3)))
    with pytest.raises(error) as excinfo:
        data.load(f"folder:{root}", labels=False)
    message = _one_line(excinfo)
    assert words in message and str(root) in message


@pytest.mark.parametrize(
    "source, words",
    [("cifar10", "has no kind"), ("s3:bucket/x", "unknown kind"), ("folder:", "names nothing")],
)
def test_bad_sources(source, words):
    with pytest.raises(ValueError) as excinfo:
        data.load(source)
    assert words in _one_line(excinfo)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"split": "dev"}, "split='dev'"),
        ({"image_size": (0, 4)}, "image_size"),
        ({"augment": "mixup"}, "augment='mixup'"),
        ({"batch_size": 0}, "batch_size"),
        ({"limit": -1}, "limit"),
        ({"validation_fraction": 1.5}, "validation_fraction"),
        ({"mean": (0.1, 0.2)}, "1 channel(s)"),
    ],
)
def test_bad_arguments(tmp_path, rng, kwargs, words):
    make_idx(tmp_path / "d", rng)
    with pytest.raises(ValueError) as excinfo:
        data.load(f"idx:{tmp_path / 'd'}", **kwargs)
    assert words in _one_line(excinfo)


# ------------------------------------------------------------------------------------------------
# Tiny ImageNet layout


def test_tiny_imagenet(tmp_path, rng):
    root = tmp_path / "tiny-imagenet-200"
    train, val = make_tiny(root, rng)
    source = f"tiny_imagenet:{root}"
    info = data.dataset_info(source)
    assert info.class_names == ("n03000003", "n01000001", "n02000002")  # wnids.txt order
    assert info.image_shape == (64, 64, 3) and info.num_classes == 3
    assert (info.mean, info.std) == data.IMAGENET_STATS
    assert info.num_examples == {"train": 12, "validation": 0, "test": 7}
    assert info.augmentation == "resized_crop_flip"

    # The official val/ images, labeled by val_annotations.txt, are the test split.
    images, labels = _collect(data.load(source, "test", batch_size=4))
    assert images.shape == (7, 64, 64, 3)
    assert [val[x.tobytes()] for x in _denormalize(images, info)] == labels.tolist()

    images, labels = _collect(data.load(source, "train", shuffle=False, augment=False))
    assert [train[x.tobytes()] for x in _denormalize(images, info)] == labels.tolist()
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4

    _, val_labels = _collect(data.load(source, "validation", validation_fraction=0.25))
    assert sorted(val_labels.tolist()) == [0, 1, 2]
    augmented = data.load(source, "train", labels=False, image_size=32, seed=2)
    assert _collect(augmented)[0].shape == (12, 32, 32, 3)


def test_tiny_imagenet_bad_annotation(tmp_path, rng):
    root = tmp_path / "tiny"
    make_tiny(root, rng)
    with open(root / "val" / "val_annotations.txt", "a") as f:
        f.write("val_0.JPEG\tn09999999\t0\t0\t63\t63\n")
    with pytest.raises(ValueError) as excinfo:
        data.load(f"tiny_imagenet:{root}", "test")
    assert "names no wnid" in _one_line(excinfo)
    os.remove(root / "wnids.txt")
    with pytest.raises(FileNotFoundError) as excinfo:
        data.dataset_info(f"tiny_imagenet:{root}")
    assert "wnids.txt" in _one_line(excinfo)
