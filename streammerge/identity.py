"""What a merge's bytes depend on: the identity of its inputs and of each output shard.

A shard's identity is the SHA-256 of the tool version, every input's identity, the byte-changing
options, the shard's precomputed header and its task list with sources named relative to the inputs.
Inputs are identified by content, cheaply: a base shard by file name, size and the SHA-256 of its
header bytes (of its tensor index for a pickled ``.bin``; the tensor bytes are not hashed: that would
read the whole base, so a base edited in place with the same header and size is not noticed by
--resume, only by ``verify``); an adapter by the SHA-256 of ``adapter_config.json`` and of its weights
file (small). ``manifest`` records identities; ``--resume``, ``finalize`` and ``verify`` compare them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from streammerge.adapter import CONFIG_NAME, Adapter
from streammerge.checkpoint import Checkpoint
from streammerge.errors import CheckpointError
from streammerge.formats.safetensors import SafetensorsHeader
from streammerge.plan import ShardPlan, TensorRef

_READ_CHUNK = 8 << 20


def tool_version() -> str:
    """The installed distribution's version (``0+unknown`` from a source tree that is not installed)."""
    try:
        return importlib.metadata.version("streammerge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def file_sha256(path: Path) -> str:
    """SHA-256 (hex) of a whole file, read in chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _optional_sha(path: Path) -> str | None:
    return file_sha256(path) if path.is_file() else None


@dataclass(frozen=True, slots=True)
class Identity:
    """What a merge's bytes depend on, as JSON-able values; ``labels`` names input files portably."""

    tool: str
    inputs: Mapping[str, object]
    options: Mapping[str, object]
    labels: Mapping[str, str]  # absolute input file path -> "base/<file>" | "adapter<i>/<file>"
    #: Where the inputs were (absolute paths), for ``verify --out`` alone; not part of any identity.
    sources: Mapping[str, object] = dataclasses.field(default_factory=dict)

    def shard(self, shard: ShardPlan) -> str:
        """The identity of one output shard of the current plan (hex SHA-256)."""
        doc = {
            "tool": self.tool, "inputs": self.inputs, "options": self.options, "file": shard.filename,
            "header_sha256": _sha(shard.header), "tasks": [_portable(t, self.labels) for t in shard.tasks],
        }
        return _sha(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8"))


def identify(ckpt: Checkpoint, adapters: Sequence[Adapter], options: Mapping[str, object]) -> Identity:
    """Identify the inputs by content (headers and sizes of base shards; adapter files hashed), and say where
    they are (``sources``: absolute paths, recorded in the manifest beside the identities)."""
    labels = {h.path: f"base/{name}" for h, name in zip(ckpt.shards, ckpt.shard_names, strict=True)}
    adapter_docs = []
    for i, a in enumerate(adapters):
        labels[a.weights.path] = f"adapter{i}/{Path(a.weights.path).name}"
        adapter_docs.append({
            "name": a.name,
            "config_sha256": file_sha256(a.root / CONFIG_NAME),
            "weights_file": Path(a.weights.path).name,
            "weights_size": _size(Path(a.weights.path)),
            "weights_sha256": file_sha256(Path(a.weights.path)),
        })
    inputs = {
        "base": {
            "config_sha256": _optional_sha(ckpt.root / "config.json"),
            "shards": [{"file": name, "size": _size(Path(h.path)), "header_sha256": _header_sha(h)}
                       for h, name in zip(ckpt.shards, ckpt.shard_names, strict=True)],
        },
        "adapters": adapter_docs,
    }
    base = ckpt.repository or ckpt.root  # the repository a sub-folder model came from (its sub-folder is an option)
    sources = {"base": str(Path(base).absolute()), "adapters": [str(_given_dir(a).absolute()) for a in adapters]}
    return Identity(tool_version(), inputs, dict(options), labels, sources)


def _given_dir(adapter: Adapter) -> Path:
    """The directory the user named: a sub-adapter chosen by name lives in ``<dir>/<name>``."""
    root = Path(adapter.root)
    return root.parent if adapter.name != "default" and root.name == adapter.name else root


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot stat ({e.strerror or e})") from e


def _header_sha(header: SafetensorsHeader) -> str:
    """SHA-256 of a safetensors header's bytes; for a pickled ``.bin`` (no header bytes), of its tensor index."""
    if header.raw:
        return _sha(header.raw)
    index = [[t.name, t.dtype, list(t.shape), t.begin, t.end] for t in header.tensors]
    return _sha(json.dumps(["pickle-index", index], separators=(",", ":")).encode("utf-8"))


#: Plan fields added after the first release: left out of an identity while unset, so the shards of a plan
#: that does not use them keep the identities older releases recorded (and still resume).
_LATER_FIELDS = frozenset({"quant"})


def _portable(value: object, labels: Mapping[str, str]) -> object:
    """A task (any plan dataclass) as JSON values, input paths replaced by their labels."""
    if isinstance(value, TensorRef):
        doc = {f.name: _portable(getattr(value, f.name), labels) for f in dataclasses.fields(value)}
        doc["path"] = labels.get(value.path, value.path)
        return doc
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _portable(getattr(value, f.name), labels) for f in dataclasses.fields(value)
                if not (f.name in _LATER_FIELDS and getattr(value, f.name) is None)}
    if isinstance(value, (tuple, list)):
        return [_portable(v, labels) for v in value]
    return value

