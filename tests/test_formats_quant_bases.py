"""MXFP4, bitsandbytes, GPTQ and AWQ through the format protocol, on real checkpoint directories.

Each base is written the way its ecosystem writes it (tests/quant_bases.py): transformers' own bitsandbytes
quantization on CPU, a GPT-OSS MXFP4 checkpoint that transformers loads, GPTQ/AWQ tensors packed from the
spec. ``registry.detect`` indexes it from headers (plus bitsandbytes' small JSON states), then every weight
is decoded row block by row block exactly as the executor asks (``rows`` per part, blocks at multiples of
``row_align``) and compared bit for bit with what transformers loads (``Mxfp4Config(dequantize=True)``,
``model.dequantize()``) or with the reference unpack.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import quant_bases as qb
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from streammerge.errors import CheckpointError, PlanError
from streammerge.formats import registry
from streammerge.formats.base import QuantIndex, QuantizedWeight
from streammerge.formats.codecs import codec_for
from streammerge.formats.safetensors import read_header


def _open(base: Path):
    header = read_header(base / "model.safetensors")
    tensors = {t.name: t for t in header.tensors}
    config = json.loads((base / "config.json").read_text())
    return config, tensors


def _detect(base: Path) -> QuantIndex:
    config, tensors = _open(base)
    with safe_open(base / "model.safetensors", "pt") as f:
        return registry.detect(config, tensors, str(base / "config.json"),
                               read=lambda name: f.get_tensor(name).numpy().tobytes())


def _decode(base: Path, index: QuantIndex, qw: QuantizedWeight, out_dtype: torch.dtype, blocks: int = 1):
    """The whole weight, decoded in row blocks of ``blocks · row_align`` rows, parts sliced by ``rows``."""
    fmt = next(f for f in registry.FORMATS if f.name == index.format)
    rows = qw.shape[0]  # a 3-D weight's rows are experts
    step = blocks * qw.scheme.row_align
    out = []
    with safe_open(base / "model.safetensors", "pt") as f:
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            parts = {}
            for role, name in qw.parts:
                a, b = fmt.rows(qw, role, r0, r1)
                sl = f.get_slice(name)
                parts[role] = f.get_tensor(name) if not sl.get_shape() else sl[a:b]
            codec = codec_for(qw.scheme.format)
            if hasattr(codec, "decode_rows"):  # GPTQ/AWQ: whole parts, the codec slices the rows
                out.append(codec.decode_rows(qw, parts, out_dtype, r0, r1))
            else:
                out.append(codec.decode(qw, parts, out_dtype))
    w = torch.cat(out)
    return w.reshape(qw.shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


# ---------------------------------------------------------------- MXFP4 (GPT-OSS)


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory) -> Path:
    return qb.make_gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "base")


def test_mxfp4_index_and_decode_match_transformers(gpt_oss):
    index = _detect(gpt_oss)
    assert index.format == "mxfp4"
    names = sorted(index.weights)
    assert names == [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("down_proj", "gate_up_proj")]
    model = qb.load_gpt_oss_dequantized(gpt_oss)
    params = dict(model.named_parameters())
    for name in names:
        qw = index.weights[name]
        assert qw.shape == tuple(params[name].shape)  # (E, H, 2I) / (E, I, H): the in-memory layout
        assert dict(qw.parts) == {"weight": name + "_blocks", "scales": name + "_scales"}
        for blocks in (1, 3):  # one expert per block, and blocks of 3 experts with a short last one
            got = _decode(gpt_oss, index, qw, torch.bfloat16, blocks)
            assert torch.equal(_bits(got), _bits(params[name].data)), name


def test_mxfp4_keep_format_config_and_siblings(gpt_oss):
    index = _detect(gpt_oss)
    fmt = registry.FORMATS[[f.name for f in registry.FORMATS].index("mxfp4")]
    gate_up = "model.layers.1.mlp.experts.gate_up_proj"
    assert fmt.written_together(index, gate_up) == ("model.layers.1.mlp.experts.down_proj", gate_up)
    assert fmt.output_config(index.config, True, frozenset({gate_up})) is None
    kept = fmt.output_config(index.config, False, frozenset({gate_up}))
    assert kept == {"quant_method": "mxfp4",
                    "modules_to_not_convert": [*qb.GPT_OSS_MODULES_TO_NOT_CONVERT, "model.layers.1.mlp.experts"]}


def test_mixed_mxfp4_checkpoint_loads_in_transformers(gpt_oss, tmp_path):
    """What keep-format writes (a touched experts module in bf16, declared unconverted) is what transformers loads."""
    sd = load_file(gpt_oss / "model.safetensors")
    index = _detect(gpt_oss)
    plain = {}
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        qw = index.weights[name]
        plain[name] = (_decode(gpt_oss, index, qw, torch.bfloat16) + 0.125).to(torch.bfloat16)  # "merged"
        for _, part in qw.parts:
            del sd[part]
    (tmp_path / "mixed").mkdir()
    save_file(sd | plain, tmp_path / "mixed" / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((gpt_oss / "config.json").read_text())
    fmt = next(f for f in registry.FORMATS if f.name == "mxfp4")
    cfg["quantization_config"] = fmt.output_config(index.config, False, frozenset(plain))
    (tmp_path / "mixed" / "config.json").write_text(json.dumps(cfg))
    loaded = dict(qb.load_gpt_oss_dequantized(tmp_path / "mixed").named_parameters())
    for name, t in plain.items():
        assert torch.equal(loaded[name].data, t)
    untouched = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.equal(loaded[untouched].data, _decode(gpt_oss, index, index.weights[untouched], torch.bfloat16))


# ---------------------------------------------------------------- bitsandbytes


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory) -> Path:
    """Linear widths are multiples of 64 (every real model's are): bitsandbytes 0.50.2's native CPU kernel, which
    transformers' ``dequantize()`` runs, misplaces absmax blocks otherwise (see test_formats_quant)."""
    root = tmp_path_factory.mktemp("llama") / "bf16"
    torch.manual_seed(qb.SEED)
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(root)
    return root


@pytest.mark.parametrize("kind", list(qb.BNB_KINDS))
def test_bnb_decode_matches_transformers_dequantize(kind, llama_bf16, tmp_path):
    base = qb.make_bnb(llama_bf16, tmp_path / kind, kind)
    index = _detect(base)
    assert index.format == "bitsandbytes"
    ref = {k: v for k, v in qb.load_bnb_dequantized(base).state_dict().items()}
    linears = [k for k in ref if k.endswith("proj.weight")]
    assert sorted(index.weights) == sorted(linears)
    for name in linears:
        qw = index.weights[name]
        assert qw.shape == tuple(ref[name].shape)
        for blocks in (1, 5):
            got = _decode(base, index, qw, torch.bfloat16, blocks)
            assert torch.equal(_bits(got), _bits(ref[name])), (name, blocks)


def test_bnb_keep_format_is_refused(llama_bf16, tmp_path):
    index = _detect(qb.make_bnb(llama_bf16, tmp_path / "nf4", "nf4"))
    fmt = next(f for f in registry.FORMATS if f.name == "bitsandbytes")
    assert fmt.output_config(index.config, True, frozenset()) is None
    with pytest.raises(PlanError, match=r"pass --dequantize.*merge into the original 16-bit model"):
        fmt.output_config(index.config, False, frozenset(index.weights))


# ---------------------------------------------------------------- GPTQ / AWQ


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_int4_decode_matches_reference_unpack(method, llama_bf16, tmp_path):
    base, ref = qb.make_int4(llama_bf16, tmp_path / method, method)
    index = _detect(base)
    assert index.format == method
    linears = sorted(k for k in ref if k.endswith("proj.weight"))
    assert sorted(index.weights) == linears
    for name in linears:
        for blocks in (1, 24):  # a row at a time, and 24-row blocks (a short last one)
            got = _decode(base, index, index.weights[name], torch.bfloat16, blocks)
            assert torch.equal(_bits(got), _bits(ref[name])), name
    fmt = next(f for f in registry.FORMATS if f.name == method)
    with pytest.raises(PlanError, match=f"a {method.upper()} base cannot keep its format.*--dequantize"):
        fmt.output_config(index.config, False, frozenset())


# ---------------------------------------------------------------- malformed inputs: one line naming the tensor


def _headers_only(tensors: dict[str, tuple[str, tuple[int, ...]]]):
    from streammerge.formats.safetensors import TensorInfo

    return {n: TensorInfo(n, d, s, 0, 0) for n, (d, s) in tensors.items()}


MX = {"quantization_config": {"quant_method": "mxfp4"}}
GPTQ_CFG = {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 32}}
E = "model.layers.0.mlp.experts.gate_up_proj"
MALFORMED = [
    ("mxfp4 missing scales", MX, {E + "_blocks": ("U8", (2, 8, 2, 16))},
     f"cfg: MXFP4 tensor '{E}_blocks' has no '{E}_scales' in any shard"),
    ("mxfp4 scales without blocks", MX, {E + "_scales": ("U8", (2, 8, 2))},
     f"cfg: tensor '{E}_scales' is an MXFP4 scale but its blocks '{E}_blocks' are in no shard"),
    ("mxfp4 wrong scale shape", MX, {E + "_blocks": ("U8", (2, 8, 2, 16)), E + "_scales": ("U8", (2, 8, 3))},
     f"cfg: MXFP4 tensor '{E}_blocks': scales shape (2, 8, 3) should be (2, 8, 2) (one per 32-value group)"),
    ("mxfp4 wrong dtype", MX, {E + "_blocks": ("U8", (2, 8, 2, 16)), E + "_scales": ("F32", (2, 8, 2))},
     f"cfg: MXFP4 tensor '{E}_blocks': blocks are U8 and scales F32, both should be U8"),
    ("mxfp4 mixed with bnb", MX, {E + "_blocks": ("U8", (2, 8, 2, 16)), E + "_scales": ("U8", (2, 8, 2)),
                                  "m.SCB": ("F32", (4,))},
     "cfg: tensor 'm.SCB' is bitsandbytes 8-bit storage, but quantization_config says 'mxfp4' (mxfp4); mixed "
     "quantization formats are not supported"),
    ("gptq missing qzeros", GPTQ_CFG, {"m.qweight": ("I32", (8, 16)), "m.scales": ("F16", (2, 16))},
     "cfg: GPTQ tensor 'm.qweight' comes without 'm.qzeros'"),
    ("gptq wrong scales", GPTQ_CFG, {"m.qweight": ("I32", (8, 16)), "m.qzeros": ("I32", (2, 2)),
                                     "m.scales": ("F16", (3, 16))},
     "cfg: GPTQ tensor 'm.scales' is F16 [3, 16], expected F16/BF16/F32 [2, 16] for bits=4, group_size=32"),
    ("gptq wrong g_idx", GPTQ_CFG, {"m.qweight": ("I32", (8, 16)), "m.qzeros": ("I32", (2, 2)),
                                    "m.scales": ("F16", (2, 16)), "m.g_idx": ("I32", (63,))},
     "cfg: GPTQ tensor 'm.g_idx' is I32 [63], expected I32 [64]"),
    ("gptq 3-bit", {"quantization_config": {"quant_method": "gptq", "bits": 3}}, {"m.qweight": ("I32", (8, 16))},
     "cfg: quantization_config bits=3, group_size=None: streammerge reads 2/4/8-bit GPTQ"),
    ("awq gemv", {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemv"}},
     {"m.qweight": ("I32", (8, 16))}, "cfg: quantization_config bits=4, group_size=32, version='gemv'"),
    ("mxfp4 config, no blocks", MX, {"m.weight": ("BF16", (4, 4))},
     "cfg: quantization_config.quant_method='mxfp4', but no tensor is stored that way (no '*_blocks' tensor)"),
    ("bnb 8-bit wrong SCB", {"quantization_config": {"quant_method": "bitsandbytes"}},
     {"m.weight": ("I8", (4, 8)), "m.SCB": ("F32", (8,))},
     "cfg: bitsandbytes tensor 'm.SCB': is F32 [8], expected F32 [4] (one per row)"),
    ("bnb 4-bit orphan absmax", {"quantization_config": {"quant_method": "bitsandbytes"}},
     {"m.weight": ("U8", (8, 1)), "m.weight.absmax": ("F32", (1,))},
     "cfg: tensor 'm.weight.absmax' is bitsandbytes 4-bit state, but its weight has no"),
]


@pytest.mark.parametrize(("config", "tensors", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_quantized_input_is_refused_by_name(config, tensors, message):
    with pytest.raises(CheckpointError) as e:
        registry.detect(config, _headers_only(tensors), "cfg", read=lambda name: b"")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_bnb_malformed_state_is_refused_by_name(llama_bf16, tmp_path):
    base = qb.make_bnb(llama_bf16, tmp_path / "nf4", "nf4")
    config, tensors = _open(base)
    state = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    bad = json.dumps({"quant_type": "nf4", "blocksize": 65, "dtype": "bfloat16", "shape": [64, 64]}).encode()
    with safe_open(base / "model.safetensors", "pt") as f, pytest.raises(CheckpointError) as e:
        registry.detect(config, tensors, "cfg",
                        read=lambda name: bad if name == state else f.get_tensor(name).numpy().tobytes())
    assert str(e.value).startswith(f"cfg: bitsandbytes tensor '{state}': has blocksize 65; ")
    missing = {k: v for k, v in tensors.items() if k != "model.layers.0.self_attn.q_proj.weight.absmax"}
    with safe_open(base / "model.safetensors", "pt") as f, pytest.raises(CheckpointError) as e:
        registry.detect(config, missing, "cfg", read=lambda name: f.get_tensor(name).numpy().tobytes())
    assert str(e.value).startswith("cfg: bitsandbytes tensor 'model.layers.0.self_attn.q_proj.weight.absmax': is "
                                   "missing (needed by 'model.layers.0.self_attn.q_proj.weight.quant_state.")
