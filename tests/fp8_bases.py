"""Synthetic FP8 bases for the tests: a bf16 checkpoint from ``streammerge.testing`` with its Linear weights
quantized, in block-FP8 (DeepSeek / transformers ``fp8``) or compressed-tensors ``float-quantized`` layout.

The codes and scales come from ``formats.fp8.encode`` (fresh amax/448 scales): the tests check decoding against
the formats' reference dequantizers, so how a base's codes were chosen does not matter, only that they are valid.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from streammerge.formats import fp8
from streammerge.formats.base import grid

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _linear(name: str, t: torch.Tensor, modules: Sequence[str]) -> bool:
    return name.endswith(".weight") and t.dim() == 2 and name.removesuffix(".weight").rpartition(".")[2] in modules


def _shards(root: Path) -> list[Path]:
    return sorted(root.glob("*.safetensors"))


def _rewrite(src: Path, dst: Path, convert) -> None:
    """Copy the checkpoint ``src`` to ``dst`` with every shard's tensors passed through ``convert``."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    for shard in _shards(dst):
        tensors = convert(load_file(shard))
        save_file(tensors, shard, metadata={"format": "pt"})
        if index is not None:
            for name in tensors:
                index["weight_map"][name] = shard.name
    if index is not None:
        index["metadata"].pop("total_size", None)
        index_path.write_text(json.dumps(index, indent=2))


def _config(dst: Path, quantization_config: dict) -> None:
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def block_fp8(src: Path, dst: Path, block: tuple[int, int] = (128, 128), modules: Sequence[str] = LINEARS) -> Path:
    """DeepSeek-style: ``weight`` F8_E4M3 + ``weight_scale_inv`` F32 per block (edge blocks partial)."""

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if _linear(name, t, modules):
                q, s = fp8.encode(t, block, torch.float32, 1.0)
                assert s.shape == grid(tuple(t.shape), block)
                out[name], out[name + "_scale_inv"] = q, s
            else:
                out[name] = t
        return out

    _rewrite(src, dst, convert)
    _config(dst, {"quant_method": "fp8", "weight_block_size": list(block), "activation_scheme": "dynamic"})
    return dst


def compressed_fp8(src: Path, dst: Path, strategy: str = "channel", scale_dtype: torch.dtype = torch.bfloat16,
                   modules: Sequence[str] = LINEARS, static_input: bool = True) -> Path:
    """llm-compressor style: ``weight`` F8_E4M3 + ``weight_scale`` per tensor / channel / 128×128 block
    (+ a static ``input_scale``)."""

    def convert(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, t in tensors.items():
            if not _linear(name, t, modules):
                out[name] = t
                continue
            block = {"tensor": tuple(t.shape), "channel": (1, t.shape[1]), "block": (128, 128)}[strategy]
            q, s = fp8.encode(t, block, scale_dtype, torch.finfo(scale_dtype).eps)
            out[name], out[name + "_scale"] = q, s.reshape(1) if strategy == "tensor" else s
            if static_input:
                out[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.0123], dtype=scale_dtype)
        return out

    weights = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": False,
               "group_size": None, "block_structure": [128, 128] if strategy == "block" else None,
               "observer": "minmax"}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
            "dynamic": not static_input, "observer": "minmax" if static_input else None}
    _rewrite(src, dst, convert)
    _config(dst, {
        "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts,
                                      "output_activations": None, "format": "float-quantized"}},
        "ignore": ["lm_head"], "kv_cache_scheme": None,
    })
    return dst
