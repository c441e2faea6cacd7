"""RoAd (``peft_type`` ROAD): W ← rnd(rnd(R) @ W), b ← rnd(R) @ b: 2×2 rotation-scalings of output pairs.

PEFT 0.21 ``tuners/road/layer.py``: ``_prepare_cols`` (variants road_1/2/4: α·cos θ and α·sin θ per
output), ``_get_delta_weight`` (R (out, out): the first column on the diagonal, the second on the
half-group-swapped diagonal with the first half negated), and ``Linear.merge``:
``torch.matmul(R.to(W.dtype), W)`` — a 16-bit matmul for a bf16/fp16 W, replayed with the same op —
and the same for the bias. Unmerge: ``matmul(inv(R.float()).to(W.dtype), W)``. Linear only.
R mixes output rows within a group: merged whole.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "ROAD"
SUFFIXES = {"theta": ".road_theta", "alpha": ".road_alpha"}
ROW_BLOCKS = False
INVERTIBLE = True


def _cols(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor):
    if variant == "road_1":
        theta = theta.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        alpha = alpha.reshape(-1, group_size // 2).repeat_interleave(2, dim=0).flatten()
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":
        theta = theta.reshape(-1, 2, group_size)
        alpha = alpha.reshape(-1, 2, group_size)
        return alpha[:, 0, :].flatten() * theta[:, 0, :].cos().flatten(), \
            alpha[:, 1, :].flatten() * theta[:, 1, :].sin().flatten()
    raise ValueError(f"Unsupported variant {variant} for RoadLayer. Supported variants are road_1, road_2, and road_4.")


def rotation(variant: str, group_size: int, theta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """R (out, out), fp32: ``_get_delta_weight``."""
    first, second = _cols(variant, group_size, theta, alpha)
    out = torch.diag(first)
    size = second.shape[0]
    swapped = second.reshape(-1, 2, group_size // 2)[:, [1, 0], :].flatten()
    rotated = torch.diag(swapped).reshape(-1, 2, group_size // 2, size)[:, [1, 0], :, :]
    rotated[:, 0, :, :] *= -1
    out += rotated.reshape(size, size)
    return out


def merge(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """W (out, in) or a bias (out,): ``matmul(R.to(W.dtype), W)``."""
    return torch.matmul(r.to(w.dtype), w).contiguous().to(w.dtype)


def unmerge(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    inv = torch.linalg.inv(r.to(torch.float32)).to(w.dtype)
    return torch.matmul(inv, w).contiguous()


_PARAMS_PER_OUT = {"road_1": 0.5, "road_2": 1, "road_4": 2}


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("theta", "alpha"):
        return []
    if v.conv1d or len(v.weight.shape) != 2:
        v.problem("RoAd on this layer cannot be merged: PEFT supports Linear layers only")
        return []
    out = v.weight.shape[0]
    variant = str(v.config.get("variant", "road_1"))
    group = int(v.config.get("group_size", 64))
    if variant not in _PARAMS_PER_OUT or group % 2 or out % group:
        v.problem(f"RoAd variant {variant!r} with group_size {group} cannot rotate {out} outputs; "
                  "the config is not one PEFT can load")
        return []
    want = (int(out * _PARAMS_PER_OUT[variant]),)
    if v.tensors["theta"].shape != want or v.tensors["alpha"].shape != want:
        v.problem(f"road_theta {v.tensors['theta'].shape} / road_alpha {v.tensors['alpha'].shape} do not fit "
                  f"{out} outputs with variant {variant!r} (want {want}); the config and weights disagree")
        return []
    flags = (("variant", variant), ("group_size", group))
    updates = [Update("weight", flags, work_elements=2 * out * out)]
    if v.bias is not None:
        updates.append(Update("bias", flags, work_elements=2 * out * out))
    return updates


def _rotation(t, p):
    return rotation(p["variant"], p["group_size"], t["theta"], t["alpha"])


def _apply(w, t, p, r0, r1):
    return merge(w, _rotation(t, p))


def _invert(w, t, p, r0, r1):
    return unmerge(w, _rotation(t, p))


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
