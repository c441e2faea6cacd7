"""FourierFT (``peft_type`` FOURIERFT): W ← rnd(W + T_f(ΔW)), ΔW = Re(ifft2(S)) · scaling.

PEFT 0.21 ``tuners/fourierft/layer.py``: ``FourierFTLayer.update_layer`` draws the spectrum positions
``torch.randperm(out·in, generator=Generator().manual_seed(random_loc_seed))[:n]`` (replayed here with
the same torch call), ``get_delta_weight`` scatters ``fourierft_spectrum`` there into a dense fp32
(out, in) matrix and takes ``ifft2(...).real * scaling``; ``FourierFTLinear.merge`` adds it
(``W.data += transpose(ΔW, fan_in_fan_out)``: fp32 add, one rounding). Unmerge subtracts it.
Every element depends on the whole spectrum: computed whole.
"""

from __future__ import annotations

from streammerge.tuners.base import ModuleView, Tuner, Update, in_features, out_features
from streammerge.tuners.lazy import torch

PEFT_TYPE = "FOURIERFT"
SUFFIXES = {"spectrum": ".fourierft_spectrum"}
ROW_BLOCKS = False
INVERTIBLE = True


def indices(out_features: int, in_features: int, n_frequency: int, seed: int) -> torch.Tensor:
    """(2, n): row and column of each spectrum entry (``update_layer``)."""
    idx = torch.randperm(out_features * in_features, generator=torch.Generator().manual_seed(seed))[:n_frequency]
    return torch.stack([idx // in_features, idx % in_features], dim=0)


def delta(spectrum: torch.Tensor, out_features: int, in_features: int, seed: int, scaling: float) -> torch.Tensor:
    """ΔW (out, in), fp32."""
    idx = indices(out_features, in_features, spectrum.shape[0], seed)
    dense = torch.zeros(out_features, in_features, device=spectrum.device)
    dense[idx[0, :], idx[1, :]] = spectrum.float()
    return (torch.fft.ifft2(dense).real * scaling).to(spectrum.dtype)


def _delta_for(w: torch.Tensor, spectrum: torch.Tensor, seed: int, scaling: float, fan_in_fan_out: bool):
    out, inn = (w.shape[1], w.shape[0]) if fan_in_fan_out else tuple(w.shape)
    d = delta(spectrum, out, inn, seed, scaling)
    return d.T if fan_in_fan_out else d


def merge(w: torch.Tensor, spectrum: torch.Tensor, seed: int, scaling: float,
          fan_in_fan_out: bool = False) -> torch.Tensor:
    return (w + _delta_for(w, spectrum, seed, scaling, fan_in_fan_out)).to(w.dtype)


def unmerge(w: torch.Tensor, spectrum: torch.Tensor, seed: int, scaling: float,
            fan_in_fan_out: bool = False) -> torch.Tensor:
    return (w - _delta_for(w, spectrum, seed, scaling, fan_in_fan_out)).to(w.dtype)


def _plan(v: ModuleView) -> list[Update]:
    if not v.need("spectrum"):
        return []
    if len(v.weight.shape) != 2:
        v.problem("FourierFT on this layer cannot be merged: PEFT supports Linear and HF Conv1D layers only")
        return []
    out, inn = out_features(v.weight, v.conv1d), in_features(v.weight, v.conv1d)
    n = v.tensors["spectrum"].shape
    if len(n) != 1 or not 0 < n[0] <= out * inn:
        v.problem(f"fourierft_spectrum has shape {n}; base weight {v.weight.shape} has {out * inn} positions")
        return []
    cfg = v.config
    flags = (("seed", int(cfg.get("random_loc_seed", 777))), ("scaling", float(cfg.get("scaling", 150.0))),
             ("fan_in_fan_out", v.conv1d))
    return [Update("weight", flags, work_elements=6 * out * inn)]  # dense S, complex ifft2, its real part


def _apply(w, t, p, r0, r1):
    return merge(w, t["spectrum"], p["seed"], p["scaling"], p["fan_in_fan_out"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t["spectrum"], p["seed"], p["scaling"], p["fan_in_fan_out"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert)
