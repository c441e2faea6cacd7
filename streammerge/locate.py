"""Find the base checkpoint an adapter names (``base_model_name_or_path`` + ``revision``), offline.

Order: a local directory of that name; else the Hugging Face cache, through huggingface_hub's
own cache lookup (``snapshot_download(..., local_files_only=True)``) when that package is
installed. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
from pathlib import Path

from streammerge.adapter import CONFIG_NAME, Adapter
from streammerge.checkpoint import Checkpoint, read_checkpoint
from streammerge.errors import CheckpointError

LOG = logging.getLogger(__name__)


def find_base(adapter: Adapter) -> Path:
    """The base directory for ``adapter``.

    Raises:
        CheckpointError: nothing found; the message lists what was looked for and how to pass --base.
    """
    name = adapter.config.base_model_name_or_path
    revision = adapter.config.revision
    where = adapter.root / "adapter_config.json"
    if not name:
        raise CheckpointError(f"{where}: no base_model_name_or_path, so the base is unknown; pass `base` DIR")
    local = Path(name).expanduser()
    if local.is_dir():
        return local
    looked = [f"a local directory {str(local)!r} (not found)"]
    try:
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        looked.append("the Hugging Face cache (huggingface_hub is not installed: pip install huggingface_hub)")
    else:
        try:
            path = snapshot_download(name, revision=revision, local_files_only=True)
        except (LocalEntryNotFoundError, ValueError, OSError) as e:
            rev = f" at revision {revision!r}" if revision else ""
            looked.append(f"{name!r}{rev} in the Hugging Face cache {constants.HF_HUB_CACHE} ({type(e).__name__})")
        else:
            LOG.info("base %s found in the Hugging Face cache: %s", name, path)
            return Path(path)
    raise CheckpointError(
        f"{where}: base model {name!r} not found; looked for {' and '.join(looked)}; "
        "pass `base` DIR with the base checkpoint"
    )


def read_base(path: Path, argument: str, subfolder: str | None = None) -> Checkpoint:
    """``read_checkpoint``, first refusing a PEFT adapter directory given where a checkpoint belongs."""
    if path.is_dir() and (path / CONFIG_NAME).is_file() and not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path}: is a PEFT adapter directory ({CONFIG_NAME}), not a base checkpoint; pass it as "
            f"`adapters` and the model it was trained on as `{argument}`"
        )
    return read_checkpoint(path, subfolder)
