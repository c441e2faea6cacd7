"""Where a stored tensor's bytes are: the unit the planner hands to readers and writers."""

from __future__ import annotations

import math
from dataclasses import dataclass

from streammerge.formats.dtypes import DTYPE_SIZES
from streammerge.formats.safetensors import SafetensorsHeader, TensorInfo


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one stored tensor's bytes are: absolute file path and byte offset."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def tensor_ref(header: SafetensorsHeader, info: TensorInfo) -> TensorRef:
    """The :class:`TensorRef` of tensor ``info`` stored in the file ``header`` describes."""
    return TensorRef(header.path, info.name, info.dtype, info.shape, header.data_start + info.begin)
