"""The planner's working values: what every planning function reads, and what one pass accumulates.

:class:`PlanContext` (frozen) is the base checkpoint as the planner sees it; :class:`AdapterInput`
(frozen) is one adapter being planned; :class:`Draft` (mutable) collects targets, new tensors, config
changes, warnings and problems while planning and never escapes the planner: ``assemble`` turns it into
a frozen :class:`~streammerge.plan.types.Plan`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from streammerge import naming
from streammerge.adapter import Adapter
from streammerge.checkpoint import Checkpoint
from streammerge.formats.refs import TensorRef, tensor_ref
from streammerge.formats.safetensors import TensorInfo
from streammerge.plan.quantized import logical_slots
from streammerge.plan.steps import Step


@dataclass(frozen=True)
class PlanContext:
    """The base checkpoint: its tensors by name (shard number, header entry) and tied-weight aliases."""

    ckpt: Checkpoint
    located: Mapping[str, tuple[int, TensorInfo]]
    aliases: naming.Aliases  # tied names, and the model's own rules read lazily (naming.Aliases)

    @classmethod
    def of(cls, ckpt: Checkpoint) -> PlanContext:
        located = ckpt.locate()
        if ckpt.quant is not None:  # quantized weights stored under other names or shapes: their logical slot
            located.update(logical_slots(ckpt.quant, ckpt.config, located))
        return cls(ckpt, located, naming.tied_aliases(frozenset(located), ckpt.config))

    @property
    def model_type(self) -> object:
        return self.ckpt.config.get("model_type")

    def info(self, name: str) -> TensorInfo:
        return self.located[name][1]

    def ref(self, name: str) -> TensorRef:
        shard_no, info = self.located[name]
        return tensor_ref(self.ckpt.shards[shard_no], info)

    def resolve(self, name: str) -> str | None:
        """The disk tensor an in-memory parameter name stands for, or None."""
        return naming.resolve(name, self.located.keys(), self.aliases)


@dataclass(frozen=True)
class AdapterInput:
    """One adapter being planned: its position in the merge and its weight file's entries by name."""

    index: int
    adapter: Adapter
    infos: Mapping[str, TensorInfo]

    @classmethod
    def of(cls, index: int, adapter: Adapter) -> AdapterInput:
        return cls(index, adapter, adapter.weights.by_name())

    @property
    def where(self) -> str:
        return str(self.adapter.weights.path)

    def ref(self, info: TensorInfo) -> TensorRef:
        return tensor_ref(self.adapter.weights, info)


Order = tuple[int, str]  # naming.module_order of the module a step or replacement comes from


@dataclass
class Target:
    """What one base tensor becomes: an optional full replacement, then steps applied in module order."""

    replacement: TensorRef | None = None
    replacement_order: Order = (-1, "")
    steps: list[tuple[Order, int, Step]] = field(default_factory=list)


@dataclass
class Draft:
    """Everything one planning pass accumulates."""

    targets: dict[str, Target] = field(default_factory=lambda: defaultdict(Target))
    added: dict[str, TensorRef] = field(default_factory=dict)
    config_updates: dict[str, object] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    drop: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)

    def add_step(self, target: str, order: Order, index: int, step: Step) -> None:
        self.targets[target].steps.append((order, index, step))

    def shape_of(self, target: str, base: TensorInfo) -> tuple[int, ...]:
        """The shape a delta applies to: the adapter's replacement (a resized vocabulary) or the base's."""
        slot = self.targets.get(target)
        return slot.replacement.shape if slot is not None and slot.replacement is not None else base.shape
