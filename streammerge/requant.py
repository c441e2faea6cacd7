"""Execute the tasks of a quantized base (``plan.QuantSource``): decode row blocks, merge, encode back.

A block of a quantized weight is decoded with its format's codec (``formats.codecs``) to the model dtype,
merged there by the caller's ``merge`` (the same kernel call as any bf16 weight, so ``--dequantize`` is the
bf16 merge of the dequantized base), and for keep-format encoded back with fresh scales. Blocks start at
multiples of ``TensorTask.row_align``, so a block owns whole scale cells and its codes and scales do not
depend on the other blocks: a 128-row block of a block-FP8 weight re-quantizes alone, never the whole
tensor in fp32.

A fresh scale is its own task (``role`` a companion): it walks the weight's merged row blocks one at a
time for their per-cell amax. A per-tensor scale needs the amax of every row before any code is written,
so the weight's blocks first wait for that walk (done once per run, ``QuantRun``). Either way the weight's
merge is computed twice (once for the scales, once for the codes): the price of a scale that may be stored
before its weight, or in another shard.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import torch

from streammerge.formats import codecs, registry
from streammerge.formats.base import CODES
from streammerge.formats.dtypes import torch_dtype
from streammerge.formats.reader import TensorReader
from streammerge.plan import TensorTask, row_blocks

LOG = logging.getLogger(__name__)

#: merge(decoded rows, r0, r1) -> merged rows in the same dtype (the kernel, with its non-finite check).
Merge = Callable[[torch.Tensor, int, int], torch.Tensor]


class QuantRun:
    """One run's shared state: whole-tensor amax walks (done once) and each re-encoded tensor's error."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._walks: dict[str, threading.Lock] = {}
        self._amax: dict[str, torch.Tensor] = {}
        self.errors: dict[str, tuple[float, float]] = {}  # weight -> (max |dequant(out) − merged|, / half step)

    def tensor_amax(self, name: str, walk: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            lock = self._walks.setdefault(name, threading.Lock())
        with lock:  # the first block walks; blocks of the same tensor on other workers wait for it
            if name not in self._amax:
                self._amax[name] = walk()
            return self._amax[name]

    def record(self, name: str, err: tuple[float, float]) -> None:
        with self._lock:
            old = self.errors.get(name, (0.0, 0.0))
            self.errors[name] = (max(old[0], err[0]), max(old[1], err[1]))


def decoded_rows(task: TensorTask, r0: int, r1: int, reader: TensorReader) -> torch.Tensor:
    """Rows ``[r0, r1)`` of a quantized weight task, decoded to its compute dtype (reference-exact)."""
    q = task.quant
    assert q is not None and q.role == CODES
    fmt = registry.format_named(q.weight.scheme.format)
    parts = {}
    for role, ref in q.parts:
        p0, p1 = fmt.rows(q.weight, role, r0, r1)
        rows = reader.rows(ref, p0, p1) if ref.shape else reader.tensor(ref)
        parts[role] = rows
    codec = codecs.codec_for(q.weight.scheme.format)
    if hasattr(codec, "decode_rows"):  # parts span every row (packed across them): the codec slices [r0, r1)
        out = codec.decode_rows(q.weight, parts, torch_dtype(q.compute_dtype), r0, r1)
    else:
        out = codec.decode(q.weight, parts, torch_dtype(q.compute_dtype))
    for role, ref in q.parts:
        reader.release(ref, *fmt.rows(q.weight, role, r0, r1))
    return out


def compute(task: TensorTask, r0: int, r1: int, reader: TensorReader, merge: Merge, block_rows: int,
            run: QuantRun) -> torch.Tensor:
    """The output rows ``[r0, r1)`` of a quantized task (a companion task: the whole part)."""
    q = task.quant
    assert q is not None
    codec = codecs.codec_for(q.weight.scheme.format)
    view = task.weight_view()
    if q.role != CODES:
        amax = _amax(view, reader, merge, block_rows, run)
        return codec.scales(q.weight, amax).reshape(task.shape)
    merged = merge(decoded_rows(task, r0, r1, reader), r0, r1)
    if not q.encode:
        return merged
    amax = _amax(view, reader, merge, block_rows, run) if q.weight.scheme.whole_tensor_scale else None
    encoded = codec.encode(q.weight, merged, amax)
    run.record(task.name, codec.error(q.weight, encoded, merged))
    return encoded[CODES]


def _amax(view: TensorTask, reader: TensorReader, merge: Merge, block_rows: int, run: QuantRun) -> torch.Tensor:
    """The fresh-scale amax of every cell of ``view``'s merged weight (walked block by block)."""
    q = view.quant
    assert q is not None
    codec = codecs.codec_for(q.weight.scheme.format)

    def walk() -> torch.Tensor:
        cells = [codec.amax(q.weight, merge(decoded_rows(view, r0, r1, reader), r0, r1))
                 for r0, r1 in row_blocks(view.rows, block_rows)]
        if q.weight.scheme.whole_tensor_scale:
            return torch.stack(cells).amax(dim=0)
        return torch.cat(cells)

    if q.weight.scheme.whole_tensor_scale:
        return run.tensor_amax(view.name, walk)
    return walk()
