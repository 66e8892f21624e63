"""Checks for what users hand in: files whose headers may lie, data that may inflate without end,
text that may not be text, folders that cannot be written, and values too long to repeat.

Every reader of a user's file goes through these functions, so that a damaged or hostile file
ends in one `ValueError` that names it and says what to do, before anything large is allocated:
declared sizes are checked against the bytes present and against sane limits first.

>>> check_size(declared=784, present=700, what="train-images-idx3-ubyte")
Traceback (most recent call last):
...
ValueError: train-images-idx3-ubyte is truncated: its header declares 784 bytes of data, it holds
700; download it again.
>>> inflate(zlib.compress(b"x" * 1000), limit=100, what="manifest")
Traceback (most recent call last):
...
ValueError: manifest inflates to more than 100 bytes, more than it can hold; is it the right file?
>>> shorten("/data/" + "a" * 100 + "/train.json", limit=40)
'/data/aaaaaaaaaaaaaaaaaaaaaaaa...train.json (117 characters)'
>>> clip("idx:/" + "a" * 120_000 + " does not exist; check the path.", 200)
'idx:/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa...aaaaaaaaaaaaaaaaaaaa (120,005 characters)
does not exist; check the path.'
"""

import gzip
import json
import os
import re
import tempfile
import warnings
import zlib

# Compressed data may inflate to this many times its size, beyond a floor every real file of this
# project's kinds stays under. Real image and label data inflate 2-10x (Fashion-MNIST 1.8x, MNIST
# 4.8x); a few MB that claim gigabytes are a bomb, refused before any allocation.
MAX_INFLATION = 100
INFLATION_FLOOR = 64 * 2**20
# Longest value repeated in a message.
MESSAGE_CHARS = 80
# Longest path or data source repeated in a message: real ones often pass 80 characters.
PATH_CHARS = 200
# Images: the most pixels one may have (8192 x 8192); decoding allocates 3 bytes per pixel.
MAX_IMAGE_PIXELS = 2**26
# JSON (configs, manifests): deeper nesting than this is not a config.
MAX_JSON_DEPTH = 32
# Integers of more digits than this are no count, size or seed.
MAX_INT_DIGITS = 30

_IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "GIF": "GIF", "BMP": "BMP"}
_READ_CHUNK = 4 * 2**20


def shorten(text: object, limit: int = MESSAGE_CHARS) -> str:
    """`text` cut to `limit` characters for a message, saying how long it was. Its start and its end
    are kept: a long path still shows its file name."""
    text = str(text)
    if len(text) <= limit:
        return text
    tail = limit // 4
    return f"{text[: limit - tail]}...{text[len(text) - tail :]} ({len(text):,} characters)"


def clip(line: object, limit: int) -> str:
    """A message `line` cut to `limit` characters by shortening its values, never its reason.

    Runs of more than `MESSAGE_CHARS` non-blank characters (paths, values) are shortened first; a
    line still too long keeps its start (what it names) and its end (what to do).
    """
    line = str(line)
    if len(line) <= limit:
        return line
    line = re.sub(rf"\S{{{MESSAGE_CHARS + 1},}}", lambda m: shorten(m.group(0)), line)
    if len(line) <= limit:
        return line
    half = (limit - len(" ... ")) // 2
    return f"{line[:half]} ... {line[len(line) - half :]}"


def first_line(error: BaseException, limit: int | None = None) -> str:
    r"""The first line of `error`'s message (the name of its type when it has none), cut to `limit`
    characters by `clip` when given.

    >>> first_line(ValueError("bad value\nin detail")), first_line(ValueError()), first_line(OSError(" "))
    ('bad value', 'ValueError', 'OSError')

    TensorFlow's graph errors open with a heading and the Python traceback of the op; their line
    is the op's own message after it:

    >>> first_line(ValueError("Graph execution error:\n\nDetected at node a/b defined at (most recent "
    ...                       "call last):\n  File \"x.py\", line 1\n\n{{function_node f}} Shape mismatch "
    ...                       "in the collective instance 100.\n\t [[{{node a/b}}]]"))
    'Shape mismatch in the collective instance 100.'
    """
    text = str(getattr(error, "message", None) or error).strip()
    lines = text.splitlines()
    line = lines[0] if text else type(error).__name__
    if line.strip() == "Graph execution error:":
        messages = [
            x
            for x in lines[1:]
            if x.strip() and not x[0].isspace() and not x.startswith("Detected at node")
        ]
        line = messages[0] if messages else line
    line = re.sub(r"^\{\{function_node [^}]*\}\}\s*", "", line)
    return line if limit is None else clip(line, limit)


def check_size(declared: int, present: int, what: str, advice: str = "download it again") -> None:
    """Raises when the `declared` size of `what` (from its header) is not the `present` size."""
    if declared != present:
        state = "truncated" if present < declared else "longer than its header says"
        raise ValueError(
            f"{what} is {state}: its header declares {declared:,} bytes of data, it holds {present:,}; {advice}."
        )


def check_limit(size: int, limit: int, what: str, advice: str = "is it the right file?") -> None:
    """Raises when `size` bytes (declared by `what`) exceed `limit`, before anything is allocated."""
    if size > limit:
        raise ValueError(
            f"{what} declares {_bytes(size)} of data, more than the {_bytes(limit)} it may hold; {advice}"
        )


def inflation_limit(compressed_bytes: int, cap: int = 2**40) -> int:
    """The most bytes `compressed_bytes` of compressed data may inflate to (at most `cap`)."""
    return min(cap, max(INFLATION_FLOOR, MAX_INFLATION * compressed_bytes))


def inflate(data: bytes, limit: int, what: str) -> bytes:
    """`zlib.decompress(data)`, refusing output beyond `limit` bytes without producing it, and
    anything after the compressed stream."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as err:
        raise ValueError(
            f"{what} is not valid compressed data ({err}); is it the right file?"
        ) from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(
            f"{what} inflates to more than {limit:,} bytes, more than it can hold; is it the right file?"
        )
    if not inflater.eof:
        raise ValueError(
            f"{what} is truncated: its compressed data ends early; is it the right file?"
        )
    if inflater.unused_data:
        raise ValueError(f"{what} has data after its compressed stream; is it the right file?")
    return out


class BinaryFile:
    """A user's binary file, gzip-compressed (``.gz``) or not, read with its size bounded.

    `limit` is the most bytes the file can yield: its size, or `inflation_limit` of it when
    compressed. Read errors (a damaged gzip stream) become one-line `ValueError`s naming it.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "x.gz")
    >>> with gzip.open(path, "wb") as f:
    ...     _ = f.write(b"0123456789")
    >>> with BinaryFile(path) as f:
    ...     f.read_exactly(4).tobytes(), f.read_exactly(6, "the rest").tobytes()
    (b'0123', b'456789')
    """

    def __init__(self, path):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        self.compressed = self.path.endswith(".gz")
        self.limit = inflation_limit(size) if self.compressed else size
        self._stream = gzip.open(self.path, "rb") if self.compressed else open(self.path, "rb")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stream.close()

    def read_exactly(self, size: int, what: str = "its data"):
        """The next `size` bytes as a uint8 NumPy array; raises if the file cannot hold them."""
        import numpy as np

        if self.compressed and size > self.limit:
            raise ValueError(
                f"{self.path} declares {_bytes(size)} of data, more than its {_bytes(os.path.getsize(self.path))} "
                f"of gzip data can hold (real data compresses less than {MAX_INFLATION}x); is it the right file?"
            )
        if not self.compressed:
            present = self.limit - self._stream.tell()
            if size > present:
                raise ValueError(
                    f"{self.path} is truncated: {what} needs {size:,} bytes, it holds {present:,}; download it again."
                )
        out = np.empty(size, np.uint8)
        view, filled = memoryview(out), 0
        while filled < size:
            got = self._guarded(self._stream.readinto, view[filled : filled + _READ_CHUNK])
            if not got:
                raise ValueError(
                    f"{self.path} is truncated: {what} needs {size:,} bytes, it holds {filled:,}; download it again."
                )
            filled += got
        return out

    def expect_end(self, what: str) -> None:
        """Raises if the file holds more bytes."""
        extra = self._guarded(self._stream.read, 1)
        if extra:
            raise ValueError(
                f"{self.path} is longer than its header says ({what}); download it again."
            )

    def _guarded(self, read, *args):
        try:
            return read(*args)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{self.path} is not a readable gzip file ({err}); download it again."
            ) from None


def read_text(path: str, what: str, limit: int = 2**20) -> str:
    """The UTF-8 text of a user's file of at most `limit` bytes; errors name the file."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(
            f"{what} {path} is {_bytes(size)}, more than the {_bytes(limit)} it may be; is it the right file?"
        )
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[err.start]:02x} on line {line}); save it as UTF-8."
        ) from None


class LongInteger(str):
    """An integer literal of more than `MAX_INT_DIGITS` digits, kept as text: no check accepts it."""

    def __repr__(self):
        return f"<an integer of {len(self.lstrip('-')):,} digits>"


def _parse_int(text):
    return LongInteger(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def loads_json(text: str, what: str, max_depth: int = MAX_JSON_DEPTH):
    """Parses JSON from a user; overlong integers become `LongInteger`s, deep nesting and a key
    given twice in one object are errors.

    JSON allows a key twice (the last wins); a user who wrote it twice made a mistake.

    >>> loads_json('{"epochs": 3}', "config")
    {'epochs': 3}
    >>> loads_json("[" * 100 + "]" * 100, "config")
    Traceback (most recent call last):
    ...
    ValueError: config nests lists and objects deeper than 32 levels; a config is a few levels deep.
    >>> loads_json('{"train": {"lr": 0.1, "epochs": 3, "lr": 0.2}}', "config")
    Traceback (most recent call last):
    ...
    ValueError: config gives the key 'train.lr' twice; keep one of them.
    """
    deep = f"{what} nests lists and objects deeper than {max_depth} levels; a config is a few levels deep."
    twice = {}  # id of a parsed object -> its first key given twice

    def pairs_to_dict(pairs):
        out = {}
        for key, value in pairs:
            if key in out and id(out) not in twice:
                twice[id(out)] = key
            out[key] = value
        return out

    try:
        value = json.loads(text, parse_int=_parse_int, object_pairs_hook=pairs_to_dict)
    except RecursionError:
        raise ValueError(deep) from None
    stack = [(value, 1, ())]
    while stack:
        node, depth, path = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > max_depth:
                raise ValueError(deep)
            if id(node) in twice:
                key = shorten(".".join((*path, twice[id(node)])))
                raise ValueError(f"{what} gives the key '{key}' twice; keep one of them.")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack.extend((child, depth + 1, (*path, str(key))) for key, child in items)
    return value


def describe(value: object, limit: int = MESSAGE_CHARS) -> str:
    """A JSON rendering of a user's value for a message, cut to `limit` characters."""
    if isinstance(value, LongInteger):
        return repr(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return shorten(text, limit)


def check_output_dir(path: str, what: str = "output_dir") -> None:
    """Raises unless `path` is, or can be created as, a folder this process can write in.

    Probes by creating and removing an entry, so that a read-only disk, ``/proc`` or a path under
    a file is refused before a run writes anything.
    """
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path).strip():
        raise ValueError(
            f"{what} is empty; give the folder the run writes to, e.g. saved_models/run."
        )
    path = os.path.abspath(os.fspath(path))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is" if existing == path else f"lies under {existing}, which is"
        raise ValueError(f"{what} {path} {where} a file, not a folder; choose another {what}.")
    try:
        if existing == path:
            handle, probe = tempfile.mkstemp(dir=existing, prefix=".faqd-probe-")
            os.close(handle)
            os.remove(probe)
        else:
            os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".faqd-probe-"))
    except OSError as err:
        raise ValueError(
            f"{what} {path} cannot be written (creating an entry in {existing} fails: {err.strerror}); "
            f"choose a folder on a writable disk."
        ) from None
    return path


def check_image(path: str) -> tuple[str, int, int]:
    """`(format, width, height)` of an image file, read from its header; raises on anything TF
    cannot decode whole: an empty, truncated or non-image file, another format, too many pixels.
    """
    from PIL import Image

    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                kind, (width, height) = image.format, image.size
                if kind == "PNG":
                    image.verify()  # walks every chunk to IEND, checking its CRC
    except Image.DecompressionBombError:
        raise ValueError(
            f"image file {path} has more than {MAX_IMAGE_PIXELS:,} pixels, the most an image may "
            "have; shrink or remove it."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        if os.path.getsize(path) == 0:
            reason = "an empty file"
        elif "truncated" in str(err).lower() or isinstance(err, EOFError):
            reason = "truncated (its data ends early)"
        else:
            reason = f"not a readable image ({shorten(err, 60)})"
        raise ValueError(f"image file {path} is {reason}; remove or replace it.") from None
    if kind not in _IMAGE_FORMATS:
        raise ValueError(
            f"image file {path} holds {kind} data, which is not BMP, GIF, JPEG or PNG; convert or remove it."
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"image file {path} has {width} x {height} pixels, more than the {MAX_IMAGE_PIXELS:,} an image may have; "
            f"shrink or remove it."
        )
    if width * height == 0:
        raise ValueError(f"image file {path} has {width} x {height} pixels; remove it.")
    if not _complete(path, _IMAGE_FORMATS[kind]):
        raise ValueError(
            f"image file {path} is truncated (its {_IMAGE_FORMATS[kind]} data ends early); replace or remove it."
        )
    return _IMAGE_FORMATS[kind], width, height


def _complete(path, kind):
    """Whether a file of a format without checksums reaches its end marker."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if kind == "BMP":
            declared = int.from_bytes(
                f.read(6)[2:6], "little"
            )  # bfSize; 0 when a writer leaves it out
            return declared <= size
        f.seek(max(0, size - 4096))
        tail = f.read()
    if kind == "JPEG":
        return b"\xff\xd9" in tail  # the end-of-image marker (markers inside the data are stuffed)
    if kind == "GIF":
        return tail.rstrip(b"\x00").endswith(b";")
    return True  # PNG: verified chunk by chunk


def _bytes(n):
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,} bytes"


__all__ = [
    "BinaryFile",
    "LongInteger",
    "check_image",
    "check_limit",
    "check_output_dir",
    "check_size",
    "clip",
    "describe",
    "inflate",
    "inflation_limit",
    "loads_json",
    "read_text",
    "shorten",
]
