"""Atomic output files: a shard is written into a temporary file beside its final name, pre-sized to
the size its header promises, by several threads at once at the offsets the plan gives (computed
blocks through a pipe or ``pwrite``, untouched bytes with ``copy_file_range``); then checked, fsynced
and renamed. Nothing ever opens a final name for writing, so a crash or Ctrl-C never leaves a file
with a final shard name that is incomplete, and no file that might be memory-mapped by a reader is
truncated in place.

The digests of the bytes are not taken here: the thread that wrote a block hashes it
(``streammerge.digest``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from streammerge import diskio
from streammerge.errors import OutputError


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


class ShardFile:
    """One output file written at known offsets, from any thread, then committed atomically.

    ``with ShardFile(path, size) as f:`` creates ``.<name>.<random>.tmp`` beside ``path``, sized
    ``size``; ``pwrite``/``copy_in`` fill it (concurrently; ranges never overlap); ``commit`` checks
    that every byte was written, fsyncs and renames. Leaving the block without a commit (an
    exception) deletes the temporary file. Callers must stop every writer before leaving the block.

    ``direct``: also open the file for direct I/O (``diskio``), where the filesystem allows; the whole
    aligned blocks of large writes from suitably placed buffers then bypass the page cache. The bytes
    are the same either way.
    """

    def __init__(self, path: Path, size: int, direct: bool = False) -> None:
        self.path = path
        self.size = size
        self.fd = self.dfd = -1
        self.align = 0
        self._direct = direct
        self._tmp = ""
        self._written = 0
        self._lock = threading.Lock()
        self.committed = False

    def __enter__(self) -> ShardFile:
        try:
            self.fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            # mkstemp makes the file private (0600); a checkpoint gets what open() would give it.
            os.fchmod(self.fd, 0o666 & ~_umask())
            diskio.presize(self.fd, self.size)  # blocks land at their offsets in any order
            if self._direct:
                self.dfd, self.align = diskio.open_direct(self._tmp)
        except OSError as e:
            self.close()
            raise output_error(self.path, e) from e
        return self

    @classmethod
    def attach(cls, path: Path, tmp: str, size: int, direct: bool) -> ShardFile:
        """Another process's view of a temporary file ``ShardFile(path, ...)`` made (``tmp``: its
        ``temporary``): it writes ranges with ``pwrite``/``copy_in``; closing it neither commits nor deletes."""
        f = cls(path, size, direct)
        try:
            f.fd = os.open(tmp, os.O_WRONLY)
            if direct:
                f.dfd, f.align = diskio.open_direct(tmp)
        except OSError as e:
            f.close()
            raise output_error(path, e) from e
        f.committed = True  # not this process's to delete
        return f

    @property
    def temporary(self) -> str:
        """The temporary file's path while it is being written."""
        return self._tmp

    def count(self, n: int) -> None:
        """Count ``n`` bytes another process wrote into this file (``attach``)."""
        self._count(n)

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptors; delete the temporary file unless it was committed."""
        for fd in (self.fd, self.dfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.dfd = -1
        if self._tmp and not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
        self._tmp = ""

    def _count(self, n: int) -> None:
        with self._lock:
            self._written += n

    def _direct_failed(self, e: OSError) -> None:
        """A direct write was refused (an alignment this filesystem wants bigger): buffered from now on."""
        if e.errno != errno.EINVAL:
            raise e
        with self._lock:
            self.align = 0

    def pwrite(self, offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at ``offset``: the aligned middle of a large writable buffer direct (when the file
        was opened so and the buffer's address agrees with ``offset`` modulo ``align``: ``Sources.buffer``),
        the rest through a pipe (large writable buffers) or with ``pwrite``."""
        view = memoryview(data).cast("B")
        try:
            middle = (diskio.aligned_middle(offset, len(view), diskio.address(view), self.align)
                      if self.align and len(view) >= diskio.DIRECT_MIN and not view.readonly else None)
            if middle is not None:
                a, b = middle
                try:
                    diskio.write_direct(self.dfd, view[a:b], offset + a)
                except OSError as e:
                    self._direct_failed(e)
                    a = b = 0
                self._buffered(view[:a], offset)
                self._buffered(view[b:], offset + b)
                self._count(b - a)
            else:
                self._buffered(view, offset)
        except OSError as e:
            raise output_error(self.path, e) from e

    def _buffered(self, view: memoryview, offset: int) -> None:
        if len(view) >= diskio.SPLICE_MIN and not view.readonly and diskio.spliced[0] and \
                diskio.splice_at(self.fd, view, offset):
            self._count(len(view))
            return
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n
            self._count(n)

    def copy_in(self, src_fd: int, src_offset: int, offset: int, count: int, buffer: memoryview | None = None,
                feed: Callable[[memoryview], object] | None = None) -> bool:
        """Copy ``count`` bytes at ``src_offset`` of ``src_fd`` to ``offset``.

        With ``buffer`` (page-aligned, a multiple of 4 KiB) and a file opened for direct I/O, every byte is
        read into the buffer at the file's phase and written by ``pwrite`` (its aligned middle direct, the
        ragged ends buffered), and ``feed(view)`` sees each run of bytes first, in order, while it is in
        cache (``digest.PieceFeed``: no second read of the source). Otherwise the bytes move without passing
        through Python (``copy_file_range``) and ``feed`` is not called. Returns whether ``feed`` saw them."""
        align = self.align  # once: another thread may turn direct writes off for this file meanwhile
        if buffer is None or not align or len(buffer) < 2 * align:
            try:
                self._copy_range(src_fd, src_offset, offset, count)
            except OSError as e:
                raise output_error(self.path, e) from e
            return False
        step = len(buffer) // align * align
        end = offset + count
        while offset < end:
            lead = offset % align  # the buffer is aligned: byte ``lead`` of it has the file offset's phase
            view = buffer[lead : lead + min(step - lead, end - offset)]  # type: ignore[index]
            try:
                got = os.preadv(src_fd, [view], src_offset)
            except OSError as e:
                raise output_error(self.path, e) from e
            if got < len(view):
                raise self._source_ended()
            if feed is not None:
                feed(view)
            self.pwrite(offset, view)
            src_offset, offset = src_offset + len(view), offset + len(view)
        return True

    def _source_ended(self) -> OutputError:
        return OutputError(f"{self.path}: source ended early while copying; is the base file truncated?")

    def _copy_range(self, src_fd: int, src_offset: int, offset: int, count: int) -> None:
        while count > 0:
            n = diskio.copy_at(src_fd, self.fd, src_offset, offset, min(count, diskio.COPY_CHUNK))
            if n <= 0:
                raise self._source_ended()
            src_offset += n
            offset += n
            count -= n
            self._count(n)

    def start_writeback(self, offset: int, count: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + count)`` to disk now (Linux; elsewhere a
        no-op), so ``commit``'s fsync finds little left to do. Best effort."""
        if self.fd >= 0 and count > 0:
            diskio.start_writeback(self.fd, offset, count)

    def commit(self) -> None:
        """Check the size, fsync, rename into place and make the rename durable."""
        if self._written != self.size:  # an internal invariant: the plan's header promised this size
            raise AssertionError(f"{self.path}: wrote {self._written} bytes, header promises {self.size}")
        try:
            os.fsync(self.fd)
            for fd in (self.fd, self.dfd):
                if fd >= 0:
                    os.close(fd)
            self.fd = self.dfd = -1
            os.replace(self._tmp, self.path)
        except OSError as e:
            raise output_error(self.path, e) from e
        self.committed = True
        self._tmp = ""
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


def write_atomic(path: Path, data: bytes) -> None:
    """Write a small file (JSON, config) atomically."""
    with ShardFile(path, len(data)) as f:
        f.pwrite(0, data)
        f.commit()


def is_temporary(name: str) -> bool:
    """True for the names ShardFile gives its temporary files (``.<final name>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
