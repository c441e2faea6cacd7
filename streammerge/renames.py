"""transformers v5 in-memory tensor names → the names a checkpoint keeps on disk. Pure; no transformers import.

transformers v5 renames (and fuses) checkpoint tensors when it loads a model, and reverts the renames when it
saves (``save_pretrained(save_original_format=True)``), so the checkpoint on disk keeps the original names
while a PEFT adapter trained on a v5 model names the *in-memory* modules (spec §0 item 4, §2.4 step 4, §6.4).
This table holds the one-to-one renames that matter for merging, each read from transformers 5.23
``conversion_mapping.py _build_checkpoint_conversion_mapping`` (entry named in ``family``), written in the
direction we need: in-memory name → disk name. Fused MoE experts (one in-memory tensor ← many disk tensors)
are not renames; ``streammerge.experts`` de-fuses them.

``disk_candidates`` applies the rewrites one at a time and then in pairs (a Llava wrapping a Mixtral, a legacy
``LayerNorm`` under a renamed prefix); ``naming.resolve`` takes the first candidate found on disk (also through
a tied alias or a ``base_model_prefix`` change), and the planner fails loudly, naming the tensor, when none is.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rename:
    """One rewrite: ``re.sub(memory, disk, name, count=1)`` turns an in-memory name into a disk name."""

    family: str  # the transformers conversion entry it comes from
    memory: str  # regex matched against the in-memory name
    disk: str  # replacement


RENAMES: tuple[Rename, ...] = (
    # "llava" (also aria, paligemma, mistral3, gemma3, internvl, …: _MODEL_TO_CONVERSION_PATTERN): transformers ≥ 4.52
    # moved the sub-models under ``model.``; the checkpoint keeps ``language_model.model.*`` etc.
    Rename("llava", r"^lm_head\.", "language_model.lm_head."),
    Rename("llava", r"^model\.language_model\.", "language_model.model."),
    Rename("llava", r"^model\.vision_tower\.", "vision_tower."),
    Rename("llava", r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    # "CLIPVisionModel" PrefixChange(prefix_to_remove="vision_model"), scoped to the vision tower: hub Llava
    # checkpoints keep ``vision_tower.vision_model.*`` (a checkpoint saved by transformers 5.23 drops it).
    Rename("CLIPVisionModel", r"^model\.vision_tower\.", "vision_tower.vision_model."),
    # "mixtral" WeightRenaming(".block_sparse_moe.", ".mlp."): the router (the experts are de-fused elsewhere).
    Rename("mixtral", r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
    # "legacy" (applied to every model): BERT-era LayerNorm parameter names.
    Rename("legacy", r"LayerNorm\.weight$", "LayerNorm.gamma"),
    Rename("legacy", r"LayerNorm\.bias$", "LayerNorm.beta"),
)


def disk_candidates(name: str, renames: tuple[Rename, ...] = RENAMES) -> tuple[str, ...]:
    """Every disk spelling of the in-memory ``name`` the table allows: single rewrites first, then pairs."""
    out: list[str] = []
    for count in (1, 2):
        for combo in itertools.permutations(renames, count):
            cand = name
            for rule in combo:
                new = re.sub(rule.memory, rule.disk, cand, count=1)
                if new == cand:
                    break
                cand = new
            else:
                if cand != name and cand not in out:
                    out.append(cand)
    return tuple(out)

