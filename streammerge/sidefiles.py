"""Which non-weight files a merged checkpoint takes, and from where: tokenizer, chat template, processor.

Everything a processor needs comes along, copied byte for byte (never parsed or rewritten):

* the **tokenizer** (``tokenizer*``, ``special_tokens_map.json``, ``added_tokens.json``, vocabularies,
  Mistral's ``tekken.json``) as one set, from the first adapter directory that has a tokenizer (a
  fine-tune often adds tokens), else from the base. Files of two tokenizers are never mixed;
* the **chat template** (``chat_template.jinja``, ``chat_template.json``) from the first adapter that
  has one, else from wherever the tokenizer came from (a template file beside a tokenizer overrides
  the one inside its ``tokenizer_config.json``, so the base's must not land beside an adapter's tokenizer);
* **each** of ``generation_config.json``, ``preprocessor_config.json``, ``processor_config.json``,
  ``video_preprocessor_config.json``, ``image_processor_config.json``: the first adapter's copy, else the base's.

Adapter files proper (``adapter_config.json``, adapter weights) are never copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

TOKENIZER_FILES = (
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
    "sentencepiece.bpe.model", "tekken.json",
)
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "tekken.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
#: Taken one by one: the first adapter's copy, else the base's.
EACH_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "image_processor_config.json")


def _tokenizer_names(root: Path) -> list[str]:
    found = sorted(p.name for p in root.glob("tokenizer*") if p.is_file())
    return found + [n for n in TOKENIZER_FILES if (root / n).is_file()]


def side_files(base_root: Path, adapter_roots: Sequence[Path]) -> list[tuple[str, Path]]:
    """``(output name, source path)`` for every side file to copy, in a fixed order."""
    tok_root = next((r for r in adapter_roots if any((r / m).is_file() for m in TOKENIZER_MARKERS)), base_root)
    chat_root = next((r for r in adapter_roots if any((r / n).is_file() for n in CHAT_TEMPLATE_FILES)), tok_root)
    chosen: list[tuple[str, Path]] = []
    for name in EACH_FILES:
        src = next((r / name for r in (*adapter_roots, base_root) if (r / name).is_file()), None)
        if src is not None:
            chosen.append((name, src))
    chosen += [(name, tok_root / name) for name in _tokenizer_names(tok_root)]
    chosen += [(name, chat_root / name) for name in CHAT_TEMPLATE_FILES if (chat_root / name).is_file()]
    return chosen
