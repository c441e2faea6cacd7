"""Every refusal of issue 3: exit status 2, one ``error:`` line naming the tensor or option, no output.

Each case breaks a tiny synthetic base or adapter (``streammerge.testing``) in one way. The fragment
checked is the part of the message that names the culprit; the output path must not exist afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from streammerge import testing
from streammerge.cli import main

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


def _config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _tensors(path: Path, fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    save_file(fn(load_file(str(path))), str(path), metadata={"format": "pt"})


def _quantize(base: Path, suffix: str, dtype: torch.dtype = torch.uint8) -> None:
    """Add a quantization side tensor beside q_proj, as bitsandbytes/GPTQ/FP8 checkpoints have."""
    _tensors(base / "model.safetensors",
             lambda t: t | {f"model.layers.0.self_attn.q_proj.{suffix}": torch.zeros(4, dtype=dtype)})


def _drop_module(adapter: Path, module: str) -> None:
    _tensors(adapter / "adapter_model.safetensors", lambda t: {k: v for k, v in t.items() if module not in k})


def _init(method: str) -> Callable[[Path, Path], None]:
    return lambda b, a: _config(a, init_lora_weights=method)


# (id, break(base, adapter), fragment the one-line message must contain)
CASES: list[tuple[str, Callable[[Path, Path], None], str]] = [
    # adapter files that disagree with their config (PEFT would silently ignore or merge random weights)
    ("untargeted-key", lambda b, a: _config(a, target_modules=["q_proj"]),
     f"'{Q0.replace('q_proj', 'v_proj')}.lora_A.weight' is for module 'model.layers.0.self_attn.v_proj', "
     "which adapter_config.json does not target"),
    ("untargeted-by-layers", lambda b, a: _config(a, layers_to_transform=[1]),
     "which adapter_config.json does not target"),
    ("untargeted-by-exclude", lambda b, a: _config(a, exclude_modules=["v_proj"]),
     "self_attn.v_proj', which adapter_config.json does not target"),
    ("targeted-without-keys-random-init",
     lambda b, a: (_config(a, init_lora_weights=False), _drop_module(a, "layers.1.self_attn.q_proj.")),
     "targets module 'model.layers.1.self_attn.q_proj' with init_lora_weights=false"),
    ("magnitude-without-use-dora",
     lambda b, a: _tensors(a / "adapter_model.safetensors",
                           lambda t: t | {f"{Q0}.lora_magnitude_vector": torch.ones(64)}),
     f"'{Q0}.lora_magnitude_vector' is a DoRA magnitude but use_dora is false"),
    ("use-dora-without-magnitude", lambda b, a: _config(a, use_dora=True),
     "use_dora is true but module 'model.layers.0.self_attn.q_proj' has no DoRA lora_magnitude_vector"),
    ("token-delta-not-configured",
     lambda b, a: _tensors(a / "adapter_model.safetensors",
                           lambda t: t | {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta":
                                          torch.ones(2, 64)}),
     "trainable_token_indices does not name this module"),
    ("token-delta-wrong-count",
     lambda b, a: (_config(a, trainable_token_indices=[1, 2, 3]), _tensors(
         a / "adapter_model.safetensors",
         lambda t: t | {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta":
                        torch.ones(2, 64)})),
     "trainable_token_indices gives 3 distinct row(s) of 'model.embed_tokens.weight'"),
    ("resized-vocab-without-head",
     lambda b, a: _tensors(a / "adapter_model.safetensors",
                           lambda t: t | {"base_model.model.model.embed_tokens.weight": torch.ones(134, 64)}),
     "resizes the vocabulary to 134 rows but carries no resized 'lm_head.weight'"),
    # quantized bases (spec §6.3)
    ("bnb-4bit", lambda b, a: _quantize(b, "weight.absmax", torch.float32), "bitsandbytes 4-bit"),
    ("bnb-4bit-quant-state", lambda b, a: _quantize(b, "weight.quant_state.bitsandbytes__nf4"), "quantized base"),
    ("bnb-8bit", lambda b, a: _quantize(b, "SCB", torch.float32), "'model.layers.0.self_attn.q_proj.SCB'"),
    ("gptq-awq", lambda b, a: _quantize(b, "qweight", torch.int32), "GPTQ/AWQ"),
    ("fp8", lambda b, a: _quantize(b, "weight_scale_inv", torch.float32), "FP8"),
    ("quant-config", lambda b, a: (b / "config.json").write_text(json.dumps(
        json.loads((b / "config.json").read_text()) | {"quantization_config": {"quant_method": "awq"}})),
     "quantization_config.quant_method='awq'"),
    # init methods that change the base at load (spec §1.3)
    *[(f"init-{m}", _init(m), f"init_lora_weights={m!r}")
      for m in ("pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga")],
    ("kasa", lambda b, a: _config(a, kasa_config={"r": 8}), "kasa_config is set"),
    # options PEFT cannot (or should not) merge
    ("layer-replication", lambda b, a: _config(a, layer_replication=[[0, 2]]), "layer_replication is set"),
    ("alora", lambda b, a: _config(a, alora_invocation_tokens=[5, 6]), "alora_invocation_tokens is set"),
    ("arrow", lambda b, a: _config(a, arrow_config={"top_k": 2}), "arrow_config is set"),
    ("qalora", lambda b, a: _config(a, use_qalora=True), "use_qalora is set"),
    ("unknown-peft-type", lambda b, a: _config(a, peft_type="BONE"), "peft_type 'BONE' is not supported"),
    ("other-lora-variant",
     lambda b, a: _tensors(a / "adapter_model.safetensors", lambda t: t | {f"{Q0}.lora_diag": torch.ones(8)}),
     f"'{Q0}.lora_diag'"),
    ("pickled-adapter-not-zip",
     lambda b, a: ((a / "adapter_model.safetensors").unlink(), (a / "adapter_model.bin").write_bytes(b"\x80\x02}q.")),
     "adapter_model.bin: cannot read as a torch zip checkpoint"),
]


@pytest.mark.parametrize(("breaker", "fragment"), [pytest.param(b, f, id=i) for i, b, f in CASES])
def test_refused_with_one_line_exit_2_nothing_written(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                      breaker: Callable[[Path, Path], None], fragment: str) -> None:
    base = testing.make_checkpoint(tmp_path / "base", layers=2, hidden=64, intermediate=128, vocab=128)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj", "v_proj"))
    breaker(base, adapter)
    out = tmp_path / "out"
    code = main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()  # one line, or a summary line and one line per problem
    assert lines[0].startswith("error: ") and all(line.startswith("  ") for line in lines[1:]), err
    assert len(lines) == 1 or lines[0].startswith(f"error: {len(lines) - 1} problems fitting the adapter(s) "), err
    assert any(fragment in line for line in lines)
    assert not out.exists()


def test_untouched_adapter_merges(tmp_path: Path) -> None:
    """The control: the same fixture, unbroken, merges (so each refusal above is the break's doing)."""
    base = testing.make_checkpoint(tmp_path / "base", layers=2, hidden=64, intermediate=128, vocab=128)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj", "v_proj"))
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "out"), "-q"]) == 0


def test_missing_keys_accepted_when_peft_init_is_a_no_op(tmp_path: Path) -> None:
    """With the default init (B = 0) PEFT's merge of a key-less targeted module changes nothing: accepted."""
    base = testing.make_checkpoint(tmp_path / "base", layers=2, hidden=64, intermediate=128, vocab=128)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj", "v_proj"))
    _drop_module(adapter, "layers.1.self_attn.q_proj.")
    out = tmp_path / "out"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out), "-q"]) == 0
    assert torch.equal(load_file(out / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"],
                       load_file(base / "model.safetensors")["model.layers.1.self_attn.q_proj.weight"])
