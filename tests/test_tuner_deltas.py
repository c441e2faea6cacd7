"""Each tuner's merge math (``streammerge/tuners/<tuner>.py``) against PEFT's own layer, one tiny layer at a time.

For every tuner and base dtype (bf16, fp16, fp32): wrap a tiny ``nn.Linear`` (and a ``Conv2d`` /
``Embedding`` / GPT-2 ``Conv1D`` where PEFT supports the tuner there) with ``get_peft_model``, give the
adapter seeded non-trivial values, read the tensors PEFT would save (``get_peft_model_state_dict``,
keys matched by the tuner's ``SUFFIXES``), merge with PEFT's ``merge_and_unload`` and with ours from
the original weight: ``torch.equal``. Invertible tuners are also unmerged from PEFT's merged weight
and compared with PEFT's ``unmerge`` (``merge`` + ``unmerge_adapter``).
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from peft import get_peft_model, get_peft_model_state_dict
from torch import nn
from transformers.pytorch_utils import Conv1D

from streammerge.tuners import boft, c3a, delora, fourierft, hra, ia3, loha, lokr, miss, oft, road, shira, vera

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.bfloat16, torch.float16, torch.float32)]
IN, OUT = 64, 32


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(IN, OUT)
        self.conv = nn.Conv2d(8, 16, 3)
        self.conv1 = nn.Conv1d(8, 16, 3)
        self.emb = nn.Embedding(40, 16)
        self.c1d = Conv1D(OUT, IN)  # HF GPT-2 layer: weight (in, out)
        self.gconv = nn.Conv2d(8, 16, 3, groups=2)
        with torch.no_grad():
            self.c1d.weight.normal_(0, 0.2)
            self.c1d.bias.normal_(0, 0.2)

    def forward(self, x):  # pragma: no cover - merges only
        return self.lin(x)


def _wrapped(config, dtype: torch.dtype, seed: int = 0):
    """(PEFT model with perturbed adapter, base state dict before merging, saved adapter tensors)."""
    torch.manual_seed(seed)
    net = Net().to(dtype)
    base = {k: v.clone() for k, v in net.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(net, config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:  # the adapter's parameters (fp32 after PEFT's autocast)
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)
    saved = {k.removeprefix("base_model.model."): v.clone() for k, v in get_peft_model_state_dict(pm).items()}
    return pm, base, saved


def _factors(saved, module: str, suffixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """role -> fp32 tensor for ``module`` (integer tensors kept as they are)."""
    out = {}
    for role, suffix in suffixes.items():
        v = saved.get(module + suffix)
        if v is not None:
            out[role] = v.float() if v.is_floating_point() else v
    return out


def _merged(pm) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return copy.deepcopy(pm).merge_and_unload().state_dict()


def _unmerged(pm) -> dict[str, torch.Tensor]:
    """PEFT's unmerge of its own merge: ``merge_adapter`` then ``unmerge_adapter`` on a copy."""
    pm = copy.deepcopy(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.base_model.merge_adapter()
        merged = {k: v.clone() for k, v in pm.base_model.model.state_dict().items()}
        pm.base_model.unmerge_adapter()
    return merged, {k.replace(".base_layer", ""): v for k, v in pm.base_model.model.state_dict().items()
                    if "base_layer" in k}


def _check(pm, base, name, ours):
    ref = _merged(pm)[name]
    assert ours.dtype == ref.dtype == base[name].dtype
    assert not torch.equal(ref, base[name]), "the adapter must change the weight"
    assert torch.equal(ours, ref), f"{name}: max |Δ| {(ours.float() - ref.float()).abs().max().item()}"


def _check_unmerge(pm, name, fn):
    merged, restored = _unmerged(pm)
    ours = fn(merged[name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")])
    assert torch.equal(ours, restored[name])


# ------------------------------------------------------------------------------------------------ additive


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["lin", "conv", "conv1"])
def test_loha(dtype, target):
    cfg = peft.LoHaConfig(r=4, alpha=6, target_modules=[target], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    t, w = _factors(saved, target, loha.SUFFIXES), base[f"{target}.weight"]
    _check(pm, base, f"{target}.weight", loha.merge(w, t, 6 / 4))
    _check_unmerge(pm, f"{target}.weight", lambda m: loha.unmerge(m, t, 6 / 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_loha_rows_equal_whole(dtype):
    cfg = peft.LoHaConfig(r=4, alpha=6, target_modules=["lin"], init_weights=False)
    _, base, saved = _wrapped(cfg, dtype)
    t, w = _factors(saved, "lin", loha.SUFFIXES), base["lin.weight"]
    whole = loha.merge(w, t, 1.5)
    assert torch.equal(torch.cat([loha.merge(w[0:16], t, 1.5, 0, 16), loha.merge(w[16:], t, 1.5, 16, OUT)]), whole)


@pytest.mark.parametrize("dtype", DTYPES)
def test_loha_effective_conv2d(dtype):
    cfg = peft.LoHaConfig(r=4, alpha=8, target_modules=["conv"], init_weights=False, use_effective_conv2d=True)
    pm, base, saved = _wrapped(cfg, dtype)
    t = _factors(saved, "conv", loha.SUFFIXES)
    assert "t1" in t
    _check(pm, base, "conv.weight", loha.merge(base["conv.weight"], t, 2.0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "kw"), [("lin", {}), ("lin", {"decompose_both": True, "r": 2}),
                                            ("conv", {}), ("conv", {"use_effective_conv2d": True, "r": 2}),
                                            ("conv1", {})])
def test_lokr(dtype, target, kw):
    kw = {"r": 8, **kw}
    cfg = peft.LoKrConfig(alpha=6, target_modules=[target], init_weights=False, **kw)
    pm, base, saved = _wrapped(cfg, dtype)
    t, w = _factors(saved, target, lokr.SUFFIXES), base[f"{target}.weight"]
    _check(pm, base, f"{target}.weight", lokr.merge(w, t, 6 / kw["r"]))
    _check_unmerge(pm, f"{target}.weight", lambda m: lokr.unmerge(m, t, 6 / kw["r"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["lin", "c1d"])
def test_vera(dtype, target):
    cfg = peft.VeraConfig(r=4, target_modules=[target], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    t = _factors(saved, target, vera.SUFFIXES)
    t["A"], t["B"] = saved["base_model.vera_A"].float(), saved["base_model.vera_B"].float()
    fifo = target == "c1d"
    _check(pm, base, f"{target}.weight", vera.merge(base[f"{target}.weight"], t, fifo))
    _check_unmerge(pm, f"{target}.weight", lambda m: vera.unmerge(m, t, fifo))
    if not fifo:
        rows = torch.cat([vera.merge(base["lin.weight"][:16], t, False, 0, 16, (OUT, IN)),
                          vera.merge(base["lin.weight"][16:], t, False, 16, OUT, (OUT, IN))])
        assert torch.equal(rows, vera.merge(base["lin.weight"], t, False))


def test_vera_regenerated_projections_equal_saved():
    cfg = peft.VeraConfig(r=4, target_modules=["lin"], init_weights=False, projection_prng_key=7)
    _, _, saved = _wrapped(cfg, torch.float32)
    a, b = vera.regenerate(7, 4, OUT, IN)
    assert torch.equal(a, saved["base_model.vera_A"]) and torch.equal(b, saved["base_model.vera_B"])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("target", ["lin", "c1d"])
def test_fourierft(dtype, target):
    cfg = peft.FourierFTConfig(n_frequency=50, scaling=30.0, random_loc_seed=11, target_modules=[target],
                               init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    spec = _factors(saved, target, fourierft.SUFFIXES)["spectrum"]
    fifo = target == "c1d"
    _check(pm, base, f"{target}.weight", fourierft.merge(base[f"{target}.weight"], spec, 11, 30.0, fifo))
    _check_unmerge(pm, f"{target}.weight", lambda m: fourierft.unmerge(m, spec, 11, 30.0, fifo))


@pytest.mark.parametrize("dtype", DTYPES)
def test_shira(dtype):
    cfg = peft.ShiraConfig(r=2, target_modules=["lin"], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    t, w = _factors(saved, "lin", shira.SUFFIXES), base["lin.weight"]
    _check(pm, base, "lin.weight", shira.merge(w, t["weight"], t["indices"]))
    _check_unmerge(pm, "lin.weight", lambda m: shira.unmerge(m, t["weight"], t["indices"]))
    rows = torch.cat([shira.merge(w[:16], t["weight"], t["indices"], 0, 16, (OUT, IN)),
                      shira.merge(w[16:], t["weight"], t["indices"], 16, OUT, (OUT, IN))])
    assert torch.equal(rows, shira.merge(w, t["weight"], t["indices"]))


@pytest.mark.parametrize("dtype", DTYPES)
def test_delora(dtype):
    cfg = peft.DeloraConfig(r=4, target_modules=["lin"], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    t = _factors(saved, "lin", delora.SUFFIXES)
    _check(pm, base, "lin.weight", delora.merge(base["lin.weight"], t, 4))
    _check_unmerge(pm, "lin.weight", lambda m: delora.unmerge(m, t, 4))


@pytest.mark.parametrize("dtype", DTYPES)
def test_c3a(dtype):
    cfg = peft.C3AConfig(block_size=16, target_modules=["lin"], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    k = _factors(saved, "lin", c3a.SUFFIXES)["kernel"]
    _check(pm, base, "lin.weight", c3a.merge(base["lin.weight"], k))
    _check_unmerge(pm, "lin.weight", lambda m: c3a.unmerge(m, k))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("r", "mode", "mini_r"), [(4, True, 1), (6, False, 1), (4, "bat", 1), (4, "mini", 8)])
def test_miss(dtype, r, mode, mini_r):
    cfg = peft.MissConfig(r=r, target_modules=["lin"], init_weights=mode, mini_r=mini_r)
    pm, base, saved = _wrapped(cfg, dtype)
    b, w = _factors(saved, "lin", miss.SUFFIXES)["block"], base["lin.weight"]
    _check(pm, base, "lin.weight", miss.merge(w, b, mode, mini_r))
    _check_unmerge(pm, "lin.weight", lambda m: miss.unmerge(m, b, mode, mini_r))
    if miss.row_blocks(mode):
        rows = torch.cat([miss.merge(w[:16], b, mode, mini_r, 0, 16, OUT),
                          miss.merge(w[16:], b, mode, mini_r, 16, OUT, OUT)])
        assert torch.equal(rows, miss.merge(w, b, mode, mini_r))


# ------------------------------------------------------------------------------------------ multiplicative


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "ff"), [("lin", False), ("lin", True), ("c1d", False), ("c1d", True),
                                            ("conv", False), ("conv", True), ("gconv", False), ("gconv", True)])
def test_ia3(dtype, target, ff):
    cfg = peft.IA3Config(target_modules=[target], feedforward_modules=[target] if ff else [],
                         init_ia3_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    vec = _factors(saved, target, ia3.SUFFIXES)["l"]
    fifo = target == "c1d"
    w = base[f"{target}.weight"]
    _check(pm, base, f"{target}.weight", ia3.merge(w, vec, fifo, ff))
    if not ff:
        _check(pm, base, f"{target}.bias", ia3.merge_bias(base[f"{target}.bias"], vec))
        _check_unmerge(pm, f"{target}.bias", lambda m: ia3.unmerge_bias(m, vec))
    _check_unmerge(pm, f"{target}.weight", lambda m: ia3.unmerge(m, vec, fifo, ff))
    half = w.shape[0] // 2
    rows = torch.cat([ia3.merge(w[:half], vec, fifo, ff, 0, half, tuple(w.shape)),
                      ia3.merge(w[half:], vec, fifo, ff, half, w.shape[0], tuple(w.shape))])
    assert torch.equal(rows, ia3.merge(w, vec, fifo, ff))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "kw"), [
    ("lin", {"oft_block_size": 8}),
    ("lin", {"r": 4, "oft_block_size": 0, "use_cayley_neumann": False}),
    ("lin", {"oft_block_size": 16, "num_cayley_neumann_terms": 7}),
    ("lin", {"oft_block_size": 8, "block_share": True}),
    ("lin", {"oft_block_size": 8, "coft": True, "eps": 1e-3}),
    ("conv", {"oft_block_size": 8}),
    ("emb", {"oft_block_size": 4}),
])
def test_oft(dtype, target, kw):
    kw = {"r": 0, **kw}
    cfg = peft.OFTConfig(target_modules=[target], init_weights=False, **kw)
    pm, base, saved = _wrapped(cfg, dtype)
    emb = target == "emb"
    q = _factors(saved, target, oft.SUFFIXES)["emb_R" if emb else "R"]
    w = base[f"{target}.weight"]
    in_features = w.shape[1] if emb else w[0].numel()
    r = oft.rotation(q, in_features, coft=kw.get("coft", False), eps=kw.get("eps", 6e-5),
                     block_share=kw.get("block_share", False), neumann=kw.get("use_cayley_neumann", True),
                     terms=kw.get("num_cayley_neumann_terms", 5))
    _check(pm, base, f"{target}.weight", oft.merge(w, r, emb))
    if kw.get("coft"):  # PEFT's get_weight writes the COFT projection back into oft_R: unmerge projects twice
        q = oft.project(q, oft.block_size(q.shape[1]), kw["eps"])
        r = oft.rotation(q, in_features, coft=True, eps=kw["eps"])
    _check_unmerge(pm, f"{target}.weight", lambda m: oft.unmerge(m, r, emb))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "kw"), [("lin", {"boft_block_size": 8}),
                                            ("lin", {"boft_block_num": 4, "boft_block_size": 0}),
                                            ("lin", {"boft_block_size": 4, "boft_n_butterfly_factor": 2}),
                                            ("lin", {"boft_block_size": 2, "boft_n_butterfly_factor": 3}),
                                            ("conv", {"boft_block_size": 8})])
def test_boft(dtype, target, kw):
    cfg = peft.BOFTConfig(target_modules=[target], init_weights=False, **kw)
    pm, base, saved = _wrapped(cfg, dtype)
    t, w = _factors(saved, target, boft.SUFFIXES), base[f"{target}.weight"]
    m = boft.rotation(t["R"], w[0].numel())
    _check(pm, base, f"{target}.weight", boft.merge(w, m, t["s"]))
    _check_unmerge(pm, f"{target}.weight", lambda x: boft.unmerge(x, m, t["s"]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("target", "gs"), [("lin", False), ("lin", True), ("conv", False)])
def test_hra(dtype, target, gs):
    cfg = peft.HRAConfig(r=4, apply_GS=gs, target_modules=[target], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    u, w = _factors(saved, target, hra.SUFFIXES)["u"], base[f"{target}.weight"]
    _check(pm, base, f"{target}.weight", hra.merge(w, hra.householder(u, gs)))
    _check_unmerge(pm, f"{target}.weight", lambda m: hra.unmerge(m, hra.householder(u, gs, reverse=True)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["road_1", "road_2", "road_4"])
def test_road(dtype, variant):
    cfg = peft.RoadConfig(variant=variant, group_size=8, target_modules=["lin"], init_weights=False)
    pm, base, saved = _wrapped(cfg, dtype)
    t = _factors(saved, "lin", road.SUFFIXES)
    r = road.rotation(variant, 8, t["theta"], t["alpha"])
    _check(pm, base, "lin.weight", road.merge(base["lin.weight"], r))
    _check(pm, base, "lin.bias", road.merge(base["lin.bias"], r))
    _check_unmerge(pm, "lin.weight", lambda m: road.unmerge(m, r))
    _check_unmerge(pm, "lin.bias", lambda m: road.unmerge(m, r))
