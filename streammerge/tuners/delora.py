"""DeLoRA (``peft_type`` DELORA): W ← rnd(W + rnd(ΔW)), ΔW = (B @ diag(λ/r/(‖Aᵢ‖‖Bᵢ‖)) @ A) ⊙ w_norm.

PEFT 0.21 ``tuners/delora/layer.py``: ``DeloraLayer._compute_delta`` (norms clamped at 1e-4; w_norm
scales input columns) and ``Linear.merge``: ``ΔW.to(W.dtype)`` then ``W.add_(ΔW)`` (two roundings).
``unmerge`` is ``W -= ΔW`` with the fp32 ΔW (one rounding). Linear only. Row i of ΔW uses row i of B
only, but A's norm is over its rows: the norms are taken whole, the product per block.
"""

from __future__ import annotations

from collections.abc import Mapping

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "DELORA"
SUFFIXES = {"A": ".delora_A", "B": ".delora_B", "lambda": ".delora_lambda", "w_norm": ".delora_w_norm"}
ROW_BLOCKS = False  # kept whole: B @ diag @ A is a chain of two products PEFT runs on all rows
INVERTIBLE = True


def delta(t: Mapping[str, torch.Tensor], r: int) -> torch.Tensor:
    """ΔW (out, in), fp32: ``_compute_delta`` op for op."""
    a, b = t["A"], t["B"]  # (r, in), (out, r)
    an = torch.clamp(a.norm(dim=1), min=1e-4)  # (r,)
    bn = torch.clamp(b.norm(dim=0), min=1e-4)  # (r,)
    diag = torch.diag_embed(t["lambda"] / r / (an * bn))  # (r, r)
    d = b @ diag @ a
    return d * t["w_norm"].unsqueeze(0)  # (out, in) ⊙ (1, in)


def merge(w: torch.Tensor, t: Mapping[str, torch.Tensor], r: int) -> torch.Tensor:
    return w + delta(t, r).to(w.dtype)  # W.add_(ΔW.to(W.dtype)): both 16-bit, two roundings


def unmerge(w: torch.Tensor, t: Mapping[str, torch.Tensor], r: int) -> torch.Tensor:
    return (w - delta(t, r)).to(w.dtype)  # W -= fp32 ΔW: one rounding


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("A", "B", "lambda", "w_norm"):
        return []
    if v.conv1d or len(v.weight.shape) != 2:
        v.problem("DeLoRA on this layer cannot be merged: PEFT supports Linear layers only")
        return []
    out, inn = v.weight.shape
    s = v.tensors
    r = s["A"].shape[0] if s["A"].shape else 0
    if s["A"].shape != (r, inn) or s["B"].shape != (out, r) or s["w_norm"].shape != (inn,) or s["lambda"].shape != (1,):
        v.problem(f"DeLoRA tensors A {s['A'].shape}, B {s['B'].shape}, w_norm {s['w_norm'].shape} do not fit base "
                  f"weight {v.weight.shape}; the adapter was trained on a different base model")
        return []
    if v.rank is not None and r != v.rank:
        v.problem(f"has rank {r} in its tensors but adapter_config.json gives r={v.rank} (r / rank_pattern); "
                  "the config and weights disagree")
        return []
    return [Update("weight", (("r", r),), work_elements=2 * out * inn)]


def _apply(w, t, p, r0, r1):
    return merge(w, t, p["r"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t, p["r"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert, ranked=True)
