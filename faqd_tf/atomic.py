"""Files written whole: every file the package writes goes to a name beside its own and is renamed
into place once complete, so neither a kill nor a full disk leaves half a file. TensorFlow-free.

>>> import tempfile
>>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
>>> write_atomically(path, "whole")
5
>>> open(path).read(), os.listdir(os.path.dirname(path))
('whole', ['notes.txt'])
"""

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator

PARTIAL = ".partial"
"""The suffix of a file being written aside (`written_aside`): never a whole file; a run removes what a kill left."""


@contextlib.contextmanager
def written_aside(path: str, partial: str | None = None) -> Iterator[str]:
    """Yields a file name next to `path` (default `path + PARTIAL`) to write; when the block ends
    it is renamed to `path`, when the block fails (a full disk, an interrupt) the file the block
    wrote there is removed. So `path` is never half a file, and a failed write leaves nothing behind.

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "notes.txt")
    >>> with written_aside(path) as partial, open(partial, "w") as f:
    ...     _ = f.write("whole")
    >>> open(path).read(), os.listdir(os.path.dirname(path))
    ('whole', ['notes.txt'])
    """
    partial = partial or path + PARTIAL
    before = _identity(partial)
    try:
        yield partial
        os.replace(partial, path)
    except BaseException as err:
        # Only a regular file the block created or changed is removed: never a folder in the way,
        # nor a file the block failed to open.
        now = _identity(partial)
        if now is not None and now[0] and now != before:
            with contextlib.suppress(OSError):
                os.remove(partial)
        if isinstance(err, OSError) and err.filename is None:
            err.filename = path  # some writers (Keras's zip of a .keras file) name no file
        raise
    # A rename onto a hard link of the same file does nothing and leaves `partial` (POSIX rename).
    with contextlib.suppress(FileNotFoundError):
        os.remove(partial)


def _identity(path: str) -> tuple | None:
    """(is a regular file, inode, size, modification time) of `path`, or None if nothing is there."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return stat.S_ISREG(st.st_mode), st.st_ino, st.st_size, st.st_mtime_ns


def write_synced(path: str, data: bytes | str | Iterable[bytes]) -> int:
    """Writes `data` (bytes, text as UTF-8, or bytes chunks) to `path` and waits until it is on the
    disk; returns the number of bytes. Whole only under a name from `written_aside`."""
    chunks = (
        [data.encode("utf-8")]
        if isinstance(data, str)
        else [data]
        if isinstance(data, bytes)
        else data
    )
    size = 0
    with open(path, "wb") as f:
        for chunk in chunks:
            size += f.write(chunk)
        f.flush()
        os.fsync(f.fileno())  # on the disk before it is renamed into place (a power cut)
    return size


def write_atomically(path: str | os.PathLike, data: bytes | str | Iterable[bytes]) -> int:
    """`write_synced` to a name beside `path`, renamed to `path` when complete (`written_aside`):
    a failure at any point (a full disk, a folder in the way) leaves no partial file. Returns the
    number of bytes written."""
    path = os.fspath(path)
    with written_aside(path) as partial:
        return write_synced(partial, data)
