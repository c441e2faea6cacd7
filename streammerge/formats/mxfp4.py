"""MXFP4 (OCP microscaling FP4), as GPT-OSS stores its MoE experts. Pure tensor arithmetic, no I/O.

On disk, a fused expert parameter ``<m>.mlp.experts.<p>`` is two tensors:

* ``<p>_blocks`` U8 (E, R, G, 16): each byte holds two FP4 E2M1 codes, the low nibble first; a group of
  32 consecutive values along the last (``C = G·32``) axis shares one scale;
* ``<p>_scales`` U8 (E, R, G): the group's E8M0 exponent, biased by 127 (value 2**(s - 127)).

The decoded disk matrix per expert is (R, C); the in-memory parameter that PEFT adapts is its transpose,
``P[e] = decoded[e].T`` of shape (C, R): for ``gate_up_proj`` disk (E, 2I, H/32, 16) -> P (E, H, 2I) with gate
and up interleaved along the last axis (gate = ``P[..., 0::2]``, up = ``P[..., 1::2]``); for ``down_proj`` disk
(E, H, I/32, 16) -> P (E, I, H).

The arithmetic is transformers' ``integrations/mxfp4.py::_convert_moe_packed_tensors`` (what
``Mxfp4Config(dequantize=True)`` loads), op for op: a lookup in a table of the target dtype, then
``torch.ldexp`` into that dtype. Any row block of P decoded here is bit-identical to the same rows of
transformers' whole-tensor result (tests/test_formats_quant.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch

from streammerge.errors import CheckpointError
from streammerge.formats.base import CODES, QuantIndex, QuantizedWeight, QuantScheme

if TYPE_CHECKING:
    from streammerge.formats.safetensors import TensorInfo

#: FP4 E2M1 code -> value (code bit 3 is the sign). transformers' ``FP4_VALUES``.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
METHOD = "mxfp4"
SCALES = "scales"  # role of the E8M0 part (the blocks are ``CODES``)
GROUP = 32  # values per E8M0 scale
BYTES_PER_GROUP = GROUP // 2
E8M0_BIAS = 127
BLOCKS_SUFFIX = "_blocks"
SCALES_SUFFIX = "_scales"


def param_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The in-memory parameter's shape for a ``_blocks`` tensor of ``blocks_shape`` (…, R, G, 16) -> (…, G·32, R)."""
    *lead, rows, groups, width = blocks_shape
    return (*lead, groups * 2 * width, rows)


def check_pair(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> str | None:
    """Why a ``(_blocks, _scales)`` pair of these shapes is not MXFP4, or None when it is."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BYTES_PER_GROUP:
        return f"blocks shape {blocks_shape} should be (..., rows, groups, {BYTES_PER_GROUP})"
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        return f"scales shape {tuple(scales_shape)} should be {tuple(blocks_shape[:-1])} (one per 32-value group)"
    return None


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Disk layout in, disk layout out: blocks (…, G, 16) U8 and scales (…, G) U8 -> (…, G·32) in ``dtype``.

    Op for op as transformers: ``lut[lo]`` into even columns, ``lut[hi]`` into odd ones, then
    ``ldexp(value, scale - 127)`` written into ``dtype`` (one rounding of the exact product).
    """
    *lead, groups, width = blocks.shape
    rows = 1
    for d in lead:
        rows *= d
    rows *= groups
    blk = blocks.to(torch.uint8).reshape(rows, width)  # (rows·G, 16)
    exp = (scales.to(torch.int32) - E8M0_BIAS).reshape(rows, 1)  # (rows·G, 1)
    lut = torch.tensor(FP4_E2M1, dtype=dtype, device=blocks.device)
    out = torch.empty(rows, width * 2, dtype=dtype, device=blocks.device)
    out[:, 0::2] = lut[(blk & 0x0F).to(torch.int)]
    out[:, 1::2] = lut[(blk >> 4).to(torch.int)]
    torch.ldexp(out, exp, out=out)
    return out.reshape(*lead, groups * width * 2)


def param_rows(blocks: torch.Tensor, scales: torch.Tensor, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``[r0, r1)`` of one expert's parameter ``P[e] = dequantize(blocks[e], scales[e]).T``, contiguous.

    blocks (R, G, 16), scales (R, G) -> (r1 - r0, R). P's rows are the disk matrix's columns, so only the
    groups ``[r0 // 32, ceil(r1 / 32))`` are decoded (a strided read of the disk tensors).
    """
    g0, g1 = r0 // GROUP, -(-r1 // GROUP)
    cols = dequantize(blocks[:, g0:g1], scales[:, g0:g1], dtype)  # (R, (g1 - g0)·32)
    return cols[:, r0 - g0 * GROUP : r1 - g0 * GROUP].T.contiguous()


class MXFP4:
    """GPT-OSS ``quant_method: "mxfp4"`` checkpoints: fused 3-D expert parameters as ``_blocks`` + ``_scales``.

    A quantized weight is the in-memory parameter (what ``target_parameters`` adapts), e.g.
    ``….mlp.experts.gate_up_proj`` of shape (E, C, R); its rows are those of the (E·C, R) view, and row blocks
    are whole experts (``row_align`` = C): rows ``[e0·C, e1·C)`` read experts ``[e0, e1)`` of both parts.

    Never re-encoded: re-rounding to FP4 would bury a LoRA delta. Without dequantization, a touched weight is
    written in the output dtype under its parameter name and its experts module (gate_up_proj and down_proj
    together: :meth:`written_together`) is added to ``modules_to_not_convert``, which transformers reads.
    """

    name = METHOD

    def claims(self, qc: Mapping[str, object]) -> bool:
        return qc.get("quant_method") == METHOD

    def index(self, qc: Mapping[str, object], tensors: Mapping[str, TensorInfo], where: str) -> QuantIndex:
        weights: dict[str, QuantizedWeight] = {}
        for name, t in tensors.items():
            if name.endswith(SCALES_SUFFIX) and name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX not in tensors:
                owner = name.removesuffix(SCALES_SUFFIX) + BLOCKS_SUFFIX
                raise CheckpointError(
                    f"{where}: tensor {name!r} is an MXFP4 scale but its blocks {owner!r} are in no shard; the "
                    "checkpoint is incomplete: re-download it"
                )
            if not name.endswith(BLOCKS_SUFFIX):
                continue
            param = name.removesuffix(BLOCKS_SUFFIX)
            scales = tensors.get(param + SCALES_SUFFIX)
            if scales is None:
                raise CheckpointError(
                    f"{where}: MXFP4 tensor {name!r} has no {param + SCALES_SUFFIX!r} in any shard; without its "
                    "scales it cannot be dequantized: the checkpoint is incomplete, re-download it"
                )
            problem = check_pair(t.shape, scales.shape)
            if t.dtype != "U8" or scales.dtype != "U8":
                problem = f"blocks are {t.dtype} and scales {scales.dtype}, both should be U8"
            elif problem is None and len(t.shape) != 4:
                problem = f"blocks shape {t.shape} is not fused experts (experts, rows, groups, 16)"
            if problem:
                raise CheckpointError(
                    f"{where}: MXFP4 tensor {name!r}: {problem}; the checkpoint is corrupt or not GPT-OSS MXFP4"
                )
            if param in tensors:
                raise CheckpointError(
                    f"{where}: tensor {param!r} is stored both plain and as MXFP4 {name!r}; keep one of them"
                )
            shape = param_shape(t.shape)  # (E, C, R)
            scheme = QuantScheme(METHOD, "block", (shape[1], shape[2]), "U8", "F32", 0.0, reencodable=False)
            weights[param] = QuantizedWeight(param, shape, ((CODES, name), (SCALES, scales.name)), scheme)
        return QuantIndex(METHOD, MappingProxyType(weights), MappingProxyType(dict(qc)))

    def rows(self, qw: QuantizedWeight, role: str, r0: int, r1: int) -> tuple[int, int]:
        per_expert = qw.shape[1]
        return r0 // per_expert, -(-r1 // per_expert)

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """Experts ``[e0, e1)``: blocks (k, R, G, 16), scales (k, R, G) -> rows (k·C, R) of P = decoded.T."""
        disk = dequantize(parts[CODES], parts[SCALES], out_dtype)  # (k, R, C)
        return disk.transpose(1, 2).reshape(-1, disk.shape[1])  # (k, C, R) -> (k·C, R), contiguous

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("MXFP4 weights are never re-encoded (see MXFP4)")

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError("MXFP4 weights are never re-encoded (see MXFP4)")

    def written_together(self, index: QuantIndex, name: str) -> tuple[str, ...]:
        """The quantized weights that must be written dequantized with ``name`` (same module, same config entry)."""
        module = name.rsplit(".", 1)[0]
        return tuple(sorted(w for w in index.weights if w.rsplit(".", 1)[0] == module))

    def output_config(
        self, qc: Mapping[str, object], dequantized: bool, touched: frozenset[str]
    ) -> dict[str, object] | None:
        """None when dequantized; else ``qc`` with every touched weight's module in ``modules_to_not_convert``."""
        if dequantized:
            return None
        out = dict(qc)
        keep = list(out.get("modules_to_not_convert") or [])
        out["modules_to_not_convert"] = keep + sorted({t.rsplit(".", 1)[0] for t in touched} - set(keep))
        return out
