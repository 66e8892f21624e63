"""faqd_tf.inputs: bounded reads of users' files, checked against independently built files."""

import gzip
import os
import zlib

import numpy as np
import pytest
from PIL import Image

from faqd_tf import inputs
from tests.helpers import png_with_size


def _one_line(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def test_inflate_round_trip_and_its_limit(rng):
    raw = rng.integers(0, 4, size=5000, dtype=np.uint8).tobytes()  # compressible, not constant
    packed = zlib.compress(raw)
    assert inputs.inflate(packed, len(raw), "m") == raw
    with pytest.raises(ValueError) as excinfo:
        inputs.inflate(packed, len(raw) - 1, "m")
    assert "inflates to more than 4,999 bytes" in _one_line(excinfo)
    with pytest.raises(ValueError, match="truncated"):
        inputs.inflate(packed[:-20], len(raw), "m")
    with pytest.raises(ValueError, match="not valid compressed data"):
        inputs.inflate(b"not zlib at all", 100, "m")
    with pytest.raises(ValueError, match="has data after its compressed stream"):
        inputs.inflate(packed + b"x", len(raw), "m")


def test_a_bomb_is_refused_without_inflating_it():
    bomb = zlib.compress(b"\0" * (64 * 2**20))  # 64 MiB of zeros in 65 KB
    assert len(bomb) < 2**17
    with pytest.raises(ValueError, match="inflates to more than 1,000 bytes"):
        inputs.inflate(bomb, 1000, "manifest")


def test_binary_file_reads_exactly_and_checks_the_end(tmp_path, rng):
    raw = rng.integers(0, 256, size=3 * 2**20 + 17, dtype=np.uint8)
    for name, opener in (("x.gz", gzip.open), ("x.bin", open)):
        path = tmp_path / name
        with opener(path, "wb") as f:
            f.write(raw.tobytes() + b"tail")
        with inputs.BinaryFile(path) as f:
            np.testing.assert_array_equal(f.read_exactly(len(raw)), raw)
            with pytest.raises(ValueError, match="longer than its header says"):
                f.expect_end("x")
        with inputs.BinaryFile(path) as f:
            f.read_exactly(len(raw) + 4)
            f.expect_end("x")
        with inputs.BinaryFile(path) as f, pytest.raises(ValueError) as excinfo:
            f.read_exactly(len(raw) + 5, "the images")
        assert "is truncated: the images needs" in _one_line(excinfo)


def test_binary_file_refuses_declared_sizes_beyond_the_bytes_present(tmp_path):
    plain, packed = tmp_path / "x.bin", tmp_path / "x.gz"
    plain.write_bytes(b"\1" * 1000)
    with gzip.open(packed, "wb") as f:
        f.write(b"\1" * 1000)
    with (
        inputs.BinaryFile(plain) as f,
        pytest.raises(ValueError, match="needs 1,001 bytes, it holds 1,000"),
    ):
        f.read_exactly(1001)
    # 2**40 bytes cannot come out of a few dozen compressed ones: refused before any allocation.
    with (
        inputs.BinaryFile(packed) as f,
        pytest.raises(ValueError, match=r"declares 1,024.0 GiB of data, more than its"),
    ):
        f.read_exactly(2**40)
    assert inputs.inflation_limit(10) == inputs.INFLATION_FLOOR
    assert inputs.inflation_limit(10**7) == inputs.MAX_INFLATION * 10**7


def test_damaged_gzip_is_one_line(tmp_path):
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(os.urandom(10_000))
    path.write_bytes(path.read_bytes()[:5000])
    with inputs.BinaryFile(path) as f, pytest.raises(ValueError) as excinfo:
        f.read_exactly(10_000)
    assert "is not a readable gzip file" in _one_line(excinfo)


def test_read_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffline one\nzwei: \u00fc\n".encode("utf-8"))
    assert inputs.read_text(path, "the list") == "line one\nzwei: \u00fc\n"  # the BOM goes
    path.write_bytes(b"ok\nok\nbad \xff here\n")
    with pytest.raises(ValueError) as excinfo:
        inputs.read_text(path, "the list")
    assert f"the list {path} is not UTF-8 text (byte 0xff on line 3)" in _one_line(excinfo)
    with pytest.raises(ValueError, match=r"is 17 bytes, more than the 10 bytes it may be"):
        inputs.read_text(path, "the list", limit=10)


def test_loads_json_depth_and_long_integers():
    deepest = "[" * inputs.MAX_JSON_DEPTH + "]" * inputs.MAX_JSON_DEPTH
    assert inputs.loads_json(deepest, "c") == eval(deepest)
    with pytest.raises(ValueError, match="deeper than 32 levels"):
        inputs.loads_json("[" + deepest + "]", "c")
    with pytest.raises(ValueError, match="deeper than 32 levels"):
        inputs.loads_json('{"a": ' * 100_000, "c")  # deeper than Python's parser goes
    value = inputs.loads_json('{"n": -' + "7" * 31 + ', "m": ' + "9" * 30 + "}", "c")
    assert (
        isinstance(value["n"], inputs.LongInteger)
        and repr(value["n"]) == "<an integer of 31 digits>"
    )
    assert value["m"] == int("9" * 30)


def test_shorten_and_describe():
    assert inputs.shorten("abc") == "abc"
    assert inputs.shorten("x" * 81) == "x" * 60 + "..." + "x" * 20 + " (81 characters)"
    path = "/" + "d" * 200 + "/missing.json"  # a long path keeps its file name
    assert inputs.shorten(path, 40) == "/" + "d" * 29 + "...ssing.json (214 characters)"
    assert inputs.describe({"a": [1, None]}) == '{"a": [1, null]}'
    assert inputs.describe("y" * 10**6).endswith("(1,000,002 characters)")


def test_check_output_dir(tmp_path):
    target = tmp_path / "a" / "b"
    assert inputs.check_output_dir(target) == str(target)
    assert not (tmp_path / "a").exists() and os.listdir(tmp_path) == []  # the probe leaves nothing
    afile = tmp_path / "file"
    afile.write_text("x")
    cases = [
        (afile, f"output_dir {afile} is a file, not a folder"),
        (afile / "run", f"output_dir {afile / 'run'} lies under {afile}, which is a file"),
        ("", "output_dir is empty"),
        (
            "/proc/faqd-run",
            "output_dir /proc/faqd-run cannot be written (creating an entry in /proc fails",
        ),
    ]
    for path, words in cases:
        with pytest.raises(ValueError) as excinfo:
            inputs.check_output_dir(path)
        assert words in _one_line(excinfo)


@pytest.mark.parametrize("kind", ["PNG", "JPEG", "GIF", "BMP"])
def test_check_image_reads_the_header_and_refuses_a_truncated_file(tmp_path, rng, kind):
    path = tmp_path / f"x.{kind.lower()}"
    Image.fromarray(rng.integers(0, 256, size=(23, 31, 3), dtype=np.uint8)).save(path, format=kind)
    assert inputs.check_image(path) == (kind, 31, 23)
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    with pytest.raises(ValueError) as excinfo:
        inputs.check_image(path)
    message = _one_line(excinfo)
    assert f"image file {path} is truncated" in message, message


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: p.write_bytes(b""), "is an empty file"),
        (lambda p: p.write_text("hello, not an image"), "is not a readable image"),
        (lambda p: Image.new("RGB", (4, 4)).save(p, format="WEBP"), "holds WEBP data"),
        (
            lambda p: png_with_size(p, 6000, 20_000),
            "has 6000 x 20000 pixels, more than the 67,108,864",
        ),
        (lambda p: png_with_size(p, 100_000, 100_000), "has more than 67,108,864 pixels"),
    ],
)
def test_check_image_refuses_what_tf_cannot_decode_whole(tmp_path, make, words):
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ValueError) as excinfo:
        inputs.check_image(path)
    message = _one_line(excinfo)
    assert words in message and str(path) in message, message
