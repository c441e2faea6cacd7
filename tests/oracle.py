"""PEFT-parity oracle: tiny base checkpoints, LoRA adapters, and PEFT's own merged output.

Plain functions, no pytest. Every case is built from a config with fixed seeds (no hub access):

    base_dir     tiny HF checkpoint, bf16, written by ``save_pretrained`` (optionally sharded)
    adapter_dir  ``get_peft_model(..., LoraConfig(init_lora_weights=False)).save_pretrained``
                 (B is non-zero, so every targeted tensor really changes), sometimes post-edited
    ref_dir      ``PeftModel.from_pretrained(Auto*.from_pretrained(base_dir), adapter_dir)
                 .merge_and_unload().save_pretrained(ref_dir)`` -- the correctness oracle

``build_case(name, root)`` builds one case under ``root / name``; ``CASES`` lists the names.
Run this file directly to build every case and print oracle sanity facts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
SEED = 1234
VOCAB = 128
NUM_LABELS = 3
# Shard limit that splits the ~150 KB tiny Llama into several files (transformers accepts ints and "20KB").
MULTI_SHARD_SIZE = "40KB"
ATTN = "eager"  # one attention kernel everywhere, so logits comparisons are like for like

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()


# ----------------------------------------------------------------------------------------------------------
# Case description


@dataclass(frozen=True)
class Case:
    """One built parity case (all paths exist)."""

    name: str
    base_dir: Path
    adapter_dir: Path
    ref_dir: Path
    auto_class: type  # transformers Auto class that loads both the reference and our output
    input_ids: torch.Tensor  # fixed (2, 8) input for logits comparisons
    ref_logits: torch.Tensor  # logits of PEFT's merged model, in memory, before save
    base_logits: torch.Tensor  # logits of the unmerged base (same auto class), to prove the adapter matters
    expect_config: dict[str, Any]  # facts the merged config.json must have (checked on ref and ours)
    must_have: frozenset[str]  # tensor names the merged checkpoint must contain
    must_not_have: frozenset[str]  # tensor names it must not contain
    must_change: frozenset[str]  # tensors that must differ from the base (proves the adapter is non-trivial)
    adapter_name: str | None = None  # sub-adapter of adapter_dir to merge (multi-adapter directories)


@dataclass(frozen=True)
class _Spec:
    make_base: Callable[[], PreTrainedModel]  # fp32 model from a config, seeded; cast to bf16 by the builder
    lora: dict[str, Any]  # LoraConfig kwargs (init_lora_weights=False is added)
    auto_class: type = AutoModelForCausalLM
    base_load_kwargs: dict[str, Any] = field(default_factory=dict)  # for loading the *base* with auto_class
    max_shard_size: str | int | None = None  # None: transformers default (a single file for tiny models)
    min_shards: int = 1
    peft_base: Callable[[Path], PreTrainedModel] | None = None  # model to wrap; default: the in-memory base
    train: Callable[[PeftModel], None] | None = None  # simulate training on the PeftModel before saving
    edit_adapter: Callable[[Path], None] | None = None  # rewrite adapter files after saving
    expect_config: dict[str, Any] = field(default_factory=dict)
    must_have: tuple[str, ...] = ()
    must_not_have: tuple[str, ...] = ()
    must_change: tuple[str, ...] = ()
    save_kwargs: dict[str, Any] = field(default_factory=dict)  # PeftModel.save_pretrained kwargs
    prepare_ref: Callable[[PreTrainedModel], None] | None = None  # applied to the reference base before PEFT
    second_lora: dict[str, Any] | None = None  # add_adapter("second", ...): the case merges that one


# ----------------------------------------------------------------------------------------------------------
# Tiny models


def _llama_config(**overrides: Any) -> LlamaConfig:
    kw: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    kw.update(overrides)
    return LlamaConfig(**kw)


def _randomize_biases(model: torch.nn.Module, scale: float = 0.1) -> None:
    """Llama/Qwen2 init biases to zero; make them non-zero so bias arithmetic is observable."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * scale)


def llama(**overrides: Any) -> Callable[[], PreTrainedModel]:
    def make() -> PreTrainedModel:
        model = LlamaForCausalLM(_llama_config(**overrides))
        _randomize_biases(model)
        return model

    return make


def qwen2() -> PreTrainedModel:
    cfg = Qwen2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    model = Qwen2ForCausalLM(cfg)
    _randomize_biases(model)  # q/k/v biases
    return model


def gpt2() -> PreTrainedModel:
    # GPT-2 ties wte/lm_head by default; LoRA here only touches Conv1D layers.
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg)


# ----------------------------------------------------------------------------------------------------------
# Adapter post-processing ("training" and file edits)


def _perturb(pm: PeftModel, predicate: Callable[[str], bool], scale: float = 0.05) -> None:
    """Add seeded noise to the PeftModel parameters whose name matches (simulates training)."""
    gen = torch.Generator().manual_seed(SEED + 7)
    hit = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if predicate(name):
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * scale
                p.add_(noise.to(p.dtype))
                hit += 1
    if not hit:
        raise RuntimeError("perturb matched no parameter")


def perturb_biases(pm: PeftModel) -> None:
    # base-layer / untargeted biases saved by bias="all" (not lora_B.bias: init_lora_weights=False fills it)
    _perturb(pm, lambda n: n.endswith(".bias") and ".lora_" not in n)


def perturb_modules_to_save(pm: PeftModel) -> None:
    _perturb(pm, lambda n: ".modules_to_save.default." in n)


def _rewrite_config(adapter_dir: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps(edit(cfg), indent=2))  # no sort_keys: order is ours


# alpha_pattern whose FILE order differs from sorted order: for model.layers.0.self_attn.q_proj the first
# match in file order is "self_attn.q_proj" (alpha 24), but in sorted order it is "layers.0.self_attn.q_proj"
# (alpha 40). PEFT iterates the dict in file order on load (spec §1.1).
ALPHA_PATTERN_FILE_ORDER = {"self_attn.q_proj": 24, "layers.0.self_attn.q_proj": 40, "v_proj": 12}


def alpha_pattern_in_order(order: list[str]) -> Callable[[Path], None]:
    def edit(adapter_dir: Path) -> None:
        def reorder(cfg: dict[str, Any]) -> dict[str, Any]:
            saved = cfg["alpha_pattern"]
            assert list(saved) == sorted(saved), "PEFT is expected to save key-sorted patterns"
            cfg["alpha_pattern"] = {k: saved[k] for k in order}
            return cfg

        _rewrite_config(adapter_dir, reorder)

    return edit


def fan_in_fan_out_false(adapter_dir: Path) -> None:
    """PEFT saves fan_in_fan_out=True for GPT-2 (it forced it); write back the user's False."""

    def edit(cfg: dict[str, Any]) -> dict[str, Any]:
        cfg["fan_in_fan_out"] = False
        return cfg

    _rewrite_config(adapter_dir, edit)


def override_embed_base_layer(adapter_dir: Path) -> None:
    """Make the adapter's saved embedding copy differ from the checkpoint (trained on another revision)."""
    path = adapter_dir / "adapter_model.safetensors"
    sd = load_file(path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    gen = torch.Generator().manual_seed(SEED + 11)
    sd[key] = (sd[key].float() + torch.randn(sd[key].shape, generator=gen) * 0.05).to(sd[key].dtype)
    save_file(sd, path, metadata={"format": "pt"})


def seq_cls_base(base_dir: Path) -> PreTrainedModel:
    torch.manual_seed(SEED + 3)  # score head is freshly initialised; the adapter saves it (modules_to_save)
    return AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=NUM_LABELS, dtype="auto", attn_implementation=ATTN
    )


# ----------------------------------------------------------------------------------------------------------
# The case table

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
L0 = "model.layers.0."
EMB = "model.embed_tokens.weight"

_SPECS: dict[str, _Spec] = {
    # a / k: plain Llama, every linear projection, single-file base
    "llama_all_linear": _Spec(
        make_base=llama(),
        lora={"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR},
        expect_config={"tie_word_embeddings": False},
        must_change=tuple(L0 + m for m in ("self_attn.q_proj.weight", "mlp.down_proj.weight")),
    ),
    # j: same, multi-shard base with an index
    "llama_all_linear_sharded": _Spec(
        make_base=llama(),
        lora={"r": 16, "lora_alpha": 32, "target_modules": ALL_LINEAR},
        max_shard_size=MULTI_SHARD_SIZE,
        min_shards=3,
        must_change=tuple(L0 + m for m in ("self_attn.q_proj.weight", "mlp.down_proj.weight")),
    ),
    # b: Qwen2 (q/k/v have biases, untouched by plain LoRA)
    "qwen2_qkvo": _Spec(
        make_base=qwen2,
        lora={"r": 8, "lora_alpha": 16, "target_modules": QKVO},
        must_change=(L0 + "self_attn.k_proj.weight", L0 + "self_attn.o_proj.weight"),
    ),
    # c: GPT-2 Conv1D (square attn.c_proj), config fan_in_fan_out=False on disk
    "gpt2_conv1d": _Spec(
        make_base=gpt2,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"]},
        edit_adapter=fan_in_fan_out_false,
        expect_config={"tie_word_embeddings": True},
        must_not_have=("lm_head.weight",),
        must_change=(
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.1.mlp.c_fc.weight",
            "transformer.h.1.mlp.c_proj.weight",
        ),
    ),
    # d: rsLoRA + rank_pattern + overlapping alpha_pattern keys in a non-sorted file order
    "llama_rslora_patterns": _Spec(
        make_base=llama(),
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": QKVO,
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": dict(ALPHA_PATTERN_FILE_ORDER),
        },
        edit_adapter=alpha_pattern_in_order(list(ALPHA_PATTERN_FILE_ORDER)),
        must_change=(L0 + "self_attn.q_proj.weight", L0 + "self_attn.v_proj.weight"),
    ),
    # d': identical weights, but the file keeps PEFT's sorted order -> layer 0 q_proj gets alpha 40
    "llama_rslora_patterns_sorted": _Spec(
        make_base=llama(),
        lora={
            "r": 8,
            "lora_alpha": 16,
            "use_rslora": True,
            "target_modules": QKVO,
            "rank_pattern": {"v_proj": 4},
            "alpha_pattern": dict(ALPHA_PATTERN_FILE_ORDER),
        },
        edit_adapter=alpha_pattern_in_order(sorted(ALPHA_PATTERN_FILE_ORDER)),
        must_change=(L0 + "self_attn.q_proj.weight", L0 + "self_attn.v_proj.weight"),
    ),
    # e: embedding LoRA (untied) + lm_head LoRA; adapter carries *.base_layer.weight copies
    "llama_embed_lora": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "lm_head", "q_proj"]},
        expect_config={"tie_word_embeddings": False},
        must_have=("lm_head.weight", EMB),
        must_change=(EMB, "lm_head.weight", L0 + "self_attn.q_proj.weight"),
    ),
    # e': the adapter's embed_tokens.base_layer.weight differs from the checkpoint: PEFT uses the adapter copy
    "llama_embed_base_layer_override": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "q_proj"]},
        edit_adapter=override_embed_base_layer,
        must_change=(EMB,),
    ),
    # f1: lora_bias=True on a Llama with attention biases: b += s * lora_B.bias
    "llama_lora_bias": _Spec(
        make_base=llama(attention_bias=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": QKVO, "lora_bias": True},
        must_change=(
            L0 + "self_attn.q_proj.bias",
            L0 + "self_attn.o_proj.bias",
            L0 + "self_attn.q_proj.weight",
        ),
    ),
    # f2: bias="all": saved (trained) biases replace the base biases, targeted or not
    "llama_bias_all": _Spec(
        make_base=llama(attention_bias=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "all"},
        train=perturb_biases,
        must_change=(
            L0 + "self_attn.q_proj.bias",
            L0 + "self_attn.k_proj.bias",
            L0 + "self_attn.o_proj.bias",
        ),
    ),
    # f3: both: replace the bias from the adapter, then add s * lora_B.bias
    "llama_bias_all_lora_bias": _Spec(
        make_base=llama(attention_bias=True),
        lora={
            "r": 8,
            "lora_alpha": 16,
            "target_modules": ["q_proj", "v_proj"],
            "bias": "all",
            "lora_bias": True,
        },
        train=perturb_biases,
        must_change=(
            L0 + "self_attn.q_proj.bias",
            L0 + "self_attn.k_proj.bias",
            L0 + "self_attn.v_proj.bias",
        ),
    ),
    # g: tied Llama, LoRA on lm_head (+ q_proj): the shared embedding changes, no lm_head.weight, still tied
    "llama_tied_lm_head_lora": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["lm_head", "q_proj"]},
        expect_config={"tie_word_embeddings": True},
        must_have=(EMB,),
        must_not_have=("lm_head.weight",),
        must_change=(EMB, L0 + "self_attn.q_proj.weight"),
    ),
    # g': tied Llama, LoRA on both embed_tokens and lm_head: both deltas land in the one tensor
    "llama_tied_embed_and_lm_head_lora": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["embed_tokens", "lm_head", "q_proj"]},
        expect_config={"tie_word_embeddings": True},
        must_have=(EMB,),
        must_not_have=("lm_head.weight",),
        must_change=(EMB,),
    ),
    # h: tied Llama + modules_to_save=["lm_head"]: unties, lm_head.weight appears, flag false
    "llama_tied_mts_lm_head": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
        train=perturb_modules_to_save,
        expect_config={"tie_word_embeddings": False},
        must_have=("lm_head.weight", EMB),
        must_change=(L0 + "self_attn.q_proj.weight",),
    ),
    # h': tied Llama + modules_to_save=["embed_tokens"]: new embedding, lm_head = old embedding
    "llama_tied_mts_embed": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"]},
        train=perturb_modules_to_save,
        expect_config={"tie_word_embeddings": False},
        must_have=("lm_head.weight", EMB),
        must_change=(EMB,),
    ),
    # i: SEQ_CLS adapter on a CausalLM checkpoint: score.weight from the adapter, no lm_head
    "llama_seq_cls": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "task_type": "SEQ_CLS"},
        auto_class=AutoModelForSequenceClassification,
        base_load_kwargs={"num_labels": NUM_LABELS},
        peft_base=seq_cls_base,
        train=perturb_modules_to_save,
        expect_config={"architectures": ["LlamaForSequenceClassification"], "num_labels": NUM_LABELS},
        must_have=("score.weight",),
        must_not_have=("lm_head.weight",),
        must_change=(L0 + "self_attn.q_proj.weight",),
    ),
}

# Sharded variants of the cases that add or drop a tensor: the index must follow.
for _name in ("llama_tied_mts_lm_head", "llama_seq_cls"):
    _SPECS[_name + "_sharded"] = replace(_SPECS[_name], max_shard_size=MULTI_SHARD_SIZE, min_shards=3)

CASES: tuple[str, ...] = tuple(_SPECS)


# ----------------------------------------------------------------------------------------------------------
# Issue 3 cases (tests/test_parity_adapters.py): DoRA, trainable tokens, resized vocab, hybrid, multi-adapter


def perturb_named(*fragments: str) -> Callable[[PeftModel], None]:
    """'Train' the parameters whose name holds any fragment (DoRA magnitudes, token deltas)."""

    def train(pm: PeftModel) -> None:
        _perturb(pm, lambda n: any(f in n for f in fragments), scale=0.2)

    return train


RESIZED_VOCAB = VOCAB + 6


def resize_vocab(model: PreTrainedModel) -> None:
    torch.manual_seed(SEED + 5)
    model.resize_token_embeddings(RESIZED_VOCAB, mean_resizing=False)


def resized_base(base_dir: Path) -> PreTrainedModel:
    model = load_merged(AutoModelForCausalLM, base_dir)
    resize_vocab(model)
    return model


def add_resized_head(adapter_dir: Path) -> None:
    """PEFT saved only the targeted embedding; a trainer that resized the vocabulary also saves the
    full (trained) lm_head, as ``save_embedding_layers="auto"`` does for an untargeted resized head."""
    path = adapter_dir / "adapter_model.safetensors"
    sd = load_file(path)
    head = resized_base(adapter_dir.parent / "base").lm_head.weight.detach().float()
    gen = torch.Generator().manual_seed(SEED + 17)
    sd["base_model.model.lm_head.weight"] = head + torch.randn(head.shape, generator=gen) * 0.05
    save_file(sd, path, metadata={"format": "pt"})


def add_full_tensors(adapter_dir: Path) -> None:
    """A hybrid adapter: trained full tensors saved beside the LoRA pairs (fp32 and bf16)."""
    path = adapter_dir / "adapter_model.safetensors"
    sd = load_file(path)
    gen = torch.Generator().manual_seed(SEED + 13)
    full = {
        "model.layers.0.self_attn.q_proj.base_layer.weight": ((64, 64), torch.float32),  # targeted: LoRA on top
        "model.norm.weight": ((64,), torch.float32),
        "model.layers.1.mlp.down_proj.weight": ((64, 128), torch.bfloat16),
    }
    for name, (shape, dtype) in full.items():
        sd["base_model.model." + name] = (torch.randn(shape, generator=gen) * 0.05 + (1 if "norm" in name else 0)).to(
            dtype
        )
    save_file(sd, path, metadata={"format": "pt"})


def to_bin_adapter(adapter_dir: Path) -> None:
    """An old-style pickled adapter: adapter_model.bin only."""
    path = adapter_dir / "adapter_model.safetensors"
    torch.save(load_file(path), adapter_dir / "adapter_model.bin")
    path.unlink()


TOKENS = [3, 5, 70, 127]
ADAPTER_SPECS: dict[str, _Spec] = {
    "llama_dora": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_dora": True},
        train=perturb_named("lora_magnitude_vector"),
        must_change=(EMB, L0 + "self_attn.q_proj.weight", L0 + "self_attn.v_proj.weight"),
    ),
    "llama_dora_tied_lm_head": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["lm_head", "q_proj"], "use_dora": True},
        train=perturb_named("lora_magnitude_vector"),
        expect_config={"tie_word_embeddings": True},
        must_not_have=("lm_head.weight",),
        must_change=(EMB, L0 + "self_attn.q_proj.weight"),
    ),
    "gpt2_dora_conv1d": _Spec(
        make_base=gpt2,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj", "c_fc"], "use_dora": True},
        train=perturb_named("lora_magnitude_vector"),
        expect_config={"tie_word_embeddings": True},
        must_change=("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"),
    ),
    "llama_tokens_list": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "trainable_token_indices": TOKENS},
        train=perturb_named("trainable_tokens_delta"),
        must_change=(EMB,),
    ),
    "llama_tokens_list_tied": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "trainable_token_indices": TOKENS},
        train=perturb_named("trainable_tokens_delta"),
        expect_config={"tie_word_embeddings": True},
        must_not_have=("lm_head.weight",),
        must_change=(EMB,),
    ),
    "llama_tokens_dict_tied": _Spec(
        make_base=llama(tie_word_embeddings=True),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
              "trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [9, 100]}},
        train=perturb_named("trainable_tokens_delta"),
        expect_config={"tie_word_embeddings": True},
        must_not_have=("lm_head.weight",),
        must_change=(EMB,),
    ),
    "llama_tokens_dict_untied": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"],
              "trainable_token_indices": {"embed_tokens": [3, 5], "lm_head": [9, 100]}},
        train=perturb_named("trainable_tokens_delta"),
        must_change=(EMB, "lm_head.weight"),
    ),
    "llama_resized_vocab": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "embed_tokens"]},
        peft_base=resized_base,
        save_kwargs={"save_embedding_layers": True},
        edit_adapter=add_resized_head,
        prepare_ref=resize_vocab,
        expect_config={"vocab_size": RESIZED_VOCAB},
        must_have=("lm_head.weight", EMB),
        must_change=(L0 + "self_attn.q_proj.weight",),
    ),
    "llama_hybrid_full_tensors": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        edit_adapter=add_full_tensors,
        must_change=(L0 + "self_attn.q_proj.weight", "model.norm.weight", "model.layers.1.mlp.down_proj.weight"),
    ),
    "llama_multi_adapter_dir": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]},
        second_lora={"r": 4, "lora_alpha": 8, "target_modules": ["v_proj", "o_proj"]},
        must_change=(L0 + "self_attn.v_proj.weight", L0 + "self_attn.o_proj.weight"),
    ),
    "llama_bin_adapter": _Spec(
        make_base=llama(),
        lora={"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "embed_tokens"]},
        edit_adapter=to_bin_adapter,
        must_change=(L0 + "self_attn.q_proj.weight", EMB),
    ),
}
ADAPTER_CASES: tuple[str, ...] = tuple(ADAPTER_SPECS)
# Cases whose merged model is reloaded and compared on logits.
LOGITS_CASES: tuple[str, ...] = (
    "llama_all_linear",
    "llama_all_linear_sharded",
    "qwen2_qkvo",
    "gpt2_conv1d",
    "llama_embed_lora",
    "llama_tied_lm_head_lora",
    "llama_tied_mts_lm_head",
    "llama_tied_mts_embed",
    "llama_seq_cls",
    "llama_seq_cls_sharded",
)


# ----------------------------------------------------------------------------------------------------------
# MoE experts and transformers v5 names (issue 3: tests/test_parity_moe.py, tests/test_names.py)
#
# Kept apart from CASES: test_parity_peft.py expects bit-exact PEFT parity for every tensor of every case in
# CASES, which these cases deliberately break where PEFT 0.21 is wrong (v4-format experts). They are built by
# the same ``build_case`` / ``cached_case``.

MOE_EXPERTS = 4
MOE_INTER = 48  # 2·I = 96 != H = 64: the fused gate_up_proj is not square, so its LoRA layout is unambiguous
MOE_HIDDEN = 64
LLAVA_VOCAB = 130  # image_token_index 129 lies outside the ids _fixed_input draws (3..127)


def mixtral(**overrides: Any) -> Callable[[], PreTrainedModel]:
    def make() -> PreTrainedModel:
        from transformers import MixtralConfig, MixtralForCausalLM

        kw: dict[str, Any] = {
            "hidden_size": MOE_HIDDEN, "intermediate_size": MOE_INTER, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": MOE_EXPERTS,
            "num_experts_per_tok": 2, "vocab_size": VOCAB, "max_position_embeddings": 64,
            "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
        }
        kw.update(overrides)
        return MixtralForCausalLM(MixtralConfig(**kw))

    return make


def qwen2_moe() -> PreTrainedModel:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(
        hidden_size=MOE_HIDDEN, intermediate_size=128, moe_intermediate_size=MOE_INTER,
        shared_expert_intermediate_size=64, num_experts=MOE_EXPERTS, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )
    model = Qwen2MoeForCausalLM(cfg)
    _randomize_biases(model)
    return model


def llava() -> PreTrainedModel:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=32)
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=vision, text_config=_llama_config(vocab_size=LLAVA_VOCAB, num_hidden_layers=1),
        image_token_index=LLAVA_VOCAB - 1, projector_hidden_act="gelu", tie_word_embeddings=False,
    ))


#: Per-expert module names of a transformers-4 (v4-format) expert adapter, by disk layout.
V4_EXPERT_MODULES = {"mixtral": ("block_sparse_moe", ("w1", "w2", "w3")),
                     "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj"))}


def add_v4_expert_lora(family: str, targets: tuple[str, ...], router: bool = False) -> Callable[[Path], None]:
    """Turn a PEFT-saved adapter into a transformers-4-era one: add fp32 LoRA pairs on every expert's
    ``targets`` (their disk names, as v4 PEFT saved them) and optionally the router, and list them in
    ``target_modules``. The r, α and rsLoRA of the saved config apply."""

    def edit(adapter_dir: Path) -> None:
        base_cfg = json.loads((adapter_dir.parent / "base" / "config.json").read_text())
        ad_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        block, _ = V4_EXPERT_MODULES[family]
        r, hidden = ad_cfg["r"], base_cfg["hidden_size"]
        inter = base_cfg.get("moe_intermediate_size") or base_cfg["intermediate_size"]
        n = base_cfg.get("num_local_experts") or base_cfg["num_experts"]
        path = adapter_dir / "adapter_model.safetensors"
        sd = load_file(path)
        gen = torch.Generator().manual_seed(SEED + 21)
        shapes = {"w2": (hidden, inter), "down_proj": (hidden, inter)}
        for layer in range(base_cfg["num_hidden_layers"]):
            stem = f"base_model.model.model.layers.{layer}.{block}"
            modules = [(f"{stem}.experts.{e}.{t}", shapes.get(t, (inter, hidden))) for e in range(n) for t in targets]
            if router:
                modules.append((f"{stem}.gate", (n, hidden)))
            if "shared_expert_intermediate_size" in base_cfg:  # Qwen2-MoE's shared expert has the same leaf names
                shared = base_cfg["shared_expert_intermediate_size"]
                modules += [(f"{stem}.shared_expert.{t}", (hidden, shared) if t == "down_proj" else (shared, hidden))
                            for t in targets]
            for module, (out, inn) in modules:
                sd[f"{module}.lora_A.weight"] = torch.randn((r, inn), generator=gen) * 0.1
                sd[f"{module}.lora_B.weight"] = torch.randn((out, r), generator=gen) * 0.1
        save_file(sd, path, metadata={"format": "pt"})
        ad_cfg["target_modules"] = sorted({*ad_cfg["target_modules"], *targets, *(["gate"] if router else [])})
        (adapter_dir / "adapter_config.json").write_text(json.dumps(ad_cfg, indent=2, sort_keys=True))

    return edit


def to_pre_452_names(adapter_dir: Path) -> None:
    """Rename a v5 Llava adapter's keys to the disk names that adapters saved before transformers 4.52 used."""
    path = adapter_dir / "adapter_model.safetensors"
    sd = load_file(path)
    renames = (("base_model.model.model.language_model.", "base_model.model.language_model.model."),
               ("base_model.model.model.vision_tower.", "base_model.model.vision_tower."),
               ("base_model.model.model.multi_modal_projector.", "base_model.model.multi_modal_projector."),
               ("base_model.model.lm_head.", "base_model.model.language_model.lm_head."))
    out = {}
    for key, value in sd.items():
        for old, new in renames:
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    save_file(out, path, metadata={"format": "pt"})


EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ML0 = "model.layers.0.block_sparse_moe."
QL0 = "model.layers.0.mlp."

_MOE_SPECS: dict[str, _Spec] = {
    # spec §7 row 14: v5-native target_parameters on the fused experts (+ router, + attention)
    "mixtral_v5_experts": _Spec(
        make_base=mixtral(),
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
              "target_parameters": [*EXPERT_PARAMS, "mlp.gate.weight"]},
        must_change=(ML0 + "experts.0.w1.weight", ML0 + "experts.3.w3.weight", ML0 + "experts.2.w2.weight",
                     ML0 + "gate.weight", "model.layers.0.self_attn.q_proj.weight"),
    ),
    # same with rsLoRA and a rank_pattern on one fused parameter (scale from the parameter path)
    "mixtral_v5_experts_rslora": _Spec(
        make_base=mixtral(),
        lora={"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"],
              "target_parameters": EXPERT_PARAMS, "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 4}},
        must_change=(ML0 + "experts.1.w1.weight", ML0 + "experts.1.w2.weight"),
    ),
    # only down_proj targeted: a single (outermost) wrapper holds it
    "mixtral_v5_down_only": _Spec(
        make_base=mixtral(),
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"]},
        must_change=(ML0 + "experts.1.w2.weight",),
    ),
    # spec §7 row 13: v4-format per-expert adapter (w1/w2/w3 per expert, router, q_proj)
    "mixtral_v4_experts": _Spec(
        make_base=mixtral(),
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
        edit_adapter=add_v4_expert_lora("mixtral", ("w1", "w2", "w3"), router=True),
    ),
    "mixtral_v4_experts_rslora": _Spec(
        make_base=mixtral(),
        lora={"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj"]},
        edit_adapter=add_v4_expert_lora("mixtral", ("w1", "w2", "w3"), router=True),
    ),
    # spec §7 row 15: v4-format Qwen2-MoE expert adapter (PEFT 0.21 drops the expert keys)
    "qwen2_moe_v4_experts": _Spec(
        make_base=qwen2_moe,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]},
        edit_adapter=add_v4_expert_lora("qwen2_moe", ("gate_proj", "up_proj", "down_proj")),
    ),
    # v5-native target_parameters on Qwen2-MoE: de-fused onto mlp.experts.e.{gate,up,down}_proj
    "qwen2_moe_v5_experts": _Spec(
        make_base=qwen2_moe,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "gate_proj"], "target_parameters": EXPERT_PARAMS},
        must_change=(QL0 + "experts.0.gate_proj.weight", QL0 + "experts.3.up_proj.weight",
                     QL0 + "experts.2.down_proj.weight", QL0 + "shared_expert.gate_proj.weight"),
    ),
    # spec §7 row 16: Llava (v5 in-memory names in the adapter; the checkpoint keeps language_model.model.* etc.)
    "llava_v5_names": _Spec(
        make_base=llava,
        lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "fc1", "linear_1", "lm_head"]},
        auto_class=None,  # set below: LlavaForConditionalGeneration (imported lazily)
        must_change=("language_model.model.layers.0.self_attn.q_proj.weight",
                     "vision_tower.encoder.layers.0.mlp.fc1.weight", "multi_modal_projector.linear_1.weight",
                     "language_model.lm_head.weight"),
    ),
}


def _llava_class() -> type:
    from transformers import LlavaForConditionalGeneration

    return LlavaForConditionalGeneration


_MOE_SPECS["llava_v5_names"] = replace(_MOE_SPECS["llava_v5_names"], auto_class=_llava_class())
_MOE_SPECS["llava_pre_452_names"] = replace(_MOE_SPECS["llava_v5_names"], edit_adapter=to_pre_452_names)

MOE_CASES: tuple[str, ...] = tuple(_MOE_SPECS)
_SPECS.update(_MOE_SPECS)  # after CASES: build_case / cached_case know them, test_parity_peft does not


# ----------------------------------------------------------------------------------------------------------
# Building


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """PEFT warns about tied targets, forced fan_in_fan_out, lora_B.bias shapes: all expected here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def _fixed_input(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(SEED + 1)
    return torch.randint(3, vocab, (2, 8), generator=gen)  # no pad (0) / bos / eos ids


@torch.no_grad()
def logits(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=input_ids).logits.detach().clone()


def load_merged(auto_class: type, path: Path, **kwargs: Any) -> PreTrainedModel:
    return auto_class.from_pretrained(path, dtype="auto", attn_implementation=ATTN, **kwargs)


def _write_tokenizer(base_dir: Path, vocab: int) -> None:
    """A tiny real tokenizer, so the base directory looks like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(vocab - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(base_dir)


def build_case(name: str, root: Path) -> Case:
    """Build base, adapter and PEFT reference for ``name`` under ``root / name`` (must not exist)."""
    spec = _SPECS[name] if name in _SPECS else ADAPTER_SPECS[name]
    case_root = Path(root) / name
    base_dir, adapter_dir, ref_dir = case_root / "base", case_root / "adapter", case_root / "ref"
    case_root.mkdir(parents=True)

    with _quiet():
        # 1. base checkpoint, bf16
        torch.manual_seed(SEED)
        model = spec.make_base().to(torch.bfloat16)
        save_kw = {} if spec.max_shard_size is None else {"max_shard_size": spec.max_shard_size}
        model.save_pretrained(base_dir, **save_kw)
        _write_tokenizer(base_dir, model.config.get_text_config().vocab_size)
        n_shards = len(list(base_dir.glob("*.safetensors")))
        if n_shards < spec.min_shards:
            raise RuntimeError(f"{name}: base has {n_shards} shards, wanted >= {spec.min_shards}")

        # 2. adapter (B != 0), optionally "trained" and edited on disk
        wrapped = spec.peft_base(base_dir) if spec.peft_base else model
        torch.manual_seed(SEED + 2)
        pm = get_peft_model(wrapped, LoraConfig(init_lora_weights=False, **spec.lora))
        if spec.second_lora is not None:
            pm.add_adapter("second", LoraConfig(init_lora_weights=False, **spec.second_lora))
        if spec.train:
            spec.train(pm)
        pm.save_pretrained(adapter_dir, **spec.save_kwargs)
        if spec.edit_adapter:
            spec.edit_adapter(adapter_dir)
        del pm, wrapped, model

        # 3. reference: fresh load (dtype auto = bf16), PEFT merge, save
        input_ids = _fixed_input(VOCAB)
        torch.manual_seed(SEED + 3)  # SEQ_CLS: the random score init is overwritten by the adapter anyway
        base_model = load_merged(spec.auto_class, base_dir, **spec.base_load_kwargs)
        base_logits = logits(base_model, input_ids)
        if spec.prepare_ref is not None:
            spec.prepare_ref(base_model)
        ref_adapter = adapter_dir / "second" if spec.second_lora is not None else adapter_dir
        merged = PeftModel.from_pretrained(base_model, ref_adapter).merge_and_unload()
        ref_logits = logits(merged, input_ids)
        merged.save_pretrained(ref_dir)

    return Case(
        name=name,
        base_dir=base_dir,
        adapter_dir=adapter_dir,
        ref_dir=ref_dir,
        auto_class=spec.auto_class,
        input_ids=input_ids,
        ref_logits=ref_logits,
        base_logits=base_logits,
        expect_config=dict(spec.expect_config),
        must_have=frozenset(spec.must_have),
        must_not_have=frozenset(spec.must_not_have),
        must_change=frozenset(spec.must_change),
        adapter_name="second" if spec.second_lora is not None else None,
    )


_BUILT: dict[tuple[str, Path], Case] = {}


def cached_case(name: str, root: Path) -> Case:
    """``build_case`` once per (name, root) per process; test modules share builds through this."""
    key = (name, Path(root))
    if key not in _BUILT:
        _BUILT[key] = build_case(name, Path(root))
    return _BUILT[key]


# ----------------------------------------------------------------------------------------------------------
# Reading checkpoints and comparing


def shard_files(ckpt_dir: Path) -> list[Path]:
    return sorted(Path(ckpt_dir).glob("*.safetensors"))


def load_checkpoint(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of all ``*.safetensors`` files in a directory (a name in two files is an error)."""
    out: dict[str, torch.Tensor] = {}
    for path in shard_files(ckpt_dir):
        for key, tensor in load_file(path).items():
            if key in out:
                raise AssertionError(f"{key} appears in more than one shard of {ckpt_dir}")
            out[key] = tensor
    return out


def tensor_locations(ckpt_dir: Path) -> dict[str, str]:
    """tensor name -> shard file name, read from the safetensors headers."""
    loc: dict[str, str] = {}
    for path in shard_files(ckpt_dir):
        with safe_open(path, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                loc[key] = path.name
    return loc


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def diff_checkpoints(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable list of every difference (names, dtypes, shapes, values); empty when bit-identical."""
    problems: list[str] = []
    for key in sorted(set(ref) - set(ours)):
        problems.append(f"missing in ours: {key}")
    for key in sorted(set(ours) - set(ref)):
        problems.append(f"unexpected in ours: {key}")
    for key in sorted(set(ours) & set(ref)):
        a, b = ours[key], ref[key]
        if a.dtype != b.dtype or a.shape != b.shape:
            problems.append(f"{key}: ours {a.dtype}{tuple(a.shape)} vs ref {b.dtype}{tuple(b.shape)}")
        elif not torch.equal(a, b):
            n_diff = int((a != b).sum())
            problems.append(f"{key}: {n_diff}/{a.numel()} elements differ, max abs diff {_max_abs_diff(a, b):.3g}")
    return problems


def byte_size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------------------------------------
# Standalone: build every case and print what PEFT did


def _summarize(case: Case) -> str:
    base = load_checkpoint(case.base_dir)
    ref = load_checkpoint(case.ref_dir)
    changed = sorted(k for k in ref if k in base and not torch.equal(ref[k], base[k]))
    added = sorted(set(ref) - set(base))
    removed = sorted(set(base) - set(ref))
    base_cfg = json.loads((case.base_dir / "config.json").read_text())
    ref_cfg = json.loads((case.ref_dir / "config.json").read_text())
    cfg_diff = {
        k: (base_cfg.get(k), ref_cfg.get(k)) for k in set(base_cfg) | set(ref_cfg) if base_cfg.get(k) != ref_cfg.get(k)
    }
    adapter_keys = sorted(load_file(case.adapter_dir / "adapter_model.safetensors"))
    non_lora = [k for k in adapter_keys if ".lora_" not in k]
    logit_diff = _max_abs_diff(case.ref_logits.float(), case.base_logits.float())
    return (
        f"{case.name}: shards={len(shard_files(case.base_dir))} changed={len(changed)}/{len(base)} "
        f"added={added} removed={removed}\n    config diff={cfg_diff}\n    non-lora adapter keys={non_lora}\n"
        f"    |logits(ref)-logits(base)|max={logit_diff:.3g}"
    )


def main() -> None:
    import tempfile
    import time

    with tempfile.TemporaryDirectory() as tmp:
        for name in CASES:
            t0 = time.perf_counter()
            case = build_case(name, Path(tmp))
            print(f"[{time.perf_counter() - t0:.2f}s] {_summarize(case)}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
