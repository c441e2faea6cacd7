"""Atomic output files: a shard is streamed into a temporary file beside its final name, checked
against the size its header promises, fsynced, and renamed. Nothing ever opens a final name for
writing, so a crash or Ctrl-C never leaves a file with a final shard name that is incomplete, and
no file that might be memory-mapped by a reader is truncated in place.

Every byte that goes into a file also goes through SHA-256 on the way (``ShardWriter.sha256``),
so the completion manifest can name each shard's content without reading the shard again. Raw
copies (``copy_range``: ``copy_file_range`` moves the bytes inside the kernel) are hashed by
reading the same source range back in ``_HASH_CHUNK`` pieces: it was just read by the copy, so
this is a page-cache read, not a disk read.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from pathlib import Path
from types import TracebackType

from streammerge.errors import OutputError

_COPY_CHUNK = 1 << 30  # copy_file_range/sendfile move at most this many bytes per call
_HASH_CHUNK = 8 << 20  # raw-copied bytes are read back for hashing in pieces of this size


def output_error(path: Path, e: OSError) -> OutputError:
    """One line for a failed write, saying what to do."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{path}: disk full while writing; free space on that filesystem (or choose another `out`) "
                           "and rerun with `resume`")
    if e.errno == errno.EFBIG:
        return OutputError(f"{path}: file size limit exceeded while writing (ulimit -f); raise the limit or use "
                           "`max_shard_size`, then rerun with `resume`")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"{path}: not writable ({e.strerror}); choose an `out` directory you can write to")
    return OutputError(f"{path}: write failed ({e.strerror or e})")


class ShardWriter:
    """Stream one file: ``write`` buffers / ``copy_range`` from another fd, in order, then commit."""

    def __init__(self, path: Path, header: bytes, data_size: int) -> None:
        self.path = path
        self.expected = len(header) + data_size
        self._header = header
        self._fd = -1
        self._tmp = ""
        self._hash = hashlib.sha256()
        self._buf: bytearray | None = None
        self.written = 0
        self.sha256 = ""  # hex digest of the whole file, set on a successful commit

    def __enter__(self) -> ShardWriter:
        try:
            self._fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            # mkstemp makes the file private (0600); a checkpoint gets what open() would give it.
            os.fchmod(self._fd, 0o666 & ~_umask())
        except OSError as e:
            raise output_error(self.path, e) from e
        self.write(self._header)
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if et is None:
                self._commit()
        finally:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            if et is not None or self._tmp:
                with contextlib.suppress(OSError):
                    os.unlink(self._tmp)

    def write(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.write(self._fd, view)
                self._hash.update(view[:n])
                view = view[n:]
                self.written += n
        except OSError as e:
            raise output_error(self.path, e) from e

    def copy_range(self, src_fd: int, offset: int, count: int) -> None:
        """Copy ``count`` bytes at ``offset`` of ``src_fd`` without passing them through Python."""
        try:
            while count > 0:
                n = _copy(src_fd, self._fd, offset, min(count, _COPY_CHUNK))
                if n <= 0:
                    raise OutputError(f"{self.path}: source ended early while copying; is the base file truncated?")
                self._hash_source(src_fd, offset, n)
                offset += n
                count -= n
                self.written += n
        except OSError as e:
            raise output_error(self.path, e) from e

    def _hash_source(self, src_fd: int, offset: int, count: int) -> None:
        """Feed ``count`` source bytes at ``offset`` (just copied, so in the page cache) to the hash."""
        if self._buf is None:
            self._buf = bytearray(_HASH_CHUNK)
        view = memoryview(self._buf)
        while count > 0:
            n = os.preadv(src_fd, [view[: min(count, _HASH_CHUNK)]], offset)
            if n <= 0:
                raise OutputError(f"{self.path}: source ended early while hashing; is the base file truncated?")
            self._hash.update(view[:n])
            offset += n
            count -= n

    def _commit(self) -> None:
        if self.written != self.expected:  # an internal invariant: the plan's header promised this size
            raise AssertionError(f"{self.path}: wrote {self.written} bytes, header promises {self.expected}")
        try:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise output_error(self.path, e) from e
        self._tmp = ""
        self.sha256 = self._hash.hexdigest()
        fsync_dir(self.path.parent)


def _umask() -> int:
    """The process umask, read without changing it (Linux /proc); 0o022 where that is unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _copy(src: int, dst: int, offset: int, count: int) -> int:
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, count, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    if hasattr(os, "sendfile"):
        with contextlib.suppress(OSError):
            return os.sendfile(dst, src, offset, count)
    data = os.pread(src, min(count, 1 << 24), offset)
    return os.write(dst, data)


def write_atomic(path: Path, data: bytes) -> str:
    """Write a small file (JSON, config) atomically. Returns its sha256 (hex)."""
    with ShardWriter(path, data, 0) as w:
        pass
    return w.sha256


def is_temporary(name: str) -> bool:
    """True for the names ShardWriter gives its temporary files (``.<final name>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
