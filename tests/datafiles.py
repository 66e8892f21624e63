"""Small data files the tests build themselves: IDX files and random pixels."""

import gzip

import numpy as np


def pixels(rng, shape):
    # Never all-zero: 0 is excluded and the values vary.
    return rng.integers(1, 256, size=shape, dtype=np.uint8)


def idx_bytes(array):
    codes = {np.dtype("uint8"): 0x08, np.dtype("int32"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path, array, compress=True):
    raw = idx_bytes(array)
    with (gzip.open(path, "wb") if compress else open(path, "wb")) as f:
        f.write(raw)


def make_idx(folder, rng, n_train=40, n_test=12, hw=(6, 5), classes=4):
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train": (pixels(rng, (n_train, *hw)), rng.integers(0, classes, n_train).astype(np.uint8)),
        "t10k": (pixels(rng, (n_test, *hw)), rng.integers(0, classes, n_test).astype(np.uint8)),
    }
    arrays["train"][1][0] = classes - 1  # The class count comes from the largest label.
    for prefix, (images, labels) in arrays.items():
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return arrays
