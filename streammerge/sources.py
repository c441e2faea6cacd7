"""What the workers of one ``scatter.write_shards`` call read from: base files (descriptors for
``copy_file_range``, shared read-only maps to hash the copied bytes), the tensor reader and kernel
(imported on first use: this is where torch loads), and each worker's reusable output buffer."""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
from collections.abc import Sequence
from concurrent import futures

from streammerge import digest, diskio
from streammerge.budget import ExecOptions
from streammerge.errors import CheckpointError

LOG = logging.getLogger(__name__)
#: Bytes of the per-worker buffer through which copies go to a file opened for direct I/O (outside
#: ``max_memory``, like the interpreter and torch themselves).
COPY_BUFFER = 8 << 20
#: Output buffers per worker: it computes into one while the disk takes the other.
OUT_BUFFERS = 2


class Stopped(Exception):
    """The run is ending (an error or an interrupt elsewhere) while this unit still waited for torch."""


#: How often a unit waiting for torch's load looks whether the run is ending.
_POLL = 0.05


class Sources:
    """Read-only descriptors of base files (for copies), and the tensor reader (for blocks), made on first use."""

    def __init__(self, opts: ExecOptions) -> None:
        self._fds: dict[str, int] = {}
        self._maps: dict[str, mmap.mmap] = {}
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()  # held while torch loads: copies must not wait for it
        self._stopping = threading.Event()
        self._opts = opts
        self.reader = None
        self._local = threading.local()
        self._threads_before: int | None = None
        #: Runs copies while torch loads (``copier_process.CopyProcess``), where ``scatter`` starts one.
        self.copy_process = None

    def fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                try:
                    self._fds[path] = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from e
            return self._fds[path]

    def hash_copied(self, path: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Piece digests of byte ranges of base file ``path``, read through a shared read-only map
        (``digest.map_digests``: its pages dropped every 16 MiB; dropped only once per copy unit, two workers
        held up to 2 x 256 MiB of mapped pages: RSS 789 MB on 70b-slice-2 against 565 before; RESULTS.md)."""
        with self._lock:
            if path not in self._maps:
                self._maps[path] = mmap.mmap(self._fds[path], 0, access=mmap.ACCESS_READ)
            mm = self._maps[path]
        return digest.map_digests(mm, ranges)

    def engine(self):
        """``streammerge.execute`` (imports torch) and the shared reader; the first call sets torch's threads
        (``intra_op_threads``)."""
        while not self._engine_lock.acquire(timeout=_POLL):  # another thread is loading torch
            if self._stopping.is_set():
                raise Stopped
        try:
            if self.reader is None:
                started = time.perf_counter()
                from streammerge import execute
                from streammerge.formats.reader import TensorReader  # imports torch

                with self._lock:  # ``close`` may have run meanwhile: then torch's threads are left alone
                    if self._stopping.is_set():
                        raise Stopped
                    self._threads_before = execute.set_intra_op_threads(self._opts)
                    self.reader = TensorReader()
                LOG.debug("torch and the kernel loaded in %.2f s", time.perf_counter() - started)
            from streammerge import execute
        finally:
            self._engine_lock.release()
        return execute, self.reader

    def after(self, load: futures.Future) -> None:
        """Wait for ``load`` (torch's, on the loader thread); ``Stopped`` if the run ends first."""
        while not load.done():
            if self._stopping.is_set():
                raise Stopped
            futures.wait([load], timeout=_POLL)

    def stop(self) -> None:
        """The run is ending: units still waiting for torch give up (``Stopped``) instead of waiting for its
        import, which can take seconds (more on a cold cache), so an interrupt or an error returns at once."""
        self._stopping.set()

    def buffer(self, nbytes: int, phase: int = 0, align: int = 0):
        """``(slot, tensor)``: one of this thread's ``OUT_BUFFERS`` output buffers (uint8, ``nbytes``), reused
        between blocks, whose earlier write (``lend``) has finished. With ``align``, its address is ``phase``
        modulo ``align``: a block meant for file offset ``phase`` then has the aligned part the disk can take
        directly (``writer.ShardFile.pwrite``)."""
        import torch

        ring = getattr(self._local, "ring", None)
        if ring is None:
            self._local.ring = ring = [[None, None] for _ in range(OUT_BUFFERS)]  # [tensor, write in flight]
            self._local.turn = 0
        slot = self._local.turn
        self._local.turn = (slot + 1) % OUT_BUFFERS
        held = ring[slot]
        if held[1] is not None:
            futures.wait([held[1]])  # its errors surface where the write's future is collected
            held[1] = None
        buf = held[0]
        if buf is None or buf.numel() < nbytes + align:
            held[0] = buf = None  # drop the old one first
            held[0] = buf = torch.empty(nbytes + align, dtype=torch.uint8)
        # (torch aligns the allocation to 64 bytes, so ``start`` keeps ``phase``'s alignment to every dtype
        # size; a phase that is not 8-aligned gets none)
        start = (phase - buf.data_ptr()) % align if align and phase % 8 == 0 else 0
        return slot, buf[start : start + nbytes]

    def lend(self, slot: int, write: futures.Future) -> None:
        """Buffer ``slot`` of this thread is being written by ``write``; ``buffer`` waits for it before reuse."""
        self._local.ring[slot][1] = write

    def copy_buffer(self, align: int) -> memoryview:
        """This thread's ``COPY_BUFFER`` bytes, ``align``-aligned, for copies written direct."""
        held = getattr(self._local, "copy", None)
        if held is None or held[1] != align:
            mm, view = diskio.aligned_buffer(COPY_BUFFER, align)
            self._local.copy = held = (mm, align, view)
        return held[2]

    def close(self) -> None:
        """Close what was opened (after every thread but a still-importing loader has stopped: ``stop``)."""
        self.stop()
        with self._lock:
            fds, self._fds = self._fds, {}
            maps, self._maps = self._maps, {}
            reader, self.reader = self.reader, None
        for mm in maps.values():
            mm.close()
        for fd in fds.values():
            os.close(fd)
        if reader is not None:
            reader.close()
        if self._threads_before is not None:
            from streammerge import execute

            execute.restore_intra_op_threads(self._threads_before)
            self._threads_before = None
