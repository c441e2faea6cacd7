"""OFT (``peft_type`` OFT): W ← rnd((R @ Wᵀ)ᵀ), R block-diagonal of Cayley rotations: multiplicative.

PEFT 0.21 ``tuners/oft/layer.py``:

* ``OFTRotationModule.get_weight``: optional COFT projection (``_project_batch``), then ``_cayley_batch``
  (skew Q from ``oft_R.weight`` (r, b(b−1)/2); Neumann series ``I + 2Q + 2Q² + … + Qⁿ⁻¹`` or
  ``solve(I + Q, I − Q, left=False)``), then ``torch.block_diag`` of the r blocks (one shared block
  repeated ``in/b`` times with ``block_share``).
* ``Linear.merge`` (unsafe): ``W.copy_(torch.mm(R, W.t().to(fp32)).t())`` (one rounding);
  ``Conv2d.merge`` does the same on W viewed (out, in·k·k); ``Embedding.merge``: ``W.copy_(mm(W, R))``.
* ``unmerge``: ``mm(inv(R), Wᵀ)ᵀ`` (embedding: ``mm(W, inv(R))``).

R mixes every input column of a row: each output row is exact on its own, but PEFT's mm runs over
all rows at once, so the tensor is merged whole.
"""

from __future__ import annotations

import math

from streammerge.tuners.base import ModuleView, Tuner, Update, in_features
from streammerge.tuners.lazy import torch

PEFT_TYPE = "OFT"
SUFFIXES = {"R": ".oft_R.weight", "emb_R": ".oft_embedding_R.weight"}
ROW_BLOCKS = False
INVERTIBLE = True


def block_size(n_elements: int) -> int:
    """b with b(b−1)/2 == n_elements (the stored upper triangle), or 0 when there is none."""
    b = (1 + math.isqrt(1 + 8 * n_elements)) // 2
    return b if b * (b - 1) // 2 == n_elements else 0


def _skew(vec: torch.Tensor, b: int) -> torch.Tensor:
    """``_pytorch_skew_symmetric``: (n, b(b−1)/2) -> (n, b, b), upper triangle = vec, minus its transpose."""
    rows, cols = torch.triu_indices(b, b, 1)
    matrix = torch.zeros(vec.shape[0], b, b, device=vec.device, dtype=vec.dtype)
    matrix[:, rows, cols] = vec
    return matrix - matrix.transpose(-2, -1)


def project(q: torch.Tensor, b: int, eps: float) -> torch.Tensor:
    """``_project_batch`` (COFT): bound each skew block's norm by eps/√n."""
    oft_r = _skew(q, b)
    eps = eps * 1 / torch.sqrt(torch.tensor(oft_r.shape[0]))
    zeros = torch.zeros((oft_r.size(1), oft_r.size(1)), device=oft_r.device, dtype=oft_r.dtype)
    eye = zeros.unsqueeze(0).expand_as(oft_r)  # PEFT names it I, but it is zeros
    diff = oft_r - eye
    norm_diff = torch.norm(oft_r - eye, dim=(1, 2), keepdim=True)
    mask = (norm_diff <= eps).bool()
    out = torch.where(mask, oft_r, eye + eps * (diff / norm_diff))
    rows, cols = torch.triu_indices(b, b, 1)
    return out[:, rows, cols]


def _cayley(q: torch.Tensor, b: int, neumann: bool, terms: int) -> torch.Tensor:
    """``_cayley_batch``: (n, b(b−1)/2) -> (n, b, b) rotations."""
    n = q.shape[0]
    q_skew = _skew(q, b)
    if neumann:
        r = torch.eye(b, device=q.device, dtype=q.dtype).repeat(n, 1, 1)
        if terms > 1:
            r.add_(q_skew, alpha=2.0)
            if terms > 2:
                q_squared = torch.bmm(q_skew, q_skew)
                r.add_(q_squared, alpha=2.0)
                q_power = q_squared
                for _ in range(3, terms - 1):
                    q_power = torch.bmm(q_power, q_skew)
                    r.add_(q_power, alpha=2.0)
                q_power = torch.bmm(q_power, q_skew)
                r.add_(q_power)
    else:
        eye = torch.eye(q_skew.shape[-1], device=q_skew.device).unsqueeze(0).expand(n, b, b)
        r = torch.linalg.solve(eye + q_skew, eye - q_skew, left=False)
    return r.to(q.dtype)


def rotation(q: torch.Tensor, in_features: int, *, coft: bool = False, eps: float = 6e-5,
             block_share: bool = False, neumann: bool = True, terms: int = 5) -> torch.Tensor:
    """R (in, in), fp32: ``OFTRotationModule.get_weight``."""
    b = block_size(q.shape[1])
    if coft:
        q = project(q, b, eps)
    blocks = _cayley(q, b, neumann, terms)
    rank = in_features // b if block_share else q.shape[0]
    return torch.block_diag(*[blocks[0 if blocks.shape[0] == 1 else i, ...] for i in range(rank)])


def merge(w: torch.Tensor, r: torch.Tensor, embedding: bool = False) -> torch.Tensor:
    """W (out, in) | (out, in, k, k) viewed (out, in·k·k) | embedding (V, d), rotated by R."""
    if embedding:
        return torch.mm(w.to(r.dtype), r).to(w.dtype)
    flat = w.reshape(w.shape[0], -1)
    return torch.mm(r, flat.t().to(r.dtype)).t().to(w.dtype).reshape(w.shape)


def unmerge(w: torch.Tensor, r: torch.Tensor, embedding: bool = False) -> torch.Tensor:
    inv = torch.linalg.inv(r)
    if embedding:
        return torch.mm(w.to(r.dtype), inv).to(w.dtype)
    flat = w.reshape(w.shape[0], -1)
    return torch.mm(inv.to(r.dtype), flat.t().to(r.dtype)).t().to(w.dtype).reshape(w.shape)


def _plan(v: ModuleView) -> list[Update]:
    emb = "emb_R" in v.tensors
    q = v.tensors.get("emb_R") or v.tensors.get("R")
    if q is None or v.conv1d or len(v.weight.shape) not in (2, 4):
        v.problem("OFT on this layer cannot be merged: PEFT supports Linear, Conv2d and Embedding layers only")
        return []
    w = v.weight.shape
    if len(w) == 4 and w[2] != w[3]:
        raise_square = f"OFT on a Conv2d with kernel {w[2:]}: PEFT's merge views W with kernel_size[0]² and fails"
        v.problem(raise_square + " on non-square kernels; keep this adapter unmerged")
        return []
    inn = w[1] if emb else in_features(v.weight, False)
    b = block_size(q.shape[1]) if len(q.shape) == 2 else 0
    share = bool(v.config.get("block_share", False))
    rank = q.shape[0] if len(q.shape) == 2 else 0
    if b == 0 or inn % b != 0 or (rank != 1 if share else rank * b != inn):
        v.problem(f"oft_R has shape {q.shape}, which is no set of b×b skew blocks covering the {inn} inputs of base "
                  f"weight {w} (block_share={share}); the adapter was trained on a different base model")
        return []
    cfg = v.config
    flags = (("in_features", inn), ("embedding", emb), ("coft", bool(cfg.get("coft", False))),
             ("eps", float(cfg.get("eps", 6e-5))), ("block_share", share),
             ("neumann", bool(cfg.get("use_cayley_neumann", True))),
             ("terms", int(cfg.get("num_cayley_neumann_terms", 5))))
    return [Update("weight", flags, work_elements=3 * inn * inn)]


def _rotation(t, p) -> torch.Tensor:
    q = t["emb_R"] if p["embedding"] else t["R"]
    return rotation(q, p["in_features"], coft=p["coft"], eps=p["eps"], block_share=p["block_share"],
                    neumann=p["neumann"], terms=p["terms"])


def _apply(w, t, p, r0, r1):
    return merge(w, _rotation(t, p), p["embedding"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, _rotation(t, p), p["embedding"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
