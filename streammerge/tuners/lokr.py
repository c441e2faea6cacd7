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

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

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


def _factor_shape(v: ModuleView, whole: str, a: str, b: str, t: str | None = None) -> tuple[int, ...] | None:
    s = v.tensors
    if whole in s:
        return s[whole].shape
    if t is not None and t in s and a in s and b in s:  # einsum("i j k l, i p, j r -> p r k l")
        return (s[a].shape[1], s[b].shape[1], *s[t].shape[2:])
    if a in s and b in s:
        return (s[a].shape[0], s[b].shape[1])
    v.need(whole)
    return None


def _plan(v: ModuleView) -> list[Update]:
    """kron(w1 (a, c), w2 (b, d[, k…])) has W's element count; reshaped to W as PEFT does."""
    if v.conv1d:
        v.problem("LoKr on an HF Conv1D layer, which PEFT does not support (it refuses to create it)")
        return []
    w1 = _factor_shape(v, "w1", "w1_a", "w1_b")
    w2 = _factor_shape(v, "w2", "w2_a", "w2_b", "t2")
    if w1 is None or w2 is None:
        return []
    numel = made = 1
    for d in v.weight.shape:
        numel *= d
    for d in (*w1, *w2):
        made *= d
    if len(w1) != 2 or made != numel or w1[0] * w2[0] != v.weight.shape[0]:
        v.problem(f"LoKr factors {w1} ⊗ {w2} do not make base weight shape {v.weight.shape}; "
                  "the adapter was trained on a different base model")
        return []
    return [Update("weight", (("scale", v.scale),), work_elements=2 * numel)]


def _apply(w, t, p, r0, r1):
    return merge(w, t, p["scale"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t, p["scale"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert, alpha_field="alpha")
