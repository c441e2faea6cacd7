"""LoRA on MoE experts: PEFT ``target_parameters`` planning and de-fusion onto the disk tensors. Pure.

Two adapter formats reach us (spec §3.6, §6.4–6.6):

* **v5-native** ``target_parameters`` (PEFT ≥ 0.17 ``ParamWrapper``): LoRA on the fused 3-D in-memory tensors
  ``….mlp.experts.gate_up_proj`` (E, 2I, H) and ``….mlp.experts.down_proj`` (E, H, I), or on a 2-D parameter such
  as the router ``….mlp.gate.weight``. Several parameters of one module nest their wrappers, so the key does not
  name the parameter: ``experts.base_layer.lora_A.weight`` belongs to the FIRST targeted parameter in the module's
  registration order (``gate_up_proj``), ``experts.lora_A.weight`` to the next (``down_proj``); shapes are checked.
  The checkpoint on disk keeps the original per-expert tensors, so each expert's slice of ΔP is de-fused onto
  them: rows ``[:I]`` of ΔP[e] for ``gate_up_proj`` go to ``w1``/``gate_proj``, rows ``[I:]`` to ``w3``/``up_proj``,
  and ``down_proj`` to ``w2``/``down_proj``. PEFT applies ``P + rnd(ΔP)`` (two roundings, ``delta_first``).
* **v4-format** per-expert adapters (keys on ``…experts.3.w1``): these are plain Linear LoRAs on the disk names, so
  ``plan`` merges them per expert with PEFT's Linear semantics (one rounding), which is what the PEFT of the
  transformers-4 era that trained them computed. PEFT 0.21 with transformers 5 merges them differently (two
  roundings; ×√2 with rsLoRA; nothing at all for ``qwen2_moe``): ``experts_v4.v4_warnings`` says how and why.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from streammerge import naming
from streammerge.adapter_config import AdapterConfig
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.draft import AdapterInput, Draft, PlanContext
from streammerge.plan.steps import ExpertSlice, LoraTerm, Step
from streammerge.plan.targeting import check_float

#: Fused expert parameters of transformers v5 MoE ``experts`` modules, in registration order
#: (``MixtralExperts``, ``Qwen2MoeExperts`` and the other "qwen2_moe"-pattern models declare gate_up_proj first).
FUSED_PARAMS = ("gate_up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class DiskExperts:
    """How one family stores experts on disk: ``<layer>.<block>.experts.<e>.<gate|up|down>.weight``."""

    family: str  # transformers conversion_mapping entry
    block: str  # disk parent of ``experts`` (in memory it is always ``mlp``)
    gate: str  # rows [:I] of gate_up_proj
    up: str  # rows [I:] of gate_up_proj
    down: str  # down_proj


DISK_EXPERTS: tuple[DiskExperts, ...] = (
    DiskExperts("mixtral", "block_sparse_moe", "w1", "w3", "w2"),
    DiskExperts("qwen2_moe", "mlp", "gate_proj", "up_proj", "down_proj"),
)

#: ``peft_version`` from which 3-D parameters stored (E, out, in) are read that way (spec §6.6).
SWAPPED_FROM = (0, 19, 1)


@dataclass(frozen=True, slots=True)
class WrappedParam:
    """One ``ParamWrapper``'s LoRA pair: the parameter ``module.param`` and its two adapter keys."""

    module: str  # e.g. "model.layers.0.mlp.experts" (``base_layer`` infixes removed)
    param: str  # e.g. "gate_up_proj"
    a_key: str
    b_key: str

    @property
    def path(self) -> str:
        return f"{self.module}.{self.param}"


@dataclass(frozen=True, slots=True)
class ParamDelta:
    """What one wrapped parameter adds to one disk tensor.

    ``layout``: ``linear`` (2-D parameter, ΔW = B @ A · s), ``expert`` (P (E, out, in), peft ≥ 0.19.1) or
    ``expert_t`` (P read as (E, in, out): peft 0.17–0.19.0) onto one per-expert disk tensor; ``fused`` /
    ``fused_t`` onto a 3-D disk tensor stored as P itself (E, out, in) / (E, in, out) (GPT-OSS).
    """

    target: str
    layout: str
    a: TensorInfo
    b: TensorInfo
    scale: float
    origin: str
    expert: ExpertSlice | None


def targeted_params(module: str, target_parameters: Iterable[str]) -> list[str]:
    """Parameters of ``module`` that ``target_parameters`` targets, in registration order when known.

    PEFT ``BaseTuner._inject_parameters`` matches ``f"{module}.{param}" == t or .endswith("." + t)`` (no regex)
    over the parameters the module *has*. Without the model: the fused expert parameters belong to a module named
    ``experts`` (PEFT 0.21 adds bare ``down_proj``/``gate_up_proj`` entries for DeepSeek-V3, which must not
    make ``lm_head.down_proj`` of a plain ``lm_head`` LoRA).
    """
    found: list[str] = []
    for t in target_parameters:
        param = t.rpartition(".")[2]
        full = f"{module}.{param}"
        if param in FUSED_PARAMS and module.rpartition(".")[2] != "experts":
            continue
        if (full == t or full.endswith("." + t)) and param not in found:
            found.append(param)
    return sorted(found, key=lambda p: FUSED_PARAMS.index(p) if p in FUSED_PARAMS else len(FUSED_PARAMS))


def take_param_wrappers(
    where: str,
    by_module: dict[str, dict[str, naming.AdapterKey]],
    target_parameters: Iterable[str],
    problems: list[str],
) -> list[WrappedParam]:
    """Remove the ``ParamWrapper`` modules from ``by_module`` and name the parameter each LoRA pair adapts.

    With n targeted parameters on one module, PEFT nests n wrappers: the key with k ``base_layer.`` infixes is the
    wrapper of parameter n-1-k in registration order (the innermost wraps the first one registered).
    """
    targets = tuple(target_parameters)
    out: list[WrappedParam] = []
    for key_module in sorted(by_module):
        roles = by_module[key_module]
        if "lora_A" not in roles and "lora_B" not in roles:
            continue
        module, depth = key_module, 0
        while module.endswith(".base_layer"):
            module, depth = module.removesuffix(".base_layer"), depth + 1
        params = targeted_params(module, targets)
        if not params:
            continue
        del by_module[key_module]
        unknown = [p for p in params if p not in FUSED_PARAMS]
        if depth >= len(params) or (len(params) > 1 and unknown):
            problems.append(
                f"{where}: cannot tell which of the parameters {params} of module {module!r} the nested LoRA pair "
                f"{key_module!r} adapts (target_parameters {list(targets)}); merge this adapter with PEFT"
            )
            continue
        if "lora_A" not in roles or "lora_B" not in roles:
            have = roles.get("lora_A") or roles["lora_B"]
            problems.append(f"{where}: {have.key!r} has no matching lora_A/lora_B partner; re-save the adapter")
            continue
        out.append(WrappedParam(module, params[len(params) - 1 - depth], roles["lora_A"].key, roles["lora_B"].key))
    return out


def plan_wrapped(
    where: str,
    cfg: AdapterConfig,
    wp: WrappedParam,
    infos: Mapping[str, TensorInfo],
    located: Mapping[str, tuple[int, TensorInfo]],
    aliases: Mapping[str, str],
    problems: list[str],
) -> list[ParamDelta]:
    """The per-disk-tensor deltas of one wrapped parameter (empty, with ``problems`` filled, when it does not fit)."""
    a, b = infos[wp.a_key], infos[wp.b_key]
    scale = cfg.scale_for(wp.path)  # r and α patterns match the parameter path (spec §1.1)
    rank = cfg.rank_for(wp.path)
    direct = naming.resolve(f"{wp.path}", located.keys(), aliases)
    if direct is not None and len(located[direct][1].shape) == 3:
        return _plan_fused_on_disk(where, cfg, wp, a, b, rank, scale, direct, located[direct][1], aliases, problems)
    if direct is not None:
        return _plan_2d(where, wp, a, b, rank, scale, direct, located[direct][1], problems)
    disk = find_disk_experts(wp, located.keys(), aliases)
    if disk is None:
        problems.append(
            f"{where}: target_parameters LoRA {wp.a_key!r} adapts {wp.path!r}, which is neither in the base "
            f"checkpoint nor a fused expert tensor whose per-expert tensors are there"
            f"{naming.suggest(wp.path, located.keys(), aliases)}; is this adapter for a different base model?"
        )
        return []
    layout, names = disk
    return _plan_fused(where, cfg, wp, a, b, rank, scale, layout, names, located, problems)


def _plan_fused_on_disk(where, cfg, wp, a, b, rank, scale, target, w, aliases, problems) -> list[ParamDelta]:
    """A 3-D parameter the checkpoint stores fused as it is in memory (GPT-OSS ``experts.gate_up_proj`` (E, H, 2I),
    ``down_proj`` (E, I, H)): PEFT's ΔP whole, then ``P + rnd(ΔP)``.

    PEFT reads P as (E, out, in) unless the experts module is ``is_transposed`` (then (E, in, out)); the factors'
    shapes tell which, and for a square parameter the model's rules do (``ModelRules.is_transposed``).
    """
    n, d1, d2 = w.shape
    re_ = rank * n
    swapped = a.shape == (re_, d2) and b.shape == (d1, re_)  # P[e] is (out = d1, in = d2)
    transposed = a.shape == (re_, d1) and b.shape == (d2, re_)  # P[e] is (in = d1, out = d2)
    if swapped and transposed:
        known = aliases.rules.is_transposed(wp.module) if isinstance(aliases, naming.Aliases) else None
        if known is None:
            problems.append(
                f"{where}: {wp.path!r} is stored fused on disk as {target!r} {w.shape}, square per expert; without "
                "the model's rules (transformers, or the table) streammerge cannot tell whether PEFT reads it as "
                "(E, in, out) or (E, out, in): install transformers, or merge this adapter with PEFT"
            )
            return []
        swapped = not known
    elif not (swapped or transposed):
        problems.append(
            f"{where}: target_parameters LoRA for {wp.path!r} has A {a.shape} and B {b.shape}; for the fused tensor "
            f"{target!r} {w.shape} with r={rank} PEFT saves A {(re_, d2)} and B {(d1, re_)} (experts (E, out, in)) "
            f"or A {(re_, d1)} and B {(d2, re_)} (experts (E, in, out)); check r / rank_pattern and the base model"
        )
        return []
    layout = "fused" if swapped else "fused_t"
    return [ParamDelta(target, layout, a, b, scale, wp.path, ExpertSlice(0, n, 0))]


def _plan_2d(where, wp, a, b, rank, scale, target, w, problems) -> list[ParamDelta]:
    """A 2-D parameter (a router ``gate.weight``): PEFT's ``Linear.get_delta_weight``, then ``P + rnd(ΔW)``."""
    if len(w.shape) != 2:
        problems.append(
            f"{where}: {wp.path!r} is stored on disk as {target!r} with shape {w.shape}; LoRA on 3-D tensors that "
            "the checkpoint itself stores fused is not supported yet: merge this adapter with PEFT"
        )
        return []
    if a.shape != (rank, w.shape[1]) or b.shape != (w.shape[0], rank):
        problems.append(
            f"{where}: target_parameters LoRA for {wp.path!r} has A {a.shape} and B {b.shape}, but base tensor "
            f"{target!r} {w.shape} with r={rank} needs A {(rank, w.shape[1])} and B {(w.shape[0], rank)}"
        )
        return []
    return [ParamDelta(target, "linear", a, b, scale, wp.path, None)]


def find_disk_experts(
    wp: WrappedParam, names: Collection[str], aliases: Mapping[str, str]
) -> tuple[DiskExperts, tuple[dict[str, str], ...]] | None:
    """The per-expert disk tensors of a fused ``….mlp.experts.{gate_up_proj|down_proj}``: family and, per expert,
    ``{"gate"|"up"|"down": disk name}``; None when the checkpoint has none."""
    if wp.param not in FUSED_PARAMS or not wp.module.endswith(".mlp.experts"):
        return None
    layer = wp.module.removesuffix(".mlp.experts")
    for family in DISK_EXPERTS:
        experts: list[dict[str, str]] = []
        while True:
            stem = f"{layer}.{family.block}.experts.{len(experts)}."
            found = {role: naming.resolve(stem + getattr(family, role) + ".weight", names, aliases)
                     for role in ("gate", "up", "down")}
            if any(v is None for v in found.values()):
                break
            experts.append(found)  # type: ignore[arg-type]
        if experts:
            return family, tuple(experts)
    return None


def _version(text: object) -> tuple[int, ...]:
    """``peft_version`` as a tuple of ints; missing (before 0.18) counts as 0.17 (spec §6.6)."""
    if not isinstance(text, str):
        return (0, 17, 0)
    return tuple(int(p) for p in re.findall(r"\d+", text.split("+")[0].split(".dev")[0])[:3])


def _plan_fused(where, cfg, wp, a, b, rank, scale, family, experts, located, problems) -> list[ParamDelta]:
    n = len(experts)
    gate, down = located[experts[0]["gate"]][1], located[experts[0]["down"]][1]
    inter, hidden = gate.shape
    # The in-memory 3-D parameter P (E, d1, d2): transformers v5 stores experts (E, out, in).
    d1, d2 = (2 * inter, hidden) if wp.param == "gate_up_proj" else (hidden, inter)
    want = {role: (inter, hidden) if role != "down" else (hidden, inter) for role in ("gate", "up", "down")}
    bad = [f"{name!r} {located[name][1].shape}" for ex in experts for role, name in ex.items()
           if located[name][1].shape != want[role]]
    if bad or down.shape != (hidden, inter):
        problems.append(f"{where}: the {n} experts of {wp.module!r} ({family.family} layout) disagree in shape: "
                        f"{', '.join(bad[:3])}; is the base checkpoint complete?")
        return []
    re_ = rank * n
    swapped = a.shape == (re_, d2) and b.shape == (d1, re_)  # peft ≥ 0.19.1: in = d2, out = d1
    transposed = a.shape == (re_, d1) and b.shape == (d2, re_)  # peft 0.17 – 0.19.0: in = d1, out = d2
    if swapped and transposed:  # square parameter: only the PEFT version tells the layouts apart
        swapped = _version(cfg.raw.get("peft_version")) >= SWAPPED_FROM
    elif not (swapped or transposed):
        problems.append(
            f"{where}: target_parameters LoRA for {wp.path!r} has A {a.shape} and B {b.shape}; for {n} experts of "
            f"shape {(d1, d2)} with r={rank} PEFT saves A {(re_, d2)} and B {(d1, re_)} "
            f"(or A {(re_, d1)} and B {(d2, re_)} before peft 0.19.1); check r / rank_pattern and the base model"
        )
        return []
    layout = "expert" if swapped else "expert_t"
    rows = (("gate", 0), ("up", inter)) if wp.param == "gate_up_proj" else (("down", 0),)
    return [ParamDelta(ex[role], layout, a, b, scale, f"{wp.path}[{e}]", ExpertSlice(e, n, row0))
            for e, ex in enumerate(experts) for role, row0 in rows]


def plan_param_wrappers(ctx: PlanContext, src: AdapterInput, draft: Draft, by_module: dict) -> None:
    """PEFT ``target_parameters`` (``ParamWrapper``): ``P + rnd(ΔP)``, fused experts de-fused per disk tensor."""
    cfg = src.adapter.config
    for wp in take_param_wrappers(src.where, by_module, cfg.raw["target_parameters"], draft.problems):
        for d in plan_wrapped(src.where, cfg, wp, src.infos, ctx.located, ctx.aliases, draft.problems):
            term = LoraTerm(d.layout, src.ref(d.a), src.ref(d.b), d.scale, origin=d.origin, expert=d.expert)
            check_float(ctx, src, draft, d.target, ctx.info(d.target))
            draft.add_step(d.target, naming.module_order(wp.module), src.index, Step((term,), "delta_first"))
