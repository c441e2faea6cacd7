"""Task-vector operators: several adapters' deltas of one tensor in, one combined delta out.

A task vector is one adapter's full delta ΔWᵢ of one tensor (sᵢ·Bᵢ@Aᵢ in the tensor's layout, fp32).
The operators are PEFT 0.21's ``peft/utils/merge_utils.py`` (``ties``, ``dare_linear``, ``dare_ties``,
``magnitude_prune`` and their pieces ``prune``, ``calculate_majority_sign_mask``, ``disjoint_merge``),
written with the same torch ops on the same dtypes in the same order, so that given the same
pruning masks the result is bit-identical to PEFT's functions (tests/test_multi.py). Two
deliberate differences, both about which elements a mask keeps:

* magnitude pruning keeps exactly ``k = int(density·numel)`` elements of largest |ΔWᵢ| over the
  whole tensor, as ``torch.topk`` does, but finds the k-th magnitude by bisection on the float
  bit patterns (one bool mask of working memory instead of topk's index and value copies) and
  breaks ties at that magnitude by element index (topk's choice among equal values is unspecified);
* DARE's Bernoulli(density) mask comes from a counter-based hash of (seed, tensor name, adapter
  index, element index), not from torch's global RNG, so it is the same whatever the row block,
  worker count, device or shard order.

Shapes: ``deltas`` is the stack of n task vectors of one tensor, or of one row block of it:
(n, rows, *rest). Functions ending in ``_`` work in place on their first argument.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
_MASK16 = 0xFFFF


def combine_task_vectors(
    deltas: torch.Tensor,
    weights: Sequence[float],
    method: str,
    density: float,
    *,
    seed: int = 0,
    key: str = "",
    tasks: Sequence[int] = (),
    first_index: int = 0,
    majority_sign: str = "total",
) -> torch.Tensor:
    """Combine ``deltas`` (n, rows, *rest), fp32, consumed) into one delta (rows, *rest).

    ``weights[j]`` weighs ``deltas[j]``; ``tasks[j]`` is its adapter index and ``first_index`` the
    flat index of the block's first element in the whole tensor (both only feed DARE's mask).

    * ``magnitude_prune``: Σ wᵢ·prune_k(ΔWᵢ)                    (PEFT ``magnitude_prune``)
    * ``ties``:            disjoint mean of wᵢ·prune_k(ΔWᵢ) over the elected sign (PEFT ``ties``)
    * ``dare_linear``:     Σ wᵢ·(ΔWᵢ ⊙ mᵢ)/density, mᵢ ~ Bernoulli(density)   (PEFT ``dare_linear``)
    * ``dare_ties``:       DARE masks, then the TIES election and disjoint mean (PEFT ``dare_ties``)
    """
    n = deltas.shape[0]
    if density < 1:  # PEFT's prune: density >= 1 keeps everything (and does not rescale)
        for j in range(n):
            if method in ("ties", "magnitude_prune"):
                magnitude_prune_(deltas[j], density)
            else:
                dare_prune_(deltas[j], density, seed=seed, key=key, task=tasks[j] if tasks else j,
                            first_index=first_index)
    w = torch.tensor(list(weights), dtype=deltas.dtype, device=deltas.device)
    w = w.view((n,) + (1,) * (deltas.dim() - 1))  # PEFT reshape_weight_task_tensors: (n, 1, 1, ...)
    if method in ("ties", "dare_ties"):
        agree = majority_sign_mask(deltas, majority_sign)  # elected on the unweighted task vectors
        return disjoint_merge_(deltas.mul_(w), agree)
    return deltas.mul_(w).sum(dim=0)


def magnitude_prune_(t: torch.Tensor, density: float) -> torch.Tensor:
    """PEFT ``magnitude_based_pruning``: zero all but the k = int(density·numel) largest |t|."""
    keep = top_magnitude_mask(t, int(density * t.numel()))
    return t.mul_(keep.to(t.dtype))  # PEFT: tensor * mask (0./1. floats), so pruned negatives become -0.0


def top_magnitude_mask(t: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask of exactly ``k`` elements of largest |t| (ties at the k-th value: lowest index first).

    |t| as int32 bits orders like |t| (non-negative IEEE floats, NaN above inf as in topk), so the k-th
    largest magnitude is the largest T with #(bits >= T) >= k: 31 bisection steps, each one compare.
    """
    if k <= 0:
        return torch.zeros_like(t, dtype=torch.bool)
    bits = t.abs().view(torch.int32)
    lo, hi = 0, 1 << 31  # invariant: #(bits >= lo) >= k > #(bits >= hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if int(torch.count_nonzero(bits >= mid)) >= k:
            lo = mid
        else:
            hi = mid
    keep = bits > lo
    need = k - int(torch.count_nonzero(keep))
    at_threshold = bits == lo
    if int(torch.count_nonzero(at_threshold)) > need:
        # keep the first `need` elements equal to the threshold, in flat index order
        order = at_threshold.reshape(-1).cumsum(0, dtype=torch.int32).reshape(t.shape)
        at_threshold &= order <= need
    return keep | at_threshold


def dare_prune_(t: torch.Tensor, density: float, *, seed: int, key: str, task: int, first_index: int) -> torch.Tensor:
    """PEFT ``random_pruning(rescale=True)``: (t ⊙ m) / density with m ~ Bernoulli(density), m from ``dare_keep``."""
    keep = dare_keep(t.shape, density, seed=seed, key=key, task=task, first_index=first_index, device=t.device)
    return t.mul_(keep.to(t.dtype)).div_(density)


def dare_keep(shape: Sequence[int], density: float, *, seed: int, key: str, task: int, first_index: int,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask for elements ``first_index ...`` (flat, row-major) of tensor ``key``, adapter ``task``.

    Element i is kept when hash(seed, key, task, i) < density·2³², where the hash is two rounds of
    MurmurHash3's 32-bit finalizer keyed by a BLAKE2b digest of (seed, key, task). Integer arithmetic
    only (exact on every device), a pure function of its arguments: block size, threads and shard
    order cannot change it. The finalizer is a bijection of 32-bit words, so within a tensor of
    < 2³² elements no two elements share a hash and the kept fraction is density ± 1/numel-ish.
    """
    digest = hashlib.blake2b(f"{seed}\x00{key}\x00{task}".encode(), digest_size=8).digest()
    k0, k1 = int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")
    numel = 1
    for d in shape:
        numel *= d
    # Two int64 buffers in all (the hash and one scratch), updated in place.
    h = torch.arange(first_index, first_index + numel, dtype=torch.int64, device=device)  # (numel,) counters
    scratch = torch.empty_like(h)
    if first_index + numel > 1 << 32:
        torch.bitwise_right_shift(h, 32, out=scratch)  # high word of the counter
        high = scratch.clone()
    else:
        high = 0
    h.bitwise_and_(_MASK32).bitwise_xor_(k0)
    _fmix32_(h, scratch)
    h.bitwise_xor_(high).bitwise_xor_(k1)
    _fmix32_(h, scratch)
    threshold = min(int(density * (1 << 32)), 1 << 32)
    return (h < threshold).reshape(tuple(shape))


def _mul32_(x: torch.Tensor, c: int, scratch: torch.Tensor) -> torch.Tensor:
    """x ← x·c mod 2³² for int64 x in [0, 2³²) without signed overflow: split x into 16-bit halves."""
    torch.bitwise_right_shift(x, 16, out=scratch)
    scratch.mul_(c).bitwise_and_(_MASK16).bitwise_left_shift_(16)  # hi·c: only its low 16 bits survive the shift
    return x.bitwise_and_(_MASK16).mul_(c).add_(scratch).bitwise_and_(_MASK32)  # lo·c < 2⁴⁸


def _fmix32_(h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 ``fmix32`` on int64 words holding 32-bit values, in place."""
    for shift, mult in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h.bitwise_xor_(torch.bitwise_right_shift(h, shift, out=scratch))
        _mul32_(h, mult, scratch)
    h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=scratch))
    return h


def majority_sign_mask(deltas: torch.Tensor, method: str = "total") -> torch.Tensor:
    """PEFT ``calculate_majority_sign_mask``: (n, ...) bool, True where sign(ΔWᵢ) is the elected sign.

    Elected sign: + where Σᵢ ΔWᵢ >= 0 (``total``) or Σᵢ sign(ΔWᵢ) >= 0 (``frequency``), else −.
    ``sign(x) == +1`` is ``x > 0`` and ``sign(x) == −1`` is ``x < 0`` (zeros and NaN never agree),
    which avoids PEFT's int64 sign tensor.
    """
    votes = deltas.sum(dim=0) if method == "total" else deltas.sign().sum(dim=0)  # (rows, ...)
    positive = votes >= 0
    del votes
    return torch.where(positive, deltas > 0, deltas < 0)


def disjoint_merge_(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """PEFT ``disjoint_merge``: Σᵢ wᵢΔWᵢ·agreeᵢ / max(1, #agreeing adapters) — the count is of adapters, not weights."""
    mixed = weighted.mul_(agree).sum(dim=0)  # (rows, ...)
    count = agree.sum(dim=0, dtype=weighted.dtype).clamp_(min=1.0)
    return mixed.div_(count)
