"""Integrity digests of output files, computed by whichever thread already holds the bytes.

Two checksums (``--checksum``); each record in the manifest names its own, so a reader knows which
one it holds (a record has exactly one of the keys below):

``xxh3_128_rows`` (default, shards only)
    A shard's bytes are cut into *pieces*, in file order:

    1. the header piece: bytes ``[0, 8 + N)`` (the length prefix and the JSON header);
    2. for each tensor in data order, its bytes cut at multiples of 64 rows of its first dimension,
       exactly as ``plan.row_blocks(rows, 64)`` cuts them (a tail of fewer than 64 rows joins the
       piece before it; a 0-d tensor is one piece; an empty tensor has none).

    The digest is ``XXH3-128(d_0 ‖ d_1 ‖ … ‖ d_n)``, where ``d_i`` is the 16-byte XXH3-128 digest
    (canonical big-endian, ``xxhash.xxh3_128_digest``) of piece ``i``; written as 32 hex digits.
    Every piece is a whole number of rows cut at a 64-row boundary, and so is every merge block and
    every raw-copied tensor, so each piece is hashed by the worker that computed or copied it, in
    any order; the worker count and the memory budget do not change the digest. It is computable
    from the file alone (its header gives the tensors' offsets and shapes): see ``file_digest``.

``xxh3_128`` (default, other files: config, tokenizer, index)
    XXH3-128 of the file's bytes (``xxh128sum`` prints the same 32 hex digits).

``sha256`` (``--checksum sha256``; what older releases wrote for every file)
    SHA-256 of the file's bytes (``sha256sum``). Shards are hashed in file order as the written
    prefix grows (from the page cache of the temporary file), one thread, at ~1.7 GB/s.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import xxhash

from streammerge.formats import mapped
from streammerge.plan import ROW_ALIGN, ShardPlan, TensorTask, row_blocks

#: ``--checksum`` values.
CHECKSUMS = ("xxh3", "sha256")
SHARD_KEYS = {"xxh3": "xxh3_128_rows", "sha256": "sha256"}
FILE_KEYS = {"xxh3": "xxh3_128", "sha256": "sha256"}
#: Every digest key a record may carry (older releases wrote only ``sha256``).
ALL_KEYS = ("xxh3_128_rows", "xxh3_128", "sha256")
_READ = 8 << 20


def _row_pieces(rows: int, nbytes: int) -> tuple[tuple[int, int], ...]:
    return row_blocks(rows, ROW_ALIGN) if nbytes else ()


def task_pieces(task: TensorTask) -> tuple[tuple[int, int], ...]:
    """The row ranges ``[r0, r1)`` of ``task`` that are pieces (none for an empty tensor)."""
    return _row_pieces(task.rows, task.nbytes)


def _layout(header_len: int, tensors: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Byte ranges of the pieces of a file with a ``header_len``-byte header and tensors ``(rows, nbytes)``
    laid out back to back in that order."""
    out = [(0, header_len)]
    offset = header_len
    for rows, nbytes in tensors:
        row_bytes = nbytes // rows if rows else 0
        out += [(offset + r0 * row_bytes, offset + r1 * row_bytes) for r0, r1 in _row_pieces(rows, nbytes)]
        offset += nbytes
    return out


def shard_pieces(shard: ShardPlan) -> list[tuple[int, int]]:
    """Byte ranges ``[start, end)`` of every piece of ``shard``'s file, in file order."""
    return _layout(len(shard.header), ((t.rows, t.nbytes) for t in shard.tasks))


def safetensors_pieces(path: Path) -> list[tuple[int, int]]:
    """The pieces of a safetensors file, from its own header (what ``shard_pieces`` gives for a shard
    streammerge wrote: tensors back to back in offset order)."""
    from streammerge.formats.safetensors import read_header

    header = read_header(path)
    tensors = sorted(header.tensors, key=lambda t: t.begin)
    offset = header.data_start
    layout = [(0, offset)]
    for t in tensors:
        rows = t.shape[0] if t.shape else 1
        layout += [(offset + t.begin + a, offset + t.begin + b) for a, b in _layout(0, [(rows, t.end - t.begin)])[1:]]
    return layout


def piece_digest(data: memoryview | bytes) -> bytes:
    return xxhash.xxh3_128_digest(data)


class PieceFeed:
    """Digests of consecutive pieces of the given byte lengths, fed as a stream of runs of any size (a copy
    hashed from the buffer it passes through: ``writer.ShardFile.copy_in``). A piece that lies inside one
    run is hashed in one call; one that spans runs, incrementally: XXH3's streaming digest is its one-shot
    digest, so both give ``piece_digest`` of the piece."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self._lengths = lengths
        self._digests: list[bytes] = []
        self._need = lengths[0] if lengths else 0  # bytes still to come of the current piece
        self._partial = None  # an xxh3_128 state while a piece spans runs

    def __call__(self, data: memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            if self._need == 0:
                raise AssertionError("fed more bytes than the pieces hold")
            take = min(self._need, len(view))
            if self._partial is None and take == self._need:
                self._digests.append(piece_digest(view[:take]))
            else:
                if self._partial is None:
                    self._partial = xxhash.xxh3_128()
                self._partial.update(view[:take])
                if take == self._need:
                    self._digests.append(self._partial.digest())
                    self._partial = None
            view = view[take:]
            self._need -= take
            if self._need == 0 and len(self._digests) < len(self._lengths):
                self._need = self._lengths[len(self._digests)]

    def digests(self) -> list[bytes]:
        """The pieces' digests, in order (every piece must have been fed whole)."""
        if len(self._digests) != len(self._lengths) or self._need:
            raise AssertionError(f"fed {len(self._digests)} of {len(self._lengths)} pieces")
        return self._digests


def combine(digests: Iterable[bytes]) -> str:
    """The shard digest from its pieces' digests, in file order."""
    return xxhash.xxh3_128_hexdigest(b"".join(digests))


def _pread_pieces(fd: int, ranges: Sequence[tuple[int, int]], path: Path) -> Iterable[bytes]:
    """The XXH3-128 digest of each byte range of ``fd`` (read in pieces of at most ``_READ``)."""
    buf = memoryview(bytearray(_READ))
    for start, end in ranges:
        h = xxhash.xxh3_128() if end - start > _READ else None
        pos = start
        while pos < end:
            n = os.preadv(fd, [buf[: min(_READ, end - pos)]], pos)
            if n <= 0:
                raise EOFError(f"{path}: ended at byte {pos}")
            if h is None:
                yield piece_digest(buf[:n])
            else:
                h.update(buf[:n])
            pos += n
        if h is not None:
            yield h.digest()


def map_digests(mm: mmap.mmap, ranges: Sequence[tuple[int, int]],
                progress: Callable[[int], None] | None = None) -> list[bytes]:
    """Piece digests of byte ranges of a read-only map, in order, hashed from the page cache without a copy
    (measured 0.2 CPU-s per 2 GB against 0.35 for ``pread``). The pages read are dropped from this process
    every ``mapped.DROP_EVERY`` bytes and at the end (the page cache keeps them), so hashing a file through a
    map does not grow the resident set by the file. ``progress(n)`` after each range."""
    digests: list[bytes] = []
    with memoryview(mm) as view:  # released however this ends (an interrupt), so the map can be closed
        start = ranges[0][0] if ranges else 0
        for a, b in ranges:
            with view[a:b] as piece:
                digests.append(piece_digest(piece))
            if progress is not None:
                progress(b - a)
            if b - start >= mapped.DROP_EVERY:
                mapped.drop(mm, start, b)
                start = b
        if ranges:
            mapped.drop(mm, start, ranges[-1][1])
    return digests


def shard_digest(path: Path, shard: ShardPlan | None = None) -> str:
    """``xxh3_128_rows`` of the file at ``path``, its pieces laid out as ``shard`` lays them out (None:
    as the file's own header does, ``safetensors_pieces``)."""
    pieces = shard_pieces(shard) if shard is not None else safetensors_pieces(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        return combine(_pread_pieces(fd, pieces, path))
    finally:
        os.close(fd)


def stream_hasher(key: str):
    """A fresh ``hashlib``-style hasher for a whole-file key (``sha256`` or ``xxh3_128``)."""
    return hashlib.sha256() if key == "sha256" else xxhash.xxh3_128()


def stream_digest(path: Path, key: str) -> str:
    """``sha256`` or ``xxh3_128`` of a whole file, read in chunks."""
    h = stream_hasher(key)
    with path.open("rb") as f:
        while chunk := f.read(_READ):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path: Path, key: str, shard: ShardPlan | None = None) -> str:
    """The digest named by record key ``key`` of ``path`` (``shard``: its layout, for ``xxh3_128_rows``)."""
    if key == "xxh3_128_rows":
        return shard_digest(path, shard)
    return stream_digest(path, key)


def record_digest(record: dict) -> tuple[str, str] | None:
    """``(key, hex)`` of the one digest a manifest record carries, or None when it has none."""
    found = [(k, record[k]) for k in ALL_KEYS if isinstance(record.get(k), str)]
    return found[0] if len(found) == 1 else None


class Sha256Prefix:
    """SHA-256 of a file written out of order: fed, in order, each prefix of it that is complete."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path = fd, path
        self._hash = hashlib.sha256()
        self._done = 0
        self._buf = memoryview(bytearray(_READ))

    def advance(self, upto: int) -> None:
        """Hash bytes ``[done, upto)`` (written already, so in the page cache)."""
        while self._done < upto:
            n = os.preadv(self._fd, [self._buf[: min(_READ, upto - self._done)]], self._done)
            if n <= 0:
                raise EOFError(f"{self._path}: ended at byte {self._done}")
            self._hash.update(self._buf[:n])
            self._done += n

    def hexdigest(self) -> str:
        return self._hash.hexdigest()
