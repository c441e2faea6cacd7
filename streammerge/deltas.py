"""ΔW of one LoRA term, per layer kind, for rows ``[r0, r1)``: the products PEFT's ``get_delta_weight``
makes, op for op (``kernel`` adds them to W and rounds). Shapes are in each function's comments.

Reference: PEFT 0.21 ``peft/tuners/lora/layer.py`` (``Linear``, ``Embedding``, ``_ConvNd``
``get_delta_weight``) and ``ParamWrapper.get_delta_weight`` (``target_parameters``: ``expert_delta``,
``fused_delta``). The scale is applied after the product, ``(B @ A) * s``, never ``B @ (A * s)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streammerge import combine
from streammerge.plan.types import ExpertSlice


@dataclass(frozen=True, slots=True)
class Factors:
    """One LoRA term's factors, already in fp32 on the compute device (see ``plan.LoraTerm``)."""

    layout: str
    a: torch.Tensor | None  # (r, in) | (r, V) ; None for "bias"
    b: torch.Tensor  # (out, r) | (d, r) | (out,) for "bias"
    scale: float
    weight: float = 1.0
    magnitude: torch.Tensor | None = None  # DoRA m: (out,) | (d,) for an embedding | (1, out, 1, …) for a conv
    indices: tuple[int, ...] = ()  # "rows": the row numbers that b's rows replace
    expert: ExpertSlice | None = None  # "expert" / "expert_t": which expert's rows of ΔP; "fused*": E
    task: int = 0  # adapter index, for a combination step (``plan.LoraTerm.task``)


#: Convolution of the LoRA factors by kernel rank (``_ConvNd.conv_fn``).
_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


#: Fused parameters whose ΔP has at most this many elements (1 MiB fp32) are computed whole, exactly as PEFT
#: does, and the expert's rows sliced out (see ``expert_delta``).
WHOLE_DELTA_ELEMENTS = 1 << 18


def expert_delta(f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[row0 + r0, row0 + r1)`` of expert e's ΔP[e] / s, in fp32 (PEFT ``ParamWrapper.get_delta_weight``;
    ``lora_delta`` multiplies by s afterwards, the same elementwise op as PEFT's ``einsum(…) * scaling``).

    PEFT computes all experts at once: ``A3 = A.reshape(E, r, in)`` (A's rows are expert-major),
    ``B3 = B.reshape(out, r, E)`` (B's columns are rank-major: column k·E + e belongs to expert e), then
    ``einsum("o r e, e r i -> e o i", B3, A3) * s`` (``"… -> e i o"`` when P is (E, in, out)).

    A small ΔP (≤ WHOLE_DELTA_ELEMENTS) is computed exactly that way and sliced: on tiny matrices torch's bmm
    takes shape-dependent paths, and neither one expert's product nor a row block of it is reliably
    bit-identical there. A real-sized ΔP is computed for expert e and the block's rows only, with the same
    einsum; on real expert shapes that is bit-identical to PEFT's whole einsum (tests/test_parity_moe.py), at
    1/E of the work per tensor.
    """
    assert f.expert is not None and f.a is not None
    e, n, row0 = f.expert.index, f.expert.count, f.expert.row0
    a3 = f.a.reshape(n, -1, f.a.shape[1])  # (r·E, in) -> (E, r, in)
    b3 = f.b.reshape(f.b.shape[0], -1, n)  # (out, r·E) -> (out, r, E)
    spec = "o r e, e r i -> e o i" if f.layout == "expert" else "o r e, e r i -> e i o"
    if n * b3.shape[0] * a3.shape[2] <= WHOLE_DELTA_ELEMENTS:
        # (out, r, E) x (E, r, in) -> (E, out, in) | (E, in, out); then rows of expert e
        return torch.einsum(spec, b3, a3)[e, row0 + r0 : row0 + r1]
    if f.layout == "expert":
        # P (E, out, in): (rows, r, 1) x (1, r, in) -> (1, rows, in)
        return torch.einsum(spec, b3[row0 + r0 : row0 + r1, :, e : e + 1], a3[e : e + 1])[0]
    # "expert_t", P (E, in, out) (peft 0.17-0.19.0): rows of ΔP[e] are columns of A_e
    # (out, r, 1) x (1, r, rows) -> (1, rows, out)
    return torch.einsum(spec, b3[:, :, e : e + 1], a3[e : e + 1, :, row0 + r0 : row0 + r1])[0]


def fused_delta(f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Experts ``[r0, r1)`` of ΔP / s for a fused 3-D parameter the checkpoint stores fused (GPT-OSS), fp32.

    PEFT ``ParamWrapper.get_delta_weight``: ``einsum("o r e, e r i -> e o i" | "… -> e i o", B3, A3)`` with
    ``A3 = A.reshape(E, r, in)``, ``B3 = B.reshape(out, r, E)``. As in ``expert_delta``: a small ΔP is computed
    whole and sliced; a real-sized one for the block's experts only (a batched product per expert), so a row
    block of the task is a block of experts and memory stays at one block's ΔP.
    """
    assert f.expert is not None and f.a is not None
    n = f.expert.count
    a3 = f.a.reshape(n, -1, f.a.shape[1])  # (r·E, in) -> (E, r, in)
    b3 = f.b.reshape(f.b.shape[0], -1, n)  # (out, r·E) -> (out, r, E)
    spec = "o r e, e r i -> e o i" if f.layout == "fused" else "o r e, e r i -> e i o"
    if n * b3.shape[0] * a3.shape[2] <= WHOLE_DELTA_ELEMENTS:
        # (out, r, E) x (E, r, in) -> (E, out, in) | (E, in, out); then the block's experts
        return torch.einsum(spec, b3, a3)[r0:r1]
    # (out, r, e1-e0) x (e1-e0, r, in) -> (e1-e0, out, in) | (e1-e0, in, out)
    return torch.einsum(spec, b3[:, :, r0:r1], a3[r0:r1])


def lora_delta(f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of one term's ΔW, in fp32 (a fresh tensor the caller may modify)."""
    if f.layout == "linear":
        # W (out, in): (rows, r) @ (r, in) -> (rows, in)
        delta = f.b[r0:r1] @ f.a
    elif f.layout in ("linear_t", "embedding"):
        # W (in, out) for HF Conv1D, or (V, d) for an embedding: rows of W are columns of B @ A.
        # (out|d, r) @ (r, rows) -> (out|d, rows) -> transposed view (rows, out|d)
        delta = (f.b @ f.a[:, r0:r1]).T
    elif f.layout == "bias":
        # b (out,): (rows,)
        delta = f.b[r0:r1].clone()
    elif f.layout == "conv":
        delta = conv_delta(f)[r0:r1]
    elif f.layout in ("expert", "expert_t"):
        delta = expert_delta(f, r0, r1)
    elif f.layout in ("fused", "fused_t"):
        delta = fused_delta(f, r0, r1)
    else:  # pragma: no cover - the planner only emits the layouts above
        raise AssertionError(f"unknown LoRA layout {f.layout!r}")
    delta.mul_(f.scale)  # PEFT: (B @ A) * scaling — the same elementwise op, in place
    if f.weight != 1.0:
        delta.mul_(f.weight)
    return delta


def conv_delta(f: Factors) -> torch.Tensor:
    """The whole unscaled ΔW/s of a Conv1d/2d/3d LoRA, PEFT's ``_ConvNd.get_delta_weight`` op for op
    (``lora_delta`` multiplies by s, the same elementwise op).

    W (out, in, *k); A (r, in, *k); B (out, r, 1, …). A 1×1 kernel (``W.shape[2:4] == (1, 1)``, the
    same test PEFT makes, and A has W's kernel) is a matrix product; any other kernel convolves A
    with B: ``conv(Aᵀ (in, r, *k), B) -> (in, out, *k)``, transposed back to (out, in, *k).
    """
    assert f.a is not None
    if f.a.shape[2:4] == (1, 1):
        # (out, r) @ (r, in) -> (out, in) -> (out, in, 1, 1)
        return (f.b.squeeze(3).squeeze(2) @ f.a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
    return _CONV_FN[f.a.dim()](f.a.transpose(0, 1), f.b).transpose(0, 1)


def combined_delta(terms: Sequence[Factors], combination, block_shape: torch.Size, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of op({ΔWᵢ}) for a ``plan.Combination`` (``streammerge.combine``), fp32.

    ΔWᵢ is the sum of adapter i's terms (fp32, weight 1: the operator applies the weights). An
    adapter with no term on this tensor has ΔWᵢ = 0, which no operator counts (a pruned or
    zero element has no sign and adds nothing), so it is left out of the stack.
    """
    tasks = sorted({f.task for f in terms})
    first = terms[0]
    deltas = torch.empty((len(tasks), *block_shape), dtype=torch.float32, device=first.b.device)  # (n, rows, ...)
    for j, task in enumerate(tasks):
        mine = [f for f in terms if f.task == task]
        acc = lora_delta(mine[0], r0, r1)
        for f in mine[1:]:
            acc = acc + lora_delta(f, r0, r1)
        deltas[j] = acc.reshape(block_shape)
        del acc
    row_numel = math.prod(block_shape[1:]) if len(block_shape) > 1 else 1
    return combine.combine_task_vectors(
        deltas, [combination.weights[t] for t in tasks], combination.method, combination.density,
        seed=combination.seed, key=combination.key, tasks=tasks, first_index=r0 * row_numel,
        majority_sign=combination.majority_sign,
    )
