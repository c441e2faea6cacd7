"""The safetensors header codec: read and validate a file's header, and encode a new one.

A safetensors file is ``u64 little-endian N`` + ``N bytes of JSON`` + the tensor bytes. The JSON
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to
the first byte after the header), plus an optional ``"__metadata__"`` map of strings.

``read_header`` reads only the 8 + N header bytes and validates everything a reader relies on,
before any tensor byte is touched: the header length is bounded, the JSON is an object, each dtype
is known, ``shape × itemsize == end − begin``, the slots lie inside the file, do not overlap and
leave no hole, and the file is exactly as long as the header says (so a truncated shard is caught
here, by name, and never mmapped past its end). Hostile headers only ever raise
:class:`~streammerge.errors.CheckpointError`.

``encode_header`` lays tensors out the way ``safetensors.torch.save`` does (sorted by dtype,
largest first, then by name; JSON without spaces; ``__metadata__`` first; space padding to a
multiple of 8), so our files are byte-identical to the reference serializer's.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from streammerge.errors import CheckpointError
from streammerge.formats.dtypes import DTYPE_RANK, DTYPE_SIZES, FLOAT_DTYPES  # noqa: F401  (FLOAT_DTYPES re-exported)

#: Largest header we accept. safetensors itself refuses headers over 100 MB.
MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor slot of a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header. ``raw`` is the file's first ``data_start`` bytes, verbatim."""

    path: str
    raw: bytes
    tensors: tuple[TensorInfo, ...]  # in data (byte) order
    metadata: tuple[tuple[str, str], ...]

    @property
    def data_start(self) -> int:
        return len(self.raw)

    @property
    def data_size(self) -> int:
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_size

    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tensors)

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (8 + N bytes only).

    Raises:
        CheckpointError: unreadable file, or any validation failure (named, with what to do).
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: {size} bytes is too short for a safetensors file (no 8-byte header length); "
                    "the file is truncated or not safetensors: re-download or re-save it"
                )
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} is impossible for a {size}-byte file "
                    f"(limit {MAX_HEADER_BYTES}); the file is corrupt or truncated: re-download or re-save it"
                )
            body = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e}); check the path and permissions") from e
    return parse_header(prefix + body, file_size=size, path=str(path))


def parse_header(raw: bytes, *, file_size: int, path: str = "<bytes>") -> SafetensorsHeader:
    """Validate ``raw`` (the 8-byte length + JSON) against a file of ``file_size`` bytes.

    Pure; used by :func:`read_header` and directly by the fuzz tests.
    """
    if len(raw) < 8:
        raise CheckpointError(f"{path}: header shorter than 8 bytes; the file is not safetensors")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > MAX_HEADER_BYTES or len(raw) != 8 + n:
        raise CheckpointError(f"{path}: header length field {n} does not match the header read; the file is corrupt")
    try:
        doc = json.loads(raw[8:].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(
            f"{path}: header is not valid JSON ({e}); the file is corrupt: re-download or re-save it"
        ) from e
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt")

    metadata = _parse_metadata(doc.pop("__metadata__", None), path)
    infos = sorted((_parse_entry(name, entry, path) for name, entry in doc.items()), key=lambda t: (t.begin, t.end))
    data_size = file_size - 8 - n
    for info in infos:
        if info.end > data_size:
            raise CheckpointError(
                f"{path}: tensor {info.name!r} has data_offsets [{info.begin}, {info.end}] beyond the file's "
                f"{max(data_size, 0)} data bytes; the file is truncated or corrupt: re-download or re-save it"
            )
    expected = 0
    for info in infos:
        if info.begin != expected:
            what = "overlaps the previous tensor" if info.begin < expected else "leaves a hole before it"
            raise CheckpointError(
                f"{path}: tensor {info.name!r} starts at byte {info.begin}, which {what} (expected {expected}); "
                "the file is corrupt: re-download or re-save it"
            )
        expected = info.end
    data_start = 8 + n
    if data_start + expected != file_size:
        state = "truncated" if data_start + expected > file_size else "longer than its header describes"
        raise CheckpointError(
            f"{path}: file is {state}: the header needs {data_start + expected} bytes, the file has {file_size}; "
            "re-download or re-save it"
        )
    return SafetensorsHeader(path=path, raw=bytes(raw), tensors=tuple(infos), metadata=metadata)


def _parse_metadata(meta: object, path: str) -> tuple[tuple[str, str], ...]:
    if meta is None:
        return ()
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings; the file is corrupt")
    return tuple(meta.items())


def _parse_entry(name: str, entry: object, path: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: header entry for tensor {name!r} is not an object; the file is corrupt")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(
            f"{path}: tensor {name!r} has dtype {dtype!r}, which streammerge does not know "
            f"(known: {', '.join(DTYPE_SIZES)}); "
            "sub-byte dtypes mean a quantized checkpoint: use the full-precision base"
        )
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}; the file is corrupt")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}; the file is corrupt")
    begin, end = offsets
    want = math.prod(shape) * DTYPE_SIZES[dtype]
    if end < begin or end - begin != want:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({dtype}, shape {tuple(shape)}) needs {want} bytes but its offsets "
            f"[{begin}, {end}] span {end - begin}; the file is corrupt: re-download or re-save it"
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63


def encode_header(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, tuple[TensorInfo, ...]]:
    """Lay out ``(name, dtype, shape)`` tensors as ``safetensors.torch.save`` would.

    Returns:
        The header bytes (8-byte length + padded JSON) and the slots in data order.
    """
    order = sorted(tensors, key=lambda t: (-DTYPE_RANK[t[1]], t[0]))
    infos: list[TensorInfo] = []
    offset = 0
    for name, dtype, shape in order:
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        infos.append(TensorInfo(name, dtype, tuple(shape), offset, offset + nbytes))
        offset += nbytes
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = dict(metadata)
    for t in infos:
        doc[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [t.begin, t.end]}
    body = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-(8 + len(body)) % 8)
    return struct.pack("<Q", len(body)) + body, tuple(infos)
