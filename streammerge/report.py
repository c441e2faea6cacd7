"""``MergeReport``: what a merge, unmerge or ``finalize`` did (or, for a dry run, would do)."""

from __future__ import annotations

from dataclasses import dataclass

from streammerge.changes import TensorChange
from streammerge.sizes import format_size


@dataclass(frozen=True, slots=True)
class MergeReport:
    """What a merge did. ``dry_run`` reports carry the plan and wrote nothing."""

    out: str
    tensors_merged: int
    tensors_replaced: int
    tensors_added: int
    tensors_copied: int
    tensors_dropped: int
    bytes_written: int
    seconds: float
    device: str
    shards: int
    warnings: tuple[str, ...]
    dry_run: bool = False
    operation: str = "merge"  # or "unmerge": then ``tensors_merged`` counts the tensors unmerged
    bytes_kept: int = 0  # --resume: bytes of finished shards kept from an earlier run (not in bytes_written)
    base: str = ""  # the base (merge) or merged (unmerge) checkpoint read
    adapters: tuple[str, ...] = ()
    already_complete: bool = False  # a resume found this very output finished: nothing was written
    #: per merged tensor, the relative change written (``streammerge.changes``); tensors in shards a
    #: ``--resume`` kept, and saved modules, are measured by ``verify`` instead
    changes: tuple[TensorChange, ...] = ()
    #: re-quantized weights (keep-format merge into a quantized base): (name, max |dequant(out) − merged|,
    #: its max ratio to half a quantization step), the merged value being the --dequantize merge's
    requantized: tuple[tuple[str, float, float], ...] = ()

    def summary(self) -> str:
        verb = "would write" if self.dry_run else "wrote"
        done = "unmerged" if self.operation == "unmerge" else "merged"
        counts = (f"{self.tensors_merged} {done}, {self.tensors_replaced} replaced, {self.tensors_added} added, "
                  f"{self.tensors_copied} copied, {self.tensors_dropped} dropped")
        if self.already_complete:
            return f"{self.out}: already complete; nothing written ({counts}, {self.shards} shard(s) checked)"
        kept = f", kept {format_size(self.bytes_kept)} from the earlier run" if self.bytes_kept else ""
        text = (
            f"{counts}; {verb} {format_size(self.bytes_written)}{kept} "
            f"in {self.shards} shard(s) to {self.out} in {self.seconds:.1f} s on {self.device}"
        )
        if self.requantized:
            worst = max(self.requantized, key=lambda r: r[2])
            text += (f"; re-quantized {len(self.requantized)} weight(s), worst {worst[0]!r}: max error {worst[1]:.3g} "
                     f"= {worst[2]:.3f} of half a quantization step")
        return text
