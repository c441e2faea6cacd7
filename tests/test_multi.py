"""Several adapters with weights: cat (exact), ties, dare_linear, dare_ties, magnitude_prune.

References are PEFT's own code: ``get_delta_weight`` for each adapter's ΔWᵢ (fp32, its own scale,
rank, patterns and fan_in_fan_out), ``add_weighted_adapter(combination_type="cat")`` + merge, and
``peft.utils.merge_utils`` applied to the same deltas.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import oracle
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import merge_utils
from safetensors.torch import load_file, save_file
from test_kernel import ulp_distance
from transformers import AutoModelForCausalLM

import streammerge
from streammerge import combine, testing
from streammerge.cli import main
from streammerge.errors import PlanError, UnsupportedAdapterError

WEIGHTS = (0.7, -0.3)
B_SCALE = 0.05  # "trained" LoRA updates: small next to W, as real ones are


def _ulp(t: torch.Tensor, mantissa: int) -> torch.Tensor:
    """Spacing of the 16-bit float grid at |t| (mantissa bits: bf16 7, fp16 10), as fp32."""
    min_exp = -126 if mantissa == 7 else -14
    _, e = torch.frexp(t.float().abs())
    return torch.ldexp(torch.ones_like(t, dtype=torch.float32), torch.clamp(e - 1, min=min_exp) - mantissa)


def _scale_b(adapter: Path) -> None:
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    save_file({k: v * B_SCALE if ".lora_B" in k or "lora_embedding_B" in k else v for k, v in sd.items()}, str(path),
              metadata={"format": "pt"})


@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A bf16 Llama base and two PEFT adapters with different ranks, patterns and targets (one on the
    embedding); a GPT-2 base (Conv1D, fan_in_fan_out) with two adapters."""
    root = tmp_path_factory.mktemp("multi")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for arch, make, configs in (
            ("llama", oracle.llama(), {
                "a1": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "embed_tokens"]},
                "a2": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "o_proj", "up_proj"],
                       "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"o_proj": 4}},
                "rs": {"r": 4, "lora_alpha": 8, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
            }),
            ("gpt2", oracle.gpt2, {
                "a1": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"]},
                "a2": {"r": 2, "lora_alpha": 4, "target_modules": ["c_attn", "c_fc"]},
            }),
        ):
            torch.manual_seed(oracle.SEED)
            base = root / arch / "base"
            make().to(torch.bfloat16).save_pretrained(base)
            for i, (name, cfg) in enumerate(configs.items()):
                torch.manual_seed(oracle.SEED + 10 + i)
                model = AutoModelForCausalLM.from_pretrained(base)
                get_peft_model(model, LoraConfig(init_lora_weights=False, **cfg)).save_pretrained(root / arch / name)
                _scale_b(root / arch / name)
            out[arch] = root / arch
    return out


def _peft_model(root: Path, names: tuple[str, ...]) -> PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "base"), root / names[0],
                                       adapter_name=names[0])
        for name in names[1:]:
            pm.load_adapter(root / name, adapter_name=name)
    return pm


def _peft_deltas(root: Path, names: tuple[str, ...]) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """tensor name -> [(adapter index, ΔWᵢ fp32 from PEFT's get_delta_weight)] for adapters touching it."""
    pm = _peft_model(root, names)
    out: dict[str, list[tuple[int, torch.Tensor]]] = {}
    with torch.no_grad():
        for mod_name, mod in pm.base_model.model.named_modules():
            for i, name in enumerate(names):
                if name in getattr(mod, "lora_A", {}) or name in getattr(mod, "lora_embedding_A", {}):
                    out.setdefault(f"{mod_name}.weight", []).append((i, mod.get_delta_weight(name).float()))
    return out


def _ours(root: Path, tmp: Path, names: tuple[str, ...], **kwargs) -> dict[str, torch.Tensor]:
    streammerge.merge(base=root / "base", adapters=[root / n for n in names], out=tmp, device="cpu", **kwargs)
    return testing.load_dir(tmp)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_cat_is_the_fp32_sum_with_one_rounding(tmp_path, peft_pair, arch):
    root = peft_pair[arch]
    ours = _ours(root, tmp_path / "out", ("a1", "a2"), weights=list(WEIGHTS))
    base = testing.load_dir(root / "base")
    deltas = _peft_deltas(root, ("a1", "a2"))
    assert len(deltas) >= 4
    for name, terms in deltas.items():
        delta = terms[0][1] * WEIGHTS[terms[0][0]]
        for i, d in terms[1:]:
            delta = delta + d * WEIGHTS[i]
        want = (base[name].float() + delta).to(base[name].dtype)  # W + Σ wᵢΔWᵢ in fp32, one rounding
        assert torch.equal(ours[name], want), name
        exact = (base[name].double() + sum(d.double() * WEIGHTS[i] for i, d in terms)).to(base[name].dtype)
        assert int(ulp_distance(ours[name], exact).max()) <= 1, name  # and within 1 ulp of a float64 reference
    untouched = set(base) - set(deltas)
    assert all(torch.equal(ours[n], base[n]) for n in untouched)


def test_cat_matches_peft_add_weighted_adapter_up_to_its_factor_rounding(tmp_path, peft_pair):
    """PEFT builds the cat adapter's factors in the base dtype (bf16), rounding wᵢsᵢAᵢ and Bᵢ before the
    product, and adds the delta rounded to bf16 (CPU ``get_delta_weight``). With u = 2⁻⁸ (bf16 unit
    roundoff): |ours − PEFT| ≤ ½ulp(ours) + ½ulp(PEFT) + 3u·Σᵢ|wᵢsᵢ|·(|Bᵢ|@|Aᵢ|) — one u per factor
    rounding and one for the rounded delta. Elementwise "within one ulp" cannot hold where W and ΔW
    nearly cancel (|M| ≪ |ΔW|): there PEFT's factor rounding alone is many ulps of M."""
    root = peft_pair["llama"]
    ours = _ours(root, tmp_path / "out", ("a1", "a2"), weights=list(WEIGHTS))
    pm = _peft_model(root, ("a1", "a2"))
    pm.add_weighted_adapter(["a1", "a2"], list(WEIGHTS), "cat", combination_type="cat")
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["cat"].weight.dtype == torch.bfloat16
    absprod: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for mod_name, mod in pm.base_model.model.named_modules():
            for w, name in zip(WEIGHTS, ("a1", "a2"), strict=True):
                if name in getattr(mod, "lora_A", {}):
                    p = mod.lora_B[name].weight.abs() @ mod.lora_A[name].weight.abs()
                elif name in getattr(mod, "lora_embedding_A", {}):
                    p = (mod.lora_embedding_B[name].abs() @ mod.lora_embedding_A[name].abs()).T
                else:
                    continue
                key = f"{mod_name}.weight"
                absprod[key] = absprod.get(key, 0) + p * abs(w * mod.scaling[name])
        pm.set_adapter("cat")
        ref = pm.merge_and_unload(adapter_names=["cat"]).state_dict()
    same = total = 0
    for name, bound in absprod.items():
        diff = (ours[name].float() - ref[name].float()).abs()
        rounding = (_ulp(ours[name], 7) + _ulp(ref[name], 7)) / 2
        assert bool((diff <= rounding + bound * 3 * 2**-8).all()), name
        same += int((diff == 0).sum())
        total += diff.numel()
    assert same / total > 0.8  # most elements are bit-identical (measured 90%)


def test_cat_with_rslora_is_correct_where_peft_overscales_by_sqrt_r(tmp_path, peft_pair):
    """spec §0.5(c), huggingface/peft#3761: PEFT's cat adapter inherits use_rslora with r'=α'=Σr, so its
    scaling is √r' instead of 1. We apply each adapter's own α/√r (exact) and say so."""
    root = peft_pair["llama"]
    plan = streammerge.plan_merge(root / "base", adapters=[root / "rs", root / "a2"], weights=[1.0, 1.0])
    r_new = 4 + 8
    assert any("peft#3761" in w and f"{math.sqrt(r_new):.4g}" in w for w in plan.warnings)
    ours = _ours(root, tmp_path / "out", ("rs", "a2"), weights=[1.0, 1.0])
    pm = _peft_model(root, ("rs", "a2"))
    pm.add_weighted_adapter(["rs", "a2"], [1.0, 1.0], "cat", combination_type="cat")
    q = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert q.scaling["cat"] == pytest.approx(math.sqrt(r_new))
    with torch.no_grad():
        pm.set_adapter("cat")
        ref = pm.merge_and_unload(adapter_names=["cat"]).state_dict()
    base = testing.load_dir(root / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    ratio = (ref[name].double() - base[name].double()).norm() / (ours[name].double() - base[name].double()).norm()
    assert float(ratio) == pytest.approx(math.sqrt(r_new), rel=0.02)


def _reference_combination(root: Path, method: str, density: float, **peft_kwargs) -> dict[str, torch.Tensor]:
    """rnd(W + op(ΔW₁, ΔW₂)) with op from peft.utils.merge_utils, per tensor."""
    base = testing.load_dir(root / "base")
    out = {}
    for name, terms in _peft_deltas(root, ("a1", "a2")).items():
        weights = torch.tensor([WEIGHTS[i] for i, _ in terms])
        delta = getattr(merge_utils, method)([d for _, d in terms], weights, density, **peft_kwargs)
        out[name] = (base[name].float() + delta).to(base[name].dtype)
    return out


@pytest.mark.parametrize("method", ["ties", "magnitude_prune"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_magnitude_operators_equal_peft_merge_utils(tmp_path, peft_pair, method, arch):
    root = peft_pair[arch]
    ours = _ours(root, tmp_path / "out", ("a1", "a2"), weights=list(WEIGHTS), combination=method, density=0.3)
    ref = _reference_combination(root, method, 0.3)
    for name, want in ref.items():
        assert torch.equal(ours[name], want), name


class _InjectedBernoulli:
    """Stands in for ``torch`` inside merge_utils: ``bernoulli`` returns the given masks in order."""

    def __init__(self, masks: list[torch.Tensor]) -> None:
        self._masks = masks

    def __getattr__(self, name: str) -> object:
        return getattr(torch, name)

    def bernoulli(self, p: torch.Tensor) -> torch.Tensor:
        mask = self._masks.pop(0)
        assert mask.shape == p.shape
        return mask.to(p.dtype)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_equals_peft_merge_utils_given_the_same_mask(tmp_path, peft_pair, monkeypatch, method):
    root = peft_pair["llama"]
    density, seed = 0.6, 7
    ours = _ours(root, tmp_path / "out", ("a1", "a2"), weights=list(WEIGHTS), combination=method,
                 density=density, seed=seed, max_memory=1 << 20)
    base = testing.load_dir(root / "base")
    for name, terms in _peft_deltas(root, ("a1", "a2")).items():
        masks = [combine.dare_keep(d.shape, density, seed=seed, key=name, task=i, first_index=0) for i, d in terms]
        monkeypatch.setattr(merge_utils, "torch", _InjectedBernoulli(list(masks)))
        delta = getattr(merge_utils, method)([d for _, d in terms], torch.tensor([WEIGHTS[i] for i, _ in terms]),
                                             density)
        monkeypatch.undo()
        assert torch.equal(ours[name], (base[name].float() + delta).to(base[name].dtype)), name


def test_dare_is_deterministic_across_workers_blocks_and_shard_layout(tmp_path, llama):
    base, a1 = llama
    a2 = testing.make_adapter(tmp_path / "a2", base, targets=("q_proj", "gate_proj"), r=4, seed=5)
    runs = []
    for i, opts in enumerate(({"workers": 1}, {"workers": 4, "max_memory": 1 << 20}, {"max_shard_size": 30_000})):
        out = tmp_path / f"o{i}"
        streammerge.merge(base=base, adapters=[(a1, 0.5), (a2, 0.5)], combination="dare_ties", density=0.5,
                          seed=11, out=out, device="cpu", **opts)
        runs.append(testing.load_dir(out))
    assert all(set(r) == set(runs[0]) for r in runs)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]) and torch.equal(runs[0][name], runs[2][name]), name
    other = tmp_path / "seed12"
    streammerge.merge(base=base, adapters=[(a1, 0.5), (a2, 0.5)], combination="dare_ties", density=0.5,
                      seed=12, out=other, device="cpu")
    assert testing.changed(testing.load_dir(other), runs[0])  # the seed matters


def test_dare_mask_keeps_density_and_is_independent_per_adapter():
    n = 1 << 20
    m0 = combine.dare_keep((1024, 1024), 0.3, seed=0, key="w", task=0, first_index=0).reshape(-1)
    m1 = combine.dare_keep((1024, 1024), 0.3, seed=0, key="w", task=1, first_index=0).reshape(-1)
    sigma = math.sqrt(0.3 * 0.7 / n)
    assert abs(m0.float().mean().item() - 0.3) < 5 * sigma
    assert abs((m0 & m1).float().mean().item() - 0.09) < 5 * math.sqrt(0.09 * 0.91 / n)
    assert abs((m0[1:] & m0[:-1]).float().mean().item() - 0.09) < 5 * math.sqrt(0.09 * 0.91 / n)  # neighbours
    t = torch.randn(1024, 1024)
    pruned = combine.dare_prune_(t.clone(), 0.3, seed=0, key="w", task=0, first_index=0).reshape(-1)
    assert torch.equal(pruned[m0], t.reshape(-1)[m0] / 0.3) and not pruned[~m0].any()  # rescale 1/density


@given(rows=st.integers(1, 40), cols=st.integers(1, 9), cut=st.integers(0, 40), seed=st.integers(0, 2**40),
       density=st.floats(0.05, 0.95))
def test_dare_mask_of_a_block_is_the_slice_of_the_whole(rows, cols, cut, seed, density):
    cut = min(cut, rows)
    whole = combine.dare_keep((rows, cols), density, seed=seed, key="t", task=1, first_index=0)
    top = combine.dare_keep((cut, cols), density, seed=seed, key="t", task=1, first_index=0)
    bottom = combine.dare_keep((rows - cut, cols), density, seed=seed, key="t", task=1, first_index=cut * cols)
    assert torch.equal(torch.cat([top, bottom]), whole)


@given(n=st.integers(1, 4), rows=st.integers(1, 12), cols=st.integers(1, 12), seed=st.integers(0, 2**31),
       density=st.sampled_from([0.1, 0.25, 0.5, 0.9, 1.0]), sign=st.sampled_from(["total", "frequency"]))
def test_operators_equal_peft_pieces_on_random_stacks(n, rows, cols, seed, density, sign):
    gen = torch.Generator().manual_seed(seed)
    tasks = [torch.randn(rows, cols, generator=gen) for _ in range(n)]
    weights = torch.randn(n, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns at density 1
        for method in ("ties", "magnitude_prune"):
            kw = {"majority_sign_method": sign} if method == "ties" else {}
            want = getattr(merge_utils, method)([t.clone() for t in tasks], weights, density, **kw)
            got = combine.combine_task_vectors(torch.stack(tasks), weights.tolist(), method, density,
                                               majority_sign=sign)
            assert torch.equal(got, want), method
        for t in tasks:
            k = int(density * t.numel())
            assert int(combine.top_magnitude_mask(t, k).sum()) == k
        stack = torch.stack(tasks)
        agree = merge_utils.calculate_majority_sign_mask(stack, sign)
        assert torch.equal(combine.majority_sign_mask(stack, sign), agree)
        assert torch.equal(combine.disjoint_merge_(stack.clone(), agree), merge_utils.disjoint_merge(stack, agree))


def test_top_magnitude_mask_breaks_ties_by_index():
    t = torch.tensor([[1.0, -2.0, 2.0], [0.5, 2.0, -3.0]])
    # |3| first, then two of the three |2|s: the lowest flat indices (1 and 2), not index 4
    assert combine.top_magnitude_mask(t, 3).tolist() == [[False, True, True], [False, False, True]]
    assert combine.top_magnitude_mask(t, 0).sum() == 0


# ---- heads, DoRA, argument errors


def _with_head(root: Path, base: Path, seed: int, **config) -> Path:
    adapter = testing.make_adapter(root, base, targets=("q_proj",), seed=seed,
                                   config={"modules_to_save": ["lm_head"], **config})
    path = adapter / "adapter_model.safetensors"
    sd = load_file(str(path))
    sd["base_model.model.lm_head.weight"] = torch.full(testing.base_shapes(base)["lm_head.weight"], float(seed))
    save_file(sd, str(path), metadata={"format": "pt"})
    return adapter


def test_two_saved_heads_are_never_blended(tmp_path, llama):
    base, _ = llama
    h1, h2 = _with_head(tmp_path / "h1", base, 1), _with_head(tmp_path / "h2", base, 2)
    with pytest.raises(PlanError, match=r"'lm_head.weight'.*heads are never blended: pass `heads_from`"):
        streammerge.merge(base=base, adapters=[h1, h2], out=tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()
    streammerge.merge(base=base, adapters=[(h1, 0.5), (h2, 0.5)], heads_from="h2", out=tmp_path / "out", device="cpu")
    head = testing.load_dir(tmp_path / "out")["lm_head.weight"]
    assert bool((head == 2).all())  # h2's head, untouched by the weights


def test_dora_is_not_combined(tmp_path, llama):
    base, a1 = llama
    dora = testing.make_adapter(tmp_path / "dora", base, config={"use_dora": True})
    with pytest.raises(UnsupportedAdapterError, match="DoRA adapter cannot be combined"):
        streammerge.plan_merge(base, adapters=[a1, dora])


def test_single_adapter_without_weights_is_the_peft_path(tmp_path, llama):
    base, adapter = llama
    plan = streammerge.plan_merge(base, adapter)
    assert all(s.combination is None and all(t.weight == 1.0 for t in s.terms) for t in plan.tasks() for s in t.steps)
    assert plan == streammerge.plan_merge(base, adapters=[(adapter, 1.0)])


@pytest.mark.parametrize(("extra", "message"), [
    pytest.param(["--weights", "0.5"], "--weights has 1 value(s) for 2 adapter(s)", id="count"),
    pytest.param(["--combination", "ties"], "--combination ties needs --density", id="density"),
    pytest.param(["--combination", "ties", "--density", "1.5"], "--density 1.5: must be in (0, 1]", id="range"),
    pytest.param(["--heads-from", "nope"], "--heads-from 'nope' is not one of the adapters", id="heads"),
])
def test_cli_argument_errors(tmp_path, llama, capsys, extra, message):
    base, a1 = llama
    a2 = testing.make_adapter(tmp_path / "a2", base, seed=3)
    code = main(["merge", "--base", str(base), "--adapter", str(a1), "--adapter", str(a2), "--out",
                 str(tmp_path / "out"), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_weighted_merge_equals_the_library(tmp_path, llama):
    base, a1 = llama
    a2 = testing.make_adapter(tmp_path / "a2", base, seed=3, targets=("k_proj",))
    args = ["merge", "--base", str(base), "--adapter", str(a1), "--adapter", str(a2), "--weights", "0.7,-0.3",
            "--combination", "magnitude_prune", "--density", "0.5", "-q", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    streammerge.merge(base=base, adapters=[(a1, 0.7), (a2, -0.3)], combination="magnitude_prune", density=0.5,
                      out=tmp_path / "lib", device="cpu")
    for f in (tmp_path / "lib").glob("*.safetensors"):
        assert f.read_bytes() == (tmp_path / "cli" / f.name).read_bytes()
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == json.loads((base / "config.json").read_text())


def test_whole_tensor_tasks_are_one_block_and_counted_whole(llama):
    base, a1 = llama
    plan = streammerge.plan_merge(base, adapters=[a1, a1], combination="ties", density=0.5)
    whole = [t for t in plan.tasks() if t.whole]
    assert len(whole) == 14
    from streammerge.plan import block_bytes

    assert plan.min_memory() == max(block_bytes(t, t.rows) for t in whole)
