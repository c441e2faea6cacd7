"""C3A (``peft_type`` C3A): W ← W + rnd(rnd(C) / in), C the block-circulant matrix of ``c3a_kernel``.

PEFT 0.21 ``tuners/c3a/layer.py``: ``C3ALayer.get_delta_weight`` =
``get_circulant_fast(kernel.float()).to(W.dtype) / in_features`` (the division in W's dtype), and
``C3ALinear.merge``: ``W = W + ΔW`` (W's dtype). Unmerge: ``W -= ΔW``. ``c3a/utils.py::get_circulant_fast``
builds C (out, in) with FFTs over the whole matrix: computed whole. Linear only.
"""

from __future__ import annotations

import torch
from torch.fft import fft, ifft

PEFT_TYPE = "C3A"
SUFFIXES = {"kernel": ".c3a_kernel"}
ROW_BLOCKS = False
INVERTIBLE = True


def circulant(w: torch.Tensor) -> torch.Tensor:
    """``get_circulant_fast``: kernel (out/b, in/b, b) -> C (out, in)."""
    _, n, b = w.shape
    x = torch.eye(n * b, dtype=w.dtype, device=w.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", ifft(x), fft(w))
    return fft(x).real.flatten(start_dim=1).T


def delta(kernel: torch.Tensor, dtype: torch.dtype, in_features: int) -> torch.Tensor:
    return circulant(kernel.to(torch.float32)).to(dtype) / in_features


def merge(w: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return w + delta(kernel, w.dtype, w.size(-1))


def unmerge(w: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return w - delta(kernel, w.dtype, w.size(-1))
