"""Discover a base checkpoint: its shards' headers, its index and its config. No tensor is read.

A base is a directory holding ``model.safetensors.index.json`` and the shards it names, or a
directory holding one ``model.safetensors`` (or any single ``*.safetensors``), or a path to one
``.safetensors`` file (its ``config.json`` is then looked for beside it).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from types import MappingProxyType

from streammerge.errors import CheckpointError
from streammerge.formats import registry
from streammerge.formats.base import QuantIndex
from streammerge.formats.jsonfile import read_json
from streammerge.formats.safetensors import SafetensorsHeader, TensorInfo, read_header
from streammerge.layout import INDEX_NAME, discover, resolve_subfolder

LOG = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Headers of every shard of a base checkpoint, in shard order, plus its JSON side files."""

    root: Path  # directory holding the shards and config.json
    shards: tuple[SafetensorsHeader, ...]
    shard_names: tuple[str, ...]  # file names relative to root, parallel to ``shards``
    has_index: bool
    index_metadata: Mapping[str, object]
    config: Mapping[str, object]  # config.json ({} when absent)
    quant: QuantIndex | None = None  # how its weights are quantized (``formats.registry.detect``); None: plain
    notes: tuple[str, ...] = ()  # how the shards were found, when a user should know (``layout.Layout.notes``)
    repository: Path | None = None  # the directory given, when ``root`` is a sub-folder of it (``subfolder``)
    index_name: str = INDEX_NAME  # what a sharded output's index is called (diffusers' name for diffusers shards)

    def locate(self) -> dict[str, tuple[int, TensorInfo]]:
        """Map every tensor name to (shard number, its slot)."""
        return {t.name: (i, t) for i, shard in enumerate(self.shards) for t in shard.tensors}

    @property
    def total_bytes(self) -> int:
        return sum(s.data_size for s in self.shards)


def read_checkpoint(path: str | Path, subfolder: str | None = None) -> Checkpoint:
    """Read the headers of the base checkpoint at ``path`` (or of the model in its ``subfolder``).

    Raises:
        CheckpointError: missing or unreadable files, an index that disagrees with its shards or
            points outside the directory, a quantized checkpoint.
    """
    path = Path(path)
    notes: tuple[str, ...] = ()
    index_path, index_name = None, INDEX_NAME
    if path.is_file() and not subfolder:
        root, names, index = path.parent, (path.name,), None
    elif path.exists():
        root = resolve_subfolder(path, subfolder)
        found = discover(root)
        names, index, index_path, notes = found.names, found.index, found.index_path, found.notes
        index_name = found.output_index
    else:
        raise CheckpointError(f"{path}: base checkpoint not found; pass --base DIR (a directory with *.safetensors)")
    shards = tuple(_read_shard(root / name) for name in names)
    _check_unique(root, names, shards)
    if index is not None and index_path is not None:
        _check_index(root, index_path, names, shards, index)
    ckpt = Checkpoint(
        root=root,
        shards=shards,
        shard_names=names,
        has_index=index is not None,
        index_metadata=MappingProxyType(dict(index.get("metadata") or {})) if index else MappingProxyType({}),
        config=MappingProxyType(read_json(root / "config.json", CheckpointError, missing_ok=True)),
        notes=notes,
        repository=path if subfolder else None,
        index_name=index_name,
    )
    for note in notes:
        LOG.warning("%s", note)
    return replace(ckpt, quant=detect_quantization(ckpt))


def _read_shard(path: Path) -> SafetensorsHeader:
    if path.suffix != ".bin":
        return read_header(path)
    from streammerge.formats.torchbin import read_pickle_index  # torch is needed only for pickled checkpoints

    LOG.info("%s: pickled shard, read with torch.load(weights_only=True, mmap=True)", path)
    return read_pickle_index(path)


def output_name(shard: str) -> str:
    """The output file for a base shard: pickled ``pytorch_model*.bin`` shards become safetensors."""
    if shard.endswith(".bin") and shard.startswith("pytorch_model"):
        return "model" + shard.removeprefix("pytorch_model").removesuffix(".bin") + ".safetensors"
    return shard


def _check_unique(root: Path, names: tuple[str, ...], shards: tuple[SafetensorsHeader, ...]) -> dict[str, str]:
    """Tensor name -> its shard, refusing a tensor stored in two shards (naming both)."""
    seen: dict[str, str] = {}
    for name, shard in zip(names, shards, strict=True):
        for t in shard.tensors:
            if t.name in seen:
                raise CheckpointError(
                    f"{root}: tensor {t.name!r} is in both {seen[t.name]} and {name}; fix the checkpoint"
                )
            seen[t.name] = name
    return seen


def _check_index(root: Path, index_path: Path, names: tuple[str, ...], shards: tuple[SafetensorsHeader, ...],
                 index: dict) -> None:
    weight_map: dict[str, str] = {t: str(PurePosixPath(f)) for t, f in index["weight_map"].items()}
    seen = _check_unique(root, names, shards)
    for tensor, file in weight_map.items():
        if seen.get(tensor) != file:
            where = f"is in {seen[tensor]}" if tensor in seen else "is in no shard"
            raise CheckpointError(
                f"{root}: tensor {tensor!r} is indexed in {file} but {where}; "
                "the index and shards disagree"
            )
    extra = sorted(set(seen) - set(weight_map))
    if extra:
        raise CheckpointError(
            f"{index_path}: tensor {extra[0]!r} (in {seen[extra[0]]}) is missing from the index "
            f"({len(extra)} unindexed in all); the index and shards disagree"
        )


def detect_quantization(ckpt: Checkpoint) -> QuantIndex | None:
    """The checkpoint's quantization (``formats.registry``), or None for a plain checkpoint.

    Raises:
        CheckpointError: quantized-looking tensors without a ``quantization_config`` (named with their shard),
            an unknown or unsupported format, or malformed quantized tensors (named).
    """
    if ckpt.config.get("quantization_config") is None:
        for shard in ckpt.shards:
            for t in shard.tensors:
                kind = registry.marker(t.name)
                if kind:
                    raise CheckpointError(
                        f"{shard.path}: tensor {t.name!r} shows a {kind} quantized base, but config.json has no "
                        "quantization_config to say how to read it: restore the model's config.json, or merge "
                        "into the full-precision (bf16/fp16) base instead"
                    )
    tensors = {t.name: t for shard in ckpt.shards for t in shard.tensors}
    where = {t.name: shard for shard in ckpt.shards for t in shard.tensors}

    def read(name: str) -> bytes:
        """A small stored tensor's bytes (bitsandbytes' JSON quant states), read straight from its shard."""
        shard, t = where[name], tensors[name]
        try:
            with open(shard.path, "rb") as f:
                f.seek(shard.data_start + t.begin)
                data = f.read(t.nbytes)
        except OSError as e:
            raise CheckpointError(f"{shard.path}: cannot read tensor {name!r} ({e.strerror or e})") from e
        if len(data) != t.nbytes:
            raise CheckpointError(f"{shard.path}: tensor {name!r} is truncated; re-download the file")
        return data

    return registry.detect(ckpt.config, tensors, str(ckpt.root / "config.json"), read)
