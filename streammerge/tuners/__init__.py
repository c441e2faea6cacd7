"""PEFT tuners: how each adapter type's keys become planned steps on base tensors.

``lora`` (LoRA, DoRA, ``lora_bias``, Conv and Embedding LoRA), ``experts`` (``target_parameters`` on fused MoE
experts), ``tokens`` (trainable tokens): planned by ``streammerge.plan`` itself. Every other tuner is one file
speaking the ``base.Tuner`` protocol, registered in ``TUNERS`` below.

Adding a tuner: write ``streammerge/tuners/<name>.py`` ending in ``TUNER = Tuner(...)`` (see ``base.py``), and add
it to ``TUNERS``. Nothing else names a tuner: the planner (``plan.tuned``), the kernel (step ``"tuner"``), the
executor, verify, resume and unmerge all go through the protocol.
"""

from __future__ import annotations

from streammerge.tuners import boft, c3a, delora, fourierft, hra, ia3, loha, lokr, miss, oft, road, shira, vera
from streammerge.tuners.base import Tuner

TUNERS: dict[str, Tuner] = {
    t.peft_type: t
    for t in (loha.TUNER, lokr.TUNER, ia3.TUNER, vera.TUNER, oft.TUNER, boft.TUNER, fourierft.TUNER, hra.TUNER,
              miss.TUNER, c3a.TUNER, road.TUNER, shira.TUNER, delora.TUNER)
}

_PROMPT = ("is a prompt-learning method: it adds virtual tokens or attention prefixes at inference and changes no "
           "weight, so there is nothing to merge (PEFT has no merge_and_unload for it either)")
#: PEFT types that PEFT itself cannot merge into the base weights, with the reason.
UNMERGEABLE: dict[str, str] = {
    "PROMPT_TUNING": _PROMPT,
    "MULTITASK_PROMPT_TUNING": _PROMPT,
    "P_TUNING": _PROMPT,
    "PREFIX_TUNING": _PROMPT,
    "CPT": _PROMPT,
    "CARTRIDGE": _PROMPT,
    "ADAPTION_PROMPT": "adds gated adaption prompts to attention at inference; PEFT cannot merge it either",
    "POLY": "routes each input to a mix of LoRA modules at inference; PEFT cannot merge it either",
    "XLORA": "mixes LoRA experts per token at inference; PEFT cannot merge it either",
}


def supported() -> str:
    return ", ".join(["LORA", *TUNERS])
