"""The one dtype table: safetensors dtype codes, their sizes, their torch dtypes.

Pure Python at import time; ``torch_dtype``/``dtype_code`` import torch only when first called, so the
planner and the CLI's argument checks never pay for importing torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

# dtype code -> itemsize, in the declaration order of safetensors' Rust ``Dtype`` enum: the data
# of a file written by safetensors is sorted by this order, descending. Sub-byte float codes
# (F4, F6_*) exist only in quantized checkpoints and are deliberately absent: such a file is
# refused as an unknown dtype, with a message pointing at the full-precision base.
_DTYPE_ORDER: tuple[tuple[str, int], ...] = (
    ("BOOL", 1),
    ("U8", 1),
    ("I8", 1),
    ("F8_E5M2", 1),
    ("F8_E4M3", 1),
    ("F8_E8M0", 1),
    ("I16", 2),
    ("U16", 2),
    ("F16", 2),
    ("BF16", 2),
    ("I32", 4),
    ("U32", 4),
    ("F32", 4),
    ("C64", 8),
    ("F64", 8),
    ("I64", 8),
    ("U64", 8),
)
DTYPE_SIZES: Mapping[str, int] = dict(_DTYPE_ORDER)
DTYPE_RANK: Mapping[str, int] = {code: rank for rank, (code, _) in enumerate(_DTYPE_ORDER)}

#: Floating dtypes a LoRA delta can be merged into.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@cache
def torch_dtypes() -> dict[str, object]:
    import torch

    out: dict[str, object] = {
        "BOOL": torch.bool,
        "U8": torch.uint8,
        "I8": torch.int8,
        "I16": torch.int16,
        "U16": torch.uint16,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I32": torch.int32,
        "U32": torch.uint32,
        "F32": torch.float32,
        "F64": torch.float64,
        "I64": torch.int64,
        "U64": torch.uint64,
        "C64": torch.complex64,
        "F8_E5M2": torch.float8_e5m2,
        "F8_E4M3": torch.float8_e4m3fn,
    }
    if hasattr(torch, "float8_e8m0fnu"):
        out["F8_E8M0"] = torch.float8_e8m0fnu
    return out


def torch_dtype(code: str):  # -> torch.dtype
    """The torch dtype of a safetensors dtype code (KeyError for one torch cannot hold)."""
    return torch_dtypes()[code]


@cache
def _codes() -> dict[object, str]:
    return {v: k for k, v in torch_dtypes().items()}


def dtype_code(dtype) -> str | None:  # torch.dtype -> code
    """The safetensors code of a torch dtype, or None."""
    return _codes().get(dtype)
