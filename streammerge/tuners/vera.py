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

import torch

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
