"""LoHa (``peft_type`` LOHA): W ← rnd(W + ΔW), ΔW = ((w1a @ w1b) ⊙ (w2a @ w2b)) · s, s = α/r.

PEFT 0.21 ``tuners/loha/layer.py``: ``LoHaLayer.get_delta_weight`` with ``HadaWeight.forward``
(``HadaWeightCP.forward`` when the conv factors ``hada_t1``/``hada_t2`` exist), ``scale=torch.tensor(α/r)``
(an fp32 scalar), reshaped to W's shape; the add is ``LycorisLayer.merge``: ``W.data += ΔW``
(fp32 add, one rounding). Unmerge subtracts the same ΔW (``LycorisLayer.unmerge``).

Factors (fp32, as PEFT holds them after ``cast_adapter_dtype``):
Linear W (out, in): w1a, w2a (out, r); w1b, w2b (r, in).
Conv W (out, in, *k) flattened: w1b, w2b (r, in·∏k); CP: t1, t2 (r, r, k1, k2), w1b (r, in), w1a (r, out).
"""

from __future__ import annotations

from collections.abc import Mapping

from streammerge.tuners.base import ModuleView, Tuner, Update
from streammerge.tuners.lazy import torch

PEFT_TYPE = "LOHA"
#: role -> key suffix after the module path
SUFFIXES = {"w1a": ".hada_w1_a", "w1b": ".hada_w1_b", "w2a": ".hada_w2_a", "w2b": ".hada_w2_b",
            "t1": ".hada_t1", "t2": ".hada_t2"}
#: Rows of ΔW depend only on the same rows of w1a/w2a (Linear): blocks are exact.
ROW_BLOCKS = True
INVERTIBLE = True


def delta(t: Mapping[str, torch.Tensor], scale: float, shape: tuple[int, ...], r0: int = 0,
          r1: int | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of ΔW (fp32), reshaped to rows of ``shape`` (W's shape)."""
    s = torch.tensor(scale)  # PEFT passes scale=torch.tensor(self.scaling[...]): an fp32 0-d tensor
    if "t1" in t:
        # einsum("i j k l, j r, i p -> p r k l"): (r, r, k1, k2), (r, in), (r, out) -> (out, in, k1, k2)
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t["t1"], t["w1b"], t["w1a"])
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t["t2"], t["w2b"], t["w2a"])
        return (rebuild1 * rebuild2 * s).reshape(shape)[r0:r1]
    # (rows, r) @ (r, in·∏k) -> (rows, in·∏k), twice, Hadamard product, scaled
    d = ((t["w1a"][r0:r1] @ t["w1b"]) * (t["w2a"][r0:r1] @ t["w2b"])) * s
    return d.reshape((d.shape[0], *shape[1:]))


def merge(w: torch.Tensor, t: Mapping[str, torch.Tensor], scale: float, r0: int = 0,
          r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the merged weight, ``w`` holding those rows: ``rnd(W + ΔW)``."""
    d = delta(t, scale, shape or tuple(w.shape), r0, r1)
    return (w + d).to(w.dtype)  # fp32 add of the bf16/fp16 W and the fp32 ΔW, rounded once


def unmerge(w: torch.Tensor, t: Mapping[str, torch.Tensor], scale: float, r0: int = 0,
            r1: int | None = None, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``LycorisLayer.unmerge``: ``W.data -= ΔW`` (one rounding)."""
    d = delta(t, scale, shape or tuple(w.shape), r0, r1)
    return (w - d).to(w.dtype)


def _plan(v: ModuleView) -> list[Update]:
    """Linear W (out, in) or Conv W (out, in, *k): ΔW has W's element count, reshaped as PEFT does."""
    if not v.need("w1a", "w1b", "w2a", "w2b"):
        return []
    cp = "t1" in v.tensors or "t2" in v.tensors
    if (cp and not v.need("t1", "t2")) or v.conv1d:
        if v.conv1d:
            v.problem("LoHa on an HF Conv1D layer, which PEFT does not support (it refuses to create it)")
        return []
    w1a, w1b = v.tensors["w1a"].shape, v.tensors["w1b"].shape
    if v.tensors["w2a"].shape != w1a or v.tensors["w2b"].shape != w1b or len(w1a) != 2 or len(w1b) != 2:
        v.problem(f"LoHa factors have shapes {w1a}, {w1b}, {v.tensors['w2a'].shape}, {v.tensors['w2b'].shape}; "
                  "the two Hadamard pairs must match: the adapter file is corrupt")
        return []
    r = w1b[0]
    if v.rank is not None and r != v.rank:
        v.problem(f"has rank {r} in its tensors but adapter_config.json gives r={v.rank} (r / rank_pattern); "
                  "the config and weights disagree")
        return []
    numel = 1
    for d in v.weight.shape:
        numel *= d
    if cp:  # t (r, r, k1, k2), w_b (r, in), w_a (r, out) -> (out, in, k1, k2)
        t1 = v.tensors["t1"].shape
        made = w1a[1] * w1b[1] * t1[2] * t1[3] if len(t1) == 4 else -1
    else:  # (out, r) @ (r, in·∏k)
        made = w1a[0] * w1b[1]
    if made != numel or (not cp and w1a[0] != v.weight.shape[0]):
        v.problem(f"LoHa makes a delta of {made} elements but base weight has shape {v.weight.shape}; "
                  "the adapter was trained on a different base model")
        return []
    return [Update("weight", (("scale", v.scale), ("shape", v.weight.shape)), row_blocks=not cp,
                   work_elements=2 * numel if cp else 0)]


def _apply(w, t, p, r0, r1):
    return merge(w, t, p["scale"], r0, r1, p["shape"])


def _invert(w, t, p, r0, r1):
    return unmerge(w, t, p["scale"], r0, r1, p["shape"])


TUNER = Tuner(PEFT_TYPE, SUFFIXES, _plan, _apply, _invert, alpha_field="alpha")
