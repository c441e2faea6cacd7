"""C3A (``peft_type`` C3A): W ← W + rnd(rnd(C) / in), C the block-circulant matrix of ``c3a_kernel``.

PEFT 0.21 ``tuners/c3a/layer.py``: ``C3ALayer.get_delta_weight`` =
``get_circulant_fast(kernel.float()).to(W.dtype) / in_features`` (the division in W's dtype), and
``C3ALinear.merge``: ``W = W + ΔW`` (W's dtype). Unmerge: ``W -= ΔW``. ``c3a/utils.py::get_circulant_fast``
builds C (out, in) with FFTs over the whole matrix: computed whole. Linear only.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "C3A"
SUFFIXES = {"kernel": ".c3a_kernel"}
ROW_BLOCKS = False
INVERTIBLE = True


def circulant(w: torch.Tensor) -> torch.Tensor:
    """``get_circulant_fast``: kernel (out/b, in/b, b) -> C (out, in)."""
    _, n, b = w.shape
    x = torch.eye(n * b, dtype=w.dtype, device=w.device)
    x = x.reshape(*x.shape[:-1], n, b)
    x = torch.einsum("...nb,mnb->...mb", torch.fft.ifft(x), torch.fft.fft(w))
    return torch.fft.fft(x).real.flatten(start_dim=1).T


def delta(kernel: torch.Tensor, dtype: torch.dtype, in_features: int) -> torch.Tensor:
    return circulant(kernel.to(torch.float32)).to(dtype) / in_features


def merge(w: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return w + delta(kernel, w.dtype, w.size(-1))


def unmerge(w: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return w - delta(kernel, w.dtype, w.size(-1))


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("kernel"):
        return []
    if v.conv1d or len(v.weight.shape) != 2:
        v.problem("C3A on this layer cannot be merged: PEFT supports Linear layers only")
        return []
    out, inn = v.weight.shape
    k = v.tensors["kernel"].shape
    if len(k) != 3 or k[0] * k[2] != out or k[1] * k[2] != inn:
        v.problem(f"c3a_kernel has shape {k}; base weight {v.weight.shape} needs (out/b, in/b, b): the adapter was "
                  "trained on a different base model")
        return []
    return [Update("weight", work_elements=8 * inn * inn)]  # complex (in, in) FFT scratch, twice


def _apply(w, t, p, r0, r1):
    return merge(w, t["kernel"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t["kernel"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
