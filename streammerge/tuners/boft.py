"""BOFT (``peft_type`` BOFT): W ← rnd(((∏ P_iᵀ B_i P_i) @ Wᵀ)ᵀ ⊙ s): butterfly rotations, multiplicative.

PEFT 0.21 ``tuners/boft/layer.py``: ``BOFTLayer.cayley_batch`` (``solve(I + Q, I − Q, left=False)``
with Q = ½(R − Rᵀ)), ``torch.block_diag`` of each factor's blocks (the CPU path; PEFT's CUDA
``FastBlockDiag`` is not used on CPU), the permutations ``boft_P`` from ``block_butterfly_perm`` /
``perm2mat``, and ``Linear.get_delta_weight`` / ``Linear.merge``:
``W ← (mm(M, Wᵀ.to(fp32))ᵀ · boft_s).to(W.dtype)``; ``Conv2d`` does the same on W viewed
(out, in·k·k) with ``boft_s`` (1, out) transposed. Unmerge: ``mm(Mᵀ, Wᵀ)ᵀ · (1/s)``.
M mixes all input columns and PEFT multiplies all rows at once: merged whole.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update, in_features
from streammerge.tuners.lazy import torch

PEFT_TYPE = "BOFT"
SUFFIXES = {"R": ".boft_R", "s": ".boft_s"}
ROW_BLOCKS = False
INVERTIBLE = True


def _butterfly_perm(n: int, b: int, r: int, n_butterfly_factor: int) -> torch.Tensor:
    """``BOFTLayer.block_butterfly_perm``."""
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    block_size = int(n // b)
    indices = torch.arange(n)

    def sort_block(b: int, r: int) -> torch.Tensor:
        step = b / r
        initial_order = torch.arange(b)
        sorted_order = torch.empty(b, dtype=torch.long)
        evens = torch.arange(0, step, 2)
        odds = torch.arange(1, step, 2)
        sorted_seq = torch.cat((evens, odds), dim=0)
        for i, pos in enumerate(sorted_seq):
            sorted_order[int(i * r) : int(i * r + r)] = initial_order[int(pos * r) : int(pos * r + r)]
        return sorted_order

    sorted_order = sort_block(block_size, r)
    for i in range(0, n, block_size):
        tmp = indices[i : i + block_size]
        indices[i : i + block_size] = tmp[sorted_order]
    return indices


def permutations(in_features: int, factors: int, block_num: int, block_size: int) -> torch.Tensor:
    """``boft_P`` (factors, in, in), fp32, as ``update_layer`` builds it (factors = n_butterfly_factor + 1)."""
    p = torch.empty((factors, in_features, in_features))
    for i in range(factors):
        perm = _butterfly_perm(in_features, int(block_num / (2**i)), int(block_size / 2), factors - 1)
        mat = torch.zeros((in_features, in_features))
        for j, idx in enumerate(perm):
            mat[j, idx] = 1
        p[i] = mat
    return p


def _cayley(data: torch.Tensor) -> torch.Tensor:
    b, r, c = data.shape
    skew = 0.5 * (data - data.transpose(1, 2))
    eye = torch.eye(r, device=data.device).unsqueeze(0).expand(b, r, c)
    return torch.linalg.solve(eye + skew, eye - skew, left=False).to(data.dtype)


def rotation(boft_r: torch.Tensor, in_features: int) -> torch.Tensor:
    """The butterfly matrix M (in, in), fp32 (``get_delta_weight``), from ``boft_R`` (N, D, H, H)."""
    n, d, h, _ = boft_r.shape
    rot = _cayley(boft_r.view(n * d, h, h)).view(n, d, h, h)
    rot = rot.squeeze(0)
    block = torch.block_diag(*torch.unbind(rot)).unsqueeze(0)  # N == 1 on this path (as PEFT on CPU)
    p = permutations(in_features, n, d, h).to(block.device, block.dtype)
    batch = torch.bmm(block, p.permute(0, 2, 1))
    batch = torch.bmm(p, batch)
    m = batch[0]
    for i in range(1, batch.shape[0]):
        m = batch[i] @ m
    return m


def merge(w: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """W (out, in) or a conv W viewed (out, in·k·k); s (out, 1) | (1, out) for a conv."""
    flat = w.reshape(w.shape[0], -1)
    out = torch.transpose(torch.mm(m, torch.transpose(flat, 0, 1).to(m.dtype)), 0, 1)
    out = out * (s if w.dim() == 2 else s.transpose(0, 1))
    return out.reshape(w.shape).contiguous().to(w.dtype)


def unmerge(w: torch.Tensor, m: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    flat = w.reshape(w.shape[0], -1)
    out = torch.transpose(torch.mm(m.t(), torch.transpose(flat, 0, 1).to(m.dtype)), 0, 1)
    out = out * (1 / (s if w.dim() == 2 else s.transpose(0, 1)))
    return out.reshape(w.shape).to(w.dtype)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("R", "s"):
        return []
    w = v.weight.shape
    if v.conv1d or len(w) not in (2, 4) or (len(w) == 4 and w[2] != w[3]):
        v.problem("BOFT on this layer cannot be merged: PEFT supports Linear and square-kernel Conv2d layers only")
        return []
    r, s = v.tensors["R"].shape, v.tensors["s"].shape
    inn, out = in_features(v.weight, False), w[0]
    if len(r) != 4 or r[2] != r[3] or r[1] * r[2] != inn or s not in ((out, 1), (1, out)):
        v.problem(f"boft_R {r} / boft_s {s} do not fit base weight {w}; the adapter was trained on a different base")
        return []
    return [Update("weight", (("in_features", inn),), work_elements=(3 + r[0]) * inn * inn)]


def _apply(w, t, p, r0, r1):
    return merge(w, rotation(t["R"], p["in_features"]), t["s"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, rotation(t["R"], p["in_features"]), t["s"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
