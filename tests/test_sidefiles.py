"""Everything a processor needs comes along, byte for byte, from the right place; config.json keeps the
base's keys (eos_token_id, dtype, quantization_config) unless the merge changes them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import streammerge
from streammerge import testing
from streammerge.output import write_side_files


def _odd(tag: str) -> bytes:
    """JSON no serializer would write back the same way: a copy that parses and re-dumps shows up."""
    return f'{{ "source":"{tag}" ,\n\t"x" : [1,2 ,3],  "u": "\\u00e9"  }}  \n'.encode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("side")
    base = testing.make_checkpoint(root / "base", layers=1, hidden=32, intermediate=64, vocab=64)
    adapter = testing.make_adapter(root / "adapter", base, targets=("q_proj",), r=4)
    return base, adapter


BASE_SIDE = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
             "chat_template.jinja", "chat_template.json", "generation_config.json", "preprocessor_config.json",
             "processor_config.json", "video_preprocessor_config.json")


def _setup(pair, tmp_path: Path, adapter_files: tuple[str, ...]) -> tuple[Path, Path, Path]:
    base, adapter = (shutil.copytree(p, tmp_path / p.name) for p in pair)
    for name in BASE_SIDE:
        (base / name).write_bytes(_odd(f"base:{name}"))
    for name in adapter_files:
        (adapter / name).write_bytes(_odd(f"adapter:{name}"))
    out = tmp_path / "out"
    streammerge.merge(base=base, adapter=adapter, out=out, device="cpu")
    return base, adapter, out


def _sources(out: Path) -> dict[str, str]:
    """Each copied side file's origin, asserting the bytes are exactly that origin's."""
    found = {}
    for p in out.iterdir():
        if p.name in BASE_SIDE:
            data = p.read_bytes()
            origin = json.loads(data)["source"]
            assert data == _odd(origin), p.name  # byte-identical, not re-serialized
            found[p.name] = origin.split(":")[0]
    return found


def test_each_processor_and_generation_file_comes_from_the_adapter_first_then_the_base(pair, tmp_path):
    _, _, out = _setup(pair, tmp_path, ("generation_config.json", "processor_config.json"))
    assert _sources(out) == {**dict.fromkeys(BASE_SIDE, "base"), "generation_config.json": "adapter",
                             "processor_config.json": "adapter"}


def test_a_tokenizer_comes_as_one_set_and_never_mixes_with_the_bases(pair, tmp_path):
    _, _, out = _setup(pair, tmp_path, ("tokenizer.json", "tokenizer_config.json"))
    # the base's tokenizer.model and chat templates would override or contradict the adapter's tokenizer
    assert _sources(out) == {"tokenizer.json": "adapter", "tokenizer_config.json": "adapter",
                             "generation_config.json": "base", "preprocessor_config.json": "base",
                             "processor_config.json": "base", "video_preprocessor_config.json": "base"}


def test_an_adapters_chat_template_alone_comes_with_the_bases_tokenizer(pair, tmp_path):
    _, _, out = _setup(pair, tmp_path, ("chat_template.jinja",))
    expected = {**dict.fromkeys(BASE_SIDE, "base"), "chat_template.jinja": "adapter"}
    del expected["chat_template.json"]  # templates come as a set too: the base's would sit beside the adapter's
    assert _sources(out) == expected
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()


def test_config_is_the_bases_bytes_when_the_merge_changes_nothing(pair, tmp_path):
    base, adapter = (shutil.copytree(p, tmp_path / p.name) for p in pair)
    doc = json.loads((base / "config.json").read_text())
    text = json.dumps({**doc, "eos_token_id": [2, 7], "torch_dtype": "bfloat16"}, indent=4) + "  \n"
    (base / "config.json").write_text(text)
    streammerge.merge(base=base, adapter=adapter, out=tmp_path / "out", device="cpu")
    assert (tmp_path / "out" / "config.json").read_text() == text


def test_config_updates_keep_every_other_key_as_the_base_had_it(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    config = {"model_type": "llama", "eos_token_id": [2, 7], "torch_dtype": "bfloat16", "dtype": "bfloat16",
              "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
              "tie_word_embeddings": True, "text_config": {"tie_word_embeddings": True, "vocab_size": 10}}
    out = tmp_path / "out"
    out.mkdir()
    write_side_files(out, base, [], config, [("tie_word_embeddings", False), ("vocab_size", 12)])
    written = json.loads((out / "config.json").read_text())
    assert list(written) == [*config, "vocab_size"]  # key order kept, the new key appended
    assert {k: written[k] for k in ("eos_token_id", "torch_dtype", "dtype", "quantization_config")} == {
        k: config[k] for k in ("eos_token_id", "torch_dtype", "dtype", "quantization_config")}
    assert written["tie_word_embeddings"] is False and written["vocab_size"] == 12
    assert written["text_config"] == {"tie_word_embeddings": False, "vocab_size": 12}
