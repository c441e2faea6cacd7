"""ShardFile's ways of putting bytes into a shard: direct I/O (aligned middles), a pipe (vmsplice +
splice), pwrite and copy_file_range. Same bytes every way; write errors give the same one-line OutputError."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from streammerge import diskio
from streammerge.writer import ShardFile

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="vmsplice/splice are Linux system calls")


def _blocks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # sizes around the pipe's capacity and the splice threshold, and a large odd one
    sizes = [diskio.SPLICE_MIN - 1, diskio.SPLICE_MIN, diskio.PIPE_SIZE + 1, 3 * diskio.PIPE_SIZE + 12345, 17]
    return [rng.integers(0, 256, size=n, dtype=np.uint8) for n in sizes]


def _write(path, blocks, order):
    offsets = np.cumsum([0] + [len(b) for b in blocks])
    with ShardFile(path, int(offsets[-1])) as f:
        for i in order:  # any order: blocks land at their offsets
            f.pwrite(int(offsets[i]), memoryview(blocks[i]))
        f.commit()
    return b"".join(b.tobytes() for b in blocks)


@linux
def test_large_writable_blocks_go_through_the_pipe_and_land_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(diskio, "spliced", [True])
    calls = []
    real = os.splice
    monkeypatch.setattr(os, "splice", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    blocks = _blocks()
    expected = _write(tmp_path / "a.bin", blocks, [3, 0, 4, 2, 1])
    assert (tmp_path / "a.bin").read_bytes() == expected
    assert diskio.spliced == [True]
    # only the three blocks of at least _SPLICE_MIN bytes were spliced, a pipe's worth at most per call
    assert sum(calls) == sum(len(b) for b in blocks if len(b) >= diskio.SPLICE_MIN)
    assert max(calls) <= diskio.PIPE_SIZE


@linux
def test_a_filesystem_that_refuses_splice_falls_back_to_pwrite_with_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(diskio, "spliced", [True])

    def refuse(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "splice", refuse)
    blocks = _blocks(1)
    expected = _write(tmp_path / "b.bin", blocks, range(len(blocks)))
    assert (tmp_path / "b.bin").read_bytes() == expected
    assert diskio.spliced == [False]  # decided once; later writes go straight to pwrite


def test_read_only_buffers_are_written_with_pwrite(tmp_path):
    data = bytes(range(256)) * 4096  # 1 MiB of read-only bytes
    with ShardFile(tmp_path / "c.bin", len(data)) as f:
        f.pwrite(0, data)
        f.commit()
    assert (tmp_path / "c.bin").read_bytes() == data


_FSIZE_SCRIPT = """
import resource, signal, sys
import numpy as np
from pathlib import Path
from streammerge import diskio, writer
from streammerge.errors import OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
diskio.spliced[0] = sys.argv[2] == "splice"
f = writer.ShardFile(Path(sys.argv[1]), 0).__enter__()  # size 0: nothing pre-sized, the write meets the limit
try:
    f.pwrite(0, memoryview(np.ones(4 << 20, dtype=np.uint8)))
except OutputError as e:
    print(e)
finally:
    f.close()
"""


@pytest.mark.parametrize("way", ["splice", "pwrite"])
def test_a_write_that_fails_midway_is_one_line_naming_the_file_and_the_remedy(tmp_path, way):
    if way == "splice" and not sys.platform.startswith("linux"):
        pytest.skip("vmsplice/splice are Linux system calls")
    target = tmp_path / "model-00001-of-00002.safetensors"
    r = subprocess.run([sys.executable, "-c", _FSIZE_SCRIPT, str(target), way], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (f"{target}: file size limit exceeded while writing (ulimit -f); raise the limit or "
                                "use `max_shard_size`, then rerun with `resume`")
    assert list(tmp_path.iterdir()) == []  # the temporary file was removed


def _spy_direct(monkeypatch):
    """Count the bytes that went through direct writes (the real write still happens)."""
    seen = []
    real = diskio.write_direct

    def spy(fd, view, off):
        seen.append((off, len(view)))
        real(fd, view, off)

    monkeypatch.setattr(diskio, "write_direct", spy)
    return seen


def _phased(n: int, phase: int, align: int, seed: int) -> memoryview:
    """``n`` random bytes in memory whose address is ``phase`` modulo ``align`` (as ``Sources.buffer`` gives)."""
    raw = np.empty(n + align, dtype=np.uint8)
    start = (phase - raw.ctypes.data) % align
    view = raw[start : start + n]
    view[:] = np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8)
    return memoryview(view)


@linux
@pytest.mark.parametrize("offset", [0, 8, 4096 - 24, 3 * 4096 + 1000])
def test_the_aligned_middle_goes_direct_and_the_ragged_ends_buffered_same_bytes(tmp_path, monkeypatch, offset):
    seen = _spy_direct(monkeypatch)
    n = 5 * diskio.DIRECT_MIN + 777
    size = offset + n + 100
    with ShardFile(tmp_path / "d.bin", size, direct=True) as f:
        assert f.align >= 4096 and f.dfd >= 0  # this filesystem takes direct I/O (ext4, xfs, btrfs do)
        data = _phased(n, offset, f.align, offset)
        f.pwrite(0, b"\1" * offset)
        f.pwrite(offset, data)
        f.pwrite(offset + n, b"\2" * 100)
        f.commit()
        align = f.align
    assert (tmp_path / "d.bin").read_bytes() == b"\1" * offset + bytes(data) + b"\2" * 100
    [(at, count)] = seen
    assert at == -(-offset // align) * align and (at + count) == (offset + n) // align * align


@linux
def test_empty_and_small_writable_blocks_on_a_direct_file_are_written_buffered(tmp_path, monkeypatch):
    seen = _spy_direct(monkeypatch)
    with ShardFile(tmp_path / "s.bin", 10, direct=True) as f:
        f.pwrite(0, memoryview(bytearray()))  # an empty tensor's block
        f.pwrite(0, memoryview(bytearray(b"0123456789")))
        f.commit()
    assert (tmp_path / "s.bin").read_bytes() == b"0123456789" and seen == []


@linux
def test_a_buffer_out_of_phase_with_the_file_is_written_buffered(tmp_path, monkeypatch):
    seen = _spy_direct(monkeypatch)
    n = 4 * diskio.DIRECT_MIN
    with ShardFile(tmp_path / "e.bin", n + 64, direct=True) as f:
        data = _phased(n, 64 + 8, f.align, 3)  # meant for offset 72, written at 64
        f.pwrite(0, b"\0" * 64)
        f.pwrite(64, data)
        f.commit()
    assert (tmp_path / "e.bin").read_bytes() == b"\0" * 64 + bytes(data) and seen == []


@linux
def test_copies_go_direct_through_the_buffer_and_keep_every_byte(tmp_path, monkeypatch):
    seen = _spy_direct(monkeypatch)
    src = tmp_path / "src.bin"
    payload = np.random.default_rng(5).integers(0, 256, size=3 << 20, dtype=np.uint8).tobytes()
    src.write_bytes(payload)
    fd = os.open(src, os.O_RDONLY)
    try:
        with ShardFile(tmp_path / "f.bin", len(payload) - 1000 + 10, direct=True) as f:
            buf = _phased(1 << 20, 0, f.align, 0)  # smaller than the copy: several rounds through it
            f.pwrite(0, b"0123456789")
            fed = []
            assert f.copy_in(fd, 1000, 10, len(payload) - 1000, buf, lambda v: fed.append(bytes(v))) is True
            f.commit()
    finally:
        os.close(fd)
    assert (tmp_path / "f.bin").read_bytes() == b"0123456789" + payload[1000:]
    assert sum(c for _, c in seen) > 2 << 20 and all(c <= 1 << 20 for _, c in seen)
    # every byte was shown to ``feed`` once, in order, before it was written (the copy's digests come from it)
    assert b"".join(fed) == payload[1000:] and len(fed) == 3  # 1 MiB - 10, 1 MiB, the rest


def test_a_buffered_copy_moves_in_the_kernel_and_feeds_nothing(tmp_path):
    src = tmp_path / "src.bin"
    payload = np.random.default_rng(6).integers(0, 256, size=1 << 20, dtype=np.uint8).tobytes()
    src.write_bytes(payload)
    fd = os.open(src, os.O_RDONLY)
    fed = []
    try:
        with ShardFile(tmp_path / "h.bin", len(payload) - 7, direct=False) as f:
            assert f.copy_in(fd, 7, 0, len(payload) - 7, None, fed.append) is False
            f.commit()
    finally:
        os.close(fd)
    assert (tmp_path / "h.bin").read_bytes() == payload[7:] and fed == []


@linux
def test_a_filesystem_that_refuses_an_aligned_direct_write_gets_buffered_writes(tmp_path, monkeypatch):
    def refuse(fd, view, off):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(diskio, "write_direct", refuse)
    n = 4 * diskio.DIRECT_MIN
    with ShardFile(tmp_path / "g.bin", n, direct=True) as f:
        data = _phased(n, 0, f.align, 4)
        f.pwrite(0, data)
        assert f.align == 0  # decided for this file: no second attempt per block
        f.commit()
    assert (tmp_path / "g.bin").read_bytes() == bytes(data)
