"""Planning for the tuners beyond LoRA (``streammerge.tuners``): adapter keys in, ``tuner`` steps out.

Generic over the ``Tuner`` protocol: keys are grouped by module with the tuner's suffixes, each module's
base weight (and bias) is resolved on the checkpoint, and the tuner's ``plan`` decides from headers
what changes. Keys that are not the tuner's are handed back (full tensors: ``modules_to_save``,
``base_layer`` copies) for the planner's replacement path. Pure: no torch, no file I/O.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from streammerge import naming
from streammerge.adapter import Adapter
from streammerge.formats.dtypes import FLOAT_DTYPES
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.draft import AdapterInput, Draft, PlanContext
from streammerge.plan.heads import plan_replacement
from streammerge.plan.steps import Step
from streammerge.tuners import TUNERS
from streammerge.tuners.base import ModuleView, Shape, Tuner, TunerTerm, Update


@dataclass(frozen=True, slots=True)
class Planned:
    """One base tensor one module of a tuner adapter changes."""

    target: str  # base tensor name
    order: tuple[int, str]  # naming.module_order of the module
    module: str
    tensors: tuple[tuple[str, TensorInfo], ...]  # role -> adapter tensor
    update: Update


def split_keys(adapter: Adapter, tuner: Tuner) -> tuple[dict[str, dict[str, str]], dict[str, str], list[str]]:
    """(module -> role -> key, shared role -> key, keys that are not the tuner's)."""
    by_module: dict[str, dict[str, str]] = defaultdict(dict)
    shared: dict[str, str] = {}
    others: list[str] = []
    shared_keys = {k: r for r, k in tuner.shared.items()}
    for key in adapter.weights.names():
        if key in shared_keys:
            shared[shared_keys[key]] = key
            continue
        found = tuner.classify(key.removeprefix(naming.PEFT_PREFIX))
        if found is None:
            others.append(key)
        else:
            by_module[found[0]][found[1]] = key
    return by_module, shared, others


def plan_tuned(ctx: PlanContext, src: AdapterInput, draft: Draft) -> None:
    """A tuner adapter: its full tensors replace first (as PEFT's ``load_state_dict``), then one ``tuner`` step
    per changed base tensor, module by module in ``named_modules`` order."""
    tuner = TUNERS[src.adapter.config.peft_type]
    _, _, others = split_keys(src.adapter, tuner)
    for key in others:
        k = naming.parse_key(key)
        if k.role != "tensor":
            draft.problems.append(
                f"{src.where}: tensor {key!r} is not a {tuner.peft_type} tensor (adapter_config.json says "
                f"peft_type {tuner.peft_type}); the config and weights disagree"
            )
            continue
        plan_replacement(ctx, src, draft, k)
    for p in plan_modules(ctx, src, draft, tuner):
        term = TunerTerm(tuner.peft_type, tuple((r, src.ref(i)) for r, i in p.tensors), p.update, origin=p.module)
        draft.add_step(p.target, p.order, src.index, Step((term,), "tuner"))


def plan_modules(ctx: PlanContext, src: AdapterInput, draft: Draft, tuner: Tuner) -> list[Planned]:
    """Every module's updates, in ``named_modules`` order; problems go to ``draft``, none is raised."""
    by_module, shared, _ = split_keys(src.adapter, tuner)
    resolved = _resolve_modules(ctx, src, draft, tuner, by_module)
    extent = tuple((weight, conv1d) for _, weight, conv1d in resolved.values())  # VeRA sizes its projections on it
    out: list[Planned] = []
    for module, (target, weight, conv1d) in resolved.items():
        roles = {**shared, **by_module[module]}
        view = _view(ctx, src, draft, tuner, module, roles, weight, conv1d, extent)
        updates = tuner.plan(view)
        draft.problems.extend(view.problems)
        for update in updates:
            dest = target if update.param == "weight" else ctx.resolve(f"{module}.bias")
            assert dest is not None, "a tuner changes a bias only when the view has one"
            out.append(Planned(dest, naming.module_order(module), module,
                               tuple((r, src.infos[k]) for r, k in roles.items()), update))
    return out


def _resolve_modules(ctx: PlanContext, src: AdapterInput, draft: Draft, tuner: Tuner,
                     by_module: dict[str, dict[str, str]]) -> dict[str, tuple[str, Shape, bool]]:
    """module -> (base weight tensor, its shape as merged, HF Conv1D?) for every targeted module found."""
    cfg = src.adapter.config
    resolved: dict[str, tuple[str, Shape, bool]] = {}
    for module in sorted(by_module, key=naming.module_order):
        key = next(iter(by_module[module].values()))
        if cfg.targets_module(module) is False:
            draft.problems.append(
                f"{src.where}: adapter tensor {key!r} is for module {module!r}, which adapter_config.json does not "
                f"target (target_modules={cfg.target_modules!r}); PEFT would silently ignore it: add the module to "
                "target_modules or remove its tensors"
            )
            continue
        name = f"{module}.weight"
        target = ctx.resolve(name)
        if target is None:
            draft.problems.append(
                f"{src.where}: {tuner.peft_type} tensor {key!r} for module {module!r} targets {name!r}, which is not "
                f"in the base checkpoint{naming.suggest(name, ctx.located.keys())}; is this adapter for a different "
                "base?"
            )
            continue
        w = ctx.info(target)
        if w.dtype not in FLOAT_DTYPES:
            draft.problems.append(
                f"{src.where}: base tensor {target!r} is {w.dtype}, not a float dtype; a {tuner.peft_type} update "
                "cannot be merged into it (quantized base?): use the full-precision base"
            )
            continue
        resolved[module] = (target, Shape(draft.shape_of(target, w), w.dtype),
                            naming.is_conv1d(module, ctx.model_type))
    return resolved


def _view(ctx: PlanContext, src: AdapterInput, draft: Draft, tuner: Tuner, module: str, roles: dict[str, str],
          weight: Shape, conv1d: bool, extent: tuple[tuple[Shape, bool], ...]) -> ModuleView:
    """What the tuner's ``plan`` sees of ``module``: headers, the config, r and α/r where the tuner has them."""
    cfg = src.adapter.config
    bias_name = ctx.resolve(f"{module}.bias")
    bias = None
    if bias_name is not None:
        info = ctx.info(bias_name)
        bias = Shape(draft.shape_of(bias_name, info), info.dtype)
    rank, scale = None, None
    if tuner.alpha_field is not None or tuner.ranked:
        rank, alpha = cfg.r_alpha_for(module)  # PEFT's get_pattern_key over rank_pattern / alpha_pattern
        scale = alpha / rank if tuner.alpha_field is not None else None  # LycorisLayer: alpha / r
    return ModuleView(
        where=src.where, module=module, keys=roles,
        tensors={r: Shape(src.infos[k].shape, src.infos[k].dtype) for r, k in roles.items()},
        weight=weight, bias=bias, config=cfg.raw, conv1d=conv1d, rank=rank, scale=scale, extent=extent,
    )
