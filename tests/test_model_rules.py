"""The model's own naming rules (``streammerge.model_rules``): transformers, the generated table, laziness, errors.

* The committed table is what ``python -m streammerge.model_rules`` writes from the installed transformers (drift).
* The table gives every family of the sweep the same disk names as transformers itself.
* A merge needing no rule never imports transformers; one that does imports it; with transformers switched off
  (``STREAMMERGE_NO_TRANSFORMERS=1``) the table alone merges the tie and rename families bit-exactly.
* A name that maps nowhere is one message naming the module, the spellings tried and the closest tensors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import transformers
from families import CLASSES, CONFIGS, build
from oracle import diff_checkpoints, load_checkpoint
from safetensors.torch import load_file, save_file

import streammerge
from streammerge import model_rules, testing
from streammerge.errors import PlanError
from streammerge.model_rules_table import TABLE

REPO = Path(__file__).resolve().parents[1]


def test_table_is_what_the_installed_transformers_generates() -> None:
    """Fails when transformers changes a tie or a rename: regenerate with ``python -m streammerge.model_rules``."""
    assert model_rules.generate_table() == TABLE


def test_table_covers_every_family_of_the_sweep() -> None:
    assert sorted(set(CLASSES.values()) - set(TABLE)) == []


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_table_gives_the_disk_names_transformers_gives(family: str) -> None:
    config = CONFIGS[family]()
    config.architectures = [CLASSES[family]]
    cfg = config.to_dict()
    exact = model_rules.from_transformers(cfg)
    table = model_rules.from_table(cfg)
    names = {*exact.tied, *exact.renames, *exact.order}
    assert {n: table.disk_name(n) for n in names} == {n: exact.disk_name(n) for n in names}
    assert [table.rank(m) for m in exact.order] == list(range(len(exact.order)))


def _run(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=300)


def test_merge_whose_names_resolve_does_not_import_transformers(tmp_path: Path) -> None:
    base = testing.make_checkpoint(tmp_path / "base", tied=True)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj", "lm_head"))
    out = tmp_path / "out"
    proc = _run(f"""
        import sys, streammerge
        streammerge.merge(base={str(base)!r}, adapter={str(adapter)!r}, out={str(out)!r}, device="cpu")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("transformers", "peft")))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rules-zoo")


@pytest.mark.parametrize("name", ["t5", "whisper_mts_proj_out", "gpt_neox_mts_embed_out", "vit", "roberta"])
def test_table_alone_merges_bit_exactly(name: str, zoo: Path) -> None:
    """transformers switched off: the table resolves ties, renames and face order; PEFT's bytes come out."""
    built = build(name, zoo)
    out = built.base_dir.parent / "out-table"
    proc = _run(f"""
        import sys, streammerge
        streammerge.merge(base={str(built.base_dir)!r}, adapter={str(built.adapter_dir)!r}, out={str(out)!r},
                          device="cpu")
        print(sorted(m for m in sys.modules if m.split(".")[0] == "transformers"))
    """, env={model_rules.NO_TRANSFORMERS_ENV: "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert diff_checkpoints(load_checkpoint(out), load_checkpoint(built.ref_dir)) == []
    tie = json.loads((out / "config.json").read_text()).get("tie_word_embeddings")
    assert tie == json.loads((built.ref_dir / "config.json").read_text()).get("tie_word_embeddings")


def test_rules_are_read_only_when_a_name_does_not_resolve(zoo: Path) -> None:
    built = build("dinov2", zoo)
    out = built.base_dir.parent / "out-lazy"
    proc = _run(f"""
        import sys, streammerge
        streammerge.merge(base={str(built.base_dir)!r}, adapter={str(built.adapter_dir)!r}, out={str(out)!r},
                          device="cpu")
        print("transformers" in sys.modules)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"


def test_name_mapping_nowhere_names_module_candidates_and_closest(tmp_path: Path) -> None:
    base = testing.make_checkpoint(tmp_path / "base", layers=1)
    adapter = testing.make_adapter(tmp_path / "adapter", base, targets=("q_proj",))
    path = adapter / "adapter_model.safetensors"
    sd = {k.replace("q_proj", "qq_proj"): v for k, v in load_file(path).items()}
    save_file(sd, path, metadata={"format": "pt"})
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["qq_proj"]}))
    with pytest.raises(PlanError) as err:
        streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    name = "model.layers.0.self_attn.qq_proj.weight"
    assert str(err.value) == (
        f"{path}: LoRA for module 'model.layers.0.self_attn.qq_proj' targets {name!r}, which is not in the base "
        f"checkpoint (tried {name!r}, 'layers.0.self_attn.qq_proj.weight', 'model.{name}', "
        f"'transformer.{name}', 'bert.{name}', 'roberta.{name}' and 2 more with the rules of transformers "
        f"{transformers.__version__} (LlamaForCausalLM); closest base tensors: "
        "'model.layers.0.self_attn.q_proj.weight', 'model.layers.0.self_attn.v_proj.weight', "
        "'model.layers.0.self_attn.o_proj.weight'); is this adapter for a different base model?"
    )
