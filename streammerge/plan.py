"""The planner: headers and configs in, a frozen :class:`Plan` out. Pure: no torch, no file I/O.

Every adapter key is accounted for: it becomes part of a :class:`LoraTerm`, a replacement
source, or an error. Every base tensor appears in the output exactly once (or is dropped for a
stated reason, like ``lm_head`` under a sequence-classification head). All problems found are
reported together.

Ordering (PEFT ``merge_and_unload``, spec §3): saved tensors (``base_layer`` copies, biases,
``modules_to_save``) replace base values first (PEFT's ``load_state_dict``), then LoRA deltas are
added module by module in ``named_modules`` order, one rounding per :class:`Step`.
"""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from streammerge import experts, naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import INDEX_NAME, Checkpoint, output_name
from streammerge.errors import PlanError, UnsupportedAdapterError
from streammerge.units import format_size
from streammerge.header import DTYPE_SIZES, FLOAT_DTYPES, SafetensorsHeader, TensorInfo, encode_header

#: Rows per kernel block are a multiple of this. MKL's fp32 GEMM gave different sums for a
#: 2730-row block of a 70B q_proj than for the whole matrix; multiples of 64 matched (design §7).
ROW_ALIGN = 64

#: fp32 elements per cache-sized chunk the CPU kernel works on (``kernel.merge_block``): the
#: chunk's fp32 scratch then stays in L2; measured 2-5x faster than one pass over a large block.
CHUNK_ELEMENTS = 1 << 17


def chunk_rows(row_numel: int) -> int:
    """Rows per kernel chunk for rows of ``row_numel`` elements: a multiple of ROW_ALIGN."""
    return max(ROW_ALIGN, CHUNK_ELEMENTS // max(row_numel, 1) // ROW_ALIGN * ROW_ALIGN)


@dataclass(frozen=True, slots=True)
class TensorRef:
    """Where one stored tensor's bytes are: absolute file path and byte offset."""

    path: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


def _ref(header: SafetensorsHeader, info: TensorInfo) -> TensorRef:
    return TensorRef(header.path, info.name, info.dtype, info.shape, header.data_start + info.begin)


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
    expert: experts.ExpertSlice | None = None  # layouts expert / expert_t only
    task: int = 0  # which adapter (task vector) the term belongs to, for a Step's ``combination``


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
    """

    terms: tuple[LoraTerm, ...]
    rounding: str
    combination: Combination | None = None  # None: plain sum of the terms (each with its ``weight``)


@dataclass(frozen=True, slots=True)
class TensorTask:
    """How to produce one output tensor: start from ``source`` (cast to ``dtype``), apply ``steps``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: TensorRef
    steps: tuple[Step, ...] = ()
    kind: str = "copy"  # copy | merge | replace | add  (for reporting)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]

    @property
    def is_raw_copy(self) -> bool:
        """True when the output bytes are the source bytes: no arithmetic and no cast."""
        return not self.steps and self.source.dtype == self.dtype and self.source.shape == self.shape

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        return math.prod(self.shape[1:]) if self.shape else 1

    @property
    def whole(self) -> bool:
        """True when the task must not be cut into row blocks (nor the kernel into chunks):

        * a convolution delta, or a DoRA norm taken across rows (embedding columns, HF Conv1D
          outputs): the step needs every row at once;
        * a transposed layout (HF Conv1D, embedding, transposed experts) whose rows are narrower than
          ROW_ALIGN: blocks slice A's columns, and MKL's fp32 sums then differ from the whole product for
          widths up to 11 (measured over 1944 shapes; the linear layout never differed). Such tensors are small;
        * a combination that ranks elements over the whole tensor (ties, magnitude_prune).
        """
        return any(
            term.layout == "conv"
            or (step.rounding == "dora" and term.layout != "linear")
            or (term.layout in ("linear_t", "embedding", "expert_t") and self.row_numel < ROW_ALIGN)
            for step in self.steps
            for term in step.terms
        ) or any(s.combination is not None and s.combination.whole_tensor for s in self.steps)

    @property
    def kernel_chunks(self) -> bool:
        """May the CPU kernel walk a block in cache-sized chunks? Not a whole task, nor a combination
        step (its operators work on the block they are given)."""
        return not self.whole and all(s.combination is None for s in self.steps)

    @property
    def min_rows(self) -> int:
        """The fewest rows one block of this task can have."""
        return self.rows if self.whole else min(self.rows, max(r1 - r0 for r0, r1 in row_blocks(self.rows, ROW_ALIGN)))


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """One output file: its name, its exact header bytes, and its tensors in data order."""

    filename: str
    header: bytes
    tasks: tuple[TensorTask, ...]

    @property
    def data_size(self) -> int:
        return sum(t.nbytes for t in self.tasks)


@dataclass(frozen=True, slots=True)
class PlanOptions:
    """Options that change the plan (not how it is executed)."""

    max_shard_size: int | None = None  # bytes; None keeps the base's shard layout


@dataclass(frozen=True, slots=True)
class Plan:
    shards: tuple[ShardPlan, ...]
    write_index: bool
    index_metadata: tuple[tuple[str, object], ...]
    config_updates: tuple[tuple[str, object], ...]
    warnings: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def tasks(self) -> tuple[TensorTask, ...]:
        return tuple(t for s in self.shards for t in s.tasks)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(("merge", "replace", "add", "copy"), 0)
        for t in self.tasks():
            out[t.kind] += 1
        out["drop"] = len(self.dropped)
        return out

    @property
    def total_bytes(self) -> int:
        return sum(s.data_size for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.filename for s in self.shards for t in s.tasks}

    def index_json(self) -> str:
        """``model.safetensors.index.json`` text: base metadata kept, ``total_size`` recomputed in bytes."""
        meta = dict(self.index_metadata)
        meta["total_size"] = self.total_bytes
        doc = {"metadata": meta, "weight_map": dict(sorted(self.weight_map().items()))}
        return json.dumps(doc, indent=2) + "\n"

    def min_memory(self) -> int:
        """The smallest working-memory budget that can execute this plan (one minimal block)."""
        return max((block_bytes(t, t.min_rows) for t in self.tasks() if not t.is_raw_copy), default=0)

    def summary(self) -> str:
        c = self.counts()
        lines = [
            f"plan: {c['merge']} tensors to merge, {c['replace']} to replace, {c['add']} to add, "
            f"{c['copy']} to copy, {c['drop']} to drop",
            f"output: {len(self.shards)} shard(s), {format_size(self.total_bytes)}"
            + (f", index {INDEX_NAME}" if self.write_index else ""),
            f"minimum working memory: {format_size(self.min_memory())}",
        ]
        lines += [f"config: {k} = {json.dumps(v)}" for k, v in self.config_updates]
        lines += [f"warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def row_blocks(rows: int, step: int) -> tuple[tuple[int, int], ...]:
    """Cut ``rows`` into ``[r0, r1)`` blocks of ``step`` rows (a multiple of ROW_ALIGN).

    A short tail is folded into the block before it, so every block but a lone one has at least
    ROW_ALIGN rows: measured on MKL, a 65-row fp32 product cut 64 + 1 differs from the whole
    (the 1-row product takes another code path), while 64·k + tail cut at multiples of 64 with a
    last block of ≥ 64 rows matched every time (tests/test_kernel.py).
    """
    assert step % ROW_ALIGN == 0 or step >= rows, "blocks must be cut at multiples of ROW_ALIGN"
    starts = list(range(0, max(rows, 1), max(step, 1)))
    if len(starts) > 1 and rows - starts[-1] < ROW_ALIGN:
        starts.pop()
    return tuple(zip(starts, [*starts[1:], max(rows, 1) if rows else 0], strict=True))


#: Extra bytes per element for a DoRA step: W + ΔW is formed twice (the norm and the product), plus
#: the transposed copy the norm of an embedding or HF Conv1D reduces over (``kernel.dora_block``).
DORA_EXTRA_BYTES_PER_ELEMENT = 12


def _fp32_bytes(ref: TensorRef | None) -> int:
    return math.prod(ref.shape) * 4 if ref is not None else 0


def block_bytes(task: TensorTask, rows: int) -> int:
    """Working memory to merge ``rows`` rows of ``task`` (the budget's unit; see ``execute``).

    The block's output (out dtype) and its source rows (mapped pages, released after use), the
    fp32 scratch of one kernel chunk (ΔW, its sum with W, and a second term's delta: 3 × 4 bytes
    per element, with a short tail folded in: at most 2 × chunk rows), and the terms' fp32 factors.
    """
    row = task.row_numel
    block = rows * row * (DTYPE_SIZES[task.dtype] + DTYPE_SIZES[task.source.dtype])
    # A whole-tensor task (``TensorTask.whole``) is one kernel chunk; DoRA adds its norm scratch.
    per_element = 12 + (DORA_EXTRA_BYTES_PER_ELEMENT if any(s.rounding == "dora" for s in task.steps) else 0)
    # A combination is computed on the whole block, unchunked (``kernel.merge_block``).
    combined = any(s.combination is not None for s in task.steps)
    per_element += max((combine_bytes_per_element(s) for s in task.steps), default=0)
    scratch_rows = rows if task.whole or combined else min(rows, 2 * chunk_rows(row))
    chunk = scratch_rows * row * per_element if task.steps else 0
    factors = sum(
        _fp32_bytes(term.a) + _fp32_bytes(term.b) + _fp32_bytes(term.magnitude)
        for step in task.steps
        for term in step.terms
    )
    return block + chunk + factors


#: Working bytes per element of a combined block, per adapter: its fp32 task vector in the stack,
#: the sign-agreement mask and the product that ``disjoint_merge`` sums (``combine``).
COMBINE_BYTES_PER_TASK = 9
#: ... and once per block: building one task vector (B@A, its scaled copy), magnitude pruning
#: (|ΔW|, the comparison mask, the 0/1 float mask), the elected sign, the sums and counts; DARE
#: hashes the element counters in int64 (see ``combine.dare_keep``).
COMBINE_BYTES_SHARED = {"ties": 24, "magnitude_prune": 24, "dare_linear": 24, "dare_ties": 24}


def combine_bytes_per_element(step: Step) -> int:
    """Extra working bytes per element that a step's combination needs beyond WORK_BYTES_PER_ELEMENT."""
    c = step.combination
    if c is None:
        return 0
    tasks = len({t.task for t in step.terms})
    return tasks * COMBINE_BYTES_PER_TASK + COMBINE_BYTES_SHARED[c.method]


# --------------------------------------------------------------------------------------------
# building


@dataclass
class _Target:
    """Mutable accumulator for one base tensor while planning (never escapes build_plan)."""

    replacement: TensorRef | None = None
    replacement_order: tuple[int, str] = (-1, "")
    steps: list[tuple[tuple[int, str], int, Step]] = field(default_factory=list)


def build_plan(ckpt: Checkpoint, adapters: Sequence[Adapter], options: PlanOptions | None = None) -> Plan:
    """Plan merging ``adapters`` (applied in order) into ``ckpt``.

    Raises:
        PlanError: every mismatch found (unknown keys, shapes, ranks), all in one message.
        UnsupportedAdapterError: a key or feature streammerge refuses, by name.
    """
    options = options or PlanOptions()
    located = ckpt.locate()
    names = frozenset(located)
    aliases = naming.tied_aliases(names, ckpt.config)
    problems: list[str] = []
    targets: dict[str, _Target] = defaultdict(_Target)
    added: dict[str, TensorRef] = {}
    config_updates: dict[str, object] = {}
    warnings: list[str] = []
    drop: set[str] = set()

    for index, adapter in enumerate(adapters):
        _plan_adapter(index, adapter, ckpt, located, aliases, targets, added, config_updates, warnings, drop, problems)
    return _assemble(ckpt, adapters, targets, added, config_updates, warnings, drop, problems, options)


def _misfit_summary(ckpt: Checkpoint, adapters: Sequence[Adapter], count: int) -> str:
    """First line of a many-problem error: which adapters, what they were trained on, which base."""
    who = ", ".join(f"{a.root} (trained on {a.config.base_model_name_or_path!r})" if a.config.base_model_name_or_path
                    else str(a.root) for a in adapters)
    return f"{count} problems fitting the adapter(s) {who} to the base {ckpt.root}:"


def _assemble(ckpt: Checkpoint, adapters: Sequence[Adapter], targets: Mapping[str, _Target],
              added: Mapping[str, TensorRef], config_updates: Mapping[str, object], warnings: Sequence[str],
              drop: set[str], problems: list[str], options: PlanOptions) -> Plan:
    """Turn the per-tensor accumulators into the frozen plan (or raise every problem found)."""
    located = ckpt.locate()
    aliases = naming.tied_aliases(frozenset(located), ckpt.config)
    warnings = list(warnings)
    for head, emb in aliases.items():
        if targets.get(emb) is not None and targets[emb].steps and config_updates.get("tie_word_embeddings", True):
            warnings.append(
                f"{emb!r} is tied to {head!r} (tie_word_embeddings): its LoRA delta changes the input embeddings "
                "and the output head together, exactly as PEFT's merge does"
            )
    _check_resized(located, targets, added, config_updates, problems)
    if len(problems) == 1:
        raise PlanError(problems[0])
    if problems:
        raise PlanError(_misfit_summary(ckpt, adapters, len(problems)), problems)

    tasks_by_name = {}
    for name, (shard_no, info) in located.items():
        if name in drop:
            continue
        tasks_by_name[name] = _task(name, _ref(ckpt.shards[shard_no], info), targets.get(name))
    for name, ref in added.items():
        tasks_by_name[name] = TensorTask(name, _added_dtype(ckpt, ref), ref.shape, ref, kind="add")

    shards = _layout(ckpt, tasks_by_name, added, drop, options)
    return Plan(
        shards=shards,
        write_index=ckpt.has_index or len(shards) > 1,
        index_metadata=tuple((k, v) for k, v in ckpt.index_metadata.items() if k != "total_size"),
        config_updates=tuple(config_updates.items()),
        warnings=tuple(warnings),
        dropped=tuple(sorted(drop)),
    )


def _task(name: str, base: TensorRef, target: _Target | None) -> TensorTask:
    if target is None:
        return TensorTask(name, base.dtype, base.shape, base)
    source = target.replacement or base
    steps = tuple(step for _, _, step in sorted(target.steps, key=lambda s: (s[1], s[0])))
    kind = "merge" if steps else "replace"
    return TensorTask(name, base.dtype, source.shape, source, steps, kind)


def _added_dtype(ckpt: Checkpoint, ref: TensorRef) -> str:
    """New tensors (heads) take the checkpoint's floating dtype, as PEFT's save does."""
    dtypes = [t.dtype for s in ckpt.shards for t in s.tensors if t.dtype in FLOAT_DTYPES]
    return max(set(dtypes), key=dtypes.count) if dtypes else ref.dtype


def _plan_adapter(
    index: int,
    adapter: Adapter,
    ckpt: Checkpoint,
    located: Mapping[str, tuple[int, TensorInfo]],
    aliases: Mapping[str, str],
    targets: dict[str, _Target],
    added: dict[str, TensorRef],
    config_updates: dict[str, object],
    warnings: list[str],
    drop: set[str],
    problems: list[str],
) -> None:
    cfg = adapter.config
    header = adapter.weights
    infos = header.by_name()
    keys = [naming.parse_key(k) for k in header.names()]
    by_module: dict[str, dict[str, naming.AdapterKey]] = defaultdict(dict)
    where = f"{header.path}"

    refused = [k for k in keys if k.role == "other_lora"]
    if refused:
        raise UnsupportedAdapterError(
            f"{where}: this LoRA variant is not supported yet (tensor {refused[0].key!r}); "
            "merge this adapter with PEFT's merge_and_unload for now"
        )

    for k in keys:
        if k.role == "tensor":
            _plan_replacement(index, adapter, k, infos[k.key], ckpt, located, aliases, targets, added,
                              config_updates, warnings, drop, problems)
        else:
            by_module[k.module][k.role] = k
    check_targeting(adapter, by_module, located, aliases, problems)
    drift = cfg.legacy_pattern_drift(sorted(m for m, roles in by_module.items() if roles.keys() & {"lora_A", "emb_A"}))
    if drift and cfg.pattern_rules == "current":
        warnings.append(
            f"{where}: saved before PEFT 0.18 (no peft_version) with rank/alpha patterns, and {drift}; the merge "
            "follows PEFT >= 0.15 as PEFT 0.21 does; pass `pattern_rules` 0.14 or pre-0.14 to use the rules "
            "of the PEFT version that trained it"
        )

    model_type = ckpt.config.get("model_type")
    if cfg.raw.get("target_parameters"):
        _plan_param_wrappers(index, adapter, by_module, infos, located, aliases, targets, problems)
    warnings.extend(experts.v4_warnings(where, cfg, model_type, by_module))
    for module, roles in sorted(by_module.items(), key=lambda kv: naming.module_order(kv[0])):
        _plan_module(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems)


def _plan_module(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems):
    order = naming.module_order(module)
    if "lora_A" in roles or "lora_B" in roles:
        _plan_linear(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems, order)
    if "emb_A" in roles or "emb_B" in roles:
        _plan_embedding(index, adapter, module, roles, infos, located, aliases, targets, problems, order)
    if "lora_B_bias" in roles:
        _plan_bias(index, adapter, module, roles["lora_B_bias"], infos, located, aliases, targets, problems, order)
    if "token_delta" in roles:
        _plan_tokens(index, adapter, module, roles["token_delta"], infos, located, aliases, targets, problems, order)
    if "magnitude" in roles and not ({"lora_A", "lora_B", "emb_A", "emb_B"} & roles.keys()):
        problems.append(
            f"{adapter.weights.path}: {roles['magnitude'].key!r} is a DoRA magnitude without LoRA factors for "
            f"module {module!r}; the adapter file is incomplete: re-save it"
        )


def _plan_param_wrappers(index, adapter, by_module, infos, located, aliases, targets, problems):
    """PEFT ``target_parameters`` (``ParamWrapper``): ``P + rnd(ΔP)``, fused experts de-fused per disk tensor."""
    where = str(adapter.weights.path)
    wrapped = experts.take_param_wrappers(where, by_module, adapter.config.raw["target_parameters"], problems)
    for wp in wrapped:
        for d in experts.plan_wrapped(where, adapter.config, wp, infos, located, aliases, problems):
            term = LoraTerm(d.layout, _ref(adapter.weights, d.a), _ref(adapter.weights, d.b), d.scale,
                            origin=d.origin, expert=d.expert)
            _check_float(adapter, d.target, located[d.target][1], problems)
            targets[d.target].steps.append((naming.module_order(wp.module), index, Step((term,), "delta_first")))


def _pair(adapter: Adapter, module: str, roles: Mapping[str, naming.AdapterKey], a_role: str, b_role: str,
          problems: list[str]) -> tuple[naming.AdapterKey, naming.AdapterKey] | None:
    if a_role not in roles or b_role not in roles:
        have, missing = (a_role, b_role) if a_role in roles else (b_role, a_role)
        problems.append(
            f"{adapter.weights.path}: module {module!r} has {roles[have].key!r} but no {missing} tensor; "
            "the adapter file is incomplete: re-save it"
        )
        return None
    return roles[a_role], roles[b_role]


def _resolve_target(adapter: Adapter, module: str, param: str, located: Mapping[str, object],
                    aliases: Mapping[str, str], problems: list[str], what: str) -> str | None:
    name = f"{module}.{param}"
    target = naming.resolve(name, located.keys(), aliases)
    if target is None:
        problems.append(
            f"{adapter.weights.path}: {what} for module {module!r} targets {name!r}, which is not in the base "
            f"checkpoint{naming.suggest(name, located.keys())}; is this adapter for a different base model?"
        )
    return target


def _check_rank(adapter: Adapter, module: str, r: int, problems: list[str]) -> bool:
    want = adapter.config.rank_for(module)
    if r != want:
        problems.append(
            f"{adapter.weights.path}: module {module!r} has rank {r} in its tensors but adapter_config.json "
            f"gives r={want} (r / rank_pattern); the config and weights disagree"
        )
        return False
    return True


def _pair_target(adapter, module, roles, a_role, b_role, infos, located, aliases, problems, what):
    """The A/B pair of ``module`` and the base tensor it changes, or None (problems recorded)."""
    pair = _pair(adapter, module, roles, a_role, b_role, problems)
    if pair is None:
        return None
    target = _resolve_target(adapter, module, "weight", located, aliases, problems, what)
    if target is None:
        return None
    return pair, infos[pair[0].key], infos[pair[1].key], target


def _plan_linear(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems, order):
    found = _pair_target(adapter, module, roles, "lora_A", "lora_B", infos, located, aliases, problems, "LoRA")
    if found is None:
        return
    pair, a, b, target = found
    w = located[target][1]
    shape = _shape(targets, target, w)
    conv_want = _conv_delta_shape(adapter, pair[0].key, a.shape, b.shape, shape) if len(a.shape) != 2 else None
    r = a.shape[0] if a.shape else 0
    if len(b.shape) < 2 or b.shape[1] != r:
        problems.append(
            f"{adapter.weights.path}: {pair[0].key!r} has rank {r} but {pair[1].key!r} has shape {b.shape}; "
            "lora_A and lora_B disagree: the adapter file is corrupt"
        )
        return
    if not _check_rank(adapter, module, r, problems):
        return
    if conv_want is None:
        layout = "linear_t" if naming.is_conv1d(module, model_type) else "linear"
        want = (b.shape[0], a.shape[1]) if layout == "linear" else (a.shape[1], b.shape[0])
    else:
        layout, want = "conv", conv_want
    if want != shape:
        problems.append(
            f"{adapter.weights.path}: LoRA for {module!r} makes a delta of shape {want} but base tensor {target!r} "
            f"has shape {shape}; the adapter was trained on a different base model"
        )
        return
    magnitude = _magnitude(adapter, module, roles, infos, b.shape[0], problems)
    term = LoraTerm(layout, _ref(adapter.weights, a), _ref(adapter.weights, b), adapter.config.scale_for(module),
                    origin=module, magnitude=magnitude)
    _check_float(adapter, target, w, problems)
    targets[target].steps.append((order, index, Step((term,), "dora" if magnitude else "once")))


def _shape(targets: Mapping[str, _Target], target: str, w: TensorInfo) -> tuple[int, ...]:
    """The shape the LoRA applies to: the adapter's replacement (a resized vocabulary) or the base's."""
    slot = targets.get(target)
    return slot.replacement.shape if slot is not None and slot.replacement is not None else w.shape


def _conv_delta_shape(adapter: Adapter, key: str, a: tuple[int, ...], b: tuple[int, ...],
                      w: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a Conv1d/2d/3d LoRA delta, refusing what PEFT cannot merge (spec §3.5, §0.5 f)."""
    if len(a) not in (3, 4, 5) or len(b) != len(a):
        raise UnsupportedAdapterError(
            f"{adapter.weights.path}: {key!r} has shape {a}: not a Linear, Embedding or Conv1d/2d/3d LoRA "
            "factor; merge this adapter with PEFT"
        )
    if len(w) == len(a) and w[1] != a[1]:
        raise UnsupportedAdapterError(
            f"{adapter.weights.path}: {key!r} is LoRA on a grouped convolution (groups={a[1] // max(w[1], 1)}); "
            "PEFT cannot merge convolutions with groups > 1 either: keep the adapter unmerged"
        )
    if len(a) == 5 and a[2:4] == (1, 1):
        raise UnsupportedAdapterError(
            f"{adapter.weights.path}: {key!r} is LoRA on a Conv3d with kernel {a[2:]}: PEFT 0.21 takes its 1x1 "
            "path for this kernel and crashes on merge, so there is no reference result; keep it unmerged"
        )
    return (b[0], a[1], *a[2:])


def _magnitude(adapter: Adapter, module: str, roles, infos, out: int, problems: list[str]) -> TensorRef | None:
    """DoRA's magnitude (``lora_magnitude_vector``) for ``module``: required iff ``use_dora``."""
    key = roles.get("magnitude")
    if key is None:
        if adapter.config.use_dora:
            problems.append(
                f"{adapter.weights.path}: use_dora is true but module {module!r} has no DoRA lora_magnitude_vector; "
                "PEFT would merge a magnitude recomputed from random weights: re-save the adapter"
            )
        return None
    info = infos[key.key]
    if not adapter.config.use_dora:
        problems.append(
            f"{adapter.weights.path}: {key.key!r} is a DoRA magnitude but use_dora is false in adapter_config.json; "
            "PEFT would ignore it: fix the config (use_dora: true) or remove the tensor"
        )
        return None
    if math.prod(info.shape) != out or info.dtype not in FLOAT_DTYPES:
        problems.append(
            f"{adapter.weights.path}: {key.key!r} has shape {info.shape} ({info.dtype}); DoRA needs {out} float "
            "magnitudes, one per output: the adapter file is corrupt"
        )
        return None
    return _ref(adapter.weights, info)


def _plan_embedding(index, adapter, module, roles, infos, located, aliases, targets, problems, order):
    found = _pair_target(adapter, module, roles, "emb_A", "emb_B", infos, located, aliases, problems,
                         "embedding LoRA")
    if found is None:
        return
    pair, a, b, target = found
    r = a.shape[0] if a.shape else 0
    if len(a.shape) != 2 or len(b.shape) != 2 or b.shape[1] != r:
        problems.append(
            f"{adapter.weights.path}: embedding LoRA {pair[0].key!r} {a.shape} and {pair[1].key!r} {b.shape} "
            "do not form a rank-r pair; the adapter file is corrupt"
        )
        return
    if not _check_rank(adapter, module, r, problems):
        return
    w = located[target][1]
    shape = _shape(targets, target, w)
    if shape != (a.shape[1], b.shape[0]):
        problems.append(
            f"{adapter.weights.path}: embedding LoRA for {module!r} makes a delta of shape {(a.shape[1], b.shape[0])} "
            f"but base tensor {target!r} has shape {shape}; the adapter was trained on a different base "
            "(or a resized vocabulary: then the adapter must carry the resized embed_tokens/lm_head)"
        )
        return
    magnitude = _magnitude(adapter, module, roles, infos, b.shape[0], problems)
    term = LoraTerm("embedding", _ref(adapter.weights, a), _ref(adapter.weights, b),
                    adapter.config.scale_for(module), origin=module, magnitude=magnitude)
    _check_float(adapter, target, w, problems)
    targets[target].steps.append((order, index, Step((term,), "dora" if magnitude else "delta_first")))


def _plan_bias(index, adapter, module, key, infos, located, aliases, targets, problems, order):
    target = _resolve_target(adapter, module, "bias", located, aliases, problems, "lora_B.bias")
    if target is None:
        return
    b, base = infos[key.key], located[target][1]
    if b.shape != base.shape:
        problems.append(
            f"{adapter.weights.path}: {key.key!r} has shape {b.shape} but base bias {target!r} has {base.shape}"
        )
        return
    term = LoraTerm("bias", None, _ref(adapter.weights, b), adapter.config.scale_for(module), origin=module)
    targets[target].steps.append((order, index, Step((term,), "once")))


def _plan_tokens(index, adapter, module, key, infos, located, aliases, targets, problems, order):
    """Trainable tokens (spec §3.8): the stored rows replace rows ``idx`` of the embedding/head."""
    indices = adapter.config.token_indices_for(module)
    info = infos[key.key]
    target = _resolve_target(adapter, module, "weight", located, aliases, problems, "trainable tokens")
    if target is None or indices is None:
        return
    shape = _shape(targets, target, located[target][1])
    bad = [i for i in indices if not 0 <= i < shape[0]]
    if len(shape) != 2 or info.shape != (len(indices), shape[1]) or bad or len(set(indices)) != len(indices):
        problems.append(
            f"{adapter.weights.path}: {key.key!r} has shape {info.shape} but trainable_token_indices gives "
            f"{len(indices)} distinct row(s) of {target!r} {shape}"
            + (f" (out of range: {bad[:5]})" if bad else "") + "; the config and weights disagree"
        )
        return
    term = LoraTerm("rows", None, _ref(adapter.weights, info), 1.0, origin=module, indices=indices)
    targets[target].steps.append((order, index, Step((term,), "rows")))


_LORA_ROLES = frozenset({"lora_A", "lora_B", "lora_B_bias", "emb_A", "emb_B", "magnitude"})


def check_targeting(adapter: Adapter, by_module: Mapping[str, Mapping[str, naming.AdapterKey]],
                    located: Mapping[str, object], aliases: Mapping[str, str], problems: list[str]) -> None:
    """Refuse adapter files that disagree with their config, where PEFT would silently do the wrong thing.

    * A LoRA key for a module the config does not target (``AdapterConfig.targets_module``, PEFT's
      ``check_target_module_exists``): PEFT loads with ``strict=False`` and drops it without a word.
    * A trainable-tokens delta for a module ``trainable_token_indices`` does not name: same.
    * With ``init_lora_weights: false`` only, a targeted base module with no keys: PEFT would merge
      the random A and B it initialised. (With the default init B = 0, so a missing module is a no-op
      in PEFT too and is accepted.) Only list-form ``target_modules`` are checked, on 2-D base weights.
    """
    cfg = adapter.config
    for module, roles in by_module.items():
        lora = sorted(roles.keys() & _LORA_ROLES)
        if lora and cfg.targets_module(module) is False and not _param_target(cfg, module):
            problems.append(
                f"{adapter.weights.path}: adapter tensor {roles[lora[0]].key!r} is for module {module!r}, which "
                f"adapter_config.json does not target (target_modules={_show(cfg.target_modules)}); PEFT would "
                "silently ignore it: add the module to target_modules or remove its tensors"
            )
        if "token_delta" in roles and cfg.token_indices_for(module) is None:
            problems.append(
                f"{adapter.weights.path}: {roles['token_delta'].key!r} is a trainable-tokens delta but "
                "trainable_token_indices does not name this module; PEFT would silently ignore it: fix the config"
            )
    if cfg.raw.get("init_lora_weights", True) is not False or not isinstance(cfg.target_modules, tuple):
        return
    covered = {naming.resolve(m + ".weight", located.keys(), aliases) for m in by_module}
    for name in sorted({*located, *aliases}):
        info = located.get(aliases.get(name, name))
        shape = getattr(info[1], "shape", ()) if isinstance(info, tuple) else ()
        module = name.removesuffix(".weight")
        # Per-expert disk modules (experts.N.gate_proj) are fused parameters in transformers v5, not
        # modules PEFT wraps: a v5 adapter targeting "gate_proj" has no keys for them, correctly.
        if (name.endswith(".weight") and len(shape) >= 2 and cfg.targets_module(module)
                and not _PER_EXPERT.search(module)
                and naming.resolve(name, located.keys(), aliases) not in covered):
            problems.append(
                f"{adapter.weights.path}: adapter_config.json targets module {module!r} with "
                "init_lora_weights=false, but the adapter has no tensors for it; PEFT would merge its random "
                "initial A and B: the adapter file is incomplete (or target_modules is wrong)"
            )
            return


_PER_EXPERT = re.compile(r"\.experts\.\d+\.")


def _param_target(cfg, module: str) -> bool:
    """The module owns a ``target_parameters`` parameter (MoE experts): not target_modules' business."""
    params = cfg.raw.get("target_parameters") or []
    stem = module.replace(".base_layer", "")
    return any(f"{stem}.".endswith(f".{p.rpartition('.')[0]}.") or stem == p.rpartition(".")[0]
               for p in params if isinstance(p, str))


def _show(targets: object) -> str:
    return json.dumps(list(targets) if isinstance(targets, tuple) else targets)


def _check_float(adapter: Adapter, target: str, w: TensorInfo, problems: list[str]) -> None:
    if w.dtype not in FLOAT_DTYPES:
        problems.append(
            f"{adapter.weights.path}: base tensor {target!r} is {w.dtype}, not a float dtype; a LoRA delta cannot "
            "be merged into it (quantized base?): use the full-precision base"
        )


def _is_saved_module(cfg_modules: tuple[str, ...], module: str) -> bool:
    """PEFT's ``_set_trainable`` matching for modules_to_save: plain ``endswith``."""
    return any(module.endswith(m) for m in cfg_modules)


def _plan_replacement(index, adapter, k, info, ckpt, located, aliases, targets, added, config_updates, warnings,
                      drop, problems):
    cfg = adapter.config
    ref = _ref(adapter.weights, info)
    head_modules = cfg.modules_to_save + _task_heads(cfg.task_type)
    saved_head = _is_saved_module(head_modules, k.module)
    tied_head = k.target in aliases and ".base_layer." not in k.key.removeprefix(naming.PEFT_PREFIX)
    if saved_head and tied_head:
        # modules_to_save on a tied head unties it: PEFT writes lm_head.weight and sets the flag false.
        added[k.target] = ref
        config_updates["tie_word_embeddings"] = False
        return
    target = naming.resolve(k.target, located.keys(), aliases)
    if target is None:
        if saved_head:  # a new head (SEQ_CLS score, classifier) that the base does not have
            added[k.target] = ref
            _retarget_task(cfg, ckpt, k.target, located, aliases, info, config_updates, drop, warnings)
            return
        problems.append(
            f"{adapter.weights.path}: adapter tensor {k.key!r} names {k.target!r}, which is not in the base "
            f"checkpoint{naming.suggest(k.target, located.keys())}; is this adapter for a different base model?"
        )
        return
    base = located[target][1]
    if base.shape != info.shape and not _resized_vocab(k, target, base, info, aliases, config_updates, problems):
        problems.append(
            f"{adapter.weights.path}: adapter tensor {k.key!r} has shape {info.shape} but base tensor {target!r} "
            f"has shape {base.shape}; the adapter was trained on a different base (or a resized vocabulary)"
        )
        return
    if saved_head and target in aliases.values() and any(h for h, e in aliases.items() if e == target):
        # modules_to_save on the input embedding of a tied model: the head keeps the old embedding.
        for head, emb in aliases.items():
            if emb == target and head not in added:
                shard_no, emb_info = located[target]
                added[head] = _ref(ckpt.shards[shard_no], emb_info)
        config_updates["tie_word_embeddings"] = False
    slot = targets[target]
    order = naming.module_order(k.module)
    if slot.replacement is None or order >= slot.replacement_order:
        slot.replacement, slot.replacement_order = ref, order


def _resized_vocab(k, target, base: TensorInfo, info: TensorInfo, aliases, config_updates, problems) -> bool:
    """A full embedding or output head with a different vocabulary size (spec §6.2): accept it as
    the new tensor and set ``vocab_size``. False when the tensor is not a vocabulary matrix."""
    vocab_tensor = target.endswith(naming.INPUT_EMBEDDINGS) or target.removesuffix(".weight").rpartition(".")[2] in (
        "lm_head", "embed_out", "output") or target in aliases.values()
    if not vocab_tensor or len(info.shape) != 2 or info.shape[1:] != base.shape[1:]:
        return False
    previous = config_updates.get("vocab_size")
    if previous is not None and previous != info.shape[0]:
        problems.append(
            f"adapter tensor {k.key!r} has a vocabulary of {info.shape[0]} rows but another resized tensor has "
            f"{previous}; embed_tokens and lm_head must be resized alike"
        )
    config_updates["vocab_size"] = info.shape[0]
    return True


def _check_resized(located, targets, added, config_updates, problems) -> None:
    """A resized vocabulary must resize every vocabulary tensor on disk (spec §6.2): an embedding of
    the new size beside a head of the old one is not a model (PEFT: size mismatch at load)."""
    new = config_updates.get("vocab_size")
    if new is None:
        return
    for name, (_, info) in located.items():
        slot = targets.get(name)
        shape = slot.replacement.shape if slot is not None and slot.replacement is not None else info.shape
        vocab_tensor = name.endswith(naming.INPUT_EMBEDDINGS) or name.removesuffix(".weight").rpartition(".")[2] in (
            "lm_head", "embed_out", "output")
        if vocab_tensor and len(shape) == 2 and shape[0] != new and name not in added:
            problems.append(
                f"the adapter resizes the vocabulary to {new} rows but carries no resized {name!r} (still {shape[0]} "
                "rows); save the adapter with save_embedding_layers=True so both embed_tokens and lm_head are included"
            )


def _task_heads(task_type: str | None) -> tuple[str, ...]:
    """Heads PEFT appends to ``modules_to_save`` for a task type (``peft_model.py``)."""
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):
        return ("classifier", "score")
    if task_type == "QUESTION_ANS":
        return ("qa_outputs",)
    return ()


_TASK_CLASSES = {"SEQ_CLS": "ForSequenceClassification", "TOKEN_CLS": "ForTokenClassification",
                 "QUESTION_ANS": "ForQuestionAnswering"}


def _retarget_task(cfg, ckpt, head, located, aliases, info, config_updates, drop, warnings):
    """A task head (score/classifier) turns a CausalLM checkpoint into ``*For<Task>``: drop lm_head."""
    suffix = _TASK_CLASSES.get(cfg.task_type or "")
    if suffix is None:
        return
    for name in ("lm_head.weight", "lm_head.bias"):
        if name in located:
            drop.add(name)
    archs = ckpt.config.get("architectures") or []
    if isinstance(archs, list) and archs:
        new = [a.replace("ForCausalLM", suffix) if "ForCausalLM" in a else a for a in archs]
        config_updates["architectures"] = new
    if suffix != "ForQuestionAnswering" and info.shape:
        labels = info.shape[0]
        config_updates["id2label"] = {str(i): f"LABEL_{i}" for i in range(labels)}
        config_updates["label2id"] = {f"LABEL_{i}": i for i in range(labels)}
    warnings.append(
        f"task head {head!r} from the adapter makes this a {suffix[3:]} model: lm_head dropped, "
        "architectures and labels updated in config.json; set id2label names and pad_token_id as you need"
    )


# --------------------------------------------------------------------------------------------
# output layout


def _layout(ckpt: Checkpoint, tasks: Mapping[str, TensorTask], added: Mapping[str, TensorRef], drop: set[str],
            options: PlanOptions) -> tuple[ShardPlan, ...]:
    if options.max_shard_size is not None:
        return _reshard(ckpt, tasks, options.max_shard_size)
    shards = []
    last = len(ckpt.shards) - 1
    for i, (header, filename) in enumerate(zip(ckpt.shards, ckpt.shard_names, strict=True)):
        own = [tasks[t.name] for t in header.tensors if t.name in tasks]
        extra = [tasks[n] for n in added] if i == last else []
        filename = output_name(filename)
        unchanged = header.raw and not extra and len(own) == len(header.tensors) and all(
            t.dtype == info.dtype and t.shape == info.shape for t, info in zip(own, header.tensors, strict=False)
        )
        if unchanged:
            # A merge changes no name, shape or dtype, so the base header bytes are the output header.
            shards.append(ShardPlan(filename, header.raw, tuple(own)))
        else:
            shards.append(_encoded_shard(filename, own + extra, dict(header.metadata)))
    return tuple(shards)


def _encoded_shard(filename: str, tasks: Sequence[TensorTask], metadata: Mapping[str, str]) -> ShardPlan:
    raw, infos = encode_header(((t.name, t.dtype, t.shape) for t in tasks), metadata or {"format": "pt"})
    by_name = {t.name: t for t in tasks}
    return ShardPlan(filename, raw, tuple(by_name[i.name] for i in infos))


def _reshard(ckpt: Checkpoint, tasks: Mapping[str, TensorTask], max_bytes: int) -> tuple[ShardPlan, ...]:
    """Greedy packing in base order, like transformers' ``split_torch_state_dict_into_shards``."""
    groups: list[list[TensorTask]] = [[]]
    size = 0
    for task in tasks.values():
        if groups[-1] and size + task.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(task)
        size += task.nbytes
    n = len(groups)
    meta = dict(ckpt.shards[0].metadata) if ckpt.shards else {}
    if n == 1:
        return (_encoded_shard("model.safetensors", groups[0], meta),)
    return tuple(_encoded_shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g, meta) for i, g in enumerate(groups))


# --------------------------------------------------------------------------------------------
# several adapters with weights; unmerge


@dataclass(frozen=True, slots=True)
class CombineOptions:
    """How several adapters become one merge (``--weights/--combination/--density/--seed/--heads-from``)."""

    weights: tuple[float, ...]  # one per adapter, in adapter order
    method: str = "cat"
    density: float = 1.0  # fraction of each task vector kept by the pruning operators
    seed: int = 0  # DARE's mask seed
    heads_from: int | None = None  # index of the adapter whose full tensors win where several carry one
    majority_sign: str = "total"  # TIES sign election (PEFT's default)


@dataclass
class _Single:
    """One adapter's accumulators while planning a combination (never escapes this module)."""

    targets: dict[str, _Target]
    added: dict[str, TensorRef]
    config_updates: dict[str, object]
    warnings: list[str]
    drop: set[str]


def _plan_single(index: int, adapter: Adapter, ckpt: Checkpoint, located: Mapping[str, tuple[int, TensorInfo]],
                 aliases: Mapping[str, str], problems: list[str]) -> _Single:
    one = _Single(defaultdict(_Target), {}, {}, [], set())
    _plan_adapter(index, adapter, ckpt, located, aliases, one.targets, one.added, one.config_updates, one.warnings,
                  one.drop, problems)
    return one


def _check_combination(adapters: Sequence[Adapter], combine: CombineOptions) -> None:
    if len(combine.weights) != len(adapters):
        raise PlanError(
            f"`weights` has {len(combine.weights)} value(s) for {len(adapters)} adapter(s); give one weight per "
            "adapter, in the same order (e.g. `weights` 0.7,0.3)"
        )
    if combine.method not in COMBINATIONS:
        raise PlanError(f"`combination` {combine.method!r} is not one of {', '.join(COMBINATIONS)}")
    if not all(math.isfinite(w) for w in combine.weights):
        raise PlanError(f"`weights` {combine.weights}: every weight must be a finite number")
    if combine.method != "cat" and not 0 < combine.density <= 1:
        raise PlanError(f"`density` {combine.density}: must be in (0, 1] (the fraction of each task vector kept)")
    if combine.heads_from is not None and not 0 <= combine.heads_from < len(adapters):
        raise PlanError(f"`heads_from` {combine.heads_from}: there are only {len(adapters)} adapters")
    tokens = [a for a in adapters if any(naming.parse_key(k).role == "token_delta" for k in a.weights.names())]
    if tokens and len(adapters) > 1:
        raise UnsupportedAdapterError(
            f"{tokens[0].root}: trainable tokens cannot be combined with other adapters: they replace embedding "
            "rows outright, so there is nothing to weigh; merge that adapter alone"
        )
    dora = [a for a in adapters if a.config.use_dora]
    if dora and len(adapters) > 1:
        raise UnsupportedAdapterError(
            f"{dora[0].root}: a DoRA adapter cannot be combined with other adapters: DoRA rescales each column "
            "to a magnitude learned for its own direction, so a weighted sum of DoRA updates is not any adapter's "
            "result (PEFT's add_weighted_adapter re-initialises the magnitude from the base); merge it alone"
        )


def _label(adapters: Sequence[Adapter], i: int) -> str:
    return f"#{i} {adapters[i].root.name or adapters[i].root}"


def _pick_full(name: str, holders: Sequence[tuple[int, TensorRef]], adapters: Sequence[Adapter],
               heads_from: int | None, problems: list[str]) -> TensorRef | None:
    """Heads are never blended: one adapter's full tensor, chosen by ``heads_from`` when several carry one."""
    if len(holders) <= 1:
        return holders[0][1] if holders else None
    for i, ref in holders:
        if i == heads_from:
            return ref
    who = ", ".join(_label(adapters, i) for i, _ in holders)
    if heads_from is None:
        problems.append(
            f"tensor {name!r} is a full tensor (modules_to_save, a saved head or a saved layer) in adapters {who}; "
            "heads are never blended: pass `heads_from` NAME (adapter directory name or index) to take it from one"
        )
    else:
        problems.append(
            f"`heads_from` {_label(adapters, heads_from)} does not carry tensor {name!r}; adapters {who} do"
        )
    return None


def build_combined_plan(ckpt: Checkpoint, adapters: Sequence[Adapter], combine: CombineOptions,
                        options: PlanOptions | None = None) -> Plan:
    """Plan a weighted combination of ``adapters`` merged into ``ckpt`` with one rounding per tensor.

    ``cat``: W ← rnd(W + Σᵢ wᵢ·ΔWᵢ) with ΔWᵢ = sᵢ·Bᵢ@Aᵢ (each adapter's own scale, rank, patterns and
    layout), summed in fp32: exact up to that one rounding. The other methods apply a task-vector
    operator to {ΔWᵢ} per tensor (``streammerge.combine``). Full tensors (saved heads) are never
    blended; DoRA adapters are never combined.

    Raises:
        PlanError: what ``build_plan`` raises, and full tensors carried by several adapters without
            ``heads_from``.
        UnsupportedAdapterError: DoRA in a combination, and whatever ``build_plan`` refuses.
    """
    options = options or PlanOptions()
    _check_combination(adapters, combine)
    located = ckpt.locate()
    aliases = naming.tied_aliases(frozenset(located), ckpt.config)
    problems: list[str] = []
    each = [_plan_single(i, a, ckpt, located, aliases, problems) for i, a in enumerate(adapters)]

    targets: dict[str, _Target] = {}
    for name in dict.fromkeys(n for one in each for n in one.targets):
        slots = [(i, one.targets[name]) for i, one in enumerate(each) if name in one.targets]
        holders = [(i, s.replacement) for i, s in slots if s.replacement is not None]
        target = _Target(replacement=_pick_full(name, holders, adapters, combine.heads_from, problems))
        step = _combined_step(name, slots, combine)
        if step is not None:
            target.steps.append(((0, ""), 0, step))
        targets[name] = target
    added: dict[str, TensorRef] = {}
    for name in dict.fromkeys(n for one in each for n in one.added):
        holders = [(i, one.added[name]) for i, one in enumerate(each) if name in one.added]
        ref = _pick_full(name, holders, adapters, combine.heads_from, problems)
        if ref is not None:
            added[name] = ref
    config_updates: dict[str, object] = {}
    order = sorted(range(len(each)), key=lambda i: i == combine.heads_from)  # the chosen heads' config last
    for i in order:
        config_updates |= each[i].config_updates
    warnings = [f"{_label(adapters, i)}: {w}" for i, one in enumerate(each) for w in one.warnings]
    warnings += _peft_difference_warnings(adapters, combine)
    drop = set().union(*(one.drop for one in each))
    return _assemble(ckpt, adapters, targets, added, config_updates, warnings, drop, problems, options)


def _combined_step(name: str, slots: Sequence[tuple[int, _Target]], combine: CombineOptions) -> Step | None:
    """All adapters' terms for one tensor in one Step: one rounding, each term tagged with its adapter."""
    cat = combine.method == "cat"
    terms = tuple(
        _retag(term, combine.weights[i] if cat else 1.0, i)
        for i, target in slots
        for _, _, step in sorted(target.steps, key=lambda s: s[0])
        for term in step.terms
    )
    if not terms:
        return None
    if cat:
        return Step(terms, "once")
    combination = Combination(combine.method, combine.weights, combine.density, combine.seed, name,
                              combine.majority_sign)
    return Step(terms, "once", combination)


def _retag(term: LoraTerm, weight: float, task: int) -> LoraTerm:
    return replace(term, weight=term.weight * weight, task=task)


def _peft_difference_warnings(adapters: Sequence[Adapter], combine: CombineOptions) -> list[str]:
    """Where PEFT's ``add_weighted_adapter`` computes something else (spec §4, §0.5(c))."""
    if combine.method == "cat" and adapters and adapters[0].config.use_rslora:
        ranks = sum(max([a.config.r, *(r for _, r in a.config.rank_pattern)]) for a in adapters)
        return [
            f"{adapters[0].root}: use_rslora=true: PEFT 0.21's add_weighted_adapter(combination_type='cat') would "
            f"scale the combined adapter by sqrt(r')={math.sqrt(ranks):.4g} too much (huggingface/peft#3761); "
            "streammerge applies each adapter's own alpha/sqrt(r), the intended result"
        ]
    return []


def _touched(adapter: Adapter, located: Mapping[str, object], aliases: Mapping[str, str]) -> list[str]:
    """Base tensors any key of ``adapter`` changes (for restoring them from an original base)."""
    out = []
    for key in adapter.weights.names():
        k = naming.parse_key(key)
        name = k.target if k.role == "tensor" else f"{k.module}.{'bias' if k.role == 'lora_B_bias' else 'weight'}"
        target = naming.resolve(name, located.keys(), aliases)
        if target is not None and target not in out:
            out.append(target)
    return out


def _no_inverse(adapter: Adapter) -> str | None:
    """Why merging ``adapter`` as a whole cannot be undone by subtraction, or None when it can."""
    roles = {naming.parse_key(k).role for k in adapter.weights.names()}
    if adapter.config.use_dora or "magnitude" in roles:
        return "DoRA rescales each column by a norm of the merged weight, so W cannot be solved back exactly"
    if "token_delta" in roles:
        return "trainable tokens replace embedding rows, and the old rows are not in the merged checkpoint"
    return None


def build_unmerge_plan(merged: Checkpoint, adapter: Adapter, weight: float = 1.0, base: Checkpoint | None = None,
                       options: PlanOptions | None = None) -> Plan:
    """Plan W ← rnd(M − w·ΔW) for every tensor ``adapter`` changed in the merged checkpoint ``merged``.

    One rounding of the fp32 difference per tensor (whatever the layer type), so every element of
    the result is within ½ ulp(M) + ½ ulp(W) of the original base value W (README, "Unmerge").
    Tensors with no exact inverse (full-tensor replacements such as saved heads and
    ``base_layer`` copies; every tensor of a DoRA or trainable-token adapter) are taken from
    ``base`` when it is given, and refused otherwise.

    Raises:
        UnsupportedAdapterError: a tensor with no inverse and no ``base``; an adapter that changed
            the model's layout (added or dropped tensors).
        PlanError: what ``build_plan`` raises; base tensors whose shape or dtype differ.
    """
    options = options or PlanOptions()
    if not math.isfinite(weight):
        raise PlanError(f"`weight` {weight}: must be a finite number")
    located = merged.locate()
    aliases = naming.tied_aliases(frozenset(located), merged.config)
    problems: list[str] = []
    reason = _no_inverse(adapter)
    if reason is not None:
        if base is None:
            raise UnsupportedAdapterError(
                f"{adapter.root}: cannot unmerge: {reason}; pass `base` ORIGINAL to take the tensors it changed "
                "from the original base checkpoint"
            )
        restore = {n: None for n in _touched(adapter, located, aliases)}
        targets = _restore_from(base, restore, located, problems)
        return _assemble(merged, [adapter], targets, {}, {}, [], set(), problems, options)

    one = _plan_single(0, adapter, merged, located, aliases, problems)
    if one.added or one.drop:
        raise UnsupportedAdapterError(
            f"{adapter.root}: cannot unmerge: this adapter changed the model's layout (added "
            f"{sorted(one.added) or 'nothing'}, dropped {sorted(one.drop) or 'nothing'}: a task head or an untied "
            "head); use the original base checkpoint instead"
        )
    full = [n for n, t in one.targets.items() if t.replacement is not None]
    if full and base is None:
        raise UnsupportedAdapterError(
            f"{adapter.root}: cannot unmerge {full[0]!r}"
            + (f" (and {len(full) - 1} more)" if len(full) > 1 else "")
            + ": the adapter replaced it with a full tensor (modules_to_save, a saved head or layer), so the original "
            "is not in the merged checkpoint; pass `base` ORIGINAL to take such tensors from the original base"
        )
    targets = _restore_from(base, dict.fromkeys(full), located, problems) if full else {}
    for name, t in one.targets.items():
        if name in targets:
            continue
        terms = tuple(_retag(term, -weight, 0) for _, _, step in sorted(t.steps, key=lambda s: s[0])
                      for term in step.terms)
        target = _Target()
        if terms:
            target.steps.append(((0, ""), 0, Step(terms, "once")))
        targets[name] = target
    return _assemble(merged, [adapter], targets, {}, {}, list(one.warnings), set(), problems, options)


def _restore_from(base: Checkpoint | None, names: Mapping[str, None], located: Mapping[str, tuple[int, TensorInfo]],
                  problems: list[str]) -> dict[str, _Target]:
    """Targets whose output is the original base tensor, unchanged."""
    assert base is not None
    originals = base.locate()
    out = {}
    for name in names:
        if name not in originals:
            problems.append(f"{base.root}: `base` has no tensor {name!r} to restore; is it the original base?")
            continue
        shard_no, info = originals[name]
        have = located[name][1]
        if (info.shape, info.dtype) != (have.shape, have.dtype):
            problems.append(
                f"{base.root}: tensor {name!r} is {info.dtype}{list(info.shape)} in `base` but "
                f"{have.dtype}{list(have.shape)} in the merged checkpoint; is it the original base?"
            )
            continue
        out[name] = _Target(replacement=_ref(base.shards[shard_no], info))
    return out
