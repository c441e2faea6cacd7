"""FP8 E4M3 codecs: decode stored codes and scales to a float dtype, and encode with fresh scales.

Pure functions on CPU (or any device) tensors; no file I/O, no plan. Two scale conventions meet here:

* **block FP8** (DeepSeek-V3, transformers ``FineGrainedFP8Config``): ``weight`` F8_E4M3 (out, in) and
  ``weight_scale_inv`` F32 (⌈out/b0⌉, ⌈in/b1⌉); element (i, j) is ``fp32(q[i, j]) · s[i // b0, j // b1]``,
  rounded once to the output dtype. That is DeepSeek's ``weight_dequant`` (fp32 product, stored in the
  default dtype), transformers' ``Fp8Dequantize._dequantize_one`` and compressed-tensors'
  ``FP8BlockDequantizer`` (pads, multiplies in fp32, casts), element for element. Edge blocks are partial.
* **compressed-tensors** ``float-quantized``: ``weight`` F8_E4M3 and ``weight_scale`` in its own dtype
  (bf16/fp16/fp32) per tensor ``(1,)``, per channel ``(out, 1)`` or per block; compressed-tensors'
  ``_dequantize`` computes ``q.to(scale.dtype) * scale`` in the scale's dtype (one rounding there), and
  a loader then casts to the model dtype. ``dequantize`` reproduces both orders through ``product_dtype``.

Encoding (re-quantizing a merged block) uses fresh scales ``amax / 448`` per scale cell, computed in
fp32 and stored in the scale dtype, and codes ``round_e4m3(clamp(w / s, ±448))`` with torch's
round-to-nearest-even cast. Every element is then within half an E4M3 step (times ``s``) of the value
encoded, up to the fp32 rounding of ``w / s`` (``half_step`` gives the bound; tests check it).

Scale cells: a cell covers ``block = (b0, b1)`` elements; per-channel is ``(1, in)``, per-tensor is
``(out, in)``. Row blocks handed to these functions must start at a multiple of ``b0`` (or cover the
whole tensor for per-tensor scales): ``scale`` is then the slice of the scale grid for those rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from streammerge.formats.base import CODES, SCALE, QuantizedWeight, grid
from streammerge.formats.dtypes import torch_dtype

#: Largest finite E4M3 (``float8_e4m3fn``) value.
E4M3_MAX = 448.0
E4M3 = torch.float8_e4m3fn
#: E4M3 has 3 mantissa bits; its smallest normal exponent is -6 (subnormal spacing 2^-9).
_MANTISSA_BITS = 3
_MIN_NORMAL_EXP = -6


def expand_rows(scale: torch.Tensor, rows: int, b0: int) -> torch.Tensor:
    """Scale rows (g0, g1) repeated per weight row: (rows, g1); ``rows`` ≤ g0·b0."""
    return scale.repeat_interleave(b0, dim=0)[:rows] if b0 > 1 else scale[:rows]


def _mul_by_cells(x: torch.Tensor, s_rows: torch.Tensor, b1: int) -> torch.Tensor:
    """In place: x (R, C) *= s_rows (R, g1) broadcast over column cells of width b1 (last one partial)."""
    cols = x.shape[1]
    full, rem = divmod(cols, b1)
    if full:
        x[:, : full * b1].unflatten(1, (full, b1)).mul_(s_rows[:, :full, None])
    if rem:
        x[:, full * b1 :].mul_(s_rows[:, full : full + 1])
    return x


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    block: tuple[int, int],
    out_dtype: torch.dtype,
    product_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Decode rows of E4M3 codes: ``out = rnd_out(rnd_product(q · s))``.

    Args:
        q: (R, C) ``float8_e4m3fn`` codes, rows starting at a multiple of ``block[0]``.
        scale: (⌈R/b0⌉, ⌈C/b1⌉) the multiplier per cell (``weight_scale_inv`` / ``weight_scale``).
        block: (b0, b1) elements per scale cell.
        out_dtype: the dtype written (the model's ``torch_dtype``).
        product_dtype: the dtype the product is rounded to first: fp32 for block FP8 (DeepSeek,
            transformers), the scale's dtype for compressed-tensors.

    Returns:
        (R, C) tensor of ``out_dtype``.
    """
    rows = q.shape[0]
    # E4M3 values are exact in every float dtype of ≥ 4 significand bits; the product is formed in fp32.
    # With a bf16/fp16 scale, fp32 holds the 4-bit × 8/11-bit product exactly, so rounding it to the
    # scale dtype equals compressed-tensors' ``q.to(s.dtype) * s``.
    x = q.to(torch.float32)  # (R, C)
    s_rows = expand_rows(scale.to(torch.float32), rows, block[0])  # (R, g1)
    _mul_by_cells(x, s_rows, block[1])
    if product_dtype != torch.float32:
        x = x.to(product_dtype)
    return x.to(out_dtype)


def amax_cells(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """max |w| per scale cell in fp32: (R, C) → (⌈R/b0⌉, ⌈C/b1⌉); padding with zeros changes no max."""
    rows, cols = w.shape
    g0, g1 = grid((rows, cols), block)
    a = w.abs().to(torch.float32)
    pad_r, pad_c = g0 * block[0] - rows, g1 * block[1] - cols
    if pad_r or pad_c:
        a = torch.nn.functional.pad(a, (0, pad_c, 0, pad_r))
    return a.reshape(g0, block[0], g1, block[1]).amax(dim=(1, 3))


def fresh_scale(amax: torch.Tensor, scale_dtype: torch.dtype, zero_scale: float, pow2: bool = False) -> torch.Tensor:
    """Scales ``amax / 448`` (fp32), stored in ``scale_dtype`` rounded up; all-zero cells get ``zero_scale``.

    ``pow2`` (``scale_fmt: ue8m0``, DeepSeek-V3.1): the scale is rounded up to a power of two, as transformers'
    ``Fp8Quantize`` and DeepSeek's ue8m0 cast do, so the format's promise that every scale is one holds.

    Rounding up (to the next representable scale when the cast rounded down) keeps ``amax / s ≤ 448``, so
    no code clamps and every element stays within half a step: a bf16/fp16 scale rounded down would clip
    the largest elements of the cell (by up to 3 steps for an fp16 scale in its subnormal range).
    """
    exact = amax.to(torch.float32) / E4M3_MAX  # (g0, g1)
    if pow2:
        exact = torch.exp2(torch.ceil(torch.log2(exact.clamp(min=torch.finfo(torch.float32).tiny))))
    s = exact.to(scale_dtype)
    if scale_dtype != torch.float32:
        up = torch.nextafter(s, torch.full_like(s, math.inf))
        s = torch.where(s.to(torch.float32) < exact, up, s)
    return torch.where(amax > 0, s, torch.full_like(s, zero_scale))


def quantize(w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Encode rows: ``q = e4m3(clamp(fp32(w) / s, ±448))`` per cell; w (R, C) → codes (R, C)."""
    x = w.to(torch.float32, copy=True)  # (R, C), a fresh buffer (w is never written)
    inv_rows = expand_rows(scale.to(torch.float32), w.shape[0], block[0])  # (R, g1)
    _div_by_cells(x, inv_rows, block[1])
    return x.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _div_by_cells(x: torch.Tensor, s_rows: torch.Tensor, b1: int) -> None:
    cols = x.shape[1]
    full, rem = divmod(cols, b1)
    if full:
        x[:, : full * b1].unflatten(1, (full, b1)).div_(s_rows[:, :full, None])
    if rem:
        x[:, full * b1 :].div_(s_rows[:, full : full + 1])


def encode(
    w: torch.Tensor, block: tuple[int, int], scale_dtype: torch.dtype, zero_scale: float, pow2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh scales for ``w``'s cells and its codes: (R, C) → (codes (R, C), scale (⌈R/b0⌉, ⌈C/b1⌉))."""
    scale = fresh_scale(amax_cells(w, block), scale_dtype, zero_scale, pow2)
    return quantize(w, scale, block), scale


def half_step(target: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Half the E4M3 quantization step at each element of ``target`` (in ``dtype``), in weight units.

    The step at x = w / s is 2^(e − 3) for 2^e ≤ |x| < 2^(e+1) (e ≥ −6), and 2^−9 below 2^−6; rounding
    to nearest moves an element by at most half of it, times ``s``. Used to report and test the error.
    """
    s = expand_rows(scale.to(dtype), target.shape[0], block[0])  # (R, g1)
    s_full = s.repeat_interleave(block[1], dim=1)[:, : target.shape[1]]  # (R, C)
    x = (target.to(dtype) / s_full).abs().clamp(max=E4M3_MAX)
    e = torch.floor(torch.log2(x.clamp(min=2.0**_MIN_NORMAL_EXP))).clamp(min=_MIN_NORMAL_EXP)
    return 0.5 * torch.exp2(e - _MANTISSA_BITS) * s_full


# --------------------------------------------------------------------------------------------
# the FP8 formats' shared row-block codec


class FP8Codec:
    """decode/amax/encode (``base.Codec``) for ``weight`` E4M3 codes + one ``scale`` part, any ``QuantScheme``."""

    def decode(self, qw: QuantizedWeight, parts: Mapping[str, torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
        q = parts[CODES]  # (R, C) e4m3
        return dequantize(q, _cells(parts[SCALE], qw), _block(qw, q), out_dtype, torch_dtype(qw.scheme.product_dtype))

    def amax(self, qw: QuantizedWeight, w: torch.Tensor) -> torch.Tensor:
        return amax_cells(w, _block(qw, w))

    def encode(self, qw: QuantizedWeight, w: torch.Tensor, amax: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        block = _block(qw, w)
        if amax is None:
            amax = amax_cells(w, block)
        scale = self.scales(qw, amax)  # (g0', g1) cells
        # The scale comes back as cells; the caller reshapes it to the stored part's rows ((1,) per tensor).
        return {CODES: quantize(w, scale, block), SCALE: scale}

    def scales(self, qw: QuantizedWeight, amax: torch.Tensor) -> torch.Tensor:
        return fresh_scale(amax, torch_dtype(qw.scheme.scale_dtype), qw.scheme.zero_scale, qw.scheme.pow2_scale)

    def error(self, qw: QuantizedWeight, encoded: dict[str, torch.Tensor], merged: torch.Tensor) -> tuple[float, float]:
        """max |q·s − merged| over these rows and its max ratio to half an E4M3 step (fp32).

        ``q·s`` is the fp32 product, before a loader rounds it to the model dtype (which adds at most half
        an ulp of that dtype): the ratio is ≤ 1 up to the fp32 rounding of ``merged / s`` (2^-24 relative).
        """
        if merged.numel() == 0:
            return 0.0, 0.0
        block = _block(qw, merged)
        scale = encoded[SCALE]
        back = dequantize(encoded[CODES], scale, block, torch.float32)  # (R, C) fp32 product
        err = back.sub_(merged.to(torch.float32)).abs_()
        worst = float(err.max())
        ratio = float(err.div_(half_step(merged, scale, block, torch.float32)).max())
        return worst, ratio


def _block(qw: QuantizedWeight, w: torch.Tensor) -> tuple[int, int]:
    """The cell of ``qw``'s scheme for rows ``w``: a per-tensor cell spans all of them."""
    return (max(w.shape[0], 1), w.shape[1]) if qw.scheme.strategy == "tensor" else qw.scheme.block


def _cells(scale: torch.Tensor, qw: QuantizedWeight) -> torch.Tensor:
    """The stored scale rows as a 2-D grid of cells ((1,) / () per-tensor → (1, 1))."""
    return scale.reshape(1, 1) if qw.scheme.strategy == "tensor" else scale
