"""How bytes reach an output file: the system calls behind ``writer.ShardFile``, each with a portable
fallback. Measured on the 2-core Firecracker VM this was built on (benchmarks/RESULTS.md, 2026-11-29):

* **direct I/O** (``O_DIRECT`` writes from page-aligned buffers): the disk reads our buffer itself.
  No page-cache page is allocated and nothing is copied: 0.1 CPU-s per 2 GB, against 1-5 CPU-s for
  the buffered ways below, whose cost is mostly allocating page-cache memory (it varies 10x with the
  VM's memory state). Only whole ``align``-sized blocks at aligned offsets; the ragged ends of a
  range go through the page cache.
* **a pipe** (``vmsplice`` + ``splice``): buffered, with the kernel's own copy; cheaper than
  ``pwrite``'s copy from user memory (0.2-1.7 against 1.1-2.7 CPU-s per GB, same loop, alternating).
* ``pwrite``, and ``copy_file_range`` for bytes already in a file.

Linux only where named; elsewhere (and where a filesystem refuses) the plain calls are used.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import sys

COPY_CHUNK = 1 << 30  # copy_file_range moves at most this many bytes per call
SPLICE_MIN = 1 << 18  # smaller writes use pwrite: a pipe costs three system calls
PIPE_SIZE = 1 << 20  # the default /proc/sys/fs/pipe-max-size; measured 2x fewer CPU-s than 64 KiB pipes
DIRECT_MIN = 1 << 16  # aligned middles smaller than this are not worth a second kind of write
_REFUSED = (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF)
spliced = [True]  # cleared once the kernel or a filesystem refuses splice: pwrite from then on

_LIBC: dict[str, object] = {}


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def _libc(name: str, *argtypes: object, restype: object = ctypes.c_int) -> object:
    """A Linux libc function through ctypes (None elsewhere or when missing); looked up once."""
    if name not in _LIBC:
        _LIBC[name] = None
        if sys.platform.startswith("linux"):
            with contextlib.suppress(OSError, AttributeError):
                fn = getattr(ctypes.CDLL(None, use_errno=True), name)
                fn.argtypes = argtypes
                fn.restype = restype
                _LIBC[name] = fn
    return _LIBC[name]


def presize(fd: int, size: int) -> None:
    """Give a new file its final size, with its blocks allocated where the filesystem can (``fallocate``:
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


def start_writeback(fd: int, offset: int, count: int) -> None:
    """``sync_file_range(SYNC_FILE_RANGE_WRITE)``: start writing a range to disk now. Best effort (errors:
    fsync reports them)."""
    fn = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    if fn is not None:
        fn(fd, offset, count, 2)  # type: ignore[operator]


def copy_at(src: int, dst: int, src_offset: int, offset: int, count: int) -> int:
    """Copy up to ``count`` bytes between offsets; ``pread``/``pwrite`` where ``copy_file_range`` cannot."""
    if hasattr(os, "copy_file_range"):
        try:
            return os.copy_file_range(src, dst, count, src_offset, offset)
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
    data = os.pread(src, min(count, 1 << 24), src_offset)
    return os.pwrite(dst, data, offset) if data else 0


def address(view: memoryview) -> int:
    """The address of a writable buffer's first byte."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def aligned_buffer(size: int, align: int) -> tuple[mmap.mmap, memoryview]:
    """``size`` bytes of fresh memory whose first byte is ``align``-aligned (for direct writes), and the map
    that holds them (keep it while the view is in use)."""
    mm = mmap.mmap(-1, size + align)
    view = memoryview(mm)
    start = -address(view) % align
    return mm, view[start : start + size]


def open_direct(path: str) -> tuple[int, int]:
    """``(descriptor, alignment)`` of ``path`` opened again for direct writes, or ``(-1, 0)`` where the
    platform or filesystem has none. The alignment is whole filesystem blocks of at least 4 KiB, so a
    direct write never shares a block (or a page) with a buffered one."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return -1, 0
    try:
        fd = os.open(path, os.O_WRONLY | flag | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return -1, 0
    return fd, max(4096, os.fstat(fd).st_blksize)


def aligned_middle(offset: int, n: int, addr: int, align: int) -> tuple[int, int] | None:
    """The bytes ``[a, b)`` (relative to ``offset``) of a write of ``n`` bytes at file ``offset`` from
    memory at ``addr`` that may go direct: whole ``align`` blocks of the file, at an ``align``-aligned
    address; None when there are too few or the memory's phase differs from the file's."""
    a = -offset % align
    b = (offset + n) // align * align - offset
    if b - a < DIRECT_MIN or (addr + a) % align:
        return None
    return a, b


def write_direct(fd: int, view: memoryview, offset: int) -> None:
    """Write an aligned ``view`` at aligned ``offset`` of a direct descriptor (whole, or OSError)."""
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "direct write wrote nothing")
        view, offset = view[n:], offset + n


def splice_at(fd: int, view: memoryview, offset: int) -> bool:
    """Write ``view`` (writable) at ``offset`` of ``fd`` through a fresh pipe: ``vmsplice`` lends the pipe
    the buffer's pages, ``splice`` copies them into the file. Every byte lent is copied out before this
    returns, so the caller may reuse the buffer. False (nothing to undo: a retry rewrites the same bytes)
    where the kernel or filesystem cannot; OSError for real write errors (ENOSPC, EIO, EFBIG)."""
    vmsplice = _libc("vmsplice", ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_size_t, ctypes.c_uint,
                     restype=ctypes.c_ssize_t)
    if vmsplice is None or not hasattr(os, "splice"):
        spliced[0] = False
        return False
    import fcntl

    base = address(view)
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
        cap = fcntl.fcntl(w, getattr(fcntl, "F_GETPIPE_SZ", 1032))
        done, total = 0, len(view)
        while done < total:
            iov = _IoVec(base + done, min(cap, total - done))
            lent = vmsplice(w, ctypes.byref(iov), 1, 0)  # type: ignore[operator]
            if lent <= 0:
                err = ctypes.get_errno()
                if err in _REFUSED:
                    spliced[0] = False
                    return False
                raise OSError(err, os.strerror(err))
            moved = 0
            while moved < lent:
                try:
                    n = os.splice(r, fd, lent - moved, offset_dst=offset + done + moved)
                except OSError as e:
                    if e.errno in _REFUSED:
                        spliced[0] = False
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
