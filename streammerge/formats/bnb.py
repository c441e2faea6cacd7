"""bitsandbytes 4-bit (NF4 / FP4, optionally double-quantized) and 8-bit (LLM.int8) weights. Pure, no I/O.

Serialized 4-bit Linear ``<m>`` (``Linear4bit._save_to_state_dict`` / ``QuantState.as_dict(packed=True)``):

* ``<m>.weight`` U8 (ceil(n/2), 1): the n = out·in codes of W (out, in), flattened row-major, two per byte,
  the FIRST value in the HIGH nibble;
* ``<m>.weight.absmax``: one scale per ``blocksize`` consecutive values: F32 (n_blocks,), or, double-quantized,
  U8 codes decoded as ``nested_quant_map[code] · nested_absmax[i // nested_blocksize] + nested_offset``;
* ``<m>.weight.quant_map`` F32 (16,) (the 4-bit table; the dequantizer uses bitsandbytes' built-in one);
* ``<m>.weight.nested_absmax`` F32, ``<m>.weight.nested_quant_map`` F32 (256,) when double-quantized;
* ``<m>.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``) U8: UTF-8 JSON of ``quant_type``, ``blocksize``,
  ``dtype``, ``shape`` and, when nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

Serialized 8-bit Linear: ``<m>.weight`` I8 (out, in), ``<m>.SCB`` F32 (out,) (row absmax), and
``<m>.weight_format`` U8 scalar (0 = "row", the only layout bitsandbytes reads).

The arithmetic is bitsandbytes' CPU dequantizer (``functional.dequantize_4bit`` and
``int8_vectorwise_dequant``, what ``transformers``' ``dequantize()`` and PEFT call), reproduced op for op in
torch so that any row block decoded here is bit-identical to it (tests/test_formats_quant.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from streammerge.formats.base import CODES, QuantizedWeight
from streammerge.formats.bnb_layout import BnbWeight, State4bit

FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
INT8_SCALE = 7.874015718698502e-3  # 1/127, as bitsandbytes writes it

_NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
# bitsandbytes' FP4 (E2M1 in its own code order; code 8 is +0: bitsandbytes writes the int -0), divided by its
# largest magnitude as ``get_4bit_type`` does.
_FP4 = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


def code_table(quant_type: str) -> torch.Tensor:
    """The 16-entry F32 table of a 4-bit quant type (``bitsandbytes.functional.get_4bit_type``)."""
    data = torch.tensor(_NF4 if quant_type == "nf4" else _FP4, dtype=torch.float32)
    return data.div_(data.abs().max())


def absmax_f32(
    state: State4bit,
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every block's scale in F32 (n_blocks,): ``absmax`` itself, or, double-quantized, bitsandbytes'
    ``dequantize_blockwise(absmax, state2) + offset`` (codes (n_blocks,) U8 -> F32, in F32 throughout)."""
    if not state.nested:
        return absmax.to(torch.float32)
    assert nested_absmax is not None and nested_quant_map is not None
    idx = torch.arange(absmax.numel(), device=absmax.device) // state.nested_blocksize  # block -> nested block
    out = nested_quant_map.to(torch.float32)[absmax.reshape(-1).to(torch.int64)] * nested_absmax.to(torch.float32)[idx]
    out = out.to(FLOAT_DTYPES[state.nested_dtype])  # dequantize_blockwise's output dtype (F32 in practice)
    out += torch.tensor(float(state.nested_offset), dtype=torch.float32)  # QuantState.from_dict's offset tensor
    return out.to(torch.float32)


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, state: State4bit, first: int, count: int, dtype: torch.dtype
) -> torch.Tensor:
    """Values ``[first, first + count)`` of the flattened weight, in ``dtype`` (1-D).

    ``packed`` holds the bytes ``[first // 2, ceil((first + count) / 2))`` of ``<m>.weight`` (any shape, U8 or
    a same-size view); ``absmax`` is :func:`absmax_f32`'s whole result. Value i is
    ``code[nibble_i] · absmax[i // blocksize]`` in F32, rounded once to ``dtype`` (bitsandbytes' CPU kernel).
    """
    raw = packed.reshape(-1).view(torch.uint8)
    codes = torch.empty(raw.numel() * 2, dtype=torch.uint8, device=raw.device)
    codes[0::2] = raw >> 4  # first value: high nibble
    codes[1::2] = raw & 0x0F
    skip = first % 2
    vals = code_table(state.quant_type).to(raw.device)[codes[skip : skip + count].to(torch.int32)]  # F32 (count,)
    bs = state.blocksize
    if first % bs == 0:  # the executor's blocks start on a block: scale whole blocks, no per-value index
        b0, full = first // bs, count // bs
        vals[: full * bs].view(full, bs).mul_(absmax[b0 : b0 + full, None])
        vals[full * bs :].mul_(absmax[b0 + full] if count > full * bs else 1.0)
    else:
        vals.mul_(absmax[torch.arange(first, first + count, device=raw.device) // bs])
    return vals.to(dtype)



def dequantize_8bit(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows of an LLM.int8 weight: q (rows, in) I8 and their SCB (rows,) F32 -> (rows, in) in ``dtype``.

    ``int8_vectorwise_dequant``: ``q · SCB[:, None] · (1/127)`` in F32 (two roundings), then one cast."""
    return (q * scb.to(torch.float32).view(-1, 1) * INT8_SCALE).to(dtype)


class BnbCodec:
    """Decoding of ``bnb_layout.Bitsandbytes`` weights (never re-encoded)."""

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        assert isinstance(qw, BnbWeight)
        if qw.state is None:
            return dequantize_8bit(parts[CODES], parts["SCB"], out_dtype)
        cols = qw.shape[1]
        rows = parts[CODES].numel() * 2 // cols  # an odd total leaves one pad nibble in the last byte
        absmax = absmax_f32(qw.state, parts["absmax"], parts.get("nested_absmax"), parts.get("nested_quant_map"))
        w = dequantize_4bit(parts[CODES], absmax, qw.state, 0, rows * cols, FLOAT_DTYPES[qw.state.dtype])
        return w.reshape(rows, cols).to(out_dtype)  # transformers' dequantize(): the state's dtype, then .to()

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("bitsandbytes weights are never re-encoded")

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError("bitsandbytes weights are never re-encoded")
