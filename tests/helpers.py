"""What several test files share: small inputs they build themselves (IDX files, images, the Tiny
ImageNet layout) and the CLI's promise for bad input."""

import gzip
import json
import re
import struct
import zlib

import numpy as np
import tensorflow as tf
from PIL import Image


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
    with gzip.open(path, "wb") if compress else open(path, "wb") as f:
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


def save_image(path, array):
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def decoded(path):
    """Pixels of an image file as TF decodes them (so lossy JPEG compares exactly)."""
    return tf.io.decode_image(
        tf.io.read_file(str(path)), channels=3, expand_animations=False
    ).numpy()


def make_tiny(root, rng, wnids=("n03000003", "n01000001", "n02000002"), per_class=4, n_val=7):
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("".join(w + "\n" for w in wnids))
    train = {}
    for index, wnid in enumerate(wnids):
        folder = root / "train" / wnid / "images"
        folder.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            path = folder / f"{wnid}_{i}.JPEG"
            save_image(path, pixels(rng, (64, 64, 3)))
            train[decoded(path).tobytes()] = index
    lines, val = [], {}
    for i in range(n_val):
        wnid = wnids[int(rng.integers(len(wnids)))]
        path = root / "val" / "images" / f"val_{i}.JPEG"
        save_image(path, pixels(rng, (64, 64, 3)))
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t63\t63\n")
        val[decoded(path).tobytes()] = wnids.index(wnid)
    (root / "val" / "val_annotations.txt").write_text("".join(lines))
    return train, val


def png_with_size(path, width, height):
    """A PNG whose header claims `width` x `height` (one tiny IDAT: no decoder gets that far)."""

    def chunk(kind, body):
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def assert_one_line_exit_2(argv, pattern, capsys, out):
    """The CLI's promise for bad input: exit code 2, one line naming the problem, nothing written."""
    from faqd_tf import cli

    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (argv, err)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, (argv, err)
    assert len(err) < 1000, err[:2000]  # values in messages are shortened
    assert err.startswith("train.py: error: ")
    assert re.search(pattern, err), (argv, err)
    assert not out.exists(), f"{argv} wrote output"


def write_config(tmp_path, base, **sections):
    """Writes `base` with `sections` on top (dicts update its sections, other values replace) to a new
    config file in `tmp_path`; returns its path."""
    base = json.loads(json.dumps(base))
    for key, value in sections.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    path = tmp_path / f"config{len(list(tmp_path.glob('config*.json')))}.json"
    path.write_text(json.dumps(base))
    return str(path)
