"""GPTQ and AWQ packed-integer Linear weights: dequantize only. Pure tensor arithmetic, no I/O.

Both store the transposed weight W^T (in, out) as unsigned ``bits``-bit codes packed into I32, with one
F16 scale and one packed zero point per (group of inputs, output). The Linear weight's rows are W^T's
columns, so a row block ``[n0, n1)`` of the weight reads a column slab of every tensor (a strided read).

**GPTQ** (AutoGPTQ / GPTQModel, ``quant_method: "gptq"``), pack = 32 // bits:

* ``qweight`` I32 (in / pack, out): code of input k, output n = ``qweight[k // pack, n] >> (bits·(k % pack))``;
* ``qzeros`` I32 (groups, out / pack): zero of group g, output n = ``qzeros[g, n // pack] >> (bits·(n % pack))``;
  checkpoints in the original format (``checkpoint_format: "gptq"``, "v1") store zero - 1, so 1 is added
  (then masked, as AutoGPTQ does); ``"gptq_v2"`` stores the zero itself;
* ``scales`` F16 (groups, out); ``g_idx`` I32 (in,): the group of input k (``k // group_size`` unless act-order).

W^T[k, n] = ``scales[g, n] · (q[k, n] - zero[g, n])`` with g = g_idx[k], computed as GPTQModel's torch
``dequantize_weight`` does: integer difference in I8 (I16 for 8 bits), times the F16 scale, in F16.

**AWQ** (AutoAWQ ``version: "gemm"``, ``quant_method: "awq"``), 4 bits only:

* ``qweight`` I32 (in, out / 8), ``qzeros`` I32 (in / group, out / 8): nibble j of word c holds output
  ``8c + AWQ_ORDER[j]`` (AutoAWQ packs columns interleaved);
* ``scales`` F16 (in / group, out).

W^T[k, n] = ``(q[k, n] - zero[k // group, n]) · scales[k // group, n]`` in F16 (AutoAWQ ``dequantize_gemm``).

The decoded block is in the scales' dtype (F16); the caller casts it to the output dtype as transformers'
``.to(dtype)`` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from streammerge.formats.base import CODES, QuantizedWeight
from streammerge.formats.gptq_layout import AWQ_REVERSE, PackedWeight


def unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    """I32 (..., w) -> codes (..., w · 32/bits), value j of word i at index i·pack + j (low bits first).

    Integer type I8 (I16 for 8 bits), masked to ``bits`` bits, as the references shift and mask."""
    pack = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)  # (pack,)
    small = torch.int16 if bits == 8 else torch.int8
    codes = torch.bitwise_right_shift(words.to(torch.int32).unsqueeze(-1), shifts).to(small)  # (..., w, pack)
    return codes.reshape(*words.shape[:-1], words.shape[-1] * pack)


def gptq_rows(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    n0: int,
    n1: int,
    *,
    zero_offset: int = 1,
) -> torch.Tensor:
    """Rows ``[n0, n1)`` of the Linear weight (out, in) of a GPTQ layer, in ``scales.dtype``: (n1 - n0, in).

    qweight (in/pack, out), qzeros (groups, out/pack), scales (groups, out), g_idx (in,) are the whole
    stored tensors (views are fine: only the needed columns are read). ``zero_offset`` is 1 for the
    original ("v1") checkpoint format, 0 for "gptq_v2".
    """
    pack, mask = 32 // bits, (1 << bits) - 1
    c0, c1 = n0 // pack, -(-n1 // pack)
    zeros = unpack(qzeros[:, c0:c1], bits)  # (groups, (c1 - c0)·pack)
    zeros = torch.bitwise_and(zeros + zero_offset, mask)[:, n0 - c0 * pack : n1 - c0 * pack]  # (groups, n)
    # qweight packs along the input axis: (in/pack, n) -> (n, in/pack) -> (n, in) -> (in, n)
    q = torch.bitwise_and(unpack(qweight[:, n0:n1].T, bits), mask).T
    g = g_idx.to(torch.int64)
    wt = scales[:, n0:n1][g] * (q - zeros[g])  # (in, n): F16 · I8 -> F16
    return wt.T.contiguous()


def awq_rows(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, n0: int, n1: int
) -> torch.Tensor:
    """Rows ``[n0, n1)`` of the Linear weight (out, in) of an AWQ GEMM layer, in ``scales.dtype``: (n1 - n0, in).

    qweight (in, out/8), qzeros (in/group, out/8), scales (in/group, out): the whole stored tensors."""
    c0, c1 = n0 // 8, -(-n1 // 8)
    order = (torch.arange(c0 * 8, c1 * 8).view(-1, 8)[:, list(AWQ_REVERSE)].reshape(-1) - c0 * 8)
    cols = order[n0 - c0 * 8 : n1 - c0 * 8]  # packed index of each wanted output column
    q = torch.bitwise_and(unpack(qweight[:, c0:c1], 4)[:, cols], 0xF)  # (in, n)
    z = torch.bitwise_and(unpack(qzeros[:, c0:c1], 4)[:, cols], 0xF)  # (groups, n)
    s = scales[:, n0:n1]
    rows = q.shape[0]  # in; the last group may be partial
    z, s = z.repeat_interleave(group_size, dim=0)[:rows], s.repeat_interleave(group_size, dim=0)[:rows]
    wt = (q - z) * s  # (in, n): I8 · F16 -> F16
    return wt.T.contiguous()


class GPTQCodec:
    """Decoding of ``gptq_layout.GPTQ`` weights (never re-encoded). Every stored row holds a bit of every
    weight row, so the executor hands whole parts (zero-copy maps) and rows ``[r0, r1)`` (``decode_rows``):
    only that column slab is unpacked, and a block's memory is its rows', not the layer's."""

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        return self.decode_rows(qw, parts, out_dtype, 0, qw.shape[0])

    def decode_rows(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype,
                    r0: int, r1: int) -> torch.Tensor:
        assert isinstance(qw, PackedWeight)
        g_idx = parts.get("g_idx")
        if g_idx is None:  # no act-order: input k is in group k // group_size
            g_idx = torch.arange(qw.shape[1], device=parts[CODES].device) // qw.group_size
        w = gptq_rows(parts[CODES], parts["qzeros"], parts["scales"], g_idx, qw.bits, r0, r1,
                      zero_offset=qw.zero_offset)
        return w.to(out_dtype)

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("GPTQ weights are never re-encoded")

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError("GPTQ weights are never re-encoded")


class AWQCodec(GPTQCodec):
    """Decoding of ``gptq_layout.AWQ`` weights, a column slab at a time like GPTQ (never re-encoded)."""

    def decode_rows(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype,
                    r0: int, r1: int) -> torch.Tensor:
        assert isinstance(qw, PackedWeight)
        return awq_rows(parts[CODES], parts["qzeros"], parts["scales"], qw.group_size, r0, r1).to(out_dtype)
