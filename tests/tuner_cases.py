"""PEFT-parity cases for the tuners beyond LoRA: tiny bases, adapters, and PEFT's merged output.

``build(tuner, family, root)`` writes, under ``root/<tuner>-<family>``:

    base/     a tiny bf16 checkpoint (HF ``save_pretrained``; the conv family: one safetensors file)
    adapter/  ``get_peft_model(base, <Tuner>Config(...)).save_pretrained`` after seeded noise on every
              trainable parameter (so no tuner is at its identity init)
    ref/      ``PeftModel.from_pretrained(fresh base, adapter).merge_and_unload()`` saved (HF families)

and returns a :class:`TunerCase` with PEFT's merged tensors and its logits on a fixed input.
Families: ``llama`` (every linear layer; ``llama_emb``: and the input embedding),
``qwen2`` (linear layers with q/k/v biases), ``gpt2`` (HF
``Conv1D``), ``conv`` (a custom ``nn.Module`` with ``Conv2d`` layers; PEFT supports it for these tuners).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import oracle
import peft
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2 = ["c_attn", "c_proj", "c_fc"]
CONV = ["c2", "p2", "fc"]


class ConvNet(nn.Module):
    """Two Conv2d layers (3x3 and 1x1) and a Linear head; ``forward`` gives the 'logits'."""

    def __init__(self) -> None:
        super().__init__()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.p2 = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.p2(torch.relu(self.c2(x)))
        return self.fc(h.mean(dim=(2, 3)))


#: tuner -> family -> config kwargs (target_modules added per family)
CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "loha": {"llama": {"r": 4, "alpha": 8}, "conv": {"r": 4, "alpha": 8}},
    "lokr": {"llama": {"r": 4, "alpha": 8}, "conv": {"r": 4, "alpha": 8}},
    "ia3": {"llama": {"feedforward_modules": ["down_proj"]}, "gpt2": {"feedforward_modules": ["c_fc"]}},
    "vera": {"llama": {"r": 4}, "gpt2": {"r": 4}},
    "oft": {"llama": {"r": 0, "oft_block_size": 8}, "conv": {"r": 0, "oft_block_size": 8},
            "llama_emb": {"r": 0, "oft_block_size": 8}},
    "boft": {"llama": {"boft_block_size": 8}, "conv": {"boft_block_size": 8}},
    "fourierft": {"llama": {"n_frequency": 50}, "gpt2": {"n_frequency": 50}},
    "hra": {"llama": {"r": 4}, "conv": {"r": 4}},
    "miss": {"llama": {"r": 4}, "qwen2": {"r": 4, "init_weights": "bat"}},
    "c3a": {"llama": {"block_size": 16}, "qwen2": {"block_size": 16}},
    "road": {"llama": {"variant": "road_1", "group_size": 8}, "qwen2": {"variant": "road_2", "group_size": 8}},
    "shira": {"llama": {"r": 2}, "qwen2": {"r": 2}},
    "delora": {"llama": {"r": 4}, "qwen2": {"r": 4}},
}
_CLASSES = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig, "ia3": peft.IA3Config, "vera": peft.VeraConfig,
            "oft": peft.OFTConfig, "boft": peft.BOFTConfig, "fourierft": peft.FourierFTConfig, "hra": peft.HRAConfig,
            "miss": peft.MissConfig, "c3a": peft.C3AConfig, "road": peft.RoadConfig, "shira": peft.ShiraConfig,
            "delora": peft.DeloraConfig}
#: init kwarg that makes each tuner start away from identity (noise is added on top)
_INIT = {"ia3": {"init_ia3_weights": False}, "miss": {}}
_FAMILIES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "llama": (oracle.llama(), LINEAR),
    "llama_emb": (oracle.llama(), [*LINEAR, "embed_tokens"]),  # OFT also rotates embeddings
    "qwen2": (oracle.qwen2, LINEAR),
    "gpt2": (oracle.gpt2, GPT2),
    "conv": (ConvNet, CONV),
}


@dataclass(frozen=True)
class TunerCase:
    name: str
    base_dir: Path
    adapter_dir: Path
    ref: dict[str, torch.Tensor]  # PEFT's merged state dict (HF families: as save_pretrained wrote it)
    inputs: torch.Tensor
    ref_logits: torch.Tensor
    base_logits: torch.Tensor
    family: str


def config(tuner: str, family: str, **extra: Any) -> peft.PeftConfig:
    kw = {"target_modules": _FAMILIES[family][1], **_INIT.get(tuner, {"init_weights": False}),
          **CONFIGS[tuner][family], **extra}
    return _CLASSES[tuner](**kw)


def perturb(pm: nn.Module, seed: int) -> None:
    """Seeded noise on every trainable (adapter) parameter: 'training'."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def _conv_input() -> torch.Tensor:
    return torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(oracle.SEED + 1)).to(torch.bfloat16)


@torch.no_grad()
def forward(model: nn.Module, family: str, inputs: torch.Tensor) -> torch.Tensor:
    if family == "conv":
        model.eval()
        return model(inputs).detach().clone()
    return oracle.logits(model, inputs)


def load_base(family: str, base_dir: Path) -> nn.Module:
    if family == "conv":
        net = ConvNet().to(torch.bfloat16)
        net.load_state_dict(load_file(base_dir / "model.safetensors"))
        return net
    return oracle.load_merged(AutoModelForCausalLM, base_dir)


def load_output(family: str, out_dir: Path) -> nn.Module:
    """Our merged checkpoint as a model (transformers for HF families)."""
    return load_base(family, out_dir)


def build(tuner: str, family: str, root: Path, **extra: Any) -> TunerCase:
    name = f"{tuner}-{family}" + "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
    case_root = Path(root) / name
    base_dir, adapter_dir, ref_dir = case_root / "base", case_root / "adapter", case_root / "ref"
    make, _ = _FAMILIES[family]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(oracle.SEED)
        model = make().to(torch.bfloat16)
        if family == "conv":
            base_dir.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, base_dir / "model.safetensors",
                      metadata={"format": "pt"})
        else:
            model.save_pretrained(base_dir)
        torch.manual_seed(oracle.SEED + 2)
        pm = get_peft_model(model, config(tuner, family, **extra))
        perturb(pm, oracle.SEED + 5)
        pm.save_pretrained(adapter_dir)
        del pm, model

        inputs = _conv_input() if family == "conv" else oracle._fixed_input(oracle.VOCAB)
        fresh = load_base(family, base_dir)
        base_logits = forward(fresh, family, inputs)
        merged = PeftModel.from_pretrained(fresh, adapter_dir).merge_and_unload()
        ref_logits = forward(merged, family, inputs)
        if family == "conv":
            ref = {k: v.clone() for k, v in merged.state_dict().items()}
        else:
            merged.save_pretrained(ref_dir)
            ref = oracle.load_checkpoint(ref_dir)
    return TunerCase(name, base_dir, adapter_dir, ref, inputs, ref_logits, base_logits, family)


def cases() -> list[tuple[str, str]]:
    return [(t, f) for t, fams in CONFIGS.items() for f in fams]
