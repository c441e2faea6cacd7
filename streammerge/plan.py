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
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from streammerge import experts, naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import INDEX_NAME, Checkpoint
from streammerge.errors import PlanError, UnsupportedAdapterError
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
    * ``expert``:    W (out_e, in) one expert's disk tensor; A (r·E, in), B (out, r·E) of a fused 3-D
      parameter (E, out, in); ΔW = rows ``expert.row0…`` of ΔP[e] (``kernel.expert_delta``)
    * ``expert_t``:  same, the parameter read as (E, in, out) (peft 0.17–0.19.0)
    """

    layout: str
    a: TensorRef | None
    b: TensorRef
    scale: float
    weight: float = 1.0  # the user's adapter weight (multi-adapter merges); 1.0 leaves PEFT's math untouched
    origin: str = ""  # adapter key stem, for messages
    expert: experts.ExpertSlice | None = None  # layouts expert / expert_t only


@dataclass(frozen=True, slots=True)
class Step:
    """Terms summed in fp32 and added with one rounding policy.

    ``once``:        W ← rnd(W + ΣΔ)        (PEFT Linear/Conv ``W.data += ΔW``)
    ``delta_first``: W ← rnd(W + rnd(ΣΔ))   (PEFT Embedding ``W.data += ΔW.to(W.dtype)``)
    """

    terms: tuple[LoraTerm, ...]
    rounding: str


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
    adapters: tuple[str, ...] = field(default=())

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
        return max(
            (block_bytes(t, max(r1 - r0 for r0, r1 in row_blocks(t.rows, ROW_ALIGN)))
             for t in self.tasks() if not t.is_raw_copy),
            default=0,
        )

    def summary(self) -> str:
        c = self.counts()
        gb = self.total_bytes / 1e9
        lines = [
            f"plan: {c['merge']} tensors to merge, {c['replace']} to replace, {c['add']} to add, "
            f"{c['copy']} to copy, {c['drop']} to drop",
            f"output: {len(self.shards)} shard(s), {gb:.3f} GB"
            + (f", index {INDEX_NAME}" if self.write_index else ""),
            f"minimum working memory: {self.min_memory() / 2**20:.1f} MiB",
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


def block_bytes(task: TensorTask, rows: int) -> int:
    """Working memory to merge ``rows`` rows of ``task`` (the budget's unit; see ``execute``).

    The block's output (out dtype) and its source rows (mapped pages, released after use), the
    fp32 scratch of one kernel chunk (ΔW, its sum with W, and a second term's delta: 3 × 4 bytes
    per element, with a short tail folded in: at most 2 × chunk rows), and the terms' fp32 factors.
    """
    row = task.row_numel
    block = rows * row * (DTYPE_SIZES[task.dtype] + DTYPE_SIZES[task.source.dtype])
    chunk = min(rows, 2 * chunk_rows(row)) * row * 12 if task.steps else 0
    factors = sum(
        4 * (math.prod(term.b.shape) + (math.prod(term.a.shape) if term.a else 0))
        for step in task.steps
        for term in step.terms
    )
    return block + chunk + factors


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
    for head, emb in aliases.items():
        if targets.get(emb) is not None and targets[emb].steps and config_updates.get("tie_word_embeddings", True):
            warnings.append(
                f"{emb!r} is tied to {head!r} (tie_word_embeddings): its LoRA delta changes the input embeddings "
                "and the output head together, exactly as PEFT's merge does"
            )
    if problems:
        more = f" (and {len(problems) - 1} more problem(s): {'; '.join(problems[1:4])})" if len(problems) > 1 else ""
        raise PlanError(problems[0] + more)

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
        adapters=tuple(str(a.root) for a in adapters),
    )


def _task(name: str, base: TensorRef, target: _Target | None) -> TensorTask:
    if target is None:
        return TensorTask(name, base.dtype, base.shape, base)
    source = target.replacement or base
    steps = tuple(step for _, _, step in sorted(target.steps, key=lambda s: (s[1], s[0])))
    kind = "merge" if steps else "replace"
    return TensorTask(name, base.dtype, base.shape, source, steps, kind)


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

    refused = [k for k in keys if k.role in ("magnitude", "token_delta", "other_lora")]
    if refused or cfg.use_dora:
        k = refused[0] if refused else None
        what = {"magnitude": "DoRA (lora_magnitude_vector)", "token_delta": "trainable tokens",
                "other_lora": "this LoRA variant"}.get(k.role if k else "magnitude")
        raise UnsupportedAdapterError(
            f"{where}: {what} is not supported yet" + (f" (tensor {k.key!r})" if k else " (use_dora=true)")
            + "; merge this adapter with PEFT's merge_and_unload for now"
        )

    for k in keys:
        if k.role == "tensor":
            _plan_replacement(index, adapter, k, infos[k.key], ckpt, located, aliases, targets, added,
                              config_updates, warnings, drop, problems)
        else:
            by_module[k.module][k.role] = k

    model_type = ckpt.config.get("model_type")
    if cfg.raw.get("target_parameters"):
        _plan_param_wrappers(index, adapter, by_module, infos, located, aliases, targets, problems)
    warnings.extend(experts.v4_warnings(where, cfg, model_type, by_module))
    for module, roles in sorted(by_module.items(), key=lambda kv: naming.module_order(kv[0])):
        order = naming.module_order(module)
        if "lora_A" in roles or "lora_B" in roles:
            _plan_linear(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems, order)
        if "emb_A" in roles or "emb_B" in roles:
            _plan_embedding(index, adapter, module, roles, infos, located, aliases, targets, problems, order)
        if "lora_B_bias" in roles:
            _plan_bias(index, adapter, module, roles["lora_B_bias"], infos, located, aliases, targets, problems, order)


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


def _plan_linear(index, adapter, module, roles, infos, located, aliases, model_type, targets, problems, order):
    pair = _pair(adapter, module, roles, "lora_A", "lora_B", problems)
    if pair is None:
        return
    a, b = infos[pair[0].key], infos[pair[1].key]
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise UnsupportedAdapterError(
            f"{adapter.weights.path}: {pair[0].key!r} has shape {a.shape}: LoRA on convolution layers is not "
            "supported yet; merge this adapter with PEFT for now"
        )
    target = _resolve_target(adapter, module, "weight", located, aliases, problems, "LoRA")
    if target is None:
        return
    r = a.shape[0]
    if b.shape[1] != r:
        problems.append(
            f"{adapter.weights.path}: {pair[0].key!r} has rank {r} but {pair[1].key!r} has shape {b.shape}; "
            "lora_A and lora_B disagree: the adapter file is corrupt"
        )
        return
    if not _check_rank(adapter, module, r, problems):
        return
    w = located[target][1]
    layout = "linear_t" if naming.is_conv1d(module, model_type) else "linear"
    want = (b.shape[0], a.shape[1]) if layout == "linear" else (a.shape[1], b.shape[0])
    if w.shape != want:
        problems.append(
            f"{adapter.weights.path}: LoRA for {module!r} makes a delta of shape {want} but base tensor {target!r} "
            f"has shape {w.shape}; the adapter was trained on a different base model"
        )
        return
    term = LoraTerm(layout, _ref(adapter.weights, a), _ref(adapter.weights, b), adapter.config.scale_for(module),
                    origin=module)
    _check_float(adapter, target, w, problems)
    targets[target].steps.append((order, index, Step((term,), "once")))


def _plan_embedding(index, adapter, module, roles, infos, located, aliases, targets, problems, order):
    pair = _pair(adapter, module, roles, "emb_A", "emb_B", problems)
    if pair is None:
        return
    a, b = infos[pair[0].key], infos[pair[1].key]
    target = _resolve_target(adapter, module, "weight", located, aliases, problems, "embedding LoRA")
    if target is None:
        return
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
    if w.shape != (a.shape[1], b.shape[0]):
        problems.append(
            f"{adapter.weights.path}: embedding LoRA for {module!r} makes a delta of shape {(a.shape[1], b.shape[0])} "
            f"but base tensor {target!r} has shape {w.shape}; the adapter was trained on a different base "
            "(or a resized vocabulary)"
        )
        return
    term = LoraTerm("embedding", _ref(adapter.weights, a), _ref(adapter.weights, b),
                    adapter.config.scale_for(module), origin=module)
    _check_float(adapter, target, w, problems)
    targets[target].steps.append((order, index, Step((term,), "delta_first")))


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
    if base.shape != info.shape:
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
        unchanged = not extra and len(own) == len(header.tensors) and all(
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
