"""The merge arithmetic: every formula that touches weight values lives here, and only here.

Reference: PEFT 0.21 ``peft/tuners/lora/layer.py``:

* ``Linear.get_delta_weight``:    ``transpose(B @ A, fan_in_fan_out) * scaling``  (fp32)
* ``Linear.merge``:               ``base_layer.weight.data += delta``             (one rounding)
* ``Embedding.get_delta_weight``: ``transpose(B_e @ A_e, True) * scaling``
* ``Embedding.merge``:            ``weight.data += delta.to(weight.dtype)``      (two roundings)
* ``lora_bias``:                  ``bias.data += lora_B.bias * scaling``          (one rounding)

To be bit-identical with PEFT we use the same torch ops in the same order on the same dtypes:
``(B @ A) * s`` (not ``B @ (A * s)``), the transpose after the product, and the add in fp32
with the cast on store. Work happens on row blocks ``[r0, r1)`` of the output tensor so memory is
bounded whatever the tensor size; a row of ``(B @ A)`` depends only on that row of B, so blocks
give the same values as the whole matrix provided the GEMM sums each element the same way (row
counts are multiples of ``plan.ROW_ALIGN``; tested on real shapes in ``tests/test_kernel.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streammerge import combine

#: safetensors dtype code -> torch dtype.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "U64": torch.uint64,
    "C64": torch.complex64,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3": torch.float8_e4m3fn,
}
if hasattr(torch, "float8_e8m0fnu"):
    TORCH_DTYPES["F8_E8M0"] = torch.float8_e8m0fnu


@dataclass(frozen=True, slots=True)
class Factors:
    """One LoRA term's factors, already in fp32 on the compute device (see ``plan.LoraTerm``)."""

    layout: str
    a: torch.Tensor | None  # (r, in) | (r, V) ; None for "bias"
    b: torch.Tensor  # (out, r) | (d, r) | (out,) for "bias"
    scale: float
    weight: float = 1.0
    task: int = 0  # adapter index, for a combination step (``plan.LoraTerm.task``)


def lora_delta(f: Factors, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of one term's ΔW, in fp32."""
    if f.layout == "linear":
        # W (out, in): (rows, r) @ (r, in) -> (rows, in)
        delta = (f.b[r0:r1] @ f.a) * f.scale
    elif f.layout in ("linear_t", "embedding"):
        # W (in, out) for HF Conv1D, or (V, d) for an embedding: rows of W are columns of B @ A.
        # (out|d, r) @ (r, rows) -> (out|d, rows) -> transpose -> (rows, out|d)
        delta = (f.b @ f.a[:, r0:r1]).T * f.scale
    elif f.layout == "bias":
        # b (out,): (rows,)
        delta = f.b[r0:r1] * f.scale
    else:  # pragma: no cover - the planner only emits the layouts above
        raise AssertionError(f"unknown LoRA layout {f.layout!r}")
    if f.weight != 1.0:
        delta = delta * f.weight
    return delta


def merge_block(
    w: torch.Tensor,
    out_dtype: torch.dtype,
    steps: Sequence[tuple[str, Sequence[Factors]]],
    r0: int,
    r1: int,
) -> torch.Tensor:
    """Merge rows ``[r0, r1)``: start from ``w`` (those rows, any dtype), apply ``steps`` in order.

    A step is ``(rounding, terms)`` or ``(rounding, terms, combination)`` (a ``plan.Combination``
    or None). Each step sums its terms' deltas in fp32 (each times its ``weight``), or combines
    the adapters' task vectors with ``combination`` (``combined_delta``), and adds them with its rounding policy:
    ``once`` → ``rnd(W + ΣΔ)``; ``delta_first`` → ``rnd(W + rnd(ΣΔ))``. The result has
    ``out_dtype`` and lives on ``w``'s device.
    """
    out = w.to(out_dtype)  # a replacement from the adapter is cast first, as load_state_dict does
    for rounding, terms, *combination in steps:
        if combination and combination[0] is not None:
            delta = combined_delta(terms, combination[0], out.shape, r0, r1)
        else:
            delta = lora_delta(terms[0], r0, r1)
            for f in terms[1:]:
                delta = delta + lora_delta(f, r0, r1)
            delta = delta.reshape(out.shape)
        if rounding == "once":
            out = (out.float() + delta).to(out_dtype)
        elif rounding == "delta_first":
            out = out + delta.to(out_dtype)
        else:  # pragma: no cover
            raise AssertionError(f"unknown rounding {rounding!r}")
    return out


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


def nonfinite_count(t: torch.Tensor) -> int:
    """How many elements of ``t`` are NaN or ±inf (0 for non-float tensors)."""
    if not t.is_floating_point():
        return 0
    return int(t.numel() - torch.isfinite(t).sum().item())
