"""Every tuner beyond LoRA (issue 9), end to end against PEFT: adapter dir → plan → execute → shards.

For each tuner, on a tiny Llama (every linear layer) and a second family (Qwen2 with q/k/v biases, GPT-2
``Conv1D`` or a ``Conv2d`` model, whichever PEFT supports for that tuner; ``tuner_cases.CONFIGS``):

* every tensor of our output ``torch.equal`` to PEFT's ``merge_and_unload`` (saved), the targets changed;
* our output loaded back gives PEFT's merged model's logits exactly;
* ``verify`` passes and catches a flipped byte; ``--resume`` keeps every finished shard;
* unmerge gives, bit for bit, what PEFT's own ``unmerge_adapter`` gives after ``merge_adapter``;
* what PEFT cannot merge (prompt learning, a tuner on a layer type PEFT refuses) and what streammerge
  refuses (weighting or combining a tuner) exit 2 with one line naming the adapter and the reason.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import oracle
import peft
import pytest
import torch
import tuner_cases as tc
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import execute
from streammerge.cli import main
from streammerge.header import read_header

ALL = [pytest.param(t, f, id=f"{t}-{f}") for t, f in tc.cases()]
TUNERS = list(tc.CONFIGS)
FLIPPED = "model.layers.1.mlp.down_proj.weight"  # a target of every tuner's Llama case


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {"root": tmp_path_factory.mktemp("tuner-cases")}


def _case(built: dict, tuner: str, family: str) -> tuple[tc.TunerCase, Path]:
    """Build the case and merge it with streammerge once per module."""
    key = (tuner, family)
    if key not in built:
        case = tc.build(tuner, family, built["root"])
        out = case.base_dir.parent / "out"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out, device="cpu")
        built[key] = (case, out)
    return built[key]


@pytest.mark.parametrize(("tuner", "family"), ALL)
def test_tensors_bit_identical_to_peft(built, tuner, family):
    case, out = _case(built, tuner, family)
    ours, base = oracle.load_checkpoint(out), oracle.load_checkpoint(case.base_dir)
    assert oracle.diff_checkpoints(ours, case.ref) == []
    changed = sorted(k for k in ours if not torch.equal(ours[k], base[k]))
    layers = tc.config(tuner, family).target_modules
    assert all(any(f".{m}." in f".{k}" for k in changed) for m in layers), (layers, changed)


@pytest.mark.parametrize(("tuner", "family"), ALL)
def test_logits_match_peft(built, tuner, family):
    case, out = _case(built, tuner, family)
    ours = tc.forward(tc.load_output(family, out), family, case.inputs)
    assert torch.equal(ours, case.ref_logits)
    assert not torch.equal(ours, case.base_logits)


@pytest.mark.parametrize("tuner", TUNERS)
def test_verify_and_resume_from_out_alone_and_a_flip_is_caught(built, tuner, capsys):
    """The round trip of the brief: merge, then ``verify`` and ``--resume`` with nothing but ``--out``."""
    _, out = _case(built, tuner, "llama")
    assert main(["verify", "--out", str(out), "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    report = streammerge.verify(out=out, device="cpu")
    assert report.ok and report.tensors_recomputed == 14, report.problems
    sampled = streammerge.verify(out=out, device="cpu", sample=1)  # one block per tensor (whole tasks: all rows)
    assert sampled.ok and sampled.rows_recomputed <= report.rows_recomputed, sampled.problems
    stamps = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")}
    assert main(["merge", "--out", str(out), "--resume", "--device", "cpu", "-q"]) == 0, capsys.readouterr().err
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.safetensors")} == stamps
    flipped = out.parent / "flipped"
    shutil.copytree(out, flipped)
    shard = flipped / "model.safetensors"
    header = read_header(shard)
    info = header.by_name()[FLIPPED]
    data = bytearray(shard.read_bytes())
    data[header.data_start + info.begin + info.nbytes - 3] ^= 0x01
    shard.write_bytes(bytes(data))
    report = streammerge.verify(out=flipped, device="cpu")
    hits = [p for p in report.problems if repr(FLIPPED) in p]
    assert len(hits) == 1 and "1 byte(s) differ from the recomputation" in hits[0], report.problems
    assert main(["verify", "--out", str(flipped), "--device", "cpu", "-q"]) == 1


def _peft_unmerged(case: tc.TunerCase) -> dict[str, torch.Tensor]:
    """PEFT's unmerge of its own merge, in memory, names as in the base checkpoint."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = PeftModel.from_pretrained(tc.load_base(case.family, case.base_dir), case.adapter_dir)
        pm.merge_adapter()
        pm.unmerge_adapter()
        model = pm.base_model.model
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    return {k: state[k] for k in oracle.load_checkpoint(case.base_dir)}


@pytest.mark.parametrize(("tuner", "family"), ALL)
def test_unmerge_is_peft_unmerge(built, tuner, family):
    case, out = _case(built, tuner, family)
    back = out.parent / "unmerged"
    want = _peft_unmerged(case)
    if family == "llama_emb":
        # PEFT saves a targeted embedding whole (save_embedding_layers="auto"): a full tensor, restored from --base
        streammerge.unmerge(merged=out, adapter=case.adapter_dir, out=back, device="cpu", base=case.base_dir)
        want["model.embed_tokens.weight"] = oracle.load_checkpoint(case.base_dir)["model.embed_tokens.weight"]
    else:
        streammerge.unmerge(merged=out, adapter=case.adapter_dir, out=back, device="cpu")
    assert oracle.diff_checkpoints(oracle.load_checkpoint(back), want) == []
    report = streammerge.verify(out=back, device="cpu")  # the unmerge is replayed from its manifest too
    assert report.ok, report.problems


# ------------------------------------------------------------------------------------------------ refusals


def _cli(capsys, *args: str) -> tuple[int, str]:
    code = main([*args, "-q"])
    return code, capsys.readouterr().err


def test_prompt_learning_is_refused_with_the_reason(built, tmp_path, capsys):
    case, _ = _case(built, "ia3", "llama")
    model = tc.load_base("llama", case.base_dir)
    adapter = tmp_path / "prompt"
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    get_peft_model(model, config).save_pretrained(adapter)
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and not out.exists()
    assert err.strip().endswith(
        f"{adapter / 'adapter_config.json'}: peft_type 'PROMPT_TUNING' is a prompt-learning method: it adds virtual "
        "tokens or attention prefixes at inference and changes no weight, so there is nothing to merge (PEFT has no "
        "merge_and_unload for it either)"), err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("peft_type", "fragment"), [
    ("ADALORA", "peft_type 'ADALORA' is not supported (streammerge merges LORA, LOHA, LOKR, IA3, VERA, OFT, BOFT, "
                "FOURIERFT, HRA, MISS, C3A, ROAD, SHIRA, DELORA); use PEFT's merge_and_unload for this adapter type"),
    ("BONE", "peft_type 'BONE' is not supported (streammerge merges LORA, LOHA, LOKR, IA3, VERA, OFT, BOFT, FOURIERFT, "
             "HRA, MISS, C3A, ROAD, SHIRA, DELORA) (PEFT replaced Bone with MiSS: convert the adapter with PEFT's "
             "scripts/convert-bone-to-miss.py)"),
    ("XLORA", "peft_type 'XLORA' mixes LoRA experts per token at inference; PEFT cannot merge it either"),
])
def test_other_peft_types_are_refused_by_name(built, tmp_path, capsys, peft_type, fragment):
    case, _ = _case(built, "ia3", "llama")
    adapter = tmp_path / "ad"
    shutil.copytree(case.adapter_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": peft_type}))
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and fragment in err and str(adapter) in err and not out.exists(), err


def test_a_tuner_on_a_layer_type_peft_refuses_is_refused(built, tmp_path, capsys):
    """LoHa on GPT-2's Conv1D: PEFT raises 'Target module of type Conv1D not supported'; so do we, by module."""
    case, _ = _case(built, "ia3", "gpt2")
    with pytest.raises(TypeError, match="Conv1D"):
        get_peft_model(tc.load_base("gpt2", case.base_dir), peft.LoHaConfig(target_modules=["c_attn"]))
    adapter = tmp_path / "loha-on-conv1d"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["c_attn"]}))
    m = "base_model.model.transformer.h.0.attn.c_attn"
    save_file({f"{m}.hada_w1_a": torch.zeros(96, 4), f"{m}.hada_w1_b": torch.zeros(4, 32),
               f"{m}.hada_w2_a": torch.zeros(96, 4), f"{m}.hada_w2_b": torch.zeros(4, 32)},
              adapter / "adapter_model.safetensors")
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and not out.exists()
    assert ("module 'transformer.h.0.attn.c_attn': LoHa on an HF Conv1D layer, which PEFT does not support "
            "(it refuses to create it)") in err, err


def test_weighting_or_combining_a_tuner_is_refused(built, tmp_path, capsys):
    case, _ = _case(built, "loha", "llama")
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(case.adapter_dir),
                     "--weights", "0.5", "--out", str(out))
    assert code == 2 and not out.exists()
    assert (f"{case.adapter_dir}: a LOHA adapter cannot be weighted or combined with other adapters: its merge "
            "is not a low-rank delta that scales or sums (PEFT's add_weighted_adapter is LoRA-only); merge it alone"
            ) in err


def test_a_partial_unmerge_of_a_tuner_is_refused(built, tmp_path, capsys):
    case, out = _case(built, "oft", "llama")
    back = tmp_path / "back"
    code, err = _cli(capsys, "unmerge", "--merged", str(out), "--adapter", str(case.adapter_dir), "--weight", "0.5",
                     "--out", str(back))
    assert code == 2 and not back.exists()
    assert "cannot unmerge a OFT adapter with weight 0.5" in err, err


def test_a_tuner_key_for_an_untargeted_module_is_refused(built, tmp_path, capsys):
    """PEFT would load the adapter with strict=False and silently drop the tensor: refuse instead."""
    case, _ = _case(built, "hra", "llama")
    adapter = tmp_path / "ad"
    shutil.copytree(case.adapter_dir, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(adapter), "--out", str(out))
    assert code == 2 and "which adapter_config.json does not target" in err and not out.exists(), err


def test_vera_without_saved_projections_regenerates_them(tmp_path):
    """save_projection=False: PEFT redraws vera_A/B from projection_prng_key; so does streammerge."""
    torch.manual_seed(oracle.SEED)
    model = oracle.llama()().to(torch.bfloat16)
    base, adapter, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    model.save_pretrained(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(model, tc.config("vera", "llama", save_projection=False, projection_prng_key=5))
        tc.perturb(pm, 3)
        pm.save_pretrained(adapter)
        assert not any("vera_A" in k for k in load_file(adapter / "adapter_model.safetensors"))
        ref = PeftModel.from_pretrained(tc.load_base("llama", base), adapter).merge_and_unload()
        streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    want = {k: v for k, v in ref.state_dict().items() if k in oracle.load_checkpoint(base)}
    assert oracle.diff_checkpoints(oracle.load_checkpoint(out), want) == []


@pytest.mark.parametrize(("tuner", "family", "bias"), [("boft", "conv", "boft_only"), ("hra", "conv", "hra_only"),
                                                     ("vera", "gpt2", "vera_only"),
                                                     ("fourierft", "gpt2", "fourier_only")])
def test_trained_biases_beside_a_tuner(built, tuner, family, bias):
    """``bias="<tuner>_only"``: PEFT saves the trained biases whole (``base_layer.bias``); they replace the base's."""
    case = tc.build(tuner, family, built["root"], bias=bias)
    out = case.base_dir.parent / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out, device="cpu")
    saved = load_file(case.adapter_dir / "adapter_model.safetensors")
    assert any(k.endswith(".base_layer.bias") for k in saved)
    assert oracle.diff_checkpoints(oracle.load_checkpoint(out), case.ref) == []


# ------------------------------------------------------------------------------------------ row blocks


class Wide(torch.nn.Module):
    """One wide Linear (1024 rows) with a bias: cut into many 64-row blocks under a small budget."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(256, 1024)


ROW_BLOCKED = [("loha", peft.LoHaConfig, {"r": 4, "alpha": 8, "init_weights": False}),
               ("ia3", peft.IA3Config, {"init_ia3_weights": False, "feedforward_modules": []}),
               ("ia3-ff", peft.IA3Config, {"init_ia3_weights": False, "feedforward_modules": ["lin"]}),
               ("vera", peft.VeraConfig, {"r": 4, "init_weights": False}),
               ("shira", peft.ShiraConfig, {"r": 2, "init_weights": False}),
               ("miss", peft.MissConfig, {"r": 4, "init_weights": False}),
               ("miss-mini", peft.MissConfig, {"r": 4, "init_weights": "mini", "mini_r": 16})]


@pytest.mark.parametrize(("name", "cls", "kw"), [pytest.param(*c, id=c[0]) for c in ROW_BLOCKED])
def test_row_blocked_tuners_merge_block_by_block_bit_identical_to_peft(tmp_path, name, cls, kw):
    """Tuners whose rows are independent run in 64-row blocks (and cache-sized kernel chunks) on 2 workers."""
    torch.manual_seed(oracle.SEED)
    net = Wide().to(torch.bfloat16)
    base, adapter, out = tmp_path / "base", tmp_path / "ad", tmp_path / "out"
    base.mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(net, cls(target_modules=["lin"], **kw))
        tc.perturb(pm, oracle.SEED + 9)
        pm.save_pretrained(adapter)
    fresh = Wide().to(torch.bfloat16)
    fresh.load_state_dict(load_file(base / "model.safetensors"))
    ref = PeftModel.from_pretrained(fresh, adapter).merge_and_unload().state_dict()

    budget = 2 << 20
    (task,) = [t for t in streammerge.plan_merge(base=base, adapter=adapter).tasks() if t.name == "lin.weight"]
    opts = execute.ExecOptions(torch.device("cpu"), workers=2, max_memory=budget)
    assert not task.whole and execute.block_rows(task, opts) < task.rows  # really cut into blocks
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu", workers=2, max_memory=budget)
    ours = load_file(out / "model.safetensors")
    assert oracle.diff_checkpoints(ours, ref) == []
    assert not torch.equal(ours["lin.weight"], load_file(base / "model.safetensors")["lin.weight"])


def test_a_budget_below_a_whole_tensor_tuner_task_is_refused_with_the_need(built, tmp_path, capsys):
    """OFT rotates whole tensors: its task, with the in×in rotation scratch, is the plan's indivisible minimum."""
    case, _ = _case(built, "oft", "llama")
    plan = streammerge.plan_merge(base=case.base_dir, adapter=case.adapter_dir)
    down = next(t for t in plan.tasks() if t.name == "model.layers.0.mlp.down_proj.weight")
    assert down.whole and plan.min_memory() >= 3 * 4 * 128 * 128  # down_proj: in = 128
    out = tmp_path / "out"
    code, err = _cli(capsys, "merge", "--base", str(case.base_dir), "--adapter", str(case.adapter_dir),
                     "--out", str(out), "--max-memory", "100KB")
    assert code == 2 and "below this plan's minimum working set" in err and not out.exists(), err


@pytest.mark.parametrize("tuner", ["ia3", "boft"])
def test_modules_to_save_beside_a_tuner_replace_first_then_the_tuner_merges(built, tuner):
    """A trained lm_head (modules_to_save) is a full tensor: replaced as PEFT's load_state_dict does."""
    case = tc.build(tuner, "llama", built["root"], modules_to_save=["lm_head"])
    out = case.base_dir.parent / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streammerge.merge(base=case.base_dir, adapter=case.adapter_dir, out=out, device="cpu")
    ours, base = oracle.load_checkpoint(out), oracle.load_checkpoint(case.base_dir)
    assert oracle.diff_checkpoints(ours, case.ref) == []
    assert not torch.equal(ours["lm_head.weight"], base["lm_head.weight"])
    assert torch.equal(tc.forward(tc.load_output("llama", out), "llama", case.inputs), case.ref_logits)


# ------------------------------------------------------------------------------------------------ memory

WHOLE = [("lokr", peft.LoKrConfig, {"r": 4, "init_weights": False}),
         ("oft", peft.OFTConfig, {"r": 0, "oft_block_size": 32, "init_weights": False}),
         ("boft", peft.BOFTConfig, {"boft_block_size": 8, "init_weights": False}),
         ("fourierft", peft.FourierFTConfig, {"n_frequency": 1000, "init_weights": False}),
         ("hra", peft.HRAConfig, {"r": 8, "init_weights": False}),
         ("c3a", peft.C3AConfig, {"block_size": 64, "init_weights": False}),
         ("road", peft.RoadConfig, {"group_size": 64, "init_weights": False}),
         ("delora", peft.DeloraConfig, {"r": 8, "init_weights": False}),
         ("miss-bat", peft.MissConfig, {"r": 8, "init_weights": "bat"})]


class Square(torch.nn.Module):
    def __init__(self, n: int = 2048) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(n, n, bias=False)


@pytest.mark.parametrize(("name", "cls", "kw"), [pytest.param(*c, id=c[0]) for c in WHOLE])
def test_whole_tensor_tuners_run_within_their_stated_minimum(tmp_path, name, cls, kw):
    """A whole-tensor tuner task (2048×2048 bf16) is the plan's minimum budget; run at exactly that budget, the
    measured peak RSS growth stays within it plus the tensor handed out (``Update.work_elements`` is enough)."""
    from test_iter import SLACK, _probe

    torch.manual_seed(oracle.SEED)
    base, adapter = tmp_path / "base", tmp_path / "ad"
    base.mkdir()
    net = Square().to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, base / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(net, cls(target_modules=["lin"], **kw))
        tc.perturb(pm, oracle.SEED + 11)
        pm.save_pretrained(adapter)
    plan = streammerge.plan_merge(base=base, adapter=adapter)
    (task,) = plan.tasks()
    need = plan.min_memory()
    assert task.whole and need >= 16 * 2048 * 2048  # at least the fp32 working set of the whole tensor
    got = _probe(base, [str(adapter)], need)
    assert got["growth"] <= need + got["largest"] + SLACK, (got, need)
