"""What a task does to its source tensor: :class:`Step` s of terms summed in fp32 under one rounding policy.

A term is a :class:`LoraTerm` (a low-rank delta in one of the layouts the kernel knows) or a
:class:`TunerTerm` (another PEFT tuner's update, ``streammerge.tuners``); a step may combine several adapters'
deltas with a task-vector operator (:class:`Combination`). Frozen, picklable, comparable values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from streammerge.formats.refs import TensorRef


@dataclass(frozen=True, slots=True)
class ExpertSlice:
    """Rows ``[row0 + r0, row0 + r1)`` of ΔP[index], one of ``count`` experts (see ``kernel.expert_delta``)."""

    index: int
    count: int
    row0: int


@dataclass(frozen=True, slots=True)
class LoraTerm:
    """One low-rank delta. Layouts (shapes in comments are the stored factors):

    * ``linear``:    W (out, in);  A (r, in), B (out, r);     ΔW = (B @ A) · s
    * ``linear_t``:  W (in, out) (HF Conv1D); same A, B;      ΔW = (B @ A)ᵀ · s
    * ``embedding``: W (V, d);  A_e (r, V), B_e (d, r);       ΔW = (B_e @ A_e)ᵀ · s
    * ``bias``:      b (out,);  b_B (out,) (``lora_B.bias``); Δb = b_B · s
    * ``conv``:      W (out, in, *k); A (r, in, *k), B (out, r, 1, …); ΔW = conv(Aᵀ, B)ᵀ · s (whole tensor)
    * ``rows``:      W (V, d); b (n, d) replacement rows for ``indices`` (trainable tokens; a=None, scale 1)
    * ``expert``:    W (out_e, in) one expert's disk tensor; A (r·E, in), B (out, r·E) of a fused 3-D
      parameter (E, out, in); ΔW = rows ``expert.row0…`` of ΔP[e] (``kernel.expert_delta``)
    * ``expert_t``:  same, the parameter read as (E, in, out) (peft 0.17–0.19.0)
    * ``fused``:     W (E, out, in) the fused parameter as the checkpoint stores it; A (r·E, in), B (out, r·E);
      ΔW = experts ``[r0, r1)`` of ΔP (``kernel.fused_delta``); ``expert`` carries E (index 0, row0 0)
    * ``fused_t``:   W (E, in, out) stored fused, experts ``is_transposed`` (GPT-OSS); A (r·E, in), B (out, r·E)

    ``magnitude`` is DoRA's ``lora_magnitude_vector`` (its step has rounding ``dora``).
    """

    layout: str
    a: TensorRef | None
    b: TensorRef
    scale: float
    weight: float = 1.0  # the user's adapter weight (multi-adapter merges); 1.0 leaves PEFT's math untouched
    origin: str = ""  # adapter key stem, for messages
    magnitude: TensorRef | None = None
    indices: tuple[int, ...] = ()
    expert: ExpertSlice | None = None  # layouts expert / expert_t (and fused / fused_t: the count E) only
    task: int = 0  # which adapter (task vector) the term belongs to, for a Step's ``combination``

    def refs(self) -> tuple[TensorRef, ...]:
        """The adapter tensors this term reads."""
        return tuple(r for r in (self.a, self.b, self.magnitude) if r is not None)


@dataclass(frozen=True, slots=True)
class Update:
    """One base tensor a tuner (``streammerge.tuners.base.Tuner``) changes for one module: its ``plan``'s answer."""

    param: str  # "weight" | "bias"
    params: tuple[tuple[str, Any], ...] = ()  # hashable per-module values the apply function reads
    row_blocks: bool = False  # True: rows [r0, r1) can be merged alone, bit-identically to the whole
    work_elements: int = 0  # fp32 scratch elements of a whole-tensor update beyond W and ΔW (rotations, FFTs)


@dataclass(frozen=True, slots=True)
class TunerTerm:
    """A tuner's update of one base tensor for one module: the single term of a ``Step`` with rounding
    ``"tuner"`` (the tuner applies its own rounding, PEFT's). ``tensors`` are the module's adapter
    tensors (role -> ``TensorRef``); ``inverse`` selects the tuner's ``invert`` (unmerge)."""

    tuner: str  # peft_type: the registry key
    tensors: tuple[tuple[str, TensorRef], ...]  # role -> the adapter tensor
    update: Update
    origin: str = ""
    inverse: bool = False
    weight: float = 1.0  # fields every step term has (combinations never hold tuner terms)
    task: int = 0
    layout: str = "tuner"

    def refs(self) -> tuple[TensorRef, ...]:
        return tuple(ref for _, ref in self.tensors)

    @property
    def row_blocks(self) -> bool:
        return self.update.row_blocks


#: ``--combination`` values. ``cat`` sums weighted LoRA deltas (exact); the others are task-vector
#: operators applied per tensor to the adapters' full deltas ΔWᵢ (``streammerge.combine``).
COMBINATIONS = ("cat", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Operators that rank elements over the whole tensor (top-k by magnitude): they cannot be cut into rows.
WHOLE_TENSOR_COMBINATIONS = frozenset({"ties", "magnitude_prune"})


@dataclass(frozen=True, slots=True)
class Combination:
    """A task-vector operator for one tensor: ΔW = op({ΔWᵢ}, weights, density), then W ← rnd(W + ΔW).

    ``weights[i]`` belongs to the terms with ``task == i``; ``key`` (the tensor name) and ``seed``
    feed DARE's counter-based mask, so the mask depends on nothing else (not on blocks or threads).
    """

    method: str
    weights: tuple[float, ...]
    density: float
    seed: int
    key: str
    majority_sign: str = "total"

    @property
    def whole_tensor(self) -> bool:
        return self.method in WHOLE_TENSOR_COMBINATIONS


@dataclass(frozen=True, slots=True)
class Step:
    """Terms summed in fp32 and added with one rounding policy.

    ``once``:        W ← rnd(W + ΣΔ)        (PEFT Linear/Conv ``W.data += ΔW``)
    ``delta_first``: W ← rnd(W + rnd(ΣΔ))   (PEFT Embedding ``W.data += ΔW.to(W.dtype)``)
    ``dora``:        W ← rnd((m/‖W+ΔW‖)·(W+ΔW))  (one term; ``kernel.dora_block``)
    ``rows``:        W[idx] ← rnd(rows)       (one term; trainable tokens, ``kernel.replace_rows``)
    ``tuner``:       W ← the tuner's merge    (one ``TunerTerm``: LoHa, IA³, OFT, …; ``streammerge.tuners``)
    """

    terms: tuple[LoraTerm | TunerTerm, ...]
    rounding: str
    combination: Combination | None = None  # None: plain sum of the terms (each with its ``weight``)
