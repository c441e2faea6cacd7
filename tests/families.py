"""The model-family zoo: one tiny random model per transformers class, its PEFT adapter, PEFT's merged reference.

Plain functions, no pytest (``tests/test_families.py`` holds the tests). Every family is built from its config with
fixed seeds (no hub access), in bf16, saved by ``save_pretrained``; the adapter is a ``LoraConfig(init_lora_weights=
False)`` (B != 0) on every ``nn.Linear`` / HF ``Conv1D`` / ``nn.Embedding`` leaf name of the model (so all linear
layers, the embeddings and the tied heads), with task heads in ``modules_to_save`` (what PEFT's task types do) and,
for the MoE families, ``target_parameters`` on the fused experts. The reference is PEFT's own
``merge_and_unload().save_pretrained()`` of a fresh ``from_pretrained`` load of the base, and its logits.

Run this file directly to build every family and print what PEFT did (names added/dropped, config changes).
"""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

SEED = 4321
VOCAB = 96
H = 32  # hidden size of every text tower
ATTN = "eager"
BATCH, SEQ = 2, 6

# ----------------------------------------------------------------------------------------------------------
# Tiny configs (transformers 5.x config classes; every dim as small as the architecture allows)

_TEXT = {"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
_DECODER = {**_TEXT, "hidden_size": H, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 64, "head_dim": 8}


def _cfg(name: str, **kw: Any) -> Any:
    return getattr(transformers, name)(**kw)


def _decoder(config: str, **kw: Any) -> Callable[[], Any]:
    return lambda: _cfg(config, **{**_DECODER, **kw})


def _clip_vision(**kw: Any) -> dict[str, Any]:
    return {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "image_size": 16, "patch_size": 8, **kw}


def _moe(**kw: Any) -> dict[str, Any]:
    return {**_DECODER, "num_experts_per_tok": 2, "tie_word_embeddings": False, **kw}


CONFIGS: dict[str, Callable[[], Any]] = {
    "llama": _decoder("LlamaConfig", tie_word_embeddings=True),
    "mistral": _decoder("MistralConfig", tie_word_embeddings=False),
    "qwen2": _decoder("Qwen2Config", tie_word_embeddings=True),
    "qwen3": _decoder("Qwen3Config", tie_word_embeddings=False),
    "gemma": _decoder("GemmaConfig"),
    "gemma2": _decoder("Gemma2Config", sliding_window=16),
    "gemma3_text": _decoder("Gemma3TextConfig", sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "phi3": _decoder("Phi3Config", tie_word_embeddings=False),
    "olmo2": _decoder("Olmo2Config", tie_word_embeddings=False),
    "cohere": _decoder("CohereConfig", tie_word_embeddings=True),
    "starcoder2": _decoder("Starcoder2Config", tie_word_embeddings=True, sliding_window=None),
    "gpt2": lambda: _cfg("GPT2Config", n_embd=H, n_layer=2, n_head=4, n_positions=64, **_TEXT),
    "gpt_bigcode": lambda: _cfg("GPTBigCodeConfig", n_embd=H, n_layer=2, n_head=4, n_positions=64, **_TEXT),
    "gptj": lambda: _cfg("GPTJConfig", n_embd=H, n_layer=2, n_head=4, rotary_dim=4, n_positions=64,
                         tie_word_embeddings=False, **_TEXT),
    "gpt_neox": lambda: _cfg("GPTNeoXConfig", hidden_size=H, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=64, tie_word_embeddings=False, **_TEXT),
    "falcon": lambda: _cfg("FalconConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                           new_decoder_architecture=True, num_kv_heads=2, **_TEXT),
    "bloom": lambda: _cfg("BloomConfig", hidden_size=H, n_layer=2, n_head=4, **_TEXT),
    "opt": lambda: _cfg("OPTConfig", hidden_size=H, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=H, max_position_embeddings=64, **_TEXT),
    "t5": lambda: _cfg("T5Config", d_model=H, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                       decoder_start_token_id=0, **_TEXT),
    "bart": lambda: _cfg("BartConfig", d_model=H, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                         decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48,
                         max_position_embeddings=64, decoder_start_token_id=2, forced_eos_token_id=2, **_TEXT),
    "whisper": lambda: _cfg("WhisperConfig", d_model=H, encoder_layers=1, decoder_layers=1,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                            decoder_ffn_dim=48, num_mel_bins=8, max_source_positions=8, max_target_positions=32,
                            decoder_start_token_id=1, suppress_tokens=[], begin_suppress_tokens=[], **_TEXT),
    "bert": lambda: _cfg("BertConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=48, max_position_embeddings=64, num_labels=3, **_TEXT),
    "bert_mlm": lambda: _cfg("BertConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=48, max_position_embeddings=64, **_TEXT),
    "roberta_cls": lambda: _cfg("RobertaConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=64, num_labels=3, **_TEXT),
    "roberta": lambda: _cfg("RobertaConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, max_position_embeddings=64, num_labels=3, **_TEXT),
    "vit": lambda: _cfg("ViTConfig", hidden_size=H, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        image_size=16, patch_size=8, num_labels=3),
    "swin": lambda: _cfg("SwinConfig", image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2],
                         window_size=2, num_labels=3),
    "dinov2": lambda: _cfg("Dinov2Config", hidden_size=H, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
                           image_size=16, patch_size=8, num_labels=3),
    "clip": lambda: _cfg("CLIPConfig", text_config={**_TEXT, "hidden_size": 16, "intermediate_size": 32,
                                                    "num_hidden_layers": 1, "num_attention_heads": 2,
                                                    "max_position_embeddings": 16},
                         vision_config=_clip_vision(), projection_dim=16),
    "llava": lambda: _cfg("LlavaConfig", vision_config=transformers.CLIPVisionConfig(**_clip_vision()),
                          text_config=transformers.LlamaConfig(**{**_DECODER, "vocab_size": VOCAB + 2}),
                          image_token_index=VOCAB + 1, projector_hidden_act="gelu", tie_word_embeddings=False),
    "qwen2_vl": lambda: _cfg("Qwen2VLConfig", text_config={**_DECODER, "model_type": "qwen2_vl_text",
                                                           "rope_scaling": {"type": "mrope",
                                                                            "mrope_section": [1, 1, 2]}},
                             vision_config={"depth": 1, "embed_dim": 16, "hidden_size": H, "num_heads": 2,
                                            "mlp_ratio": 2, "patch_size": 2, "temporal_patch_size": 2,
                                            "spatial_merge_size": 1}, tie_word_embeddings=False,
                             image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
    "qwen2_5_vl": lambda: _cfg("Qwen2_5_VLConfig", text_config={**_DECODER, "model_type": "qwen2_5_vl_text",
                                                                 "rope_scaling": {"type": "mrope",
                                                                                  "mrope_section": [1, 1, 2]}},
                               vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 32,
                                              "num_heads": 2, "out_hidden_size": H, "patch_size": 2,
                                              "temporal_patch_size": 2, "spatial_merge_size": 1,
                                              "window_size": 4, "fullatt_block_indexes": [0]},
                               tie_word_embeddings=True,
                               image_token_id=VOCAB - 1, video_token_id=VOCAB - 2, vision_start_token_id=VOCAB - 3),
    "gemma3": lambda: _cfg("Gemma3Config", text_config={**_DECODER, "vocab_size": VOCAB + 2, "sliding_window": 16,
                                                        "layer_types": ["sliding_attention", "full_attention"]},
                           vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
                           mm_tokens_per_image=4, image_token_index=VOCAB + 1, boi_token_index=VOCAB - 1,
                           eoi_token_index=VOCAB - 2),
    "mixtral": lambda: _cfg("MixtralConfig", **_moe(num_local_experts=4)),
    "qwen2_moe": lambda: _cfg("Qwen2MoeConfig", **_moe(num_experts=4, moe_intermediate_size=24,
                                                        shared_expert_intermediate_size=32, decoder_sparse_step=1,
                                                        mlp_only_layers=[])),
    "qwen3_moe": lambda: _cfg("Qwen3MoeConfig", **_moe(num_experts=4, moe_intermediate_size=24,
                                                        decoder_sparse_step=1, mlp_only_layers=[])),
    "deepseek_v3": lambda: _cfg("DeepseekV3Config", **_moe(n_routed_experts=4, n_shared_experts=1,
                                                            moe_intermediate_size=24, first_k_dense_replace=1,
                                                            kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4,
                                                            qk_nope_head_dim=4, v_head_dim=8, n_group=1,
                                                            topk_group=1, num_key_value_heads=4,
                                                            head_dim=4)),
    "gpt_oss": lambda: _cfg("GptOssConfig", **_moe(num_local_experts=4, sliding_window=16,
                                                    layer_types=["sliding_attention", "full_attention"])),
}

#: family -> model class name (transformers) the family is built, saved and reloaded as.
CLASSES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "cohere": "CohereForCausalLM", "starcoder2": "Starcoder2ForCausalLM", "gpt2": "GPT2LMHeadModel",
    "gpt_bigcode": "GPTBigCodeForCausalLM", "gptj": "GPTJForCausalLM", "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM", "bloom": "BloomForCausalLM", "opt": "OPTForCausalLM",
    "t5": "T5ForConditionalGeneration", "bart": "BartForConditionalGeneration",
    "whisper": "WhisperForConditionalGeneration", "bert": "BertForSequenceClassification",
    "bert_mlm": "BertForMaskedLM", "roberta_cls": "RobertaForSequenceClassification",
    "roberta": "RobertaForMaskedLM", "vit": "ViTForImageClassification", "swin": "SwinForImageClassification",
    "dinov2": "Dinov2ForImageClassification", "clip": "CLIPModel", "llava": "LlavaForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM", "gpt_oss": "GptOssForCausalLM",
}
FAMILY_NAMES: tuple[str, ...] = tuple(CONFIGS)

# ----------------------------------------------------------------------------------------------------------
# Variants: what the adapter targets


@dataclass(frozen=True)
class Variant:
    """One adapter on one family. ``targets=None``: every Linear/Conv1D/Embedding leaf name but ``exclude``."""

    family: str
    targets: tuple[str, ...] | str | None = None  # a str is PEFT's own spelling ("all-linear")
    exclude: tuple[str, ...] = ()
    modules_to_save: tuple[str, ...] = ()
    target_parameters: tuple[str, ...] = ()
    lora: dict[str, Any] = field(default_factory=dict)  # more LoraConfig kwargs (task_type, bias, ...)
    train: tuple[str, ...] = ()  # PeftModel parameter-name fragments to perturb (modules_to_save copies, biases)


#: Experts stored fused in memory (transformers v5): the 3-D parameters ``target_parameters`` reaches.
EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
# Heads PEFT's task types save (modules_to_save); LoRA goes on everything else.
_CLS = ("classifier",)

VARIANTS: dict[str, Variant] = {name: Variant(name) for name in FAMILY_NAMES}
VARIANTS.update({
    # task heads are trained whole (PEFT's SEQ_CLS adds classifier/score to modules_to_save)
    "bert": Variant("bert", exclude=_CLS, lora={"task_type": "SEQ_CLS"}, train=("modules_to_save",)),
    # the classification head (classifier.dense, classifier.out_proj) is saved whole; LoRA on every other Linear
    "roberta_cls": Variant("roberta_cls", targets=("query", "key", "value", "output.dense", "intermediate.dense",
                                                   "word_embeddings", "position_embeddings",
                                                   "token_type_embeddings"),
                           lora={"task_type": "SEQ_CLS"}, train=("modules_to_save",)),
    "vit": Variant("vit", exclude=_CLS, modules_to_save=_CLS, train=("modules_to_save",)),
    "swin": Variant("swin", exclude=_CLS, modules_to_save=_CLS, train=("modules_to_save",)),
    "dinov2": Variant("dinov2", exclude=_CLS, modules_to_save=_CLS, train=("modules_to_save",)),
    # MoE: all linear + embeddings, and the fused experts through target_parameters
    "mixtral": Variant("mixtral", target_parameters=EXPERTS),
    "qwen2_moe": Variant("qwen2_moe", target_parameters=EXPERTS),
    "qwen3_moe": Variant("qwen3_moe", target_parameters=EXPERTS),
    "deepseek_v3": Variant("deepseek_v3", target_parameters=EXPERTS),
    "gpt_oss": Variant("gpt_oss", target_parameters=EXPERTS),
    # the named cases
    # v5 names the head lm_head in memory; the checkpoint keeps embed_out
    "gpt_neox_mts_embed_out": Variant("gpt_neox", targets=("query_key_value",), modules_to_save=("lm_head",),
                                      train=("modules_to_save",)),
    "whisper_mts_proj_out": Variant("whisper", targets=("q_proj", "v_proj"), modules_to_save=("proj_out",),
                                    train=("modules_to_save",)),
    "bert_seq_cls_bias_all": Variant("bert", targets=("query", "value"),
                                     lora={"task_type": "SEQ_CLS", "bias": "all"},
                                     train=("modules_to_save", ".bias")),
    "t5_shared": Variant("t5", targets=("shared", "q", "v")),
    "bart_shared": Variant("bart", targets=("shared", "q_proj", "v_proj")),
    "roberta_lm_head_decoder": Variant("roberta", targets=("decoder", "query")),
    "mixtral_all_linear_experts": Variant("mixtral", targets=("q_proj", "gate"), target_parameters=EXPERTS),
    # PEFT's "all-linear" (every Linear but the output head) with the fused experts through target_parameters
    "mixtral_all_linear": Variant("mixtral", targets="all-linear", target_parameters=EXPERTS),
    "qwen3_moe_all_linear": Variant("qwen3_moe", targets="all-linear", target_parameters=EXPERTS),
    "deepseek_v3_all_linear": Variant("deepseek_v3", targets="all-linear", target_parameters=EXPERTS),
    "gpt_oss_all_linear": Variant("gpt_oss", targets="all-linear", target_parameters=EXPERTS),
})
VARIANT_NAMES: tuple[str, ...] = tuple(VARIANTS)


def leaf_targets(model: torch.nn.Module, exclude: tuple[str, ...]) -> list[str]:
    """Leaf names of every Linear / HF Conv1D / Embedding module (what 'all linear + embeddings + heads' means)."""
    kinds = (torch.nn.Linear, Conv1D, torch.nn.Embedding)
    found = set()
    for n, m in model.named_modules():
        leaf = n.rpartition(".")[2]
        if n and isinstance(m, kinds) and leaf not in exclude:
            # an nn.Sequential member ("merger.mlp.0") is named by its parent too: "0" alone matches "blocks.0"
            found.add(".".join(n.split(".")[-2:]) if leaf.isdigit() else leaf)
    return sorted(found)


# ----------------------------------------------------------------------------------------------------------
# Inputs


def model_inputs(family: str, config: Any) -> dict[str, torch.Tensor]:
    """Fixed inputs for one forward pass (text ids, decoder ids, pixels or audio features as the class needs)."""
    gen = torch.Generator().manual_seed(SEED + 1)
    dtype = torch.bfloat16  # the dtype every family is saved and loaded in
    ids = torch.randint(3, VOCAB - 4, (BATCH, SEQ), generator=gen)
    if family in ("vit", "swin", "dinov2"):
        return {"pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen).to(dtype)}
    if family == "clip":
        return {"input_ids": ids, "pixel_values": torch.randn(BATCH, 3, 16, 16, generator=gen).to(dtype)}
    if family == "whisper":
        return {"input_features": torch.randn(BATCH, 8, 16, generator=gen).to(dtype), "decoder_input_ids": ids}
    if family in ("t5", "bart"):
        return {"input_ids": ids, "decoder_input_ids": ids.flip(-1)}
    return {"input_ids": ids}


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    out = model(**inputs)
    for attr in ("logits", "logits_per_image"):
        if getattr(out, attr, None) is not None:
            return getattr(out, attr).detach().clone()
    raise AssertionError(f"{type(model).__name__}: no logits in its output")


# ----------------------------------------------------------------------------------------------------------
# Building


@dataclass(frozen=True)
class Built:
    name: str
    variant: Variant
    model_class: type
    base_dir: Path
    adapter_dir: Path
    ref_dir: Path | None  # None when PEFT itself failed (peft_error says how)
    inputs: dict[str, torch.Tensor]
    ref_logits: torch.Tensor | None
    base_logits: torch.Tensor | None
    targets: tuple[str, ...] | str
    peft_error: str | None = None
    seconds: float = 0.0


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _perturb(pm: PeftModel, fragments: tuple[str, ...]) -> None:
    gen = torch.Generator().manual_seed(SEED + 7)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if any(f in name for f in fragments) and ".lora_" not in name:
                p.add_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))


def load(model_class: type, path: Path) -> torch.nn.Module:
    return model_class.from_pretrained(path, dtype="auto", attn_implementation=ATTN)


def build(name: str, root: Path) -> Built:
    """Base, adapter and PEFT's merged reference for variant ``name`` under ``root / name``."""
    t0 = time.perf_counter()
    variant = VARIANTS[name]
    cls = getattr(transformers, CLASSES[variant.family])
    case = Path(root) / name
    base_dir, adapter_dir, ref_dir = case / "base", case / "adapter", case / "ref"
    case.mkdir(parents=True)
    with _quiet():
        torch.manual_seed(SEED)
        config = CONFIGS[variant.family]()
        model = cls._from_config(config, attn_implementation=ATTN).to(torch.bfloat16)
        with torch.no_grad():  # non-zero biases everywhere, so bias arithmetic is observable
            for pname, p in model.named_parameters():
                if pname.endswith(".bias"):
                    p.copy_(torch.randn_like(p) * 0.1)
        model.save_pretrained(base_dir)
        targets = variant.targets if variant.targets is not None else tuple(leaf_targets(model, variant.exclude))
        inputs = model_inputs(variant.family, config)
        torch.manual_seed(SEED + 2)
        lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=targets if isinstance(targets, str) else list(targets),
                          modules_to_save=list(variant.modules_to_save) or None,
                          target_parameters=list(variant.target_parameters) or None, **variant.lora)
        try:
            wrapped = load(cls, base_dir) if variant.lora.get("task_type") else model
            pm = get_peft_model(wrapped, lora)
            _perturb(pm, variant.train)
            pm.save_pretrained(adapter_dir)
            del pm, wrapped, model
            base_model = load(cls, base_dir)
            base_logits = outputs(base_model, inputs)
            merged = PeftModel.from_pretrained(base_model, adapter_dir).merge_and_unload()
            ref_logits = outputs(merged, inputs)
            merged.save_pretrained(ref_dir)
        except Exception as exc:  # PEFT cannot build/merge this adapter: the test reports why
            return Built(name, variant, cls, base_dir, adapter_dir, None, inputs, None, None, targets,
                         f"{type(exc).__name__}: {exc}", time.perf_counter() - t0)
    return Built(name, variant, cls, base_dir, adapter_dir, ref_dir, inputs, ref_logits, base_logits, targets,
                 None, time.perf_counter() - t0)


def main() -> None:
    import sys
    import tempfile

    sys.path.insert(0, str(Path(__file__).parent))
    from oracle import load_checkpoint

    names = sys.argv[1:] or VARIANT_NAMES
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            b = build(name, Path(tmp))
            if b.peft_error:
                print(f"[{b.seconds:.2f}s] {name}: PEFT failed: {b.peft_error[:300]}")
                continue
            base, ref = load_checkpoint(b.base_dir), load_checkpoint(b.ref_dir)
            bc = json.loads((b.base_dir / "config.json").read_text())
            rc = json.loads((b.ref_dir / "config.json").read_text())
            cfg = {k: (bc.get(k), rc.get(k)) for k in set(bc) | set(rc) if bc.get(k) != rc.get(k)}
            changed = sum(1 for k in ref if k in base and not torch.equal(ref[k], base[k]))
            print(f"[{b.seconds:.2f}s] {name}: changed {changed}/{len(base)} added={sorted(set(ref) - set(base))} "
                  f"dropped={sorted(set(base) - set(ref))} config={cfg} targets={b.targets}")


if __name__ == "__main__":
    main()
