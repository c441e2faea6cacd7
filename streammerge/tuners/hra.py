"""HRA (``peft_type`` HRA): W ← rnd(W @ H), H = ∏ᵢ (I − 2uᵢuᵢᵀ): Householder reflections on the input side.

PEFT 0.21 ``tuners/hra/layer.py``: ``HRALinear.get_delta_weight`` (u normalized per column, the
product accumulated left to right; with ``apply_GS`` the u are Gram–Schmidt-orthonormalized first and
H = I − 2UUᵀ) and ``HRALinear.merge``: ``mm(W.to(fp32), H).to(W.dtype)``; ``HRAConv2d`` does the same
on W viewed (out, in·k·k). Unmerge multiplies by H built in reverse order (H⁻¹ = Hᵀ).
Row i of W @ H needs only row i of W, but PEFT's mm runs over all rows: merged whole.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update, in_features
from streammerge.tuners.lazy import torch

PEFT_TYPE = "HRA"
SUFFIXES = {"u": ".hra_u"}
ROW_BLOCKS = False
INVERTIBLE = True


def householder(u: torch.Tensor, apply_gs: bool = False, reverse: bool = False) -> torch.Tensor:
    """H (in, in), fp32, from ``hra_u`` (in, r): ``get_delta_weight`` op for op."""
    rank = u.shape[1]
    if apply_gs:
        weight = [(u[:, 0] / u[:, 0].norm()).view(-1, 1)]
        for i in range(1, rank):
            ui = u[:, i].view(-1, 1)
            for j in range(i):
                ui = ui - (weight[j].t() @ ui) * weight[j]
            weight.append((ui / ui.norm()).view(-1, 1))
        stacked = torch.cat(weight, dim=1)
        return torch.eye(u.shape[0], device=u.device, dtype=u.dtype) - 2 * stacked @ stacked.t()
    u = u / u.norm(dim=0)
    h = torch.eye(u.shape[0], device=u.device, dtype=u.dtype)
    for i in range(rank - 1, -1, -1) if reverse else range(rank):
        ui = u[:, i].view(-1, 1)
        h = h - 2 * h @ ui @ ui.t()
    return h


def merge(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """W (out, in) or a conv W viewed (out, in·k·k), times H."""
    flat = w.reshape(w.shape[0], -1)
    return torch.mm(flat.to(h.dtype), h).reshape(w.shape).to(w.dtype)


unmerge = merge  # with H = householder(u, apply_gs, reverse=True)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("u"):
        return []
    w = v.weight.shape
    if v.conv1d or len(w) not in (2, 4):
        v.problem("HRA on this layer cannot be merged: PEFT supports Linear and Conv2d layers only")
        return []
    inn, u = in_features(v.weight, False), v.tensors["u"].shape
    if len(u) != 2 or u[0] != inn:
        v.problem(f"hra_u has shape {u} but base weight {w} has {inn} inputs; the adapter was trained on a "
                  "different base model")
        return []
    return [Update("weight", (("apply_GS", bool(v.config.get("apply_GS", False))),), work_elements=3 * inn * inn)]


def _apply(w, t, p, r0, r1):
    return merge(w, householder(t["u"], p["apply_GS"]))


def _invert(w, t, p, r0, r1):
    return unmerge(w, householder(t["u"], p["apply_GS"], reverse=True))


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
