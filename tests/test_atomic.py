"""faqd_tf.atomic: files written whole or not at all."""

import os

import pytest

from faqd_tf import atomic


def test_written_aside_removes_only_what_the_block_wrote(tmp_path, rng):
    path = str(tmp_path / "data.bin")
    payload = rng.bytes(int(rng.integers(1, 4096)))

    # A stale partial left by a kill is overwritten; the block fails: nothing is left.
    open(path + atomic.PARTIAL, "wb").write(b"left by a kill")
    with pytest.raises(OSError, match="No space"):
        with atomic.written_aside(path) as partial, open(partial, "wb") as f:
            f.write(payload)
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []

    # A folder in the partial's place, and a file the block never opened, are kept.
    os.mkdir(path + atomic.PARTIAL)
    with pytest.raises(IsADirectoryError) as info:
        with atomic.written_aside(path) as partial, open(partial, "wb") as f:
            f.write(payload)
    assert info.value.filename == path + atomic.PARTIAL
    assert os.listdir(tmp_path) == ["data.bin" + atomic.PARTIAL]
    os.rmdir(path + atomic.PARTIAL)
    open(path + atomic.PARTIAL, "wb").write(payload)
    with pytest.raises(KeyboardInterrupt):
        with atomic.written_aside(path):
            raise KeyboardInterrupt
    assert open(path + atomic.PARTIAL, "rb").read() == payload

    # The rename fails (a full disk, say): the file written aside is removed too.
    os.remove(path + atomic.PARTIAL)

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(os, "replace", full_disk)
        with pytest.raises(OSError, match="No space"):
            with atomic.written_aside(path) as partial, open(partial, "wb") as f:
                f.write(payload)
    assert os.listdir(tmp_path) == []

    # A whole block: the file at `path`, nothing beside it.
    with atomic.written_aside(path) as partial, open(partial, "wb") as f:
        f.write(payload[::-1])
    assert open(path, "rb").read() == payload[::-1] and os.listdir(tmp_path) == ["data.bin"]


def test_write_atomically_writes_bytes_text_and_chunks_synced(tmp_path, rng, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    payload = rng.bytes(int(rng.integers(1, 4096)))
    path = tmp_path / "out.bin"
    for data, whole in (
        (payload, payload),
        ("é\n", "é\n".encode()),
        ([payload[:7], payload[7:]], payload),
    ):
        assert atomic.write_atomically(path, data) == len(whole)
        assert path.read_bytes() == whole and os.listdir(tmp_path) == ["out.bin"]
    assert len(synced) == 3

    # A folder in the way: the error names it, and nothing is left beside it.
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError):
        atomic.write_atomically(tmp_path / "dir", payload)
    assert sorted(os.listdir(tmp_path)) == ["dir", "out.bin"]
