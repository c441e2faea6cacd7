"""Index a pickled torch ``.bin`` state dict as if it were a safetensors header (no tensor byte read)."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import torch

from streammerge.errors import CheckpointError
from streammerge.formats.dtypes import dtype_code
from streammerge.formats.safetensors import SafetensorsHeader, TensorInfo


def read_pickle_index(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Index a torch ``.bin`` state dict (``pytorch_model*.bin``, ``adapter_model.bin``) without reading it.

    The file is opened only with ``torch.load(mmap=True, weights_only=True)``: no code runs, no tensor
    byte is read. torch's zip format stores each storage uncompressed as one record, and an mmap load
    views storage ``k`` at ``file map + offset(record k)``; so every contiguous tensor's bytes lie at a
    fixed file offset and the result is a header the planner and :class:`TensorReader` use as they use
    a safetensors header (``data_start`` 0, offsets absolute; ``raw`` empty: never write it out).

    Raises:
        CheckpointError: not a zip-format torch file, not a flat dict of tensors, a non-contiguous
            tensor, or storages that cannot be placed in the file; each with what to do.
    """
    path = Path(path)
    fix = "re-save it with safetensors (save_pretrained) or with a current torch.save"
    try:
        records = _zip_records(path)
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(
            f"{path}: cannot read as a torch zip checkpoint with weights_only=True ({e}); {fix}"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a flat state dict of tensors; {fix}")
    ptrs = sorted({t.untyped_storage().data_ptr() for t in state.values() if t.numel()})
    base = ptrs[0] - min(records) if ptrs and records else 0
    infos = []
    for name, t in state.items():
        if dtype_code(t.dtype) is None or (t.numel() and not t.is_contiguous()):
            raise CheckpointError(
                f"{path}: tensor {name!r} ({t.dtype}, strides {t.stride()}) cannot be streamed; {fix}"
            )
        if not t.numel():
            continue
        record = t.untyped_storage().data_ptr() - base
        begin = record + t.storage_offset() * t.element_size()
        if records.get(record, -1) < begin - record + t.numel() * t.element_size():
            raise CheckpointError(f"{path}: tensor {name!r} does not lie in a stored record of the file; {fix}")
        end = begin + t.numel() * t.element_size()
        infos.append(TensorInfo(name, dtype_code(t.dtype), tuple(t.shape), begin, end))
    del state
    infos.sort(key=lambda i: (i.begin, i.name))
    return SafetensorsHeader(str(path), b"", tuple(infos), ())


def _zip_records(path: Path) -> dict[int, int]:
    """Absolute data offset -> size of every stored (uncompressed) ``…/data/…`` record of a torch zip file."""
    out = {}
    with zipfile.ZipFile(path) as z, path.open("rb") as f:
        for info in z.infolist():
            if "/data/" not in info.filename or info.compress_type != zipfile.ZIP_STORED:
                continue
            f.seek(info.header_offset)
            local = f.read(30)
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            out[info.header_offset + 30 + name_len + extra_len] = info.file_size
    return out
