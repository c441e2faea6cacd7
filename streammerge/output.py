"""The output directory: safety checks before anything is written, and the non-tensor files.

The output never aliases an input: it may not be, contain, or lie inside the base or any
adapter directory. It must not exist, or be empty, unless ``overwrite`` or ``resume`` is given; even
then, streammerge only ever deletes what it wrote itself (the files its manifest or progress record
lists, and its temporaries): a directory holding anything else is refused, naming those files. Only the files
a Hugging Face checkpoint needs are written beside the shards: ``config.json`` (updated where the
merge changed it), ``generation_config.json``, tokenizer and processor files. Tokenizer files come
from the first adapter directory that has a tokenizer (a fine-tune often adds tokens), else from the
base. Adapter files are never copied.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from streammerge import manifest
from streammerge.checkpoint import INDEX_NAME
from streammerge.errors import OutputError
from streammerge.writer import write_atomic

LOG = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
    "chat_template.json",
)
#: Files taken from the base as they are (config.json is rewritten separately).
BASE_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
              "video_preprocessor_config.json", "image_processor_config.json")
_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


_LISTED = 5  # foreign files named in a refusal


def check_output(out: Path, inputs: Iterable[Path], *, overwrite: bool, resume: bool = False) -> None:
    """Refuse an output path that aliases an input, or holds files (unless ``overwrite``/``resume``), or
    holds files streammerge did not write (always: they would have to be deleted)."""
    target = out.resolve()
    for inp in inputs:
        src = inp.resolve()
        if target == src or src.is_relative_to(target) or target.is_relative_to(src):
            relation = "is" if target == src else ("contains" if src.is_relative_to(target) else "lies inside")
            raise OutputError(
                f"{out}: the output {relation} the input directory {inp}; inputs are never modified: "
                "choose an `out` outside the base and adapter directories"
            )
    if target.exists() and not target.is_dir():
        raise OutputError(f"{out}: exists and is not a directory; choose another `out`")
    if not target.is_dir() or not any(target.iterdir()):
        return
    records = [n for n in (manifest.PROGRESS_NAME, manifest.MANIFEST_NAME) if (target / n).is_file()]
    if not (overwrite or resume):
        if records:
            state = "an unfinished" if manifest.PROGRESS_NAME in records else "a finished"
            raise OutputError(f"{out}: directory is not empty: it holds {state} streammerge output; pass `resume` "
                              "to continue it (kept where it matches), `overwrite` to replace it, or choose a new `out`")
        raise OutputError(f"{out}: directory is not empty; choose a new or empty `out` (streammerge never deletes "
                          "files it did not write)")
    if resume and not overwrite and not records and not manifest.owned_names(target):
        return  # Progress.start names it: not a streammerge output to resume
    foreign = manifest.foreign_names(target)
    if foreign:
        shown = ", ".join(foreign[:_LISTED]) + (f" (and {len(foreign) - _LISTED} more)" if len(foreign) > _LISTED
                                               else "")
        flag = "`overwrite`" if overwrite else "`resume`"
        raise OutputError(f"{out}: holds files streammerge did not write: {shown}; {flag} only replaces "
                          "streammerge's own files: move those away or choose another `out`")


def prepare_output(out: Path, *, overwrite: bool) -> bool:
    """Create ``out`` (parents too); with ``overwrite``, first delete what streammerge wrote there (never
    anything else). Returns True when this call created it."""
    if out.is_dir():
        if overwrite:
            manifest.remove_owned(out)
        return False
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e}); choose another `out`") from e
    return True


def updated_config(config: Mapping[str, object], updates: Sequence[tuple[str, object]]) -> dict:
    """The base config with the plan's updates applied (key order kept, new keys appended)."""
    doc = dict(config)
    for key, value in updates:
        doc[key] = value
        text = doc.get("text_config")
        if key in ("vocab_size", "tie_word_embeddings") and isinstance(text, dict) and key in text:
            doc["text_config"] = {**text, key: value}
    return doc


def write_side_files(
    out: Path, base_root: Path, adapter_roots: Sequence[Path], config: Mapping[str, object],
    updates: Sequence[tuple[str, object]],
) -> list[str]:
    """Write config.json and copy generation/tokenizer/processor files. Returns the names written."""
    written: list[str] = []
    if config:
        text = json.dumps(updated_config(config, updates), indent=2, ensure_ascii=False) + "\n"
        write_atomic(out / "config.json", text.encode("utf-8"))
        written.append("config.json")
    for src in _copied(base_root, adapter_roots):
        write_atomic(out / src.name, src.read_bytes())
        written.append(src.name)
    LOG.info("copied %s (tokenizer from %s)", ", ".join(written) or "no side files", _tokenizer_root(base_root,
                                                                                                       adapter_roots))
    return written


def side_file_names(base_root: Path, adapter_roots: Sequence[Path], config: Mapping[str, object]) -> list[str]:
    """The names ``write_side_files`` will write."""
    return [*(["config.json"] if config else []), *(p.name for p in _copied(base_root, adapter_roots))]


def _tokenizer_root(base_root: Path, adapter_roots: Sequence[Path]) -> Path:
    return next((r for r in adapter_roots if any((r / m).is_file() for m in _TOKENIZER_MARKERS)), base_root)


def _copied(base_root: Path, adapter_roots: Sequence[Path]) -> list[Path]:
    tok_root = _tokenizer_root(base_root, adapter_roots)
    return [root / name for root, names in ((base_root, BASE_FILES), (tok_root, TOKENIZER_FILES))
            for name in names if (root / name).is_file()]


def write_index(out: Path, index_json: str) -> None:
    write_atomic(out / INDEX_NAME, index_json.encode("utf-8"))
