"""IA³ (``peft_type`` IA3): W ← rnd(W ⊙ l): a scaling, not an addition.

PEFT 0.21 ``tuners/ia3/layer.py``:

* ``Linear.merge``: ``torch.mul(W, transpose(l, fan_in_fan_out)).to(W.dtype)``; l is (out, 1) for a
  non-feed-forward module (scales output rows) or (1, in) for a ``feedforward_modules`` one (scales
  input columns). A non-feed-forward layer also scales its bias: ``torch.mul(b, l.reshape(b.shape))``.
  HF ``Conv1D`` (W stored (in, out)) has ``fan_in_fan_out`` forced on, so l is transposed.
* ``_ConvNd.merge``: l is (1, C, 1, …); non-feed-forward uses lᵀ (C, 1, 1, …) over output channels,
  feed-forward (groups=1) uses l over input channels.
* ``unmerge``: ``torch.div(W, l + 1e-8)`` (and the bias likewise).

Every element is scaled independently, so row blocks are exact.
"""

from __future__ import annotations

import re

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "IA3"
SUFFIXES = {"l": ".ia3_l"}
ROW_BLOCKS = True
INVERTIBLE = True


def factor(vec: torch.Tensor, w_shape: tuple[int, ...], fan_in_fan_out: bool, feedforward: bool) -> torch.Tensor:
    """The tensor W is multiplied by (broadcast), from the stored ``ia3_l``."""
    if len(w_shape) == 2:
        return vec.T if fan_in_fan_out else vec  # (out, 1) | (1, in), transposed for Conv1D
    if not feedforward:
        return vec.transpose(0, 1)  # conv: (1, out, 1, …) -> (out, 1, 1, …)
    groups = vec.shape[1] // w_shape[1]
    if groups == 1:
        return vec  # (1, in, 1, …)
    # _ConvNd._get_ia3_scaling_for_weight, grouped: each group's outputs take that group's input scales
    per_in, per_out = w_shape[1], w_shape[0] // groups
    vec = vec.reshape(groups, 1, per_in, *vec.shape[2:])
    vec = vec.expand(groups, per_out, per_in, *vec.shape[3:])
    return vec.reshape(w_shape[0], per_in, *vec.shape[3:])  # (out, in/groups, 1, …)


def merge(w: torch.Tensor, vec: torch.Tensor, fan_in_fan_out: bool = False, feedforward: bool = False,
          r0: int = 0, r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of rnd(W ⊙ l); ``w`` holds those rows of W (of ``shape``, default ``w``'s)."""
    f = factor(vec, shape or tuple(w.shape), fan_in_fan_out, feedforward)
    if f.shape[0] != 1:
        f = f[r0:r1]
    return torch.mul(w, f).to(w.dtype)


def merge_bias(b: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """Non-feed-forward layers: ``torch.mul(b, l.reshape(b.shape)).to(b.dtype)``."""
    return torch.mul(b, vec.reshape(b.shape)).to(b.dtype)


def unmerge(w: torch.Tensor, vec: torch.Tensor, fan_in_fan_out: bool = False, feedforward: bool = False,
            r0: int = 0, r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    if w.dim() == 2:
        f = (vec.T if fan_in_fan_out else vec) + 1e-8  # PEFT: transpose(l, fan_in_fan_out) + 1e-8
    else:
        f = factor(vec, shape or tuple(w.shape), fan_in_fan_out, feedforward) + 1e-8
    if f.shape[0] != 1:
        f = f[r0:r1]
    return torch.div(w, f).to(w.dtype)


def unmerge_bias(b: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    return torch.div(b, vec.reshape(b.shape) + 1e-8).to(b.dtype)


def feedforward(config, module: str) -> bool:
    """``IA3Model._check_target_module_feedforward``: regex fullmatch, or a list of name suffixes."""
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        return re.fullmatch(ff, module) is not None
    return any(module.endswith(k) for k in ff)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("l"):
        return []
    ff = feedforward(v.config, v.module)
    w = v.weight.shape
    fifo = v.conv1d  # PEFT forces fan_in_fan_out on for Conv1D and off for Linear
    out, inn = (w[1], w[0]) if fifo else (w[0], w[1] if len(w) > 1 else 0)
    # Linear/Conv1D: (1, in) | (out, 1); conv (out, in/groups, *k): (1, C, 1, …), C = in_channels when feed-forward
    if len(w) == 2:
        want = (1, inn) if ff else (out, 1)
    else:
        got = v.tensors["l"].shape
        grouped = ff and len(got) > 1 and inn and got[1] % inn == 0 and out % (got[1] // inn) == 0
        groups = got[1] // inn if grouped else 1
        want = (1, groups * inn if ff else out, *(1,) * (len(w) - 2))
    if v.tensors["l"].shape != want:
        v.problem(f"ia3_l has shape {v.tensors['l'].shape} but base weight {w} "
                  f"({'feed-forward' if ff else 'not feed-forward'} per feedforward_modules) needs {want}; "
                  "the config and weights disagree")
        return []
    flags = (("fan_in_fan_out", fifo), ("feedforward", ff), ("shape", w))
    updates = [Update("weight", flags, row_blocks=True)]
    if not ff and v.bias is not None:
        updates.append(Update("bias", flags, row_blocks=True))
    return updates


def _apply(w, t, p, r0, r1):
    if w.dim() == 1:
        return merge_bias(w, t["l"].reshape(-1)[r0:r1])
    return merge(w, t["l"], p["fan_in_fan_out"], p["feedforward"], r0, r1, p["shape"])


def _invert(w, t, p, r0, r1):
    if w.dim() == 1:
        return unmerge_bias(w, t["l"].reshape(-1)[r0:r1])
    return unmerge(w, t["l"], p["fan_in_fan_out"], p["feedforward"], r0, r1, p["shape"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
