"""Read tensor rows out of memory-mapped safetensors files, without loading whole files.

Files are opened read-only and mapped privately (``ACCESS_COPY``: the mapping is writable for
torch's sake but nothing is ever written back, and the file cannot change through it). A row slice
is a zero-copy view of the mapping; ``release`` tells the kernel we are done with those pages
(``MADV_DONTNEED``), so the mapped pages do not pile up in the process's resident set as a
whole shard is streamed: RSS stays bounded by the blocks in flight, not the shard size.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from types import TracebackType

import torch

from streammerge.errors import CheckpointError
from streammerge.formats import mapped
from streammerge.formats.dtypes import torch_dtype
from streammerge.formats.refs import TensorRef


class TensorReader:
    """Hands out row slices of stored tensors; owns the file maps it opened. Thread-safe."""

    def __init__(self) -> None:
        self._maps: dict[str, tuple[int, mmap.mmap]] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def _map(self, path: str) -> mmap.mmap:
        with self._lock:
            if path not in self._maps:
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{path}: cannot open ({e.strerror or e})") from e
                try:
                    mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError) as e:
                    os.close(fd)
                    raise CheckpointError(f"{path}: cannot memory-map ({e})") from e
                self._maps[path] = (fd, mm)
            return self._maps[path][1]

    def fileno(self, path: str) -> int:
        """A read-only descriptor of ``path`` (for raw byte copies)."""
        self._map(path)
        return self._maps[path][0]

    def rows(self, ref: TensorRef, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of ``ref`` as a zero-copy tensor view (shape ``(r1 - r0, *shape[1:])``)."""
        mm = self._map(ref.path)
        shape = ref.shape or (1,)
        row_bytes = ref.nbytes // shape[0] if shape[0] else 0
        count = (r1 - r0) * row_bytes
        dtype = torch_dtype(ref.dtype)
        if count == 0:
            return torch.empty((r1 - r0, *shape[1:]), dtype=dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=count, offset=ref.offset + r0 * row_bytes)
        view = flat.view(dtype).view((r1 - r0, *shape[1:]))
        return view if ref.shape else view.reshape(())

    def tensor(self, ref: TensorRef) -> torch.Tensor:
        """The whole tensor as a view (callers that keep it must clone)."""
        return self.rows(ref, 0, ref.shape[0] if ref.shape else 1)

    def read_into(self, ref: TensorRef, buf: memoryview) -> None:
        """Copy ``ref``'s bytes into ``buf`` with ``pread`` (through the page cache, not this process's map)."""
        fd = self.fileno(ref.path)
        done = 0
        while done < ref.nbytes:
            n = os.preadv(fd, [buf[done:ref.nbytes]], ref.offset + done)
            if n <= 0:
                raise CheckpointError(
                    f"{ref.path}: tensor {ref.name!r} is truncated (read {done} of {ref.nbytes} bytes)"
                )
            done += n

    def release(self, ref: TensorRef, r0: int, r1: int) -> None:
        """Drop the pages of rows ``[r0, r1)`` from this process's mapping (page cache keeps them)."""
        shape = ref.shape or (1,)
        row_bytes = ref.nbytes // shape[0] if shape[0] else 0
        with self._lock:
            entry = self._maps.get(ref.path)
        if entry is not None:
            mapped.drop(entry[1], ref.offset + r0 * row_bytes, ref.offset + r1 * row_bytes)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for fd, mm in maps.values():
            # A tensor view still alive keeps the buffer exported; the map then goes with the last view.
            with contextlib.suppress(BufferError):
                mm.close()
            os.close(fd)
