"""Read a PEFT adapter directory: its config and the header of its weights. No tensor is read.

Which directory (``adapter_name``: PEFT saves extra adapters in sub-directories) and which weights file
(safetensors, else a pickled ``.bin``) are decided here; the config's fields and what they mean are
``streammerge.adapter_parse`` (validation) and ``streammerge.adapter_config`` (PEFT's rules, after PEFT 0.21
``peft/config.py``, ``peft/tuners/lora/layer.py``); see ``peft-merge-spec.md`` §1.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

from streammerge.adapter_config import PATTERN_RULES, AdapterConfig
from streammerge.adapter_parse import parse_config
from streammerge.errors import AdapterError, CheckpointError
from streammerge.formats.jsonfile import read_json
from streammerge.formats.safetensors import SafetensorsHeader, read_header

__all__ = [
    "BIN_WEIGHTS_NAME", "CONFIG_NAME", "WEIGHTS_NAME", "Adapter", "AdapterConfig", "parse_config", "read_adapter",
]

LOG = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BIN_WEIGHTS_NAME = "adapter_model.bin"


@dataclass(frozen=True, slots=True)
class Adapter:
    """An adapter directory: parsed config plus the validated header of its weights file."""

    root: Path
    name: str  # "default" or the sub-directory name chosen with adapter_name
    config: AdapterConfig
    weights: SafetensorsHeader


def read_adapter(path: str | Path, adapter_name: str | None = None, pattern_rules: str = "current") -> Adapter:
    """Read the adapter directory at ``path`` (or its sub-directory ``adapter_name``).

    Raises:
        AdapterError: missing or invalid files.
        UnsupportedAdapterError: a PEFT feature streammerge refuses, named in the message.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(f"{root}: adapter directory not found; pass `adapters` DIR (with {CONFIG_NAME})")
    root, name = _select(root, adapter_name)
    config = parse_config(read_json(root / CONFIG_NAME, AdapterError), root / CONFIG_NAME)
    if pattern_rules not in PATTERN_RULES:
        raise AdapterError(f"pattern rules {pattern_rules!r} unknown; use one of {', '.join(PATTERN_RULES)}")
    config = dataclasses.replace(config, pattern_rules=pattern_rules)
    try:
        weights = _read_weights(root)
    except CheckpointError as e:  # the header codec speaks of checkpoints; this file is the adapter's
        raise AdapterError(str(e)) from e
    return Adapter(root=root, name=name, config=config, weights=weights)


def _read_weights(root: Path) -> SafetensorsHeader:
    """The adapter's tensor index: ``adapter_model.safetensors``, else a pickled ``adapter_model.bin``
    (PEFT's ``load_peft_weights`` order), indexed with ``torch.load(mmap=True, weights_only=True)``."""
    if (root / WEIGHTS_NAME).is_file():
        return read_header(root / WEIGHTS_NAME)
    if (root / BIN_WEIGHTS_NAME).is_file():
        from streammerge.formats.torchbin import read_pickle_index  # torch is needed only for pickled adapters

        LOG.info("%s: pickled adapter, read with torch.load(weights_only=True, mmap=True)", root / BIN_WEIGHTS_NAME)
        return read_pickle_index(root / BIN_WEIGHTS_NAME)
    raise AdapterError(f"{root / WEIGHTS_NAME}: adapter weights not found; the adapter directory is incomplete")


def _select(root: Path, adapter_name: str | None) -> tuple[Path, str]:
    """PEFT saves the "default" adapter at the top and every other adapter ``X`` in ``root/X/``."""
    names = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_NAME}"))
    if adapter_name not in (None, "default"):
        if adapter_name in names:
            return root / adapter_name, adapter_name
        raise AdapterError(
            f"{root}: no adapter named {adapter_name!r}; available: {', '.join(_available(root, names)) or 'none'}"
        )
    if (root / CONFIG_NAME).is_file():
        return root, "default"
    if names:
        raise AdapterError(
            f"{root}: no {CONFIG_NAME} at the top, but it holds adapters {', '.join(names)}; "
            "choose one with `adapter_name` NAME"
        )
    raise AdapterError(f"{root}: {CONFIG_NAME} not found; is this a PEFT adapter directory?")


def _available(root: Path, names: list[str]) -> list[str]:
    return (["default"] if (root / CONFIG_NAME).is_file() else []) + names
