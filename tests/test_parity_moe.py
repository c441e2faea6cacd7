"""MoE expert adapters: PEFT parity where PEFT 0.21 is right, an fp32 reference plus a warning where it is not.

Cases (``oracle.MOE_CASES``, each built once per session):

* v5-native ``target_parameters`` on fused experts (Mixtral, Qwen2-MoE; router; rsLoRA + patterns; one parameter):
  bit-identical to PEFT's ``merge_and_unload`` (spec §3.6, §7 row 14).
* v4-format per-expert adapters (Mixtral w1/w2/w3 + router, with and without rsLoRA; Qwen2-MoE experts): equal to
  a plain fp32 per-expert reference with one rounding (spec §7 rows 13, 15); PEFT 0.21's deviations (two roundings;
  ×√2 on w1/w3 with rsLoRA; Qwen2-MoE experts dropped) are shown to exist and to be announced by a warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from oracle import Case, cached_case, diff_checkpoints, load_checkpoint, load_merged, logits
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import kernel
from streammerge.errors import PlanError
from streammerge.plan import ExpertSlice

V5_CASES = ("mixtral_v5_experts", "mixtral_v5_experts_rslora", "mixtral_v5_down_only", "qwen2_moe_v5_experts")
V4_CASES = ("mixtral_v4_experts", "mixtral_v4_experts_rslora", "qwen2_moe_v4_experts")
PREFIX = "base_model.model."


@dataclass(frozen=True)
class MoeMerge:
    case: Case
    out_dir: Path
    warnings: tuple[str, ...]  # WARNING records logged by streammerge during the merge


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture(scope="session")
def moe_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "moe-cases"


@pytest.fixture(scope="session")
def moe_merges() -> dict[str, MoeMerge]:
    return {}


def build(name: str, root: Path) -> Case:
    with warnings.catch_warnings():
        # PEFT warns that rank/alpha_pattern keys for target_parameters "did not match" (they do apply: the
        # saved A has r·E rows of the pattern's r), and about its own MoE key conversion.
        warnings.simplefilter("ignore", RuntimeWarning)
        return cached_case(name, root)


@pytest.fixture
def merged(request: pytest.FixtureRequest, moe_root: Path, moe_merges: dict[str, MoeMerge]) -> MoeMerge:
    name = request.param
    if name not in moe_merges:
        case = build(name, moe_root)
        out = case.base_dir.parent / "out"
        handler = _Records()
        logger = logging.getLogger("streammerge")
        logger.addHandler(handler)
        try:
            streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out, device="cpu")
        finally:
            logger.removeHandler(handler)
        moe_merges[name] = MoeMerge(case, out, tuple(handler.messages))
    return moe_merges[name]


def _params(names: tuple[str, ...]) -> list:
    return [pytest.param(n, id=n) for n in names]


# ----------------------------------------------------------------------------------------------------------
# v5-native target_parameters: bit-exact with PEFT


@pytest.mark.parametrize("merged", _params(V5_CASES), indirect=True)
def test_target_parameters_bit_identical_to_peft(merged: MoeMerge) -> None:
    ours, ref = load_checkpoint(merged.out_dir), load_checkpoint(merged.case.ref_dir)
    assert diff_checkpoints(ours, ref) == []
    base = load_checkpoint(merged.case.base_dir)
    assert sorted(k for k in merged.case.must_change if torch.equal(ours[k], base[k])) == []
    assert merged.warnings == ()  # nothing to warn about: PEFT is right here


@pytest.mark.parametrize("merged", _params(("mixtral_v5_experts",)), indirect=True)
def test_merged_mixtral_loads_and_matches_peft_logits(merged: MoeMerge) -> None:
    case = merged.case
    ours = logits(load_merged(case.auto_class, merged.out_dir), case.input_ids)
    assert torch.equal(ours, case.ref_logits)
    assert not torch.allclose(ours, case.base_logits, atol=1e-2)  # the adapter really changes the model


def _expert_reference(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], module: str, param: str,
                      scale: float, n: int) -> torch.Tensor:
    """PEFT's own formula for the fused parameter, on the fused in-memory layout: P + rnd(einsum(B3, A3) · s)."""
    stem = PREFIX + module + (".base_layer" if param == "gate_up_proj" else "")
    a, b = adapter[stem + ".lora_A.weight"], adapter[stem + ".lora_B.weight"]
    delta = torch.einsum("o r e, e r i -> e o i", b.reshape(b.shape[0], -1, n), a.reshape(n, -1, a.shape[1])) * scale
    disk = module.replace(".mlp.", ".block_sparse_moe.")
    if param == "gate_up_proj":
        p = torch.stack([torch.cat([base[f"{disk}.{e}.w1.weight"], base[f"{disk}.{e}.w3.weight"]]) for e in range(n)])
    else:
        p = torch.stack([base[f"{disk}.{e}.w2.weight"] for e in range(n)])
    return p + delta.to(p.dtype)


@pytest.mark.parametrize("merged", _params(("mixtral_v5_experts",)), indirect=True)
def test_defused_experts_equal_peft_formula_on_fused_layout(merged: MoeMerge) -> None:
    """Independent of PEFT's merge: de-fusing the interleaved B and the gate/up rows is PEFT's einsum, re-split."""
    ours = load_checkpoint(merged.out_dir)
    base = load_checkpoint(merged.case.base_dir)
    adapter = load_file(merged.case.adapter_dir / "adapter_model.safetensors")
    n, inter = 4, ours["model.layers.1.block_sparse_moe.experts.0.w1.weight"].shape[0]
    module = "model.layers.1.mlp.experts"
    gate_up = _expert_reference(base, adapter, module, "gate_up_proj", 8 / 4, n)
    down = _expert_reference(base, adapter, module, "down_proj", 8 / 4, n)
    disk = "model.layers.1.block_sparse_moe.experts"
    for e in range(n):
        assert torch.equal(ours[f"{disk}.{e}.w1.weight"], gate_up[e, :inter])
        assert torch.equal(ours[f"{disk}.{e}.w3.weight"], gate_up[e, inter:])
        assert torch.equal(ours[f"{disk}.{e}.w2.weight"], down[e])


# ----------------------------------------------------------------------------------------------------------
# v4-format per-expert adapters: the correct per-expert merge, and PEFT 0.21's documented deviations


def _linear_reference(merged: MoeMerge) -> dict[str, torch.Tensor]:
    """Plain fp32 per-module LoRA with one rounding (PEFT Linear semantics), from the files alone."""
    base = load_checkpoint(merged.case.base_dir)
    adapter = load_file(merged.case.adapter_dir / "adapter_model.safetensors")
    cfg = json.loads((merged.case.adapter_dir / "adapter_config.json").read_text())
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
    out = dict(base)
    for key in adapter:
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            a, b = adapter[key].float(), adapter[key.replace("lora_A", "lora_B")].float()
            w = base[module + ".weight"]
            out[module + ".weight"] = (w.float() + (b @ a) * scale).to(w.dtype)
    return out


@pytest.mark.parametrize("merged", _params(V4_CASES), indirect=True)
def test_v4_experts_equal_plain_fp32_reference(merged: MoeMerge) -> None:
    ours = load_checkpoint(merged.out_dir)
    assert diff_checkpoints(ours, _linear_reference(merged)) == []
    base = load_checkpoint(merged.case.base_dir)
    changed = [k for k in ours if ".experts." in k and not torch.equal(ours[k], base[k])]
    assert len(changed) == 2 * 4 * 3  # every expert tensor of both layers


def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The bf16 unit in the last place of each element of fp32 ``x`` (8 significant bits; 2**-133 at 0)."""
    _, exponent = torch.frexp(x.float())  # x = m · 2**e, 0.5 <= |m| < 1
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8).clamp_min(2.0**-133)


@pytest.mark.parametrize("merged", _params(("mixtral_v4_experts",)), indirect=True)
def test_v4_mixtral_differs_from_peft_only_by_its_second_rounding(merged: MoeMerge) -> None:
    ours, peft = load_checkpoint(merged.out_dir), load_checkpoint(merged.case.ref_dir)
    base = load_checkpoint(merged.case.base_dir)
    adapter = load_file(merged.case.adapter_dir / "adapter_model.safetensors")
    differing = []
    for name in ours:
        if torch.equal(ours[name], peft[name]):
            continue
        differing.append(name)
        # PEFT 0.21 + transformers 5: W + rnd(ΔW), the ParamWrapper rounding (spec §3.1), per expert and router.
        module = name.removesuffix(".weight")
        a, b = adapter[PREFIX + module + ".lora_A.weight"], adapter[PREFIX + module + ".lora_B.weight"]
        delta = (b @ a) * 2.0
        assert torch.equal(peft[name], base[name] + delta.to(torch.bfloat16)), name
        # ... so the two differ by at most that extra rounding of ΔW plus one rounding of the result
        gap = (ours[name].float() - peft[name].float()).abs()
        assert bool((gap <= _bf16_ulp(delta) / 2 + _bf16_ulp(ours[name])).all()), name
        assert float((gap > 0).float().mean()) < 0.5, name
    assert differing and all(".experts." in n or n.endswith("block_sparse_moe.gate.weight") for n in differing)
    assert "model.layers.0.self_attn.q_proj.weight" not in differing  # attention stays bit-exact
    (warning,) = merged.warnings
    assert "v4-format expert/router LoRA" in warning and "rounds twice" in warning and "√2" not in warning


@pytest.mark.parametrize("merged", _params(("mixtral_v4_experts_rslora",)), indirect=True)
def test_v4_mixtral_rslora_peft_scales_gate_up_by_sqrt2_and_we_warn(merged: MoeMerge) -> None:
    ours, peft = load_checkpoint(merged.out_dir), load_checkpoint(merged.case.ref_dir)
    base = load_checkpoint(merged.case.base_dir)

    def ratio(name: str) -> float:  # least-squares factor between PEFT's delta and ours
        d_ours, d_peft = ours[name].float() - base[name].float(), peft[name].float() - base[name].float()
        return float((d_ours * d_peft).sum() / (d_ours * d_ours).sum())

    stem = "model.layers.0.block_sparse_moe."
    assert ratio(stem + "experts.2.w1.weight") == pytest.approx(math.sqrt(2), rel=0.01)
    assert ratio(stem + "experts.2.w3.weight") == pytest.approx(math.sqrt(2), rel=0.01)
    assert ratio(stem + "experts.2.w2.weight") == pytest.approx(1.0, rel=0.01)
    assert ratio(stem + "gate.weight") == pytest.approx(1.0, rel=0.01)
    (warning,) = merged.warnings
    assert "√2" in warning and "use_rslora" in warning and "×1.414" in warning
    # our merged model loads with transformers; its logits are the correct model's, not PEFT's
    case = merged.case
    ours_logits = logits(load_merged(case.auto_class, merged.out_dir), case.input_ids)
    assert not torch.allclose(ours_logits, case.ref_logits, atol=1e-3)


@pytest.mark.parametrize("merged", _params(("mixtral_v4_experts",)), indirect=True)
def test_v4_mixtral_logits_close_to_peft(merged: MoeMerge) -> None:
    case = merged.case
    ours = logits(load_merged(case.auto_class, merged.out_dir), case.input_ids)
    assert torch.allclose(ours.float(), case.ref_logits.float(), atol=0.05)
    assert not torch.allclose(ours.float(), case.base_logits.float(), atol=0.05)


@pytest.mark.parametrize("merged", _params(("qwen2_moe_v4_experts",)), indirect=True)
def test_v4_qwen2_moe_peft_drops_experts_we_merge_them_and_warn(merged: MoeMerge) -> None:
    ours, peft = load_checkpoint(merged.out_dir), load_checkpoint(merged.case.ref_dir)
    base = load_checkpoint(merged.case.base_dir)
    experts = [k for k in base if ".mlp.experts." in k]
    assert experts and all(torch.equal(peft[k], base[k]) for k in experts)  # PEFT 0.21: silently unchanged
    assert all(not torch.equal(ours[k], base[k]) for k in experts)
    others = {k: ours[k] for k in ours if k not in experts}
    assert diff_checkpoints(others, {k: peft[k] for k in others}) == []  # attention + shared expert: bit-exact
    (warning,) = merged.warnings
    assert "silently ignores" in warning and "qwen2_moe" in warning


@pytest.mark.parametrize("merged", _params(("qwen2_moe_v4_experts",)), indirect=True)
def test_warning_is_in_the_plan_and_printed_by_the_cli(merged: MoeMerge, tmp_path: Path) -> None:
    case = merged.case
    plan = streammerge.plan_merge(base=case.base_dir, adapter=case.adapter_dir)
    assert [w for w in plan.warnings if "silently ignores" in w]
    env = {**os.environ, "PYTHONPATH": str(Path(streammerge.__file__).parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "streammerge", "merge", "--base", str(case.base_dir), "--adapter",
         str(case.adapter_dir), "--out", str(tmp_path / "o"), "--device", "cpu"],
        capture_output=True, text=True, env=env, check=False, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "silently ignores" in proc.stderr


# ----------------------------------------------------------------------------------------------------------
# The kernel's per-expert slice is PEFT's einsum, bit for bit, whole or in row blocks


@given(
    experts=st.integers(2, 6), rank=st.integers(1, 8), out=st.integers(1, 150), inn=st.integers(1, 96),
    transposed=st.booleans(), seed=st.integers(0, 2**16),
)
def test_expert_delta_is_peft_einsum(experts: int, rank: int, out: int, inn: int, transposed: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn((rank * experts, inn), generator=gen)
    b = torch.randn((out, rank * experts), generator=gen)
    b3, a3 = b.reshape(out, rank, experts), a.reshape(experts, rank, inn)
    spec = "o r e, e r i -> e i o" if transposed else "o r e, e r i -> e o i"
    ref = torch.einsum(spec, b3, a3) * 0.75  # PEFT ParamWrapper.get_delta_weight
    rows = ref.shape[1]
    layout = "expert_t" if transposed else "expert"
    for e in range(experts):
        for row0, length in ((0, rows), (rows // 3, rows - rows // 3)):
            f = kernel.Factors(layout, a, b, 0.75, expert=ExpertSlice(e, experts, row0))
            blocks = [(r0, min(length, r0 + 64)) for r0 in range(0, length, 64)]
            got = torch.cat([kernel.lora_delta(f, r0, r1) for r0, r1 in blocks])
            assert torch.equal(got, ref[e, row0 : row0 + length])


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["expert", "expert_t"])
@pytest.mark.parametrize(("n", "rank", "rows", "width"), [(8, 16, 2 * 1792, 1024), (8, 16, 1024, 2 * 1408)])
def test_expert_delta_is_peft_einsum_on_real_shapes(layout: str, n: int, rank: int, rows: int, width: int) -> None:
    """Real-sized experts take the per-expert, per-block path: still PEFT's einsum bit for bit, in 64-row blocks
    and at an offset that is not a multiple of 64 (w3 = rows I.. of gate_up_proj)."""
    gen = torch.Generator().manual_seed(3)
    if layout == "expert":  # P (E, rows, width): A (r·E, width), B (rows, r·E)
        a, b = torch.randn((rank * n, width), generator=gen), torch.randn((rows, rank * n), generator=gen)
        ref = torch.einsum("o r e, e r i -> e o i", b.reshape(rows, rank, n), a.reshape(n, rank, width)) * 2.0
    else:  # P (E, rows, width) read as (E, in, out): A (r·E, rows), B (width, r·E)
        a, b = torch.randn((rank * n, rows), generator=gen), torch.randn((width, rank * n), generator=gen)
        ref = torch.einsum("o r e, e r i -> e i o", b.reshape(width, rank, n), a.reshape(n, rank, rows)) * 2.0
    assert n * rows * width > kernel.WHOLE_DELTA_ELEMENTS  # the blocked path
    half = rows // 2
    for e in (0, 5):
        for row0 in (0, half, half - 40):
            f = kernel.Factors(layout, a, b, 2.0, expert=ExpertSlice(e, n, row0))
            length = rows - row0 if row0 != half else half
            starts = list(range(0, length, 64 * 3))
            if len(starts) > 1 and length - starts[-1] < 64:
                starts.pop()
            blocks = zip(starts, [*starts[1:], length], strict=True)
            got = torch.cat([kernel.lora_delta(f, r0, r1) for r0, r1 in blocks])
            assert torch.equal(got, ref[e, row0 : row0 + length])


def _check_fused_delta(layout: str, n: int, rank: int, d1: int, d2: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    if layout == "fused":  # P (E, out=d1, in=d2)
        a, b = torch.randn((rank * n, d2), generator=gen), torch.randn((d1, rank * n), generator=gen)
        ref = torch.einsum("o r e, e r i -> e o i", b.reshape(d1, rank, n), a.reshape(n, rank, d2)) * 0.5
    else:  # P (E, in=d1, out=d2), experts is_transposed
        a, b = torch.randn((rank * n, d1), generator=gen), torch.randn((d2, rank * n), generator=gen)
        ref = torch.einsum("o r e, e r i -> e i o", b.reshape(d2, rank, n), a.reshape(n, rank, d1)) * 0.5
    f = kernel.Factors(layout, a, b, 0.5, expert=ExpertSlice(0, n, 0))
    for blocks in (((0, n),), ((0, 1), (1, n)), tuple((e, e + 1) for e in range(n))):
        assert torch.equal(torch.cat([kernel.lora_delta(f, r0, r1) for r0, r1 in blocks]), ref)


@given(layout=st.sampled_from(["fused", "fused_t"]), n=st.integers(2, 6), rank=st.integers(1, 8),
       d1=st.integers(1, 96), d2=st.integers(1, 96), seed=st.integers(0, 2**16))
def test_fused_delta_is_peft_einsum_in_expert_blocks(layout: str, n: int, rank: int, d1: int, d2: int,
                                                     seed: int) -> None:
    """A 3-D parameter stored fused on disk (GPT-OSS): the task's row blocks are blocks of experts, and any split
    of the experts gives PEFT's ``ParamWrapper`` einsum bit for bit (small ΔP: computed whole, then sliced)."""
    _check_fused_delta(layout, n, rank, d1, d2, seed)


@pytest.mark.parametrize("layout", ["fused", "fused_t"])
def test_fused_delta_is_peft_einsum_on_real_shapes(layout: str) -> None:
    """Real-sized ΔP takes the per-block-of-experts path: still PEFT's whole einsum bit for bit."""
    assert kernel.WHOLE_DELTA_ELEMENTS < 8 * 1024 * 576
    _check_fused_delta(layout, 8, 16, 1024, 576, 11)


# ----------------------------------------------------------------------------------------------------------
# Layouts PEFT versions disagree on (spec §6.6), on a synthetic square case, and errors


def _square_moe(root: Path, peft_version: str | None, transposed_factors: bool = False) -> tuple[Path, Path]:
    """A 1-layer Mixtral-style base whose fused gate_up_proj is square (2I = H = 32) and a target_parameters
    adapter on it: A (r·E, 32), B (32, r·E) fits both the (E, out, in) and the (E, in, out) readings."""
    gen = torch.Generator().manual_seed(5)
    n, inter, hidden, rank = 2, 16, 32, 2
    base_dir, ad_dir = root / "base", root / "adapter"
    base_dir.mkdir(parents=True)
    ad_dir.mkdir()
    stem = "model.layers.0.block_sparse_moe.experts"
    tensors = {f"{stem}.{e}.{w}.weight": (torch.randn(shape, generator=gen) * 0.1).to(torch.bfloat16)
               for e in range(n) for w, shape in (("w1", (inter, hidden)), ("w3", (inter, hidden)),
                                                   ("w2", (hidden, inter)))}
    save_file(tensors, base_dir / "model.safetensors", metadata={"format": "pt"})
    (base_dir / "config.json").write_text(json.dumps({"model_type": "mixtral", "tie_word_embeddings": False}))
    adapter = {PREFIX + "model.layers.0.mlp.experts.lora_A.weight": torch.randn((rank * n, hidden), generator=gen),
               PREFIX + "model.layers.0.mlp.experts.lora_B.weight": torch.randn((hidden, rank * n), generator=gen)}
    save_file(adapter, ad_dir / "adapter_model.safetensors", metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 4, "target_modules": [],
           "target_parameters": ["mlp.experts.gate_up_proj"]}
    if peft_version is not None:
        cfg["peft_version"] = peft_version
    (ad_dir / "adapter_config.json").write_text(json.dumps(cfg))
    return base_dir, ad_dir


@pytest.mark.parametrize(("version", "equation"), [("0.21.2", "o r e, e r i -> e o i"),
                                                   ("0.19.1", "o r e, e r i -> e o i"),
                                                   ("0.18.0", "o r e, e r i -> e i o"),
                                                   (None, "o r e, e r i -> e i o")])
def test_square_expert_layout_follows_peft_version(tmp_path: Path, version: str | None, equation: str) -> None:
    base_dir, ad_dir = _square_moe(tmp_path, version)
    out = tmp_path / "out"
    streammerge.merge(base=base_dir, adapter=ad_dir, out=out, device="cpu")
    base, ours = load_file(base_dir / "model.safetensors"), load_file(out / "model.safetensors")
    ad = load_file(ad_dir / "adapter_model.safetensors")
    key = PREFIX + "model.layers.0.mlp.experts.lora_{}.weight"
    a, b = ad[key.format("A")], ad[key.format("B")]
    delta = (torch.einsum(equation, b.reshape(32, 2, 2), a.reshape(2, 2, 32)) * 2.0).to(torch.bfloat16)
    stem = "model.layers.0.block_sparse_moe.experts"
    for e in range(2):
        fused = torch.cat([base[f"{stem}.{e}.w1.weight"], base[f"{stem}.{e}.w3.weight"]]) + delta[e]
        assert torch.equal(ours[f"{stem}.{e}.w1.weight"], fused[:16])
        assert torch.equal(ours[f"{stem}.{e}.w3.weight"], fused[16:])
        assert torch.equal(ours[f"{stem}.{e}.w2.weight"], base[f"{stem}.{e}.w2.weight"])


def test_target_parameters_on_a_missing_module_fails_naming_it(tmp_path: Path) -> None:
    base_dir, ad_dir = _square_moe(tmp_path, "0.21.2")
    path = ad_dir / "adapter_model.safetensors"
    sd = {k.replace("layers.0", "layers.7"): v for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"format": "pt"})
    with pytest.raises(PlanError, match=r"model\.layers\.7\.mlp\.experts\.gate_up_proj"):
        streammerge.plan_merge(base=base_dir, adapter=ad_dir)


def test_target_parameters_rank_mismatch_fails_with_expected_shapes(tmp_path: Path) -> None:
    base_dir, ad_dir = _square_moe(tmp_path, "0.21.2")
    cfg = json.loads((ad_dir / "adapter_config.json").read_text())
    cfg["r"] = 4
    (ad_dir / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match=r"r=4.*check r / rank_pattern"):
        streammerge.plan_merge(base=base_dir, adapter=ad_dir)
