"""VeRA (``peft_type`` VERA): W ← rnd(W + ΔW), ΔW = T_f((λ_b ⊙ B[:out]) @ (λ_d ⊙ A[:, :in])), no scaling.

PEFT 0.21 ``tuners/vera/layer.py``: ``Linear.get_delta_weight`` and ``Linear.merge``
(``weight += ΔW``: fp32 add, one rounding); unmerge subtracts the same ΔW. A (r, in_max) and
B (out_max, r) are shared by every layer: saved once as ``base_model.vera_A``/``vera_B`` when
``save_projection`` (the default), else regenerated from ``projection_prng_key`` exactly as
``VeraModel._init_vera_A_vera_B`` does (``regenerate``). HF ``Conv1D`` forces ``fan_in_fan_out``.

Row blocks: ΔW's rows are rows of λ_b ⊙ B, so Linear blocks are exact; the transposed (Conv1D)
product is computed whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from streammerge.tuners.base import ModuleView, Tuner, Update, in_features, out_features
from streammerge.tuners.lazy import torch

PEFT_TYPE = "VERA"
SUFFIXES = {"lambda_b": ".vera_lambda_b", "lambda_d": ".vera_lambda_d"}
#: Shared projections, keys without a module path.
SHARED = {"A": "base_model.vera_A", "B": "base_model.vera_B"}
ROW_BLOCKS = True
INVERTIBLE = True


def delta(t: Mapping[str, torch.Tensor], out_features: int, in_features: int, fan_in_fan_out: bool = False,
          r0: int = 0, r1: int | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ΔW (fp32) for W (out, in), or (in, out) with ``fan_in_fan_out``."""
    sliced_a = t["A"][:, :in_features]  # (r, in)
    sliced_b = t["B"][:out_features, :]  # (out, r)
    lambda_b = t["lambda_b"].unsqueeze(-1)  # (out, 1)
    lambda_d = t["lambda_d"].unsqueeze(-1)  # (r, 1)
    if fan_in_fan_out:
        return ((lambda_b * sliced_b) @ (lambda_d * sliced_a)).T[r0:r1]  # (in, out) rows
    return (lambda_b[r0:r1] * sliced_b[r0:r1]) @ (lambda_d * sliced_a)  # (rows, r) @ (r, in)


def merge(w: torch.Tensor, t: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False, r0: int = 0,
          r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    shape = shape or tuple(w.shape)
    out, inn = (shape[1], shape[0]) if fan_in_fan_out else shape
    return (w + delta(t, out, inn, fan_in_fan_out, r0, r1)).to(w.dtype)


def unmerge(w: torch.Tensor, t: Mapping[str, torch.Tensor], fan_in_fan_out: bool = False, r0: int = 0,
            r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    shape = shape or tuple(w.shape)
    out, inn = (shape[1], shape[0]) if fan_in_fan_out else shape
    return (w - delta(t, out, inn, fan_in_fan_out, r0, r1)).to(w.dtype)


def _kaiming_init(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT ``vera/model.py::_kaiming_init``: uniform(±√3·√2/√fan_in) drawn from ``generator``."""
    tensor = torch.empty(shape)
    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    with torch.no_grad():
        return tensor.uniform_(-bound, bound, generator=generator)


def regenerate(seed: int, r: int, out_max: int, in_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (r, in_max) and B (out_max, r) as ``VeraModel._init_vera_A_vera_B`` draws them (same torch version)."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    a = _kaiming_init((r, in_max), generator)
    b = _kaiming_init((out_max, r), generator)
    return a, b


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("lambda_b", "lambda_d"):
        return []
    out, inn = out_features(v.weight, v.conv1d), in_features(v.weight, v.conv1d)
    r = v.tensors["lambda_d"].shape[0] if v.tensors["lambda_d"].shape else 0
    if v.tensors["lambda_b"].shape != (out,) or v.tensors["lambda_d"].shape != (r,) or len(v.weight.shape) != 2:
        v.problem(f"vera_lambda_b {v.tensors['lambda_b'].shape} / vera_lambda_d {v.tensors['lambda_d'].shape} do not "
                  f"fit base weight {v.weight.shape}; the adapter was trained on a different base model")
        return []
    flags: tuple = (("fan_in_fan_out", v.conv1d), ("shape", v.weight.shape))
    if "A" in v.tensors and "B" in v.tensors:
        a, b = v.tensors["A"].shape, v.tensors["B"].shape
        if a[0] != r or b[1] != r or a[1] < inn or b[0] < out:
            v.problem(f"shared projections vera_A {a} / vera_B {b} are too small for rank {r} and base weight "
                      f"{v.weight.shape}; the adapter file is corrupt")
            return []
    elif v.config.get("save_projection", True) is False:
        # VeraModel._find_dim: the largest (out, in) over every targeted layer
        out_max = max(out_features(s, c) for s, c in v.extent)
        in_max = max(in_features(s, c) for s, c in v.extent)
        flags += (("regenerate", (int(v.config.get("projection_prng_key", 0)), r, out_max, in_max)),)
    else:
        v.problem("the adapter file has no base_model.vera_A / base_model.vera_B projections although "
                  "save_projection is true; the adapter file is incomplete: re-save it")
        return []
    return [Update("weight", flags, row_blocks=not v.conv1d)]


_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tensors(t, p, dtype: torch.dtype):
    """The projections: saved, or redrawn. PEFT moves the drawn fp32 buffers to the base layer's dtype
    (``_move_adapter_to_device_of_base_layer``), then upcasts them back (``cast_adapter_dtype``): one rounding."""
    if "regenerate" not in p:
        return t
    key = (*p["regenerate"], dtype)
    if key not in _CACHE:  # tiny next to the model: one (A, B) pair per adapter
        a, b = regenerate(*p["regenerate"])
        _CACHE[key] = a.to(dtype).float(), b.to(dtype).float()
    a, b = _CACHE[key]
    device = t["lambda_b"].device
    return {**t, "A": a.to(device), "B": b.to(device)}


def _apply(w, t, p, r0, r1):
    return merge(w, _tensors(t, p, w.dtype), p["fan_in_fan_out"], r0, r1, p["shape"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, _tensors(t, p, w.dtype), p["fan_in_fan_out"], r0, r1, p["shape"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert, shared=SHARED)
