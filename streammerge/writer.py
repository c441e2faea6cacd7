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
import ctypes
import errno
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import TracebackType

from streammerge.errors import OutputError

_COPY_CHUNK = 1 << 30  # copy_file_range moves at most this many bytes per call
_SPLICE_MIN = 1 << 18  # smaller writes use pwrite: a pipe costs three system calls
_PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size; measured 2x fewer CPU-s than 64 KiB pipes
_SPLICE_BROKEN = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)
_spliced = [True]  # cleared once the output filesystem (or the kernel) refuses splice: pwrite from then on


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
    """

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.size = size
        self.fd = -1
        self._tmp = ""
        self._written = 0
        self._lock = threading.Lock()
        self.committed = False

    def __enter__(self) -> ShardFile:
        try:
            self.fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            # mkstemp makes the file private (0600); a checkpoint gets what open() would give it.
            os.fchmod(self.fd, 0o666 & ~_umask())
            _presize(self.fd, self.size)  # blocks land at their offsets in any order
        except OSError as e:
            self.close()
            raise output_error(self.path, e) from e
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the descriptor; delete the temporary file unless it was committed."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._tmp and not self.committed:
            with contextlib.suppress(OSError):
                os.unlink(self._tmp)
        self._tmp = ""

    def _count(self, n: int) -> None:
        with self._lock:
            self._written += n

    def pwrite(self, offset: int, data: memoryview | bytes) -> None:
        """Write ``data`` at ``offset``: large writable buffers through a pipe (``vmsplice`` + ``splice``,
        Linux), everything else with ``pwrite``. Both leave the same bytes; the pipe moves them into the
        page cache with the kernel's own copy, measured 5-10x fewer CPU-s per GB than ``pwrite``'s copy
        from user memory on the VMs this was built on (benchmarks/RESULTS.md)."""
        view = memoryview(data).cast("B")
        try:
            if len(view) >= _SPLICE_MIN and not view.readonly and _spliced[0] and _splice_at(self.fd, view, offset):
                self._count(len(view))
                return
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
                self._count(n)
        except OSError as e:
            raise output_error(self.path, e) from e

    def copy_in(self, src_fd: int, src_offset: int, offset: int, count: int) -> int:
        """Copy ``count`` bytes at ``src_offset`` of ``src_fd`` to ``offset`` without passing them through
        Python (``copy_file_range``). Returns the number of system calls made."""
        calls = 0
        try:
            while count > 0:
                n = _copy_at(src_fd, self.fd, src_offset, offset, min(count, _COPY_CHUNK))
                calls += 1
                if n <= 0:
                    raise OutputError(f"{self.path}: source ended early while copying; is the base file truncated?")
                src_offset += n
                offset += n
                count -= n
                self._count(n)
        except OSError as e:
            raise output_error(self.path, e) from e
        return calls

    def start_writeback(self, offset: int, count: int) -> None:
        """Ask the kernel to start writing ``[offset, offset + count)`` to disk now (``sync_file_range``,
        Linux; elsewhere a no-op), so ``commit``'s fsync finds little left to do. Best effort."""
        if self.fd >= 0 and count > 0:
            _sync_file_range(self.fd, offset, count)

    def commit(self) -> None:
        """Check the size, fsync, rename into place and make the rename durable."""
        if self._written != self.size:  # an internal invariant: the plan's header promised this size
            raise AssertionError(f"{self.path}: wrote {self._written} bytes, header promises {self.size}")
        try:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
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


def _copy_at(src: int, dst: int, src_offset: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes between offsets; ``pread``/``pwrite`` where ``copy_file_range`` cannot."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, count, src_offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    data = os.pread(src, min(count, 1 << 24), src_offset)
    return os.pwrite(dst, data, offset) if data else 0


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _splice_at(fd: int, view: memoryview, offset: int) -> bool:
    """Write ``view`` at ``offset`` of ``fd`` through a fresh pipe: ``vmsplice`` lends the pipe the
    buffer's pages, ``splice`` copies them into the file. Every byte lent is copied out before this
    returns, so the caller may reuse the buffer. False (nothing to undo: a retry rewrites the same
    bytes) where the kernel or filesystem cannot; OSError for real write errors (ENOSPC, EIO)."""
    vmsplice = _libc("vmsplice", ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint)
    if vmsplice is None or not hasattr(os, "splice"):
        _spliced[0] = False
        return False
    vmsplice.restype = ctypes.c_ssize_t  # type: ignore[attr-defined]
    anchor = ctypes.c_char.from_buffer(view)  # holds the buffer while its pages are in the pipe
    base = ctypes.addressof(anchor)
    r, w = os.pipe()
    try:
        import fcntl

        with contextlib.suppress(OSError):
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_SIZE)
        cap = fcntl.fcntl(w, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        done, total = 0, len(view)
        while done < total:
            iov = _IoVec(base + done, min(cap, total - done))
            lent = vmsplice(w, ctypes.byref(iov), 1, 0)  # type: ignore[operator]
            if lent <= 0:
                err = ctypes.get_errno()
                if err in _SPLICE_BROKEN:
                    _spliced[0] = False
                    return False
                raise OSError(err, os.strerror(err))
            moved = 0
            while moved < lent:
                try:
                    n = os.splice(r, fd, lent - moved, offset_dst=offset + done + moved)
                except OSError as e:
                    if e.errno in _SPLICE_BROKEN:
                        _spliced[0] = False
                        return False
                    raise
                if n <= 0:
                    raise OSError(errno.EIO, "splice wrote nothing")
                moved += n
            done += lent
        return True
    finally:
        os.close(r)
        os.close(w)
        del anchor


_SYNC_FILE_RANGE_WRITE = 2
_LIBC: dict[str, object] = {}


def _libc(name: str, *argtypes: object) -> object:
    """A Linux libc function through ctypes (None elsewhere or when missing); looked up once."""
    if name not in _LIBC:
        _LIBC[name] = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = getattr(ctypes.CDLL(None, use_errno=True), name)
                fn.argtypes = argtypes
                _LIBC[name] = fn
    return _LIBC[name]


def _presize(fd: int, size: int) -> None:
    """Give the new file its final size, with its blocks allocated where the filesystem can (``fallocate``:
    a full disk is then found before any byte is written, and writes need no block allocation; measured
    cheaper than a sparse file on ext4), else as a sparse file (``ftruncate``)."""

    fallocate = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    if fallocate is not None and size > 0 and fallocate(fd, 0, 0, size) != 0:  # type: ignore[operator]
        err = ctypes.get_errno()
        if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err))
        fallocate = None
    if fallocate is None or size == 0:
        os.ftruncate(fd, size)


def _sync_file_range(fd: int, offset: int, count: int) -> None:

    fn = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is not None:
        fn(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]  # errors: fsync reports them


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
