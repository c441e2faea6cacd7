"""The 4-bit / 8-bit decoders of streammerge.formats.{mxfp4,bnb,gptq} against the formats' references.

* MXFP4: transformers' ``convert_moe_packed_tensors`` (what ``Mxfp4Config(dequantize=True)`` loads).
* bitsandbytes: ``bitsandbytes.functional.dequantize_4bit`` / ``int8_vectorwise_dequant`` on CPU, on tensors
  quantized by bitsandbytes itself and serialized as ``Linear4bit`` does (``QuantState.as_dict(packed=True)``).
* GPTQ / AWQ (no CPU library): a quantizer written here from the format's specification and the reference
  unpack of AutoGPTQ (``qlinear_cuda_old``) / AutoAWQ (``dequantize_gemm``) transcribed whole-tensor.

Every check is bit-exact on row blocks drawn by hypothesis, the way the merge streams them.
"""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import quant_bases as qb
import torch
from bitsandbytes.backends.default import ops as bnb_default_ops
from hypothesis import given
from hypothesis import strategies as st
from transformers.integrations import mxfp4 as hf_mxfp4

from streammerge.formats import bnb, bnb_layout, gptq, gptq_layout, mxfp4, mxfp4_layout

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Bit pattern, so that -0.0 vs 0.0 and NaN payloads count."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


# ---------------------------------------------------------------- MXFP4


def test_fp4_table_is_transformers():
    assert tuple(hf_mxfp4.FP4_VALUES) == mxfp4.FP4_E2M1


@given(
    experts=st.integers(1, 3), rows=st.integers(1, 9), groups=st.integers(1, 4),
    dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16), data=st.data(),
)
def test_mxfp4_param_rows_match_transformers(experts, rows, groups, dtype, seed, data):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), dtype=torch.uint8, generator=g)
    # exponents around 1 plus the extremes (2^-127 and 2^127; 255 gives inf in transformers too)
    scales = torch.randint(118, 136, (experts, rows, groups), dtype=torch.uint8, generator=g)
    scales.view(-1)[0] = data.draw(st.sampled_from([0, 1, 127, 254, 255]))
    ref = hf_mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # (E, G·32, R)
    assert ref.shape == mxfp4_layout.param_shape(tuple(blocks.shape))
    e = data.draw(st.integers(0, experts - 1))
    r0 = data.draw(st.integers(0, groups * 32 - 1))
    r1 = data.draw(st.integers(r0 + 1, groups * 32))
    got = mxfp4.param_rows(blocks[e], scales[e], r0, r1, dtype)
    assert got.dtype == dtype and got.is_contiguous()
    assert torch.equal(_bits(got), _bits(ref[e, r0:r1]))


def test_mxfp4_disk_layout_and_nibble_order():
    # one group: byte k = (hi << 4) | lo holds values 2k (lo) and 2k+1 (hi); scale 128 doubles them
    lo, hi = torch.arange(16) % 16, (torch.arange(16) + 3) % 16
    blocks = ((hi << 4) | lo).to(torch.uint8).reshape(1, 1, 16)
    got = mxfp4.dequantize(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)
    want = torch.stack([torch.tensor(mxfp4.FP4_E2M1)[lo], torch.tensor(mxfp4.FP4_E2M1)[hi]], 1).reshape(1, 32) * 2
    assert torch.equal(got, want)


def test_mxfp4_check_pair():
    assert mxfp4_layout.check_pair((2, 6, 3, 16), (2, 6, 3)) is None
    assert "should be (2, 6, 3)" in mxfp4_layout.check_pair((2, 6, 3, 16), (2, 6, 4))
    assert "should be (..., rows, groups, 16)" in mxfp4_layout.check_pair((2, 6, 3, 8), (2, 6, 3))


# ---------------------------------------------------------------- bitsandbytes 4-bit


def _bnb_serialized(w: torch.Tensor, quant_type: str, blocksize: int, nested: bool):
    """Quantize with bitsandbytes and serialize as ``Linear4bit._save_to_state_dict`` does (weight + state dict)."""
    packed, state = bnbf.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return packed, state, state.as_dict(packed=True)


def test_bnb_code_tables_are_bitsandbytes():
    for qt in bnb_layout.QUANT_TYPES:
        assert torch.equal(_bits(bnb.code_table(qt)), _bits(bnbf.get_4bit_type(qt, device="cpu")))


def _bnb_reference_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """``bitsandbytes.functional.dequantize_4bit`` where its CPU kernel is right; else bitsandbytes' own torch
    backend (``backends/default/ops.py::_dequantize_4bit_compute``, what CUDA-less, odd-width and torch paths run).

    bitsandbytes 0.50.2's native CPU kernel (even widths) picks the wrong absmax once a row's length is not a
    multiple of ``blocksize`` (blocks then straddle rows): it disagrees with its own quantizer, its torch backend
    and CUDA. Real Linear widths are multiples of 64, where both agree (checked below on every such draw)."""
    out_cols = state.shape[-1]
    torch_ref = bnb_default_ops._dequantize_4bit_compute.__wrapped__(  # uncompiled: same ops, no recompiles
        packed.reshape(-1), state.absmax if not state.nested else bnbf.dequantize_blockwise(
            state.absmax, state.state2) + state.offset, bnbf.get_4bit_type(state.quant_type, device="cpu"),
        state.blocksize, state.shape, state.dtype)
    if out_cols % 2 == 0 and out_cols % state.blocksize == 0:
        public = bnbf.dequantize_4bit(packed, state)
        assert torch.equal(_bits(public), _bits(torch_ref))
        return public
    return torch_ref


@given(
    out=st.integers(1, 24), inp=st.one_of(st.integers(1, 80), st.sampled_from((64, 128, 256))),
    quant_type=st.sampled_from(bnb_layout.QUANT_TYPES),
    dtype=st.sampled_from(DTYPES), nested=st.booleans(), blocksize=st.sampled_from((32, 64, 128)),
    seed=st.integers(0, 2**16), data=st.data(),
)
def test_bnb_4bit_rows_match_bitsandbytes(out, inp, quant_type, dtype, nested, blocksize, seed, data):
    w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)
    packed, state, saved = _bnb_serialized(w, quant_type, blocksize, nested)
    ref = _bnb_reference_4bit(packed, state)
    assert ref.dtype == dtype
    s = bnb_layout.parse_state(bytes(saved[f"{bnb_layout.STATE_KEY}{quant_type}"].numpy()))
    assert (s.quant_type, s.blocksize, s.shape, s.nested, s.dtype) == (
        quant_type, blocksize, (out, inp), nested, str(dtype).removeprefix("torch."))
    absmax = bnb.absmax_f32(s, saved["absmax"], saved.get("nested_absmax"), saved.get("nested_quant_map"))
    r0 = data.draw(st.integers(0, out - 1))
    r1 = data.draw(st.integers(r0 + 1, out))
    b0, b1 = bnb_layout.byte_range(r0 * inp, (r1 - r0) * inp)
    got = bnb.dequantize_4bit(packed.reshape(-1)[b0:b1], absmax, s, r0 * inp, (r1 - r0) * inp, dtype)
    assert torch.equal(_bits(got.reshape(r1 - r0, inp)), _bits(ref[r0:r1]))


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        (b"not json", "is not bitsandbytes' packed JSON"),
        (b'{"quant_type": "int4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 2]}', "quant_type 'int4'"),
        (b'{"quant_type": "nf4", "blocksize": 65, "dtype": "bfloat16", "shape": [2, 2]}', "blocksize 65"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2, 2]}', "dtype 'int8'"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": []}', "shape []"),
        (b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [2], "nested_blocksize": 256}',
         "not all three"),
    ],
)
def test_bnb_parse_state_refuses(doc, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        bnb_layout.parse_state(doc)


# ---------------------------------------------------------------- bitsandbytes 8-bit


@given(out=st.integers(1, 16), inp=st.integers(1, 40), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
       data=st.data())
def test_bnb_8bit_rows_match_bitsandbytes(out, inp, dtype, seed, data):
    w = (torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05).to(dtype)
    q, scb, _ = bnbf.int8_vectorwise_quant(w)  # Linear8bitLt's CB / SCB
    ref = bnbf.int8_vectorwise_dequant(q, scb).to(dtype)  # transformers' dequantize(): F32 then .to(dtype)
    r0 = data.draw(st.integers(0, out - 1))
    r1 = data.draw(st.integers(r0 + 1, out))
    got = bnb.dequantize_8bit(q[r0:r1], scb[r0:r1], dtype)
    assert torch.equal(_bits(got), _bits(ref[r0:r1]))


# ---------------------------------------------------------------- GPTQ / AWQ: reference quantizers from the spec
# (tests/quant_bases.py: the same quantizers and reference unpacks build the int4 bases of the merge tests)


@given(
    out_words=st.integers(1, 3), in_groups=st.integers(1, 3), bits=st.sampled_from(gptq_layout.GPTQ_BITS),
    group_size=st.sampled_from((16, 32)), act_order=st.booleans(), v1=st.booleans(),
    seed=st.integers(0, 2**16), data=st.data(),
)
def test_gptq_rows_match_reference(out_words, in_groups, bits, group_size, act_order, v1, seed, data):
    out, inp = out_words * (32 // bits), in_groups * group_size
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    perm = torch.randperm(inp, generator=torch.Generator().manual_seed(seed)) if act_order else None  # act-order
    qweight, qzeros, scales, g_idx = qb.quantize_gptq(w, bits, group_size, v1=v1, perm=perm)
    ref = qb.gptq_reference(qweight, qzeros, scales, g_idx, bits, v1)
    assert ref.dtype == torch.float16
    n0 = data.draw(st.integers(0, out - 1))
    n1 = data.draw(st.integers(n0 + 1, out))
    got = gptq.gptq_rows(qweight, qzeros, scales, g_idx, bits, n0, n1, zero_offset=1 if v1 else 0)
    assert torch.equal(_bits(got), _bits(ref[n0:n1].contiguous()))
    # the packing is the format's: the decode reproduces W within half a step, plus the F16 scale's rounding
    # (≤ 2^-11 relative, times |q - z| < 2^bits) and the F16 product's (≤ 2^-11 of the value)
    step = scales.float()[g_idx.long()].T[n0:n1]
    bound = step * (0.5 + 2.0 ** (bits - 11)) + w[n0:n1].abs() * 2**-10 + 1e-6
    assert ((got.float() - w[n0:n1]).abs() <= bound).all()


@given(out_words=st.integers(1, 3), in_groups=st.integers(1, 3), group_size=st.sampled_from((16, 32)),
       seed=st.integers(0, 2**16), data=st.data())
def test_awq_rows_match_reference(out_words, in_groups, group_size, seed, data):
    out, inp = out_words * 8, in_groups * group_size
    w = torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.05
    qweight, qzeros, scales = qb.quantize_awq(w, group_size)
    ref = qb.awq_reference(qweight, qzeros, scales, group_size)
    n0 = data.draw(st.integers(0, out - 1))
    n1 = data.draw(st.integers(n0 + 1, out))
    got = gptq.awq_rows(qweight, qzeros, scales, group_size, n0, n1)
    assert got.dtype == torch.float16
    assert torch.equal(_bits(got), _bits(ref[n0:n1].contiguous()))
    step = scales.float().repeat_interleave(group_size, 0).T[n0:n1]
    bound = step * (0.5 + 2.0 ** (4 - 11)) + w[n0:n1].abs() * 2**-10 + 1e-6
    assert ((got.float() - w[n0:n1]).abs() <= bound).all()
