"""``python -m streammerge demo``: a self-contained end-to-end run on a tiny synthetic model.

Builds a 3-shard bf16 Llama-shaped base and an r=8 LoRA on every linear projection, merges them
with ``streammerge.merge``, and checks every output tensor against the naive in-memory reference
merge (``testing.reference_merge``), bit for bit.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from streammerge.api import merge
from streammerge.errors import OutputError, StreamMergeError
from streammerge.testing import LLAMA_LINEAR, load_dir, make_adapter, make_checkpoint, reference_merge


def run_demo(keep: str | None = None) -> str:
    """Run the demo; returns the report text. Raises StreamMergeError if verification fails."""
    if keep is not None:
        root = Path(keep)
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise OutputError(f"{root}: exists and is not an empty directory; `keep` needs a new or empty directory "
                              "(the demo never deletes files)")
        return _demo(root)
    with tempfile.TemporaryDirectory(prefix="streammerge-demo-") as tmp:
        return _demo(Path(tmp))


def _demo(root: Path) -> str:
    base = make_checkpoint(root / "base", layers=4, hidden=128, intermediate=256, vocab=512, shards=3)
    adapter = make_adapter(root / "adapter", base, targets=LLAMA_LINEAR, r=8, alpha=16)
    report = merge(base=base, adapter=adapter, out=root / "merged", device="cpu")
    ours, ref, original = load_dir(root / "merged"), reference_merge(base, adapter), load_dir(base)
    mismatched = [n for n in ref if n not in ours or not torch.equal(ours[n], ref[n])]
    if mismatched or set(ours) != set(ref):
        raise StreamMergeError(f"demo: merged output differs from the reference merge in {mismatched[:3]}")
    changed = sum(not torch.equal(ours[n], original[n]) for n in ours)
    return "\n".join([
        f"demo: base {base} (3 shards, {len(original)} tensors), adapter {adapter} (r=8 on all linear layers)",
        report.summary(),
        f"verified: all {len(ours)} tensors equal the in-memory reference merge bit for bit; {changed} changed "
        "by the adapter, the rest byte-identical to the base",
    ])
