"""bitsandbytes checkpoints: the layout (which stored tensors make which Linear weight). Pure.

See ``streammerge.formats.bnb`` (the codec, torch) for the serialized tensors and the arithmetic. A 4-bit
weight's shape and block size live in its packed JSON quant state, a small U8 tensor: ``index`` reads those
few bytes through ``registry.detect(read=)`` (``blob_names`` lists them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from streammerge.errors import CheckpointError, PlanError
from streammerge.formats.base import CODES, QuantIndex, QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

QUANT_TYPES = ("nf4", "fp4")
STATE_KEY = "quant_state.bitsandbytes__"  # + quant type
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, slots=True)
class State4bit:
    """The non-tensor part of a 4-bit quant state (the JSON in ``quant_state.bitsandbytes__*``)."""

    quant_type: str  # "nf4" | "fp4"
    blocksize: int
    dtype: str  # the dtype bitsandbytes dequantizes to: "bfloat16" | "float16" | "float32"
    shape: tuple[int, ...]  # the original weight's shape, e.g. (out, in)
    nested_blocksize: int | None = None
    nested_dtype: str | None = None
    nested_offset: float | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nested(self) -> bool:
        return self.nested_blocksize is not None


def parse_state(raw: bytes) -> State4bit:
    """Decode the packed quant-state bytes; ValueError (in words fit for a message) when they are not one."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"is not bitsandbytes' packed JSON quant state ({e})") from None
    if not isinstance(doc, dict):
        raise ValueError("is not bitsandbytes' packed JSON quant state (not an object)")
    quant_type, blocksize, dtype, shape = (doc.get(k) for k in ("quant_type", "blocksize", "dtype", "shape"))
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"has quant_type {quant_type!r}; bitsandbytes 4-bit knows {', '.join(QUANT_TYPES)}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"has blocksize {blocksize!r}; bitsandbytes uses one of {BLOCKSIZES}")
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"has dtype {dtype!r}; expected one of {', '.join(DTYPE_NAMES)}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError(f"has shape {shape!r}; expected a list of positive ints")
    nested = {k: doc.get(k) for k in ("nested_blocksize", "nested_dtype", "nested_offset")}
    present = [v is not None for v in nested.values()]
    if any(present) and not all(present):
        raise ValueError("has some nested_* fields but not all three (nested_blocksize, nested_dtype, nested_offset)")
    if all(present) and (nested["nested_blocksize"] not in BLOCKSIZES or nested["nested_dtype"] not in DTYPE_NAMES
                         or not isinstance(nested["nested_offset"], (int, float))):
        raise ValueError(f"has invalid nested fields {nested}")
    return State4bit(quant_type, blocksize, dtype, tuple(shape), **nested)


def byte_range(first: int, count: int) -> tuple[int, int]:
    """Bytes ``[b0, b1)`` of ``<m>.weight`` that hold values ``[first, first + count)``."""
    return first // 2, -(-(first + count) // 2)


# --------------------------------------------------------------------------------------------
# The format: quant_method "bitsandbytes" (4-bit and 8-bit weights), dequantize only.

METHOD = "bitsandbytes"
_ROLES_4BIT = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_WHOLE = frozenset({"quant_map", "nested_quant_map", "quant_state", "weight_format"})


@dataclass(frozen=True, slots=True)
class BnbWeight(QuantizedWeight):
    """A bitsandbytes weight: the parsed 4-bit state (None for 8-bit) and every part's row count."""

    state: State4bit | None = None
    lengths: tuple[tuple[str, int], ...] = ()


def blob_names(tensors: Mapping[str, TensorInfo]) -> tuple[str, ...]:
    """The small tensors whose bytes :meth:`Bitsandbytes.index` reads: 4-bit states, 8-bit weight formats."""
    return tuple(n for n in tensors if f".{STATE_KEY}" in n or n.endswith(".weight_format"))


class Bitsandbytes:
    """bitsandbytes checkpoints (``save_pretrained`` of a ``load_in_4bit`` / ``load_in_8bit`` model).

    Never re-encoded and never kept: a merge into bitsandbytes weights is written dequantized (in the
    output dtype, companions dropped, ``quantization_config`` removed); :meth:`output_config` refuses the
    keep-format mode. Row blocks of a 4-bit weight own whole (nested) absmax blocks.
    """

    name = METHOD
    blob_names = staticmethod(blob_names)

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == METHOD

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str,
              blobs: Mapping[str, bytes] | Callable[[str], bytes] = MappingProxyType({})) -> QuantIndex:
        read = blobs if callable(blobs) else blobs.__getitem__
        weights: dict[str, QuantizedWeight] = {}
        for name in tensors:
            if f".{STATE_KEY}" in name:
                qw = _index_4bit(name, tensors, read, where)
            elif name.endswith(".SCB"):
                qw = _index_8bit(name, tensors, read, where)
            else:
                continue
            weights[qw.name] = qw
        owned = {c for qw in weights.values() for c in qw.companions}
        for name in tensors:
            if name.rsplit(".", 1)[-1] in _ROLES_4BIT and name not in owned:
                raise CheckpointError(f"{where}: tensor {name!r} is bitsandbytes 4-bit state, but its weight has no "
                                      f"'{STATE_KEY}nf4/fp4' tensor; the checkpoint is incomplete: re-download it")
        if not weights:
            raise no_weights(where, qc, f"no '*.weight.{STATE_KEY}nf4/fp4' nor '*.SCB' tensor")
        return QuantIndex(METHOD, MappingProxyType(weights), MappingProxyType(dict(qc)))

    def rows(self, qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
        assert isinstance(qw, BnbWeight)
        if role in _WHOLE:
            return 0, dict(qw.lengths)[role]
        if qw.state is None:  # 8-bit: weight and SCB rows are the weight's rows
            return r0, r1
        cols, bs = qw.shape[1], qw.state.blocksize
        if role == CODES:
            return byte_range(r0 * cols, (r1 - r0) * cols)
        b0, b1 = r0 * cols // bs, -(-r1 * cols // bs)
        if role == "absmax":
            return b0, b1
        nbs = qw.state.nested_blocksize or 1
        return b0 // nbs, -(-b1 // nbs)  # nested_absmax

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        if not dequantized:
            raise PlanError(KEEP_REFUSAL.format(kind="bitsandbytes"))
        return None


#: One line for a keep-format merge into a format that cannot hold a merged weight (the CLI prints it).
KEEP_REFUSAL = (
    "a {kind} base cannot keep its format after a merge (re-quantizing would bury the LoRA delta in rounding "
    "noise): pass --dequantize to write the merged model in the config's dtype, or better, merge into the "
    "original 16-bit model if you have it (pass its directory as the base)"
)


def no_weights(where: str, qc: Mapping[str, object], stored: str) -> CheckpointError:
    """The config names a format none of whose tensors is stored (one line, naming the config)."""
    return CheckpointError(
        f"{where}: quantization_config.quant_method={qc.get('quant_method')!r}, but no tensor is stored that way "
        f"({stored}); the config does not describe these weights: fix config.json or use the 16-bit base"
    )


def _refuse(where: str, name: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: bitsandbytes tensor {name!r}: {problem}; the checkpoint is corrupt or "
                           "incomplete: re-download it")


def _index_4bit(state_name: str, tensors: Mapping[str, TensorInfo], read: Callable[[str], bytes],
                where: str) -> BnbWeight:
    weight = state_name.split(f".{STATE_KEY}")[0]
    try:
        state = parse_state(read(state_name))
    except ValueError as e:
        raise _refuse(where, state_name, str(e)) from None
    if state_name.rsplit("__", 1)[-1] != state.quant_type:
        raise _refuse(where, state_name, f"its name says {state_name.rsplit('__', 1)[-1]} but it holds "
                                         f"{state.quant_type}")
    if len(state.shape) != 2:
        raise _refuse(where, weight, f"shape {list(state.shape)} is not a Linear weight (out, in)")
    need = {CODES: weight, "absmax": f"{weight}.absmax", "quant_map": f"{weight}.quant_map"}
    if state.nested:
        need |= {"nested_absmax": f"{weight}.nested_absmax", "nested_quant_map": f"{weight}.nested_quant_map"}
    missing = [n for n in need.values() if n not in tensors]
    if missing:
        raise _refuse(where, missing[0], f"is missing (needed by {state_name!r})")
    nested_blocks = -(-state.blocks // (state.nested_blocksize or 1))
    want = {CODES: ("U8", -(-state.numel // 2)), "absmax": ("U8" if state.nested else "F32", state.blocks),
            "quant_map": ("F32", 16), "nested_absmax": ("F32", nested_blocks), "nested_quant_map": ("F32", 256)}
    lengths = [("quant_state", tensors[state_name].shape[0])]
    for role, name in need.items():
        t = tensors[name]
        if (t.dtype, t.numel) != want[role]:
            raise _refuse(where, name, f"is {t.dtype} with {t.numel} values, expected {want[role][0]} with "
                                       f"{want[role][1]} for a {state.quant_type} weight of shape {list(state.shape)}")
        lengths.append((role, t.shape[0] if t.shape else 1))
    cols, unit = state.shape[1], math.lcm(2, state.blocksize * (state.nested_blocksize or 1))
    align = unit // math.gcd(cols, unit)  # rows per block so that a block owns whole (nested) absmax blocks
    scheme = QuantScheme(METHOD, "block", (align, cols), "F32", _CODE[state.dtype], 0.0, reencodable=False)
    parts = (*need.items(), ("quant_state", state_name))
    return BnbWeight(weight, state.shape, tuple(parts), scheme, state, tuple(lengths))


_CODE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _index_8bit(scb_name: str, tensors: Mapping[str, TensorInfo], read: Callable[[str], bytes],
                where: str) -> BnbWeight:
    stem = scb_name.removesuffix(".SCB")
    weight, fmt = f"{stem}.weight", f"{stem}.weight_format"
    w, scb = tensors.get(weight), tensors[scb_name]
    if w is None:
        raise _refuse(where, weight, f"is missing (needed by {scb_name!r})")
    if w.dtype != "I8" or len(w.shape) != 2:
        raise _refuse(where, weight, f"is {w.dtype} {list(w.shape)}, expected a 2-D I8 LLM.int8 weight")
    if scb.dtype != "F32" or scb.shape != (w.shape[0],):
        raise _refuse(where, scb_name, f"is {scb.dtype} {list(scb.shape)}, expected F32 [{w.shape[0]}] (one per row)")
    parts: list[tuple[str, str]] = [(CODES, weight), ("SCB", scb_name)]
    if fmt in tensors:
        raw = read(fmt)
        if tensors[fmt].dtype != "U8" or raw not in (b"\x00",):
            raise _refuse(where, fmt, f"holds {raw!r}; bitsandbytes reads only the row layout (0)")
        parts.append(("weight_format", fmt))
    scheme = QuantScheme(METHOD, "block", (1, w.shape[1]), "F32", "F32", 0.0, reencodable=False)
    return BnbWeight(weight, w.shape, tuple(parts), scheme, None, (("weight_format", 1),))
