"""The merge arithmetic against a float64 reference, and the row-block invariances it relies on."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from streammerge.kernel import Factors, merge_block
from streammerge.plan import LoraTerm, Step, TensorRef, TensorTask, row_blocks

_INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def ulp_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in units in the last place (ordered-integer view of the float bits)."""

    def ordered(t: torch.Tensor) -> torch.Tensor:
        bits = t.view(_INT_VIEW[t.dtype]).to(torch.int64)
        sign_bit = torch.iinfo(_INT_VIEW[t.dtype]).min
        return torch.where(bits < 0, sign_bit - bits, bits)  # -0.0 and 0.0 both map to 0

    return (ordered(x) - ordered(y)).abs()


def reference(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    delta = (b.double() @ a.double()) * scale
    return (w.double() + (delta.T if transpose else delta)).to(w.dtype)


dims = st.integers(1, 24)


@st.composite
def lora_case(draw):
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]))
    out_f, in_f, r = draw(dims), draw(dims), draw(st.integers(1, 8))
    transpose = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.5, 2.0, 16 / 8, 32 / 16**0.5, 1 / 3]))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn((in_f, out_f) if transpose else (out_f, in_f), generator=gen).to(dtype)
    a = torch.randn(r, in_f, generator=gen)
    b = torch.randn(out_f, r, generator=gen) * 0.1
    return dtype, w, a, b, scale, transpose


@given(lora_case())
def test_merge_is_within_one_ulp_of_float64_reference(case):
    dtype, w, a, b, scale, transpose = case
    layout = "linear_t" if transpose else "linear"
    ours = merge_block(w, dtype, [("once", [Factors(layout, a, b, scale)])], 0, w.shape[0])
    ref = reference(w, a, b, scale, transpose)
    assert ours.dtype == dtype and ours.shape == w.shape
    if dtype != torch.float32:
        # The fp32 error is far below a 16-bit ulp, so one rounding lands on the value or its neighbour.
        assert int(ulp_distance(ours, ref).max()) <= 1
    else:
        # Forward error bound of an r-term fp32 dot product plus the add, relative to the magnitudes
        # involved (an ulp of the result means nothing under cancellation).
        r = a.shape[0]
        mag = (b.abs().double() @ a.abs().double()) * abs(scale)
        bound = (r + 2) * torch.finfo(torch.float32).eps * (w.abs().double() + (mag.T if transpose else mag))
        assert bool(((ours.double() - reference(w, a, b, scale, transpose).double()).abs() <= bound).all())


@given(
    st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    st.integers(1, 3), st.integers(0, 63), st.integers(1, 40), st.integers(1, 16), st.booleans(),
    st.integers(0, 2**31 - 1), st.data(),
)
def test_row_blocks_cut_at_multiples_of_64_equal_whole_tensor(dtype, k, tail, cols, r, transpose, seed, data):
    """The executor cuts only where ``row_blocks`` says, and transposed layouts only when their rows
    are at least 64 wide (``TensorTask.whole``); cutting anywhere else can change MKL's fp32 sums
    (seen: 65 rows cut 64 + 1; a 2-wide transposed product cut 64 + 65)."""
    rows = 64 * k + tail
    if transpose:
        cols += 63  # narrower transposed tasks are never cut: see test_narrow_transposed_tasks_are_whole
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen).to(dtype)
    out_f, in_f = (cols, rows) if transpose else (rows, cols)
    a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen) * 0.1
    steps = [("once", [Factors("linear_t" if transpose else "linear", a, b, 0.5)])]
    whole = merge_block(w, dtype, steps, 0, rows)
    step = 64 * data.draw(st.integers(1, k))
    blocks = row_blocks(rows, step)
    parts = [merge_block(w[r0:r1], dtype, steps, r0, r1) for r0, r1 in blocks]
    assert torch.equal(torch.cat(parts), whole), blocks


@given(st.integers(0, 5000), st.integers(1, 40))
def test_row_blocks_cover_rows_once_with_no_short_tail(rows, k):
    blocks = row_blocks(rows, 64 * k)
    assert [r for r0, r1 in blocks for r in range(r0, r1)] == list(range(rows))
    assert all(r0 % 64 == 0 for r0, _ in blocks)
    assert len(blocks) == 1 or all(r1 - r0 >= 64 for r0, r1 in blocks)


@given(lora_case())
def test_zero_b_reproduces_the_base_bit_for_bit(case):
    dtype, w, a, b, scale, transpose = case
    layout = "linear_t" if transpose else "linear"
    for rounding in ("once", "delta_first"):
        out = merge_block(w, dtype, [(rounding, [Factors(layout, a, torch.zeros_like(b), scale)])], 0, w.shape[0])
        assert torch.equal(out.view(_INT_VIEW[dtype]), w.view(_INT_VIEW[dtype]))


@given(lora_case())
def test_embedding_rounds_the_delta_first_like_peft(case):
    dtype, w, a, b, scale, _ = case
    # Embedding: W (V, d), A_e (r, V), B_e (d, r); PEFT: W + ((B_e @ A_e).T * s).to(W.dtype)
    a_e, b_e = a[:, : w.shape[0]], b[: w.shape[1]] if b.shape[0] >= w.shape[1] else None
    if b_e is None or a_e.shape[1] != w.shape[0]:
        return
    out = merge_block(w, dtype, [("delta_first", [Factors("embedding", a_e, b_e, scale)])], 0, w.shape[0])
    expected = w + ((b_e @ a_e).T * scale).to(dtype)
    assert torch.equal(out, expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        pytest.param((8192, 8192), "linear", id="70b-q_proj"),
        pytest.param((1024, 8192), "linear", id="70b-k_proj"),
        pytest.param((8192, 28672), "linear", id="70b-down_proj"),
        pytest.param((2048, 8192), "linear_t", id="conv1d-transposed"),
    ],
)
def test_real_shapes_blocks_of_64_rows_are_bit_identical(shape, layout):
    """Design §7: MKL's fp32 GEMM can sum differently for odd row counts; multiples of 64 must not."""
    gen = torch.Generator().manual_seed(0)
    rows, cols = shape
    out_f, in_f = (rows, cols) if layout == "linear" else (cols, rows)
    w = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    a = torch.randn(16, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, 16, generator=gen) * 0.02
    steps = [("once", [Factors(layout, a, b, 2.0)])]
    whole = merge_block(w, torch.bfloat16, steps, 0, rows)
    for block in (64, 640, 1024 + 64):
        parts = [merge_block(w[r0 : r0 + block], torch.bfloat16, steps, r0, min(r0 + block, rows))
                 for r0 in range(0, rows, block)]
        assert torch.equal(torch.cat(parts), whole), f"block of {block} rows differs"


@pytest.mark.parametrize(("layout", "width", "whole"), [
    ("linear", 2, False), ("linear_t", 11, True), ("embedding", 63, True), ("embedding", 64, False),
    ("linear_t", 4096, False),
])
def test_narrow_transposed_tasks_are_whole(layout, width, whole):
    ref = TensorRef("/x", "w", "BF16", (1000, width), 0)
    a = TensorRef("/a", "a", "F32", (16, 1000 if layout != "linear" else width), 0)
    b = TensorRef("/a", "b", "F32", (width if layout != "linear" else 1000, 16), 0)
    task = TensorTask("w", "BF16", (1000, width), ref, (Step((LoraTerm(layout, a, b, 1.0),), "once"),), "merge")
    assert task.whole is whole


@given(st.sampled_from([torch.bfloat16, torch.float16, torch.float32]), st.integers(1, 300),
       st.lists(st.sampled_from([float("nan"), float("inf"), float("-inf")]), max_size=5), st.integers(0, 2**31 - 1),
       st.sampled_from([1.0, 6e4]))
def test_nonfinite_count_is_exact(dtype, n, bad, seed, scale):
    """The sum filter never hides a NaN/inf, and an overflowing sum of finite values counts 0."""
    from streammerge.kernel import nonfinite_count

    t = (torch.rand(n, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    for i, value in enumerate(bad[:n]):
        t[i] = value
    assert nonfinite_count(t) == len(bad[:n])


@given(lora_case(), st.integers(1, 3), st.booleans(), st.data())
def test_merge_into_a_reused_buffer_is_bit_identical_and_flags_every_nonfinite(case, k, poison, data):
    """``merge_checked`` (what the writer runs: a dirty, reused output buffer, the NaN/inf filter per chunk)
    equals ``merge_block``, bit for bit, and never misses a NaN/inf of the result."""
    from streammerge.kernel import merge_checked, nonfinite_count

    dtype, w, a, b, scale, transpose = case
    layout = "linear_t" if transpose else "linear"
    w = w.repeat(k, 1) if not transpose else w
    b = b.repeat(k, 1) if not transpose else b
    if poison:
        i = data.draw(st.integers(0, w.numel() - 1))
        w.view(-1)[i] = data.draw(st.sampled_from([float("nan"), float("inf"), float("-inf")]))
    steps = [("once", [Factors(layout, a, b, scale)])]
    fresh = merge_block(w, dtype, steps, 0, w.shape[0], 64)
    dirty = torch.full(w.shape, float("nan")).to(dtype)  # what a previous block left behind
    out, suspect = merge_checked(w, dtype, steps, 0, w.shape[0], 64, out=dirty, check_finite=True)
    assert out.data_ptr() == dirty.data_ptr()
    assert torch.equal(out.view(_INT_VIEW[dtype]), fresh.view(_INT_VIEW[dtype]))
    assert suspect or nonfinite_count(out) == 0

    # with the change tally fused in (it widens W for the add; its sum's finiteness is the NaN/inf filter):
    # the same bits, the same verdict, and the figures of a separate pass over the same chunks
    from streammerge.changes import BlockTally

    fused = BlockTally()
    out2, suspect2 = merge_checked(w, dtype, steps, 0, w.shape[0], 64, out=dirty.clone(), check_finite=True,
                                   tally=fused)
    assert torch.equal(out2.view(_INT_VIEW[dtype]), fresh.view(_INT_VIEW[dtype]))
    assert suspect2 or nonfinite_count(out2) == 0
    assert suspect2 == (nonfinite_count(out2) > 0 or not math.isfinite(fused.dsq))
    apart = BlockTally()
    for r0, r1 in row_blocks(w.shape[0], 64):
        apart.chunk(w[r0:r1], out2[r0:r1])
    same = lambda x, y: x == y or (math.isnan(x) and math.isnan(y))  # noqa: E731
    assert same(fused.wsq, apart.wsq) and same(fused.dsq, apart.dsq) and fused.same == apart.same


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(("out_f", "in_f", "r"), [(2048, 2048, 16), (512, 2048, 8), (8192, 2048, 16),
                                                  (2048, 8192, 64), (1000, 3000, 12)])
def test_intra_op_thread_count_never_changes_a_merged_bit(out_f, in_f, r):
    """execute.set_intra_op_threads runs the kernel with 1 thread per worker by default: the merge must be
    the same bits as with torch's default (the GEMM may split rows and columns, never the rank sum)."""
    gen = torch.Generator().manual_seed(out_f + in_f + r)
    w = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16)
    a = torch.randn(r, in_f, generator=gen) / in_f**0.5
    b = torch.randn(out_f, r, generator=gen) * 0.02
    steps = [("once", [Factors("linear", a, b, 2.0)])]
    results = [_with_threads(n, lambda: merge_block(w, torch.bfloat16, steps, 0, out_f)) for n in (1, 2, 4)]
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], w)  # the merge did change the weight
