"""The merge arithmetic: how a block of W becomes a block of the output (the ΔW of one term is
``streammerge.deltas``; these are the only two modules whose formulas touch weight values).

Reference: PEFT 0.21 ``peft/tuners/lora/layer.py``:

* ``Linear.get_delta_weight``:    ``transpose(B @ A, fan_in_fan_out) * scaling``  (fp32)
* ``Linear.merge``:               ``base_layer.weight.data += delta``             (one rounding)
* ``Embedding.get_delta_weight``: ``transpose(B_e @ A_e, True) * scaling``
* ``Embedding.merge``:            ``weight.data += delta.to(weight.dtype)``      (two roundings)
* ``lora_bias``:                  ``bias.data += lora_B.bias * scaling``          (one rounding)
* ``ParamWrapper.get_delta_weight`` (``target_parameters``): ``einsum(B3, A3) * scaling``, then
  ``param.data += delta.to(param.dtype)`` (two roundings); see ``expert_delta``

To be bit-identical with PEFT we use the same torch ops in the same order on the same dtypes:
``(B @ A) * s`` (not ``B @ (A * s)``), the transpose after the product, and the add in fp32
with the cast on store. Work happens on row blocks ``[r0, r1)`` of the output tensor so memory is
bounded whatever the tensor size; a row of ``(B @ A)`` depends only on that row of B, so blocks
give the same values as the whole matrix provided the GEMM sums each element the same way (row
counts are multiples of ``plan.ROW_ALIGN``; tested on real shapes in ``tests/test_kernel.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from streammerge.deltas import (  # noqa: F401  (re-exported: callers and tests use kernel.Factors etc.)
    WHOLE_DELTA_ELEMENTS,
    Factors,
    combined_delta,
    conv_delta,
    expert_delta,
    fused_delta,
    lora_delta,
)
from streammerge.formats.dtypes import torch_dtypes
from streammerge.plan.geometry import row_blocks

if TYPE_CHECKING:
    from streammerge.changes import BlockTally

#: safetensors dtype code -> torch dtype (the one table, :mod:`streammerge.formats.dtypes`).
TORCH_DTYPES: dict[str, torch.dtype] = dict(torch_dtypes())


def dora_block(w: torch.Tensor, out_dtype: torch.dtype, f: Factors, r0: int, r1: int) -> torch.Tensor:
    """DoRA merge of rows ``[r0, r1)`` (whole tensor unless ``linear``): ``rnd((m / ‖W + ΔW‖) · (W + ΔW))``.

    PEFT 0.21 ``DoraLinearVariant.merge_unsafe`` / ``DoraEmbeddingVariant`` / ``_DoraConvNdVariant`` with
    ``DoraLinearLayer.get_weight_norm`` (scaling 1, ΔW already scaled), replayed op for op so the norm's
    fp32 reduction order is PEFT's:

    * ``linear``    W (out, in): n = ‖W + ΔW‖ over dim 1, one per output row (rows are independent,
      so row blocks are exact); W ← (m / n)[:, None] · (W + ΔW)
    * ``linear_t``  W (in, out) (HF Conv1D): n over the rows of (W + ΔW)ᵀ; the factor is (1, out)
    * ``embedding`` W (V, d): n = ‖(W + ΔW)ᵀ‖ over dim 1, one per embedding dim across the vocabulary
    * ``conv``      W (out, in, *k): n over every dim but the output, (1, out, 1, …) like m
    """
    assert f.magnitude is not None
    delta = lora_delta(f, r0, r1).reshape(w.shape)  # fp32; w is in the output dtype
    m = f.magnitude
    if f.layout == "linear":
        norm = torch.linalg.norm(w + 1 * delta, dim=1).to(torch.float32)  # (rows,)
        factor = (m[r0:r1] / norm).view(-1, 1)
    elif f.layout == "linear_t":
        norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1).to(torch.float32)  # (out,)
        factor = (m / norm).view(-1, 1).T  # (1, out)
    elif f.layout == "embedding":
        norm = torch.linalg.norm(w.T + 1 * delta.T, dim=1).to(torch.float32)  # (d,)
        factor = (m / norm).view(1, -1)
    elif f.layout == "conv":
        v = w + 1 * delta
        norm = v.norm(p=2, dim=tuple(range(1, v.dim())), keepdim=True).transpose(1, 0)  # (1, out, 1, …)
        factor = (m / norm).view(-1, *(1,) * (w.dim() - 1))  # (out, 1, …)
    else:  # pragma: no cover - the planner only makes DoRA steps for the layouts above
        raise AssertionError(f"DoRA on layout {f.layout!r}")
    return (factor * (w + delta)).to(out_dtype)


def replace_rows(w: torch.Tensor, f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Trainable tokens: rows ``f.indices`` of W take the values of ``f.b`` (n, d), cast to W's dtype.

    PEFT ``TrainableTokensLayer.merge``: ``W.index_copy(0, idx, delta.to(W))``, a replacement, not an
    addition. ``w`` holds rows ``[r0, r1)``; only the indices inside the block are written.
    """
    pick = [(j, i - r0) for j, i in enumerate(f.indices) if r0 <= i < r1]
    if not pick:
        return w
    src = f.b[torch.tensor([j for j, _ in pick], device=f.b.device)].to(w.dtype)
    return w.index_copy(0, torch.tensor([i for _, i in pick], device=w.device), src)


def merge_block(
    w: torch.Tensor,
    out_dtype: torch.dtype,
    steps: Sequence[tuple[str, Sequence[Factors]]],
    r0: int,
    r1: int,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Merge rows ``[r0, r1)``: start from ``w`` (those rows, any dtype), apply ``steps`` in order.

    A step is ``(rounding, terms)`` or ``(rounding, terms, combination)`` with a ``plan.Combination``
    (or None): the adapters' task vectors are then combined by ``combined_delta`` instead of summed.
    Each step sums its terms' deltas in fp32 and adds them with its rounding policy:
    ``once`` → ``rnd(W + ΣΔ)``; ``delta_first`` → ``rnd(W + rnd(ΣΔ))``; ``dora`` → ``dora_block``;
    ``rows`` → ``replace_rows``; ``tuner`` → the tuner's ``apply`` (``streammerge.tuners``). Returns
    a new tensor of ``out_dtype`` on ``w``'s device (``w`` is never written).

    ``chunk_rows`` walks the block in cache-sized chunks (cut by ``plan.row_blocks`` so the GEMM
    sums stay those of the whole matrix): the fp32 scratch then stays in L2, which measured 2-5×
    faster on CPU than one pass over a large block. None processes the block in one piece, as the
    caller must for a task that ``plan.TensorTask.whole`` marks (a DoRA norm across rows, a
    convolution delta, a narrow transposed product).
    """
    return merge_checked(w, out_dtype, steps, r0, r1, chunk_rows)[0]


def merge_checked(
    w: torch.Tensor,
    out_dtype: torch.dtype,
    steps: Sequence[tuple[str, Sequence[Factors]]],
    r0: int,
    r1: int,
    chunk_rows: int | None = None,
    *,
    out: torch.Tensor | None = None,
    check_finite: bool = False,
    tally: BlockTally | None = None,
) -> tuple[torch.Tensor, bool]:
    """``merge_block`` into ``out`` (a tensor of ``w``'s shape and ``out_dtype``, or None: a new one),
    with the NaN/inf filter of ``nonfinite_count`` run on each chunk while it is in cache.

    Returns ``(out, suspect)``: ``suspect`` is False when every chunk's sum is finite (so no element
    is NaN/inf); True means "count exactly" (``check_finite`` False: always False).

    Per chunk of a ``once`` step: ΔW = B @ A (fp32, in L2), ``ΔW *= s``, ``ΔW += W`` (W widened inside
    the add), the rounding store into ``out``, and the filter's sum over the stored chunk while it is
    still in cache (it used to be a separate pass over the whole block). The ops, their order and
    dtypes are PEFT's. With ``out`` reused between blocks, the output costs no page faults either:
    measured, a fresh 32 MiB output cost as much as the arithmetic of that block.

    ``tally`` (``changes.BlockTally``) measures each chunk's change while it is in cache. In the common
    case (one ``once`` step, W already in the stored dtype) it is fused into the merge: the tally widens
    W to fp32 (for ‖W‖²), the add takes that copy (the same fp32 values the add widens W to, so the same
    bits), and ‖M − W‖² is then taken into the same buffer; the NaN/inf filter is that sum's finiteness
    (M − W is finite wherever M is). Measured per 512K-element chunk, one thread: 0.86 -> ~0.65 ms.
    Otherwise the tally takes its own pass over each stored chunk (``BlockTally.chunk``).
    """
    if out is None:
        out = torch.empty(w.shape, dtype=out_dtype, device=w.device)
    if not steps:
        out.copy_(w)  # a replacement from the adapter is cast, as load_state_dict does
        return out, check_finite and not _finite_sum(out)
    rows = r1 - r0
    suspect = False
    fused = tally if len(steps) == 1 and steps[0][0] == "once" and w.dtype == out_dtype else None
    for c0, c1 in _chunks(rows, chunk_rows):
        cur = w[c0:c1]
        if fused is not None:
            cur = _apply_step(cur, out_dtype, steps[0], r0 + c0, r0 + c1, widened=fused.widen(cur))
        for i, step in enumerate(() if fused is not None else steps):
            cur = _apply_step(cur, out_dtype, step, r0 + c0, r0 + c1)
            if i + 1 < len(steps) and step[0] in ("once", "delta_first"):
                cur = cur.to(out_dtype)  # each step rounds to the stored dtype before the next (the others did)
        chunk = out[c0:c1]
        chunk.copy_(cur)  # the cast to out_dtype: round to nearest even
        if fused is not None:
            finite = fused.compare(chunk)  # ‖M − W‖² from the widened W, while both are in cache
            suspect = suspect or (check_finite and not finite)
            continue
        if check_finite and not suspect:
            suspect = not _finite_sum(chunk)
        if tally is not None:
            tally.chunk(w[c0:c1], chunk)
    return out, suspect


def _apply_step(cur: torch.Tensor, out_dtype: torch.dtype, step: tuple, r0: int, r1: int,
                widened: torch.Tensor | None = None) -> torch.Tensor:
    """One step on rows ``[r0, r1)`` (``cur``): the result, not yet rounded to ``out_dtype`` for "once".
    ``widened``: ``cur`` (already in ``out_dtype``) in fp32, for a "once" step's add."""
    rounding, terms, *combination = step
    if rounding == "dora":  # one term: PEFT merges one DoRA adapter per module at a time
        return dora_block(cur.to(out_dtype), out_dtype, terms[0], r0, r1)
    if rounding == "rows":
        return replace_rows(cur.to(out_dtype), terms[0], r0, r1)
    if rounding == "tuner":  # one tuners.base.LoadedTerm: the tuner's own merge and rounding (PEFT's)
        return terms[0](cur.to(out_dtype), r0, r1)
    if combination and combination[0] is not None:
        delta = combined_delta(terms, combination[0], cur.shape, r0, r1)
    else:
        delta = lora_delta(terms[0], r0, r1)
        for f in terms[1:]:
            delta.add_(lora_delta(f, r0, r1))
        delta = delta.reshape(cur.shape)
    if rounding == "once":
        # fp32 add of W and ΔW, rounded once by the caller's store (W, cast to the stored dtype as PEFT's
        # weight is, is widened inside the add, or comes widened already: the change tally's fp32 copy of it)
        return delta.add_(cur.to(out_dtype) if widened is None else widened.view(delta.shape))
    if rounding == "delta_first":
        return cur.to(out_dtype) + delta.to(out_dtype)
    raise AssertionError(f"unknown rounding {rounding!r}")  # pragma: no cover


def _finite_sum(t: torch.Tensor) -> bool:
    """The filter of ``nonfinite_count``: True when ``t``'s sum is finite (then no element is NaN/inf)."""
    return not t.is_floating_point() or bool(torch.isfinite(t.sum()))


def _chunks(rows: int, chunk_rows: int | None) -> tuple[tuple[int, int], ...]:
    return ((0, rows),) if chunk_rows is None or chunk_rows >= rows else row_blocks(rows, chunk_rows)


def nonfinite_count(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or ±inf (0 for non-float tensors).

    A float sum is finite unless ``t`` holds a NaN/inf (or the sum overflows ``t``'s dtype), so one
    reduction in ``t``'s own dtype (vectorized; torch accumulates 16-bit floats in fp32) filters the
    common all-finite case: measured 60x cheaper than ``isfinite(t)`` on a bf16 block, a check that
    used to cost as much as the merge itself. The exact count is taken only when the filter trips.
    """
    if _finite_sum(t):
        return 0
    return int(t.numel() - torch.isfinite(t).sum().item())
