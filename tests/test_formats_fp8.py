"""FP8 codecs against the reference implementations, and format detection / malformed-input refusals.

References (all run on CPU): transformers' ``Fp8Dequantize._dequantize_one`` (block FP8 when the shape
divides into blocks), compressed-tensors' ``FP8BlockDequantizer`` (block FP8, partial edge blocks) and
compressed-tensors' ``dequantize`` (float-quantized per tensor / channel / block, in the scale dtype).
"""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle import forward as ct_forward
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.integrations.finegrained_fp8 import Fp8Dequantize

from streammerge.errors import CheckpointError
from streammerge.formats import blockfp8, fp8, registry
from streammerge.formats.base import CODES, SCALE, grid
from streammerge.formats.safetensors import TensorInfo

SCALE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _weights(seed: int, shape: tuple[int, int], dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # a few outliers and an all-zero region, as real weights have
    w.view(-1)[:: max(1, w.numel() // 7)] *= 40
    if shape[0] > 3:
        w[: shape[0] // 3, : shape[1] // 3] = 0
    return w.to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))
blocks = st.sampled_from([(128, 128), (64, 32), (16, 16), (1, 128), (32, 1)])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, block=blocks, seed=st.integers(0, 2**16), out=st.sampled_from([torch.bfloat16, torch.float16]))
def test_block_dequant_matches_compressed_tensors_reference(shape, block, seed, out):
    q, s = fp8.encode(_weights(seed, shape), block, torch.float32, 1.0)
    assert s.shape == grid(shape, block) and s.dtype == torch.float32 and q.dtype == torch.float8_e4m3fn
    ref = FP8BlockDequantizer(weight_block_size=block, dtype=out)._create_dequantized_weight(q, s)
    assert torch.equal(_bits(fp8.dequantize(q, s, block, out)), _bits(ref))


@settings(max_examples=25, deadline=None)
@given(g=st.tuples(st.integers(1, 3), st.integers(1, 3)), block=blocks, seed=st.integers(0, 2**16))
def test_block_dequant_matches_transformers_when_blocks_divide(g, block, seed):
    shape = (g[0] * block[0], g[1] * block[1])
    q, s = fp8.encode(_weights(seed, shape), block, torch.float32, 1.0)
    ref = Fp8Dequantize.__new__(Fp8Dequantize)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(_bits(fp8.dequantize(q, s, block, torch.bfloat16)), _bits(ref))


def test_transformers_derives_the_block_from_the_grid_so_partial_edges_differ():
    """Why the block-FP8 reference for partial edge blocks is DeepSeek's / compressed-tensors', not transformers':
    transformers takes block = rows // grid rows, so a 200-row weight with 128-row blocks (grid 2) is read as
    100-row blocks. Documented here so a change in transformers shows up."""
    q, s = fp8.encode(_weights(1, (200, 256)), (128, 128), torch.float32, 1.0)
    ref = Fp8Dequantize.__new__(Fp8Dequantize)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    ours = fp8.dequantize(q, s, (128, 128), torch.bfloat16)
    assert torch.equal(ours[:100], ref[:100]) and not torch.equal(ours[100:128], ref[100:128])


@pytest.mark.parametrize("scale_dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("strategy", ["tensor", "channel", "block"])
@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (1, 7)])
def test_compressed_dequant_matches_compressed_tensors(strategy, scale_dtype, shape):
    sd = SCALE_DTYPES[scale_dtype]
    block = {"tensor": shape, "channel": (1, shape[1]), "block": (128, 128)}[strategy]
    q, s = fp8.encode(_weights(3, shape), block, sd, torch.finfo(sd).eps)
    stored = s.reshape(1) if strategy == "tensor" else s
    args = QuantizationArgs(num_bits=8, type="float", strategy=strategy, symmetric=True,
                            block_structure=[128, 128] if strategy == "block" else None)
    ref = ct_forward.dequantize(q, stored, args=args)  # in the scale dtype, as compressed-tensors computes it
    assert ref.dtype == sd
    ours = fp8.dequantize(q, s, block, torch.bfloat16, product_dtype=sd)
    assert torch.equal(_bits(ours), _bits(ref.to(torch.bfloat16)))


@settings(max_examples=25, deadline=None)
@given(shape=shapes, block=blocks, seed=st.integers(0, 2**16),
       scale_dtype=st.sampled_from(["F32", "BF16", "F16"]))
def test_encode_is_within_half_a_step_of_every_element(shape, block, seed, scale_dtype):
    """|dequant(encode(w)) − w| ≤ ½ E4M3 step · s per element (the fp32 quotient w/s adds ≤ 2^-24 relative)."""
    w = _weights(seed, shape)
    q, s = fp8.encode(w, block, SCALE_DTYPES[scale_dtype], 1.0)
    back = fp8.dequantize(q, s, block, torch.float64)  # the exact grid value (fp32 product, 4×24 bits)
    err = (back - w.double()).abs()
    bound = fp8.half_step(w, s, block) * (1 + 2.0**-20) + back.abs() * 2.0**-24
    assert bool((err <= bound).all()), float((err / bound).max())
    # fresh scales: the smallest stored value ≥ amax / 448 per cell (amax / 448 itself in fp32), 1.0 for zeros
    amax = fp8.amax_cells(w, block)
    exact = amax / 448
    sd = SCALE_DTYPES[scale_dtype]
    nonzero = amax > 0
    assert bool((s[~nonzero] == 1).all()) and bool((s[nonzero].float() >= exact[nonzero]).all())
    below = torch.nextafter(s, torch.zeros_like(s)).float()
    assert bool((below[nonzero] < exact[nonzero]).all())
    if sd == torch.float32:
        assert torch.equal(s[nonzero], exact[nonzero])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, block=blocks, seed=st.integers(0, 2**16))
def test_ue8m0_scales_are_powers_of_two_and_keep_the_bound(shape, block, seed):
    """``scale_fmt: ue8m0`` (DeepSeek-V3.1): fresh scales are the smallest power of two ≥ amax / 448."""
    w = _weights(seed, shape)
    q, s = fp8.encode(w, block, torch.float32, 1.0, pow2=True)
    mantissa, _ = torch.frexp(s)
    assert bool((mantissa == 0.5).all())
    exact = fp8.amax_cells(w, block) / 448
    nonzero = exact > 0
    assert bool((s[nonzero] >= exact[nonzero]).all()) and bool((s[nonzero] / 2 < exact[nonzero]).all())
    back = fp8.dequantize(q, s, block, torch.float64)
    bound = fp8.half_step(w, s, block) * (1 + 2.0**-20) + back.abs() * 2.0**-24
    assert bool(((back - w.double()).abs() <= bound).all())


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 400), cols=st.integers(1, 200), b0=st.sampled_from([1, 16, 128]),
       cut=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_row_blocks_decode_and_encode_as_the_whole(rows, cols, b0, cut, seed):
    """Blocks starting at multiples of the cell height give the whole tensor's codes and scales."""
    block = (b0, 64)
    w = _weights(seed, (rows, cols))
    q, s = fp8.encode(w, block, torch.float32, 1.0)
    step = b0 * cut
    layout, codec = blockfp8.BlockFP8(), fp8.FP8Codec()
    qw = _qw(layout, (rows, cols), block)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        s0, s1 = layout.rows(qw, SCALE, r0, r1)
        got = codec.encode(qw, w[r0:r1])
        assert torch.equal(_bits(got[CODES]), _bits(q[r0:r1])) and torch.equal(got[SCALE], s[s0:s1])
        dec = codec.decode(qw, {CODES: q[r0:r1], SCALE: s[s0:s1]}, torch.bfloat16)
        assert torch.equal(_bits(dec), _bits(fp8.dequantize(q, s, block, torch.bfloat16)[r0:r1]))


def _qw(fmt, shape, block):
    infos = _infos({"m.weight": ("F8_E4M3", shape), "m.weight_scale_inv": ("F32", grid(shape, block))})
    return fmt.index({"quant_method": "fp8", "weight_block_size": list(block)}, infos, "cfg").weights["m.weight"]


def _infos(spec: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, d, tuple(s), 0, math.prod(s)) for n, (d, s) in spec.items()}


FP8_CFG = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}


def _ct_cfg(strategy="channel", fmt="float-quantized", **weights):
    w = {"num_bits": 8, "type": "float", "strategy": strategy, "symmetric": True,
         "block_structure": [128, 128] if strategy == "block" else None, **weights}
    return {"quantization_config": {"quant_method": "compressed-tensors", "format": fmt, "ignore": ["lm_head"],
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": w}}}}


def test_detect_plain_and_fp8_block():
    plain = _infos({"m.weight": ("BF16", (4, 4))})
    assert registry.detect({}, plain, "cfg") is None
    idx = registry.detect(FP8_CFG, _infos({"m.weight": ("F8_E4M3", (300, 200)), "m.weight_scale_inv": ("F32", (3, 2)),
                                           "n.weight": ("BF16", (4, 4))}), "cfg")
    assert idx.format == "fp8-block" and list(idx.weights) == ["m.weight"]
    qw = idx.weights["m.weight"]
    assert qw.companions == ("m.weight_scale_inv",) and qw.scheme.block == (128, 128) and qw.scheme.row_align == 128
    assert not qw.scheme.pow2_scale
    ue8m0 = {"quantization_config": {**FP8_CFG["quantization_config"], "scale_fmt": "ue8m0"}}
    infos = _infos({"m.weight": ("F8_E4M3", (300, 200)), "m.weight_scale_inv": ("F32", (3, 2))})
    assert registry.detect(ue8m0, infos, "cfg").weights["m.weight"].scheme.pow2_scale


@pytest.mark.parametrize("strategy,scale_shape,block", [("tensor", (1,), (300, 200)), ("channel", (300, 1), (1, 200)),
                                                       ("block", (3, 2), (128, 128))])
def test_detect_compressed_strategies(strategy, scale_shape, block):
    infos = _infos({"m.weight": ("F8_E4M3", (300, 200)), "m.weight_scale": ("BF16", scale_shape),
                    "m.input_scale": ("BF16", (1,)), "lm_head.weight": ("BF16", (10, 200))})
    idx = registry.detect(_ct_cfg(strategy), infos, "cfg")
    qw = idx.weights["m.weight"]
    assert idx.format == "compressed-fp8" and qw.scheme.strategy == strategy and qw.scheme.block == block
    assert qw.scheme.product_dtype == "BF16" and "m.input_scale" not in idx.companion_of()


BAD = [
    ("missing scale", FP8_CFG, {"m.weight": ("F8_E4M3", (256, 256))},
     "cfg: FP8 tensor 'm.weight' has no 'm.weight_scale_inv' in any shard; without its scale it cannot be "
     "dequantized: the checkpoint is incomplete, re-download it"),
    ("wrong scale shape", FP8_CFG, {"m.weight": ("F8_E4M3", (300, 256)), "m.weight_scale_inv": ("F32", (2, 2))},
     "cfg: scale 'm.weight_scale_inv' has shape [2, 2], but weight 'm.weight' [300, 256] with block scales of "
     "[128, 128] needs [3, 2]; the checkpoint is corrupt or its quantization_config is wrong"),
    ("scale without weight", FP8_CFG, {"m.weight_scale_inv": ("F32", (2, 2))},
     "cfg: tensor 'm.weight_scale_inv' is a block-FP8 scale but its weight 'm.weight' is in no shard; "
     "the checkpoint is incomplete: re-download it"),
    ("wrong scale dtype", FP8_CFG, {"m.weight": ("F8_E4M3", (128, 128)), "m.weight_scale_inv": ("I32", (1, 1))},
     "cfg: scale 'm.weight_scale_inv' is I32; streammerge reads FP8 scales in BF16, F16, F32: merge into the "
     "16-bit base instead"),
    ("unknown quant_method", {"quantization_config": {"quant_method": "nf9"}}, {"m.weight": ("BF16", (4, 4))},
     "cfg: quantization_config.quant_method='nf9' is not a quantization format streammerge knows (known: aqlm, "
     "awq, bitsandbytes, compressed-tensors, eetq, fbgemm_fp8, fp8, gptq, hqq, mxfp4, quanto, torchao); fix "
     "config.json or use the 16-bit base"),
    ("mixed formats", FP8_CFG, {"m.weight": ("F8_E4M3", (128, 128)), "m.weight_scale_inv": ("F32", (1, 1)),
                                "k.qweight": ("I32", (16, 128))},
     "cfg: tensor 'k.qweight' is GPTQ/AWQ storage, but quantization_config says 'fp8' (fp8-block); mixed "
     "quantization formats are not supported: use one consistent checkpoint"),
    ("mixed fp8 conventions", FP8_CFG, {"m.weight": ("F8_E4M3", (128, 128)), "m.weight_scale_inv": ("F32", (1, 1)),
                                        "k.weight_scale": ("F32", (1,))},
     "cfg: tensor 'k.weight_scale' is compressed-tensors storage, but quantization_config says 'fp8' (fp8-block); "
     "mixed quantization formats are not supported: use one consistent checkpoint"),
    ("quantized without config", {}, {"m.weight": ("F8_E4M3", (4, 4))},
     "cfg: tensor 'm.weight' looks FP8-quantized but config.json has no quantization_config; restore the "
     "model's config.json (it says how to dequantize) or use the 16-bit base"),
    ("compressed pack-quantized", _ct_cfg(fmt="pack-quantized"), {"m.weight_packed": ("I32", (4, 4))},
     "cfg: compressed-tensors format ['pack-quantized'] is not supported (streammerge reads 'float-quantized' FP8); "
     "merge into the 16-bit base, or dequantize the checkpoint first"),
    ("compressed wrong scale", _ct_cfg("channel"), {"m.weight": ("F8_E4M3", (300, 200)),
                                                    "m.weight_scale": ("BF16", (200, 1))},
     "cfg: scale 'm.weight_scale' has shape [200, 1], but weight 'm.weight' [300, 200] with channel scales needs "
     "[300, 1]; the checkpoint is corrupt or its quantization_config is wrong"),
    ("compressed int8", _ct_cfg(type="int"), {"m.weight": ("I8", (4, 4)), "m.weight_scale": ("BF16", (4, 1))},
     "cfg: config group 'group_0' quantizes weights to 8-bit int (symmetric=True); streammerge merges into "
     "symmetric FP8 float-quantized weights only: merge into the 16-bit base instead"),
]


@pytest.mark.parametrize("config,spec,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_malformed_quantized_input_is_refused_by_name(config, spec, message):
    with pytest.raises(CheckpointError) as e:
        registry.detect(config, _infos(spec), "cfg")
    assert str(e.value) == message
