"""Tiny quantized bases (MXFP4 GPT-OSS, bitsandbytes 4/8-bit, GPTQ, AWQ) and their reference merges.

Plain functions, no pytest. Each base is a real HF checkpoint directory:

* **MXFP4**: a tiny ``GptOssForCausalLM`` saved in bf16, its fused experts then re-stored as
  ``*_blocks``/``*_scales`` by :func:`quantize_mxfp4` (written from the OCP MX spec: per 32-value group the
  E8M0 exponent ``ceil(log2(amax / 6))``, codes = nearest E2M1 value, ties to the even code), with GPT-OSS's
  ``quantization_config``. Reference: ``from_pretrained(quantization_config=Mxfp4Config(dequantize=True))``
  + PEFT (``target_parameters`` on the experts + attention LoRA) ``merge_and_unload`` + ``save_pretrained``.
* **bitsandbytes**: transformers' own ``BitsAndBytesConfig`` quantization on CPU, ``save_pretrained``.
  Reference: ``from_pretrained`` + ``model.dequantize(dtype=bf16)`` + PEFT merge + save.
* **GPTQ / AWQ**: no CPU library; quantizers written from the spec and the reference unpacks of AutoGPTQ /
  AutoAWQ (also what ``test_formats_quant`` checks the decoders against), applied to every Linear of a tiny
  Llama. Reference: the reference dequantized weights loaded into the Llama + PEFT merge + save.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GptOssConfig, GptOssForCausalLM, Mxfp4Config

from streammerge.formats import mxfp4, mxfp4_layout

SEED = 4321
GPT_OSS_MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                  "lm_head"]
_E2M1 = torch.tensor(mxfp4.FP4_E2M1[:8])  # magnitudes of codes 0..7


def gpt_oss_config() -> GptOssConfig:
    """H=64, I=96 (so gate_up (E, 64, 192) and down (E, 96, 64) differ in every axis), 4 experts, 2 layers."""
    return GptOssConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
        layer_types=["sliding_attention", "full_attention"], sliding_window=8, tie_word_embeddings=False,
    )


def quantize_mxfp4(disk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Disk-layout (…, C) float -> blocks (…, C/32, 16) U8, scales (…, C/32) U8 (OCP MX, E2M1 + E8M0)."""
    g = disk.float().reshape(*disk.shape[:-1], -1, mxfp4_layout.GROUP)  # (…, G, 32)
    amax = g.abs().amax(-1)
    exp = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6.0)), torch.full_like(amax, -127)).clamp(-127, 127)
    x = g / torch.pow(2.0, exp)[..., None]  # |x| ≤ 6
    mag = (x.abs()[..., None] - _E2M1).abs().argmin(-1)  # nearest magnitude code 0..7 (first = even on ties)
    code = (mag | ((x < 0).to(torch.int64) << 3)).to(torch.uint8)
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks.contiguous(), (exp + mxfp4_layout.E8M0_BIAS).to(torch.uint8)


def make_gpt_oss_bf16(root: Path) -> Path:
    """A tiny bf16 GPT-OSS checkpoint (experts fused on disk as in memory: gate_up_proj (E, H, 2I)) at ``root``."""
    torch.manual_seed(SEED)
    model = GptOssForCausalLM(gpt_oss_config()).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("_bias", ".bias", "sinks")):
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(root)
    return root


def make_gpt_oss_mxfp4(root: Path) -> Path:
    """A tiny GPT-OSS checkpoint with MXFP4 experts (and bf16 everything else) at ``root``."""
    make_gpt_oss_bf16(root)
    sd = load_file(root / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if name.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            blocks, scales = quantize_mxfp4(t.transpose(1, 2))  # disk layout (E, R, C)
            out[name + mxfp4_layout.BLOCKS_SUFFIX], out[name + mxfp4_layout.SCALES_SUFFIX] = blocks, scales
        else:
            out[name] = t
    save_file(out, root / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((root / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": GPT_OSS_MODULES_TO_NOT_CONVERT}
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root


def load_gpt_oss_dequantized(base: Path) -> GptOssForCausalLM:
    return GptOssForCausalLM.from_pretrained(base, quantization_config=Mxfp4Config(dequantize=True),
                                             dtype=torch.bfloat16, attn_implementation="eager")


def make_gpt_oss_adapter(base: Path, root: Path, *, r: int = 4, alpha: int = 8,
                         parameters: tuple[str, ...] = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj"),
                         modules: tuple[str, ...] = ("q_proj", "v_proj")) -> Path:
    """PEFT LoRA with ``target_parameters`` on the fused experts plus attention, B non-zero."""
    torch.manual_seed(SEED + 1)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(modules), target_parameters=list(parameters),
                     init_lora_weights=False)
    get_peft_model(load_gpt_oss_dequantized(base), cfg).save_pretrained(root)
    return root


def merge_reference(model: torch.nn.Module, adapter: Path, out: Path) -> Path:
    """PEFT ``merge_and_unload`` of ``adapter`` into the loaded ``model``, then ``save_pretrained``."""
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return out


def assert_same_file(ours: Path, ref: Path) -> None:
    """``ours/model.safetensors`` holds ``ref``'s tensors: same names, dtypes, shapes and bits."""
    a, b = load_file(ours / "model.safetensors"), load_file(ref / "model.safetensors")
    assert sorted(a) == sorted(b)
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].contiguous().view(torch.uint8), b[name].contiguous().view(torch.uint8)), name


# ---------------------------------------------------------------- bitsandbytes


BNB_KINDS = {
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"},
    "nf4-dq": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True},
    "fp4": {"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"},
    "int8": {"load_in_8bit": True},
}


def make_bnb(bf16_base: Path, root: Path, kind: str) -> Path:
    """``bf16_base`` quantized by transformers' bitsandbytes integration on CPU and saved at ``root``."""
    qc = BitsAndBytesConfig(**BNB_KINDS[kind], bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(bf16_base, quantization_config=qc, dtype=torch.bfloat16,
                                                 device_map="cpu")
    model.save_pretrained(root)
    return root


def load_bnb_dequantized(base: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(base, device_map="cpu", attn_implementation="eager")
    return model.dequantize(dtype=torch.bfloat16)


# ---------------------------------------------------------------- GPTQ / AWQ (pack from the spec)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(k·pack, n) codes -> (k, n) I32: value j of each word at bits [bits·j, bits·(j+1))."""
    pack = 32 // bits
    c = codes.to(torch.int64).reshape(-1, pack, codes.shape[1])
    word = sum(c[:, j] << (bits * j) for j in range(pack)).contiguous()
    return (word - ((word >> 31) << 32)).to(torch.int32)  # two's complement of the top bit


def _minmax(rows: torch.Tensor, maxq: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
    s = ((hi - lo) / maxq).clamp(min=1e-5).half()
    return s, torch.round(-lo / s.float()).clamp(0, maxq).long()


def quantize_gptq(w: torch.Tensor, bits: int, group_size: int, *, v1: bool = True, perm: torch.Tensor | None = None):
    """GPTQ tensors of W (out, in): qweight, qzeros (zero - 1 when ``v1``), scales F16, g_idx."""
    out, inp = w.shape
    maxq = (1 << bits) - 1
    g_idx = torch.arange(inp) // group_size
    if perm is not None:
        g_idx = g_idx[perm]
    groups = int(g_idx.max()) + 1
    wt = w.T.float()
    scales, zeros = torch.empty(groups, out, dtype=torch.float16), torch.empty(groups, out, dtype=torch.int64)
    for g in range(groups):
        scales[g], zeros[g] = _minmax(wt[g_idx == g], maxq)
    q = torch.round(wt / scales.float()[g_idx] + zeros[g_idx]).clamp(0, maxq).long()
    stored = (zeros - 1) & maxq if v1 else zeros
    return _pack(q, bits), _pack(stored.T, bits).T.contiguous(), scales, g_idx.to(torch.int32)


def gptq_reference(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> torch.Tensor:
    """AutoGPTQ ``qlinear_cuda_old`` / GPTQModel torch ``dequantize_weight``, whole tensor -> W (out, in) F16."""
    pack, small = 32 // bits, torch.int16 if bits == 8 else torch.int8
    wf = torch.tensor(list(range(0, 32, bits)), dtype=torch.int32).unsqueeze(0)
    zeros = torch.bitwise_right_shift(torch.unsqueeze(qzeros, 2).expand(-1, -1, pack), wf.unsqueeze(0)).to(small)
    if v1:
        zeros = zeros + 1
    zeros = torch.bitwise_and(zeros, (2**bits) - 1).reshape(scales.shape)
    weight = torch.bitwise_right_shift(torch.unsqueeze(qweight, 1).expand(-1, pack, -1), wf.unsqueeze(-1)).to(small)
    weight = torch.bitwise_and(weight, (2**bits) - 1).reshape(-1, weight.shape[2])
    return (scales[g_idx.long()] * (weight - zeros[g_idx.long()])).T


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)


def _pack_awq(codes: torch.Tensor) -> torch.Tensor:
    """(k, out) -> (k, out/8): nibble j of word c holds column 8c + AWQ_ORDER[j]."""
    c = codes.to(torch.int64).reshape(codes.shape[0], -1, 8)[:, :, list(AWQ_ORDER)]
    word = sum(c[:, :, j] << (4 * j) for j in range(8)).contiguous()
    return (word - ((word >> 31) << 32)).to(torch.int32)


def quantize_awq(w: torch.Tensor, group_size: int):
    """AWQ GEMM tensors of W (out, in): qweight (in, out/8), qzeros (in/group, out/8), scales F16 (in/group, out)."""
    out, inp = w.shape
    wt = w.T.float().reshape(inp // group_size, group_size, out)
    pairs = [_minmax(wt[g], 15) for g in range(wt.shape[0])]
    scales = torch.stack([s for s, _ in pairs])
    zeros = torch.stack([z for _, z in pairs])
    q = torch.round(wt / scales.float()[:, None] + zeros[:, None]).clamp(0, 15).long().reshape(inp, out)
    return _pack_awq(q), _pack_awq(zeros), scales


def awq_reference(qweight, qzeros, scales, group_size: int) -> torch.Tensor:
    """AutoAWQ ``dequantize_gemm`` (unpack_awq + reverse_awq_order), whole tensor -> W (out, in) F16."""
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(qweight[:, :, None], shifts[None, None, :]).to(torch.int8)
    iw = iw.view(iw.shape[0], -1)
    iz = torch.bitwise_right_shift(qzeros[:, :, None], shifts[None, None, :]).to(torch.int8)
    iz = iz.view(iz.shape[0], -1)
    rev = torch.arange(iw.shape[-1], dtype=torch.int32).view(-1, 8)[:, list(AWQ_REVERSE)].view(-1)
    iw, iz = torch.bitwise_and(iw[:, rev], 15), torch.bitwise_and(iz[:, rev], 15)
    return ((iw - iz.repeat_interleave(group_size, 0)) * scales.repeat_interleave(group_size, 0)).T


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_int4(bf16_base: Path, root: Path, method: str, *, group_size: int = 32) -> tuple[Path, dict]:
    """``bf16_base`` with every decoder Linear stored as GPTQ (v1, act-order on layer 0) or AWQ GEMM at ``root``.

    Returns the directory and the reference dequantized state dict (what a GPTQ/AWQ dequantizer yields, in
    the config's dtype)."""
    sd = load_file(bf16_base / "model.safetensors")
    cfg = json.loads((bf16_base / "config.json").read_text())
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    out, ref = {}, {}
    for name, t in sd.items():
        stem = name.removesuffix(".weight")
        if not (name.endswith(".weight") and stem.rsplit(".", 1)[-1] in LINEARS):
            out[name] = ref[name] = t
            continue
        w = t.float()
        if method == "gptq":
            perm = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(SEED)) if ".0." in name else None
            qw, qz, sc, gi = quantize_gptq(w, 4, group_size, perm=perm)
            out |= {f"{stem}.qweight": qw, f"{stem}.qzeros": qz, f"{stem}.scales": sc, f"{stem}.g_idx": gi}
            ref[name] = gptq_reference(qw, qz, sc, gi, 4).to(dtype)
        else:
            qw, qz, sc = quantize_awq(w, group_size)
            out |= {f"{stem}.qweight": qw, f"{stem}.qzeros": qz, f"{stem}.scales": sc}
            ref[name] = awq_reference(qw, qz, sc, group_size).to(dtype)
    root.mkdir(parents=True, exist_ok=True)
    save_file(out, root / "model.safetensors", metadata={"format": "pt"})
    cfg["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": True, "sym": False,
         "checkpoint_format": "gptq"}
        if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
    )
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return root, ref
