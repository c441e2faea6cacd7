"""Which files of a repository directory are the base checkpoint's weights. Reads no tensor.

Hub repositories hold more than one model's weights side by side: GPT-OSS keeps the original
checkpoint under ``original/``, Mistral a ``consolidated.safetensors`` beside the HF shards,
diffusers pipelines one model per sub-folder (``text_encoder/``, ``transformer/``). So an index,
when there is one, is followed and the directory is never globbed past it. The order, first match
wins:

1. ``model.safetensors.index.json``: exactly the shards it names;
2. ``model.safetensors``;
3. ``pytorch_model.bin.index.json``, then ``pytorch_model.bin`` (pickled; read without running code);
4. no index but ``<stem>-0000k-of-0000n.safetensors`` (or ``.bin``) shards: the index is
   *reconstructed* from the complete set k = 1…n, with a note saying so (other weight files beside
   them are named and ignored); an incomplete set is refused, naming the missing shards;
5. exactly one other ``*.safetensors`` file.

An index is refused when a tensor is listed twice with two different shards, or when two of its
file names are the same file (``a.safetensors`` and ``./a.safetensors``, or two links to one blob):
both are named. ``subfolder`` selects a model inside a multi-model repository.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from streammerge.errors import CheckpointError
from streammerge.formats.jsonfile import read_json

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
BIN_SINGLE_NAME = "pytorch_model.bin"
DIFFUSERS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE_NAME = "diffusion_pytorch_model.safetensors"
#: (index, single file, the output index's name): transformers' names, diffusers' (a pipeline's
#: ``transformer/``, ``unet/``), then pickled transformers shards (written out as safetensors).
_NAMED = ((INDEX_NAME, SINGLE_NAME, INDEX_NAME), (DIFFUSERS_INDEX_NAME, DIFFUSERS_SINGLE_NAME, DIFFUSERS_INDEX_NAME),
          (BIN_INDEX_NAME, BIN_SINGLE_NAME, INDEX_NAME))

_SHARD_RE = re.compile(r"(?P<stem>.+)-(?P<k>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)")


@dataclass(frozen=True, slots=True)
class Layout:
    """The weight files of one base, relative to ``root``, and how they were found."""

    names: tuple[str, ...]
    index: dict | None  # the parsed index document, when one was followed
    index_path: Path | None
    notes: tuple[str, ...] = ()  # what a user should know (a reconstructed index, ignored files)
    output_index: str = INDEX_NAME  # the index a sharded output is written with (diffusers keeps its own name)


def resolve_subfolder(base: Path, subfolder: str | None) -> Path:
    """``base/subfolder`` after checking that it is a plain relative directory inside ``base``."""
    if not subfolder:
        return base
    p = PurePosixPath(subfolder.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise CheckpointError(
            f"base sub-folder {subfolder!r}: must be a folder name inside the base directory (like text_encoder)"
        )
    if not base.is_dir():
        raise CheckpointError(f"{base}: a base sub-folder ({subfolder!r}) needs a base directory, not a file")
    root = base.joinpath(*p.parts)
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: no such sub-folder of the base; the base has {_folders(base) or 'no sub-folders'}"
        )
    return root


def discover(root: Path) -> Layout:
    """The weight files of the base directory ``root`` (see the module docstring for the order)."""
    for index_name, single, output_index in _NAMED:
        if (root / index_name).is_file():
            return _follow_index(root, root / index_name, output_index)
        if (root / single).is_file():
            return Layout((single,), None, None, output_index=output_index)
    sharded = _reconstruct(root)
    if sharded is not None:
        return sharded
    candidates = sorted(p.name for p in root.glob("*.safetensors"))
    if len(candidates) == 1:
        return Layout((candidates[0],), None, None)
    if candidates:
        raise CheckpointError(
            f"{root}: {len(candidates)} *.safetensors files ({_listed(candidates)}) but no {INDEX_NAME}; "
            "restore the index file, or pass the path of a single .safetensors file as `base`"
        )
    bins = sorted(p.name for p in root.glob("pytorch_model*.bin"))
    hint = f" (found {', '.join(bins)} but no {BIN_INDEX_NAME})" if bins else ""
    inside = _weight_folders(root) if not bins else []
    sub = f"; its sub-folders {_listed(inside)} hold weights: pass `base_subfolder` NAME" if inside else ""
    raise CheckpointError(f"{root}: no *.safetensors checkpoint here{hint}{sub}; pass `base` DIR with the base model")


def _follow_index(root: Path, index_path: Path, output_index: str) -> Layout:
    index = _read_index(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: no 'weight_map' object; the index is corrupt: re-download it")
    spelled: dict[str, str] = {}  # normalized name -> first spelling in the index
    for tensor, file in weight_map.items():
        check_relative(index_path, tensor, file)
        spelled.setdefault(str(PurePosixPath(file)), file)
    names = sorted(spelled)
    _refuse_same_file(root, index_path, [spelled[n] for n in names])
    return Layout(tuple(names), index, index_path, output_index=output_index)


def _read_index(path: Path) -> dict:
    """The index JSON, refusing a tensor listed twice with two different shards (JSON keeps the last)."""

    def pairs(items: list[tuple[str, object]]) -> dict:
        doc: dict = {}
        for key, value in items:
            if key in doc and doc[key] != value:
                raise CheckpointError(
                    f"{path}: tensor {key!r} is listed twice, in {doc[key]} and in {value}; "
                    "the index is corrupt: re-download it"
                )
            doc[key] = value
        return doc

    return read_json(path, CheckpointError, object_pairs_hook=pairs)


def _refuse_same_file(root: Path, index_path: Path, names: Sequence[str]) -> None:
    """Two index entries that are one file on disk (a second spelling, or two links to one blob)."""
    seen: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(root / name)
        except OSError:
            continue  # reported by name when the shard is read
        first = seen.setdefault((st.st_dev, st.st_ino), name)
        if first != name:
            raise CheckpointError(
                f"{index_path}: shards {first} and {name} are the same file; the index lists one shard twice: "
                "fix the index (or re-download the checkpoint)"
            )


def check_relative(index_path: Path, tensor: str, file: object) -> None:
    """Refuse index entries that escape the base directory (absolute paths, ``..``)."""
    if not isinstance(file, str) or not file:
        raise CheckpointError(
            f"{index_path}: tensor {tensor!r} maps to {file!r}, not a file name; the index is corrupt"
        )
    p = PurePosixPath(file)
    suffix = ".bin" if index_path.name == BIN_INDEX_NAME else ".safetensors"
    if p.is_absolute() or ".." in p.parts or "\\" in file or not file.endswith(suffix):
        raise CheckpointError(
            f"{index_path}: tensor {tensor!r} maps to {file!r}, which is not a {suffix} file inside the "
            "base directory; refusing to read outside it: fix the index"
        )


def _reconstruct(root: Path) -> Layout | None:
    """``<stem>-0000k-of-0000n`` shards without an index: the complete set, or a refusal naming the gaps."""
    groups: dict[tuple[str, str, int], dict[int, str]] = {}
    for p in sorted(root.iterdir()):
        m = _SHARD_RE.fullmatch(p.name)
        if m and p.is_file() and (m["ext"] == "safetensors" or m["stem"] == "pytorch_model"):
            groups.setdefault((m["stem"], m["ext"], int(m["n"])), {})[int(m["k"])] = p.name
    safetensors = {k: v for k, v in groups.items() if k[1] == "safetensors"}
    groups = safetensors or groups
    if not groups:
        return None
    if len(groups) > 1:
        sets = [f"{stem}-*-of-{n:05d}.{ext}" for stem, ext, n in sorted(groups)]
        raise CheckpointError(
            f"{root}: no {INDEX_NAME} and several sets of shards ({', '.join(sets)}); "
            "restore the index file that says which set is the model"
        )
    (stem, ext, n), found = next(iter(groups.items()))
    width = len(next(iter(found.values())).rsplit("-of-", 1)[1].split(".")[0])
    missing = [f"{stem}-{k:0{width}d}-of-{n:0{width}d}.{ext}" for k in range(1, n + 1) if k not in found]
    extra = [found[k] for k in sorted(found) if not 1 <= k <= n]
    index_name = f"{stem}.{ext}.index.json"
    if missing or extra:
        what = f"{_listed(missing)} missing" if missing else f"{_listed(extra)} outside 1..{n}"
        raise CheckpointError(
            f"{root}: no {index_name}, and the shards {stem}-*-of-{n:0{width}d}.{ext} are incomplete ({what}); "
            "download the missing shard(s) or restore the index file"
        )
    names = tuple(found[k] for k in range(1, n + 1))
    others = sorted(p.name for p in root.glob(f"*.{ext}") if p.name not in names)
    ignored = f"; ignored {_listed(others)} beside them" if others else ""
    note = (f"{root}: no {index_name}: the index was reconstructed from the {n} shards "
            f"{names[0]} .. {names[-1]}{ignored}")
    output_index = f"{stem}.safetensors.index.json" if ext == "safetensors" else INDEX_NAME
    return Layout(names, None, None, (note,), output_index)


def _weight_folders(root: Path) -> list[str]:
    try:
        return sorted(d.name for d in root.iterdir() if d.is_dir() and any(d.glob("*.safetensors")))
    except OSError:
        return []


def _folders(base: Path) -> str:
    names = sorted(d.name for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    return f"sub-folders {_listed(names)}" if names else ""


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
