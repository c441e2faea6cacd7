"""Every tuner streammerge merges besides LoRA, by ``peft_type``; and the ones it refuses, with the reason.

Adding a tuner: one file ``streammerge/tuners/<name>.py`` ending in ``TUNER = Tuner(...)`` (see
``base.py``), and one entry in ``TUNERS`` below.
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
