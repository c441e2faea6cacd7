"""Synthetic checkpoints and adapters in the Hugging Face / PEFT on-disk layouts, plus a naive
in-memory reference merge. Used by the tests, the demo and the benchmarks; needs neither
transformers nor peft, and downloads nothing.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama_shapes(layers: int, hidden: int, intermediate: int, vocab: int, kv_heads_ratio: int = 2,
                 tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a ``LlamaForCausalLM`` checkpoint (as transformers saves it)."""
    kv = hidden // kv_heads_ratio
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (hidden, hidden),
            f"{p}.self_attn.k_proj.weight": (kv, hidden),
            f"{p}.self_attn.v_proj.weight": (kv, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, hidden),
            f"{p}.mlp.gate_proj.weight": (intermediate, hidden),
            f"{p}.mlp.up_proj.weight": (intermediate, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, intermediate),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not tied:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int, kv_heads_ratio: int = 2,
                 tied: bool = False, dtype: str = "bfloat16") -> dict:
    heads = max(1, hidden // 16)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // kv_heads_ratio), "head_dim": hidden // heads, "vocab_size": vocab,
        "tie_word_embeddings": tied, "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "dtype": dtype,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    }


def write_checkpoint(root: Path, tensors: Mapping[str, torch.Tensor], *, shards: int = 1,
                     config: Mapping[str, object] | None = None) -> Path:
    """Save ``tensors`` as an HF checkpoint with ``shards`` files (+ index when > 1) and config.json."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(dict(tensors), str(root / "model.safetensors"), metadata={"format": "pt"})
    else:
        per = math.ceil(len(names) / shards)
        weight_map, total = {}, 0
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i * per : (i + 1) * per]}
            save_file(part, str(root / fname), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(part, fname)
            total += sum(t.numel() * t.element_size() for t in part.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (root / "config.json").write_text(json.dumps(config, indent=2))
    return root


def make_checkpoint(root: Path, *, layers: int = 2, hidden: int = 64, intermediate: int = 128, vocab: int = 128,
                    dtype: torch.dtype = torch.bfloat16, shards: int = 1, tied: bool = False,
                    seed: int = 0) -> Path:
    """A small random Llama-shaped checkpoint with config, generation config and a tokenizer config."""
    gen = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(layers, hidden, intermediate, vocab, tied=tied)
    tensors = {n: (torch.randn(s, generator=gen) * 0.05).to(dtype) for n, s in shapes.items()}
    config = llama_config(layers, hidden, intermediate, vocab, tied=tied, dtype=str(dtype).removeprefix("torch."))
    write_checkpoint(root, tensors, shards=shards, config=config)
    (root / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (root / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256, "source": "base"}))
    return root


def base_shapes(base: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of every ``*.safetensors`` file under ``base`` (headers only)."""
    shapes = {}
    for f in sorted(base.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            shapes |= {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}  # noqa: SIM118
    return shapes


def make_adapter(root: Path, base: Path, *, targets: Sequence[str] = ("q_proj", "v_proj"), r: int = 8,
                 alpha: float = 16, seed: int = 1, zero_b: bool = False, dtype: torch.dtype = torch.float32,
                 config: Mapping[str, object] | None = None) -> Path:
    """A PEFT LoRA adapter for every 2-D ``*.<target>.weight`` of ``base``, with random (or zero) B."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in base_shapes(base).items():
        module = name.removesuffix(".weight")
        if not name.endswith(".weight") or len(shape) != 2 or module.rpartition(".")[2] not in targets:
            continue
        out_f, in_f = shape
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(r, in_f, generator=gen) / math.sqrt(in_f)).to(dtype)
        b = torch.zeros(out_f, r) if zero_b else torch.randn(out_f, r, generator=gen) * 0.5
        tensors[f"{key}.lora_B.weight"] = b.to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"), metadata={"format": "pt"})
    doc = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(targets),
           "base_model_name_or_path": str(base), "bias": "none", "task_type": "CAUSAL_LM"}
    doc |= dict(config or {})
    (root / "adapter_config.json").write_text(json.dumps(doc, indent=2))
    return root


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every ``*.safetensors`` file in ``path``."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= load_file(str(f))
    return out


def reference_merge(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The naive in-memory merge of a plain Linear LoRA: ``rnd(W + (B @ A) · α/r)`` per target."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    merged = load_dir(base)
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    for key in (k for k in lora if k.endswith(".lora_A.weight")):
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight") + ".weight"
        a, b = lora[key].float(), lora[key.replace("lora_A", "lora_B")].float()
        w = merged[name]
        merged[name] = (w.float() + (b @ a) * scale).to(w.dtype)
    return merged


def changed(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Iterable[str]:
    """Names whose tensors differ between two state dicts with the same keys."""
    return [n for n in a if not torch.equal(a[n], b[n])]
