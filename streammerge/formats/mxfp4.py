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

import torch

from streammerge.formats.base import CODES, QuantizedWeight
from streammerge.formats.mxfp4_layout import E8M0_BIAS, GROUP, SCALES

#: FP4 E2M1 code -> value (code bit 3 is the sign). transformers' ``FP4_VALUES``.
FP4_E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


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


class MXFP4Codec:
    """Decoding of ``mxfp4_layout.MXFP4`` weights (never re-encoded: see there)."""

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        """Experts ``[e0, e1)``: blocks (k, R, G, 16), scales (k, R, G) -> P[e0:e1] = decoded.T (k, C, R)."""
        disk = dequantize(parts[CODES], parts[SCALES], out_dtype)  # (k, R, C)
        return disk.transpose(1, 2).contiguous()  # (k, C, R)

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("MXFP4 weights are never re-encoded")

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError("MXFP4 weights are never re-encoded")
