"""MiSS (``peft_type`` MISS; Bone's successor): block-wise updates of W.

PEFT 0.21 ``tuners/miss/layer.py`` ``MissLinear.merge``:

* default (``init_weights`` True/False) and ``"mini"``: ``get_delta_weight_miss`` returns the whole new
  weight, W[o, j·r + k] + B[k, o] (B = ``miss_block`` (r, out); ``mini`` repeats (r, mini_r) to (r, out));
  a ragged tail of in % r columns gets B[:tail]ᵀ. fp32, cast once. Unmerge subtracts the same.
* ``"bat"``: ``W += get_delta_weight(W)`` where, per r×r block W_ij, Δ_ij = W_ij @ B_i + B_i
  (B (out/r, r, r)); fp32 add, one rounding. Unmerge: ``(W_ij - B_i) @ inv(I + B_i)``.

Default/mini touch each element once: row blocks exact. ``bat`` needs r×r blocks: computed whole.
Linear only.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "MISS"
SUFFIXES = {"block": ".miss_block"}
ROW_BLOCKS = True  # default and mini; "bat" is whole (``row_blocks``)
INVERTIBLE = True


def row_blocks(mode: object) -> bool:
    return mode != "bat"


def _full_block(block: torch.Tensor, out_features: int, mode: object, mini_r: int) -> torch.Tensor:
    return block.repeat(1, out_features // mini_r) if mode == "mini" else block  # (r, out)


def _miss(w: torch.Tensor, block: torch.Tensor, sign: int, r0: int, r1: int | None) -> torch.Tensor:
    """``get_delta_weight_miss`` on rows ``[r0, r1)``; ``w`` holds those rows, ``block`` is (r, out)."""
    b = block[:, r0:r1]  # (r, rows)
    in_features = w.size(-1)
    r = b.size(0)
    if in_features % r != 0:
        out = w.clone()  # PEFT writes into W in place; each part is rounded once to W's dtype
        n_blocks = in_features // r
        aligned = n_blocks * r
        w_aligned = out[:, :aligned].reshape(-1, n_blocks, r).permute(1, 2, 0)
        out[:, :aligned] = (w_aligned + sign * b).permute(2, 0, 1).reshape(*out[:, :aligned].shape)
        out[:, aligned:] = out[:, aligned:] + sign * b.transpose(0, 1)[:, : in_features % r]
        return out
    w_blocks = w.reshape(-1, in_features // r, r).permute(1, 2, 0)  # (in/r, r, rows)
    return (w_blocks + sign * b).permute(2, 0, 1).reshape(*w.shape).to(w.dtype)


def _bat(w: torch.Tensor, block: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``get_delta_weight`` (bat): Δ or, reversed, the unmerged weight, fp32 (out, in)."""
    orig = w.to(block.dtype)
    r = block.size(-1)
    blocks = orig.reshape(orig.size(0) // r, r, orig.size(1) // r, r).permute(2, 0, 1, 3)  # (in/r, out/r, r, r)
    if reverse:
        eye = torch.eye(r, device=block.device, dtype=torch.float32)
        inv = torch.inverse(eye + block.float()).to(block.dtype)
        result = (blocks - block) @ inv
    else:
        result = blocks @ block + block
    return result.permute(1, 2, 0, 3).reshape(*orig.shape)


def merge(w: torch.Tensor, block: torch.Tensor, mode: object = True, mini_r: int = 1, r0: int = 0,
          r1: int | None = None, out_features: int | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the merged weight (``bat``: the whole tensor)."""
    if mode == "bat":
        return (w + _bat(w, block, False)).to(w.dtype)
    return _miss(w, _full_block(block, out_features or w.size(0), mode, mini_r), 1, r0, r1).to(w.dtype)


def unmerge(w: torch.Tensor, block: torch.Tensor, mode: object = True, mini_r: int = 1, r0: int = 0,
            r1: int | None = None, out_features: int | None = None) -> torch.Tensor:
    if mode == "bat":
        return _bat(w, block, True).to(w.dtype)
    return _miss(w, _full_block(block, out_features or w.size(0), mode, mini_r), -1, r0, r1).to(w.dtype)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("block"):
        return []
    if v.conv1d or len(v.weight.shape) != 2:
        v.problem("MiSS on this layer cannot be merged: PEFT supports Linear layers only")
        return []
    out, inn = v.weight.shape
    mode = v.config.get("init_weights", True)
    mini_r = int(v.config.get("mini_r", 1))
    b = v.tensors["block"].shape
    r = b[-1] if mode == "bat" else (b[0] if b else 0)
    if mode == "bat":
        ok = len(b) == 3 and b == (out // r, r, r) and inn % r == 0 and out % r == 0
    elif mode == "mini":
        ok = len(b) == 2 and b[1] == mini_r and out % mini_r == 0 and 0 < r <= inn
    else:
        ok = len(b) == 2 and b[1] == out and 0 < r <= inn
    if not ok:
        v.problem(f"miss_block has shape {b}, which does not fit base weight {v.weight.shape} with init_weights="
                  f"{mode!r}; the config and weights disagree")
        return []
    flags = (("mode", mode), ("mini_r", mini_r), ("out_features", out))
    return [Update("weight", flags, row_blocks=row_blocks(mode), work_elements=3 * out * inn if mode == "bat" else 0)]


def _apply(w, t, p, r0, r1):
    return merge(w, t["block"], p["mode"], p["mini_r"], r0, r1, p["out_features"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t["block"], p["mode"], p["mini_r"], r0, r1, p["out_features"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
