"""The output directory: safety checks before anything is written, and the non-tensor files.

The output never aliases an input: it may not be, contain, or lie inside the base or any
adapter directory. It must not exist, or be empty, unless ``overwrite`` or ``resume`` is given; even
then, streammerge only ever deletes what it wrote itself (the files its manifest or progress record
lists, and its temporaries): a directory holding anything else is refused, naming those files. Only the files
a Hugging Face checkpoint needs are written beside the shards: ``config.json`` (the base's bytes, or
re-serialized with the merge's updates when it made any; every other key kept as the base had it), and the
generation, tokenizer, chat-template and processor files chosen by ``streammerge.sidefiles``, byte for byte.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from streammerge import ownership
from streammerge.checkpoint import INDEX_NAME
from streammerge.errors import OutputError
from streammerge.sidefiles import side_files
from streammerge.writer import write_atomic

LOG = logging.getLogger(__name__)



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
    records = [n for n in (ownership.PROGRESS_NAME, ownership.MANIFEST_NAME) if (target / n).is_file()]
    if not (overwrite or resume):
        if records:
            state = "an unfinished" if ownership.PROGRESS_NAME in records else "a finished"
            raise OutputError(
                f"{out}: directory is not empty: it holds {state} streammerge output; pass `resume` to continue it "
                "(kept where it matches), `overwrite` to replace it, or choose a new `out`"
            )
        raise OutputError(f"{out}: directory is not empty; choose a new or empty `out` (streammerge never deletes "
                          "files it did not write)")
    if resume and not overwrite and not records and not ownership.owned_names(target):
        return  # Progress.start names it: not a streammerge output to resume
    foreign = ownership.foreign_names(target)
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
            ownership.remove_owned(out)
        return False
    try:
        out.mkdir(parents=True)
    except OSError as e:
        raise OutputError(f"{out}: cannot create the output directory ({e.strerror or e}); choose another `out`") from e
    return True


def updated_config(config: Mapping[str, object], updates: Sequence[tuple[str, object]],
                   removals: Sequence[str] = ()) -> dict:
    """The base config with the plan's updates applied (key order kept, new keys appended), ``removals`` gone."""
    doc = {k: v for k, v in config.items() if k not in removals}
    for key, value in updates:
        doc[key] = value
        text = doc.get("text_config")
        if key in ("vocab_size", "tie_word_embeddings") and isinstance(text, dict) and key in text:
            doc["text_config"] = {**text, key: value}
    return doc


def write_side_files(
    out: Path, base_root: Path, adapter_roots: Sequence[Path], config: Mapping[str, object],
    updates: Sequence[tuple[str, object]], removals: Sequence[str] = (),
) -> list[str]:
    """Write config.json and copy generation/tokenizer/processor files. Returns the names written."""
    written: list[str] = []
    if config:
        if updates or removals or not (base_root / "config.json").is_file():
            doc = updated_config(config, updates, removals)
            data = (json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        else:
            data = (base_root / "config.json").read_bytes()  # nothing changed: the base's bytes
        write_atomic(out / "config.json", data)
        written.append("config.json")
    for name, src in side_files(base_root, adapter_roots):
        write_atomic(out / name, src.read_bytes())
        written.append(name)
        LOG.debug("copied %s from %s", name, src.parent)
    LOG.info("copied %s", ", ".join(written) or "no side files")
    return written


def side_file_names(base_root: Path, adapter_roots: Sequence[Path], config: Mapping[str, object]) -> list[str]:
    """The names ``write_side_files`` will write."""
    return [*(["config.json"] if config else []), *(name for name, _ in side_files(base_root, adapter_roots))]


def write_index(out: Path, index_json: str, name: str = INDEX_NAME) -> None:
    write_atomic(out / name, index_json.encode("utf-8"))
