"""LoKr (``peft_type`` LOKR): W ← rnd(W + ΔW), ΔW = kron(w1, w2) · s, s = α/r, reshaped to W.

PEFT 0.21 ``tuners/lokr/layer.py``: ``LoKrLayer.get_delta_weight`` and ``make_kron`` /
``make_weight_cp``; the add is ``LycorisLayer.merge`` (``W.data += ΔW``, one rounding).

w1 = ``lokr_w1`` (a, c) or ``lokr_w1_a @ lokr_w1_b``; w2 = ``lokr_w2`` (b, d·∏k), or
``einsum("i j k l, i p, j r -> p r k l", lokr_t2, w2_a, w2_b)`` (conv CP), or ``lokr_w2_a @ lokr_w2_b``.
The factor shapes come from PEFT's ``factorization``; they are read from the file, not recomputed.
A Kronecker row mixes every row of w2 with one row of w1, so ΔW is computed whole.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

PEFT_TYPE = "LOKR"
SUFFIXES = {"w1": ".lokr_w1", "w1_a": ".lokr_w1_a", "w1_b": ".lokr_w1_b", "w2": ".lokr_w2",
            "w2_a": ".lokr_w2_a", "w2_b": ".lokr_w2_b", "t2": ".lokr_t2"}
ROW_BLOCKS = False
INVERTIBLE = True


def delta(t: Mapping[str, torch.Tensor], scale: float, shape: tuple[int, ...]) -> torch.Tensor:
    """The whole ΔW (fp32) of W's ``shape``, PEFT's ops in PEFT's order."""
    w1 = t["w1"] if "w1" in t else t["w1_a"] @ t["w1_b"]
    if "w2" in t:
        w2 = t["w2"]
    elif "t2" in t:
        w2 = torch.einsum("i j k l, i p, j r -> p r k l", t["t2"], t["w2_a"], t["w2_b"])
    else:
        w2 = t["w2_a"] @ t["w2_b"]
    if len(w2.shape) == 4:  # make_kron: a 4-D w2 takes w1 as (a, c, 1, 1)
        w1 = w1.unsqueeze(2).unsqueeze(2)
    return (torch.kron(w1, w2.contiguous()) * scale).reshape(shape)


def merge(w: torch.Tensor, t: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    return (w + delta(t, scale, tuple(w.shape))).to(w.dtype)  # fp32 add, one rounding


def unmerge(w: torch.Tensor, t: Mapping[str, torch.Tensor], scale: float) -> torch.Tensor:
    return (w - delta(t, scale, tuple(w.shape))).to(w.dtype)
