"""SHiRA (``peft_type`` SHIRA): W ← rnd(W + ΔW), ΔW sparse: ``shira_weight · scaling`` at ``shira_indices``.

PEFT 0.21 ``tuners/shira/layer.py``: ``get_delta_weight`` builds
``torch.sparse_coo_tensor(indices (2, n), weight · scaling, (out, in))`` (scaling is 1.0: PEFT sets it
at ``update_layer`` and saves nothing else); ``Linear.merge`` does ``W += ΔW`` (a sparse fp32 add into
W: each listed element is rounded once, duplicates summed first). Unmerge subtracts.
Linear only. Elements are independent: row blocks keep the indices that fall in the block.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "SHIRA"
SUFFIXES = {"weight": ".shira_weight", "indices": ".shira_indices"}
ROW_BLOCKS = True
INVERTIBLE = True
SCALING = 1.0


def delta(weight: torch.Tensor, idx: torch.Tensor, shape: tuple[int, int], r0: int = 0,
          r1: int | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the dense ΔW (fp32): the sparse tensor PEFT adds, coalesced."""
    r1 = shape[0] if r1 is None else r1
    i = idx.long()  # (2, n): PEFT's indices come from torch.where(mask): unique
    keep = (i[0] >= r0) & (i[0] < r1)
    v = weight * SCALING  # (n,)
    out = torch.zeros((r1 - r0, shape[1]), dtype=v.dtype, device=v.device)
    out.index_put_((i[0, keep] - r0, i[1, keep]), v[keep], accumulate=True)  # duplicates summed, as coalesce does
    return out


def merge(w: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, r0: int = 0, r1: int | None = None,
          shape: tuple[int, int] | None = None) -> torch.Tensor:
    d = delta(weight, idx, shape or tuple(w.shape), r0, r1)
    return (w + d).to(w.dtype)


def unmerge(w: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor, r0: int = 0, r1: int | None = None,
            shape: tuple[int, int] | None = None) -> torch.Tensor:
    d = delta(weight, idx, shape or tuple(w.shape), r0, r1)
    return (w - d).to(w.dtype)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("weight", "indices"):
        return []
    if v.conv1d or len(v.weight.shape) != 2:
        v.problem("SHiRA on this layer cannot be merged: PEFT supports Linear layers only")
        return []
    n, idx = v.tensors["weight"].shape, v.tensors["indices"].shape
    if len(n) != 1 or idx != (2, n[0]) or v.tensors["indices"].dtype not in ("I32", "I64", "I16", "U8", "I8"):
        v.problem(f"shira_weight {n} / shira_indices {idx} ({v.tensors['indices'].dtype}) do not form n "
                  "(row, column) integer positions; the adapter file is corrupt")
        return []
    return [Update("weight", (("shape", v.weight.shape),), row_blocks=True)]


def _apply(w, t, p, r0, r1):
    return merge(w, t["weight"], t["indices"], r0, r1, p["shape"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t["weight"], t["indices"], r0, r1, p["shape"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
