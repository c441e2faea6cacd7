"""Synthetic, real-shaped Llama checkpoints and PEFT LoRA adapters for benchmarking.

Nothing is downloaded. Every checkpoint is written the way ``save_pretrained`` lays one out:

* ``model-0000i-of-0000n.safetensors`` shards, filled greedily in state-dict order up to
  ``max_shard_bytes`` (a tensor larger than the limit gets a shard of its own, as in HF);
* ``model.safetensors.index.json`` with ``metadata.total_size`` (sum of tensor bytes) and ``weight_map``;
* a real ``config.json`` (``LlamaConfig`` fields) so transformers and PEFT can load the result.

Inside a shard the header is the one ``safetensors`` itself writes: ``__metadata__ = {"format": "pt"}``,
tensors sorted by name, contiguous offsets, JSON padded with spaces to a multiple of 8 bytes.

Memory: tensor data is generated and written in chunks of ``CHUNK_ELEMS`` elements, so the generator holds
well under one shard (about 200 MB) whatever the model size.

Data is deterministic: every tensor has its own generator seeded from ``(seed, name)``, so a tensor's bytes
do not depend on the sharding.

CLI::

    python benchmarks/synth.py base llama-1b /tmp/smbench/llama-1b/base
    python benchmarks/synth.py adapter llama-1b all-linear /tmp/smbench/llama-1b/base /tmp/smbench/llama-1b/lora-all
    python benchmarks/synth.py case llama-1b --root /tmp/smbench     # base + both adapters
    python benchmarks/synth.py sizes                                  # print exact sizes of every shape
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

CHUNK_ELEMS = 32 * 1024 * 1024  # 64 MiB of bf16 per generated chunk
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3  # 2 GiB; HF default is 5 GB, smaller shards are closer to real 1B repos
_DTYPE_CODE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


@dataclass(frozen=True)
class LlamaShape:
    """The LlamaConfig fields that determine tensor shapes."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.num_key_value_heads


SHAPES: dict[str, LlamaShape] = {
    # Llama-3.2-1B layer shapes, untied lm_head, vocab cut to 32000 so the checkpoint is the
    # "2.1 GB Llama-1B-shaped checkpoint" of the issue: 1,104,218,112 params = 2,208,436,224 bytes
    # (2.21 GB = 2.06 GiB).
    "llama-1b": LlamaShape("llama-1b", 2048, 8192, 16, 32, 8, 32000),
    # Same with the real Llama-3 vocab (untied): 1,498,482,688 params = 2,996,965,376 bytes (3.00 GB).
    "llama-1b-v128k": LlamaShape("llama-1b-v128k", 2048, 8192, 16, 32, 8, 128256),
    # Llama-3-70B shapes with only 2 / 4 decoder layers (embed + lm_head are 2.1 GB each).
    "70b-slice-2": LlamaShape("70b-slice-2", 8192, 28672, 2, 64, 8, 128256),
    "70b-slice-4": LlamaShape("70b-slice-4", 8192, 28672, 4, 64, 8, 128256),
    # Tiny, for self-tests and for checking that PEFT loads what we write.
    "tiny": LlamaShape("tiny", 64, 176, 2, 4, 2, 512, max_position_embeddings=256),
}

ADAPTER_TARGETS: dict[str, tuple[str, ...]] = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qv": ("q_proj", "v_proj"),
}

_MODULE_PARENT = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def linear_shapes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection in one decoder layer."""
    h, i, kv = shape.hidden_size, shape.intermediate_size, shape.kv_dim
    return {
        "q_proj": (h, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, h),
        "gate_proj": (i, h),
        "up_proj": (i, h),
        "down_proj": (h, i),
    }


def tensor_specs(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in LlamaForCausalLM state-dict order."""
    h = shape.hidden_size
    lin = linear_shapes(shape)
    specs: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}"
        for mod in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            specs.append((f"{p}.{_MODULE_PARENT[mod]}.{mod}.weight", lin[mod]))
        specs.append((f"{p}.input_layernorm.weight", (h,)))
        specs.append((f"{p}.post_attention_layernorm.weight", (h,)))
    specs.append(("model.norm.weight", (h,)))
    specs.append(("lm_head.weight", (shape.vocab_size, h)))
    return specs


def checkpoint_bytes(shape: LlamaShape, dtype: torch.dtype = torch.bfloat16) -> int:
    """Sum of tensor bytes (= index.json metadata.total_size)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return sum(math.prod(s) for _, s in tensor_specs(shape)) * itemsize


def plan_shards(
    specs: list[tuple[str, tuple[int, ...]]], itemsize: int, max_shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy packing in state-dict order, like huggingface_hub's split_state_dict_into_shards."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = []
    current: list[tuple[str, tuple[int, ...]]] = []
    size = 0
    for name, shp in specs:
        nbytes = math.prod(shp) * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shp))
        size += nbytes
    if current:
        shards.append(current)
    return shards


def encode_header(tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype) -> tuple[bytes, list]:
    """safetensors header (u64 length + padded JSON) and the tensors in data order (sorted by name)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    ordered = sorted(tensors, key=lambda t: t[0])
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shp in ordered:
        nbytes = math.prod(shp) * itemsize
        header[name] = {"dtype": _DTYPE_CODE[dtype], "shape": list(shp), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def _seed_for(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFF_FFFF_FFFF


def iter_tensor_chunks(
    name: str, shp: tuple[int, ...], dtype: torch.dtype, seed: int, std: float = 0.02
) -> Iterator[torch.Tensor]:
    """Flat chunks of the tensor's values; norms are ones, everything else N(0, std)."""
    numel = math.prod(shp)
    if len(shp) == 1:  # RMSNorm weights
        yield torch.ones(numel, dtype=dtype)
        return
    gen = torch.Generator().manual_seed(_seed_for(seed, name))
    done = 0
    while done < numel:
        n = min(CHUNK_ELEMS, numel - done)
        yield torch.empty(n, dtype=torch.float32).normal_(0.0, std, generator=gen).to(dtype)
        done += n


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, seed: int) -> int:
    """Write one safetensors file chunk by chunk; returns bytes of tensor data."""
    header, ordered = encode_header(tensors, dtype)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with open(tmp, "wb") as f:
        f.write(header)
        for name, shp in ordered:
            for chunk in iter_tensor_chunks(name, shp, dtype, seed):
                buf = chunk.view(torch.uint8).numpy()
                f.write(memoryview(buf))
                written += buf.nbytes
    os.replace(tmp, path)
    return written


def llama_config(shape: LlamaShape, dtype: torch.dtype = torch.bfloat16) -> dict:
    dt = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_scaling": None,
        "rope_theta": shape.rope_theta,
        "tie_word_embeddings": False,
        "torch_dtype": dt,
        "dtype": dt,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def make_base(
    shape: LlamaShape | str,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    seed: int = 0,
    verbose: bool = False,
) -> dict:
    """Write a sharded HF checkpoint of ``shape`` into ``out_dir``; returns a small summary dict."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = plan_shards(tensor_specs(shape), itemsize, max_shard_bytes)
    n = len(shards)
    weight_map: dict[str, str] = {}
    total = 0
    t0 = time.perf_counter()
    for i, tensors in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        total += write_shard(out / fname, tensors, dtype, seed)
        for name, _ in tensors:
            weight_map[name] = fname
        if verbose:
            print(f"  wrote {fname} ({len(tensors)} tensors, {total / 1e9:.2f} GB so far, "
                  f"{time.perf_counter() - t0:.1f}s)", file=sys.stderr)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(llama_config(shape, dtype), indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    return {"shape": shape.name, "dir": str(out), "shards": n, "total_size": total,
            "seconds": round(time.perf_counter() - t0, 2)}


def adapter_config(targets: tuple[str, ...], base_dir: str, r: int, alpha: int) -> dict:
    """A PEFT LoraConfig as written by save_pretrained (the long tail of fields left to PEFT's defaults)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def make_adapter(
    shape: LlamaShape | str,
    targets: str | tuple[str, ...],
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    r: int = 16,
    alpha: int = 32,
    seed: int = 1,
) -> dict:
    """Write a PEFT-format LoRA adapter (fp32, non-zero B) with safetensors directly."""
    from safetensors.torch import save_file

    if isinstance(shape, str):
        shape = SHAPES[shape]
    if isinstance(targets, str):
        targets = ADAPTER_TARGETS[targets]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lin = linear_shapes(shape)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(shape.num_hidden_layers):
        for mod in targets:
            o, i = lin[mod]
            key = f"base_model.model.model.layers.{layer}.{_MODULE_PARENT[mod]}.{mod}"
            gen = torch.Generator().manual_seed(_seed_for(seed, key))
            # A like PEFT's kaiming-uniform init; B non-zero (as after training), small.
            bound = 1.0 / math.sqrt(i)
            tensors[f"{key}.lora_A.weight"] = torch.empty(r, i).uniform_(-bound, bound, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.empty(o, r).normal_(0.0, 0.01, generator=gen)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = adapter_config(targets, str(Path(base_dir).resolve()), r, alpha)
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"dir": str(out), "pairs": len(tensors) // 2, "bytes": nbytes}


def case_paths(case: str, root: str | os.PathLike) -> dict[str, Path]:
    base = Path(root) / case
    return {"base": base / "base", **{name: base / f"lora-{name}" for name in ADAPTER_TARGETS}}


def make_case(case: str, root: str | os.PathLike, *, force: bool = False, verbose: bool = True) -> dict[str, Path]:
    """Base + every adapter for ``case`` under ``root/case/``; skips what already exists unless ``force``."""
    paths = case_paths(case, root)
    if force or not (paths["base"] / "model.safetensors.index.json").exists():
        info = make_base(case, paths["base"], verbose=verbose)
        if verbose:
            print(f"base {case}: {info}", file=sys.stderr)
    for name in ADAPTER_TARGETS:
        if force or not (paths[name] / "adapter_config.json").exists():
            info = make_adapter(case, name, paths["base"], paths[name])
            if verbose:
                print(f"adapter {case}/{name}: {info}", file=sys.stderr)
    return paths


def _sizes() -> None:
    for name, shape in SHAPES.items():
        specs = tensor_specs(shape)
        params = sum(math.prod(s) for _, s in specs)
        nbytes = checkpoint_bytes(shape)
        shards = plan_shards(specs, 2, DEFAULT_MAX_SHARD_BYTES)
        print(f"{name:16s} params={params:>14,d} bf16 bytes={nbytes:>15,d} ({nbytes / 1e9:.3f} GB, "
              f"{nbytes / 2**30:.3f} GiB) shards={len(shards)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base", help="write a base checkpoint")
    b.add_argument("shape", choices=sorted(SHAPES))
    b.add_argument("out")
    b.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    b.add_argument("--seed", type=int, default=0)
    a = sub.add_parser("adapter", help="write a PEFT LoRA adapter for a base")
    a.add_argument("shape", choices=sorted(SHAPES))
    a.add_argument("targets", choices=sorted(ADAPTER_TARGETS))
    a.add_argument("base")
    a.add_argument("out")
    a.add_argument("-r", type=int, default=16)
    a.add_argument("--alpha", type=int, default=32)
    c = sub.add_parser("case", help="base + all adapters under ROOT/CASE/")
    c.add_argument("case", choices=sorted(SHAPES))
    c.add_argument("--root", default="/tmp/smbench")
    c.add_argument("--force", action="store_true")
    sub.add_parser("sizes", help="print exact sizes of every shape")
    args = ap.parse_args(argv)
    if args.cmd == "base":
        print(json.dumps(make_base(args.shape, args.out, max_shard_bytes=args.max_shard_bytes,
                                   seed=args.seed, verbose=True)))
    elif args.cmd == "adapter":
        print(json.dumps(make_adapter(args.shape, args.targets, args.base, args.out, r=args.r, alpha=args.alpha)))
    elif args.cmd == "case":
        print(json.dumps({k: str(v) for k, v in make_case(args.case, args.root, force=args.force).items()}))
    else:
        _sizes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
