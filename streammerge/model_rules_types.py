"""``ModelRules``, one model's naming facts (tied tensors, v5 renames, tie order, transposed experts, fp32
modules), and the index templates the fallback table stores them as (``model.layers.*.mlp``): ``template``
and the maps that put a name's indices back. Pure values; where the facts come from is ``model_rules``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")  # a numeric path component: layers.<3>.mlp, experts.<7>


@dataclass(frozen=True)
class ModelRules:
    """Tied tensors and v5 renames of one model, in-memory names throughout but ``renames``' values."""

    source: str  # "transformers 5.24.0 (LlamaForCausalLM)" or "table (transformers 5.24.0)"
    tied: Mapping[str, str] = field(default_factory=dict)  # in-memory target -> in-memory source (tie flag on)
    renames: Mapping[str, str] = field(default_factory=dict)  # in-memory name -> disk name (one-to-one only)
    #: modules owning a tied tensor, in ``named_modules`` order: the order PEFT's merge_and_unload visits (and so
    #: sums into the one stored tensor) the LoRAs on two faces of a tie.
    order: tuple[str, ...] = ()
    #: fused MoE ``experts`` modules declared ``is_transposed`` (parameters (E, in, out), e.g. GPT-OSS): PEFT's
    #: ParamWrapper keeps their in/out, so ΔP[e] = (B_e A_e)ᵀ; other experts are (E, out, in).
    transposed: tuple[str, ...] = ()
    #: ``_keep_in_fp32_modules_strict`` / ``_keep_in_fp32_modules`` globs: transformers loads the matching tensors
    #: of a bf16 or fp16 (strict) / fp16 (plain) model in fp32, so PEFT merges and saves them in fp32.
    keep_fp32: tuple[str, ...] = ()
    keep_fp32_fp16: tuple[str, ...] = ()

    def rank(self, module: str) -> int | None:
        """Position of ``module`` (or of its index template) in ``order``; None when it owns no tie."""
        for key in (module, template(module)):
            if key in self.order:
                return self.order.index(key)
        return None

    def kept_in_fp32(self, name: str, dtype: str) -> bool:
        """Whether transformers holds ``name`` in fp32 when the checkpoint stores it as ``dtype`` (its glob rule)."""
        globs = self.keep_fp32 + (self.keep_fp32_fp16 if dtype == "F16" else ())
        return dtype in ("BF16", "F16") and any(re.search(g.replace("*", ".*"), name) for g in globs)

    def is_transposed(self, module: str) -> bool | None:
        """Whether the fused experts ``module`` store (E, in, out); None when these rules know no model."""
        if self.source == EMPTY_SOURCE:
            return None
        return module in self.transposed or template(module) in self.transposed

    def disk_name(self, name: str) -> str:
        """The name ``name`` (in memory) has in a checkpoint transformers saves: tie, then rename."""
        source = self.tied.get(name, name)
        return self.renames.get(source, source)


EMPTY_SOURCE = "no known model"
EMPTY = ModelRules(EMPTY_SOURCE)


def template(name: str) -> str:
    """``model.layers.3.mlp.experts.7.w1`` -> ``model.layers.*.mlp.experts.*.w1``."""
    return _INDEX.sub("*", name)


class TemplateRules(ModelRules):
    """ModelRules over index templates: ``tied``/``renames`` are looked up through ``template``."""

    def __init__(self, source: str, tied: Mapping[str, str], renames: Mapping[str, str],
                 order: tuple[str, ...], transposed: tuple[str, ...], keep_fp32: tuple[str, ...],
                 keep_fp32_fp16: tuple[str, ...]) -> None:
        super().__init__(source, TemplateMap(tied), TemplateMap(renames), order, transposed, keep_fp32,
                         keep_fp32_fp16)


class TemplateMap(Mapping[str, str]):
    """A name -> name map stored as templates: indices of the key are put back, in order, into the value."""

    def __init__(self, templates: Mapping[str, str]) -> None:
        self._t = dict(templates)

    def __getitem__(self, name: str) -> str:
        value = self._t[template(name)]
        indices = _INDEX.findall(name)
        if value.count("*") != len(indices):
            raise KeyError(name)
        it = iter(indices)
        return re.sub(r"(?<=\.)\*(?=\.|$)", lambda _: next(it), value)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and template(name) in self._t

    def __iter__(self):  # the templates themselves: a table has no layer count
        return iter(self._t)

    def __len__(self) -> int:
        return len(self._t)

