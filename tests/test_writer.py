"""ShardFile's two ways of putting computed bytes into a shard: through a pipe (vmsplice + splice) and
with pwrite. Same bytes either way; write errors on either give the same one-line OutputError."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from streammerge import writer
from streammerge.writer import ShardFile

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="vmsplice/splice are Linux system calls")


def _blocks(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # sizes around the pipe's capacity and the splice threshold, and a large odd one
    sizes = [writer._SPLICE_MIN - 1, writer._SPLICE_MIN, writer._PIPE_SIZE + 1, 3 * writer._PIPE_SIZE + 12345, 17]
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
    monkeypatch.setattr(writer, "_spliced", [True])
    calls = []
    real = os.splice
    monkeypatch.setattr(os, "splice", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    blocks = _blocks()
    expected = _write(tmp_path / "a.bin", blocks, [3, 0, 4, 2, 1])
    assert (tmp_path / "a.bin").read_bytes() == expected
    assert writer._spliced == [True]
    # only the three blocks of at least _SPLICE_MIN bytes were spliced, a pipe's worth at most per call
    assert sum(calls) == sum(len(b) for b in blocks if len(b) >= writer._SPLICE_MIN)
    assert max(calls) <= writer._PIPE_SIZE


@linux
def test_a_filesystem_that_refuses_splice_falls_back_to_pwrite_with_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(writer, "_spliced", [True])

    def refuse(*a, **k):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "splice", refuse)
    blocks = _blocks(1)
    expected = _write(tmp_path / "b.bin", blocks, range(len(blocks)))
    assert (tmp_path / "b.bin").read_bytes() == expected
    assert writer._spliced == [False]  # decided once; later writes go straight to pwrite


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
from streammerge import writer
from streammerge.errors import OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
writer._spliced[0] = sys.argv[2] == "splice"
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
